package rotation_test

import (
	"time"

	"context"
	"crypto/x509"
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/rotation"
	"github.com/meshca/meshca/testca"
)

// federatedMsg returns a federated bundle of td holding the roots of cas.
func federatedMsg(td spiffeid.TrustDomain, cas ...*testca.CA) *meshcav1.TrustBundle {
	pb := &meshcav1.TrustBundle{TrustDomain: td.Name(), Sequence: 1}
	for _, c := range cas {
		pb.X509Authorities = append(pb.X509Authorities, c.Root().Cert.Raw)
	}
	return pb
}

// TestFederatedBundlesFollowSignResponses checks that the federated
// bundles of each Sign response replace the held ones, sorted, checked
// one by one, and notified on Changed; and that GetX509BundleForTrustDomain
// serves them.
func TestFederatedBundlesFollowSignResponses(t *testing.T) {
	var (
		otherTD   = spiffeid.RequireTrustDomainFromString("other.org")
		anotherTD = spiffeid.RequireTrustDomainFromString("another.org")
		thirdTD   = spiffeid.RequireTrustDomainFromString("third.org")
	)
	other, another, third := testca.New(t, otherTD), testca.New(t, anotherTD), testca.New(t, thirdTD)

	h := newSourceHarness(t, rotation.Options{})
	require.Empty(t, h.src.FederatedBundles())
	h.ca.setFederated(federatedMsg(otherTD, other), federatedMsg(anotherTD, another))
	changed := h.src.Changed()
	h.run(t, h.ca.serveBufconn(t))
	ctx, cancel := context.WithTimeout(context.Background(), realTimeout)
	defer cancel()
	require.NoError(t, h.src.WaitUntilReady(ctx))
	requireClosed(t, changed, "the first SVID")
	tm := h.clock.next(t) // the first response is swapped in
	requireFederated(t, h.src, another.Bundle(), other.Bundle())
	got, err := h.src.GetX509BundleForTrustDomain(otherTD)
	require.NoError(t, err)
	require.True(t, got.Equal(other.Bundle()))
	_, err = h.src.GetX509BundleForTrustDomain(thirdTD)
	require.EqualError(t, err, `rotation: no bundle for trust domain "third.org"; this source holds "example.org" and no federated bundle for it`)
	require.Len(t, h.logs.find("federated bundles updated"), 1)

	// Bad bundles: other.org's does not parse (its last good one is
	// kept), example.org is the source's own, another.org appears twice
	// (the first is taken), a trust domain that does not parse. third.org
	// is new.
	rotated := testca.New(t, anotherTD)
	// The watch's first update carries the federated bundles of the
	// moment it opens: let it open first, so that the set below comes by
	// the Sign response alone, and is checked (and logged) once.
	require.Eventually(t, func() bool { return h.ca.watching(1) }, realTimeout, time.Millisecond, "the bundle watch never opened")
	h.ca.setFederated(
		&meshcav1.TrustBundle{TrustDomain: otherTD.Name(), X509Authorities: [][]byte{[]byte("not DER")}},
		federatedMsg(sourceTD, h.ca.root),
		federatedMsg(anotherTD, rotated),
		federatedMsg(anotherTD, another),
		&meshcav1.TrustBundle{TrustDomain: "Not A Domain", X509Authorities: [][]byte{third.Cert.Raw}},
		federatedMsg(thirdTD, third),
	)
	changed = h.src.Changed()
	h.clock.fire(tm)
	requireClosed(t, changed, "a renewal")
	tm = h.clock.next(t)
	requireFederated(t, h.src, rotated.Bundle(), other.Bundle(), third.Bundle())
	own, err := h.src.GetX509BundleForTrustDomain(sourceTD)
	require.NoError(t, err)
	require.Equal(t, []*x509.Certificate{h.ca.root.Cert}, own.X509Authorities(), "a federated bundle never replaces the own trust domain's")
	bad := h.logs.find("ignoring a bad federated bundle")
	require.Len(t, bad, 2)
	require.Equal(t, "other.org", bad[0].attrs["trust_domain"])
	require.Equal(t, "true", bad[0].attrs["kept_previous"])
	require.Contains(t, bad[0].attrs["error"], `rotation: federated: the bundle of "other.org" (sequence 0): pemutil: certificate 0:`)
	require.Equal(t, "example.org", bad[1].attrs["trust_domain"])
	require.Equal(t, "false", bad[1].attrs["kept_previous"])
	require.Equal(t, `rotation: a federated bundle is for "example.org", the source's own trust domain`, bad[1].attrs["error"])
	require.Len(t, h.logs.find("ignoring a federated bundle: its trust domain appears more than once"), 1)
	require.Len(t, h.logs.find("ignoring a federated bundle: bad trust domain"), 1)

	// The same set again: no change logged.
	h.clock.fire(tm)
	tm = h.clock.next(t)
	require.Len(t, h.logs.find("federated bundles updated"), 2)

	// None: federation ended.
	h.ca.setFederated()
	changed = h.src.Changed()
	h.clock.fire(tm)
	requireClosed(t, changed, "a renewal")
	h.clock.next(t)
	require.Empty(t, h.src.FederatedBundles())
	_, err = h.src.GetX509BundleForTrustDomain(otherTD)
	require.Error(t, err)
	require.Len(t, h.logs.find("federated bundles updated"), 3)
}

func requireFederated(t *testing.T, src *rotation.Source, want ...*x509bundle.Bundle) {
	t.Helper()
	got := src.FederatedBundles()
	require.Len(t, got, len(want))
	for i := range want {
		require.Equal(t, want[i].TrustDomain(), got[i].TrustDomain(), "bundle %d", i)
		require.True(t, want[i].Equal(got[i]), "bundle %d of %s", i, want[i].TrustDomain())
	}
}
