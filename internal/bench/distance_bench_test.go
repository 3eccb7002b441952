package bench

import (
	"context"
	"fmt"
	"path"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	pb "cloud.google.com/go/datastore/apiv1/datastorepb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/taskguard/taskguard/internal/netdelay"
	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/locking/dslock/dstest"
)

// distanceModels are the columns of BenchmarkDistance: the same operations
// through a netdelay proxy with no delay (loopback) and with the production
// model's delay each way to Datastore.
var distanceModels = []netdelay.Model{netdelay.Loopback, netdelay.Production}

// commitCounter counts, at the wire of one instance's connection, the
// Commit RPCs (every write of dslock is one commit of one mutation on one
// lock entity) and those that failed, except the instance's first failed
// Insert (AlreadyExists): its first try of a lock it has never seen held
// (see the dslock package documentation), counted in firstContact instead.
type commitCounter struct {
	commits, failed, firstContact atomic.Int64

	mu    sync.Mutex
	codes []string // status codes of the failed commits; guarded by mu
}

func (c *commitCounter) intercept(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	err := invoker(ctx, method, req, reply, cc, opts...)
	if path.Base(method) != "Commit" {
		return err
	}
	if status.Code(err) == codes.AlreadyExists && c.firstContact.CompareAndSwap(0, 1) {
		return err
	}
	c.commits.Add(1)
	if err != nil {
		c.failed.Add(1)
		c.mu.Lock()
		c.codes = append(c.codes, status.Code(err).String())
		c.mu.Unlock()
	}
	return err
}

// reset starts counting anew (the first contact stays excluded).
func (c *commitCounter) reset() {
	c.commits.Store(0)
	c.failed.Store(0)
	c.mu.Lock()
	c.codes = nil
	c.mu.Unlock()
}

// distanceBackend returns our Datastore backend on a new connection through
// proxy, counted by cnt (RPCs) and wc (commits).
func distanceBackend(b *testing.B, e *dstest.Emulator, proxy *netdelay.Proxy, cnt *rpcCounter, wc *commitCounter) *dslock.Backend {
	b.Helper()
	cc, err := grpc.NewClient("passthrough:///"+proxy.Addr(),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithChainUnaryInterceptor(cnt.intercept, wc.intercept))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = cc.Close() })
	be, err := dslock.New(context.Background(), dslock.Options{ProjectID: e.ProjectID, Conn: cc, Kind: "BenchLock"})
	if err != nil {
		b.Fatal(err)
	}
	return be
}

// rawDatastore returns a Datastore client on a new connection through
// proxy, for bare RPCs.
func rawDatastore(b *testing.B, proxy *netdelay.Proxy) pb.DatastoreClient {
	b.Helper()
	cc, err := grpc.NewClient("passthrough:///"+proxy.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = cc.Close() })
	return pb.NewDatastoreClient(cc)
}

// bareInsert is a commit inserting one new entity with one unindexed
// property: a write as small as a lock's.
func bareInsert(project string) *pb.CommitRequest {
	k := &pb.Key{
		PartitionId: &pb.PartitionId{ProjectId: project},
		Path:        []*pb.Key_PathElement{{Kind: "BenchRTT", IdType: &pb.Key_PathElement_Name{Name: uniq("rtt")}}},
	}
	ent := &pb.Entity{Key: k, Properties: map[string]*pb.Value{
		"v": {ValueType: &pb.Value_IntegerValue{IntegerValue: 1}, ExcludeFromIndexes: true},
	}}
	return &pb.CommitRequest{ProjectId: project, Mode: pb.CommitRequest_NON_TRANSACTIONAL,
		Mutations: []*pb.Mutation{{Operation: &pb.Mutation_Insert{Insert: ent}}}}
}

