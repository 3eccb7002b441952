package dslock

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	pb "cloud.google.com/go/datastore/apiv1/datastorepb"
	"google.golang.org/api/option"
	gtransport "google.golang.org/api/transport/grpc"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/taskguard/taskguard/locking"
)

// DefaultKind is the entity kind lock records are stored under when
// Options.Kind is empty.
const DefaultKind = "TaskguardLock"

// DefaultClockSkew is the margin added to every lease and StealAfter judged on
// client clocks, used when Options.ClockSkew is zero. It applies only where the
// server returns no read and update times (the legacy Datastore emulator).
const DefaultClockSkew = 2 * time.Second

// DefaultRPCTimeout bounds one attempt of one RPC when Options.RPCTimeout is
// zero. A timed-out attempt is retried inside the caller's context.
const DefaultRPCTimeout = 10 * time.Second

// ScopeDatastore is the OAuth scope the backend asks for when it dials
// Cloud Datastore itself.
const ScopeDatastore = "https://www.googleapis.com/auth/datastore"

const defaultEndpoint = "datastore.googleapis.com:443"

// maxIDBytes is how much of a lock id is stored, for people reading the
// entities; the key is a hash of the whole id.
const maxIDBytes = 1024

// Property names of a lock entity; see the package documentation.
const (
	propID        = "id"
	propOwner     = "owner"
	propExpiresAt = "expiresAt"
	propRenewedAt = "renewedAt"
	propLeaseMs   = "leaseMs"
	propToken     = "token"
	propOrigin    = "origin"
)

// ErrBadOptions is wrapped by New and Cleanup when their options are invalid
// or incomplete. It wraps locking.ErrInvalid.
var ErrBadOptions = fmt.Errorf("dslock: bad options: %w", locking.ErrInvalid)

// ErrMalformed is wrapped by operations that find an entity of the lock kind
// that this package did not write (no owner property).
var ErrMalformed = errors.New("dslock: malformed lock entity")

// Options configure a Backend. The zero value is valid when the environment
// names a project (see New).
type Options struct {
	// ProjectID is the Google Cloud project. When empty, New uses
	// DATASTORE_PROJECT_ID, then GOOGLE_CLOUD_PROJECT.
	ProjectID string
	// DatabaseID names a Firestore-in-Datastore-mode database; empty means
	// the project's default database.
	DatabaseID string
	// Namespace is the Datastore namespace of the lock entities; empty means
	// the default namespace.
	Namespace string
	// Kind is the entity kind of lock records; empty means DefaultKind.
	Kind string
	// ClockSkew is the margin added when leases are judged on client clocks
	// (see the package documentation); zero means DefaultClockSkew.
	// It must not be negative.
	ClockSkew time.Duration
	// RPCTimeout bounds each attempt of each RPC; zero means
	// DefaultRPCTimeout.
	RPCTimeout time.Duration
	// Conn, when set, is the gRPC connection to Datastore (or an emulator).
	// The Backend uses it as is and does not close it. When nil, New dials
	// DATASTORE_EMULATOR_HOST without credentials when that is set, and
	// otherwise Cloud Datastore with application default credentials and
	// ClientOptions.
	Conn grpc.ClientConnInterface
	// ClientOptions are passed to the dialer when New dials Cloud Datastore
	// itself (not for Conn, not for an emulator).
	ClientOptions []option.ClientOption
	// Now is the client clock, used only where the server returns no times;
	// nil means time.Now. Tests set it to simulate skewed machines.
	Now func() time.Time
}

// Backend is a locking.Backend storing one entity per lock id in Cloud
// Datastore (Firestore in Datastore mode). It is safe for concurrent use.
// Close it when done if New dialed the connection.
type Backend struct {
	// dial, when set, makes the connection on first use (Cloud Datastore
	// with credentials, whose lookup may touch the network).
	dial      func(context.Context) (*grpc.ClientConn, error)
	mu        sync.Mutex
	rpc       pb.DatastoreClient // set by New, or by the first call when dial is set; guarded by mu
	closer    *grpc.ClientConn   // connection this Backend made, closed by Close; guarded by mu
	project   string
	database  string
	namespace string
	kind      string
	skew      time.Duration
	timeout   time.Duration
	now       func() time.Time
	md        []string // routing metadata, key-value pairs
	hints     hints
	held      holdings
}

var _ locking.Backend = (*Backend)(nil)

