package locking

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
)

// EnvAllowMemory is the environment variable that lets Strong locks fall
// back to the in-memory backend where the environment says production (see
// ErrNoStrongBackend). Its value is a boolean as strconv.ParseBool reads it
// ("1", "true", ...); any other non-empty value is an error wrapping
// ErrInvalid.
const EnvAllowMemory = "TASKGUARD_ALLOW_MEMORY"

// productionEnv lists the variables the platform sets on every instance in
// production: Cloud Run services and functions (K_SERVICE, K_REVISION),
// Cloud Run jobs (CLOUD_RUN_JOB) and App Engine (GAE_SERVICE). Any of them
// set means that other instances may run the same code, so an in-memory
// lock would exclude nothing. FUNCTION_TARGET alone is not one of them: the
// Functions Framework's documented local run sets it too, and the platform
// sets K_SERVICE beside it.
var productionEnv = []string{"K_SERVICE", "K_REVISION", "CLOUD_RUN_JOB", "GAE_SERVICE"}

// ErrNoStrongBackend reports that the environment says production but names
// no Strong backend, and the program did not opt in to in-memory locks: a
// Strong lock taken there would exclude nothing across instances. The error
// wrapping it names the fix. FromEnvironment returns it; the Default client
// fails every lock call with it.
// It wraps ErrInvalid: the deployment is misconfigured.
var ErrNoStrongBackend = NewInvalid("locking: no Strong lock backend in production")

// memoryStore is the process-wide in-memory store: every client that falls
// back to memory in this process (Default, FromEnvironment) shares it, so
// that two such clients exclude each other as one would.
var memoryStore = sync.OnceValue(newMemory)

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
// with a zero Config, and then kept: every part of a process (the program's
// own code, a tasks.Worker, taskguard's functions) that takes its locks from
// Default shares one client. If the environment is invalid, or says
// production with no Strong backend (ErrNoStrongBackend), every lock call on
// the default client fails with that error (see Client.Err) rather than
// silently using another store.
func Default() *Client {
	defaultMu.Lock()
	defer defaultMu.Unlock()
	if defClient == nil {
		c, err := fromEnvironment(Config{})
		if err != nil {
			slog.Error("locking: the default client cannot take locks; every lock call will fail", "error", err)
			c = &Client{err: err}
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
// Strong backend:
//
//   - where the environment says production (K_SERVICE, K_REVISION,
//     CLOUD_RUN_JOB or GAE_SERVICE set), it fails with an error wrapping
//     ErrNoStrongBackend that names the fix — import a Strong backend's
//     package (import _ "github.com/taskguard/taskguard/locking/dslock") and
//     set GOOGLE_CLOUD_PROJECT, or set cfg.Strong —, unless
//     TASKGUARD_ALLOW_MEMORY is true;
//   - otherwise (or so allowed) Strong locks use the in-memory backend,
//     correct within this process only, and it logs a WARN line saying so.
//     Every such client in the process shares one in-memory store, so they
//     exclude each other.
//
// When none names a Weak backend, Weak locks use the Strong backend (a
// stronger lock is always a valid weak one). It logs its choice in one line.
// It fails when a provider reports an invalid environment, and does no
// network I/O.
func FromEnvironment(cfg Config) (*Client, error) {
	defaultMu.Lock()
	defer defaultMu.Unlock()
	return fromEnvironment(cfg)
}

// CheckEnvironment reports whether the environment can configure the
// default client, without building it and without network I/O: it returns
// the error every lock call on a Default client built now would fail with —
// a registered provider's for a store the environment names but gets wrong
// (a malformed MEMCACHE_SERVERS, VALKEY_ADDR, ...), or ErrNoStrongBackend —,
// or nil. The backends the providers build to check are closed again (those
// that are io.Closers). A program can call it at start to report a bad
// deployment in its first log line, before any lock is taken.
func CheckEnvironment() error {
	defaultMu.Lock()
	defer defaultMu.Unlock()
	backends, _, err := fromProviders(Config{})
	for _, b := range backends {
		if c, ok := b.(io.Closer); ok && b != nil {
			_ = c.Close()
		}
	}
	if err != nil {
		return err
	}
	if backends[Strong] == nil {
		if allowed, err := memoryAllowed(); err != nil {
			return err
		} else if !allowed {
			return noStrongBackend()
		}
	}
	return nil
}

// fromProviders returns cfg's backends, completed by the registered
// providers, and the names of their stores. Called with defaultMu held.
func fromProviders(cfg Config) ([2]Backend, [2]string, error) {
	backends := [2]Backend{cfg.Strong, cfg.Weak}
	names := [2]string{"configured", "configured"}
	built := [2]bool{}
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
			backends[p.kind], names[p.kind], built[p.kind] = b, p.name, true
		}
	}
	if len(errs) > 0 {
		// Close what the other providers built: nothing will use it.
		for k, b := range backends {
			if c, ok := b.(io.Closer); ok && built[k] {
				_ = c.Close()
			}
		}
		return [2]Backend{}, names, fmt.Errorf("locking: %w", errors.Join(errs...))
	}
	return backends, names, nil
}

// fromEnvironment is called with defaultMu held.
func fromEnvironment(cfg Config) (*Client, error) {
	backends, names, err := fromProviders(cfg)
	if err != nil {
		return nil, err
	}
	memory := backends[Strong] == nil
	if memory {
		allowed, err := memoryAllowed()
		if err != nil {
			return nil, err
		}
		if !allowed {
			return nil, noStrongBackend()
		}
		backends[Strong], names[Strong] = memoryStore(), "memory (this process only)"
	}
	if backends[Weak] == nil {
		backends[Weak], names[Weak] = backends[Strong], names[Strong]+", shared with strong"
	}
	cfg.Strong, cfg.Weak = backends[Strong], backends[Weak]
	c, err := New(cfg)
	if err != nil {
		return nil, err
	}
	c.logger().Info("locking: client ready", "strong_backend", names[Strong], "weak_backend", names[Weak])
	if memory {
		c.logger().Warn("locking: Strong locks are in this process's memory: they exclude nothing across processes or instances",
			"why", whyMemory(), "fix", fixStrong)
	}
	return c, nil
}

// fixStrong says how to give Strong locks a real backend.
const fixStrong = `import _ "github.com/taskguard/taskguard/locking/dslock" and set GOOGLE_CLOUD_PROJECT (Cloud Run functions gen2 do not set it: --set-env-vars GOOGLE_CLOUD_PROJECT=PROJECT) or DATASTORE_EMULATOR_HOST, or set Config.Strong`

// production returns the first variable of productionEnv that is set, or "".
func production() string {
	for _, v := range productionEnv {
		if os.Getenv(v) != "" {
			return v
		}
	}
	return ""
}

// memoryAllowed reports whether Strong locks may fall back to memory: always
// outside production, and in production when TASKGUARD_ALLOW_MEMORY is true.
func memoryAllowed() (bool, error) {
	allow := false
	if v := os.Getenv(EnvAllowMemory); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return false, invalid("%s=%q is not a boolean (true, false, 1, 0, ...)", EnvAllowMemory, v)
		}
		allow = b
	}
	return allow || production() == "", nil
}

