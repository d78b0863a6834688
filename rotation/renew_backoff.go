package rotation

import (
	"fmt"
	"math"
	"time"
)

// The defaults of Backoff's fields.
const (
	defaultBackoffInitial = time.Second
	defaultBackoffMax     = time.Minute
	defaultBackoffFactor  = 2
	defaultBackoffJitter  = 0.2
)

// Backoff paces retries: the nth retry waits Initial·Factor^(n-1), at most
// Max, less a random share of up to Jitter of that. Jitter only shortens a
// wait, so Max is a hard cap, and callers that have reached it still
// spread out rather than all retrying at Max together. When the server
// says when to retry (a google.rpc.RetryInfo detail), a renewal waits that
// long plus up to half of it instead, still at most Max. Each field's zero
// value means its default.
type Backoff struct {
	// Initial is the wait before the first retry. Zero means 1s.
	Initial time.Duration

	// Max caps every wait. Zero means 1m.
	Max time.Duration

	// Factor multiplies the wait after each failure; at least 1. Zero
	// means 2.
	Factor float64

	// Jitter is the largest share of a wait taken off at random, in
	// [0, 1]: 1 is "full jitter". Zero means 0.2; negative means none.
	Jitter float64
}

// complete fills Backoff's zero fields and checks it.
func (b Backoff) complete() (Backoff, error) {
	if b.Initial == 0 {
		b.Initial = defaultBackoffInitial
	}
	if b.Max == 0 {
		b.Max = defaultBackoffMax
	}
	if b.Factor == 0 {
		b.Factor = defaultBackoffFactor
	}
	switch {
	case b.Jitter == 0:
		b.Jitter = defaultBackoffJitter
	case b.Jitter < 0:
		b.Jitter = 0
	}
	switch {
	case b.Initial < 0 || b.Max < b.Initial:
		return b, fmt.Errorf("rotation: Options.Backoff: Initial %s and Max %s: want 0 < Initial <= Max", b.Initial, b.Max)
	case b.Factor < 1:
		return b, fmt.Errorf("rotation: Options.Backoff.Factor is %g; want 1 or more", b.Factor)
	case b.Jitter > 1:
		return b, fmt.Errorf("rotation: Options.Backoff.Jitter is %g; want at most 1", b.Jitter)
	}
	return b, nil
}

// delay returns the wait before retry n (1 is the first); u is uniform in
// [0, 1).
func (b Backoff) delay(n int, u float64) time.Duration {
	return b.delayWithin(n, u, b.Max)
}

// delayWithin is delay with the wait capped at limit rather than Max, when
// limit is the lower. The cap applies before the jitter, so that callers
// held to it still spread out.
func (b Backoff) delayWithin(n int, u float64, limit time.Duration) time.Duration {
	limit = min(limit, b.Max)
	d := float64(b.Initial) * math.Pow(b.Factor, float64(n-1))
	if d > float64(limit) || math.IsInf(d, 0) || math.IsNaN(d) {
		d = float64(limit)
	}
	return time.Duration(d * (1 - b.Jitter*u))
}

// The cap on renewal retries while an SVID is held: see Options.Backoff.
const (
	// retryShareOfLeft is the share of an SVID's remaining life that a
	// retry may wait at most: a twentieth.
	retryShareOfLeft = 20

	// minRetryCap is the least the cap comes down to, so that an SVID
	// about to expire is not renewed in a tight loop.
	minRetryCap = 100 * time.Millisecond
)

// retryCap returns the longest a renewal retry may wait while an SVID
// with left of its life remaining is held: a twentieth of left, and
// minRetryCap at least. It wins over Backoff.Initial and Max.
func retryCap(left time.Duration) time.Duration {
	return max(left/retryShareOfLeft, minRetryCap)
}
