// Package dstest starts real Datastore emulators for tests, the way
// net/http/httptest starts servers: on a free port of 127.0.0.1, waiting
// until they answer, with Reset between tests and Close to stop them.
//
// Two emulators ship with the Google Cloud CLI, and code should pass on both:
//
//   - Legacy: the Cloud Datastore emulator. Optimistic concurrency; entity
//     versions from a counter; it returns no read, update or commit times.
//   - Firestore: the Firestore emulator in Datastore mode. Pessimistic
//     concurrency like new production databases; versions are commit times in
//     microseconds; it returns real read, update and commit times.
//
// A launched emulator is warmed up before Start returns (a few rounds of
// writes, reads and queries, then a reset): a fresh JVM answers its first
// requests hundreds of milliseconds late, which would otherwise distort the
// first test's timings.
//
// Start launches java directly on the emulator's jar (not through gcloud,
// whose wrapper would leave the java process without a handle), so Close
// stops exactly the process it started, by its pid. The jars are found under
// $CLOUDSDK_ROOT_DIR, next to the gcloud on $PATH, or in the usual install
// directories; java comes from $JAVA or $PATH.
//
// Start reuses an emulator that is already running when the environment
// names one: DSTEST_DATASTORE_HOST for Legacy, DSTEST_FIRESTORE_HOST for
// Firestore, or DATASTORE_EMULATOR_HOST for whichever kind it turns out to be
// (Start asks it). A reused emulator is reset but never stopped.
package dstest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	pb "cloud.google.com/go/datastore/apiv1/datastorepb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Mode selects an emulator.
type Mode int

const (
	// Legacy is the Cloud Datastore emulator (optimistic concurrency, no
	// server times).
	Legacy Mode = iota
	// Firestore is the Firestore emulator in Datastore mode (pessimistic
	// concurrency, real server times).
	Firestore
)

func (m Mode) String() string {
	switch m {
	case Legacy:
		return "legacy"
	case Firestore:
		return "firestore"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// ProjectID is the project id tests use against an emulator Start launched.
const ProjectID = "dstest"

// ErrNotInstalled is wrapped by Start when java or the emulator jar cannot be
// found. Tests may skip on it locally; with CI=true they must fail (see
// Require).
var ErrNotInstalled = errors.New("dstest: emulator not installed")

// StartTimeout bounds how long New waits for a launched emulator to answer;
// callers of Start pass their own context.
const StartTimeout = 90 * time.Second

// httpClient keeps no idle connections, so tests that check for leaked
// goroutines see none of ours.
var httpClient = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// Emulator is a running emulator.
type Emulator struct {
	// Mode is which emulator this is.
	Mode Mode
	// Host is its address, "127.0.0.1:port": the value for
	// DATASTORE_EMULATOR_HOST.
	Host string
	// ProjectID is the project to use against it.
	ProjectID string

	cmd     *exec.Cmd // nil when reused
	logPath string
	logFile *os.File
	done    chan struct{} // closed when cmd has been waited for
}

// Reused reports whether the emulator was already running (named by the
// environment) rather than launched by Start.
func (e *Emulator) Reused() bool { return e.cmd == nil }

// PID returns the java process id of a launched emulator, 0 when reused.
func (e *Emulator) PID() int {
	if e.cmd == nil {
		return 0
	}
	return e.cmd.Process.Pid
}

// Start returns a running emulator of mode m: a reused one when the
// environment names one, otherwise a new java process on a free loopback
// port, once it answers GET / with "Ok". ctx bounds the wait. It fails with
// an error wrapping ErrNotInstalled when java or the jar is missing.
func Start(ctx context.Context, m Mode) (*Emulator, error) {
	if e, err := reuse(ctx, m); e != nil || err != nil {
		return e, err
	}
	java, args, err := command(m)
	if err != nil {
		return nil, err
	}
	var lastErr error
	for range 3 { // another process may grab the free port before java binds it
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		e, err := launch(ctx, m, java, args(port), port)
		if err == nil {
			return e, nil
		}
		lastErr = err
		if ctx.Err() != nil {
			break
		}
	}
	return nil, lastErr
}

// New starts an emulator for the test t and stops it in t.Cleanup; it calls
// Require when the emulator cannot be started. To share one emulator among
// the tests of a package, call Start from TestMain instead.
func New(t testing.TB, m Mode) *Emulator {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
	defer cancel()
	e, err := Start(ctx, m)
	if err != nil {
		Require(t, err)
		return nil
	}
	t.Cleanup(func() {
		if err := e.Close(); err != nil {
			t.Errorf("dstest: stopping the %s emulator: %v", m, err)
		}
	})
	return e
}

// Require ends the test when err (from Start) is not nil: it skips when the
// emulator is not installed, unless CI=true, where a missing emulator fails
// the test; any other error fails it.
func Require(t testing.TB, err error) {
	t.Helper()
	switch {
	case err == nil:
	case errors.Is(err, ErrNotInstalled) && os.Getenv("CI") != "true":
		t.Skipf("skipping: %v (install the Google Cloud CLI with its emulators; with CI=true this fails)", err)
	default:
		t.Fatalf("%v", err)
	}
}

// Reset deletes all data in the emulator (POST /reset).
func (e *Emulator) Reset(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+e.Host+"/reset", nil)
	if err != nil {
		return err
	}
	res, err := httpClient.Do(req)
	if err != nil {
		return fmt.Errorf("dstest: reset %s emulator: %w", e.Mode, err)
	}
	defer res.Body.Close()
	_, _ = io.Copy(io.Discard, res.Body)
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("dstest: reset %s emulator: %s", e.Mode, res.Status)
	}
	return nil
}

