package tasks

import (
	"bytes"
	"encoding/json"
	"errors"
	"testing"
)

// FuzzDecodeEnvelope feeds arbitrary bodies to the envelope decoder: it
// never panics; it either fails with an error wrapping errMalformed or
// errVersion, or returns an envelope of this version with a job and a lock
// id, which encodes back to a body that decodes to the same envelope.
func FuzzDecodeEnvelope(f *testing.F) {
	for _, s := range []string{
		``, `{}`, `null`, `[]`, `"x"`, `{"v":1}`, `{"v":2,"job":"j","lockId":"l"}`, `{"v":3,"job":"j","lockId":"l"}`, `{"v":99999999999999999999}`,
		`{"v":2,"job":"j","lockId":"l","cont":{"key":"q/t","kind":"handoff","n":3,"arrived":"2026-01-01T00:00:00Z"}}`,
		`{"v":1,"job":"j","lockId":"l"}`, `{"v":1,"job":"j","lockId":"l","payload":{"a":[1,2]}}`,
		`{"v":1,"job":"j","lockId":"l","data":"AAEC"}`, `{"v":1,"job":"j","lockId":"l","data":"!!"}`,
		`{"v":1,"job":"j","lockId":"l","payload":1,"data":"AA=="}`, `{"v":1,"job":"j","lockId":"l"} {}`,
		`{"v":1,"job":"j","lockId":"l","extra":1}`, `{"v":1,"job":"j","lockId":"l","enqueuedAt":"not a time"}`,
		`{"v":1,"job":"\u0000","lockId":"\ud800"}`, `{"v":1,"V":2,"job":"j","lockId":"l"}`, `{"v":-1,"job":"j","lockId":"l"}`,
		`{"v":3,"job":"j","lockId":"l","wake":{"kind":"handoff","epoch":1,"gen":2,"at":"2026-01-02T03:04:05Z"}}`,
		`{"v":3,"job":"j","lockId":"l","wake":{"kind":"handoff","epoch":1,"gen":2},"payload":1}`,
		`{"v":4,"job":"j","lockId":"l","wake":{"kind":"safety","epoch":1,"gen":2,"deadlineMs":15000}}`,
		`{"v":3,"job":"j","lockId":"l","wake":{"kind":"safety","epoch":1,"gen":2,"deadlineMs":15000}}`,
		`{"v":2,"job":"j","lockId":"l","cont":{"key":"q/t","kind":"handoff","n":1}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		e, err := decodeEnvelope(body)
		if err != nil {
			if !errors.Is(err, errMalformed) && !errors.Is(err, errVersion) {
				t.Fatalf("decodeEnvelope(%q) = %v; want errMalformed or errVersion", body, err)
			}
			return
		}
		if (e.V != envelopeVersion && e.V != wakeVersion && e.V != wakeVersion3) || (e.V == wakeVersion || e.V == wakeVersion3) != (e.Wake != nil) || e.Job == "" || e.LockID == "" ||
			(e.Payload != nil && e.Data != nil) || (e.Wake != nil && (e.Payload != nil || e.Data != nil || e.Wake.kind() == 0 || e.Wake.Gen == 0)) {
			t.Fatalf("decodeEnvelope(%q) accepted %+v", body, e)
		}
		again, err := json.Marshal(e)
		if err != nil {
			t.Fatalf("re-encoding %+v: %v", e, err)
		}
		e2, err := decodeEnvelope(again)
		if err != nil {
			t.Fatalf("re-decoding %s: %v", again, err)
		}
		if e2.Job != e.Job || e2.LockID != e.LockID || !bytes.Equal(e2.Data, e.Data) || !e2.EnqueuedAt.Equal(e.EnqueuedAt) ||
			(e.Payload != nil && !json.Valid(e2.Payload)) {
			t.Fatalf("round trip changed the envelope: %+v -> %+v", e, e2)
		}
	})
}
