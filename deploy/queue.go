// Package deploy gives Go code the settings the deploy scripts use, read
// from the scripts themselves so that each number is written once: the
// defaults in lib.sh.
package deploy

import (
	_ "embed"
	"fmt"
	"regexp"
	"strconv"
	"time"

	"cloud.google.com/go/cloudtasks/apiv2/cloudtaskspb"
	"google.golang.org/protobuf/types/known/durationpb"
)

//go:embed lib.sh
var libSh string

// QueueSettings are the retry and rate settings of the Cloud Tasks queue
// that 04-queue.sh creates (the QUEUE_* variables of lib.sh).
type QueueSettings struct {
	// MaxAttempts counts the first attempt; -1 is unlimited.
	MaxAttempts int32
	// MaxRetryDuration bounds the time from the first attempt; 0 is
	// unlimited.
	MaxRetryDuration time.Duration
	// MinBackoff, MaxBackoff and MaxDoublings shape the retry intervals.
	MinBackoff, MaxBackoff time.Duration
	MaxDoublings           int32
	// MaxDispatchesPerSecond and MaxConcurrentDispatches are the queue's
	// rate limits.
	MaxDispatchesPerSecond  float64
	MaxConcurrentDispatches int32
}

// defaultRE matches a default in lib.sh: `: "${NAME:=value}"`.
var defaultRE = regexp.MustCompile(`(?m)^: "\$\{(QUEUE_[A-Z_]+):=([^}]*)\}"`)

// DefaultQueue returns the settings 04-queue.sh gives the queue when the
// environment sets none of them. It fails only if lib.sh lacks one of the
// defaults or holds one Go cannot read (a duration must be a Go duration,
// such as 5s or 300s).
func DefaultQueue() (QueueSettings, error) {
	defaults := map[string]string{}
	for _, m := range defaultRE.FindAllStringSubmatch(libSh, -1) {
		defaults[m[1]] = m[2]
	}
	var (
		q    QueueSettings
		errs []error
	)
	get := func(name string) string {
		v, ok := defaults[name]
		if !ok {
			errs = append(errs, fmt.Errorf("deploy: lib.sh sets no default for %s", name))
		}
		return v
	}
	integer := func(name string) int32 {
		n, err := strconv.ParseInt(get(name), 10, 32)
		if err != nil {
			errs = append(errs, fmt.Errorf("deploy: %s: %w", name, err))
		}
		return int32(n)
	}
	duration := func(name string) time.Duration {
		d, err := time.ParseDuration(get(name))
		if err != nil {
			errs = append(errs, fmt.Errorf("deploy: %s: %w", name, err))
		}
		return d
	}
	q.MaxAttempts = integer("QUEUE_MAX_ATTEMPTS")
	q.MaxRetryDuration = duration("QUEUE_MAX_RETRY_DURATION")
	q.MinBackoff = duration("QUEUE_MIN_BACKOFF")
	q.MaxBackoff = duration("QUEUE_MAX_BACKOFF")
	q.MaxDoublings = integer("QUEUE_MAX_DOUBLINGS")
	rate, err := strconv.ParseFloat(get("QUEUE_MAX_DISPATCHES_PER_SECOND"), 64)
	if err != nil {
		errs = append(errs, fmt.Errorf("deploy: QUEUE_MAX_DISPATCHES_PER_SECOND: %w", err))
	}
	q.MaxDispatchesPerSecond = rate
	q.MaxConcurrentDispatches = integer("QUEUE_MAX_CONCURRENT_DISPATCHES")
	if len(errs) > 0 {
		return QueueSettings{}, errs[0]
	}
	return q, nil
}

// Queue returns a queue of the given full name
// (projects/P/locations/L/queues/Q) with these settings, for CreateQueue.
func (s QueueSettings) Queue(name string) *cloudtaskspb.Queue {
	return &cloudtaskspb.Queue{
		Name: name,
		RetryConfig: &cloudtaskspb.RetryConfig{
			MaxAttempts:      s.MaxAttempts,
			MaxRetryDuration: durationpb.New(s.MaxRetryDuration),
			MinBackoff:       durationpb.New(s.MinBackoff),
			MaxBackoff:       durationpb.New(s.MaxBackoff),
			MaxDoublings:     s.MaxDoublings,
		},
		RateLimits: &cloudtaskspb.RateLimits{
			MaxDispatchesPerSecond:  s.MaxDispatchesPerSecond,
			MaxConcurrentDispatches: s.MaxConcurrentDispatches,
		},
	}
}