// Dial returns a new gRPC connection to the emulator, with opts added. The
// caller closes it.
func (e *Emulator) Dial(opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	opts = append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)
	return grpc.NewClient("passthrough:///"+e.Host, opts...)
}

// Close stops a launched emulator: SIGTERM to its java process, SIGKILL if it
// has not exited within a few seconds, then waits for it. It does nothing for
// a reused emulator and is safe to call more than once.
func (e *Emulator) Close() error {
	if e.cmd == nil {
		return nil
	}
	select {
	case <-e.done:
		return nil
	default:
	}
	_ = e.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-e.done:
	case <-time.After(5 * time.Second):
		_ = e.cmd.Process.Kill()
		<-e.done
	}
	_ = e.logFile.Close()
	_ = os.Remove(e.logPath)
	return nil
}

// Log returns what the launched emulator printed so far (for failures).
func (e *Emulator) Log() string {
	if e.logPath == "" {
		return ""
	}
	b, _ := os.ReadFile(e.logPath)
	return string(b)
}

func reuse(ctx context.Context, m Mode) (*Emulator, error) {
	project := os.Getenv("DATASTORE_PROJECT_ID")
	if project == "" {
		project = ProjectID
	}
	own := map[Mode]string{Legacy: "DSTEST_DATASTORE_HOST", Firestore: "DSTEST_FIRESTORE_HOST"}[m]
	if host := os.Getenv(own); host != "" {
		e := &Emulator{Mode: m, Host: host, ProjectID: project}
		if err := waitReady(ctx, e.Host, nil); err != nil {
			return nil, fmt.Errorf("dstest: %s=%s: %w", own, host, err)
		}
		return e, nil
	}
	host := strings.TrimPrefix(os.Getenv("DATASTORE_EMULATOR_HOST"), "http://")
	if host == "" {
		return nil, nil
	}
	if err := waitReady(ctx, host, nil); err != nil {
		return nil, fmt.Errorf("dstest: DATASTORE_EMULATOR_HOST=%s: %w", host, err)
	}
	got, err := detect(ctx, host, project)
	if err != nil || got != m {
		return nil, err // another kind: launch ours
	}
	return &Emulator{Mode: m, Host: host, ProjectID: project}, nil
}

