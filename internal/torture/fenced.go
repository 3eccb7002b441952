package torture

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"time"

	"cloud.google.com/go/datastore"
	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" database/sql driver
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/taskguard/taskguard/locking/fence"
	"github.com/taskguard/taskguard/locking/fence/dsfence"
	"github.com/taskguard/taskguard/locking/fence/sqlfence"
)

// Resources a worker can write through the fence, for Config.Fence.
const (
	FenceDatastore = "datastore" // entities on the Datastore emulator at Config.Addr, dsfence
	FencePostgres  = "postgres"  // rows in the PostgreSQL database at Config.FenceDSN, sqlfence
)

// Write is one write that landed on a fenced resource, as the resource's
// own history keeps it: the Version-th write of resource ID (versions count
// 1, 2, ... in the order the resource's transactions committed), made with
// Token by Owner.
type Write struct {
	ID      string
	Version int64
	Token   int64
	Owner   string
}

// resource is a store written through the fence: each write bumps the
// version of the resource id and appends a Write to its history, in one
// transaction with the fence check.
type resource interface {
	write(ctx context.Context, id string, tok fence.Token, owner string) error
	close()
}

// openResource opens the resource cfg.Fence names, nil when none.
func openResource(ctx context.Context, cfg Config) (resource, error) {
	switch cfg.Fence {
	case "":
		return nil, nil
	case FenceDatastore:
		return openDatastore(ctx, cfg)
	case FencePostgres:
		db, err := sql.Open("pgx", cfg.FenceDSN)
		if err != nil {
			return nil, err
		}
		return sqlResource{db}, nil
	}
	return nil, fmt.Errorf("torture: unknown fenced resource %q", cfg.Fence)
}

// dsResource keeps, under kinds prefixed with Config.Prefix, the fence
// records (Fence), one version counter per id (Res) and the history (Hist).
type dsResource struct {
	c      *datastore.Client
	cc     *grpc.ClientConn
	prefix string
}

func openDatastore(ctx context.Context, cfg Config) (dsResource, error) {
	cc, err := grpc.NewClient("passthrough:///"+cfg.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return dsResource{}, err
	}
	c, err := datastore.NewClient(ctx, cfg.Project, option.WithGRPCConn(cc))
	if err != nil {
		cc.Close()
		return dsResource{}, err
	}
	return dsResource{c: c, cc: cc, prefix: cfg.Prefix}, nil
}

type dsVersion struct{ Version int64 }

// write writes id's next version under the fence, in a transaction tried
// again (with a jittered pause) while it meets a concurrent one, until ctx
// ends: the Firestore emulator serialises overlapping transactions, and a
// stale holder's write must reach the fence's check to be refused.
func (r dsResource) write(ctx context.Context, id string, tok fence.Token, owner string) error {
	for {
		err := r.writeOnce(ctx, id, tok, owner)
		if !errors.Is(err, datastore.ErrConcurrentTransaction) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(10*time.Millisecond + rand.N(40*time.Millisecond)):
		}
	}
}

func (r dsResource) writeOnce(ctx context.Context, id string, tok fence.Token, owner string) error {
	_, err := r.c.RunInTransaction(ctx, func(tx *datastore.Transaction) error {
		if err := (dsfence.Records{Kind: r.prefix + "Fence"}).Check(tx, id, tok); err != nil {
			return err
		}
		key := datastore.NameKey(r.prefix+"Res", id, nil)
		var v dsVersion
		if err := tx.Get(key, &v); err != nil && !errors.Is(err, datastore.ErrNoSuchEntity) {
			return err
		}
		v.Version++
		if _, err := tx.Put(key, &v); err != nil {
			return err
		}
		w := Write{ID: id, Version: v.Version, Token: int64(tok.Value), Owner: owner}
		_, err := tx.Put(datastore.NameKey(r.prefix+"Hist", fmt.Sprintf("%s/%d", id, v.Version), nil), &w)
		return err
	})
	return err
}

func (r dsResource) close() {
	r.c.Close()
	r.cc.Close()
}

type sqlResource struct{ db *sql.DB }

// SetupPostgres creates the fence table and the resource's tables.
func SetupPostgres(ctx context.Context, db *sql.DB) error {
	if err := sqlfence.CreateTable(ctx, db); err != nil {
		return err
	}
	_, err := db.ExecContext(ctx, `CREATE TABLE res (id text PRIMARY KEY, version bigint NOT NULL);
CREATE TABLE hist (id text, version bigint, token bigint NOT NULL, owner text NOT NULL, PRIMARY KEY (id, version))`)
	return err
}

func (r sqlResource) write(ctx context.Context, id string, tok fence.Token, owner string) error {
	tx, err := r.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := sqlfence.Check(ctx, tx, id, tok); err != nil {
		return err
	}
	var v int64
	if err := tx.QueryRowContext(ctx, `INSERT INTO res VALUES ($1, 1)
		ON CONFLICT (id) DO UPDATE SET version = res.version + 1 RETURNING version`, id).Scan(&v); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO hist VALUES ($1, $2, $3, $4)`, id, v, int64(tok.Value), owner); err != nil {
		return err
	}
	return tx.Commit()
}

func (r sqlResource) close() { r.db.Close() }

// ReadHistory returns every write that landed on cfg's resource.
func ReadHistory(ctx context.Context, cfg Config) ([]Write, error) {
	var ws []Write
	switch cfg.Fence {
	case FenceDatastore:
		r, err := openDatastore(ctx, cfg)
		if err != nil {
			return nil, err
		}
		defer r.close()
		if _, err := r.c.GetAll(ctx, datastore.NewQuery(cfg.Prefix+"Hist"), &ws); err != nil {
			return nil, err
		}
	case FencePostgres:
		db, err := sql.Open("pgx", cfg.FenceDSN)
		if err != nil {
			return nil, err
		}
		defer db.Close()
		rows, err := db.QueryContext(ctx, `SELECT id, version, token, owner FROM hist`)
		if err != nil {
			return nil, err
		}
		defer rows.Close()
		for rows.Next() {
			var w Write
			if err := rows.Scan(&w.ID, &w.Version, &w.Token, &w.Owner); err != nil {
				return nil, err
			}
			ws = append(ws, w)
		}
		if err := rows.Err(); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("torture: unknown fenced resource %q", cfg.Fence)
	}
	return ws, nil
}

// CheckHistory returns what is wrong with a resource's history: per id, the
// versions must run 1, 2, ... n without a gap or a repeat, and the tokens
// must not decrease in version order — a lower token after a higher one is
// a stale write that landed.
func CheckHistory(ws []Write) (stale int, problems []string) {
	byID := map[string][]Write{}
	for _, w := range ws {
		byID[w.ID] = append(byID[w.ID], w)
	}
	for id, ws := range byID {
		slices.SortFunc(ws, func(a, b Write) int { return int(a.Version - b.Version) })
		for i, w := range ws {
			if w.Version != int64(i+1) {
				problems = append(problems, fmt.Sprintf("%s: write %d has version %d", id, i+1, w.Version))
				break
			}
			if i > 0 && w.Token < ws[i-1].Token {
				stale++
				problems = append(problems, fmt.Sprintf("%s: version %d written with token %d by %s after token %d by %s",
					id, w.Version, w.Token, w.Owner, ws[i-1].Token, ws[i-1].Owner))
			}
		}
	}
	return stale, problems
}

// fencedWriteTimeout bounds one write to the resource.
const fencedWriteTimeout = 30 * time.Second
