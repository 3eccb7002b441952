package netdelay

import (
	"bufio"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// echo starts a line echo server that records when each line arrived.
func echo(t *testing.T) (addr string, arrivals func() []time.Time) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu  sync.Mutex
		got []time.Time
		wg  sync.WaitGroup
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadBytes('\n')
					if err != nil {
						return
					}
					mu.Lock()
					got = append(got, time.Now())
					mu.Unlock()
					if _, err := c.Write(line); err != nil {
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() { _ = ln.Close(); wg.Wait() })
	return ln.Addr().String(), func() []time.Time {
		mu.Lock()
		defer mu.Unlock()
		return append([]time.Time(nil), got...)
	}
}

// TestDistanceNotSerialLink sends 10 requests back to back on one
// connection, each in its own write: with 40 ms up and 60 ms down every reply
// comes about 100 ms after its request, so all ten are back in about 100 ms,
// not 10 × 100 ms as a proxy that sleeps per chunk would make it.
func TestDistanceNotSerialLink(t *testing.T) {
	addr, arrivals := echo(t)
	const up, down = 40 * time.Millisecond, 60 * time.Millisecond
	p := Start(t, addr, up, down)
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const n = 10
	start := time.Now()
	for range n {
		if _, err := c.Write([]byte("ping\n")); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond) // separate chunks at the proxy
	}
	r := bufio.NewReader(c)
	for i := range n {
		if _, err := r.ReadString('\n'); err != nil {
			t.Fatalf("reply %d: %v", i, err)
		}
	}
	elapsed := time.Since(start)
	if elapsed < up+down {
		t.Errorf("10 pipelined round trips took %v; want at least one round trip of %v", elapsed, up+down)
	}
	if elapsed > up+down+n*time.Millisecond+150*time.Millisecond {
		t.Errorf("10 pipelined round trips took %v; want about one round trip (%v) plus the sends, not one per request", elapsed, up+down)
	}
	a := arrivals()
	if len(a) != n {
		t.Fatalf("server saw %d requests; want %d", len(a), n)
	}
	if first := a[0].Sub(start); first < up || first > up+100*time.Millisecond {
		t.Errorf("first request reached the server after %v; want the up delay %v", first, up)
	}
}

// TestEOFAndClose: a half-close is passed on after the data before it, and
// Close ends every connection and goroutine (TestMain checks for leaks).
func TestEOFAndClose(t *testing.T) {
	addr, _ := echo(t)
	p, err := New(addr, 5*time.Millisecond, 5*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("a\nb\n")); err != nil {
		t.Fatal(err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != "a\nb\n" {
		t.Errorf("echo after half-close = %q; want %q", got, "a\nb\n")
	}
	_ = c.Close()
	// A connection left open is closed by Close.
	c2, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if _, err := c2.Write([]byte("x\n")); err != nil {
		t.Fatal(err)
	}
	if _, err := bufio.NewReader(c2).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	p.Close()
	p.Close()
	_ = c2.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c2.Read(make([]byte, 1)); err == nil {
		t.Error("a connection stayed open after Close")
	}
	if p.Accepted() != 2 {
		t.Errorf("Accepted = %d; want 2", p.Accepted())
	}
}

func TestNegativeDelay(t *testing.T) {
	if _, err := New("127.0.0.1:1", -time.Millisecond, 0); err == nil {
		t.Error("New accepted a negative delay")
	}
}
