package ca

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/utils/clock"
)

// ErrNoIssuer is returned by Sign when the CA has no issuer valid now.
var ErrNoIssuer = errors.New("ca: no valid issuing authority")

// Options configure a CA. The zero value is usable.
type Options struct {
	// TTL decides issued lifetimes; the zero value is 1h default, 24h max.
	TTL TTLPolicy

	// Clock tells the time; nil means the real clock.
	Clock clock.PassiveClock
}

// CA issues X509-SVIDs with its current authority set. It is safe for
// concurrent use; the set can be swapped while it signs.
type CA struct {
	td    spiffeid.TrustDomain
	ttl   TTLPolicy
	clock clock.PassiveClock

	mu      sync.RWMutex
	current *snapshot
	changed chan struct{} // closed and replaced when the bundle changes
}

// snapshot is an authority set with what is derived from it once.
type snapshot struct {
	set    *AuthoritySet
	bundle *x509bundle.Bundle
	chain  []*x509.Certificate // issuer first, no root

	// verified is set once a signature of the fast path (signLeaf) has
	// been checked against the issuer's certificate.
	verified atomic.Bool

	// leafExtensions are the issuer's constant leaf extensions, encoded
	// once (leafExtensionsOf).
	leafExtensions leafExtensions
}

// Issued is a signed certificate with the chain to serve with it.
type Issued struct {
	// Cert is the issued certificate.
	Cert *x509.Certificate

	// Chain is Cert, then the intermediates up to (not including) a root.
	Chain []*x509.Certificate

	// BundleSequence is the sequence of the bundle that verifies Chain.
	BundleSequence uint64

	// TTL is the lifetime granted, from the moment of signing to
	// Cert.NotAfter (NotBefore's backdating not counted): the TTL
	// policy's answer to SignRequest.TTL, cut short when the issuer
	// expires sooner.
	TTL time.Duration

	// TTLClamped reports that TTL is shorter than a SignRequest.TTL that
	// asked for a lifetime (more than zero): the policy's maximum or the
	// issuer's expiry cut it.
	TTLClamped bool
}

// New returns a CA signing with set.
func New(set *AuthoritySet, opts Options) (*CA, error) {
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
	}
	if opts.TTL.Default > 0 && opts.TTL.Max > 0 && opts.TTL.Default > opts.TTL.Max {
		return nil, fmt.Errorf("ca: default TTL %s is longer than the maximum %s", opts.TTL.Default, opts.TTL.Max)
	}
	if err := set.Validate(opts.Clock.Now()); err != nil {
		return nil, err
	}
	c := &CA{
		td:      set.TrustDomain,
		ttl:     opts.TTL,
		clock:   opts.Clock,
		changed: make(chan struct{}),
	}
	c.current = newSnapshot(set)
	return c, nil
}

func newSnapshot(set *AuthoritySet) *snapshot {
	chain := make([]*x509.Certificate, 0, 1+len(set.Chain))
	chain = append(chain, set.Issuer.Cert)
	chain = append(chain, set.Chain...)
	return &snapshot{set: set, bundle: set.Bundle(), chain: chain, leafExtensions: leafExtensionsOf(set.Issuer.Cert)}
}

// TrustDomain returns the trust domain the CA issues for.
func (c *CA) TrustDomain() spiffeid.TrustDomain { return c.td }

func (c *CA) snapshot() *snapshot {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.current
}

// createLeaf signs tmpl with crypto/x509, for an issuer off the fast path
// (signLeaf): CreateCertificate checks the signature it makes.
func createLeaf(tmpl *x509.Certificate, issuer Authority, pub any) (*x509.Certificate, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer.Cert, pub, issuer.Signer)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// Authorities returns the current authority set. It must not be modified.
func (c *CA) Authorities() *AuthoritySet { return c.snapshot().set }

