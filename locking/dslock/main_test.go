package dslock

import (
	"context"
	"fmt"
	"os"
	"path"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	pb "cloud.google.com/go/datastore/apiv1/datastorepb"
	"go.uber.org/goleak"
	"google.golang.org/grpc"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

// testSkew is the clock-skew margin of test backends: every process of a
// test runs on this machine's one clock.
const testSkew = 10 * time.Millisecond

// emulators holds each emulator, started at most once per test binary (in
// the background from TestMain) and stopped after all tests.
var emulators *dstest.Set

func TestMain(m *testing.M) {
	if os.Getenv(workerEnv) != "" {
		os.Exit(worker())
	}
	emulators = dstest.StartSet(dstest.Legacy, dstest.Firestore)
	code := m.Run()
	emulators.Close()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// emulator returns the running emulator of mode m, reset to empty, or ends
// the test (skip locally, fail with CI=true) when it is not available.
func emulator(t *testing.T, m dstest.Mode) *dstest.Emulator {
	t.Helper()
	return emulators.Get(t, m, true)
}

// eachEmulator runs fn as a subtest against each emulator.
func eachEmulator(t *testing.T, fn func(t *testing.T, e *dstest.Emulator)) {
	for _, m := range []dstest.Mode{dstest.Legacy, dstest.Firestore} {
		t.Run(m.String(), func(t *testing.T) { fn(t, emulator(t, m)) })
	}
}

// newBackend returns a Backend on its own new connection to e (like another
// instance of a function), closed at the end of the test. Interceptors see
// every RPC.
func newBackend(t testing.TB, e *dstest.Emulator, opts Options, interceptors ...grpc.UnaryClientInterceptor) *Backend {
	t.Helper()
	cc, err := e.Dial(grpc.WithChainUnaryInterceptor(interceptors...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	opts.Conn = cc
	if opts.ProjectID == "" {
		opts.ProjectID = e.ProjectID
	}
	if opts.ClockSkew == 0 {
		opts.ClockSkew = testSkew
	}
	b, err := New(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// rpcLog records the RPC methods a connection sends, and lets a test
// interfere with them (fault injection).
type rpcLog struct {
	mu    sync.Mutex
	calls []string       // method names, in order; guarded by mu
	count map[string]int // calls per method so far; guarded by mu
	// hook, when set, runs instead of the call; invoke sends the call.
	// n counts earlier calls of the same method. Set before use.
	hook func(ctx context.Context, method string, n int, invoke func(context.Context) error) error
}

func (l *rpcLog) intercept(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	m := path.Base(method)
	l.mu.Lock()
	if l.count == nil {
		l.count = map[string]int{}
	}
	n := l.count[m]
	l.count[m]++
	l.calls = append(l.calls, m)
	hook := l.hook
	l.mu.Unlock()
	invoke := func(ctx context.Context) error { return invoker(ctx, method, req, reply, cc, opts...) }
	if hook == nil {
		return invoke(ctx)
	}
	return hook(ctx, m, n, invoke)
}

// take returns the methods called since the last take.
func (l *rpcLog) take() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	c := l.calls
	l.calls = nil
	return c
}

func (l *rpcLog) setHook(h func(ctx context.Context, method string, n int, invoke func(context.Context) error) error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.hook = h
	l.count = map[string]int{}
}

// req is a request for id with a random owner.
func req(id string, lease time.Duration) locking.Request {
	return locking.Request{ID: id, Owner: fmt.Sprintf("owner-%d", ownerSeq.Add(1)), Lease: lease}
}

var ownerSeq atomic.Int64

// stored reads the entity of id directly.
func stored(t *testing.T, b *Backend, id string) (record, bool) {
	t.Helper()
	rec, found, _, err := b.lookup(t.Context(), "test", b.key(id))
	if err != nil {
		t.Fatalf("lookup %q: %v", id, err)
	}
	return rec, found
}

func mustAcquire(t *testing.T, b *Backend, r locking.Request) locking.Grant {
	t.Helper()
	g, err := b.Acquire(t.Context(), r)
	if err != nil {
		t.Fatalf("Acquire(%q): %v", r.ID, err)
	}
	if !g.Acquired {
		t.Fatalf("Acquire(%q) = %+v; want acquired", r.ID, g)
	}
	return g
}

// countKind counts the lock entities in the store.
func countKind(t *testing.T, b *Backend) int {
	t.Helper()
	n := 0
	var cursor []byte
	for {
		res, err := read(t.Context(), b, "count", func(ctx context.Context, c pb.DatastoreClient) (*pb.RunQueryResponse, error) {
			return c.RunQuery(ctx, &pb.RunQueryRequest{ProjectId: b.project, PartitionId: &pb.PartitionId{ProjectId: b.project, NamespaceId: b.namespace},
				QueryType: &pb.RunQueryRequest_Query{Query: &pb.Query{
					Kind:        []*pb.KindExpression{{Name: b.kind}},
					Projection:  []*pb.Projection{{Property: &pb.PropertyReference{Name: "__key__"}}},
					StartCursor: cursor,
				}}})
		})
		if err != nil {
			t.Fatal(err)
		}
		got := len(res.GetBatch().GetEntityResults())
		n += got
		if got == 0 || res.GetBatch().GetMoreResults() == pb.QueryResultBatch_NO_MORE_RESULTS {
			return n
		}
		cursor = res.GetBatch().GetEndCursor()
	}
}
