package identity

import (
	"context"
	"crypto/x509"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"k8s.io/utils/clock"
)

// Bounds on a presented client certificate chain, checked before any
// verification work. A workload's chain is its leaf and the intermediates
// up to a root: two or three certificates of about 1 KiB each; a nested
// deployment adds a few.
const (
	// MaxClientChainLength is the most certificates a chain may hold.
	MaxClientChainLength = 8

	// MaxClientChainBytes is the largest total DER size of a chain.
	MaxClientChainBytes = 32 << 10
)

// ReasonChainTooLarge refuses a client certificate chain over
// MaxClientChainLength or MaxClientChainBytes.
const ReasonChainTooLarge AuthReason = "chain_too_large"

// SVIDAuthenticator authenticates a caller renewing with its current
// X509-SVID, presented as the TLS client certificate. The chain is
// verified against the live bundle on every call, so a caller under a
// retired root is refused as soon as the root leaves the bundle.
type SVIDAuthenticator struct {
	trustDomain spiffeid.TrustDomain
	bundle      x509bundle.Source
	clock       clock.PassiveClock
}

var _ Authenticator = (*SVIDAuthenticator)(nil)

// NewSVIDAuthenticator returns an authenticator accepting SVIDs of td that
// verify against bundle. A nil clock means the real one.
func NewSVIDAuthenticator(td spiffeid.TrustDomain, bundle x509bundle.Source, clk clock.PassiveClock) *SVIDAuthenticator {
	if clk == nil {
		clk = clock.RealClock{}
	}
	return &SVIDAuthenticator{trustDomain: td, bundle: bundle, clock: clk}
}

// Authenticate verifies cred.PeerCertificates as an X509-SVID of the
// trust domain. A chain over MaxClientChainLength certificates or
// MaxClientChainBytes is refused, with ReasonChainTooLarge, before any
// verification.
func (a *SVIDAuthenticator) Authenticate(_ context.Context, cred Credential) (Caller, error) {
	if len(cred.PeerCertificates) == 0 {
		return Caller{}, ErrNotApplicable
	}
	if err := checkChainSize(cred.PeerCertificates); err != nil {
		return Caller{}, err
	}
	leaf := cred.PeerCertificates[0]
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return Caller{}, authErrorf(ReasonBadCertificate, err, "client certificate is not an X509-SVID")
	}
	if id.TrustDomain() != a.trustDomain {
		return Caller{}, authErrorf(ReasonBadCertificate, nil, "client certificate is for trust domain %q; this CA renews only %q", id.TrustDomain(), a.trustDomain)
	}
	if _, _, err := x509svid.Verify(cred.PeerCertificates, a.bundle, x509svid.WithTime(a.clock.Now())); err != nil {
		return Caller{}, authErrorf(ReasonBadCertificate, err, "client certificate does not verify against the trust bundle")
	}
	return Caller{
		ID:      id,
		Method:  MethodMTLS,
		Subject: fmt.Sprintf("serial:%x", leaf.SerialNumber),
	}, nil
}

// checkChainSize refuses a chain too long or too large to be worth
// verifying.
func checkChainSize(chain []*x509.Certificate) error {
	if n := len(chain); n > MaxClientChainLength {
		return authErrorf(ReasonChainTooLarge, nil, "client certificate chain has %d certificates, more than the limit of %d; present your SVID and its intermediates only", n, MaxClientChainLength)
	}
	size := 0
	for _, c := range chain {
		size += len(c.Raw)
	}
	if size > MaxClientChainBytes {
		return authErrorf(ReasonChainTooLarge, nil, "client certificate chain is %d bytes, more than the limit of %d; present your SVID and its intermediates only", size, MaxClientChainBytes)
	}
	return nil
}
