// Package fake provides a Source for tests of package sds and of what
// serves it: the test sets the SVID and bundles, and each setter notifies
// Changed as rotation.Source does.
//
//	src := fake.NewSource().WithBundle(root.Bundle())
//	srv, _ := sds.New(sds.Options{Source: src})
//	...
//	src.SetX509SVID(inter.CreateX509SVID(id)) // streams are pushed the new secret
package fake

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshca/meshca/agent/sds"
)

var _ sds.Source = (*Source)(nil)

// Source is an sds.Source whose state the test sets. It is safe for
// concurrent use. The zero value is not usable; call NewSource.
type Source struct {
	mu        sync.Mutex
	svid      *x509svid.SVID
	bundles   map[spiffeid.TrustDomain]*x509bundle.Bundle
	federated []*x509bundle.Bundle
	changed   chan struct{}
}

// NewSource returns a Source with no SVID and no bundle.
func NewSource() *Source {
	return &Source{
		bundles: make(map[spiffeid.TrustDomain]*x509bundle.Bundle),
		changed: make(chan struct{}),
	}
}

// WithX509SVID sets the SVID, as SetX509SVID, and returns s.
func (s *Source) WithX509SVID(svid *x509svid.SVID) *Source {
	s.SetX509SVID(svid)
	return s
}

// WithBundle sets a trust domain's bundle, as SetBundle, and returns s.
func (s *Source) WithBundle(b *x509bundle.Bundle) *Source {
	s.SetBundle(b)
	return s
}

// WithFederatedBundles sets the federated bundles, as SetFederatedBundles,
// and returns s.
func (s *Source) WithFederatedBundles(bundles ...*x509bundle.Bundle) *Source {
	s.SetFederatedBundles(bundles...)
	return s
}

// SetX509SVID replaces the SVID and notifies Changed. Nil means none.
func (s *Source) SetX509SVID(svid *x509svid.SVID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.svid = svid
	s.notifyLocked()
}

// SetBundle replaces the bundle of b's trust domain and notifies Changed.
func (s *Source) SetBundle(b *x509bundle.Bundle) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.bundles[b.TrustDomain()] = b
	s.notifyLocked()
}

// SetFederatedBundles replaces the federated bundles and notifies Changed.
// FederatedBundles returns them sorted by trust domain.
func (s *Source) SetFederatedBundles(bundles ...*x509bundle.Bundle) {
	bundles = slices.Clone(bundles)
	slices.SortFunc(bundles, func(a, b *x509bundle.Bundle) int {
		return strings.Compare(a.TrustDomain().Name(), b.TrustDomain().Name())
	})
	s.mu.Lock()
	defer s.mu.Unlock()
	s.federated = bundles
	s.notifyLocked()
}

// GetX509SVID returns the SVID, or an error when none is set.
func (s *Source) GetX509SVID() (*x509svid.SVID, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.svid == nil {
		return nil, errors.New("fake: no X509-SVID yet")
	}
	return s.svid, nil
}

// GetX509BundleForTrustDomain returns the bundle set for td, or an error.
func (s *Source) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.bundles[td]
	if !ok {
		return nil, fmt.Errorf("fake: no bundle for trust domain %q", td)
	}
	return b, nil
}

// FederatedBundles returns the federated bundles, sorted by trust domain.
func (s *Source) FederatedBundles() []*x509bundle.Bundle {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.federated)
}

// Changed returns a channel closed at the next Set.
func (s *Source) Changed() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changed
}

func (s *Source) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}
