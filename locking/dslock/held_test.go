package dslock

import (
	"fmt"
	"sync"
	"testing"
)

// TestHoldingsBoundedAndMonotonic checks that the holdings cache stays
// bounded, keeps the newest version under racing writers, and drops an entry
// only when it is still the one the caller saw.
func TestHoldingsBoundedAndMonotonic(t *testing.T) {
	var h holdings
	for i := range 3 * maxHoldings {
		h.put(fmt.Sprint(i), "o", holding{version: int64(i), token: 1})
		if n := len(h.m); n > maxHoldings {
			t.Fatalf("%d entries after %d puts; want at most %d", n, i+1, maxHoldings)
		}
	}

	var wg sync.WaitGroup
	for v := range 64 {
		wg.Go(func() { h.put("x", "o", holding{version: int64(v + 1), token: 7}) })
	}
	wg.Wait()
	if got, ok := h.get("x", "o"); !ok || got.version != 64 {
		t.Fatalf("after racing puts: %+v %v; want version 64", got, ok)
	}
	h.drop("x", "o", holding{version: 3, token: 7})
	if _, ok := h.get("x", "o"); !ok {
		t.Fatal("drop of an older version removed the newer entry")
	}
	if _, ok := h.get("x", "other"); ok {
		t.Fatal("entry found for another owner")
	}
	h.drop("x", "o", holding{})
	if _, ok := h.get("x", "o"); ok {
		t.Fatal("drop of any version left the entry")
	}
}
