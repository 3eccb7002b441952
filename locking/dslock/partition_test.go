package dslock

import (
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

// TestPartitions checks that database id, namespace and kind each separate
// locks: one id is held independently in each, and Cleanup in one leaves the
// others alone.
func TestPartitions(t *testing.T) {
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		parts := []Options{
			{},
			{DatabaseID: "otherdb"},
			{Namespace: "tenant-a"},
			{Kind: "OtherLock"},
			{DatabaseID: "otherdb", Namespace: "tenant-a", Kind: "OtherLock"},
		}
		const id = "shared-id"
		backends := make([]*Backend, len(parts))
		for i, o := range parts {
			backends[i] = newBackend(t, e, o)
			if i == 0 {
				mustAcquire(t, backends[i], req(id, staleLease))
			} else {
				mustAcquire(t, backends[i], req(id, time.Minute))
			}
		}
		for i, b := range backends[1:] { // the first one's lease is too short to check
			if g, err := b.Acquire(t.Context(), req(id, time.Minute)); err != nil || g.Acquired {
				t.Errorf("partition %+v: second acquire = %+v, %v; want held", parts[i+1], g, err)
			}
		}
		time.Sleep(staleWait)
		rep, err := backends[0].Cleanup(t.Context(), CleanupOptions{Grace: testGrace})
		if err != nil || rep.Deleted != 1 {
			t.Fatalf("Cleanup = %+v, %v; want the one expired lock of the default partition deleted", rep, err)
		}
		for i, b := range backends[1:] {
			if _, found := stored(t, b, id); !found {
				t.Errorf("partition %+v: lock deleted by cleanup of another partition", parts[i+1])
			}
		}
	})
}
