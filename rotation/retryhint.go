package rotation

import (
	"time"

	"github.com/meshca/meshca/internal/wire"
)

// retryHintJitter is the largest share of a server's retry hint added at
// random to the wait, so that callers the server turned away together do
// not come back together.
const retryHintJitter = 0.5

// retryHint returns the delay of the google.rpc.RetryInfo detail that err's
// gRPC status carries, whatever its code: meshca-server sends one with
// ResourceExhausted when it sheds load or rate-limits a caller, and may
// with Unavailable. It returns zero when there is none.
func retryHint(err error) time.Duration {
	d, _ := wire.RetryAfter(err)
	return d
}

// hintedDelay returns the wait before the next retry when the server
// hinted at one: the hint, held to between minRetryCap and Max, plus up to
// retryHintJitter of it at random (u is uniform in [0, 1)), and never past
// limit (or Max). When the jittered span would pass limit, it is cut there:
// a hint within limit is never cut short, so the caller never comes back
// before the server asked. Only a hint beyond limit itself is shortened,
// to limit less Backoff's jitter, as delayWithin's is, so that callers
// held to the cap still spread out.
func (b Backoff) hintedDelay(hint time.Duration, u float64, limit time.Duration) time.Duration {
	limit = min(limit, b.Max)
	hint = min(max(hint, minRetryCap), b.Max)
	if hint > limit {
		return time.Duration(float64(limit) * (1 - b.Jitter*u))
	}
	most := min(hint+time.Duration(float64(hint)*retryHintJitter), limit)
	return hint + time.Duration(float64(most-hint)*u)
}
