package federation

import (
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Errors of the peer registry, for callers to tell apart with errors.Is:
// an admin API answers InvalidArgument, AlreadyExists, NotFound and
// ResourceExhausted for them, in this order.
var (
	// ErrInvalidPeer wraps every reason a Peer is refused.
	ErrInvalidPeer = errors.New("federation: invalid peer")

	// ErrPeerExists is returned when adding a trust domain already
	// federated with.
	ErrPeerExists = errors.New("federation: trust domain is already a peer")

	// ErrUnknownPeer is returned for a trust domain that is not a peer.
	ErrUnknownPeer = errors.New("federation: trust domain is not a peer")

	// ErrTooManyPeers is returned when adding a peer beyond
	// Options.MaxPeers.
	ErrTooManyPeers = errors.New("federation: too many peers")
)

// Reason says why a peer's bundle was not taken. It is also the result
// label of meshca_federation_fetches_total.
type Reason string

// The reasons a fetched bundle is refused. In every case the peer's last
// good bundle is kept.
const (
	// ReasonTransport: the endpoint could not be reached, or the request
	// timed out.
	ReasonTransport Reason = "transport"

	// ReasonEndpointAuth: the endpoint's TLS certificate did not verify:
	// for https_web against the Web PKI roots, for https_spiffe against
	// the peer's last good bundle and the expected endpoint SPIFFE ID.
	ReasonEndpointAuth Reason = "endpoint_authentication"

	// ReasonHTTPStatus: the endpoint answered with a status other than 200
	// (redirects are not followed).
	ReasonHTTPStatus Reason = "http_status"

	// ReasonTooLarge: the body is larger than Options.MaxBundleSize.
	ReasonTooLarge Reason = "too_large"

	// ReasonMalformed: the body is not a SPIFFE bundle document.
	ReasonMalformed Reason = "malformed"

	// ReasonWrongTrustDomain: an X.509 authority of the bundle carries the
	// SPIFFE ID of another trust domain.
	ReasonWrongTrustDomain Reason = "wrong_trust_domain"

	// ReasonNoAuthorities: the bundle holds no X.509 authority.
	ReasonNoAuthorities Reason = "no_x509_authorities"

	// ReasonStaleSequence: the bundle's spiffe_sequence is lower than the
	// last good bundle's (a lagging replica, a cache or a replay).
	ReasonStaleSequence Reason = "stale_sequence"

	// ReasonSequenceConflict: the bundle has the last good bundle's
	// spiffe_sequence but other authorities, so one of the two is not what
	// the peer published under that sequence.
	ReasonSequenceConflict Reason = "sequence_conflict"

	// ReasonMissingSequence: the bundle has no spiffe_sequence while the
	// last good bundle had one, so it cannot be ordered after it.
	ReasonMissingSequence Reason = "missing_sequence"
)

// FetchError is why a fetch of a peer's bundle failed or its bundle was
// refused. It never holds a key or a credential, and never the body the
// endpoint sent.
type FetchError struct {
	// TrustDomain is the peer's.
	TrustDomain spiffeid.TrustDomain

	// Reason classifies the failure.
	Reason Reason

	// Err says what was wrong.
	Err error
}

// Error says which peer's bundle, the reason and what was wrong.
func (e *FetchError) Error() string {
	return fmt.Sprintf("federation: bundle of %q: %s: %v", e.TrustDomain, e.Reason, e.Err)
}

// Unwrap returns Err.
func (e *FetchError) Unwrap() error { return e.Err }
