package federation

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"slices"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Profile is how a bundle endpoint authenticates itself to its clients
// (SPIFFE Federation, section 5).
type Profile string

// The bundle endpoint profiles of the SPIFFE Federation standard.
const (
	// ProfileHTTPSWeb: the endpoint presents a Web PKI certificate for its
	// host name; clients verify it against Web PKI roots.
	ProfileHTTPSWeb Profile = "https_web"

	// ProfileHTTPSSPIFFE: the endpoint presents an X509-SVID of its own
	// trust domain; clients verify it against that trust domain's bundle,
	// bootstrapped out of band and then kept up to date from the endpoint.
	ProfileHTTPSSPIFFE Profile = "https_spiffe"
)

// maxURLLength bounds a peer's endpoint URL.
const maxURLLength = 2048

// Peer is a trust domain this one federates with: where its bundle
// endpoint is and how to authenticate it.
type Peer struct {
	// TrustDomain is the peer's trust domain. Required; never this
	// server's own.
	TrustDomain spiffeid.TrustDomain

	// URL is the bundle endpoint, an https URL without user information.
	// Required.
	URL string

	// Profile is the endpoint's profile. Required.
	Profile Profile

	// EndpointID is the SPIFFE ID the endpoint's X509-SVID must carry, a
	// member of TrustDomain (meshca serves spiffe://<td>/meshca/server
	// unless configured otherwise). Required for https_spiffe, empty for
	// https_web.
	EndpointID spiffeid.ID

	// WebRoots verify the endpoint's certificate for https_web; empty
	// means the system's roots. Empty for https_spiffe.
	WebRoots []*x509.Certificate

	// Bootstrap is the peer's bundle obtained out of band, trusted to
	// authenticate the endpoint until the first fetch and published as the
	// peer's bundle until then. Required for https_spiffe, nil for
	// https_web.
	Bootstrap *spiffebundle.Bundle
}

// validate checks p for a server of trust domain own.
func (p Peer) validate(own spiffeid.TrustDomain) error {
	if p.TrustDomain.IsZero() {
		return fmt.Errorf("%w: no trust domain", ErrInvalidPeer)
	}
	if p.TrustDomain == own {
		return fmt.Errorf("%w: %q is this server's own trust domain", ErrInvalidPeer, p.TrustDomain)
	}
	if err := validateURL(p.URL); err != nil {
		return fmt.Errorf("%w: trust domain %q: %w", ErrInvalidPeer, p.TrustDomain, err)
	}
	switch p.Profile {
	case ProfileHTTPSWeb:
		if !p.EndpointID.IsZero() {
			return fmt.Errorf("%w: trust domain %q: an endpoint SPIFFE ID is for profile https_spiffe only", ErrInvalidPeer, p.TrustDomain)
		}
		if p.Bootstrap != nil {
			return fmt.Errorf("%w: trust domain %q: a bootstrap bundle is for profile https_spiffe only", ErrInvalidPeer, p.TrustDomain)
		}
		for i, c := range p.WebRoots {
			if c == nil {
				return fmt.Errorf("%w: trust domain %q: Web PKI root %d is missing", ErrInvalidPeer, p.TrustDomain, i)
			}
		}
	case ProfileHTTPSSPIFFE:
		if p.EndpointID.IsZero() {
			return fmt.Errorf("%w: trust domain %q: profile https_spiffe needs the endpoint's SPIFFE ID", ErrInvalidPeer, p.TrustDomain)
		}
		if !p.EndpointID.MemberOf(p.TrustDomain) {
			return fmt.Errorf("%w: endpoint SPIFFE ID %q is not in trust domain %q", ErrInvalidPeer, p.EndpointID, p.TrustDomain)
		}
		if len(p.WebRoots) > 0 {
			return fmt.Errorf("%w: trust domain %q: Web PKI roots are for profile https_web only", ErrInvalidPeer, p.TrustDomain)
		}
		if p.Bootstrap == nil {
			return fmt.Errorf("%w: trust domain %q: profile https_spiffe needs a bootstrap bundle of the peer, obtained out of band", ErrInvalidPeer, p.TrustDomain)
		}
		if p.Bootstrap.TrustDomain() != p.TrustDomain {
			return fmt.Errorf("%w: the bootstrap bundle is for %q, the peer is %q", ErrInvalidPeer, p.Bootstrap.TrustDomain(), p.TrustDomain)
		}
		if ferr := checkAuthorities(p.TrustDomain, p.Bootstrap); ferr != nil {
			return fmt.Errorf("%w: trust domain %q: bootstrap bundle: %w", ErrInvalidPeer, p.TrustDomain, ferr.Err)
		}
	case "":
		return fmt.Errorf("%w: trust domain %q: no profile; want %q or %q", ErrInvalidPeer, p.TrustDomain, ProfileHTTPSWeb, ProfileHTTPSSPIFFE)
	default:
		return fmt.Errorf("%w: trust domain %q: unknown profile %q; want %q or %q", ErrInvalidPeer, p.TrustDomain, p.Profile, ProfileHTTPSWeb, ProfileHTTPSSPIFFE)
	}
	return nil
}

// validateURL checks that raw is an absolute https URL without user
// information or fragment. Its errors never echo user information.
func validateURL(raw string) error {
	if raw == "" {
		return errors.New("no bundle endpoint URL")
	}
	if len(raw) > maxURLLength {
		return fmt.Errorf("bundle endpoint URL is longer than %d bytes", maxURLLength)
	}
	u, err := url.Parse(raw)
	if err != nil {
		return errors.New("bundle endpoint URL does not parse")
	}
	if u.User != nil {
		return errors.New("bundle endpoint URL carries user information; credentials do not belong in it")
	}
	if u.Scheme != "https" {
		return fmt.Errorf("bundle endpoint URL %q: scheme must be https", u.Redacted())
	}
	if u.Host == "" || u.Hostname() == "" {
		return fmt.Errorf("bundle endpoint URL %q has no host", u.Redacted())
	}
	if u.Fragment != "" {
		return fmt.Errorf("bundle endpoint URL %q has a fragment", u.Redacted())
	}
	return nil
}

// clone returns a copy of p whose slices and bundle can be kept.
func (p Peer) clone() Peer {
	p.WebRoots = slices.Clone(p.WebRoots)
	if p.Bootstrap != nil {
		p.Bootstrap = p.Bootstrap.Clone()
	}
	return p
}
