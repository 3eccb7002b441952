package oauthdemo

import (
	"context"
	"errors"
	"net/http/httptest"
	"net/url"
	"testing"
	"time"
)

// TestUnguardedRefreshesCollide shows the problem the lock solves: a
// second refresh that read the token before the first one stored its new
// pair reuses a spent refresh token and fails with ErrInvalidGrant.
func TestUnguardedRefreshesCollide(t *testing.T) {
	ep := NewEndpoint()
	srv := httptest.NewServer(ep)
	defer srv.Close()
	store := NewStore()
	r := &Refresher{URL: srv.URL, Store: store}
	refreshed, err := r.Refresh(t.Context(), "42", 1) // signs in, then refreshes the expired pair
	if err != nil || !refreshed {
		t.Fatalf("first refresh = %v, %v; want a refresh", refreshed, err)
	}
	if refreshed, err := r.Refresh(t.Context(), "42", 2); err != nil || refreshed {
		t.Fatalf("refresh of a fresh token = %v, %v; want it left alone", refreshed, err)
	}
	if ep.CallCount() != 1 {
		t.Fatalf("endpoint refreshes = %d; want 1", ep.CallCount())
	}

	// Replay what an unguarded second instance does: it read the pair the
	// first instance had just spent.
	spent := &Refresher{URL: srv.URL, Store: NewStore()}
	cur, _ := store.Get("42")
	stale := cur
	stale.Expires = time.Now().Add(-time.Second)
	if _, err := r.post(t.Context(), url.Values{"grant_type": {"refresh_token"}, "refresh_token": {cur.Refresh}}); err != nil {
		t.Fatal(err)
	}
	if err := spent.Store.Put("42", stale, 3); err != nil {
		t.Fatal(err)
	}
	if _, err := spent.Refresh(context.Background(), "42", 3); !errors.Is(err, ErrInvalidGrant) {
		t.Fatalf("refresh with a spent refresh token = %v; want ErrInvalidGrant", err)
	}
}

func TestStoreRefusesStaleFence(t *testing.T) {
	s := NewStore()
	if err := s.Put("u", Token{Access: "a"}, 5); err != nil {
		t.Fatal(err)
	}
	if err := s.Put("u", Token{Access: "b"}, 4); !errors.Is(err, ErrStaleToken) {
		t.Fatalf("Put with a lower fence = %v; want ErrStaleToken", err)
	}
	if got, _ := s.Get("u"); got.Access != "a" {
		t.Errorf("stale write applied: %+v", got)
	}
}