// detect tells the emulators apart: only the Firestore one returns read times.
func detect(ctx context.Context, host, project string) (Mode, error) {
	cc, err := grpc.NewClient("passthrough:///"+host, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return 0, err
	}
	defer cc.Close()
	k := &pb.Key{PartitionId: &pb.PartitionId{ProjectId: project}, Path: []*pb.Key_PathElement{{Kind: "DstestProbe", IdType: &pb.Key_PathElement_Name{Name: "probe"}}}}
	res, err := pb.NewDatastoreClient(cc).Lookup(ctx, &pb.LookupRequest{ProjectId: project, Keys: []*pb.Key{k}})
	if err != nil {
		return 0, fmt.Errorf("dstest: probing %s: %w", host, err)
	}
	if rt := res.GetReadTime(); rt != nil && rt.GetSeconds() != 0 {
		return Firestore, nil
	}
	return Legacy, nil
}

// command finds java and the jar of mode m and returns the argument list for
// a port.
func command(m Mode) (string, func(port int) []string, error) {
	java := os.Getenv("JAVA")
	if java == "" {
		java = "java"
	}
	java, err := exec.LookPath(java)
	if err != nil {
		return "", nil, fmt.Errorf("%w: java: %w", ErrNotInstalled, err)
	}
	rel := map[Mode]string{
		Legacy:    "platform/cloud-datastore-emulator/CloudDatastore.jar",
		Firestore: "platform/cloud-firestore-emulator/cloud-firestore-emulator.jar",
	}[m]
	jar := ""
	for _, root := range sdkRoots() {
		if p := filepath.Join(root, rel); fileExists(p) {
			jar = p
			break
		}
	}
	if jar == "" {
		return "", nil, fmt.Errorf("%w: %s not found under %v", ErrNotInstalled, rel, sdkRoots())
	}
	return java, func(port int) []string {
		p := fmt.Sprint(port)
		if m == Legacy {
			return []string{"-cp", jar, "com.google.cloud.datastore.emulator.CloudDatastore",
				"start", "--testing", "--host=127.0.0.1", "--port=" + p, "--consistency=1.0", "--store_on_disk=false"}
		}
		return []string{"-Duser.language=en", "-cp", jar, "com.google.cloud.datastore.emulator.firestore.CloudFirestore",
			"start", "--host=127.0.0.1", "--port=" + p, "--database-mode=datastore-mode"}
	}, nil
}

