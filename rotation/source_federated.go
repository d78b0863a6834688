package rotation

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/internal/wire"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
)

// FederatedBundles returns the bundles of the trust domains federated with
// the source's, sorted by trust domain name; never the source's own. They
// come with every Sign response (SignResponse.federated_bundles), so they
// change at renewals, and Changed is notified when they do. The slice is
// the caller's; the bundles are shared and must not be modified.
//
// Each bundle of a response is checked on its own: its trust domain
// parses, is not the source's, and is named once; its authorities parse.
// A bad one is logged and the one held before for its trust domain, if
// any, is kept; the others are taken. A trust domain missing from a
// response is no longer federated, and its bundle is dropped.
func (s *Source) FederatedBundles() []*x509bundle.Bundle {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return slices.Clone(s.federated)
}

// federatedFrom returns the federated bundles a Sign response carries,
// sorted by trust domain: each good one, and for a bad one the bundle
// held for its trust domain, if any.
func (s *Source) federatedFrom(ctx context.Context, pbs []*meshcav1.TrustBundle) []*x509bundle.Bundle {
	if len(pbs) == 0 {
		return nil
	}
	held := s.FederatedBundles()
	seen := make(map[spiffeid.TrustDomain]bool, len(pbs))
	var out []*x509bundle.Bundle
	for i, pb := range pbs {
		td, err := spiffeid.TrustDomainFromString(pb.GetTrustDomain())
		if err != nil {
			s.log.LogAttrs(ctx, slog.LevelWarn, "ignoring a federated bundle: bad trust domain",
				slog.Int("index", i), slog.Any("error", fmt.Errorf("rotation: federated bundle %d: %w", i, err)))
			continue
		}
		if seen[td] {
			s.log.LogAttrs(ctx, slog.LevelWarn, "ignoring a federated bundle: its trust domain appears more than once",
				slog.String("trust_domain", td.Name()))
			continue
		}
		seen[td] = true
		b, err := s.parseFederated(td, pb)
		if err != nil {
			// The last good bundle of td, if any, is kept. Never one of
			// the source's own trust domain: that is not federated.
			b = findBundle(held, td)
			s.log.LogAttrs(ctx, slog.LevelWarn, "ignoring a bad federated bundle",
				slog.String("trust_domain", td.Name()), slog.Bool("kept_previous", b != nil), slog.Any("error", err))
		}
		if b != nil {
			out = append(out, b)
		}
	}
	slices.SortFunc(out, func(a, b *x509bundle.Bundle) int {
		return strings.Compare(a.TrustDomain().Name(), b.TrustDomain().Name())
	})
	return out
}

// parseFederated parses the federated bundle pb of td.
func (s *Source) parseFederated(td spiffeid.TrustDomain, pb *meshcav1.TrustBundle) (*x509bundle.Bundle, error) {
	if td == s.td {
		return nil, fmt.Errorf("rotation: a federated bundle is for %q, the source's own trust domain", td)
	}
	bundle, err := wire.Authorities(td, pb)
	if err != nil {
		return nil, fmt.Errorf("rotation: federated: %w", err)
	}
	return bundle, nil
}

// findBundle returns the bundle of td in bundles, or nil.
func findBundle(bundles []*x509bundle.Bundle, td spiffeid.TrustDomain) *x509bundle.Bundle {
	for _, b := range bundles {
		if b.TrustDomain() == td {
			return b
		}
	}
	return nil
}

// sameBundles reports whether a and b hold the same bundles in the same
// order.
func sameBundles(a, b []*x509bundle.Bundle) bool {
	return slices.EqualFunc(a, b, func(x, y *x509bundle.Bundle) bool { return x.Equal(y) })
}

// trustDomains returns the names of the bundles' trust domains, for logs.
func trustDomains(bundles []*x509bundle.Bundle) []string {
	names := make([]string, len(bundles))
	for i, b := range bundles {
		names[i] = b.TrustDomain().Name()
	}
	return names
}
