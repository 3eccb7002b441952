package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// xprocChildEnv carries an xprocConfig (JSON) to a waiter process: the test
// binary re-executed by runXproc.
const xprocChildEnv = "BENCH_XPROC_CHILD"

// xprocConfig is one waiter process's job.
type xprocConfig struct {
	Contender string
	Store     peerStore
	ID        string        // the lock every process of the run takes
	HoldMin   time.Duration // each holding lasts uniform [HoldMin, HoldMax)
	HoldMax   time.Duration
}

// The protocol between runXproc and its processes, one line each way.
// The process writes "ready" once connected (after one acquire and release
// of another id, which opens its connections and loads any scripts); then,
// each time it holds the lock, "acq START END" (its acquire call began at
// START and returned at END, Unix ns); each time it released it, "rel CALL
// END"; a wait cut by "stop", "open START"; at exit, "calls T1 T2 ..." (the
// moments of its store calls), "aux T1 T2 ..." (of its pub/sub and
// housekeeping commands) and "done". The parent writes "go"
// (start), "next" (the lock went to another process since your release:
// queue again) and "stop" (release or stop waiting, report, exit).

// xprocChild runs in a waiter process.
func xprocChild() int {
	var cfg xprocConfig
	if err := json.Unmarshal([]byte(os.Getenv(xprocChildEnv)), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "config:", err)
		return 2
	}
	if err := xprocRun(cfg, os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "waiter:", err)
		return 1
	}
	return 0
}

