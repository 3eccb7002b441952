// Package torture proves mutual exclusion with numbers: worker processes
// (the test binary re-executed) contend for a few lock ids on the real
// stores, each critical section is recorded outside the lock, and checkers
// look at the history afterwards.
//
// A worker records each section (id, owner, fencing token, and the
// wall-clock times before Acquire, on entry, on exit and after release) in
// its own append-only file; all processes run on one machine, so their
// clocks are one clock. Check then finds overlapping sections of one id,
// tokens that do not increase in entry order, and asks porcupine whether the
// acquire/release history is linearizable against a sequential model of a
// lock (LockModel).
//
// The tests of this package run the torture against both Datastore
// emulators, memcached and redis-server, with faults injected by
// internal/faultproxy, processes killed inside their critical sections, and
// skewed clocks. A frozen-holder phase stops workers with SIGSTOP past their
// lease while each section writes through the fence (package locking/fence)
// to Datastore or PostgreSQL, and checks the resource's own history
// (CheckHistory) for a stale write. TASKGUARD_TORTURE=long selects the long run (make torture).
package torture
