package redislock

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/redislock/redistest"
)

func TestFromEnv(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	writeCA(t, ca)
	notPEM := filepath.Join(dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	type want struct {
		addr, user, pass string
		db               int
		tls, cluster     bool
		iam, roots       bool
		timeout          time.Duration // 0: DefaultTimeout
	}
	for _, tc := range []struct {
		name    string
		env     map[string]string
		ok      bool
		invalid bool
		want    want
	}{
		{name: "unset"},
		{name: "host:port", env: map[string]string{EnvValkeyAddr: "10.0.0.5:6379"}, ok: true,
			want: want{addr: "10.0.0.5:6379"}},
		{name: "REDIS_ADDR", env: map[string]string{EnvRedisAddr: "10.0.0.5:6379", EnvRedisPassword: "pw"}, ok: true,
			want: want{addr: "10.0.0.5:6379", pass: "pw"}},
		{name: "VALKEY_ wins", env: map[string]string{EnvValkeyAddr: "10.0.0.6:6379", EnvRedisAddr: "10.0.0.5:6379"}, ok: true,
			want: want{addr: "10.0.0.6:6379"}},
		{name: "URL", env: map[string]string{EnvValkeyAddr: "redis://u:p@10.0.0.5:6380/2"}, ok: true,
			want: want{addr: "10.0.0.5:6380", user: "u", pass: "p", db: 2}},
		{name: "password overrides URL", env: map[string]string{EnvValkeyAddr: "redis://u:p@10.0.0.5:6380", EnvValkeyPassword: "q"}, ok: true,
			want: want{addr: "10.0.0.5:6380", user: "u", pass: "q"}},
		{name: "rediss URL", env: map[string]string{EnvValkeyAddr: "rediss://10.0.0.5:6378"}, ok: true,
			want: want{addr: "10.0.0.5:6378", tls: true}},
		{name: "TLS with CA, cluster", env: map[string]string{EnvValkeyAddr: "10.0.0.5:6378", EnvTLS: "true", EnvTLSCAFile: ca, EnvCluster: "true"}, ok: true,
			want: want{addr: "10.0.0.5:6378", tls: true, roots: true, cluster: true}},
		{name: "IAM", env: map[string]string{EnvValkeyAddr: "10.0.0.5:6378", EnvTLS: "1", EnvIAMAuth: "true"}, ok: true,
			want: want{addr: "10.0.0.5:6378", tls: true, iam: true}},
		{name: "IAM and password", env: map[string]string{EnvValkeyAddr: "10.0.0.5:6378", EnvIAMAuth: "true", EnvValkeyPassword: "pw"}, invalid: true},
		{name: "no port", env: map[string]string{EnvValkeyAddr: "10.0.0.5"}, invalid: true},
		{name: "bad URL", env: map[string]string{EnvValkeyAddr: "http://10.0.0.5:6379"}, invalid: true},
		{name: "bad TLS flag", env: map[string]string{EnvValkeyAddr: "10.0.0.5:6379", EnvTLS: "yes please"}, invalid: true},
		{name: "bad cluster flag", env: map[string]string{EnvValkeyAddr: "10.0.0.5:6379", EnvCluster: "maybe"}, invalid: true},
		{name: "bad IAM flag", env: map[string]string{EnvValkeyAddr: "10.0.0.5:6379", EnvIAMAuth: "sure"}, invalid: true},
		{name: "missing CA file", env: map[string]string{EnvValkeyAddr: "10.0.0.5:6379", EnvTLS: "true", EnvTLSCAFile: filepath.Join(dir, "nope.pem")}, invalid: true},
		{name: "CA file without PEM", env: map[string]string{EnvValkeyAddr: "10.0.0.5:6379", EnvTLS: "true", EnvTLSCAFile: notPEM}, invalid: true},
		{name: "cluster with db", env: map[string]string{EnvValkeyAddr: "redis://10.0.0.5:6379/3", EnvCluster: "true"}, invalid: true},
		{name: "bad prefix", env: map[string]string{EnvValkeyAddr: "10.0.0.5:6379", EnvPrefix: "a{b"}, invalid: true},
		{name: "timeout", env: map[string]string{EnvValkeyAddr: "10.0.0.5:6379", EnvTimeout: "250ms"}, ok: true,
			want: want{addr: "10.0.0.5:6379", timeout: 250 * time.Millisecond}},
		{name: "bad timeout", env: map[string]string{EnvValkeyAddr: "10.0.0.5:6379", EnvTimeout: "soon"}, invalid: true},
		{name: "zero timeout", env: map[string]string{EnvValkeyAddr: "10.0.0.5:6379", EnvTimeout: "0s"}, invalid: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, k := range []string{EnvValkeyAddr, EnvRedisAddr, EnvValkeyPassword, EnvRedisPassword, EnvValkeyUsername,
				EnvRedisUsername, EnvTLS, EnvTLSCAFile, EnvCluster, EnvIAMAuth, EnvPrefix, EnvTimeout} {
				t.Setenv(k, tc.env[k])
			}
			b, ok, err := FromEnv()
			if ok != tc.ok || (err != nil) != tc.invalid || (b != nil) != tc.ok {
				t.Fatalf("FromEnv = %v, %v, %v; want ok=%v, error=%v", b, ok, err, tc.ok, tc.invalid)
			}
			if tc.invalid && !errors.Is(err, ErrInvalidEnv) {
				t.Errorf("error %v is not ErrInvalidEnv", err)
			}
			if !ok {
				return
			}
			if c, ok := b.(*Backend).c.(interface{ Close() error }); ok {
				t.Cleanup(func() { _ = c.Close() })
			}
			o, err := optionsFromEnv(envFirst(EnvValkeyAddr, EnvRedisAddr))
			if err != nil {
				t.Fatal(err)
			}
			got := want{
				addr: o.Addrs[0], user: o.Username, pass: o.Password, db: o.DB,
				tls: o.TLSConfig != nil, cluster: o.IsClusterMode,
				iam:   o.CredentialsProviderContext != nil,
				roots: o.TLSConfig != nil && o.TLSConfig.RootCAs != nil,
			}
			if tc.want.timeout == 0 {
				tc.want.timeout = DefaultTimeout
			}
			got.timeout = o.ReadTimeout
			if o.DialTimeout != o.ReadTimeout || o.WriteTimeout != o.ReadTimeout {
				t.Errorf("timeouts dial %v, read %v, write %v; want one value", o.DialTimeout, o.ReadTimeout, o.WriteTimeout)
			}
			if got != tc.want {
				t.Errorf("options = %+v, want %+v", got, tc.want)
			}
			if got.tls && o.TLSConfig.ServerName != "10.0.0.5" && o.TLSConfig.ServerName != "10.0.0.6" {
				t.Errorf("TLS ServerName = %q", o.TLSConfig.ServerName)
			}
			if _, isCluster := b.(*Backend).c.(*redis.ClusterClient); isCluster != tc.want.cluster {
				t.Errorf("client %T, want cluster=%v", b.(*Backend).c, tc.want.cluster)
			}
		})
	}
}

