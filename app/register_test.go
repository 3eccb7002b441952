package app

import (
	"bytes"
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"

	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/taskstest"
)

// TestRegisterChosenFunctions: Register registers exactly the functions
// named, under those names (Enqueue left out), and their Worker runs the
// jobs given to it; a second Register in the same process has jobs of its
// own.
func TestRegisterChosenFunctions(t *testing.T) {
	for _, k := range []string{EnvProject, EnvDatastoreEmulator, EnvMemcache, EnvValkey, EnvQueue, EnvWorkerURL, EnvTaskServiceAccount, "K_SERVICE"} {
		t.Setenv(k, "")
	}
	freshDefault(t)
	registered := map[string]func(http.ResponseWriter, *http.Request){}
	register := func(name string, fn func(http.ResponseWriter, *http.Request)) {
		if registered[name] != nil {
			t.Fatalf("%s registered twice", name)
		}
		registered[name] = fn
	}
	ran := map[string]int{}
	job := func(name string) tasks.JobFunc {
		return func(context.Context, *tasks.Delivery) error { ran[name]++; return nil }
	}
	quiet := WithLogger(slog.New(slog.DiscardHandler))
	Register(register, Functions{Worker: "ShopWorker", CleanupLocks: "ShopCleanupLocks"}, quiet, WithJob("receipt", job("shop")))
	Register(register, Functions{Worker: "BillingWorker"}, quiet, WithJob("invoice", job("billing")))

	var names []string
	for n := range registered {
		names = append(names, n)
	}
	slices.Sort(names)
	if want := []string{"BillingWorker", "ShopCleanupLocks", "ShopWorker"}; !slices.Equal(names, want) {
		t.Fatalf("registered %v; want %v", names, want)
	}
	deliver := func(fn, job string) int {
		req, err := taskstest.NewRequest(tasks.Task{Job: job, LockID: "customer/z"})
		if err != nil {
			t.Fatal(err)
		}
		rec := httptest.NewRecorder()
		registered[fn](rec, req)
		return rec.Code
	}
	if code := deliver("ShopWorker", "receipt"); code != tasks.StatusDone || ran["shop"] != 1 {
		t.Errorf("ShopWorker(receipt) = %d, ran %v; want %d and the shop's job run", code, ran, tasks.StatusDone)
	}
	// Jobs belong to their App: the billing Worker does not know "receipt"
	// (a task enqueued now is retried: a deploy adding it may be rolling out).
	if code := deliver("BillingWorker", "receipt"); code != tasks.StatusRetry || ran["shop"] != 1 {
		t.Errorf("BillingWorker(receipt) = %d, ran %v; want %d (unknown job, retried)", code, ran, tasks.StatusRetry)
	}
	if code := deliver("BillingWorker", "invoice"); code != tasks.StatusDone || ran["billing"] != 1 {
		t.Errorf("BillingWorker(invoice) = %d, ran %v; want %d", code, ran, tasks.StatusDone)
	}
}

// TestRegisterReportsAtStart: Register reports, in its one start-up line
// and before any request, what the lock backends' variables get wrong
// (here: Cloud Run without a Strong backend), and the functions then answer
// 500.
func TestRegisterReportsAtStart(t *testing.T) {
	for _, k := range []string{EnvProject, EnvDatastoreEmulator, EnvMemcache, EnvValkey, EnvQueue, EnvWorkerURL, EnvTaskServiceAccount, "TASKGUARD_ALLOW_MEMORY"} {
		t.Setenv(k, "")
	}
	t.Setenv("K_SERVICE", "shop")
	freshDefault(t)
	var logs bytes.Buffer
	registered := map[string]func(http.ResponseWriter, *http.Request){}
	Register(func(name string, fn func(http.ResponseWriter, *http.Request)) { registered[name] = fn },
		Functions{Worker: "ShopWorker"}, WithLogger(slog.New(slog.NewJSONHandler(&logs, nil))))
	if !strings.Contains(logs.String(), `"level":"ERROR"`) || !strings.Contains(logs.String(), "locking/dslock") || !strings.Contains(logs.String(), EnvProject) {
		t.Errorf("Register's start-up log does not report the missing Strong backend and its fix:\n%s", logs.String())
	}
	rec := httptest.NewRecorder()
	registered["ShopWorker"](rec, httptest.NewRequest(http.MethodPost, "/", nil))
	if rec.Code != http.StatusInternalServerError {
		t.Errorf("ShopWorker answered %d; want 500 until the configuration is fixed", rec.Code)
	}
}
