package torture_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"

	"github.com/taskguard/taskguard/internal/torture"
)

// TestCheck shows that the checkers can fail: each history breaks one rule.
func TestCheck(t *testing.T) {
	sec := func(id, owner string, tok uint64, start, enter, exit, end int64) torture.Section {
		return torture.Section{ID: id, Owner: owner, Token: tok, Start: start, Enter: enter, Exit: exit, End: end}
	}
	cases := []struct {
		name       string
		h          []torture.Section
		overlaps   int
		tokenOrder int
		lin        porcupine.CheckResult
	}{
		{"sequential", []torture.Section{sec("a", "1", 1, 0, 1, 2, 3), sec("a", "2", 2, 0, 4, 5, 6), sec("b", "3", 1, 0, 2, 9, 10)}, 0, 0, porcupine.Ok},
		{"waiting acquire overlaps the release", []torture.Section{sec("a", "1", 1, 0, 1, 5, 7), sec("a", "2", 2, 2, 6, 8, 9)}, 0, 0, porcupine.Ok},
		{"overlap", []torture.Section{sec("a", "1", 1, 0, 1, 5, 6), sec("a", "2", 2, 0, 3, 7, 8)}, 1, 0, porcupine.Illegal},
		{"token goes down", []torture.Section{sec("a", "1", 5, 0, 1, 2, 3), sec("a", "2", 4, 0, 4, 5, 6)}, 0, 1, porcupine.Illegal},
		{"taker after a crashed holder", []torture.Section{sec("a", "1", 1, 0, 1, 0, 0), sec("a", "2", 2, 0, 9, 10, 11)}, 0, 0, porcupine.Ok},
		{"crashed holder, lower token after", []torture.Section{sec("a", "1", 3, 0, 1, 0, 0), sec("a", "2", 2, 0, 9, 10, 11)}, 0, 1, porcupine.Illegal},
		{"taker enters before a crashed holder", []torture.Section{sec("a", "1", 3, 0, 5, 0, 0), sec("a", "2", 2, 0, 3, 10, 11)}, 1, 0, porcupine.Illegal},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := torture.Check(tc.h, 10*time.Second)
			if len(r.Overlaps) != tc.overlaps || r.TokenOrder != tc.tokenOrder || r.Linearizable != tc.lin {
				t.Errorf("Check = %s; want overlaps=%d token-order=%d linearizable=%s", r, tc.overlaps, tc.tokenOrder, tc.lin)
			}
		})
	}
}

// TestRecorder checks that ReadSections keeps each owner's last line: a
// section that ended, and one whose process died after entering.
func TestRecorder(t *testing.T) {
	dir := t.TempDir()
	rec, err := torture.NewRecorder(filepath.Join(dir, "w.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	done := torture.Section{ID: "a", Owner: "p/1", Token: 1, Start: 1, Enter: 2}
	for _, err := range []error{rec.Entered(done), func() error { done.Exit, done.End = 3, 4; return rec.Ended(done) }(),
		rec.Entered(torture.Section{ID: "a", Owner: "p/2", Token: 2, Start: 3, Enter: 5}), rec.Close()} {
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "ignored.txt"), []byte("not a record"), 0o644); err != nil {
		t.Fatal(err)
	}
	got, err := torture.ReadSections(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0] != done || !got[1].Crashed() || got[0].Crashed() {
		t.Fatalf("ReadSections = %+v", got)
	}
}

func TestCheckHistory(t *testing.T) {
	w := func(id string, v, tok int64) torture.Write {
		return torture.Write{ID: id, Version: v, Token: tok, Owner: "o"}
	}
	for _, tc := range []struct {
		name      string
		ws        []torture.Write
		stale     int
		wantProbs int
	}{
		{"tokens rise or stay", []torture.Write{w("a", 2, 5), w("a", 1, 5), w("a", 3, 9), w("b", 1, 2)}, 0, 0},
		{"a stale write landed", []torture.Write{w("a", 1, 5), w("a", 2, 9), w("a", 3, 7), w("b", 1, 1)}, 1, 1},
		{"a version missing", []torture.Write{w("a", 1, 5), w("a", 3, 9)}, 0, 1},
		{"a version twice", []torture.Write{w("a", 1, 5), w("a", 1, 6)}, 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stale, probs := torture.CheckHistory(tc.ws)
			if stale != tc.stale || len(probs) != tc.wantProbs {
				t.Fatalf("CheckHistory = %d stale, problems %q; want %d stale, %d problems", stale, probs, tc.stale, tc.wantProbs)
			}
		})
	}
}
