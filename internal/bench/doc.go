// Package bench holds the performance benchmarks of the locking packages,
// run against the real Datastore emulator, memcached and redis-server, side
// by side with reimplementations of the algorithms users would otherwise run
// (djangae's STRONG lock and Google's datastore-lock), and against the
// published Go redis locks go-redsync/redsync and bsm/redislock with every
// waiter in its own OS process (xproc_test.go). Everything is in
// _test.go files; this file only names the package. `make bench` runs the
// benchmarks and turns their output into BENCHMARKS.md and a plot with
// internal/benchplot.
//
// The benchmarks treat one iteration as one whole measurement with its own
// sample count and report their figures with b.ReportMetric; run them with
// -benchtime=1x. The unit suffixes are: rpcs/op (round trips at the wire per
// operation), p50-ns and p99-ns (latency percentiles), ops/s, polls/s (tries
// that found the lock held, per second, per id, per waiting instance).
package bench
