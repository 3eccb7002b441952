package tasks

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/taskguard/taskguard/internal/ident"
)

// envelopeVersion is the version of the task body Enqueue writes.
// wakeVersion is the version of a wake's body (park mode): the job and lock
// id plus "wake", and no payload (a wake runs what the wait list recorded).
// Version 2 was the continuation of an earlier park mode, which carried a
// waiter's payload; it is refused (dropped with an ERROR log). A version 3
// wake is a version 4 wake without its dispatch deadline; it is accepted.
const (
	envelopeVersion = 1
	legacyVersion   = 2
	wakeVersion3    = 3
	wakeVersion     = 4
)

// envelope is the JSON body of every task:
//
//	{"v":1,"job":"resize","lockId":"user-42","payload":{...},"enqueuedAt":"2026-..."}
//
// A payload given as bytes travels base64-encoded in "data" instead of
// "payload", so that the worker hands back exactly those bytes. The job and
// the lock id decode only when they decode exactly (ident.String): JSON
// cannot carry bytes that are not UTF-8, and Enqueue refuses them.
type envelope struct {
	V          int             `json:"v"`
	Job        ident.String    `json:"job"`
	LockID     ident.String    `json:"lockId"`
	Payload    json.RawMessage `json:"payload,omitempty"`
	Data       []byte          `json:"data,omitempty"`
	EnqueuedAt time.Time       `json:"enqueuedAt"`
	// Wake marks a wake (version 3 only): which of the lock id's wakes it
	// is. Job is then the job whose lock options the wake takes the lock
	// with.
	Wake *wakeRef `json:"wake,omitempty"`
}

// wakeRef names a wake of a lock id (see WaitList).
type wakeRef struct {
	// Kind is "handoff" or "safety" (WakeKind.String).
	Kind  string `json:"kind"`
	Epoch uint64 `json:"epoch"`
	Gen   uint64 `json:"gen"`
	// At is when the wake was created, for the hand-off latency.
	At time.Time `json:"at"`
	// DeadlineMS is the dispatch deadline of the wake's task in
	// milliseconds (that of the Client that created it); 0 in a version 3
	// wake.
	DeadlineMS int64 `json:"deadlineMs,omitempty"`
}

// kind returns r's WakeKind (0 when unknown).
func (r *wakeRef) kind() WakeKind {
	switch r.Kind {
	case "handoff":
		return Handoff
	case "safety":
		return Safety
	}
	return 0
}

// encodePayload places p in e: []byte as Data, json.RawMessage (checked) and
// anything else (marshalled) as Payload.
func (e *envelope) encodePayload(p any) error {
	switch v := p.(type) {
	case nil:
		return nil
	case []byte:
		e.Data = v
	case json.RawMessage:
		if !json.Valid(v) {
			return fmt.Errorf("%w: payload is not valid JSON", ErrInvalidTask)
		}
		e.Payload = v
	default:
		b, err := json.Marshal(v)
		if err != nil {
			return fmt.Errorf("%w: payload: %w", ErrInvalidTask, err)
		}
		e.Payload = b
	}
	return nil
}

// errMalformed marks a task body the worker cannot read.
var errMalformed = errors.New("malformed task body")

// errVersion marks an envelope of a version this package does not know.
var errVersion = errors.New("unsupported envelope version")

// decodeEnvelope reads one envelope from body strictly: unknown fields,
// trailing data, a missing job or lock id, a job or lock id that would not
// decode byte for byte (invalid UTF-8, an unpaired surrogate escape) are
// errors wrapping errMalformed.
// An envelope of a newer version is an error wrapping errVersion (checked
// first, since a newer envelope may carry fields this version does not know).
func decodeEnvelope(body []byte) (envelope, error) {
	var e envelope
	switch v := peekVersion(body); {
	case v > wakeVersion:
		return e, fmt.Errorf("%w: %d", errVersion, v)
	case v == legacyVersion:
		return e, fmt.Errorf("%w: version 2, a continuation of an earlier park mode (drain parked tasks before deploying this version)", errMalformed)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil {
		return e, fmt.Errorf("%w: %w", errMalformed, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return e, fmt.Errorf("%w: data after the envelope", errMalformed)
	}
	switch {
	case e.V != envelopeVersion && e.V != wakeVersion && e.V != wakeVersion3:
		return e, fmt.Errorf("%w: version %d", errMalformed, e.V)
	case (e.V == wakeVersion || e.V == wakeVersion3) != (e.Wake != nil):
		return e, fmt.Errorf("%w: version %d with wake %v", errMalformed, e.V, e.Wake != nil)
	case e.Wake != nil && (e.Wake.kind() == 0 || e.Wake.Gen == 0 || e.Wake.DeadlineMS < 0 || e.V == wakeVersion3 && e.Wake.DeadlineMS != 0):
		return e, fmt.Errorf("%w: bad wake %+v", errMalformed, *e.Wake)
	case e.Wake != nil && (e.Payload != nil || e.Data != nil):
		return e, fmt.Errorf("%w: a wake carries no payload", errMalformed)
	case e.Job == "":
		return e, fmt.Errorf("%w: no job", errMalformed)
	case e.LockID == "":
		return e, fmt.Errorf("%w: no lock id", errMalformed)
	case e.Payload != nil && e.Data != nil:
		return e, fmt.Errorf("%w: both payload and data", errMalformed)
	}
	return e, nil
}

// peekVersion returns the "v" of a JSON object body, or 0.
func peekVersion(body []byte) int {
	var v struct {
		V int `json:"v"`
	}
	if json.Unmarshal(body, &v) != nil {
		return 0
	}
	return v.V
}
