package ca

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"time"
)

// Upstream is an authority outside this process that holds the trust
// domain's roots and signs the CA's intermediates, such as Vault's PKI
// engine (package ca/vaultca). The intermediate's key is made here and
// never leaves the process: the upstream sees only a CSR.
type Upstream interface {
	// SignIntermediate has the upstream sign csr (DER) as an intermediate
	// CA certificate valid for ttl, or less where the upstream caps it. It
	// returns the certificate first and the root that signed it last.
	SignIntermediate(ctx context.Context, csr []byte, ttl time.Duration) ([]*x509.Certificate, error)

	// Roots returns the upstream's roots, every one of which belongs in
	// the trust bundle.
	Roots(ctx context.Context) ([]*x509.Certificate, error)
}

// Errors an Upstream wraps, so that callers can tell a passing outage from
// a refusal and from a misconfiguration (which wraps neither).
var (
	// ErrUpstreamUnavailable: the upstream could not be reached or did not
	// answer (refused connection, timeout, sealed, overloaded). The CA
	// goes on signing with its current intermediate; retry later.
	ErrUpstreamUnavailable = errors.New("ca: the upstream authority is unavailable")

	// ErrUpstreamDenied: the upstream refused this CA's credentials or
	// their policy does not allow the request.
	ErrUpstreamDenied = errors.New("ca: the upstream authority denied the request")
)

// UpstreamIntermediate is an intermediate signed by an upstream, with its
// key, which was made here.
type UpstreamIntermediate struct {
	Authority

	// Root is the upstream root that signed it.
	Root *x509.Certificate
}

// NewUpstreamIntermediate makes a P-256 key, has up sign an intermediate
// for it carrying the trust domain's SPIFFE ID, and checks what comes
// back: a CA certificate with keyCertSign for this key and this trust
// domain, valid now, signed directly by a root that is one of roots (the
// upstream's roots, as the caller last read them).
func NewUpstreamIntermediate(ctx context.Context, opts AuthorityOptions, up Upstream, roots []*x509.Certificate) (UpstreamIntermediate, error) {
	opts = opts.complete()
	if opts.TrustDomain.IsZero() {
		return UpstreamIntermediate{}, errors.New("ca: a trust domain is required")
	}
	key, err := newCAKey()
	if err != nil {
		return UpstreamIntermediate{}, err
	}
	serial, err := newSerial()
	if err != nil {
		return UpstreamIntermediate{}, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{
			Organization: []string{"meshca"},
			CommonName:   fmt.Sprintf("meshca intermediate %s %x", opts.TrustDomain.Name(), serial.Bytes()[:4]),
		},
		URIs: []*url.URL{opts.TrustDomain.ID().URL()},
	}, key)
	if err != nil {
		return UpstreamIntermediate{}, fmt.Errorf("ca: creating the intermediate's CSR: %w", err)
	}
	chain, err := up.SignIntermediate(ctx, csr, opts.IntermediateTTL)
	if err != nil {
		return UpstreamIntermediate{}, err
	}
	inter := UpstreamIntermediate{Authority: Authority{Signer: key}}
	if len(chain) != 2 {
		return UpstreamIntermediate{}, fmt.Errorf("ca: the upstream returned a chain of %d certificates; want the intermediate and the root that signed it (meshca's intermediates are signed by a root)", len(chain))
	}
	inter.Cert, inter.Root = chain[0], chain[1]
	if err := inter.validateIssuer(opts.Clock.Now()); err != nil {
		return UpstreamIntermediate{}, fmt.Errorf("ca: the upstream's intermediate: %w", err)
	}
	if len(inter.Cert.URIs) != 1 || inter.Cert.URIs[0].String() != opts.TrustDomain.IDString() {
		return UpstreamIntermediate{}, fmt.Errorf("ca: the upstream's intermediate has URI SANs %q; want only %q", inter.Cert.URIs, opts.TrustDomain.IDString())
	}
	if !isSelfSigned(inter.Root) {
		return UpstreamIntermediate{}, fmt.Errorf("ca: the upstream signed the intermediate with %q, which is not a root; meshca's intermediates are signed by a root", inter.Root.Subject)
	}
	if err := inter.Cert.CheckSignatureFrom(inter.Root); err != nil {
		return UpstreamIntermediate{}, fmt.Errorf("ca: the upstream's intermediate is not signed by the root it names: %w", err)
	}
	if !slices.ContainsFunc(roots, func(r *x509.Certificate) bool { return bytes.Equal(r.Raw, inter.Root.Raw) }) {
		return UpstreamIntermediate{}, fmt.Errorf("ca: the upstream's intermediate chains to %q, which is not one of its roots", inter.Root.Subject)
	}
	return inter, nil
}

// isSelfSigned reports whether c is a root: a CA certificate that names
// itself as issuer and verifies its own signature.
func isSelfSigned(c *x509.Certificate) bool {
	return c.IsCA && bytes.Equal(c.RawSubject, c.RawIssuer) && c.CheckSignatureFrom(c) == nil
}

