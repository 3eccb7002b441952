package app

import (
	"io"
	"testing"

	"github.com/taskguard/taskguard/locking"
)

// freshDefault makes the process's default lock client be built again, from
// the test's environment, on its next use, and closes it after the test.
func freshDefault(t *testing.T) {
	t.Helper()
	locking.SetDefault(nil)
	t.Cleanup(func() {
		c := locking.Default()
		locking.SetDefault(nil)
		if cl, ok := c.Backend(locking.Strong).(io.Closer); ok {
			_ = cl.Close()
		}
	})
}