func xprocRun(cfg xprocConfig, in io.Reader, out io.Writer) error {
	cl := &callLog{}
	lk, closeConns, err := openPeer(context.Background(), cfg.Contender, cfg.Store, cl)
	if err != nil {
		return err
	}
	defer func() { _ = closeConns() }()
	w := bufio.NewWriter(out)
	emit := func(format string, args ...any) {
		fmt.Fprintf(w, format+"\n", args...)
		_ = w.Flush()
	}
	warm := fmt.Sprintf("%s-warm-%d", cfg.ID, os.Getpid())
	release, err := lk.acquire(context.Background(), warm)
	if err != nil {
		return fmt.Errorf("warm-up acquire: %w", err)
	}
	if err := release(context.Background()); err != nil {
		return fmt.Errorf("warm-up release: %w", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	started, next := make(chan struct{}), make(chan struct{}, 1)
	go func() {
		defer cancel() // "stop", or the parent went away
		sc := bufio.NewScanner(in)
		for sc.Scan() {
			switch sc.Text() {
			case "go":
				close(started)
			case "next":
				next <- struct{}{}
			case "stop":
				return
			}
		}
	}()
	emit("ready")
	select {
	case <-started:
	case <-ctx.Done():
		return errors.New("stopped before go")
	}
	for ctx.Err() == nil {
		start := time.Now().UnixNano()
		release, err := lk.acquire(ctx, cfg.ID)
		if err != nil {
			if ctx.Err() == nil {
				return fmt.Errorf("acquire: %w", err)
			}
			emit("open %d", start)
			break
		}
		emit("acq %d %d", start, time.Now().UnixNano())
		hold := cfg.HoldMin
		if cfg.HoldMax > cfg.HoldMin {
			hold += uniform(cfg.HoldMax - cfg.HoldMin)
		}
		_ = sleepCtx(ctx, hold)
		call := time.Now().UnixNano()
		err = release(context.WithoutCancel(ctx))
		end := time.Now().UnixNano()
		if err != nil && ctx.Err() == nil {
			// (After "stop", taskguard has already released the lock
			// when ctx ended: its locks live no longer than their
			// context.)
			return fmt.Errorf("release: %w", err)
		}
		emit("rel %d %d", call, end)
		select {
		case <-next:
		case <-ctx.Done():
		}
	}
	at, auxAt := cl.take()
	for _, l := range []struct {
		name string
		at   []int64
	}{{"calls", at}, {"aux", auxAt}} {
		var b strings.Builder
		b.WriteString(l.name)
		for _, t := range l.at {
			b.WriteString(" " + strconv.FormatInt(t, 10))
		}
		emit("%s", b.String())
	}
	emit("done")
	return nil
}

// holding is one process's turn with the lock.
type holding struct {
	proc            int
	start, acq      int64 // acquire called, returned
	relCall, relEnd int64 // release called, returned (0: not yet)
	hasRelease      bool
}

// wait is a stretch of time in which a process waited while another held
// the lock: [from, to), Unix ns.
type wait struct {
	proc     int
	from, to int64
}

// xprocResult is what one runXproc measured.
type xprocResult struct {
	handoff  []time.Duration // holder's release returned -> next holder's acquire returned (≥ 0)
	fromCall []time.Duration // holder called release -> next holder's acquire returned
	waited   []time.Duration // the next holder's whole wait, for each hand-off
	waits    []wait          // every wait, ended by the release that let it through or by the stop
	calls    [][]int64       // per process: its store calls, sorted
	aux      [][]int64       // per process: its housekeeping and pub/sub commands, sorted
}

// polls returns how many store calls the processes made while they waited
// (in their waits, while someone else held the lock), and for how long
// they waited in all; with first > 0, only in the first `first` of each
// wait that lasted at least that long.
func (r xprocResult) polls(first time.Duration) (n int, waited time.Duration, count int) {
	return r.countIn(r.calls, first)
}

// countIn counts the moments of calls (per process, sorted) in the waits,
// as polls does.
func (r xprocResult) countIn(calls [][]int64, first time.Duration) (n int, waited time.Duration, count int) {
	for _, w := range r.waits {
		to := w.to
		if first > 0 {
			if time.Duration(w.to-w.from) < first {
				continue
			}
			to = w.from + int64(first)
		}
		c := calls[w.proc]
		lo, _ := slices.BinarySearch(c, w.from)
		hi, _ := slices.BinarySearch(c, to)
		n += hi - lo
		waited += time.Duration(to - w.from)
		count++
	}
	return n, waited, count
}

// runXproc runs n+1 processes of contender cfg.Contender that take
// cfg.ID in turn, each holding it for uniform [HoldMin, HoldMax), until
// samples hand-offs have happened; a process that released queues again
// only once another holds the lock, so n processes wait while one holds.
func runXproc(ctx context.Context, cfg xprocConfig, n, samples int) (xprocResult, error) {
	raw, err := json.Marshal(cfg)
	if err != nil {
		return xprocResult{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	type line struct {
		proc int
		text string
	}
	lines := make(chan line)
	procs := make([]*exec.Cmd, n+1)
	stdins := make([]io.WriteCloser, n+1)
	stderrs := make([]*bytes.Buffer, n+1)
	var readers sync.WaitGroup
	defer func() {
		for i, c := range procs {
			if c != nil && c.Process != nil {
				_ = stdins[i].Close()
				_ = c.Process.Kill()
			}
		}
	}()
	for i := range procs {
		cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), xprocChildEnv+"="+string(raw))
		stderrs[i] = &bytes.Buffer{}
		cmd.Stderr = stderrs[i]
		stdin, err := cmd.StdinPipe()
		if err != nil {
			return xprocResult{}, err
		}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			return xprocResult{}, err
		}
		if err := cmd.Start(); err != nil {
			return xprocResult{}, err
		}
		procs[i], stdins[i] = cmd, stdin
		readers.Add(1)
		go func() {
			defer readers.Done()
			sc := bufio.NewScanner(stdout)
			sc.Buffer(make([]byte, 1<<16), 64<<20)
			for sc.Scan() {
				select {
				case lines <- line{i, sc.Text()}:
				case <-ctx.Done():
					return
				}
			}
			select {
			case lines <- line{i, "eof"}:
			case <-ctx.Done():
			}
		}()
	}
	send := func(i int, msg string) { _, _ = io.WriteString(stdins[i], msg+"\n") }
	failed := func(i int, why string) error {
		return fmt.Errorf("waiter process %d: %s\n%s", i, why, stderrs[i].String())
	}

	var (
		hs      []*holding
		opens   []wait
		res     = xprocResult{calls: make([][]int64, n+1), aux: make([][]int64, n+1)}
		ready   int
		ended   int
		stopAt  int64
		stopped bool
		last    = make([]*holding, n+1) // each process's latest holding
	)
	num := func(s string) int64 { v, _ := strconv.ParseInt(s, 10, 64); return v }
	for ended < n+1 {
		var l line
		select {
		case l = <-lines:
		case <-ctx.Done():
			return xprocResult{}, fmt.Errorf("hand-off run: %w (%d hand-offs so far)", ctx.Err(), max(0, len(hs)-1))
		}
		f := strings.Fields(l.text)
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "ready":
			if ready++; ready == n+1 {
				for i := range procs {
					send(i, "go")
				}
			}
		case "acq":
			h := &holding{proc: l.proc, start: num(f[1]), acq: num(f[2])}
			last[l.proc] = h
			if stopped {
				opens = append(opens, wait{l.proc, h.start, stopAt})
				continue
			}
			if len(hs) > 0 {
				send(hs[len(hs)-1].proc, "next")
			}
			hs = append(hs, h)
			if len(hs) == samples+1 {
				stopped, stopAt = true, time.Now().UnixNano()
				for i := range procs {
					send(i, "stop")
				}
			}
		case "rel":
			if h := last[l.proc]; h != nil {
				h.relCall, h.relEnd, h.hasRelease = num(f[1]), num(f[2]), true
			}
		case "open":
			end := stopAt
			if !stopped {
				return xprocResult{}, failed(l.proc, "stopped waiting before the run ended")
			}
			opens = append(opens, wait{l.proc, num(f[1]), end})
		case "calls", "aux":
			ts := make([]int64, 0, len(f)-1)
			for _, s := range f[1:] {
				ts = append(ts, num(s))
			}
			slices.Sort(ts)
			if f[0] == "calls" {
				res.calls[l.proc] = ts
			} else {
				res.aux[l.proc] = ts
			}
		case "done":
		case "eof":
			ended++
			if !stopped {
				return xprocResult{}, failed(l.proc, "exited before the run ended")
			}
		default:
			return xprocResult{}, failed(l.proc, "unexpected line "+strconv.Quote(l.text))
		}
	}
	for i, c := range procs {
		_ = stdins[i].Close()
		if err := c.Wait(); err != nil {
			return xprocResult{}, failed(i, err.Error())
		}
		procs[i] = nil
	}
	readers.Wait()
	for k := 1; k < len(hs); k++ {
		prev, h := hs[k-1], hs[k]
		if !prev.hasRelease {
			return xprocResult{}, fmt.Errorf("holding %d: no release reported", k-1)
		}
		res.handoff = append(res.handoff, time.Duration(max(0, h.acq-prev.relEnd)))
		res.fromCall = append(res.fromCall, time.Duration(h.acq-prev.relCall))
		res.waited = append(res.waited, time.Duration(h.acq-h.start))
		if h.start < prev.relCall {
			res.waits = append(res.waits, wait{h.proc, h.start, prev.relCall})
		}
	}
	res.waits = append(res.waits, opens...)
	return res, nil
}

