package dstest

import (
	"context"
	"fmt"
	"os"
	"testing"
)

// A Set starts emulators once for a whole test binary, in the background, so
// that the JVMs warm up while the first tests run. Create it in TestMain
// before m.Run, take an emulator in a test with Get, and Close it after m.Run:
//
//	var emulators *dstest.Set
//
//	func TestMain(m *testing.M) {
//		emulators = dstest.StartSet(dstest.Legacy, dstest.Firestore)
//		code := m.Run()
//		emulators.Close()
//		os.Exit(code)
//	}
type Set struct {
	members map[Mode]*member
}

type member struct {
	ready chan struct{} // closed when e or err is set
	e     *Emulator
	err   error
}

// StartSet starts an emulator of each mode in the background, each bounded by
// StartTimeout.
func StartSet(modes ...Mode) *Set {
	s := &Set{members: make(map[Mode]*member, len(modes))}
	for _, mode := range modes {
		m := &member{ready: make(chan struct{})}
		s.members[mode] = m
		go func() {
			defer close(m.ready)
			ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
			defer cancel()
			m.e, m.err = Start(ctx, mode)
		}()
	}
	return s
}

// Get waits for the emulator of mode m and returns it, or ends the test as
// Require does when it could not start. With reset it first empties the
// emulator. It fails the test for a mode the Set was not started with.
func (s *Set) Get(t testing.TB, m Mode, reset bool) *Emulator {
	t.Helper()
	mem, ok := s.members[m]
	if !ok {
		t.Fatalf("dstest: the Set has no %v emulator", m)
	}
	<-mem.ready
	Require(t, mem.err)
	if reset {
		if err := mem.e.Reset(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	return mem.e
}

// Close waits for every start to end and stops the emulators that started,
// reporting failures on standard error.
func (s *Set) Close() {
	for _, mem := range s.members {
		<-mem.ready
		if mem.e != nil {
			if err := mem.e.Close(); err != nil {
				fmt.Fprintln(os.Stderr, "dstest: stopping emulator:", err)
			}
		}
	}
}
