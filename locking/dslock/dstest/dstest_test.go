package dstest_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"syscall"
	"testing"
	"time"

	pb "cloud.google.com/go/datastore/apiv1/datastorepb"
	"go.uber.org/goleak"

	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func key(project string) *pb.Key {
	return &pb.Key{PartitionId: &pb.PartitionId{ProjectId: project}, Path: []*pb.Key_PathElement{{Kind: "T", IdType: &pb.Key_PathElement_Name{Name: "k"}}}}
}

// put writes an entity and reports whether it exists afterwards, and the
// read time the emulator reports.
func exists(t *testing.T, e *dstest.Emulator, write bool) (bool, bool) {
	t.Helper()
	cc, err := e.Dial()
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	c := pb.NewDatastoreClient(cc)
	if write {
		_, err := c.Commit(t.Context(), &pb.CommitRequest{ProjectId: e.ProjectID, Mode: pb.CommitRequest_NON_TRANSACTIONAL,
			Mutations: []*pb.Mutation{{Operation: &pb.Mutation_Upsert{Upsert: &pb.Entity{Key: key(e.ProjectID)}}}}})
		if err != nil {
			t.Fatal(err)
		}
	}
	res, err := c.Lookup(t.Context(), &pb.LookupRequest{ProjectId: e.ProjectID, Keys: []*pb.Key{key(e.ProjectID)}})
	if err != nil {
		t.Fatal(err)
	}
	return len(res.GetFound()) == 1, res.GetReadTime().GetSeconds() != 0
}

// TestStartResetClose starts both emulators (concurrently), checks that each
// is the kind asked for, that Reset wipes data, that Start reuses one the
// environment names, and that Close stops the java process it started.
func TestStartResetClose(t *testing.T) {
	for _, v := range []string{"DATASTORE_EMULATOR_HOST", "DSTEST_DATASTORE_HOST", "DSTEST_FIRESTORE_HOST"} {
		t.Setenv(v, "")
	}
	modes := []dstest.Mode{dstest.Legacy, dstest.Firestore}
	emus := make([]*dstest.Emulator, len(modes))
	errs := make([]error, len(modes))
	var wg sync.WaitGroup
	for i, m := range modes {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), dstest.StartTimeout)
			defer cancel()
			emus[i], errs[i] = dstest.Start(ctx, m)
		})
	}
	wg.Wait()
	for i, m := range modes {
		t.Run(m.String(), func(t *testing.T) {
			dstest.Require(t, errs[i])
			e := emus[i]
			defer e.Close()
			if e.Reused() || e.PID() == 0 {
				t.Fatalf("Start launched nothing: reused=%v pid=%d", e.Reused(), e.PID())
			}
			found, times := exists(t, e, true)
			if !found {
				t.Fatal("entity not stored")
			}
			if times != (m == dstest.Firestore) {
				t.Errorf("server times = %v; only the Firestore emulator returns them", times)
			}
			if err := e.Reset(t.Context()); err != nil {
				t.Fatal(err)
			}
			if found, _ := exists(t, e, false); found {
				t.Error("entity survived Reset")
			}

			for _, env := range []string{map[dstest.Mode]string{dstest.Legacy: "DSTEST_DATASTORE_HOST", dstest.Firestore: "DSTEST_FIRESTORE_HOST"}[m], "DATASTORE_EMULATOR_HOST"} {
				t.Run("reuse via "+env, func(t *testing.T) {
					t.Setenv(env, e.Host)
					r := dstest.New(t, m) // reused: its t.Cleanup must leave it running
					if !r.Reused() || r.Host != e.Host || r.PID() != 0 || r.Close() != nil {
						t.Errorf("Start with %s set: reused=%v host=%s; want %s reused", env, r.Reused(), r.Host, e.Host)
					}
				})
			}

			if found, _ := exists(t, e, true); !found {
				t.Fatal("emulator not serving after a reusing test ended")
			}
			pid := e.PID()
			if err := e.Close(); err != nil {
				t.Fatal(err)
			}
			if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
				t.Errorf("java pid %d still exists after Close (kill 0: %v)", pid, err)
			}
			if err := e.Close(); err != nil {
				t.Errorf("second Close: %v", err)
			}
		})
	}
}

// TestNotInstalled: without java, Start fails with ErrNotInstalled (which
// Require turns into a skip, or a failure with CI=true).
func TestNotInstalled(t *testing.T) {
	t.Setenv("DATASTORE_EMULATOR_HOST", "")
	t.Setenv("DSTEST_DATASTORE_HOST", "")
	t.Setenv("JAVA", "/nonexistent/java")
	t.Setenv("PATH", "/nonexistent")
	t.Setenv("CLOUDSDK_ROOT_DIR", t.TempDir())
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	_, err := dstest.Start(ctx, dstest.Legacy)
	if err == nil {
		t.Fatal("Start succeeded without java")
	}
	if !errors.Is(err, dstest.ErrNotInstalled) {
		t.Errorf("Start = %v; want ErrNotInstalled", err)
	}
}

// recorder is a testing.TB that records Skipf and Fatalf instead of ending
// the goroutine.
type recorder struct {
	testing.TB
	skipped, failed bool
}

func (r *recorder) Helper()               {}
func (r *recorder) Skipf(string, ...any)  { r.skipped = true }
func (r *recorder) Fatalf(string, ...any) { r.failed = true }

// TestRequire: a missing emulator skips locally and fails with CI=true;
// other errors always fail.
func TestRequire(t *testing.T) {
	missing := fmt.Errorf("%w: no java", dstest.ErrNotInstalled)
	cases := []struct {
		name       string
		err        error
		ci         string
		skip, fail bool
	}{
		{"no error", nil, "", false, false},
		{"missing, local", missing, "", true, false},
		{"missing, CI", missing, "true", false, true},
		{"broken", errors.New("did not become ready"), "", false, true},
		{"broken, CI", errors.New("did not become ready"), "true", false, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("CI", tc.ci)
			r := &recorder{TB: t}
			dstest.Require(r, tc.err)
			if r.skipped != tc.skip || r.failed != tc.fail {
				t.Errorf("skipped=%v failed=%v; want %v %v", r.skipped, r.failed, tc.skip, tc.fail)
			}
		})
	}
}
