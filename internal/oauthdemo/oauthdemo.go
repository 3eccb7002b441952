// Package oauthdemo is the example job of the deployable functions, after
// djangae's own example: refreshing a user's OAuth token invalidates the old
// one, so two refreshes running at once make one of them fail (or store a
// token that is already dead). Guarding the refresh with a lock fixes it.
//
// It has three parts: a small token endpoint that behaves like an OAuth
// server's refresh grant (each refresh token works once), a token store
// that refuses writes carrying a stale fencing token, and Refresh, the job
// body.
package oauthdemo

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// ErrInvalidGrant is the token endpoint's answer to a refresh token that was
// already used: what a concurrent refresh runs into without a lock.
var ErrInvalidGrant = errors.New("oauthdemo: invalid_grant: refresh token already used")

// ErrStaleToken is the store's answer to a write whose fencing token is
// lower than one it already accepted for that user.
var ErrStaleToken = errors.New("oauthdemo: stale fencing token")

// Token is a user's OAuth token pair.
type Token struct {
	Access  string    `json:"access_token"`
	Refresh string    `json:"refresh_token"`
	Expires time.Time `json:"expires"`
}

// Endpoint is an OAuth token endpoint for the refresh_token grant: every
// refresh token is good for one refresh, and the refresh issues a new pair.
type Endpoint struct {
	Lifetime time.Duration // access token lifetime; one hour when zero

	mu    sync.Mutex
	valid map[string]string // refresh token → user; guarded by mu
	calls int               // refreshes attempted; guarded by mu
}

// NewEndpoint returns an endpoint with no users.
func NewEndpoint() *Endpoint { return &Endpoint{valid: make(map[string]string)} }

// Issue creates a first token pair for user, as a sign-in would.
func (e *Endpoint) Issue(user string) Token {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.issueLocked(user)
}

func (e *Endpoint) issueLocked(user string) Token {
	lifetime := e.Lifetime
	if lifetime == 0 {
		lifetime = time.Hour
	}
	t := Token{Access: random(), Refresh: random(), Expires: time.Now().Add(lifetime)}
	e.valid[t.Refresh] = user
	return t
}

// ServeHTTP answers POST grant_type=refresh_token&refresh_token=… with a new
// pair, or 400 {"error":"invalid_grant"} for a used or unknown token; and
// grant_type=password&username=… (a sign-in) with a pair whose access token
// has already expired, so that the first use must refresh it.
func (e *Endpoint) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || r.ParseForm() != nil {
		http.Error(w, `{"error":"invalid_request"}`, http.StatusBadRequest)
		return
	}
	switch r.PostForm.Get("grant_type") {
	case "password":
		e.mu.Lock()
		t := e.issueLocked(r.PostForm.Get("username"))
		e.mu.Unlock()
		t.Expires = time.Now().Add(-time.Second)
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(t)
		return
	case "refresh_token":
	default:
		http.Error(w, `{"error":"unsupported_grant_type"}`, http.StatusBadRequest)
		return
	}
	e.mu.Lock()
	e.calls++
	user, ok := e.valid[r.PostForm.Get("refresh_token")]
	var t Token
	if ok {
		delete(e.valid, r.PostForm.Get("refresh_token"))
		t = e.issueLocked(user)
	}
	e.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	if !ok {
		w.WriteHeader(http.StatusBadRequest)
		_, _ = w.Write([]byte(`{"error":"invalid_grant"}`))
		return
	}
	_ = json.NewEncoder(w).Encode(t)
}

// CallCount reports how many refreshes were attempted.
func (e *Endpoint) CallCount() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.calls
}

// Store keeps each user's current token, fenced: a write carrying a lower
// fencing token than the last accepted one for that user is refused.
type Store struct {
	mu     sync.Mutex
	tokens map[string]Token  // guarded by mu
	fences map[string]uint64 // highest fencing token accepted per user; guarded by mu
}

// NewStore returns an empty store.
func NewStore() *Store {
	return &Store{tokens: make(map[string]Token), fences: make(map[string]uint64)}
}

// Get returns user's token.
func (s *Store) Get(user string) (Token, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.tokens[user]
	return t, ok
}

// Put stores t for user if fence is at least the highest fence seen for
// user, and returns ErrStaleToken otherwise.
func (s *Store) Put(user string, t Token, fence uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if fence < s.fences[user] {
		return fmt.Errorf("%w: %d < %d", ErrStaleToken, fence, s.fences[user])
	}
	s.fences[user], s.tokens[user] = fence, t
	return nil
}

// Refresher refreshes tokens against an endpoint URL.
type Refresher struct {
	URL    string
	Store  *Store
	Client *http.Client // http.DefaultClient when nil
	// MinValidity: a token valid for at least this much longer is left
	// alone. One minute when zero.
	MinValidity time.Duration
}

// Refresh refreshes user's token if it expires within MinValidity and
// reports whether it called the endpoint. fence is the caller's lock token.
// Run it under a lock on the user: two refreshes at once would use the same
// refresh token, and the second would fail with ErrInvalidGrant.
func (r *Refresher) Refresh(ctx context.Context, user string, fence uint64) (bool, error) {
	cur, ok := r.Store.Get(user)
	if !ok {
		t, err := r.post(ctx, url.Values{"grant_type": {"password"}, "username": {user}})
		if err != nil {
			return false, fmt.Errorf("oauthdemo: sign in %q: %w", user, err)
		}
		if err := r.Store.Put(user, t, fence); err != nil {
			return false, err
		}
		cur = t
	}
	minValidity := r.MinValidity
	if minValidity == 0 {
		minValidity = time.Minute
	}
	if time.Until(cur.Expires) > minValidity {
		return false, nil
	}
	t, err := r.post(ctx, url.Values{"grant_type": {"refresh_token"}, "refresh_token": {cur.Refresh}})
	if err != nil {
		return true, fmt.Errorf("oauthdemo: refresh %q: %w", user, err)
	}
	return true, r.Store.Put(user, t, fence)
}

func (r *Refresher) post(ctx context.Context, form url.Values) (Token, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, r.URL, strings.NewReader(form.Encode()))
	if err != nil {
		return Token{}, err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	client := r.Client
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		return Token{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusBadRequest {
		return Token{}, ErrInvalidGrant
	}
	if resp.StatusCode != http.StatusOK {
		return Token{}, fmt.Errorf("token endpoint answered %s", resp.Status)
	}
	var t Token
	if err := json.NewDecoder(resp.Body).Decode(&t); err != nil {
		return Token{}, err
	}
	return t, nil
}

func random() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
