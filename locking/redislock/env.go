package redislock

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
	"golang.org/x/oauth2"
	"golang.org/x/oauth2/google"

	"github.com/taskguard/taskguard/locking"
)

// Environment variables read by FromEnv. Where two names are given, the
// VALKEY_ one wins.
const (
	// EnvValkeyAddr and EnvRedisAddr name the server: host:port, or a URL
	// redis://[user:password@]host:port[/db] or rediss://... (TLS).
	// Setting either makes locking.Default use this backend for Weak locks.
	EnvValkeyAddr = "VALKEY_ADDR"
	EnvRedisAddr  = "REDIS_ADDR"
	// EnvValkeyPassword and EnvRedisPassword set the AUTH password (for
	// Memorystore: the basic auth token), overriding one in the URL.
	EnvValkeyPassword = "VALKEY_PASSWORD"
	EnvRedisPassword  = "REDIS_PASSWORD"
	// EnvValkeyUsername and EnvRedisUsername set the ACL user name.
	EnvValkeyUsername = "VALKEY_USERNAME"
	EnvRedisUsername  = "REDIS_USERNAME"
	// EnvTLS ("true"/"false") turns TLS on; a rediss:// URL does too.
	EnvTLS = "VALKEY_TLS"
	// EnvTLSCAFile is a PEM file with the CA that signed the server's
	// certificate (Memorystore's server CA); without it the system roots
	// are used.
	EnvTLSCAFile = "VALKEY_TLS_CA_FILE"
	// EnvCluster ("true") uses the cluster protocol: needed for Memorystore
	// for Valkey instances in cluster mode (the default there), whose
	// address is the discovery endpoint.
	EnvCluster = "VALKEY_CLUSTER"
	// EnvIAMAuth ("true") authenticates with a Google OAuth access token of
	// the function's service account instead of a password (Memorystore IAM
	// authentication; the account needs roles/memorystore.dbConnectionUser).
	EnvIAMAuth = "VALKEY_IAM_AUTH"
	// EnvPrefix overrides DefaultPrefix.
	EnvPrefix = "VALKEY_LOCK_PREFIX"
	// EnvTimeout is the dial, read and write timeout of each command as a
	// Go duration ("500ms"); DefaultTimeout when unset. go-redis retries a
	// failed command up to 3 times, so an unreachable server fails a call
	// after about 4 timeouts (and within the call's context).
	EnvTimeout = "VALKEY_TIMEOUT"
)

// DefaultTimeout is the dial, read and write timeout of FromEnv's client
// when VALKEY_TIMEOUT is unset.
const DefaultTimeout = 2 * time.Second

// iamConnLifetime bounds a connection's life under IAM authentication, so
// that connections authenticate again with a fresh token well before the
// one-hour access token expires.
const iamConnLifetime = 30 * time.Minute

// ErrInvalidEnv is returned (wrapped) by FromEnv when the environment names
// a server but a value is malformed.
var ErrInvalidEnv = locking.NewInvalid("redislock: invalid environment")

func init() {
	locking.RegisterProvider(locking.Weak, "valkey", FromEnv)
}

// routeLogs makes go-redis log through slog, once, when FromEnv builds a
// client.
var routeLogs sync.Once

// slogLogger is go-redis's logger as slog lines: go-redis's own messages (a
// dial that failed, a pool that could not connect) come out at WARN through
// slog.Default() as it is at each line, so in the program's format (JSON
// for Cloud Logging) instead of plain text on standard error.
type slogLogger struct{}

func (slogLogger) Printf(ctx context.Context, format string, v ...any) {
	slog.Default().WarnContext(ctx, "redislock: go-redis: "+fmt.Sprintf(format, v...))
}

// FromEnv builds a Backend from the environment variables above. It
// reports ok false when neither VALKEY_ADDR nor REDIS_ADDR is set, and an
// error wrapping ErrInvalidEnv when a value is malformed or the CA file
// cannot be read. It routes go-redis's own log lines to slog (see
// redis.SetLogger: process-wide, for every go-redis client; a program that
// wants its own calls redis.SetLogger after). It does no network I/O: go-redis connects on first use,
// and IAM tokens are fetched when a connection is made. It is registered
// with locking.RegisterProvider for Weak locks, so importing this package is
// enough for locking.Default to use Valkey when the environment names it.
func FromEnv() (locking.Backend, bool, error) {
	addr := envFirst(EnvValkeyAddr, EnvRedisAddr)
	if addr == "" {
		return nil, false, nil
	}
	opts, err := optionsFromEnv(addr)
	if err != nil {
		return nil, false, err
	}
	routeLogs.Do(func() { redis.SetLogger(slogLogger{}) })
	b, err := New(redis.NewUniversalClient(opts), Options{Prefix: os.Getenv(EnvPrefix)})
	if err != nil {
		return nil, false, fmt.Errorf("%w: %s: %w", ErrInvalidEnv, EnvPrefix, err)
	}
	return b, true, nil
}

