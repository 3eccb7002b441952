package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/user"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/taskguard/taskguard/locking/dslock"
)

// dsFlags are the flags of every locks command: where the locks are.
type dsFlags struct {
	project, database, namespace, kind string
	timeout, skew                      time.Duration
}

func addDatastoreFlags(fs *flag.FlagSet, env *environment) *dsFlags {
	d := &dsFlags{}
	fs.StringVar(&d.project, "project", "", "Google Cloud `PROJECT` of the Datastore database. Default: $DATASTORE_PROJECT_ID, then $GOOGLE_CLOUD_PROJECT.")
	fs.StringVar(&d.database, "database", env.getenv(dslock.EnvDatabase), "Firestore-in-Datastore-mode `DATABASE`; empty for the project's default database. Default: $"+dslock.EnvDatabase+".")
	fs.StringVar(&d.namespace, "namespace", env.getenv(dslock.EnvNamespace), "Datastore `NAMESPACE` of the lock entities. Default: $"+dslock.EnvNamespace+".")
	fs.StringVar(&d.kind, "kind", env.getenv(dslock.EnvKind), "Entity `KIND` of the lock entities; empty for "+dslock.DefaultKind+". Default: $"+dslock.EnvKind+".")
	fs.DurationVar(&d.skew, "clock-skew", dslock.DefaultClockSkew, "Where the server reports no times (the legacy Datastore emulator), leases are judged on the writers' and this machine's clocks, with this margin: a lease counts as expired only this long after it ended.")
	fs.DurationVar(&d.timeout, "timeout", 30*time.Second, "Give up after this long (transient Datastore errors are retried until then).")
	return d
}

// open bounds ctx by --timeout and connects to the lock store (no I/O until
// the first call); done closes both.
func (d *dsFlags) open(ctx context.Context) (context.Context, *dslock.Backend, func(), error) {
	ctx, cancel := context.WithTimeout(ctx, d.timeout)
	b, err := dslock.New(ctx, dslock.Options{ProjectID: d.project, DatabaseID: d.database, Namespace: d.namespace, Kind: d.kind, ClockSkew: d.skew})
	if err != nil {
		cancel()
		if errors.Is(err, dslock.ErrBadOptions) {
			return nil, nil, nil, usagef("%v (use --project)", err)
		}
		return nil, nil, nil, err
	}
	return ctx, b, func() { b.Close(); cancel() }, nil
}

// lockJSON is the --json form of one lock.
type lockJSON struct {
	ID          string    `json:"id"`
	Key         string    `json:"key"`
	State       string    `json:"state"`
	Token       uint64    `json:"token"`
	Owner       string    `json:"owner"`
	RenewedAt   time.Time `json:"renewedAt"`
	ExpiresAt   time.Time `json:"expiresAt"`
	LeaseMs     int64     `json:"leaseMs"`
	RemainingMs int64     `json:"remainingMs"`
	Version     int64     `json:"version"`
	ReadAt      time.Time `json:"readAt"`
}

func toJSON(in dslock.LockInfo) lockJSON {
	return lockJSON{
		ID: in.ID, Key: in.KeyName, State: state(in), Token: in.Token, Owner: in.Owner,
		RenewedAt: in.RenewedAt.UTC(), ExpiresAt: in.ExpiresAt.UTC(),
		LeaseMs: in.Lease.Milliseconds(), RemainingMs: in.Remaining.Milliseconds(),
		Version: in.Version, ReadAt: in.ReadAt.UTC(),
	}
}

func state(in dslock.LockInfo) string {
	if in.Held {
		return "held"
	}
	return "expired"
}

