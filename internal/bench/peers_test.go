package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	"cloud.google.com/go/datastore"
	bsm "github.com/bsm/redislock"
	"github.com/go-redsync/redsync/v4"
	redsyncgoredis "github.com/go-redsync/redsync/v4/redis/goredis/v9"
	"github.com/redis/go-redis/v9"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/locking/redislock"
)

// The contenders of the benchmarks against the real peers: taskguard on
// the legacy Datastore emulator and on redis-server, the published Go
// redis locks go-redsync/redsync and bsm/redislock (unchanged, with their
// documented retry settings), and the djangae re-implementation
// (lockers_test.go) as the djangae baseline: djangae is Python on App
// Engine and cannot run here.
const (
	peerDslock    = "dslock"    // taskguard, locking/dslock
	peerDjangae   = "djangae"   // the djangae STRONG lock, reimplemented
	peerRedislock = "redislock" // taskguard, locking/redislock
	peerRedsync   = "redsync"   // github.com/go-redsync/redsync/v4
	peerBsm       = "bsm"       // github.com/bsm/redislock
)

// peerLease is every contender's lease (redsync: expiry; bsm: TTL); no
// hold is longer. djangae has none (its locks are never stolen here).
const peerLease = 30 * time.Second

// bsmBackoff is bsm/redislock's documented retry strategy for waiting.
const bsmBackoff = 100 * time.Millisecond

// peerWaitLimit bounds one wait of bsm/redislock, which otherwise gives up
// after its TTL when the context has no deadline.
const peerWaitLimit = 15 * time.Minute

// xlocker takes one lock, waiting while it is held: one contender in one
// process. release gives it back.
type xlocker interface {
	acquire(ctx context.Context, id string) (release func(context.Context) error, err error)
}

// tgLocker is taskguard through its public API: one locking.Client per
// process, with the package defaults (so whatever the wait loop does —
// backoff, notification — is what is measured).
type tgLocker struct{ c *locking.Client }

func (t tgLocker) acquire(ctx context.Context, id string) (func(context.Context) error, error) {
	l, err := t.c.Acquire(ctx, id)
	if err != nil {
		return nil, err
	}
	return l.Release, nil
}

// bsmLocker is bsm/redislock with LinearBackoff(100 ms), as its README
// shows for waiting.
type bsmLocker struct{ c *bsm.Client }

func (l bsmLocker) acquire(ctx context.Context, id string) (func(context.Context) error, error) {
	ctx, cancel := context.WithTimeout(ctx, peerWaitLimit)
	defer cancel()
	lk, err := l.c.Obtain(ctx, id, peerLease, &bsm.Options{RetryStrategy: bsm.LinearBackoff(bsmBackoff)})
	if err != nil {
		return nil, err
	}
	return lk.Release, nil
}

// redsyncLocker is redsync with its default tries (32) and retry delays
// (uniform 50–250 ms); when they run out (ErrFailed, after about 5 s) the
// waiter calls Lock again, as a caller that must have the lock does.
type redsyncLocker struct{ rs *redsync.Redsync }

func (l redsyncLocker) acquire(ctx context.Context, id string) (func(context.Context) error, error) {
	m := l.rs.NewMutex(id, redsync.WithExpiry(peerLease))
	for {
		err := m.LockContext(ctx)
		if err == nil {
			return func(ctx context.Context) error {
				_, err := m.UnlockContext(ctx)
				return err
			}, nil
		}
		var taken *redsync.ErrTaken
		switch {
		case ctx.Err() != nil:
			return nil, ctx.Err()
		case errors.Is(err, redsync.ErrFailed), errors.As(err, &taken):
			continue // its tries ran out while the lock stayed held
		}
		return nil, err
	}
}

// callLog records the moments (wall clock, Unix ns: comparable across the
// processes of one machine) of one process's store calls: Datastore RPCs,
// or redis commands other than the connection's own housekeeping
// (HELLO, CLIENT, PING, AUTH, SELECT) and pub/sub (SUBSCRIBE and its
// kin), which it records apart (auxAt).
type callLog struct {
	mu        sync.Mutex
	at, auxAt []int64 // guarded by mu
}

func (l *callLog) add(aux bool) {
	now := time.Now().UnixNano()
	l.mu.Lock()
	defer l.mu.Unlock()
	if aux {
		l.auxAt = append(l.auxAt, now)
		return
	}
	l.at = append(l.at, now)
}

func (l *callLog) take() (at, auxAt []int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.at, l.auxAt
}

