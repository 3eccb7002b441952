package redislock

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/taskguard/taskguard/locking"
)

var _ locking.Notifier = (*Backend)(nil)

// ErrNoPubSub is returned by Watch when the client given to New cannot
// subscribe (it has no Subscribe method, as *redis.Client,
// *redis.ClusterClient and redis.UniversalClient have). Waiters then poll.
var ErrNoPubSub = errors.New("redislock: the client cannot subscribe to announcements")

// subscriber is the part of go-redis's clients that Watch needs.
type subscriber interface {
	Subscribe(ctx context.Context, channels ...string) *redis.PubSub
}

// unsubscribeTimeout bounds the UNSUBSCRIBE sent when the last watch of an
// id stops.
const unsubscribeTimeout = time.Second

// Watch makes the Backend a locking.Notifier: it announces on released each
// Release of id that a waiter was turned away from, as the server publishes
// it on ReleaseChannel(id), and each (re)subscription of the channel (after
// a reconnect an announcement may have been missed). One pub/sub connection
// per Backend carries the channels of every id watched in this process, and
// every watch of one id shares one subscription; the connection is closed
// when the last watch stops. Pub/sub delivers at most once: the locking
// client polls as well (locking.SafetyPoll), so a lost announcement, a
// restart or a failover delays a hand-off, never loses it.
func (b *Backend) Watch(ctx context.Context, id string) (<-chan struct{}, func(), error) {
	sub, ok := b.c.(subscriber)
	if !ok {
		return nil, nil, ErrNoPubSub
	}
	return b.hub.watch(ctx, sub, b.ReleaseChannel(id))
}

// hub fans one pub/sub connection out to the watches of this Backend.
type hub struct {
	mu      sync.Mutex
	ps      *redis.PubSub                         // nil while nothing is watched
	watches map[string]map[chan struct{}]struct{} // by channel
}

func (h *hub) watch(ctx context.Context, sub subscriber, channel string) (<-chan struct{}, func(), error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ps == nil {
		h.ps = sub.Subscribe(context.WithoutCancel(ctx)) // connects on first use
		h.watches = make(map[string]map[chan struct{}]struct{})
		go h.dispatch(h.ps)
	}
	ch := make(chan struct{}, 1)
	ws := h.watches[channel]
	if ws == nil {
		if err := h.ps.Subscribe(ctx, channel); err != nil {
			h.closeIfIdle()
			return nil, nil, err
		}
		ws = make(map[chan struct{}]struct{})
		h.watches[channel] = ws
	}
	ws[ch] = struct{}{}
	return ch, sync.OnceFunc(func() { h.unwatch(channel, ch) }), nil
}

func (h *hub) unwatch(channel string, ch chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	ws := h.watches[channel]
	delete(ws, ch)
	if len(ws) > 0 {
		return
	}
	delete(h.watches, channel)
	if len(h.watches) > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), unsubscribeTimeout)
		defer cancel()
		_ = h.ps.Unsubscribe(ctx, channel) // a failure only leaves a few stray wake-ups
		return
	}
	h.closeIfIdle()
}

// closeIfIdle closes the connection when nothing is watched. h.mu is held.
func (h *hub) closeIfIdle() {
	if len(h.watches) == 0 && h.ps != nil {
		_ = h.ps.Close()
		h.ps, h.watches = nil, nil
	}
}

// dispatch wakes the watches of each channel that received a message or
// was (re)subscribed, until ps is closed.
func (h *hub) dispatch(ps *redis.PubSub) {
	for msg := range ps.ChannelWithSubscriptions() {
		var channel string
		switch m := msg.(type) {
		case *redis.Message:
			channel = m.Channel
		case *redis.Subscription:
			if m.Kind != "subscribe" {
				continue
			}
			channel = m.Channel
		default:
			continue
		}
		h.mu.Lock()
		if h.ps == ps {
			for ch := range h.watches[channel] {
				select {
				case ch <- struct{}{}:
				default:
				}
			}
		}
		h.mu.Unlock()
	}
}
