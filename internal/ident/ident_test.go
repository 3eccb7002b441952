package ident

import (
	"encoding/json"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestCheck(t *testing.T) {
	for _, s := range []string{"", "user-42", "naïve", "\uFFFD", "\U0001F600", "a\x00b"} {
		if err := Check("lock id", s); err != nil {
			t.Errorf("Check(%q) = %v; want nil", s, err)
		}
	}
	for _, s := range []string{"user-\xff42", "\xff", "\xfe", "resize-\xe9", "\xed\xa0\x80"} {
		err := Check("lock id", s)
		if err == nil || !strings.Contains(err.Error(), "lock id") || !strings.Contains(err.Error(), strings.Trim(fmtQ(s), `"`)) {
			t.Errorf("Check(%q) = %v; want an error naming it", s, err)
		}
	}
}

func fmtQ(s string) string { return strconv.Quote(s) }

// TestString decodes JSON strings: exact ones round-trip, lossy ones are
// refused naming the value.
func TestString(t *testing.T) {
	exact := map[string]string{
		`"user-42"`:             "user-42",
		`"\u00e9"`:              "é",
		`"\ud83d\ude00"`:        "\U0001F600",
		`"\ufffd"`:              "\uFFFD",
		"\"\uFFFD\"":            "\uFFFD",
		`"\\ud800"`:             `\ud800`,
		`"\\\ud83d\ude00"`:      `\` + "\U0001F600",
		`"a\"b"`:                `a"b`,
		`"\u0000"`:              "\x00",
		`"` + "\u2028" + `"`:    "\u2028",
		`"x\ud83d\ude00\u0041"`: "x\U0001F600A",
	}
	for in, want := range exact {
		var s String
		if err := json.Unmarshal([]byte(in), &s); err != nil || string(s) != want {
			t.Errorf("decode %s = %q, %v; want %q", in, s, err, want)
		}
	}
	for _, in := range []string{"\"user-\xff42\"", "\"\xfe\"", "\"resize-\xe9\"", `"\ud800"`, `"\udc00"`, `"a\ud83dx"`, `"\ud83d\u0041"`, `"\ud83d\ud83d"`} {
		var s String
		if err := json.Unmarshal([]byte(in), &s); err == nil {
			t.Errorf("decode %q = %q; want an error (encoding/json would make it %q)", in, s, lossy(in))
		}
	}
}

func lossy(in string) string {
	var s string
	_ = json.Unmarshal([]byte(in), &s)
	return s
}

// FuzzString checks the property String promises: whatever it decodes, it
// decodes exactly (re-encoding gives back the same string), and it refuses
// only what encoding/json would decode lossily.
func FuzzString(f *testing.F) {
	for _, s := range []string{`"user-42"`, `"\ud800"`, "\"\xff\"", `"\ud83d\ude00"`, `"\\ud800"`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var plain string
		if json.Unmarshal(b, &plain) != nil {
			return // not a JSON string
		}
		var s String
		err := json.Unmarshal(b, &s)
		if err != nil {
			if utf8.Valid(b) && !strings.Contains(plain, "\uFFFD") {
				t.Fatalf("refused %q, which decodes to %q without loss", b, plain)
			}
			return
		}
		if string(s) != plain {
			t.Fatalf("decoded %q as %q; encoding/json says %q", b, s, plain)
		}
		if !utf8.ValidString(string(s)) {
			t.Fatalf("decoded %q to invalid UTF-8 %q", b, s)
		}
		// Exact: the decoded string encodes and decodes back to itself, and
		// a U+FFFD in it was written in the input, not made up.
		enc, _ := json.Marshal(string(s))
		var back String
		if err := json.Unmarshal(enc, &back); err != nil || back != s {
			t.Fatalf("%q does not round-trip: %q, %v", s, back, err)
		}
		if n := strings.Count(string(s), "\uFFFD"); n > strings.Count(string(b), "\uFFFD")+strings.Count(strings.ToLower(string(b)), `\ufffd`) {
			t.Fatalf("decoded %q to %q: U+FFFD made up", b, s)
		}
	})
}
