package lockhttp_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/lockhttp"
	"github.com/taskguard/taskguard/locking/memlock"
)

// A checkout guarded per customer: while one request holds a customer's
// lock, another for the same customer is answered 429 with a Retry-After,
// without running.
func ExampleGuard() {
	// In production: locking.Default() (pass nil), with
	// import _ "github.com/taskguard/taskguard/locking/dslock".
	locks, _ := locking.New(locking.Config{Strong: memlock.New(), Logger: slog.New(slog.DiscardHandler)})

	checkout := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fence := locking.FromContext(r.Context()).Token() // send it with every write
		fmt.Fprintf(w, "charged %s (token %d)", r.URL.Query().Get("customer"), fence)
	})
	srv := httptest.NewServer(lockhttp.Guard(locks, lockhttp.Query("customer", "checkout/"), checkout,
		lockhttp.LockOptions(locking.Lease(30*time.Second))))
	defer srv.Close()

	call := func() {
		resp, err := http.Get(srv.URL + "/?customer=z")
		if err != nil {
			panic(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		fmt.Printf("%d Retry-After=%q %s\n", resp.StatusCode, resp.Header.Get("Retry-After"), bytes.TrimSpace(body))
	}

	call()
	// Another instance holds customer z's lock.
	held, _ := locks.Acquire(context.Background(), "checkout/z")
	call()
	_ = held.Release(context.Background())
	call()
	// Output:
	// 200 Retry-After="" charged z (token 1)
	// 429 Retry-After="10" lock held
	// 200 Retry-After="" charged z (token 3)
}

// A Cloud Run function written for the Functions Framework, guarded by the
// customer id in the X-Customer header, answering 409 when that customer's
// lock is held: register it with functions.HTTP("Checkout", checkout). Its
// locks come from locking.Default().
func ExampleGuardFunc() {
	checkout := lockhttp.GuardFunc(nil, lockhttp.Header("X-Customer", "checkout/"), func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "charged")
	}, lockhttp.BusyStatus(http.StatusConflict))
	_ = checkout // functions.HTTP("Checkout", checkout)
}