// remaining formats how long a lease still runs, or since when it expired.
func remaining(in dslock.LockInfo) string {
	r := in.Remaining.Round(time.Second / 10)
	if in.Held {
		return r.String()
	}
	return "expired " + (-r).String() + " ago"
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

var cmdLocksList = &command{
	path:     "locks list",
	summary:  "list locks, held and expired",
	synopsis: "[--prefix=PREFIX] [--held-only] [--limit=N] [--cursor=CURSOR] [--json] [--project=PROJECT] [--database=DATABASE] [--namespace=NAMESPACE] [--kind=KIND]",
	desc: `Lists the lock entities in Datastore: locks held now and locks whose
lease has expired but whose entity is still stored (their holder died
without releasing; the next acquire or 'locks cleanup' removes them). Expiry
is judged as the lock backend judges it, on the server's clock where the
server reports one.

One run reads at most --limit entities, in pages, so that a large kind
neither takes minutes nor loads the store the live locks renew in; the
rows it prints are sorted by lock id. When more remain, it says so on
standard error with the --cursor that continues after them.

The id is not indexed, so --prefix filters after reading: entities that do
not match count against --limit too.`,
	examples: `To list the first 1000 locks, then the next ones:

    $ taskguard locks list
    $ taskguard locks list --cursor=CURSOR

To list the held locks of user jobs as JSON:

    $ taskguard locks list --prefix=user- --held-only --json`,
	flags: func(fs *flag.FlagSet, env *environment) func(context.Context, []string) error {
		ds := addDatastoreFlags(fs, env)
		prefix := fs.String("prefix", "", "Only locks whose id starts with `PREFIX`.")
		heldOnly := fs.Bool("held-only", false, "Only locks whose lease has not expired.")
		limit := fs.Int("limit", dslock.DefaultListLimit, "Read at most `N` lock entities (at most 100000).")
		cursor := fs.String("cursor", "", "Continue after the entities an earlier run read (the `CURSOR` it printed).")
		asJSON := fs.Bool("json", false, "Print a JSON array instead of a table.")
		return func(ctx context.Context, _ []string) error {
			if *limit <= 0 || *limit > maxListLimit {
				return usagef("--limit must be between 1 and %d, not %d", maxListLimit, *limit)
			}
			ctx, b, done, err := ds.open(ctx)
			if err != nil {
				return err
			}
			defer done()
			listing, err := b.List(ctx, dslock.ListOptions{Prefix: *prefix, HeldOnly: *heldOnly, Limit: *limit, Cursor: *cursor})
			if errors.Is(err, dslock.ErrBadCursor) {
				return usagef("%v", err)
			}
			if err != nil {
				return err
			}
			locks := listing.Locks
			if listing.Next != "" {
				defer fmt.Fprintf(env.stderr, "Read %d lock entities; more remain. Continue with --cursor=%s\n", listing.Read, listing.Next)
			}
			if *asJSON {
				out := make([]lockJSON, 0, len(locks))
				for _, in := range locks {
					out = append(out, toJSON(in))
				}
				return writeJSON(env.stdout, out)
			}
			if len(locks) == 0 {
				fmt.Fprintln(env.stderr, "Listed 0 items.")
				return nil
			}
			tw := tabwriter.NewWriter(env.stdout, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tSTATE\tTOKEN\tREMAINING\tRENEWED_AT\tLEASE\tOWNER")
			for _, in := range locks {
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\n", printable(in.ID), state(in), in.Token, remaining(in),
					in.RenewedAt.UTC().Format(time.RFC3339), in.Lease, in.Owner)
			}
			return tw.Flush()
		}
	},
}

// maxListLimit bounds --limit of locks list.
const maxListLimit = 100000

// printable quotes an id that holds spaces or control characters, so that a
// table row stays one row.
func printable(id string) string {
	q := strconv.Quote(id)
	if q[1:len(q)-1] != id || id == "" || containsSpace(id) {
		return q
	}
	return id
}

func containsSpace(s string) bool {
	for _, r := range s {
		if r == ' ' || r == '\t' {
			return true
		}
	}
	return false
}

var cmdLocksShow = &command{
	path:     "locks show",
	nargs:    1,
	summary:  "show one lock",
	synopsis: "ID [--json] [--project=PROJECT] [--database=DATABASE] [--namespace=NAMESPACE] [--kind=KIND]",
	desc: `Shows the lock ID as stored: its state, fencing token, owner, when it was
last acquired or renewed, its lease and how much of it remains.

Fails (exit status 1) when no entity exists for ID: the lock is free, was
released, or was cleaned up.`,
	examples: `To show the lock of user 42:

    $ taskguard locks show user-42`,
	flags: func(fs *flag.FlagSet, env *environment) func(context.Context, []string) error {
		ds := addDatastoreFlags(fs, env)
		asJSON := fs.Bool("json", false, "Print a JSON object.")
		return func(ctx context.Context, args []string) error {
			ctx, b, done, err := ds.open(ctx)
			if err != nil {
				return err
			}
			defer done()
			in, err := b.Inspect(ctx, args[0])
			if errors.Is(err, dslock.ErrNotFound) {
				return fmt.Errorf("lock %q not found: it is free, released or cleaned up", args[0])
			}
			if err != nil {
				return err
			}
			if *asJSON {
				return writeJSON(env.stdout, toJSON(in))
			}
			printLock(env.stdout, in)
			return nil
		}
	},
}

func printLock(w io.Writer, in dslock.LockInfo) {
	fmt.Fprintf(w, "id: %s\nkey: %s\nstate: %s\ntoken: %d\nowner: %s\nrenewedAt: %s\nexpiresAt: %s\nlease: %s\nremaining: %s\nversion: %d\nreadAt: %s\n",
		printable(in.ID), in.KeyName, state(in), in.Token, in.Owner,
		in.RenewedAt.UTC().Format(time.RFC3339Nano), in.ExpiresAt.UTC().Format(time.RFC3339Nano),
		in.Lease, remaining(in), in.Version, in.ReadAt.UTC().Format(time.RFC3339Nano))
}

var cmdLocksRelease = &command{
	path:     "locks release",
	nargs:    1,
	summary:  "force-release a lock, whoever holds it",
	synopsis: "ID --force [--token=TOKEN] [--reason=REASON] [--json] [--project=PROJECT] [--database=DATABASE] [--namespace=NAMESPACE] [--kind=KIND]",
	desc: `Deletes the lock ID, whoever holds it, so that the next caller can take it
at once. Use it for a lock whose holder is stuck; a holder that died loses
its lock by itself when its lease ends.

The holder is not stopped: it learns that it lost the lock at its next
renewal (a third of its lease at most), when its Done channel closes and the
context of its locking.With function is cancelled. Until then it may still
write. The next holder's fencing token is higher than the removed one, and
the command prints the deletion's version (FENCE), which lies between the
two: a resource that refuses writes with tokens below FENCE refuses the
removed holder's.

Every force release is audited: a JSON record naming the lock, the removed
token and owner, who ran the command (user@host, and the gcloud account when
CLOUDSDK_CORE_ACCOUNT is set), when, and --reason, is written to standard
error (collect it with the rest of your operations logs).

--force is required. With --token, the lock is removed only while it is
still held under that token (as printed by 'locks show'), so a lock that
changed hands since you looked is left alone (exit status 1).`,
	examples: `To release the lock of user 42 held under token 1234:

    $ taskguard locks release user-42 --force --token=1234 --reason="worker hung, INC-77"`,
	flags: func(fs *flag.FlagSet, env *environment) func(context.Context, []string) error {
		ds := addDatastoreFlags(fs, env)
		force := fs.Bool("force", false, "Required: confirm that the lock is to be removed whoever holds it.")
		token := fs.Uint64("token", 0, "Remove the lock only if it is held under this fencing `TOKEN`.")
		reason := fs.String("reason", "", "Why (`REASON`); recorded in the audit record.")
		asJSON := fs.Bool("json", false, "Print a JSON object.")
		return func(ctx context.Context, args []string) error {
			if !*force {
				return usagef("refusing to release %q without --force: its holder may still be working", args[0])
			}
			ctx, b, done, err := ds.open(ctx)
			if err != nil {
				return err
			}
			defer done()
			at := time.Now().UTC()
			rel, err := b.ForceRelease(ctx, args[0], *token)
			switch {
			case errors.Is(err, dslock.ErrNotFound):
				return fmt.Errorf("lock %q not found: it is free, released or cleaned up; nothing to release", args[0])
			case errors.Is(err, dslock.ErrTokenMismatch):
				return fmt.Errorf("lock %q is held under token %d, not %d: it changed hands; not released", args[0], rel.Lock.Token, *token)
			case err != nil:
				return err
			}
			who, account := operator(env)
			audit := slog.New(slog.NewJSONHandler(env.stderr, nil))
			audit.Warn("taskguard: lock force-released",
				"audit", true, "lock_id", rel.Lock.ID, "key", rel.Lock.KeyName,
				"token", rel.Lock.Token, "owner", rel.Lock.Owner, "state", state(rel.Lock),
				"fence", rel.Fence, "by", who, "account", account, "at", at, "reason", *reason,
				"project", ds.project, "database", ds.database, "namespace", ds.namespace)
			if *asJSON {
				return writeJSON(env.stdout, struct {
					Released lockJSON  `json:"released"`
					Fence    uint64    `json:"fence"`
					By       string    `json:"by"`
					At       time.Time `json:"at"`
					Reason   string    `json:"reason,omitempty"`
				}{toJSON(rel.Lock), rel.Fence, who, at, *reason})
			}
			fmt.Fprintf(env.stdout, "Released lock %s (token %d, %s, owner %s).\nFENCE: %d\n", printable(rel.Lock.ID), rel.Lock.Token, state(rel.Lock), rel.Lock.Owner, rel.Fence)
			if rel.Lock.Held {
				fmt.Fprintf(env.stdout, "Its holder learns of it at its next renewal, within %s.\n", rel.Lock.Lease/3)
			}
			return nil
		}
	},
}

// operator names who runs the command, for the audit record.
func operator(env *environment) (who, account string) {
	name := env.getenv("USER")
	if u, err := user.Current(); err == nil {
		name = u.Username
	}
	host, _ := os.Hostname()
	return name + "@" + host, env.getenv("CLOUDSDK_CORE_ACCOUNT")
}

var cmdLocksCleanup = &command{
	path:     "locks cleanup",
	summary:  "delete expired lock entities",
	synopsis: "[--dry-run] [--grace=GRACE] [--json] [--project=PROJECT] [--database=DATABASE] [--namespace=NAMESPACE] [--kind=KIND]",
	desc: `Deletes the lock entities whose lease ended more than GRACE ago (their
holders died without releasing them). A live lease is never deleted: each
entity is read back and deleted only if it is unchanged since. This is what
the scheduled cleanup function does; run it by hand to see or clear a
backlog. With --dry-run it only counts.

Fails (exit status 1) when some expired entities could not be deleted; run
it again to resume.`,
	examples: `To see how many expired locks would be deleted:

    $ taskguard locks cleanup --dry-run

To delete every lock expired for more than a minute:

    $ taskguard locks cleanup --grace=1m`,
	flags: func(fs *flag.FlagSet, env *environment) func(context.Context, []string) error {
		ds := addDatastoreFlags(fs, env)
		dryRun := fs.Bool("dry-run", false, "Count the entities that would be deleted; delete none.")
		grace := fs.Duration("grace", dslock.DefaultCleanupGrace, "Keep entities until their lease ended this long (`GRACE`) ago.")
		asJSON := fs.Bool("json", false, "Print the report as a JSON object.")
		return func(ctx context.Context, _ []string) error {
			if *grace <= 0 {
				return usagef("--grace must be positive, not %v", *grace)
			}
			ctx, b, done, err := ds.open(ctx)
			if err != nil {
				return err
			}
			defer done()
			rep, err := b.Cleanup(ctx, dslock.CleanupOptions{Grace: *grace, DryRun: *dryRun})
			if *asJSON {
				if jerr := writeJSON(env.stdout, struct {
					DryRun    bool  `json:"dryRun"`
					Scanned   int   `json:"scanned"`
					Expired   int   `json:"expired"`
					Deleted   int   `json:"deleted"`
					Skipped   int   `json:"skipped"`
					Errors    int   `json:"errors"`
					Unknown   int   `json:"unknown"`
					Finished  bool  `json:"finished"`
					ElapsedMs int64 `json:"elapsedMs"`
				}{rep.DryRun, rep.Scanned, rep.Expired, rep.Deleted, rep.Skipped, rep.Errors, rep.Unknown, rep.Finished, rep.Elapsed.Milliseconds()}); jerr != nil {
					return jerr
				}
			} else if *dryRun {
				fmt.Fprintf(env.stdout, "Dry run: %d expired lock entities would be deleted (%d scanned, %d skipped).\n", rep.Expired, rep.Scanned, rep.Skipped)
			} else {
				fmt.Fprintf(env.stdout, "Deleted %d expired lock entities (%d scanned, %d expired, %d skipped, %d errors, %d unknown) in %s.\n",
					rep.Deleted, rep.Scanned, rep.Expired, rep.Skipped, rep.Errors, rep.Unknown, rep.Elapsed.Round(time.Millisecond))
			}
			if err == nil && rep.Errors > 0 {
				err = fmt.Errorf("%d expired entities could not be deleted", rep.Errors)
			}
			return err
		}
	},
}
