// Package netdelay puts distance between a client and a server on one
// machine: a TCP proxy on a free port of 127.0.0.1 that delivers every byte a
// fixed time after it arrived, per direction (Up: client to server; Down:
// server to client).
//
// It models distance, not a slow link: each chunk is delayed from the moment
// it was read, independently of the chunks before it, so requests a client
// sends back to back (or multiplexes on one HTTP/2 connection, as gRPC does)
// each take Up + Down more, and none waits for another's delay. A proxy
// that sleeps before forwarding each chunk in turn (internal/faultproxy's
// latency) delays a burst of n chunks by n times the delay instead.
//
// Model names the figures the benchmarks use for a production-like
// deployment (Production) next to loopback (Loopback): the delay each way to
// Datastore, the latency of a CreateTask call, and the delay before Cloud
// Tasks dispatches a task. Datastore delays are applied with a Proxy; the
// Cloud Tasks figures with the options of tasks/taskstest (see
// Model.TasksOptions).
package netdelay

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/taskguard/taskguard/tasks/taskstest"
)

// Model is a network and service-latency model for benchmarks.
type Model struct {
	// Name labels the model in benchmark names ("loopback", "prod").
	Name string
	// Datastore is the delay added each way between a client and the
	// Datastore emulator: a round trip costs 2 × Datastore more.
	Datastore time.Duration
	// CreateTask is the latency added to every CreateTask call of the Cloud
	// Tasks emulator.
	CreateTask time.Duration
	// DispatchMin and DispatchMax bound the delay, drawn uniformly per
	// attempt, between a task falling due and its HTTP request being sent.
	DispatchMin, DispatchMax time.Duration
}

// Loopback adds nothing: every service answers at the speed of this machine.
var Loopback = Model{Name: "loopback"}

// Production is a production-like model for one region: Datastore 15 ms
// each way (a 30 ms round trip on top of the emulator's own), 50 ms per
// CreateTask, and a dispatch 50 to 100 ms after a task falls due. These are
// field figures, not the services' promises (neither publishes latencies).
var Production = Model{
	Name:        "prod",
	Datastore:   15 * time.Millisecond,
	CreateTask:  50 * time.Millisecond,
	DispatchMin: 50 * time.Millisecond,
	DispatchMax: 100 * time.Millisecond,
}

// RTT is the round trip the model adds to every Datastore RPC.
func (m Model) RTT() time.Duration { return 2 * m.Datastore }

// TasksOptions returns o with the model's Cloud Tasks latencies set: every
// CreateTask takes CreateTask longer, and every attempt is sent DispatchMin
// to DispatchMax after its task fell due.
func (m Model) TasksOptions(o taskstest.Options) taskstest.Options {
	o.CreateTaskLatency = m.CreateTask
	o.DispatchDelay = m.DispatchMin
	o.DispatchJitter = max(m.DispatchMax-m.DispatchMin, 0)
	return o
}

// DatastoreProxy returns a proxy to a Datastore emulator's host (host:port) with
// the model's delay each way, closed when tb ends. Dial its Addr instead
// of the emulator's.
func (m Model) DatastoreProxy(tb testing.TB, host string) *Proxy {
	tb.Helper()
	return Start(tb, host, m.Datastore, m.Datastore)
}

// String describes the model for benchmark logs.
func (m Model) String() string {
	return fmt.Sprintf("%s (Datastore +%v each way, CreateTask +%v, dispatch +%v..%v)",
		m.Name, m.Datastore, m.CreateTask, m.DispatchMin, m.DispatchMax)
}

// Proxy is a running delaying proxy. Its methods are safe for concurrent use.
type Proxy struct {
	target   string
	ln       net.Listener
	up, down atomic.Int64 // delays, ns
	wg       sync.WaitGroup

	mu     sync.Mutex
	conns  map[net.Conn]struct{} // open connections, both sides; guarded by mu
	closed bool                  // guarded by mu

	accepted atomic.Int64
}

