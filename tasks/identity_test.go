package tasks_test

import (
	"context"
	"errors"
	"fmt"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/memlock"
	"github.com/taskguard/taskguard/tasks"
)

// Identities that are not valid UTF-8, which a JSON body cannot carry byte
// for byte: encoding/json writes each invalid byte as U+FFFD.
var badIdentities = []string{"user-\xff42", "\xff", "\xfe", "resize-\xe9", "\xed\xa0\x80"}

// TestEnqueueRefusesIdentitiesJSONCannotCarry checks that a job or lock id
// that would arrive changed is refused by Enqueue, before any RPC, with an
// error quoting it.
func TestEnqueueRefusesIdentitiesJSONCannotCarry(t *testing.T) {
	c, err := tasks.NewClient(t.Context(), baseConfig("https://worker.example/"), deadEndpoint(t)...)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, id := range badIdentities {
		for _, task := range []tasks.Task{{Job: "j", LockID: id}, {Job: id, LockID: "l"}} {
			_, err := c.Enqueue(t.Context(), task)
			if !errors.Is(err, tasks.ErrInvalidTask) || !strings.Contains(err.Error(), strconv.Quote(id)) {
				t.Errorf("Enqueue(%+q) = %v; want ErrInvalidTask quoting %q", task, err, id)
			}
		}
	}
}

// TestHandleRefusesJobNamesJSONCannotCarry checks that a job no task could
// name byte for byte is refused at registration, not dropped as unknown at
// delivery.
func TestHandleRefusesJobNamesJSONCannotCarry(t *testing.T) {
	w := newWorker(t, newLocker(t, memlock.New(), time.Minute), &logBuffer{})
	for _, name := range badIdentities {
		func() {
			defer func() {
				p := recover()
				if p == nil || !strings.Contains(fmt.Sprint(p), strconv.Quote(name)) {
					t.Errorf("Handle(%q) panicked with %v; want a panic quoting the name", name, p)
				}
			}()
			w.Handle(name, func(context.Context, *tasks.Delivery) error { return nil })
		}()
	}
}

// TestWorkerRefusesBodiesThatDoNotDecodeExactly delivers hand-made bodies
// whose job or lock id encoding/json would decode to something else (raw
// invalid bytes, unpaired surrogate escapes). The Worker drops them as
// malformed (200), runs no job, and takes no lock: not the replaced id's
// (which another holder may hold) and not any other.
func TestWorkerRefusesBodiesThatDoNotDecodeExactly(t *testing.T) {
	b := memlock.New()
	locker := newLocker(t, b, time.Minute)
	// Another owner holds the lock the replaced id would name.
	other, err := locker.Acquire(t.Context(), "user-\uFFFD42", locking.Wait(false))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = other.Release(context.Background()) }()
	w := newWorker(t, locker, &logBuffer{})
	ran := 0
	w.Handle("j", func(context.Context, *tasks.Delivery) error { ran++; return nil })
	w.Handle("\uFFFD", func(context.Context, *tasks.Delivery) error { ran++; return nil })
	for _, body := range []string{
		"{\"v\":1,\"job\":\"j\",\"lockId\":\"user-\xff42\"}",
		"{\"v\":1,\"job\":\"j\",\"lockId\":\"\xfe\"}",
		"{\"v\":1,\"job\":\"\xe9\",\"lockId\":\"l\"}",
		`{"v":1,"job":"j","lockId":"user-\udfff42"}`,
		`{"v":1,"job":"\ud800","lockId":"l"}`,
		`{"v":1,"job":"j","lockId":"\ud83d\u0041"}`,
	} {
		rec := httptest.NewRecorder()
		w.ServeHTTP(rec, delivery(body))
		if rec.Code != tasks.StatusDropped || ran != 0 {
			t.Errorf("body %q: status %d, %d jobs ran; want %d (dropped), none ran", body, rec.Code, ran, tasks.StatusDropped)
		}
		if n := b.Held(); n != 1 {
			t.Errorf("body %q: %d locks held after the request; want only the other owner's", body, n)
		}
	}
}
