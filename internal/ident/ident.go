// Package ident checks the identities that cross the functions' boundaries —
// lock ids and job names — so that each one either arrives byte for byte or
// is refused where it enters.
//
// A task carries its job name and lock id in a JSON envelope, and the
// Enqueue function reads them from a JSON body. JSON text is UTF-8: Go's
// encoder writes each invalid byte of a string as U+FFFD, and its decoder
// turns invalid bytes and unpaired surrogate escapes ("\ud800") into U+FFFD,
// both silently. "user-\xff42" would run under the lock "user-\uFFFD42", and
// the ids "\xff" and "\xfe" would share one lock. So identities must be
// valid UTF-8 (Check), and JSON is decoded into them only when the decoding
// is exact (String).
package ident

import (
	"encoding/json"
	"fmt"
	"unicode/utf8"
)

// Check returns nil when s is valid UTF-8, and otherwise an error naming
// what s is (such as "lock id") and s itself, quoted with %q.
func Check(what, s string) error {
	if utf8.ValidString(s) {
		return nil
	}
	return fmt.Errorf("%s %q is not valid UTF-8 (identities must be: JSON cannot carry other bytes)", what, s)
}

// String is a string that decodes from JSON only when the decoding is exact:
// the JSON string must be valid UTF-8 and have no unpaired surrogate escape,
// which encoding/json would replace with U+FFFD. It encodes as a string.
type String string

// UnmarshalJSON decodes a JSON string exactly, or fails naming it. null
// leaves s unchanged, as for a string.
func (s *String) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		return nil
	}
	if len(b) >= 2 && b[0] == '"' {
		if !utf8.Valid(b) {
			return fmt.Errorf("JSON string %q is not valid UTF-8", b[1:len(b)-1])
		}
		if unpairedSurrogate(b) {
			return fmt.Errorf("JSON string %s has an unpaired surrogate escape", b)
		}
	}
	return json.Unmarshal(b, (*string)(s))
}

// unpairedSurrogate reports whether the JSON string b has a \u escape of a
// UTF-16 surrogate that is not a high surrogate followed by a low one.
func unpairedSurrogate(b []byte) bool {
	for i := 0; i < len(b); i++ {
		if b[i] != '\\' {
			continue
		}
		i++ // the escaped character
		if i >= len(b) || b[i] != 'u' {
			continue
		}
		r := hex4(b, i+1)
		i += 4 // the last hex digit
		switch {
		case r < 0xD800 || r > 0xDFFF:
			continue
		case r >= 0xDC00:
			return true // a low surrogate alone
		}
		if i+2 < len(b) && b[i+1] == '\\' && b[i+2] == 'u' {
			if lo := hex4(b, i+3); lo >= 0xDC00 && lo <= 0xDFFF {
				i += 6
				continue
			}
		}
		return true // a high surrogate alone
	}
	return false
}

// hex4 reads the four hex digits at b[i:], or returns -1.
func hex4(b []byte, i int) rune {
	if i+4 > len(b) {
		return -1
	}
	var r rune
	for _, c := range b[i : i+4] {
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c = c - 'a' + 10
		case 'A' <= c && c <= 'F':
			c = c - 'A' + 10
		default:
			return -1
		}
		r = r<<4 | rune(c)
	}
	return r
}
