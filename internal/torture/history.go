package torture

import (
	"bufio"
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/anishathalye/porcupine"
)

// Section is one stay inside a lock, as a worker recorded it. Times are
// wall-clock Unix nanoseconds: every process runs on one machine, so they are
// comparable across processes.
type Section struct {
	ID    string `json:"id"`
	Owner string `json:"owner"` // "pid/goroutine/n": unique per section
	Token uint64 `json:"token"`
	Start int64  `json:"start"` // before Acquire (With) was called
	Enter int64  `json:"enter"` // first thing inside the critical section
	Exit  int64  `json:"exit"`  // last thing inside the critical section; 0 if the process died inside
	End   int64  `json:"end"`   // after With returned; 0 if the process died inside
	Lost  bool   `json:"lost"`  // the section's context was cancelled (lock lost) before Exit
	Err   string `json:"err,omitempty"`
}

// Crashed reports whether the section's process died inside it.
func (s Section) Crashed() bool { return s.Exit == 0 }

// Recorder appends sections to a file, one JSON line when a section is
// entered and one when it ends, each written with a single write(2) so that a
// process killed with SIGKILL leaves every line it wrote whole. It is safe
// for concurrent use.
type Recorder struct {
	f   *os.File
	enc chan struct{} // a one-slot semaphore around f
}

// NewRecorder creates (truncates) the file at path.
func NewRecorder(path string) (*Recorder, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	return &Recorder{f: f, enc: make(chan struct{}, 1)}, nil
}

// write appends s as one JSON line with a single write(2): an entry (Exit == 0)
// or the whole section.
func (r *Recorder) write(s Section) error {
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	r.enc <- struct{}{}
	defer func() { <-r.enc }()
	_, err = r.f.Write(b)
	return err
}

// Entered records that s was entered (Exit and End still zero).
func (r *Recorder) Entered(s Section) error { return r.write(s) }

// Ended records the whole section s.
func (r *Recorder) Ended(s Section) error { return r.write(s) }

// Close closes the file.
func (r *Recorder) Close() error { return r.f.Close() }

// ReadSections reads every *.jsonl file in dir and returns one Section per
// owner: the last line written for it (the whole section, or only its entry
// if its process died inside).
func ReadSections(dir string) ([]Section, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.jsonl"))
	if err != nil {
		return nil, err
	}
	byOwner := make(map[string]Section)
	for _, name := range files {
		f, err := os.Open(name)
		if err != nil {
			return nil, err
		}
		err = readLines(f, byOwner)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
	}
	out := make([]Section, 0, len(byOwner))
	for _, s := range byOwner {
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b Section) int { return cmp.Compare(a.Enter, b.Enter) })
	return out, nil
}

func readLines(r io.Reader, byOwner map[string]Section) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var s Section
		if err := json.Unmarshal(sc.Bytes(), &s); err != nil {
			return err
		}
		byOwner[s.Owner] = s
	}
	return sc.Err()
}

// Overlap is two sections of one id that were inside the lock at once.
type Overlap struct {
	A, B Section
	By   time.Duration // how long both were inside
}

// Result is what the checkers found in a history.
type Result struct {
	Sections   int // sections recorded (entered)
	Crashed    int // sections whose process died inside
	Lost       int // sections that saw their lock lost
	IDs        int
	Overlaps   []Overlap
	TokenOrder int // pairs of consecutive sections of one id whose tokens did not increase
	// Linearizable is porcupine's verdict on the acquire/release history:
	// "Ok", "Illegal", or "Unknown" (the check timed out).
	Linearizable porcupine.CheckResult
}

// String summarises r on one line.
func (r Result) String() string {
	var worst time.Duration
	for _, o := range r.Overlaps {
		worst = max(worst, o.By)
	}
	return fmt.Sprintf("sections=%d ids=%d crashed=%d lost=%d overlaps=%d (longest %v) token-order-violations=%d linearizable=%s",
		r.Sections, r.IDs, r.Crashed, r.Lost, len(r.Overlaps), worst, r.TokenOrder, r.Linearizable)
}

