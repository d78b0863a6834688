package rotation

import (
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/utils/clock"
)

// DefaultMaxTracked bounds the workloads a Tracker remembers.
const DefaultMaxTracked = 1 << 20

// Tracker remembers, for every workload seen recently, the trust bundle
// sequence it reported holding. It tells how far a prepared root has
// propagated. It is safe for concurrent use.
type Tracker struct {
	clock  clock.PassiveClock
	window time.Duration
	max    int
	since  time.Time

	mu   sync.Mutex
	seen map[spiffeid.ID]sighting
}

type sighting struct {
	sequence uint64
	at       time.Time
}

// NewTracker returns a tracker that counts workloads seen within window
// (the maximum leaf lifetime: a workload not seen for that long holds no
// valid certificate). A nil clock means the real one.
func NewTracker(window time.Duration, clk clock.PassiveClock) *Tracker {
	if clk == nil {
		clk = clock.RealClock{}
	}
	return &Tracker{clock: clk, window: window, max: DefaultMaxTracked, since: clk.Now(), seen: make(map[spiffeid.ID]sighting)}
}

// Since returns when the tracker started watching.
func (t *Tracker) Since() time.Time { return t.since }

// Observe records that id holds the bundle of sequence seq now. Zero means
// the caller did not say (an ad hoc client such as meshctl issue); it is
// not tracked.
func (t *Tracker) Observe(id spiffeid.ID, seq uint64) {
	if seq == 0 {
		return
	}
	now := t.clock.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.seen[id]; !ok && len(t.seen) >= t.max {
		t.pruneLocked(now)
		if len(t.seen) >= t.max {
			return
		}
	}
	t.seen[id] = sighting{sequence: seq, at: now}
}

// Count returns how many workloads were seen within the window, and how
// many of them hold a bundle of sequence minSeq or later.
func (t *Tracker) Count(minSeq uint64) (seen, holding int) {
	now := t.clock.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	t.pruneLocked(now)
	for _, s := range t.seen {
		seen++
		if s.sequence >= minSeq {
			holding++
		}
	}
	return seen, holding
}

func (t *Tracker) pruneLocked(now time.Time) {
	for id, s := range t.seen {
		if now.Sub(s.at) > t.window {
			delete(t.seen, id)
		}
	}
}