// WithUpstreamRoots returns a copy of s whose roots follow an upstream's:
//
//   - the root the issuer chains to is active, whether or not the upstream
//     still holds it;
//   - every other root the upstream holds is prepared (in the bundle, not
//     signing here), or retiring while leaves of a former issuer it signed
//     may still be valid;
//   - a root the upstream no longer holds stays, retiring, while such
//     leaves may be valid, and leaves the bundle after them.
//
// Roots keep their order; new ones come last. When the bundle's roots
// change, Sequence goes up and the new roots record it. changed reports
// whether the returned set differs from s at all. roots must not be
// empty: an upstream that reports none is failing, not rotating.
func (s *AuthoritySet) WithUpstreamRoots(roots []*x509.Certificate, now time.Time) (_ *AuthoritySet, changed bool, err error) {
	if len(roots) == 0 {
		return nil, false, errors.New("ca: the upstream reports no roots")
	}
	upstream := func(c *x509.Certificate) bool {
		return slices.ContainsFunc(roots, func(r *x509.Certificate) bool { return bytes.Equal(r.Raw, c.Raw) })
	}
	anchorsLeaves := func(root *x509.Certificate) bool {
		return slices.ContainsFunc(s.RetiringIssuers, func(r RetiringIssuer) bool {
			return now.Before(r.LeavesUntil) && r.Cert.CheckSignatureFrom(root) == nil
		})
	}
	n := s.Clone()
	n.Roots = n.Roots[:0:0]
	var active bool
	for _, r := range s.Roots {
		state := RootPrepared
		switch {
		case !active && s.issuerSignedBy(r.Cert):
			state, active = RootActive, true
		case anchorsLeaves(r.Cert):
			state = RootRetiring
		case !upstream(r.Cert):
			changed = true // gone from the upstream and from every live chain
			continue
		}
		if state != r.State {
			r.State, r.Since, changed = state, now, true
		}
		n.Roots = append(n.Roots, r)
	}
	added := false
	for _, c := range roots {
		if slices.ContainsFunc(n.Roots, func(r Root) bool { return bytes.Equal(r.Cert.Raw, c.Raw) }) {
			continue
		}
		if !isSelfSigned(c) {
			return nil, false, fmt.Errorf("ca: the upstream's root %q is not a self-signed CA certificate", c.Subject)
		}
		state := RootPrepared
		if !active && s.issuerSignedBy(c) {
			state, active = RootActive, true
		}
		n.Roots = append(n.Roots, Root{Authority: Authority{Cert: c}, State: state, Since: now})
		added, changed = true, true
	}
	if !active {
		return nil, false, errors.New("ca: the issuer chains to none of the set's roots nor of the upstream's")
	}
	if added || len(n.Roots) != len(s.Roots) {
		n.Sequence++
		for i := range n.Roots {
			if n.Roots[i].BundleSequence == 0 {
				n.Roots[i].BundleSequence = n.Sequence
			}
		}
		// Cross-signed copies of the active root by roots that left serve
		// no one.
		n.Chain = slices.DeleteFunc(n.Chain, func(c *x509.Certificate) bool {
			return !slices.ContainsFunc(n.Roots, func(r Root) bool { return c.CheckSignatureFrom(r.Cert) == nil })
		})
	}
	return n, changed, nil
}

// issuerSignedBy reports whether root signed the issuer. (Not through
// Chain: the copies of the active root cross-signed by retiring roots
// would make those roots look active too.)
func (s *AuthoritySet) issuerSignedBy(root *x509.Certificate) bool {
	return s.Issuer.Cert != nil && s.Issuer.Cert.CheckSignatureFrom(root) == nil
}

// LoadOrCreateUpstream is LoadOrCreate for a CA whose roots are held by
// an upstream: it loads the authority set from store, or, when the store
// has none, gets a first intermediate from up and saves the new set before
// returning. With a saved set it does not call up at all, so the CA starts
// while the upstream is down; the one exception is an issuer that has
// expired (the server was down longer than its life), which is replaced by
// a new intermediate from up, saved first.
//
// Errors from up are wrapped: errors.Is(err, ErrUpstreamUnavailable) tells
// a first start (or an expired issuer) that must wait for the upstream.
func LoadOrCreateUpstream(ctx context.Context, store Store, opts AuthorityOptions, up Upstream) (*AuthoritySet, error) {
	opts = opts.complete()
	set, err := store.Load(ctx)
	switch {
	case errors.Is(err, ErrNotFound):
		set = &AuthoritySet{TrustDomain: opts.TrustDomain}
	case err != nil:
		return nil, err
	case set.TrustDomain != opts.TrustDomain:
		return nil, fmt.Errorf("ca: stored authorities are for trust domain %q, configured is %q; a trust domain cannot be renamed in place", set.TrustDomain, opts.TrustDomain)
	}
	now := opts.Clock.Now()
	if set.Issuer.Cert != nil && now.Before(set.Issuer.Cert.NotAfter) {
		if err := set.Validate(now); err != nil {
			return nil, err
		}
		return set, nil
	}
	what := "no authorities are saved yet"
	if set.Issuer.Cert != nil {
		what = fmt.Sprintf("the saved issuer expired at %s", set.Issuer.Cert.NotAfter.UTC().Format(time.RFC3339))
	}
	roots, err := up.Roots(ctx)
	if err != nil {
		return nil, fmt.Errorf("ca: %s and the upstream's roots cannot be read: %w", what, err)
	}
	inter, err := NewUpstreamIntermediate(ctx, opts, up, roots)
	if err != nil {
		return nil, fmt.Errorf("ca: %s and the upstream did not sign an intermediate: %w", what, err)
	}
	next := set.Clone()
	next.Issuer, next.IssuerSince, next.NextIssuer = inter.Authority, now, nil
	// An expired issuer's leaves have all expired too, and so has every
	// cross-signed copy made for it.
	next.RetiringIssuers, next.Chain = nil, nil
	if next, _, err = next.WithUpstreamRoots(roots, now); err != nil {
		return nil, err
	}
	if err := next.Validate(now); err != nil {
		return nil, err
	}
	if err := store.Save(ctx, next); err != nil {
		return nil, err
	}
	return next, nil
}
