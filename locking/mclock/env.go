package mclock

import (
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/bradfitz/gomemcache/memcache"

	"github.com/taskguard/taskguard/locking"
)

// Environment variables read by FromEnv.
const (
	// EnvServers lists the memcached servers, comma-separated host:port
	// (for Memorystore for Memcached: the discovery endpoint's or the nodes'
	// IP:11211). Setting it makes locking.Default use memcached for Weak
	// locks.
	EnvServers = "MEMCACHE_SERVERS"
	// EnvTimeout is the per-command socket timeout as a Go duration
	// ("500ms"); default DefaultTimeout.
	EnvTimeout = "MEMCACHE_TIMEOUT"
	// EnvPrefix overrides DefaultPrefix.
	EnvPrefix = "MEMCACHE_LOCK_PREFIX"
)

// DefaultTimeout bounds each memcached command of a backend made by
// FromEnv.
const DefaultTimeout = 500 * time.Millisecond

// ErrInvalidEnv is returned (wrapped) by FromEnv when the environment names
// memcached but a value is malformed.
var ErrInvalidEnv = locking.NewInvalid("mclock: invalid environment")

func init() {
	locking.RegisterProvider(locking.Weak, "memcached", FromEnv)
}

// FromEnv builds a Backend from MEMCACHE_SERVERS, MEMCACHE_TIMEOUT and
// MEMCACHE_LOCK_PREFIX. It reports ok false when MEMCACHE_SERVERS is unset
// or empty, and an error wrapping ErrInvalidEnv when a value is malformed.
// It does no network I/O: host names are resolved on first use. It is
// registered with locking.RegisterProvider for Weak locks, so importing this
// package is enough for locking.Default to use memcached when the
// environment names it.
func FromEnv() (locking.Backend, bool, error) {
	raw := strings.TrimSpace(os.Getenv(EnvServers))
	if raw == "" {
		return nil, false, nil
	}
	var servers []string
	for s := range strings.SplitSeq(raw, ",") {
		s = strings.TrimSpace(s)
		host, port, err := net.SplitHostPort(s)
		if err != nil || host == "" || port == "" {
			return nil, false, fmt.Errorf("%w: %s=%q: %q is not host:port", ErrInvalidEnv, EnvServers, raw, s)
		}
		servers = append(servers, s)
	}
	timeout := DefaultTimeout
	if v := os.Getenv(EnvTimeout); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			return nil, false, fmt.Errorf("%w: %s=%q is not a positive duration", ErrInvalidEnv, EnvTimeout, v)
		}
		timeout = d
	}
	sel := &lazyServers{servers: servers}
	c := memcache.NewFromSelector(sel)
	c.Timeout = timeout
	b, err := New(c, Options{Prefix: os.Getenv(EnvPrefix)})
	if err != nil {
		return nil, false, fmt.Errorf("%w: %s: %w", ErrInvalidEnv, EnvPrefix, err)
	}
	b.servers = sel
	return b, true, nil
}

// lazyServers is a memcache.ServerSelector that resolves its servers on
// first use rather than at construction (memcache.ServerList.SetServers
// looks host names up at once), and retries the lookup until it succeeds.
type lazyServers struct {
	servers []string

	mu   sync.Mutex // guards list and ok
	list memcache.ServerList
	ok   bool
}

func (l *lazyServers) resolved() (*memcache.ServerList, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.ok {
		if err := l.list.SetServers(l.servers...); err != nil {
			return nil, fmt.Errorf("mclock: resolve %s: %w", strings.Join(l.servers, ","), err)
		}
		l.ok = true
	}
	return &l.list, nil
}

// PickServer returns the server for key.
func (l *lazyServers) PickServer(key string) (net.Addr, error) {
	s, err := l.resolved()
	if err != nil {
		return nil, err
	}
	return s.PickServer(key)
}

// Each calls f for every server.
func (l *lazyServers) Each(f func(net.Addr) error) error {
	s, err := l.resolved()
	if err != nil {
		return err
	}
	return s.Each(f)
}
