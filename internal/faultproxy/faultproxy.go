// Package faultproxy is a fault-injecting TCP proxy for tests: it listens on
// a free port of 127.0.0.1 and forwards every connection to one target (a
// Datastore emulator's gRPC port, memcached, redis-server), while a test adds
// latency, resets connections, refuses new ones, blackholes traffic for a
// while, or resets a connection in the middle of a request.
//
// The proxy works on bytes, not on any protocol: a fault hits whatever the
// client was sending or receiving at that moment, the way a network fault
// does. Faults apply from the moment they are set; they are not queued.
package faultproxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Stats counts what the proxy did since it started.
type Stats struct {
	// Accepted is the number of client connections accepted.
	Accepted int64
	// Refused is the number of connections reset at once by Refuse.
	Refused int64
	// Reset is the number of connections reset by Reset, ResetAfter or the
	// end of a blackhole.
	Reset int64
	// Dropped is the number of bytes discarded while blackholed.
	Dropped int64
	// Forwarded is the number of bytes forwarded, both directions.
	Forwarded int64
}

// Proxy is a running proxy. Its methods are safe for concurrent use.
type Proxy struct {
	target string
	ln     net.Listener
	wg     sync.WaitGroup // the accept loop and every link's goroutines

	mu         sync.Mutex
	links      map[*link]struct{} // open links; guarded by mu
	latency    time.Duration      // added before each forwarded chunk; guarded by mu
	blackhole  bool               // discard all bytes; guarded by mu
	refuse     bool               // reset new connections at once; guarded by mu
	resetAfter int64              // > 0: forward this many more client bytes, then reset that link; guarded by mu
	closed     bool               // guarded by mu

	accepted, refused, reset, dropped, forwarded atomic.Int64
}

// link is one proxied connection.
type link struct {
	client, server *net.TCPConn
	once           sync.Once
	halves         atomic.Int32 // directions that ended with EOF
}

// New starts a proxy to target (host:port) on a free port of 127.0.0.1.
// Close stops it.
func New(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{target: target, ln: ln, links: make(map[*link]struct{})}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Start is New for a test: it fails t on error and closes the proxy in
// t.Cleanup.
func Start(t testing.TB, target string) *Proxy {
	t.Helper()
	p, err := New(target)
	if err != nil {
		t.Fatalf("faultproxy: %v", err)
	}
	t.Cleanup(p.Close)
	return p
}

// Addr returns the address clients should dial instead of the target.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Stats returns the proxy's counters.
func (p *Proxy) Stats() Stats {
	return Stats{
		Accepted:  p.accepted.Load(),
		Refused:   p.refused.Load(),
		Reset:     p.reset.Load(),
		Dropped:   p.dropped.Load(),
		Forwarded: p.forwarded.Load(),
	}
}

// SetLatency delays every chunk of bytes forwarded in either direction by d
// (0 removes the delay). Order within a connection is kept.
func (p *Proxy) SetLatency(d time.Duration) {
	p.mu.Lock()
	p.latency = d
	p.mu.Unlock()
}

// Refuse makes the proxy reset new connections as soon as it accepts them
// (on), or accept them again (off). Open connections are not touched.
func (p *Proxy) Refuse(on bool) {
	p.mu.Lock()
	p.refuse = on
	p.mu.Unlock()
}

// Blackhole starts or ends a blackhole. While it lasts, connections stay
// open and new ones are accepted, but every byte in either direction is
// discarded: requests go unanswered until their callers time out. Ending it
// resets every open connection, since their streams lost bytes (as TCP
// connections across a long partition end up reset).
func (p *Proxy) Blackhole(on bool) {
	p.mu.Lock()
	was := p.blackhole
	p.blackhole = on
	p.mu.Unlock()
	if was && !on {
		p.Reset()
	}
}

// Reset resets (TCP RST) every open connection, on both sides.
func (p *Proxy) Reset() {
	p.mu.Lock()
	links := make([]*link, 0, len(p.links))
	for l := range p.links {
		links = append(links, l)
	}
	p.mu.Unlock()
	for _, l := range links {
		p.kill(l)
	}
}

// ResetAfter arms a one-shot fault: the connection that carries the next
// bytes from a client gets n more client bytes forwarded and is then reset,
// in the middle of whatever request those bytes belong to. n must be > 0.
func (p *Proxy) ResetAfter(n int64) {
	p.mu.Lock()
	p.resetAfter = max(n, 1)
	p.mu.Unlock()
}

// Close stops accepting, resets every connection and waits for the proxy's
// goroutines. It is safe to call more than once.
func (p *Proxy) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	p.mu.Unlock()
	_ = p.ln.Close()
	p.Reset()
	p.wg.Wait()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.accepted.Add(1)
		client := c.(*net.TCPConn)
		p.mu.Lock()
		refuse, closed := p.refuse, p.closed
		p.mu.Unlock()
		if refuse || closed {
			p.refused.Add(1)
			_ = client.SetLinger(0)
			_ = client.Close()
			continue
		}
		s, err := net.DialTimeout("tcp", p.target, 5*time.Second)
		if err != nil {
			_ = client.SetLinger(0)
			_ = client.Close()
			continue
		}
		l := &link{client: client, server: s.(*net.TCPConn)}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			p.kill(l)
			continue
		}
		p.links[l] = struct{}{}
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pipe(l, l.client, l.server, true)
		go p.pipe(l, l.server, l.client, false)
	}
}

// kill resets both sides of l once.
func (p *Proxy) kill(l *link) { p.end(l, true) }

// end closes both sides of l once, with a reset when rst is set.
func (p *Proxy) end(l *link, rst bool) {
	l.once.Do(func() {
		if rst {
			p.reset.Add(1)
			_ = l.client.SetLinger(0)
			_ = l.server.SetLinger(0)
		}
		_ = l.client.Close()
		_ = l.server.Close()
		p.mu.Lock()
		delete(p.links, l)
		p.mu.Unlock()
	})
}

// pipe copies from src to dst chunk by chunk, applying the faults in force
// when each chunk arrives. fromClient marks the client-to-server direction.
func (p *Proxy) pipe(l *link, src, dst *net.TCPConn, fromClient bool) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			chunk := buf[:n]
			p.mu.Lock()
			latency, blackhole := p.latency, p.blackhole
			cut := false
			if fromClient && !blackhole && p.resetAfter > 0 {
				if int64(len(chunk)) >= p.resetAfter {
					chunk = chunk[:p.resetAfter]
					p.resetAfter = 0
					cut = true
				} else {
					p.resetAfter -= int64(len(chunk))
				}
			}
			p.mu.Unlock()
			switch {
			case blackhole:
				p.dropped.Add(int64(n))
			default:
				if latency > 0 {
					time.Sleep(latency)
				}
				if _, werr := dst.Write(chunk); werr != nil {
					p.kill(l)
					return
				}
				p.forwarded.Add(int64(len(chunk)))
			}
			if cut {
				p.kill(l)
				return
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				// Half-close: pass the EOF on and let the other direction end.
				_ = dst.CloseWrite()
				if l.halves.Add(1) == 2 {
					p.end(l, false)
				}
				return
			}
			p.kill(l)
			return
		}
	}
}
