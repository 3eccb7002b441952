package dslock

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	pb "cloud.google.com/go/datastore/apiv1/datastorepb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

// wire is a Datastore server in front of an emulator: it forwards every call
// its clients make (from any process) and records each commit as the store
// saw it, or answers a commit itself with an injected error. It stands where
// the network would be, so it sees exactly what reaches the store.
type wire struct {
	pb.UnimplementedDatastoreServer
	up pb.DatastoreClient

	mu      sync.Mutex
	commits []wireCommit // guarded by mu
	// inject, when set, may answer a commit instead of the store (a non-nil
	// error); it runs before the commit is forwarded. Guarded by mu.
	inject func(req *pb.CommitRequest) error
}

// wireCommit is one commit that reached the wire.
type wireCommit struct {
	start    time.Time
	req      *pb.CommitRequest
	keys     []string // key names of its mutations
	bases    []int64  // base versions of its mutations (0: none)
	code     codes.Code
	injected bool
}

// startWire serves a wire in front of e on a free loopback port and returns
// it and its address; both stop when t ends.
func startWire(t *testing.T, e *dstest.Emulator) (*wire, string) {
	t.Helper()
	cc, err := e.Dial()
	if err != nil {
		t.Fatal(err)
	}
	w := &wire{up: pb.NewDatastoreClient(cc)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	pb.RegisterDatastoreServer(srv, w)
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Stop()
		<-done
		_ = cc.Close()
	})
	return w, ln.Addr().String()
}

// dialWire returns a Backend of its own connection to the wire at addr.
func dialWire(t *testing.T, addr, project string) *Backend {
	t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	b, err := New(context.Background(), Options{ProjectID: project, Conn: cc, ClockSkew: testSkew})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (w *wire) setInject(f func(*pb.CommitRequest) error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.inject = f
}

// take returns the commits recorded since the last take.
func (w *wire) take() []wireCommit {
	w.mu.Lock()
	defer w.mu.Unlock()
	c := w.commits
	w.commits = nil
	return c
}

func (w *wire) Lookup(ctx context.Context, req *pb.LookupRequest) (*pb.LookupResponse, error) {
	return w.up.Lookup(ctx, req)
}

func (w *wire) RunQuery(ctx context.Context, req *pb.RunQueryRequest) (*pb.RunQueryResponse, error) {
	return w.up.RunQuery(ctx, req)
}

func (w *wire) Commit(ctx context.Context, req *pb.CommitRequest) (*pb.CommitResponse, error) {
	c := wireCommit{start: time.Now(), req: req}
	for _, m := range req.GetMutations() {
		var k *pb.Key
		switch op := m.GetOperation().(type) {
		case *pb.Mutation_Insert:
			k = op.Insert.GetKey()
		case *pb.Mutation_Update:
			k = op.Update.GetKey()
		case *pb.Mutation_Upsert:
			k = op.Upsert.GetKey()
		case *pb.Mutation_Delete:
			k = op.Delete
		}
		c.keys = append(c.keys, k.GetPath()[len(k.GetPath())-1].GetName())
		c.bases = append(c.bases, m.GetBaseVersion())
	}
	w.mu.Lock()
	inject := w.inject
	w.mu.Unlock()
	var (
		res *pb.CommitResponse
		err error
	)
	if inject != nil {
		err = inject(req)
		c.injected = err != nil
	}
	if err == nil {
		res, err = w.up.Commit(ctx, req)
	}
	c.code = status.Code(err)
	w.mu.Lock()
	w.commits = append(w.commits, c)
	w.mu.Unlock()
	return res, err
}
