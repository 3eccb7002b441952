package tasks_test

// This file runs the end-to-end tests on locks in a real Datastore emulator
// (locking/dslock): skipped locally without the emulator, failing with
// CI=true.
//
// TASKS_E2E_DATASTORE selects the emulator: "firestore" (the default:
// pessimistic concurrency, like new production databases) or "legacy".

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

var datastore struct {
	once sync.Once
	emu  *dstest.Emulator
	err  error
}

func init() {
	e2eStore = func(t testing.TB) func() locking.Backend {
		t.Helper()
		datastore.once.Do(func() {
			mode := dstest.Firestore
			if os.Getenv("TASKS_E2E_DATASTORE") == "legacy" {
				mode = dstest.Legacy
			}
			ctx, cancel := context.WithTimeout(context.Background(), dstest.StartTimeout)
			defer cancel()
			datastore.emu, datastore.err = dstest.Start(ctx, mode)
			if datastore.emu != nil {
				afterTests = append(afterTests, func() {
					if err := datastore.emu.Close(); err != nil {
						fmt.Fprintln(os.Stderr, "stopping the Datastore emulator:", err)
					}
				})
			}
		})
		dstest.Require(t, datastore.err)
		e := datastore.emu
		if err := e.Reset(t.Context()); err != nil {
			t.Fatal(err)
		}
		t.Logf("locks in the %s Datastore emulator at %s", e.Mode, e.Host)
		return func() locking.Backend {
			cc, err := e.Dial()
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = cc.Close() })
			b, err := dslock.New(context.Background(), dslock.Options{
				Conn:      cc,
				ProjectID: e.ProjectID,
				// Every instance of these tests runs on this machine's clock.
				ClockSkew: 10 * time.Millisecond,
			})
			if err != nil {
				t.Fatal(err)
			}
			return b
		}
	}
}