// peerHold is a hold-time range of BenchmarkPeerHandoff.
type peerHold struct {
	name     string
	min, max time.Duration
	// samples is the number of hand-offs per waiter count.
	samples map[int]int
}

// peerHolds returns the hold ranges: 200–600 ms (30 hand-offs) and 10 s
// (4 hand-offs with 2 waiting processes, 6 with 8, so that some of the 8
// wait more than 60 s). BENCH_PEER_SAMPLES (a number) overrides every
// sample count and BENCH_PEER_LONG_HOLD (a Go duration) the 10 s, to try
// the harness quickly.
func peerHolds() []peerHold {
	long := 10 * time.Second
	if d, err := time.ParseDuration(os.Getenv("BENCH_PEER_LONG_HOLD")); err == nil && d > 0 {
		long = d
	}
	holds := []peerHold{
		{"200-600ms", 200 * time.Millisecond, 600 * time.Millisecond, map[int]int{2: 30, 8: 30}},
		{long.String(), long, long, map[int]int{2: 4, 8: 6}},
	}
	if s, err := strconv.Atoi(os.Getenv("BENCH_PEER_SAMPLES")); err == nil && s > 0 {
		for _, h := range holds {
			for n := range h.samples {
				h.samples[n] = s
			}
		}
	}
	return holds
}