// New returns a Backend configured by opts. It validates opts and does no
// network I/O: connections are made on first use, and credentials for Cloud
// Datastore are looked up then, so New fails only on bad options: with one
// error wrapping ErrBadOptions that names every problem, among them a
// DatabaseID, Namespace or Kind Datastore would refuse (see CheckDatabaseID,
// CheckNamespace and CheckKind).
func New(ctx context.Context, opts Options) (*Backend, error) {
	b := &Backend{
		project:   opts.ProjectID,
		database:  opts.DatabaseID,
		namespace: opts.Namespace,
		kind:      opts.Kind,
		skew:      opts.ClockSkew,
		timeout:   opts.RPCTimeout,
		now:       opts.Now,
	}
	if b.project == "" {
		b.project = os.Getenv("DATASTORE_PROJECT_ID")
	}
	if b.project == "" {
		b.project = os.Getenv("GOOGLE_CLOUD_PROJECT")
	}
	if b.project == "" {
		return nil, fmt.Errorf("%w: no project id (set Options.ProjectID, DATASTORE_PROJECT_ID or GOOGLE_CLOUD_PROJECT)", ErrBadOptions)
	}
	if b.kind == "" {
		b.kind = DefaultKind
	}
	// Every problem at once: a deployment fixes them in one go.
	errs := []error{checkNames(b.database, b.namespace, b.kind)}
	if b.skew < 0 || b.timeout < 0 {
		errs = append(errs, fmt.Errorf("%w: negative ClockSkew or RPCTimeout", ErrBadOptions))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if b.skew == 0 {
		b.skew = DefaultClockSkew
	}
	if b.timeout == 0 {
		b.timeout = DefaultRPCTimeout
	}
	if b.now == nil {
		b.now = time.Now
	}
	prefix := "projects/" + url.QueryEscape(b.project)
	params := "project_id=" + url.QueryEscape(b.project)
	if b.database != "" {
		prefix += "/databases/" + url.QueryEscape(b.database)
		params += "&database_id=" + url.QueryEscape(b.database)
	}
	b.md = []string{"google-cloud-resource-prefix", prefix, "x-goog-request-params", params}

	switch host := os.Getenv("DATASTORE_EMULATOR_HOST"); {
	case opts.Conn != nil:
		b.rpc = pb.NewDatastoreClient(opts.Conn)
	case host != "":
		host = strings.TrimPrefix(strings.TrimPrefix(host, "http://"), "https://")
		cc, err := grpc.NewClient("passthrough:///"+host, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return nil, fmt.Errorf("dslock: dialing the emulator at %s: %w", host, err)
		}
		b.closer, b.rpc = cc, pb.NewDatastoreClient(cc)
	default:
		o := append([]option.ClientOption{
			option.WithEndpoint(defaultEndpoint),
			option.WithScopes(ScopeDatastore),
		}, opts.ClientOptions...)
		b.dial = func(ctx context.Context) (*grpc.ClientConn, error) { return gtransport.Dial(ctx, o...) }
	}
	return b, nil
}

// client returns the Datastore client, dialing on first use when needed.
func (b *Backend) client(ctx context.Context) (pb.DatastoreClient, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.rpc == nil {
		if b.dial == nil {
			return nil, errClosed
		}
		cc, err := b.dial(ctx)
		if err != nil {
			return nil, fmt.Errorf("dslock: dialing datastore: %w", err)
		}
		b.closer, b.rpc = cc, pb.NewDatastoreClient(cc)
	}
	return b.rpc, nil
}

// errClosed is returned by calls on a closed Backend.
var errClosed = errors.New("dslock: backend closed")

// Close closes the connection the Backend made; it does not close
// Options.Conn. Calls after Close fail.
func (b *Backend) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.rpc, b.dial = nil, nil
	if b.closer == nil {
		return nil
	}
	cc := b.closer
	b.closer = nil
	return cc.Close()
}

// Kind reports the entity kind the Backend stores locks under.
func (b *Backend) Kind() string { return b.kind }

// KeyName returns the Datastore key name of the entity for lock id: the
// lower-case hex SHA-256 of the id.
func KeyName(id string) string {
	sum := sha256.Sum256([]byte(id))
	return hex.EncodeToString(sum[:])
}

func (b *Backend) key(id string) *pb.Key {
	return b.keyNamed(KeyName(id))
}

func (b *Backend) keyNamed(name string) *pb.Key {
	return &pb.Key{
		PartitionId: &pb.PartitionId{ProjectId: b.project, DatabaseId: b.database, NamespaceId: b.namespace},
		Path:        []*pb.Key_PathElement{{Kind: b.kind, IdType: &pb.Key_PathElement_Name{Name: name}}},
	}
}

// record is the decoded content of one lock entity plus what the server
// said about it.
type record struct {
	owner     string
	renewedAt time.Time     // writer's clock at the last acquire or renew
	lease     time.Duration // lease granted by the last acquire or renew
	token     uint64        // fencing token, written by renewals; 0 before the first
	origin    uint64        // token of the holding whose Insert created the entity; 0 when not stored
	version   int64         // entity version on the server
	updated   time.Time     // server time of the last write; zero when the server gives none
}

// fencing returns the token of the current holding: the version of the
// acquiring write until the first renewal copies it into the entity.
func (r record) fencing() uint64 {
	if r.token != 0 {
		return r.token
	}
	return uint64(r.version)
}