func sdkRoots() []string {
	var roots []string
	if r := os.Getenv("CLOUDSDK_ROOT_DIR"); r != "" {
		roots = append(roots, r)
	}
	if g, err := exec.LookPath("gcloud"); err == nil {
		if real, err := filepath.EvalSymlinks(g); err == nil {
			roots = append(roots, filepath.Dir(filepath.Dir(real)))
		}
	}
	return append(roots, "/usr/lib/google-cloud-sdk", "/usr/share/google-cloud-sdk", "/opt/google-cloud-sdk")
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir()
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func launch(ctx context.Context, m Mode, java string, args []string, port int) (*Emulator, error) {
	logFile, err := os.CreateTemp("", "dstest-"+m.String()+"-*.log")
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(java, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Own process group, so a terminal's ^C goes to the test binary, which
	// stops the emulator; Pdeathsig kills it if the test binary dies first.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		os.Remove(logFile.Name())
		return nil, fmt.Errorf("dstest: starting the %s emulator: %w", m, err)
	}
	e := &Emulator{
		Mode:      m,
		Host:      fmt.Sprintf("127.0.0.1:%d", port),
		ProjectID: ProjectID,
		cmd:       cmd,
		logPath:   logFile.Name(),
		logFile:   logFile,
		done:      make(chan struct{}),
	}
	go func() {
		_ = cmd.Wait()
		close(e.done)
	}()
	wctx, cancel := context.WithTimeout(ctx, StartTimeout)
	defer cancel()
	if err := waitReady(wctx, e.Host, e.done); err != nil {
		log := e.Log()
		_ = e.Close()
		return nil, fmt.Errorf("dstest: the %s emulator (pid %d) did not become ready: %w\n%s", m, cmd.Process.Pid, err, tail(log, 2000))
	}
	if err := e.warm(wctx); err != nil {
		_ = e.Close()
		return nil, fmt.Errorf("dstest: warming up the %s emulator: %w", m, err)
	}
	return e, nil
}

// warm sends a few rounds of writes, reads and queries from several
// goroutines and then resets: a fresh JVM answers its first requests
// hundreds of milliseconds late (class loading, JIT), which would
// otherwise land on the first test's timings.
func (e *Emulator) warm(ctx context.Context) error {
	cc, err := e.Dial()
	if err != nil {
		return err
	}
	defer cc.Close()
	c := pb.NewDatastoreClient(cc)
	const workers, rounds = 4, 15
	errs := make(chan error, workers)
	for w := range workers {
		go func() {
			errs <- func() error {
				for i := range rounds {
					k := &pb.Key{PartitionId: &pb.PartitionId{ProjectId: e.ProjectID}, Path: []*pb.Key_PathElement{{Kind: "DstestWarmup", IdType: &pb.Key_PathElement_Name{Name: fmt.Sprintf("%d-%d", w, i)}}}}
					ent := &pb.Entity{Key: k, Properties: map[string]*pb.Value{"t": {ValueType: &pb.Value_IntegerValue{IntegerValue: int64(i)}}}}
					res, err := c.Commit(ctx, &pb.CommitRequest{ProjectId: e.ProjectID, Mode: pb.CommitRequest_NON_TRANSACTIONAL, Mutations: []*pb.Mutation{{Operation: &pb.Mutation_Insert{Insert: ent}}}})
					if err != nil {
						return err
					}
					if _, err := c.Lookup(ctx, &pb.LookupRequest{ProjectId: e.ProjectID, Keys: []*pb.Key{k}}); err != nil {
						return err
					}
					q := &pb.Query{Kind: []*pb.KindExpression{{Name: "DstestWarmup"}}, Filter: &pb.Filter{FilterType: &pb.Filter_PropertyFilter{PropertyFilter: &pb.PropertyFilter{
						Property: &pb.PropertyReference{Name: "t"}, Op: pb.PropertyFilter_LESS_THAN, Value: &pb.Value{ValueType: &pb.Value_IntegerValue{IntegerValue: 5}}}}}}
					if _, err := c.RunQuery(ctx, &pb.RunQueryRequest{ProjectId: e.ProjectID, PartitionId: k.PartitionId, QueryType: &pb.RunQueryRequest_Query{Query: q}}); err != nil {
						return err
					}
					del := &pb.Mutation{Operation: &pb.Mutation_Delete{Delete: k},
						ConflictDetectionStrategy: &pb.Mutation_BaseVersion{BaseVersion: res.GetMutationResults()[0].GetVersion()}, ConflictResolutionStrategy: pb.Mutation_FAIL}
					if _, err := c.Commit(ctx, &pb.CommitRequest{ProjectId: e.ProjectID, Mode: pb.CommitRequest_NON_TRANSACTIONAL, Mutations: []*pb.Mutation{del}}); err != nil {
						return err
					}
				}
				return nil
			}()
		}()
	}
	var first error
	for range workers {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	if first != nil {
		return first
	}
	return e.Reset(ctx)
}

// waitReady polls GET / until it answers "Ok", exited is closed, or ctx ends.
func waitReady(ctx context.Context, host string, exited <-chan struct{}) error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+host+"/", nil)
		if err != nil {
			return err
		}
		if res, err := httpClient.Do(req); err == nil {
			body, _ := io.ReadAll(io.LimitReader(res.Body, 64))
			res.Body.Close()
			if res.StatusCode == http.StatusOK && bytes.HasPrefix(bytes.TrimSpace(body), []byte("Ok")) {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-exited:
			return errors.New("process exited")
		case <-tick.C:
		}
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}
