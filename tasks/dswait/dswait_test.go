package dswait_test

import (
	"os"
	"sync"
	"testing"
	"time"

	"cloud.google.com/go/datastore"
	"go.uber.org/goleak"
	"google.golang.org/api/option"

	"github.com/taskguard/taskguard/locking/dslock/dstest"
	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/dswait"
	"github.com/taskguard/taskguard/tasks/waitlisttest"
)

var emulators *dstest.Set

func TestMain(m *testing.M) {
	emulators = dstest.StartSet(dstest.Firestore, dstest.Legacy)
	code := m.Run()
	emulators.Close()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			os.Stderr.WriteString("goleak: " + err.Error() + "\n")
			code = 1
		}
	}
	os.Exit(code)
}

// newList returns a List on the emulator of mode m, on a fresh namespace.
func newList(t *testing.T, m dstest.Mode) tasks.WaitList {
	t.Helper()
	e := emulators.Get(t, m, true)
	cc, err := e.Dial()
	if err != nil {
		t.Fatal(err)
	}
	client, err := datastore.NewClient(t.Context(), e.ProjectID, option.WithGRPCConn(cc))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = client.Close()
		_ = cc.Close()
	})
	l, err := dswait.New(client, dswait.Options{Namespace: "dswait"})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func TestConformance(t *testing.T) {
	for _, m := range []dstest.Mode{dstest.Firestore, dstest.Legacy} {
		t.Run(m.String(), func(t *testing.T) {
			waitlisttest.Run(t, func(t *testing.T) tasks.WaitList { return newList(t, m) })
		})
	}
}

func TestRetention(t *testing.T) {
	for _, m := range []dstest.Mode{dstest.Firestore, dstest.Legacy} {
		t.Run(m.String(), func(t *testing.T) {
			l := newList(t, m).(*dswait.List)
			var mu sync.Mutex
			now := time.Now()
			dswait.SetClock(l, func() time.Time { mu.Lock(); defer mu.Unlock(); return now })
			waitlisttest.RunRetention(t, l, func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() })
		})
	}
}
