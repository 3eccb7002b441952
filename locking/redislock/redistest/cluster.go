package redistest

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/taskguard/taskguard/locking/internal/serverproc"
)

// StartCluster starts a one-node Redis Cluster (cluster mode enabled, all
// 16384 slots on the node), as Memorystore for Valkey runs by default, and
// registers its stop with t.Cleanup. Clients must use the cluster protocol
// (redis.ClusterClient); commands on keys of different slots fail there
// with CROSSSLOT. It does not use REDISTEST_ADDR.
func StartCluster(t testing.TB) *Server {
	t.Helper()
	dir := t.TempDir()
	s := serverproc.Start(t, serverproc.Spec{
		Name:   "redis-server (cluster)",
		Binary: serverBinary(),
		Args: func(port int) []string {
			return []string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1",
				"--cluster-enabled", "yes", "--cluster-config-file", filepath.Join(dir, fmt.Sprintf("nodes-%d.conf", port)),
				"--save", "", "--appendonly", "no", "--daemonize", "no"}
		},
		Ready: func(ctx context.Context, addr string) error {
			return serverproc.Probe(ctx, addr, "PING\r\n", "+PONG")
		},
	})
	if err := assignSlots(t.Context(), s.Addr); err != nil {
		t.Fatalf("redis cluster at %s: %v", s.Addr, err)
	}
	return &Server{Addr: s.Addr, s: s}
}

// assignSlots gives every slot to the node at addr and waits until the
// cluster reports itself ok.
func assignSlots(ctx context.Context, addr string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	dl, _ := ctx.Deadline()
	_ = c.SetDeadline(dl)
	r := bufio.NewReader(c)
	if _, err := fmt.Fprint(c, "CLUSTER ADDSLOTSRANGE 0 16383\r\n"); err != nil {
		return err
	}
	if line, err := r.ReadString('\n'); err != nil || line != "+OK\r\n" {
		return fmt.Errorf("CLUSTER ADDSLOTSRANGE: %q, %v", line, err)
	}
	for {
		if _, err := fmt.Fprint(c, "CLUSTER INFO\r\n"); err != nil {
			return err
		}
		head, err := r.ReadString('\n') // $<len>
		if err != nil || !strings.HasPrefix(head, "$") {
			return fmt.Errorf("CLUSTER INFO: %q, %v", head, err)
		}
		n, _ := strconv.Atoi(strings.TrimSpace(head[1:]))
		body := make([]byte, n+2)
		if _, err := io.ReadFull(r, body); err != nil {
			return err
		}
		if strings.Contains(string(body), "cluster_state:ok") {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster_state not ok: %w", ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}
