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
// contVersion is the version of a continuation's body (park mode): version
// 1 plus "cont". A worker reads both.
const (
	envelopeVersion = 1
	contVersion     = 2
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
	// Cont marks a continuation (version 2 only): which waiter it is for.
	Cont *continuation `json:"cont,omitempty"`
}

// continuation says which parked delivery a continuation task resumes.
type continuation struct {
	// Key is the waiter's key (its original task's queue and name).
	Key string `json:"key"`
	// Kind is contHandoff or contSafety.
	Kind string `json:"kind"`
	// N is, for a hand-off, the fencing token of the holding that handed
	// off; for a safety net, its generation (from 1).
	N uint64 `json:"n"`
	// Arrived is when the waiter first found its lock busy.
	Arrived time.Time `json:"arrived"`
	// Coalesce marks a coalescing job's waiter (Waiter.Coalesce).
	Coalesce bool `json:"coalesce,omitempty"`
	// At is when the continuation was created, for the hand-off latency.
	At time.Time `json:"at"`
}

// Kinds of continuation.
const (
	contHandoff = "handoff"
	contSafety  = "safety"
)

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
	if v := peekVersion(body); v > contVersion {
		return e, fmt.Errorf("%w: %d", errVersion, v)
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
	case e.V != envelopeVersion && e.V != contVersion:
		return e, fmt.Errorf("%w: version %d", errMalformed, e.V)
	case (e.V == contVersion) != (e.Cont != nil):
		return e, fmt.Errorf("%w: version %d with cont %v", errMalformed, e.V, e.Cont != nil)
	case e.Cont != nil && (e.Cont.Key == "" || (e.Cont.Kind != contHandoff && e.Cont.Kind != contSafety)):
		return e, fmt.Errorf("%w: bad cont %+v", errMalformed, *e.Cont)
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