// New starts a proxy to target (host:port) on a free port of 127.0.0.1 that
// delays client-to-server bytes by up and server-to-client bytes by down.
// Close stops it.
func New(target string, up, down time.Duration) (*Proxy, error) {
	if up < 0 || down < 0 {
		return nil, fmt.Errorf("netdelay: negative delay (up %v, down %v)", up, down)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{target: target, ln: ln, conns: map[net.Conn]struct{}{}}
	p.SetDelay(up, down)
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Start is New for a test or benchmark: it fails tb on error and closes the
// proxy in tb.Cleanup.
func Start(tb testing.TB, target string, up, down time.Duration) *Proxy {
	tb.Helper()
	p, err := New(target, up, down)
	if err != nil {
		tb.Fatalf("netdelay: %v", err)
	}
	tb.Cleanup(p.Close)
	return p
}

// Addr returns the address clients dial instead of the target.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Accepted reports how many client connections the proxy accepted.
func (p *Proxy) Accepted() int64 { return p.accepted.Load() }

// SetDelay changes the delays for bytes read from now on. Bytes already in
// flight keep theirs; order within a connection is always kept.
func (p *Proxy) SetDelay(up, down time.Duration) {
	p.up.Store(int64(max(up, 0)))
	p.down.Store(int64(max(down, 0)))
}

// Close stops accepting, closes every connection and waits for the proxy's
// goroutines. It is safe to call more than once.
func (p *Proxy) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	conns := make([]net.Conn, 0, len(p.conns))
	for c := range p.conns {
		conns = append(conns, c)
	}
	p.mu.Unlock()
	_ = p.ln.Close()
	for _, c := range conns {
		_ = c.Close()
	}
	p.wg.Wait()
}

// track registers c for Close; it reports false (and closes c) when the
// proxy is closed already.
func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		_ = c.Close()
		return false
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	_ = c.Close()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.accepted.Add(1)
		if !p.track(client) {
			continue
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			server, err := net.DialTimeout("tcp", p.target, 5*time.Second)
			if err != nil {
				p.untrack(client)
				return
			}
			if !p.track(server) {
				p.untrack(client)
				return
			}
			var done sync.WaitGroup
			done.Add(2)
			var halves atomic.Int32
			end := func() {
				if halves.Add(1) == 2 {
					p.untrack(client)
					p.untrack(server)
				}
			}
			kill := func() {
				p.untrack(client)
				p.untrack(server)
			}
			go func() { defer done.Done(); p.pipe(client, server, &p.up, end, kill) }()
			go func() { defer done.Done(); p.pipe(server, client, &p.down, end, kill) }()
			done.Wait()
		}()
	}
}

// chunk is a piece of the stream and when it is due at the other end; a nil
// data marks the end of the stream (EOF from the source).
type chunk struct {
	data []byte
	due  time.Time
}

// pipe copies src to dst, each chunk delivered delay after it was read. A
// reader stamps and queues chunks as they come; a writer delivers each at
// its time. So the delays of chunks read back to back overlap, as on a long
// line, instead of adding up.
func (p *Proxy) pipe(src, dst net.Conn, delay *atomic.Int64, end, kill func()) {
	q := make(chan chunk, 1024)
	var writer sync.WaitGroup
	writer.Add(1)
	go func() {
		defer writer.Done()
		t := time.NewTimer(0)
		defer t.Stop()
		<-t.C
		for c := range q {
			if d := time.Until(c.due); d > 0 {
				t.Reset(d)
				<-t.C
			}
			if c.data == nil {
				if tc, ok := dst.(*net.TCPConn); ok {
					_ = tc.CloseWrite()
				}
				end()
				// Drain what is left so the reader never blocks.
				for range q {
				}
				return
			}
			if _, err := dst.Write(c.data); err != nil {
				kill()
				for range q {
				}
				return
			}
		}
	}()
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			data := make([]byte, n)
			copy(data, buf[:n])
			q <- chunk{data: data, due: time.Now().Add(time.Duration(delay.Load()))}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				q <- chunk{due: time.Now().Add(time.Duration(delay.Load()))}
			} else {
				kill()
			}
			close(q)
			writer.Wait()
			return
		}
	}
}
