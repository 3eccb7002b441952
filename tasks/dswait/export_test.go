package dswait

import "time"

// SetClock sets the clock l judges retention and wakes by.
func SetClock(l *List, now func() time.Time) { l.now = now }
