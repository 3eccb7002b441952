package bench

import (
	"context"
	"crypto/md5"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"cloud.google.com/go/datastore"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/taskguard/taskguard/locking"
)

// A locker is one instance's way of taking one lock: ours through a
// locking.Client, or a baseline. Its methods are safe for concurrent use
// (goroutines of one instance share it).
type locker interface {
	// acquire waits until it holds id or ctx ends, and returns the function
	// that releases it.
	acquire(ctx context.Context, id string) (release func(context.Context) error, err error)
	// polls returns how many tries so far found the lock held: the backend
	// polls of waiting, by this instance.
	polls() int64
}

// pollCounter wraps a backend and counts the Acquire calls that find the
// lock held.
type pollCounter struct {
	locking.Backend
	n atomic.Int64
}

func (p *pollCounter) Acquire(ctx context.Context, r locking.Request) (locking.Grant, error) {
	g, err := p.Backend.Acquire(ctx, r)
	if err == nil && !g.Acquired {
		p.n.Add(1)
	}
	return g, err
}

// ours is one instance of taskguard: one locking.Client.
type ours struct {
	c    *locking.Client
	pc   *pollCounter
	opts []locking.Option
}

func newOurs(b locking.Backend, cfg locking.Config, opts ...locking.Option) *ours {
	pc := &pollCounter{Backend: b}
	cfg.Strong = pc
	c, err := locking.New(cfg)
	if err != nil {
		panic(err) // cfg is built by the benchmarks
	}
	return &ours{c: c, pc: pc, opts: opts}
}

func (o *ours) acquire(ctx context.Context, id string) (func(context.Context) error, error) {
	l, err := o.c.Acquire(ctx, id, o.opts...)
	if err != nil {
		return nil, err
	}
	return l.Release, nil
}

func (o *ours) polls() int64 { return o.pc.n.Load() }

// errHeld makes a baseline's transaction roll back when the lock is held.
var errHeld = errors.New("held")

// conflicted reports whether a transaction failed on contention, which both
// baselines count as "not acquired".
func conflicted(err error) bool {
	return errors.Is(err, datastore.ErrConcurrentTransaction) || status.Code(err) == codes.Aborted
}

// djangae reimplements djangae.contrib.locking's STRONG lock from its
// described behaviour (djangae's contrib.locking): entity kind
// locking_datastorelock keyed by md5(identifier); acquire is one transaction
// that reads the key and creates it when absent, or overwrites its timestamp
// when older than steal_after; a conflict counts as not acquired; a waiter
// sleeps uniform(0, 1) s between tries, with no backoff and no cap; release
// is an unconditional delete.
type djangae struct {
	c          *datastore.Client
	stealAfter time.Duration // 0: never steal
	n          atomic.Int64
}

type djangaeEntity struct {
	Identifier string
	Timestamp  time.Time
}

func djangaeKey(id string) *datastore.Key {
	sum := md5.Sum([]byte(id))
	return datastore.NameKey("locking_datastorelock", hex.EncodeToString(sum[:]), nil)
}

// try is one acquisition attempt.
func (d *djangae) try(ctx context.Context, id string) (bool, error) {
	k := djangaeKey(id)
	_, err := d.c.RunInTransaction(ctx, func(tx *datastore.Transaction) error {
		var e djangaeEntity
		switch err := tx.Get(k, &e); {
		case errors.Is(err, datastore.ErrNoSuchEntity):
		case err != nil:
			return err
		case d.stealAfter > 0 && time.Since(e.Timestamp) > d.stealAfter:
		default:
			return errHeld
		}
		_, err := tx.Put(k, &djangaeEntity{Identifier: id, Timestamp: time.Now()})
		return err
	}, datastore.MaxAttempts(1))
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, errHeld) || conflicted(err):
		return false, nil
	}
	return false, err
}

func (d *djangae) acquire(ctx context.Context, id string) (func(context.Context) error, error) {
	for {
		ok, err := d.try(ctx, id)
		if err != nil {
			return nil, err
		}
		if ok {
			return func(ctx context.Context) error { return d.c.Delete(ctx, djangaeKey(id)) }, nil
		}
		d.n.Add(1)
		if err := sleepCtx(ctx, uniform(time.Second)); err != nil {
			return nil, err
		}
	}
}

func (d *djangae) polls() int64 { return d.n.Load() }

// googleLock reimplements Google's datastore-lock (Node) from its described
// behaviour (Google's datastore-lock for Node.js): acquire is a transaction (begin,
// lookup, commit) that writes {owner, expiresAt = now + lease} when the
// entity is absent or expired; release is a transaction that deletes it if
// the owner matches; a waiter polls with pauses growing from 2 s to 10 s
// (doubling; the Node library's exact growth is not described).
type googleLock struct {
	c     *datastore.Client
	lease time.Duration
	n     atomic.Int64
}

type googleEntity struct {
	Owner     string
	ExpiresAt time.Time
}

const (
	googleMinPoll = 2 * time.Second
	googleMaxPoll = 10 * time.Second
)

func googleKey(id string) *datastore.Key { return datastore.NameKey("Lock", id, nil) }

func (g *googleLock) try(ctx context.Context, id, owner string) (bool, error) {
	k := googleKey(id)
	_, err := g.c.RunInTransaction(ctx, func(tx *datastore.Transaction) error {
		var e googleEntity
		switch err := tx.Get(k, &e); {
		case errors.Is(err, datastore.ErrNoSuchEntity):
		case err != nil:
			return err
		case e.ExpiresAt.After(time.Now()):
			return errHeld
		}
		_, err := tx.Put(k, &googleEntity{Owner: owner, ExpiresAt: time.Now().Add(g.lease)})
		return err
	}, datastore.MaxAttempts(1))
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, errHeld) || conflicted(err):
		return false, nil
	}
	return false, err
}

func (g *googleLock) release(ctx context.Context, id, owner string) error {
	k := googleKey(id)
	_, err := g.c.RunInTransaction(ctx, func(tx *datastore.Transaction) error {
		var e googleEntity
		if err := tx.Get(k, &e); err != nil {
			return err
		}
		if e.Owner != owner {
			return fmt.Errorf("release %q: not the owner", id)
		}
		return tx.Delete(k)
	})
	return err
}

func (g *googleLock) acquire(ctx context.Context, id string) (func(context.Context) error, error) {
	owner := rand.Text()
	pause := googleMinPoll
	for {
		ok, err := g.try(ctx, id, owner)
		if err != nil {
			return nil, err
		}
		if ok {
			return func(ctx context.Context) error { return g.release(ctx, id, owner) }, nil
		}
		g.n.Add(1)
		if err := sleepCtx(ctx, pause); err != nil {
			return nil, err
		}
		pause = min(2*pause, googleMaxPoll)
	}
}

func (g *googleLock) polls() int64 { return g.n.Load() }
