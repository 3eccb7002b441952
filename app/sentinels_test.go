package app_test

import (
	"errors"
	"testing"

	"github.com/taskguard/taskguard/app"
	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/dslock"
	"github.com/taskguard/taskguard/locking/mclock"
	"github.com/taskguard/taskguard/locking/redislock"
	"github.com/taskguard/taskguard/tasks"
)

// TestConfigErrorsWrapErrInvalid: every bad-configuration sentinel of the
// module wraps locking.ErrInvalid, so one errors.Is tells a configuration
// to fix from a store that failed; failures of a store do not.
func TestConfigErrorsWrapErrInvalid(t *testing.T) {
	for name, err := range map[string]error{
		"app.ErrConfig":               app.ErrConfig,
		"tasks.ErrInvalidConfig":      tasks.ErrInvalidConfig,
		"tasks.ErrInvalidTask":        tasks.ErrInvalidTask,
		"locking.ErrNoBackend":        locking.ErrNoBackend,
		"locking.ErrNoStrongBackend":  locking.ErrNoStrongBackend,
		"dslock.ErrBadOptions":        dslock.ErrBadOptions,
		"mclock.ErrInvalidOptions":    mclock.ErrInvalidOptions,
		"mclock.ErrInvalidRequest":    mclock.ErrInvalidRequest,
		"mclock.ErrInvalidEnv":        mclock.ErrInvalidEnv,
		"redislock.ErrInvalidOptions": redislock.ErrInvalidOptions,
		"redislock.ErrInvalidRequest": redislock.ErrInvalidRequest,
		"redislock.ErrInvalidEnv":     redislock.ErrInvalidEnv,
	} {
		if !errors.Is(err, locking.ErrInvalid) {
			t.Errorf("%s (%v) does not wrap locking.ErrInvalid", name, err)
		}
	}
	for name, err := range map[string]error{
		"locking.ErrLockLost":   locking.ErrLockLost,
		"locking.ErrNotHeld":    locking.ErrNotHeld,
		"mclock.ErrContended":   mclock.ErrContended,
		"redislock.ErrNoPubSub": redislock.ErrNoPubSub,
		"tasks.ErrDuplicate":    tasks.ErrDuplicate,
	} {
		if errors.Is(err, locking.ErrInvalid) {
			t.Errorf("%s (%v) wraps locking.ErrInvalid; it is not a configuration error", name, err)
		}
	}
	if got := mclock.ErrInvalidOptions.Error(); got != "mclock: invalid options" {
		t.Errorf("mclock.ErrInvalidOptions reads %q; want its own text only", got)
	}
}