// optionsFromEnv turns the environment into client options.
func optionsFromEnv(addr string) (*redis.UniversalOptions, error) {
	timeout := DefaultTimeout
	if v := os.Getenv(EnvTimeout); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 || d > locking.MaxLease {
			return nil, fmt.Errorf("%w: %s=%q is not a positive duration of at most %v", ErrInvalidEnv, EnvTimeout, v, locking.MaxLease)
		}
		timeout = d
	}
	o := &redis.UniversalOptions{
		ContextTimeoutEnabled: true,
		DialTimeout:           timeout,
		ReadTimeout:           timeout,
		WriteTimeout:          timeout,
		// Maintenance notifications are a Redis Enterprise feature; asking
		// for them costs a command per connection and a goroutine.
		MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled},
	}
	useTLS := false
	if strings.Contains(addr, "://") {
		u, err := redis.ParseURL(addr)
		if err != nil {
			return nil, fmt.Errorf("%w: server URL: %w", ErrInvalidEnv, err)
		}
		o.Addrs = []string{u.Addr}
		o.Username, o.Password, o.DB = u.Username, u.Password, u.DB
		useTLS = u.TLSConfig != nil
	} else {
		host, port, err := net.SplitHostPort(addr)
		if err != nil || host == "" || port == "" {
			return nil, fmt.Errorf("%w: server address %q is neither host:port nor a redis:// or rediss:// URL", ErrInvalidEnv, addr)
		}
		o.Addrs = []string{addr}
	}
	if v := envFirst(EnvValkeyUsername, EnvRedisUsername); v != "" {
		o.Username = v
	}
	if v := envFirst(EnvValkeyPassword, EnvRedisPassword); v != "" {
		o.Password = v
	}
	for _, f := range []struct {
		name string
		dst  *bool
	}{{EnvTLS, &useTLS}, {EnvCluster, &o.IsClusterMode}} {
		if v := os.Getenv(f.name); v != "" {
			b, err := strconv.ParseBool(v)
			if err != nil {
				return nil, fmt.Errorf("%w: %s=%q is not a boolean", ErrInvalidEnv, f.name, v)
			}
			*f.dst = b || *f.dst
		}
	}
	if o.IsClusterMode && o.DB != 0 {
		return nil, fmt.Errorf("%w: cluster mode has no database %d", ErrInvalidEnv, o.DB)
	}
	if useTLS {
		host, _, _ := net.SplitHostPort(o.Addrs[0])
		cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: host}
		if f := os.Getenv(EnvTLSCAFile); f != "" {
			pem, err := os.ReadFile(f)
			if err != nil {
				return nil, fmt.Errorf("%w: %s: %w", ErrInvalidEnv, EnvTLSCAFile, err)
			}
			cfg.RootCAs = x509.NewCertPool()
			if !cfg.RootCAs.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("%w: %s=%q holds no PEM certificate", ErrInvalidEnv, EnvTLSCAFile, f)
			}
		}
		o.TLSConfig = cfg
	}
	if v := os.Getenv(EnvIAMAuth); v != "" {
		iam, err := strconv.ParseBool(v)
		if err != nil {
			return nil, fmt.Errorf("%w: %s=%q is not a boolean", ErrInvalidEnv, EnvIAMAuth, v)
		}
		if iam {
			if o.Password != "" {
				return nil, fmt.Errorf("%w: %s and a password are both set", ErrInvalidEnv, EnvIAMAuth)
			}
			o.CredentialsProviderContext = (&iamCredentials{}).credentials
			o.ConnMaxLifetime = iamConnLifetime
		}
	}
	return o, nil
}

// iamCredentials supplies a Google OAuth access token as the AUTH password,
// creating the token source on first use (finding credentials may query the
// metadata server, which FromEnv must not do).
type iamCredentials struct {
	mu  sync.Mutex         // guards src
	src oauth2.TokenSource // caches and refreshes the token
}

func (c *iamCredentials) credentials(ctx context.Context) (string, string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.src == nil {
		src, err := google.DefaultTokenSource(ctx, "https://www.googleapis.com/auth/cloud-platform")
		if err != nil {
			return "", "", fmt.Errorf("redislock: IAM credentials: %w", err)
		}
		c.src = oauth2.ReuseTokenSource(nil, src)
	}
	tok, err := c.src.Token()
	if err != nil {
		return "", "", fmt.Errorf("redislock: IAM access token: %w", err)
	}
	return "", tok.AccessToken, nil
}

func envFirst(names ...string) string {
	for _, n := range names {
		if v := strings.TrimSpace(os.Getenv(n)); v != "" {
			return v
		}
	}
	return ""
}