// BenchmarkDistance measures our Datastore backend where the store is far
// away, beside the same operations on loopback in the same run: every
// connection goes through a netdelay proxy that adds the model's delay each
// way (net=loopback: none; net=prod: 15 ms each way, a 30 ms round trip on
// top of the emulator's own). Figures are reported in nanoseconds and in
// round trips of the model (rtts: the latency divided by the model's RTT),
// so that a reader can scale them to a region's latency.
//
//   - cycle: an uncontended Acquire and Release of a fresh id by one
//     instance (locking.Client): p50 and rpcs/op (2: the Insert and the
//     Delete). commit-p50-ns is the measured round trip of one bare commit
//     through the same proxy (the model's delay plus the emulator's own
//     time, which stands in for the service's), and commit-rtts the
//     cycle's p50 in those.
//   - handoff/hold=H: two instances (each its own client and connection)
//     take one id in turn, holding it for H; p50-ns and p99-ns from the
//     holder's Release returning to the other holding the lock;
//     writes/handoff and failed-writes/handoff are the Commit RPCs of both
//     instances (every one a write of the lock's entity) per hand-off,
//     counted at the wire from the first Release to the last (excluded),
//     except each instance's first failed Insert (its first try, before it
//     has seen the lock held), reported as first-contact-failures/op.
func BenchmarkDistance(b *testing.B) {
	for _, m := range distanceModels {
		b.Run("net="+m.Name+"/cycle", func(b *testing.B) {
			e := emulator(b)
			proxy := netdelay.Start(b, e.Host, m.Datastore, m.Datastore)
			var cnt rpcCounter
			var wc commitCounter
			c := newClient(b, distanceBackend(b, e, proxy, &cnt, &wc), locking.Config{})
			raw := rawDatastore(b, proxy)
			ctx := b.Context()
			const cycles = 50
			var lat, commitLat []time.Duration
			var rpcs int64
			for b.Loop() {
				for range cycles {
					// One bare commit through the same proxy: the round
					// trip of one write, the model's delay plus the
					// emulator's own time.
					start := time.Now()
					if _, err := raw.Commit(ctx, bareInsert(e.ProjectID)); err != nil {
						b.Fatal(err)
					}
					commitLat = append(commitLat, time.Since(start))
					id := uniq("cycle")
					cnt.take()
					start = time.Now()
					l, err := c.Acquire(ctx, id)
					if err != nil {
						b.Fatal(err)
					}
					if err := l.Release(ctx); err != nil {
						b.Fatal(err)
					}
					lat = append(lat, time.Since(start))
					n, _ := cnt.take()
					rpcs += n
				}
			}
			p50 := percentile(lat, 50)
			b.ReportMetric(float64(p50), "p50-ns")
			b.ReportMetric(float64(percentile(lat, 90)), "p90-ns")
			b.ReportMetric(float64(rpcs)/float64(len(lat)), "rpcs/op")
			b.ReportMetric(float64(m.RTT()), "rtt-ns")
			if m.RTT() > 0 {
				b.ReportMetric(float64(p50)/float64(m.RTT()), "rtts")
			}
			commitP50 := percentile(commitLat, 50)
			b.ReportMetric(float64(commitP50), "commit-p50-ns")
			b.ReportMetric(float64(p50)/float64(commitP50), "commit-rtts")
			b.Logf("%s: %d cycles", m, len(lat))
		})
		for _, hold := range []time.Duration{50 * time.Millisecond, 500 * time.Millisecond} {
			b.Run(fmt.Sprintf("net=%s/handoff/hold=%v", m.Name, hold), func(b *testing.B) {
				e := emulator(b)
				proxy := netdelay.Start(b, e.Host, m.Datastore, m.Datastore)
				var cnt rpcCounter
				var wc [2]commitCounter
				owners := []locker{
					newOurs(distanceBackend(b, e, proxy, &cnt, &wc[0]), backoffConfig()),
					newOurs(distanceBackend(b, e, proxy, &cnt, &wc[1]), backoffConfig()),
				}
				samples := 30
				if hold >= 500*time.Millisecond {
					samples = 12
				}
				var all handoffResult
				var commits, failed, firstContact, loops int64
				var codes []string
				for b.Loop() {
					loops++
					// Writes are counted from the first Release to the
					// last holding's Release, not included: each
					// hand-off's Release and Acquire. (The run then ends
					// and cancels the waiter that was still polling.)
					r, err := runHandoffObserved(b.Context(), owners, uniq("distance"), samples, hold, func(k int) {
						switch k {
						case 0:
							wc[0].reset()
							wc[1].reset()
						case samples:
							for i := range wc {
								commits += wc[i].commits.Load()
								failed += wc[i].failed.Load()
								firstContact += wc[i].firstContact.Load()
								wc[i].firstContact.Store(0) // a new id next loop
								wc[i].mu.Lock()
								codes = append(codes, wc[i].codes...)
								wc[i].mu.Unlock()
							}
						}
					})
					if err != nil {
						b.Fatal(err)
					}
					all.fromEnd = append(all.fromEnd, r.fromEnd...)
					all.fromCall = append(all.fromCall, r.fromCall...)
					all.polls += r.polls
					all.elapsed += r.elapsed
				}
				p50 := percentile(all.fromEnd, 50)
				n := float64(len(all.fromEnd))
				b.ReportMetric(float64(p50), "p50-ns")
				b.ReportMetric(float64(percentile(all.fromEnd, 99)), "p99-ns")
				b.ReportMetric(float64(percentile(all.fromCall, 50)), "call-p50-ns")
				b.ReportMetric(float64(commits)/n, "writes/handoff")
				b.ReportMetric(float64(failed)/n, "failed-writes/handoff")
				b.ReportMetric(float64(firstContact)/float64(loops), "first-contact-failures/op")
				b.ReportMetric(float64(all.polls)/all.elapsed.Seconds(), "polls/s")
				b.ReportMetric(float64(m.RTT()), "rtt-ns")
				if m.RTT() > 0 {
					b.ReportMetric(float64(p50)/float64(m.RTT()), "rtts")
				}
				b.ReportMetric(n, "samples")
				if failed > 0 {
					b.Logf("failed writes: %v", codes)
				}
			})
		}
	}
}