// SetAuthorities makes set current. Its Sequence never goes back, and must
// be higher when its roots differ from the current ones; bundle watchers
// are told of every new sequence.
func (c *CA) SetAuthorities(set *AuthoritySet) error {
	if set.TrustDomain != c.td {
		return fmt.Errorf("ca: authority set is for %q, the CA for %q", set.TrustDomain, c.td)
	}
	if err := set.Validate(c.clock.Now()); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.current.set
	bundleChanged := !sameCerts(old.Roots, set.Roots)
	switch {
	case set.Sequence < old.Sequence:
		return fmt.Errorf("ca: bundle sequence %d would go back from %d", set.Sequence, old.Sequence)
	case bundleChanged && set.Sequence == old.Sequence:
		return fmt.Errorf("ca: bundle changed but sequence %d is not above %d", set.Sequence, old.Sequence)
	}
	c.current = newSnapshot(set)
	if bundleChanged || set.Sequence != old.Sequence {
		close(c.changed)
		c.changed = make(chan struct{})
	}
	return nil
}

// Bundle returns the current trust bundle and its sequence.
func (c *CA) Bundle() (*x509bundle.Bundle, uint64) {
	s := c.snapshot()
	return s.bundle, s.set.Sequence
}

// WatchBundle returns the current bundle, its sequence, and a channel that
// is closed when the bundle next changes.
func (c *CA) WatchBundle() (*x509bundle.Bundle, uint64, <-chan struct{}) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.current.bundle, c.current.set.Sequence, c.changed
}

// GetX509BundleForTrustDomain implements x509bundle.Source with the CA's
// own bundle, so that callers' SVIDs can be verified against the live
// roots.
func (c *CA) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td != c.td {
		return nil, fmt.Errorf("ca: no bundle for trust domain %q", td)
	}
	b, _ := c.Bundle()
	return b, nil
}

// Sign issues a certificate for req. req must already be validated and
// authorised; a request outside the CA's trust domain is a programming
// error and refused.
func (c *CA) Sign(ctx context.Context, req SignRequest) (*Issued, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if req.ID.TrustDomain() != c.td {
		return nil, fmt.Errorf("ca: cannot sign %q: not in trust domain %q", req.ID, c.td)
	}
	if req.DNSOnly && len(req.DNSNames) == 0 {
		return nil, fmt.Errorf("ca: cannot sign %q: a DNSOnly request needs DNSNames", req.ID)
	}
	s := c.snapshot()
	issuer := s.set.Issuer
	now := c.clock.Now()
	if !now.Before(issuer.Cert.NotAfter) {
		return nil, fmt.Errorf("%w: the issuer expired at %s", ErrNoIssuer, issuer.Cert.NotAfter.UTC())
	}
	ttl := c.ttl.TTL(req.TTL)
	if left := issuer.Cert.NotAfter.Sub(now); ttl > left {
		ttl = left
	}
	notAfter := now.Add(ttl)
	notBefore := now.Add(-backdate(notAfter.Sub(now)))
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	tmpl := leafTemplate(req, serial, notBefore, notAfter)
	var cert *x509.Certificate
	key, fast := fastSigner(tmpl, issuer)
	if fast {
		cert, err = signLeaf(tmpl, issuer.Cert, s.leafExtensions, req.PublicKey, key)
	} else {
		cert, err = createLeaf(tmpl, issuer, req.PublicKey)
	}
	if err != nil {
		return nil, fmt.Errorf("ca: signing %q: %w", req.ID, err)
	}
	if fast && !s.verified.Load() {
		if err := cert.CheckSignatureFrom(issuer.Cert); err != nil {
			return nil, fmt.Errorf("%w: %w", errSignature, err)
		}
		s.verified.Store(true)
	}
	chain := make([]*x509.Certificate, 0, 1+len(s.chain))
	chain = append(chain, cert)
	chain = append(chain, s.chain...)
	return &Issued{
		Cert:           cert,
		Chain:          chain,
		BundleSequence: s.set.Sequence,
		TTL:            ttl,
		TTLClamped:     req.TTL > 0 && ttl < req.TTL,
	}, nil
}
