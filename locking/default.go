package locking

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
)

// A Provider builds a backend from the environment for Default. It reports
// ok false, and does nothing else, when the environment does not name its
// store; it returns an error when the environment names it but is invalid.
// It must not do network I/O.
type Provider func() (b Backend, ok bool, err error)

type provider struct {
	kind LockKind
	name string
	p    Provider
}

var (
	defaultMu sync.Mutex
	defClient *Client    // guarded by defaultMu; built on first use
	providers []provider // guarded by defaultMu
)

// RegisterProvider makes a backend available to Default for locks of kind
// k. Backend packages call it from init, so importing one (for example
// `import _ "github.com/taskguard/taskguard/locking/dslock"`) is enough for
// Default to use it when the environment names its store. Providers of one
// kind are asked in the order they registered; the first that reports ok
// wins. Like database/sql.Register, it panics if p is nil or k unknown: that
// is a programming error found at start-up.
func RegisterProvider(k LockKind, name string, p Provider) {
	if p == nil || (k != Strong && k != Weak) {
		panic(fmt.Sprintf("locking: RegisterProvider(%v, %q): nil provider or unknown kind", k, name))
	}
	defaultMu.Lock()
	defer defaultMu.Unlock()
	providers = append(providers, provider{k, name, p})
}

// Default returns the client that the package-level Acquire and With use.
// Unless SetDefault replaced it, it is built on first use by FromEnvironment
// with a zero Config. If a provider reports an invalid environment, every
// call on the default client fails with that error rather than silently
// using another store.
func Default() *Client {
	defaultMu.Lock()
	defer defaultMu.Unlock()
	if defClient == nil {
		c, err := fromEnvironment(Config{})
		if err != nil {
			slog.Error("locking: the environment names a lock backend it cannot configure; every lock call will fail", "error", err)
			c = &Client{err: err, log: slog.Default()}
		}
		defClient = c
	}
	return defClient
}

// SetDefault makes c the client that the package-level functions use. A
// nil c makes Default build its client from the environment again on next
// use.
func SetDefault(c *Client) {
	defaultMu.Lock()
	defer defaultMu.Unlock()
	defClient = c
}

// FromEnvironment returns a client configured by cfg whose missing backends
// come from the registered providers (see RegisterProvider): for each kind
// cfg leaves nil, the first backend the environment names. When none names a
// Strong backend, Strong locks use an in-memory backend, correct within this
// process only; when none names a Weak one, Weak locks use the Strong backend
// (a stronger lock is always a valid weak one). It logs its choice in one
// line. It fails when a provider reports an invalid environment, and does no
// network I/O.
func FromEnvironment(cfg Config) (*Client, error) {
	defaultMu.Lock()
	defer defaultMu.Unlock()
	return fromEnvironment(cfg)
}

// fromEnvironment is called with defaultMu held.
func fromEnvironment(cfg Config) (*Client, error) {
	backends := [2]Backend{cfg.Strong, cfg.Weak}
	names := [2]string{"configured", "configured"}
	var errs []error
	for _, p := range providers {
		if backends[p.kind] != nil {
			continue
		}
		b, ok, err := p.p()
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("%s backend %q: %w", p.kind, p.name, err))
		case ok && b != nil:
			backends[p.kind], names[p.kind] = b, p.name
		}
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("locking: %w", errors.Join(errs...))
	}
	if backends[Strong] == nil {
		backends[Strong], names[Strong] = newMemory(), "memory (this process only)"
	}
	if backends[Weak] == nil {
		backends[Weak], names[Weak] = backends[Strong], names[Strong]+", shared with strong"
	}
	cfg.Strong, cfg.Weak = backends[Strong], backends[Weak]
	c, err := New(cfg)
	if err != nil {
		return nil, err
	}
	c.log.Info("locking: client ready", "strong_backend", names[Strong], "weak_backend", names[Weak])
	return c, nil
}

// Acquire acquires the lock id with the default client; see Client.Acquire.
func Acquire(ctx context.Context, id string, opts ...Option) (*Lock, error) {
	return Default().Acquire(ctx, id, opts...)
}

// With runs fn holding the lock id, with the default client; see Client.With.
func With(ctx context.Context, id string, fn func(ctx context.Context) error, opts ...Option) error {
	return Default().With(ctx, id, fn, opts...)
}