// incarnation names the life of the entity from the Insert that created it to
// its deletion: the token of that Insert's holding. Takeovers and renewals
// keep it (they store it as the origin property); a delete ends it, and the
// next Insert starts one with a higher version. So an entity found with the
// incarnation of a holding has not been deleted since that holding wrote it.
// An entity without the property (written before it existed, or by an Insert
// not yet renewed) is taken to be its holding's own incarnation.
func (r record) incarnation() uint64 {
	if r.origin != 0 {
		return r.origin
	}
	return r.fencing()
}

// entity builds the entity written by an acquire (token 0) or a renewal
// (token of the holding), without an origin.
func (b *Backend) entity(k *pb.Key, id, owner string, lease time.Duration, token uint64) *pb.Entity {
	return b.entityOf(k, id, owner, lease, token, 0)
}

// entityOf builds the entity written by an acquire (token 0) or a renewal
// (token of the holding) of the incarnation origin (0: an Insert's own).
func (b *Backend) entityOf(k *pb.Key, id, owner string, lease time.Duration, token, origin uint64) *pb.Entity {
	now := b.now()
	props := map[string]*pb.Value{
		propID:        {ValueType: &pb.Value_StringValue{StringValue: readable(id)}, ExcludeFromIndexes: true},
		propOwner:     {ValueType: &pb.Value_StringValue{StringValue: owner}, ExcludeFromIndexes: true},
		propExpiresAt: {ValueType: &pb.Value_TimestampValue{TimestampValue: timestamppb.New(now.Add(lease))}, ExcludeFromIndexes: true},
		propRenewedAt: {ValueType: &pb.Value_TimestampValue{TimestampValue: timestamppb.New(now)}, ExcludeFromIndexes: true},
		propLeaseMs:   {ValueType: &pb.Value_IntegerValue{IntegerValue: leaseMillis(lease)}, ExcludeFromIndexes: true},
	}
	if token != 0 {
		props[propToken] = &pb.Value{ValueType: &pb.Value_IntegerValue{IntegerValue: int64(token)}, ExcludeFromIndexes: true}
	}
	if origin != 0 {
		props[propOrigin] = &pb.Value{ValueType: &pb.Value_IntegerValue{IntegerValue: int64(origin)}, ExcludeFromIndexes: true}
	}
	return &pb.Entity{Key: k, Properties: props}
}

// leaseMillis rounds a lease up to whole milliseconds, so a stored lease is
// never shorter than the granted one (1 ns is stored as 1 ms, never 0). It
// cannot overflow, even for math.MaxInt64.
func leaseMillis(d time.Duration) int64 {
	ms := d / time.Millisecond
	if d%time.Millisecond > 0 {
		ms++
	}
	return int64(ms)
}

// millisLease is the inverse of leaseMillis: a stored lease below zero is
// zero (expired), and one beyond what a Duration holds is the longest
// Duration, never a wrapped-around negative one.
func millisLease(ms int64) time.Duration {
	switch {
	case ms <= 0:
		return 0
	case ms > int64(math.MaxInt64/time.Millisecond):
		return math.MaxInt64
	}
	return time.Duration(ms) * time.Millisecond
}

func decode(er *pb.EntityResult) (record, error) {
	p := er.GetEntity().GetProperties()
	r := record{
		owner:   p[propOwner].GetStringValue(),
		lease:   millisLease(p[propLeaseMs].GetIntegerValue()),
		token:   uint64(p[propToken].GetIntegerValue()),
		origin:  uint64(p[propOrigin].GetIntegerValue()),
		version: er.GetVersion(),
		updated: serverTime(er.GetUpdateTime()),
	}
	if ts := p[propRenewedAt].GetTimestampValue(); ts != nil {
		r.renewedAt = ts.AsTime()
	}
	if r.owner == "" {
		return r, ErrMalformed
	}
	return r, nil
}

// serverTime converts a server timestamp, mapping the Unix epoch (what the
// legacy emulator returns for "no time") to the zero time.
func serverTime(ts *timestamppb.Timestamp) time.Time {
	if ts == nil || (ts.GetSeconds() == 0 && ts.GetNanos() == 0) {
		return time.Time{}
	}
	return ts.AsTime()
}

// readable returns the id as stored for people to read: invalid UTF-8
// replaced (Datastore strings must be UTF-8; the key hashes the raw bytes),
// cut to maxIDBytes on a rune boundary.
func readable(id string) string {
	s := strings.ToValidUTF8(id, "\uFFFD")
	if len(s) <= maxIDBytes {
		return s
	}
	s = s[:maxIDBytes]
	for len(s) > 0 && !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s
}

// outgoing adds the routing headers production needs for named databases.
func (b *Backend) outgoing(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, b.md...)
}
