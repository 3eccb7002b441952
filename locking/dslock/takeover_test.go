package dslock

import (
	"sync"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

// TestTakeoverRace has N backends, each on its own connection, race to take
// over one expired lock, several rounds: exactly one wins each round, the
// others see it held, and nobody gets an error.
func TestTakeoverRace(t *testing.T) {
	const racers, rounds = 10, 4
	eachEmulator(t, func(t *testing.T, e *dstest.Emulator) {
		backends := make([]*Backend, racers)
		for i := range backends {
			backends[i] = newBackend(t, e, Options{})
		}
		const id = "race"
		lease := 100 * time.Millisecond
		last := mustAcquire(t, backends[0], req(id, lease)).Token
		for round := range rounds {
			time.Sleep(lease + 3*testSkew)
			var (
				wg     sync.WaitGroup
				start  = make(chan struct{})
				grants = make([]locking.Grant, racers)
				errs   = make([]error, racers)
			)
			for i, b := range backends {
				wg.Go(func() {
					<-start
					grants[i], errs[i] = b.Acquire(t.Context(), req(id, lease))
				})
			}
			close(start)
			wg.Wait()
			winners := 0
			for i, g := range grants {
				if errs[i] != nil {
					t.Errorf("round %d racer %d: %v", round, i, errs[i])
				}
				if g.Acquired {
					winners++
					if !g.TookOver || g.Token <= last {
						t.Errorf("round %d: winner's grant %+v; want TookOver and a token above %d", round, g, last)
					}
					last = g.Token
				}
			}
			if winners != 1 {
				t.Fatalf("round %d: %d racers took over one expired lock; want exactly 1", round, winners)
			}
		}
		t.Logf("%d rounds × %d racers: one winner each", rounds, racers)
	})
}
