package tasks_test

import (
	"testing"

	dsclient "cloud.google.com/go/datastore"
	"google.golang.org/api/option"

	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/dswait"
)

// The park tests also run with the wait list in Datastore (tasks/dswait), on
// the emulator the end-to-end tests keep their locks in.
func init() {
	waitLists["datastore"] = func(t testing.TB) tasks.WaitList {
		t.Helper()
		e2eBackend(t) // starts (once) and resets the emulator
		e := datastore.emu
		cc, err := e.Dial()
		if err != nil {
			t.Fatal(err)
		}
		client, err := dsclient.NewClient(t.Context(), e.ProjectID, option.WithGRPCConn(cc))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = client.Close()
			_ = cc.Close()
		})
		l, err := dswait.New(client, dswait.Options{})
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
}
