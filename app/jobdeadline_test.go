package app

import (
	"testing"
	"time"
)

func TestJobDeadlineBelowTheDispatchDeadline(t *testing.T) {
	for _, c := range []struct{ dispatch, want time.Duration }{
		{30 * time.Minute, 27 * time.Minute},
		{300 * time.Second, 270 * time.Second},
		{15 * time.Second, 10 * time.Second},
		{5 * time.Second, time.Second},
	} {
		if got := JobDeadline(c.dispatch); got != c.want {
			t.Errorf("JobDeadline(%v) = %v, want %v", c.dispatch, got, c.want)
		}
	}
}