// Check runs every checker over sections: overlaps and token order per id,
// and porcupine's linearizability check of the lock model, bounded by
// timeout.
func Check(sections []Section, timeout time.Duration) Result {
	r := Result{Sections: len(sections)}
	byID := make(map[string][]Section)
	for _, s := range sections {
		byID[s.ID] = append(byID[s.ID], s)
		if s.Crashed() {
			r.Crashed++
		}
		if s.Lost {
			r.Lost++
		}
	}
	r.IDs = len(byID)
	for _, ss := range byID {
		slices.SortFunc(ss, func(a, b Section) int { return cmp.Compare(a.Enter, b.Enter) })
		// Sections sorted by entry overlap iff one is entered before the
		// latest exit seen so far.
		var open Section
		for i, s := range ss {
			if i > 0 {
				if s.Token <= ss[i-1].Token {
					r.TokenOrder++
				}
				if until := exitOf(open); s.Enter <= until {
					r.Overlaps = append(r.Overlaps, Overlap{A: open, B: s, By: time.Duration(min(until, exitOf(s)) - s.Enter)})
				}
			}
			if i == 0 || exitOf(s) > exitOf(open) {
				open = s
			}
		}
	}
	r.Linearizable = porcupine.CheckOperationsTimeout(LockModel, Operations(sections), timeout)
	return r
}

// exitOf is a section's exit. For one whose process died inside, the lock
// was freed by its lease at a time nobody recorded: only its entry is known,
// so the overlap scan sees it as a point (the crash tests check the takeover
// time against the lease, and porcupine lets its release by expiry happen
// any time after entry).
func exitOf(s Section) int64 {
	if s.Crashed() {
		return s.Enter
	}
	return s.Exit
}

// lockInput is the input of one operation of the lock model.
type lockInput struct {
	ID      string
	Owner   string
	Acquire bool // else release
	Expire  bool // a release by lease expiry, of a holder that died
}

// lockState is the model's state for one id: who holds it and the last token
// issued.
type lockState struct {
	Holder string
	Token  uint64
}

// LockModel is the sequential specification of one lock id, for porcupine:
// Acquire succeeds only when nobody holds the lock and returns a token
// greater than every earlier one; Release succeeds only for the holder. The
// history is partitioned by id.
var LockModel = porcupine.Model{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		byID := make(map[string][]porcupine.Operation)
		var ids []string
		for _, op := range history {
			id := op.Input.(lockInput).ID
			if _, ok := byID[id]; !ok {
				ids = append(ids, id)
			}
			byID[id] = append(byID[id], op)
		}
		out := make([][]porcupine.Operation, 0, len(ids))
		for _, id := range ids {
			out = append(out, byID[id])
		}
		return out
	},
	Init: func() any { return lockState{} },
	Step: func(state, input, output any) (bool, any) {
		st, in := state.(lockState), input.(lockInput)
		if in.Acquire {
			tok := output.(uint64)
			if st.Holder != "" || tok <= st.Token {
				return false, st
			}
			return true, lockState{Holder: in.Owner, Token: tok}
		}
		if st.Holder != in.Owner {
			return false, st
		}
		return true, lockState{Token: st.Token}
	},
	DescribeOperation: func(input, output any) string {
		in := input.(lockInput)
		if in.Acquire {
			return fmt.Sprintf("acquire(%s, %s) -> %d", in.ID, in.Owner, output)
		}
		return fmt.Sprintf("release(%s, %s)", in.ID, in.Owner)
	},
}

// Operations turns sections into porcupine operations: an acquire from Start
// to Enter returning the token, and a release from Exit to End. A section
// whose process died inside has a release by expiry that may take effect
// any time after Enter (it never returns).
func Operations(sections []Section) []porcupine.Operation {
	ops := make([]porcupine.Operation, 0, 2*len(sections))
	for i, s := range sections {
		ops = append(ops, porcupine.Operation{
			ClientId: i,
			Input:    lockInput{ID: s.ID, Owner: s.Owner, Acquire: true},
			Call:     s.Start, Output: s.Token, Return: s.Enter,
		})
		rel := porcupine.Operation{ClientId: i, Input: lockInput{ID: s.ID, Owner: s.Owner}, Call: s.Exit, Return: s.End}
		if s.Crashed() {
			rel.Input = lockInput{ID: s.ID, Owner: s.Owner, Expire: true}
			rel.Call, rel.Return = s.Enter, math.MaxInt64
		}
		ops = append(ops, rel)
	}
	return ops
}