// peerStores starts the servers the contenders need, once per benchmark.
func peerStores(b *testing.B) peerStore {
	e := emulator(b)
	return peerStore{RedisAddr: redisAddr(b), DSHost: e.Host, DSProject: e.ProjectID, Prefix: uniq("p") + ":"}
}

// BenchmarkPeerHandoff measures hand-off between OS processes: for each
// contender (taskguard dslock on the legacy Datastore emulator, the djangae
// re-implementation on the same emulator, taskguard redislock,
// go-redsync/redsync and bsm/redislock on one redis-server), n+1 processes
// (the test binary re-executed) take one id in turn, each holding it for
// 200–600 ms or 10 s, so that n processes wait while one holds.
//
// Metrics: p50-ns and p90-ns from the holder's release returning to the
// next holder's acquire returning (wall clocks of one machine);
// call-p50-ns from the holder calling release; polls/s: the store calls
// (Datastore RPCs, redis commands other than pub/sub and connection
// housekeeping) a process made while it waited, over the time it waited,
// pooled over the processes; waits/s: waits begun per second of waiting
// (the floor that one try on arrival puts under polls/s); wait-ns: the
// mean wait; poll60/s and waits60: the same calls in the first 60 s of the
// waits that lasted 60 s or more, and how many there were; xbound-p50: the
// median over hand-offs of the hand-off over max(25 ms, 5% of the time its
// new holder waited); aux/s: the pub/sub and housekeeping commands per
// second of waiting; samples: hand-offs.
func BenchmarkPeerHandoff(b *testing.B) {
	st := peerStores(b) // one emulator and one redis-server for all
	for _, c := range []string{peerDslock, peerDjangae, peerRedislock, peerRedsync, peerBsm} {
		for _, h := range peerHolds() {
			for _, n := range []int{2, 8} {
				b.Run(fmt.Sprintf("%s/hold=%s/waiters=%d", c, h.name, n), func(b *testing.B) {
					benchPeerHandoff(b, st, c, h, n)
				})
			}
		}
	}
}

func benchPeerHandoff(b *testing.B, st peerStore, contender string, h peerHold, n int) {
	cfg := xprocConfig{Contender: contender, Store: st, HoldMin: h.min, HoldMax: h.max}
	var all xprocResult
	var polls, count, polls60, count60, aux int
	var waited, waited60 time.Duration
	for b.Loop() {
		cfg.ID = uniq("xproc")
		r, err := runXproc(b.Context(), cfg, n, h.samples[n])
		if err != nil {
			b.Fatal(err)
		}
		all.handoff = append(all.handoff, r.handoff...)
		all.fromCall = append(all.fromCall, r.fromCall...)
		all.waited = append(all.waited, r.waited...)
		a, _, _ := r.countIn(r.aux, 0)
		aux += a
		p, w, c := r.polls(0)
		polls, waited, count = polls+p, waited+w, count+c
		p, w, c = r.polls(time.Minute)
		polls60, waited60, count60 = polls60+p, waited60+w, count60+c
	}
	var ratios []time.Duration // hand-off / bound, in thousandths
	for i, d := range all.handoff {
		bound := max(25*time.Millisecond, all.waited[i]/20)
		ratios = append(ratios, time.Duration(1000*int64(d)/int64(bound)))
	}
	b.ReportMetric(float64(percentile(all.handoff, 50)), "p50-ns")
	b.ReportMetric(float64(percentile(all.handoff, 90)), "p90-ns")
	b.ReportMetric(float64(percentile(all.fromCall, 50)), "call-p50-ns")
	b.ReportMetric(float64(percentile(ratios, 50))/1000, "xbound-p50")
	if waited > 0 {
		b.ReportMetric(float64(polls)/waited.Seconds(), "polls/s")
		b.ReportMetric(float64(count)/waited.Seconds(), "waits/s")
		b.ReportMetric(float64(waited)/float64(count), "wait-ns")
		b.ReportMetric(float64(aux)/waited.Seconds(), "aux/s")
	}
	if waited60 > 0 {
		b.ReportMetric(float64(polls60)/waited60.Seconds(), "poll60/s")
	}
	b.ReportMetric(float64(count60), "waits60")
	b.ReportMetric(float64(len(all.handoff)), "samples")
}

