package ca

import "time"

// The TTL policy's defaults.
const (
	DefaultTTL = time.Hour
	MaxTTL     = 24 * time.Hour
)

// TTLPolicy decides the lifetime of an issued certificate. The zero value
// is the default policy: 1h by default, 24h at most.
type TTLPolicy struct {
	// Default is used when a request asks for zero or a negative TTL.
	// Zero means DefaultTTL.
	Default time.Duration

	// Max is the longest lifetime issued. A longer request is clamped to
	// Max, not refused: a client asking too much still gets a working
	// certificate and renews sooner. Zero means MaxTTL.
	Max time.Duration
}

// TTL returns the lifetime to issue for a request of requested.
func (p TTLPolicy) TTL(requested time.Duration) time.Duration {
	ttl := requested
	if ttl <= 0 {
		ttl = p.Default
		if ttl <= 0 {
			ttl = DefaultTTL
		}
	}
	// X.509 times have whole seconds: under a second, NotAfter could round
	// down to the moment of issue, and the certificate be born expired
	// (found by FuzzNativeSign).
	return max(min(ttl, p.Longest()), MinTTL)
}

// MinTTL is the shortest lifetime issued; a shorter request gets it.
const MinTTL = time.Second

// Longest returns the longest lifetime the policy issues.
func (p TTLPolicy) Longest() time.Duration {
	if p.Max <= 0 {
		return MaxTTL
	}
	return p.Max
}
