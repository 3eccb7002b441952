package tasks_test

import (
	"testing"

	dsclient "cloud.google.com/go/datastore"
	"google.golang.org/api/option"
	"google.golang.org/grpc"

	"github.com/taskguard/taskguard/tasks"
	"github.com/taskguard/taskguard/tasks/dswait"
)

// The park tests also run with the wait list in Datastore (tasks/dswait), on
// the emulator the end-to-end tests keep their locks in.
func init() {
	waitLists["datastore"] = func(t testing.TB) tasks.WaitList { return dsWaitList(t) }
}

// dsWaitList returns a dswait list on the emulator the e2e locks use (started
// once and reset by e2eBackend), its connection dialled with opts (an
// interceptor that injects faults at the wire).
func dsWaitList(t testing.TB, opts ...grpc.DialOption) *dswait.List {
	t.Helper()
	e2eBackend(t)
	e := datastore.emu
	cc, err := e.Dial(opts...)
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