// BenchmarkPeerUncontended runs uncontendedRounds rounds; in each, every
// contender of one store runs uncontendedCycles acquire + release cycles in
// turn, so that drift in the machine's load falls on all alike.
const uncontendedRounds = 20

var uncontendedCycles = map[string]int{"redis": 100, "datastore": 10}

// BenchmarkPeerUncontended measures one uncontended acquire + release on a
// fresh id, per contender, in one process against the same server in the
// same run: on redis-server taskguard redislock, bsm/redislock and
// go-redsync/redsync; on the legacy Datastore emulator taskguard dslock and
// the djangae baseline. Metrics: NAME-p50-ns and NAME-p90-ns per contender,
// NAME-calls the store calls per cycle (redis commands, Datastore RPCs),
// NAME-n the cycles measured and rounds the turns they were taken in.
func BenchmarkPeerUncontended(b *testing.B) {
	stores := map[string][]string{
		"redis":     {peerRedislock, peerBsm, peerRedsync},
		"datastore": {peerDslock, peerDjangae},
	}
	st := peerStores(b)
	for _, store := range []string{"redis", "datastore"} {
		b.Run(store, func(b *testing.B) {
			ctx := b.Context()
			names := stores[store]
			lks := make([]xlocker, len(names))
			logs := make([]*callLog, len(names))
			for i, name := range names {
				logs[i] = &callLog{}
				lk, closeConns, err := openPeer(ctx, name, st, logs[i])
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { _ = closeConns() })
				lks[i] = lk
			}
			cycle := func(lk xlocker, id string) (time.Duration, error) {
				t0 := time.Now()
				release, err := lk.acquire(ctx, id)
				if err != nil {
					return 0, err
				}
				if err := release(ctx); err != nil {
					return 0, err
				}
				return time.Since(t0), nil
			}
			// Warm up: connections, scripts, the emulator's JIT.
			for range 3 * uncontendedCycles[store] {
				for _, lk := range lks {
					if _, err := cycle(lk, uniq("warm")); err != nil {
						b.Fatal(err)
					}
				}
			}
			took := make([][]time.Duration, len(lks))
			calls := make([]int, len(lks))
			for i, l := range logs {
				at, _ := l.take()
				calls[i] = -len(at)
			}
			for b.Loop() {
				for round := range uncontendedRounds {
					for j := range lks {
						i := (j + round) % len(lks) // rotate who goes first
						for range uncontendedCycles[store] {
							d, err := cycle(lks[i], uniq("u"))
							if err != nil {
								b.Fatalf("%s: %v", names[i], err)
							}
							took[i] = append(took[i], d)
						}
					}
				}
			}
			b.ReportMetric(uncontendedRounds, "rounds")
			for i, name := range names {
				at, _ := logs[i].take()
				calls[i] += len(at)
				b.ReportMetric(float64(calls[i])/float64(len(took[i])), name+"-calls")
				b.ReportMetric(float64(percentile(took[i], 50)), name+"-p50-ns")
				b.ReportMetric(float64(percentile(took[i], 90)), name+"-p90-ns")
				b.ReportMetric(float64(len(took[i])), name+"-n")
			}
		})
	}
}