// noStrongBackend is the error for production without a Strong backend. It
// names what the environment lacks.
func noStrongBackend() error {
	v := production()
	return fmt.Errorf("%w: %s=%s says production but %s; in-memory locks would exclude nothing across instances. Fix: %s; or set %s=1 to accept locks that hold within one instance only",
		ErrNoStrongBackend, v, os.Getenv(v), whyMemory(), fixStrong, EnvAllowMemory)
}

// whyMemory says why no Strong backend was found. Called with defaultMu
// held.
func whyMemory() string {
	// The providers' variables are theirs to read (dslock's:
	// GOOGLE_CLOUD_PROJECT, DATASTORE_EMULATOR_HOST); fixStrong names them.
	if names := providerNames(); len(names) > 0 {
		return "no registered Strong provider (" + strings.Join(names, ", ") + ") recognised the environment"
	}
	return "no Strong backend package is imported"
}

// providerNames lists the registered Strong providers. Called with
// defaultMu held.
func providerNames() []string {
	var names []string
	for _, p := range providers {
		if p.kind == Strong {
			names = append(names, p.name)
		}
	}
	return names
}

// Err returns the error every lock call on c fails with: set on the Default
// client when the environment was invalid or said production with no Strong
// backend (errors.Is ErrNoStrongBackend); nil on every other client. Code
// that builds on Default at start can check it to fail fast.
func (c *Client) Err() error { return c.err }

// Acquire acquires the lock id with the default client; see Client.Acquire.
func Acquire(ctx context.Context, id string, opts ...Option) (*Lock, error) {
	return Default().Acquire(ctx, id, opts...)
}

// With runs fn holding the lock id, with the default client; see Client.With.
func With(ctx context.Context, id string, fn func(ctx context.Context) error, opts ...Option) error {
	return Default().With(ctx, id, fn, opts...)
}
