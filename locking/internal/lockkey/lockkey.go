// Package lockkey maps caller lock ids to fixed-size store keys.
package lockkey

import (
	"crypto/sha256"
	"encoding/base64"
	"strings"
)

// HashLen is the length of the string Hash returns.
const HashLen = 43

// Hash returns the SHA-256 of id in unpadded base64url: 43 characters from
// [A-Za-z0-9_-], whatever bytes id holds. Hashing bounds key length, keeps
// spaces and control characters out of keys, and spreads keys evenly over
// servers and hash slots.
func Hash(id string) string {
	sum := sha256.Sum256([]byte(id))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

// Join returns prefix + Hash(id) + suffix, built with one allocation: the
// key of a lock on every call of a backend.
func Join(prefix, id, suffix string) string {
	sum := sha256.Sum256([]byte(id))
	var h [HashLen]byte
	base64.RawURLEncoding.Encode(h[:], sum[:])
	var b strings.Builder
	b.Grow(len(prefix) + HashLen + len(suffix))
	b.WriteString(prefix)
	b.Write(h[:])
	b.WriteString(suffix)
	return b.String()
}

// ValidPrefix reports whether p may start a memcached or Redis key: at most
// max bytes, printable ASCII without spaces, and no Redis hash-tag braces
// (the backend adds its own).
func ValidPrefix(p string, max int) bool {
	if len(p) > max {
		return false
	}
	for i := 0; i < len(p); i++ {
		c := p[i]
		if c <= ' ' || c >= 0x7f || c == '{' || c == '}' {
			return false
		}
	}
	return true
}
