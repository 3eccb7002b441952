package shop_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"
	"cloud.google.com/go/datastore"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	"example.com/shop"
	"github.com/taskguard/taskguard/locking/fence/dsfence"

	"github.com/taskguard/taskguard/locking/dslock/dstest"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// syncBuffer collects a process's output; safe for concurrent use.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return fmt.Sprint(l.Addr().(*net.TCPAddr).Port)
}

// TestTwoInstancesOnFirestore runs the shop as two processes, two
// instances as Cloud Run would run them (K_SERVICE set), with the
// Functions Framework's own server, sharing the Firestore emulator in
// Datastore mode and a Cloud Tasks emulator. Concurrent checkouts of one
// customer, sent to both, let exactly one through; the others are answered
// 429 with a Retry-After. The receipt is delivered to an instance's
// ShopWorker, and ShopCleanupLocks reports on the Datastore locks.
func TestTwoInstancesOnFirestore(t *testing.T) {
	e := dstest.New(t, dstest.Firestore)

	const queue = "projects/shop-project/locations/here/queues/receipts"
	emu := taskstest.Start(t, taskstest.Options{})
	admin, err := emu.NewClient(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	if _, err := admin.CreateQueue(t.Context(), &cloudtaskspb.CreateQueueRequest{Parent: "projects/shop-project/locations/here",
		Queue: &cloudtaskspb.Queue{Name: queue, RetryConfig: &cloudtaskspb.RetryConfig{MinBackoff: durationpb.New(100 * time.Millisecond)}}}); err != nil {
		t.Fatal(err)
	}

	bin := filepath.Join(t.TempDir(), "shop")
	if out, err := exec.Command("go", "build", "-o", bin, "./cmd/shop").CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/shop: %v\n%s", err, out)
	}
	ports := []string{freePort(t), freePort(t)}
	outs := make([]*syncBuffer, len(ports))
	for i, port := range ports {
		ctx, cancel := context.WithCancel(context.Background())
		cmd := exec.CommandContext(ctx, bin)
		cmd.Env = append(os.Environ(),
			"PORT="+port, "HOST=127.0.0.1", "K_SERVICE=shop", "FUNCTION_TARGET=",
			"DATASTORE_EMULATOR_HOST="+e.Host, "DATASTORE_PROJECT_ID="+e.ProjectID, "GOOGLE_CLOUD_PROJECT="+e.ProjectID,
			"CLOUD_TASKS_EMULATOR_HOST="+emu.Addr(), "TASKGUARD_QUEUE="+queue,
			"TASKGUARD_WORKER_URL=http://127.0.0.1:"+ports[0]+"/ShopWorker",
			"TASKGUARD_TASK_SERVICE_ACCOUNT=tasks@shop-project.iam.gserviceaccount.com",
			"TASKGUARD_ALLOW_MEMORY=", "SHOP_CHECKOUT_WORK=3s", "TASKGUARD_LEASE=5s")
		out := &syncBuffer{}
		outs[i] = out
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			cancel()
			_ = cmd.Wait()
			if t.Failed() {
				t.Logf("instance %d output:\n%s", i, out)
			}
		})
	}
	for _, port := range ports {
		waitListening(t, "127.0.0.1:"+port)
	}

	// Six checkouts of customer z at once, three to each instance.
	const n = 6
	answers := make([]answer, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			answers[i] = postNoFatal(fmt.Sprintf("http://127.0.0.1:%s/Checkout?customer=z&order=o%d", ports[i%2], i))
		})
	}
	wg.Wait()
	var ok, busy int
	for i, a := range answers {
		switch {
		case a.status == http.StatusOK:
			ok++
		case a.status == http.StatusTooManyRequests && a.retryAfter != "":
			busy++
		default:
			t.Errorf("checkout %d on instance %d = %+v; want 200, or 429 with Retry-After", i, i%2, a)
		}
	}
	if ok != 1 || busy != n-1 {
		t.Errorf("%d checkouts went through and %d were answered 429; want 1 and %d", ok, busy, n-1)
	}
	// The order that went through is in Datastore, under its token, and
	// the customer's fence record holds that token.
	dc, err := datastore.NewClient(t.Context(), e.ProjectID, option.WithEndpoint(e.Host), option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())))
	if err != nil {
		t.Fatal(err)
	}
	defer dc.Close()
	for i, a := range answers {
		var out struct{ Token int64 }
		if a.status != http.StatusOK || json.Unmarshal([]byte(a.body), &out) != nil {
			continue
		}
		var o struct {
			Customer string
			Token    int64
		}
		if err := dc.Get(t.Context(), datastore.NameKey(shop.OrderKind, fmt.Sprintf("o%d", i), nil), &o); err != nil || o.Token != out.Token || o.Customer != "z" {
			t.Errorf("order o%d in Datastore = %+v (%v); want customer z, token %d", i, o, err, out.Token)
		}
		var f dsfence.Field // a fence record has a Field's properties
		if err := dc.Get(t.Context(), dsfence.Records{}.Key("customer/z"), &f); err != nil || f.Token != out.Token || f.LockID != "customer/z" {
			t.Errorf("fence record of customer/z = %+v (%v); want token %d", f, err, out.Token)
		}
	}

	if err := emu.WaitIdle(t.Context(), queue); err != nil {
		t.Fatal(err)
	}
	// The receipt job ran once; every delivery (the task, and in park mode
	// the continuations that found nothing left to run) was answered 2xx.
	sent := 0
	for _, out := range outs {
		sent += strings.Count(out.String(), "receipt sent")
	}
	if sent != 1 {
		t.Errorf("the receipt was sent %d times; want 1", sent)
	}
	for _, at := range emu.Attempts() {
		if at.Status < 200 || at.Status > 299 {
			t.Errorf("a delivery to ShopWorker was answered %d; want 2xx (attempt %+v)", at.Status, at)
		}
	}

	resp, err := http.Get("http://127.0.0.1:" + ports[1] + "/ShopCleanupLocks?dryRun=true")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var rep struct {
		Backend          string
		Finished, DryRun bool
	}
	if err := json.NewDecoder(resp.Body).Decode(&rep); err != nil || resp.StatusCode != http.StatusOK || rep.Backend != "datastore" || !rep.Finished || !rep.DryRun {
		t.Errorf("ShopCleanupLocks?dryRun=true = %d %+v (%v); want 200, a finished dry run on datastore", resp.StatusCode, rep, err)
	}
}

func postNoFatal(url string) answer {
	resp, err := http.Post(url, "", nil)
	if err != nil {
		return answer{body: err.Error()}
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return answer{resp.StatusCode, resp.Header.Get("Retry-After"), string(b)}
}

func waitListening(t *testing.T, addr string) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
	}
	t.Fatalf("nothing listens on %s after a minute", addr)
}