// writeCA writes a self-signed CA certificate in PEM to path.
func writeCA(t *testing.T, path string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestFromEnvTLS connects through FromEnv to a real server that, like
// Memorystore with in-transit encryption and AUTH, takes only TLS and a
// password.
func TestFromEnvTLS(t *testing.T) {
	srv := redistest.StartTLS(t)
	for _, tc := range []struct {
		name string
		env  map[string]string
		ok   bool
	}{
		{"TLS, CA and password", map[string]string{EnvValkeyAddr: srv.Addr, EnvTLS: "true", EnvTLSCAFile: srv.CAFile, EnvValkeyPassword: srv.Password}, true},
		{"rediss URL with password", map[string]string{EnvValkeyAddr: "rediss://:" + srv.Password + "@" + srv.Addr, EnvTLSCAFile: srv.CAFile}, true},
		{"wrong password", map[string]string{EnvValkeyAddr: srv.Addr, EnvTLS: "true", EnvTLSCAFile: srv.CAFile, EnvValkeyPassword: "nope"}, false},
		{"unknown CA", map[string]string{EnvValkeyAddr: srv.Addr, EnvTLS: "true", EnvValkeyPassword: srv.Password}, false},
		{"no TLS", map[string]string{EnvValkeyAddr: srv.Addr, EnvValkeyPassword: srv.Password}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, k := range []string{EnvValkeyAddr, EnvRedisAddr, EnvValkeyPassword, EnvRedisPassword, EnvValkeyUsername,
				EnvRedisUsername, EnvTLS, EnvTLSCAFile, EnvCluster, EnvIAMAuth, EnvPrefix} {
				t.Setenv(k, tc.env[k])
			}
			lb, ok, err := FromEnv()
			if err != nil || !ok {
				t.Fatalf("FromEnv = %v, %v", ok, err)
			}
			b := lb.(*Backend)
			t.Cleanup(func() { _ = b.c.(io.Closer).Close() })
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
			defer cancel()
			g, err := b.Acquire(ctx, locking.Request{ID: "tls", Owner: tc.name, Lease: time.Second})
			if tc.ok && (err != nil || !g.Acquired) {
				t.Fatalf("Acquire = %+v, %v", g, err)
			}
			if !tc.ok && err == nil {
				t.Fatalf("Acquire = %+v without error", g)
			}
			if tc.ok {
				if err := b.Release(ctx, "tls", tc.name); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

// TestFromEnvCluster connects through FromEnv to a real server in cluster
// mode, as Memorystore for Valkey runs by default.
func TestFromEnvCluster(t *testing.T) {
	srv := redistest.StartCluster(t)
	for _, k := range []string{EnvValkeyAddr, EnvRedisAddr, EnvValkeyPassword, EnvRedisPassword, EnvValkeyUsername,
		EnvRedisUsername, EnvTLS, EnvTLSCAFile, EnvCluster, EnvIAMAuth, EnvPrefix} {
		t.Setenv(k, "")
	}
	t.Setenv(EnvValkeyAddr, srv.Addr)
	t.Setenv(EnvCluster, "true")
	lb, ok, err := FromEnv()
	if err != nil || !ok {
		t.Fatalf("FromEnv = %v, %v", ok, err)
	}
	b := lb.(*Backend)
	t.Cleanup(func() { _ = b.c.(io.Closer).Close() })
	if _, isCluster := b.c.(*redis.ClusterClient); !isCluster {
		t.Fatalf("client %T, want *redis.ClusterClient", b.c)
	}
	ctx := t.Context()
	r := locking.Request{ID: "cluster", Owner: "a", Lease: time.Second}
	if g, err := b.Acquire(ctx, r); err != nil || !g.Acquired {
		t.Fatalf("Acquire = %+v, %v", g, err)
	}
	if _, err := b.Renew(ctx, r); err != nil {
		t.Fatalf("Renew: %v", err)
	}
	if err := b.Release(ctx, r.ID, r.Owner); err != nil {
		t.Fatalf("Release: %v", err)
	}
}

// TestFromEnvUnreachable: with VALKEY_TIMEOUT a call to a server that does
// not answer fails within a few timeouts (with the 2 s default it takes
// seconds), and go-redis's own lines go through slog (in the program's
// format), not to standard error.
func TestFromEnvUnreachable(t *testing.T) {
	// A server that accepts connections and never answers.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns sync.WaitGroup
	conns.Go(func() {
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	})
	t.Cleanup(func() {
		ln.Close()
		conns.Wait()
	})
	addr := ln.Addr().String()
	prev := slog.Default()
	t.Cleanup(func() { slog.SetDefault(prev) })
	var logs bytes.Buffer
	var mu sync.Mutex
	slog.SetDefault(slog.New(slog.NewJSONHandler(writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		return logs.Write(p)
	}), nil)))
	for _, k := range []string{EnvRedisAddr, EnvValkeyPassword, EnvRedisPassword, EnvValkeyUsername, EnvRedisUsername,
		EnvTLS, EnvTLSCAFile, EnvCluster, EnvIAMAuth, EnvPrefix} {
		t.Setenv(k, "")
	}
	t.Setenv(EnvValkeyAddr, addr)
	t.Setenv(EnvTimeout, "100ms")
	b, ok, err := FromEnv()
	if !ok || err != nil {
		t.Fatalf("FromEnv = %v, %v", ok, err)
	}
	t.Cleanup(func() { _ = b.(*Backend).c.(io.Closer).Close() })
	start := time.Now()
	_, err = b.Acquire(t.Context(), locking.Request{ID: "x", Owner: "o", Lease: time.Second})
	took := time.Since(start)
	if err == nil {
		t.Fatal("Acquire on an unreachable server succeeded")
	}
	if took > time.Second {
		t.Errorf("Acquire failed after %v with VALKEY_TIMEOUT=100ms; want well under 1 s", took)
	}

	// Nothing listens at closed: go-redis logs its failed dials.
	cl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := cl.Addr().String()
	cl.Close()
	t.Setenv(EnvValkeyAddr, closed)
	b2, ok, err := FromEnv()
	if !ok || err != nil {
		t.Fatalf("FromEnv = %v, %v", ok, err)
	}
	t.Cleanup(func() { _ = b2.(*Backend).c.(io.Closer).Close() })
	if _, err := b2.Acquire(t.Context(), locking.Request{ID: "x", Owner: "o", Lease: time.Second}); err == nil {
		t.Fatal("Acquire with nothing listening succeeded")
	}
	mu.Lock()
	got := logs.String()
	mu.Unlock()
	if !strings.Contains(got, `"msg":"redislock: go-redis:`) {
		t.Errorf("go-redis's lines did not go through slog; slog got %q", got)
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
