package memlock_test

import (
	"testing"

	"github.com/taskguard/taskguard/locking"
	"github.com/taskguard/taskguard/locking/lockingtest"
	"github.com/taskguard/taskguard/locking/memlock"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestConformance(t *testing.T) {
	b := memlock.New() // one store; every "instance" shares it, as processes share a real store
	lockingtest.Run(t, func(*testing.T) locking.Backend { return b }, lockingtest.Options{})
}
