package lockkey

import "testing"

func TestJoin(t *testing.T) {
	for _, id := range []string{"", "user-42", "a b\x00c", string(make([]byte, 1000))} {
		want := "p:{" + Hash(id) + "}:lock"
		if got := Join("p:{", id, "}:lock"); got != want {
			t.Errorf("Join(%q) = %q, want %q", id, got, want)
		}
	}
	if n := testing.AllocsPerRun(100, func() { _ = Join("taskguard:{", "user-42", "}:lock") }); n != 1 {
		t.Errorf("Join allocates %v times, want 1", n)
	}
}
