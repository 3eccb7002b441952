package faultproxy_test

import (
	"bufio"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/taskguard/taskguard/internal/faultproxy"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// echo starts a line echo server on 127.0.0.1 and returns its address.
func echo(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	conns := make(chan net.Conn, 64)
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns <- c
			go func() { _, _ = io.Copy(c, c) }()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		close(conns)
		for c := range conns {
			c.Close()
		}
	})
	return ln.Addr().String()
}

func roundTrip(c net.Conn, msg string, timeout time.Duration) (string, error) {
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return line, err
}

func dial(t *testing.T, p *faultproxy.Proxy) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestForwardAndLatency(t *testing.T) {
	p := faultproxy.Start(t, echo(t))
	c := dial(t, p)
	if got, err := roundTrip(c, "hello", 2*time.Second); err != nil || got != "hello\n" {
		t.Fatalf("round trip = %q, %v", got, err)
	}
	p.SetLatency(50 * time.Millisecond)
	start := time.Now()
	if _, err := roundTrip(c, "slow", 2*time.Second); err != nil {
		t.Fatal(err)
	}
	// One chunk each way: at least two delays.
	if d := time.Since(start); d < 100*time.Millisecond {
		t.Errorf("round trip with 50ms latency took %v; want >= 100ms", d)
	}
}

func TestReset(t *testing.T) {
	p := faultproxy.Start(t, echo(t))
	c := dial(t, p)
	if _, err := roundTrip(c, "x", 2*time.Second); err != nil {
		t.Fatal(err)
	}
	p.Reset()
	_, err := roundTrip(c, "y", 2*time.Second)
	if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, io.EOF) && !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("after Reset: %v; want a reset connection", err)
	}
	if s := p.Stats(); s.Reset != 1 {
		t.Errorf("Stats.Reset = %d; want 1", s.Reset)
	}
}

func TestRefuse(t *testing.T) {
	p := faultproxy.Start(t, echo(t))
	p.Refuse(true)
	// The reset may arrive before connect returns, or on the first read.
	if c, err := net.Dial("tcp", p.Addr()); err == nil {
		_, err = roundTrip(c, "x", 2*time.Second)
		c.Close()
		if err == nil {
			t.Fatal("round trip through a refusing proxy succeeded")
		}
	}
	p.Refuse(false)
	c := dial(t, p)
	if _, err := roundTrip(c, "x", 2*time.Second); err != nil {
		t.Fatalf("after Refuse(false): %v", err)
	}
	if s := p.Stats(); s.Refused != 1 {
		t.Errorf("Stats.Refused = %d; want 1", s.Refused)
	}
}

func TestBlackhole(t *testing.T) {
	p := faultproxy.Start(t, echo(t))
	c := dial(t, p)
	p.Blackhole(true)
	_, err := roundTrip(c, "lost", 300*time.Millisecond)
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("blackholed round trip: %v; want a timeout", err)
	}
	p.Blackhole(false)
	if _, err := roundTrip(c, "after", 2*time.Second); err == nil {
		t.Error("a connection that lived through a blackhole still works; want it reset")
	}
	c = dial(t, p)
	if got, err := roundTrip(c, "new", 2*time.Second); err != nil || got != "new\n" {
		t.Fatalf("new connection after the blackhole: %q, %v", got, err)
	}
	if s := p.Stats(); s.Dropped == 0 {
		t.Error("Stats.Dropped = 0 after a blackholed message")
	}
}

func TestResetAfter(t *testing.T) {
	p := faultproxy.Start(t, echo(t))
	c := dial(t, p)
	p.ResetAfter(3)
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, "abcdef\n"); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err == nil && string(got) == "abcdef\n" {
		t.Fatal("the whole message came back; want the connection reset after 3 bytes")
	}
	if len(got) > 3 {
		t.Errorf("read %q; want at most the 3 bytes forwarded before the reset", got)
	}
	// One-shot: the next connection is whole.
	c = dial(t, p)
	if got, err := roundTrip(c, "whole", 2*time.Second); err != nil || got != "whole\n" {
		t.Fatalf("after the one-shot reset: %q, %v", got, err)
	}
}
