package identity

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/utils/clock"
	"sigs.k8s.io/yaml"

	"github.com/meshca/meshca/internal/securefile"
)

// MinTokenLength is the shortest static token accepted in a token file:
// shorter ones can be guessed.
const MinTokenLength = 16

// StaticTokens authenticates bootstrap tokens from a fixed list, each
// mapped to one SPIFFE ID. Only SHA-256 hashes of the tokens are kept, and
// a presented token is compared with every entry in constant time.
type StaticTokens struct {
	trustDomain spiffeid.TrustDomain
	clock       clock.PassiveClock
	// entries is replaced whole by Replace, never changed in place.
	entries atomic.Pointer[[]tokenEntry]
}

type tokenEntry struct {
	hash [sha256.Size]byte
	id   spiffeid.ID
	// expires is when the token stops being accepted; zero is never.
	expires time.Time
}

var _ Authenticator = (*StaticTokens)(nil)

// TokenFile is the YAML format of a static token file:
//
//	tokens:
//	- id: spiffe://example.org/ns/default/sa/demo
//	  sha256: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae
//	- id: spiffe://example.org/ns/default/sa/other
//	  token: a-token-of-at-least-16-characters
//
// An entry gives the token's SHA-256 (hex), or the token itself, which is
// hashed on load. Prefer sha256: the file then holds no secret. An entry
// may also give expires, an RFC 3339 time from which the token is refused
// (Unauthenticated, reason expired_token): a bootstrap token is meant to
// get a workload its first certificate, which it then renews over mTLS.
type TokenFile struct {
	Tokens []TokenFileEntry `json:"tokens"`
}

// TokenFileEntry is one token of a TokenFile.
type TokenFileEntry struct {
	ID     string `json:"id"`
	SHA256 string `json:"sha256,omitempty"`
	Token  string `json:"token,omitempty"`
	// Expires is an RFC 3339 time, such as 2026-12-31T00:00:00Z; empty
	// means the token never expires.
	Expires string `json:"expires,omitempty"`
}

// ReasonExpiredToken refuses a bootstrap token past its expires time.
const ReasonExpiredToken AuthReason = "expired_token"

// TokensOption configures NewStaticTokens.
type TokensOption func(*StaticTokens)

// WithTokensClock sets the clock that expiry times are checked against.
// The default is the real one.
func WithTokensClock(c clock.PassiveClock) TokensOption {
	return func(s *StaticTokens) { s.clock = c }
}

// LoadStaticTokens reads a token file (mode 0600 or stricter) whose IDs
// must all be in td.
func LoadStaticTokens(path string, td spiffeid.TrustDomain) (*StaticTokens, error) {
	f, err := ReadTokenFile(path)
	if err != nil {
		return nil, err
	}
	st, err := NewStaticTokens(f, td)
	if err != nil {
		return nil, fmt.Errorf("%w (token file %s)", err, path)
	}
	return st, nil
}

// ReadTokenFile reads a token file, mode 0600 or stricter.
func ReadTokenFile(path string) (TokenFile, error) {
	var f TokenFile
	data, err := securefile.ReadPrivate(path)
	if err != nil {
		return f, fmt.Errorf("identity: reading token file: %w", err)
	}
	if err := yaml.UnmarshalStrict(data, &f); err != nil {
		// The YAML error may quote the file, and the file may hold tokens.
		return f, fmt.Errorf("identity: token file %s is not valid YAML of the documented shape", path)
	}
	return f, nil
}

// NewStaticTokens returns an authenticator for the tokens of f.
func NewStaticTokens(f TokenFile, td spiffeid.TrustDomain, opts ...TokensOption) (*StaticTokens, error) {
	st := &StaticTokens{trustDomain: td, clock: clock.RealClock{}}
	for _, o := range opts {
		o(st)
	}
	if err := st.Replace(f); err != nil {
		return nil, err
	}
	return st, nil
}

// Replace makes the tokens of f the ones accepted, all at once: a call
// authenticating meanwhile sees the old list or the new one, never a mix.
// When f has a bad entry, nothing changes and the error says which entry
// and why, never quoting a token.
func (s *StaticTokens) Replace(f TokenFile) error {
	entries, err := tokenEntries(f, s.trustDomain)
	if err != nil {
		return err
	}
	s.entries.Store(&entries)
	return nil
}

// Len returns the number of tokens accepted.
func (s *StaticTokens) Len() int { return len(*s.entries.Load()) }

func tokenEntries(f TokenFile, td spiffeid.TrustDomain) ([]tokenEntry, error) {
	entries := make([]tokenEntry, 0, len(f.Tokens))
	for i, e := range f.Tokens {
		id, err := spiffeid.FromString(e.ID)
		if err != nil {
			return nil, fmt.Errorf("identity: token entry %d: id: %w", i, err)
		}
		if id.TrustDomain() != td {
			return nil, fmt.Errorf("identity: token entry %d: id %q is not in trust domain %q", i, id, td)
		}
		entry := tokenEntry{id: id}
		if e.Expires != "" {
			if entry.expires, err = time.Parse(time.RFC3339, e.Expires); err != nil {
				return nil, fmt.Errorf("identity: token entry %d: expires %q is not an RFC 3339 time such as 2026-12-31T00:00:00Z", i, e.Expires)
			}
		}
		switch {
		case e.SHA256 != "" && e.Token != "":
			return nil, fmt.Errorf("identity: token entry %d: give sha256 or token, not both", i)
		case e.SHA256 != "":
			h, err := hex.DecodeString(e.SHA256)
			if err != nil || len(h) != sha256.Size {
				return nil, fmt.Errorf("identity: token entry %d: sha256 is not 64 hex digits", i)
			}
			copy(entry.hash[:], h)
		case len(e.Token) >= MinTokenLength:
			entry.hash = sha256.Sum256([]byte(e.Token))
		case e.Token != "":
			return nil, fmt.Errorf("identity: token entry %d: token is shorter than %d characters", i, MinTokenLength)
		default:
			return nil, fmt.Errorf("identity: token entry %d: has neither sha256 nor token", i)
		}
		entries = append(entries, entry)
	}
	return entries, nil
}

// Authenticate accepts a token of the list that has not expired.
func (s *StaticTokens) Authenticate(_ context.Context, cred Credential) (Caller, error) {
	if cred.Token == "" {
		return Caller{}, ErrNotApplicable
	}
	h := sha256.Sum256([]byte(cred.Token))
	entries := *s.entries.Load()
	match := -1
	// Every entry is compared, so the time taken does not say which one
	// matched, or how much of a hash did.
	for i := range entries {
		if subtle.ConstantTimeCompare(h[:], entries[i].hash[:]) == 1 {
			match = i
		}
	}
	if match < 0 {
		return Caller{}, authErrorf(ReasonUnknownToken, nil, "bearer token is not known")
	}
	if exp := entries[match].expires; !exp.IsZero() && !s.clock.Now().Before(exp) {
		return Caller{}, authErrorf(ReasonExpiredToken, nil, "bootstrap token for %s expired at %s; renew over mTLS with the current certificate, or ask the operator for a new token",
			entries[match].id, exp.UTC().Format(time.RFC3339))
	}
	return Caller{
		ID:      entries[match].id,
		Method:  MethodBootstrapToken,
		Subject: "token-sha256:" + hex.EncodeToString(h[:4]),
	}, nil
}
