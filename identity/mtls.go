package identity

import (
	"context"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"k8s.io/utils/clock"
)

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
// trust domain.
func (a *SVIDAuthenticator) Authenticate(_ context.Context, cred Credential) (Caller, error) {
	if len(cred.PeerCertificates) == 0 {
		return Caller{}, ErrNotApplicable
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
