package netdelay

import (
	"net"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// TestGRPCMultiplexed sends 20 concurrent calls on one gRPC connection (as a
// Datastore client does) through a proxy of 40 ms up and 60 ms down: they
// share one HTTP/2 connection, and each takes about one round trip of
// 100 ms, not a share of a queue.
func TestGRPCMultiplexed(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	healthpb.RegisterHealthServer(srv, health.NewServer())
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ln) }()
	defer func() { srv.Stop(); <-done }()

	const up, down = 40 * time.Millisecond, 60 * time.Millisecond
	p := Start(t, ln.Addr().String(), up, down)
	cc, err := grpc.NewClient("passthrough:///"+p.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	client := healthpb.NewHealthClient(cc)
	// Connect first: the handshake's round trips are not the calls'.
	if _, err := client.Check(t.Context(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	const n = 20
	start := time.Now()
	var eg errgroup.Group
	for range n {
		eg.Go(func() error {
			_, err := client.Check(t.Context(), &healthpb.HealthCheckRequest{})
			return err
		})
	}
	if err := eg.Wait(); err != nil {
		t.Fatal(err)
	}
	elapsed := time.Since(start)
	if elapsed < up+down {
		t.Errorf("%d concurrent calls took %v; want at least one round trip of %v", n, elapsed, up+down)
	}
	if elapsed > 2*(up+down) {
		t.Errorf("%d concurrent calls on one connection took %v; want about one round trip (%v), as they are not queued behind each other", n, elapsed, up+down)
	}
	if a := p.Accepted(); a != 1 {
		t.Errorf("%d connections; want the calls on one", a)
	}
}