func (l *callLog) intercept(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	l.add(false)
	return invoker(ctx, method, req, reply, cc, opts...)
}

// auxCommands are the redis commands a callLog does not count as store
// calls of the lock.
var auxCommands = map[string]bool{
	"HELLO": true, "CLIENT": true, "PING": true, "AUTH": true, "SELECT": true, "QUIT": true,
	"SUBSCRIBE": true, "UNSUBSCRIBE": true, "PSUBSCRIBE": true, "PUNSUBSCRIBE": true,
	"SSUBSCRIBE": true, "SUNSUBSCRIBE": true,
}

// respCommand returns the name of the first command in p, a RESP array of
// bulk strings as go-redis writes it ("*3\r\n$3\r\nSET\r\n..."), or "".
func respCommand(p []byte) string {
	if len(p) == 0 || p[0] != '*' {
		return ""
	}
	i := bytes.Index(p, []byte("\r\n$"))
	if i < 0 {
		return ""
	}
	rest := p[i+3:]
	j := bytes.Index(rest, []byte("\r\n"))
	if j < 0 {
		return ""
	}
	n, err := strconv.Atoi(string(rest[:j]))
	if err != nil || n < 0 || j+2+n > len(rest) {
		return ""
	}
	return string(bytes.ToUpper(rest[j+2 : j+2+n]))
}

// loggingConn records each Write of a redis connection (go-redis writes
// one command, or one pipeline, per Write) in a callLog.
type loggingConn struct {
	net.Conn
	log *callLog
}

func (c loggingConn) Write(p []byte) (int, error) {
	c.log.add(auxCommands[respCommand(p)])
	return c.Conn.Write(p)
}

// peerRedisClient returns a go-redis client for addr whose connections
// log to cl (nil: not logged).
func peerRedisClient(addr string, cl *callLog) *redis.Client {
	o := &redis.Options{Addr: addr, PoolSize: 16}
	if cl != nil {
		o.Dialer = func(ctx context.Context, network, address string) (net.Conn, error) {
			conn, err := dialer.DialContext(ctx, network, address)
			if err != nil {
				return nil, err
			}
			return loggingConn{conn, cl}, nil
		}
	}
	return redis.NewClient(o)
}

// peerStore names the servers a contender runs against.
type peerStore struct {
	RedisAddr string // redis-server host:port
	DSHost    string // Datastore emulator host:port
	DSProject string
	Prefix    string // redis key prefix of taskguard (unique per run)
}

// openPeer returns contender name's locker on st, its store calls logged
// to cl (nil: not logged), and the function that closes its connections.
func openPeer(ctx context.Context, name string, st peerStore, cl *callLog) (xlocker, func() error, error) {
	switch name {
	case peerRedislock, peerRedsync, peerBsm:
		rc := peerRedisClient(st.RedisAddr, cl)
		switch name {
		case peerRedsync:
			return redsyncLocker{redsync.New(redsyncgoredis.NewPool(rc))}, rc.Close, nil
		case peerBsm:
			return bsmLocker{bsm.New(rc)}, rc.Close, nil
		}
		be, err := redislock.New(rc, redislock.Options{Prefix: st.Prefix})
		if err != nil {
			_ = rc.Close()
			return nil, nil, err
		}
		c, err := locking.New(locking.Config{Strong: be, Lease: peerLease})
		if err != nil {
			_ = rc.Close()
			return nil, nil, err
		}
		return tgLocker{c}, rc.Close, nil
	case peerDslock, peerDjangae:
		opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
		if cl != nil {
			opts = append(opts, grpc.WithChainUnaryInterceptor(cl.intercept))
		}
		cc, err := grpc.NewClient("passthrough:///"+st.DSHost, opts...)
		if err != nil {
			return nil, nil, err
		}
		if name == peerDjangae {
			dc, err := datastore.NewClient(ctx, st.DSProject, option.WithGRPCConn(cc))
			if err != nil {
				_ = cc.Close()
				return nil, nil, err
			}
			return &djangae{c: dc}, cc.Close, nil
		}
		be, err := dslock.New(ctx, dslock.Options{ProjectID: st.DSProject, Conn: cc, Kind: "BenchPeerLock"})
		if err != nil {
			_ = cc.Close()
			return nil, nil, err
		}
		c, err := locking.New(locking.Config{Strong: be, Lease: peerLease})
		if err != nil {
			_ = cc.Close()
			return nil, nil, err
		}
		return tgLocker{c}, cc.Close, nil
	}
	return nil, nil, fmt.Errorf("unknown contender %q", name)
}
