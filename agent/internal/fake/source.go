// Package fake is a source of an X509-SVID and bundles for the agent's
// tests: what rotation.Source gives the Workload API, SDS and files
// servers, set by hand.
package fake

import (
	"errors"
	"slices"
	"strings"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Source holds an SVID, the bundle of its trust domain and federated
// bundles, and closes its Changed channel on every set. It is safe for
// concurrent use.
type Source struct {
	mu        sync.Mutex
	svid      *x509svid.SVID
	svidErr   error
	bundles   map[spiffeid.TrustDomain]*x509bundle.Bundle
	federated []*x509bundle.Bundle
	changed   chan struct{}
}

// NewSource returns a source holding bundles (none is allowed) and no
// SVID.
func NewSource(bundles ...*x509bundle.Bundle) *Source {
	s := &Source{bundles: make(map[spiffeid.TrustDomain]*x509bundle.Bundle), changed: make(chan struct{})}
	for _, b := range bundles {
		s.bundles[b.TrustDomain()] = b
	}
	return s
}

// WithSVID sets the SVID and notifies Changed; it returns s.
func (s *Source) WithSVID(svid *x509svid.SVID) *Source {
	s.set(func() { s.svid, s.svidErr = svid, nil })
	return s
}

// WithSVIDError makes GetX509SVID fail with err, as a source whose SVID
// expired does, without notifying Changed (expiry is not a change); it
// returns s.
func (s *Source) WithSVIDError(err error) *Source {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.svidErr = err
	return s
}

// WithBundle sets the bundle of its trust domain (the SVID's, for the
// source's users) and notifies Changed; it returns s.
func (s *Source) WithBundle(bundle *x509bundle.Bundle) *Source {
	s.set(func() { s.bundles[bundle.TrustDomain()] = bundle })
	return s
}

// WithFederated sets the federated bundles (sorted here) and notifies
// Changed; it returns s.
func (s *Source) WithFederated(bundles ...*x509bundle.Bundle) *Source {
	sorted := slices.Clone(bundles)
	slices.SortFunc(sorted, func(a, b *x509bundle.Bundle) int {
		return strings.Compare(a.TrustDomain().Name(), b.TrustDomain().Name())
	})
	s.set(func() { s.federated = sorted })
	return s
}

// Notify closes the Changed channel without changing anything.
func (s *Source) Notify() { s.set(func() {}) }

func (s *Source) set(f func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f()
	close(s.changed)
	s.changed = make(chan struct{})
}

// GetX509SVID returns the SVID, or an error when there is none.
func (s *Source) GetX509SVID() (*x509svid.SVID, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.svidErr != nil {
		return nil, s.svidErr
	}
	if s.svid == nil {
		return nil, errors.New("fake: no X509-SVID yet")
	}
	return s.svid, nil
}

// GetX509BundleForTrustDomain returns the bundle of td: one set with
// NewSource or WithBundle, or a federated one.
func (s *Source) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if b, ok := s.bundles[td]; ok {
		return b, nil
	}
	for _, b := range s.federated {
		if b.TrustDomain() == td {
			return b, nil
		}
	}
	return nil, errors.New("fake: no bundle for " + td.Name())
}

// FederatedBundles returns the federated bundles, sorted by trust domain.
func (s *Source) FederatedBundles() []*x509bundle.Bundle {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.federated)
}

// Changed returns a channel closed at the next set.
func (s *Source) Changed() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changed
}
