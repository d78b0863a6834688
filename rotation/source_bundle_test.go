package rotation_test

import (
	"context"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/rotation"
	"github.com/meshca/meshca/testca"
)

// pollEvery is how often a test checks what no channel signals: an open
// watch on the fake CA, a log line written after the change it reports.
const pollEvery = 5 * time.Millisecond

// TestFederatedBundlesFollowTheWatch checks that the federated bundles of
// every watch update replace the held ones between renewals, checked as
// those of Sign responses are; that a bad bundle of the source's own trust
// domain in an update does not keep its federated bundles out; and that
// an update without them ends the federation.
func TestFederatedBundlesFollowTheWatch(t *testing.T) {
	var (
		otherTD   = spiffeid.RequireTrustDomainFromString("other.org")
		anotherTD = spiffeid.RequireTrustDomainFromString("another.org")
	)
	other, another := testca.New(t, otherTD), testca.New(t, anotherTD)

	h := newSourceHarness(t, rotation.Options{})
	h.run(t, h.ca.serveBufconn(t))
	ctx, cancel := context.WithTimeout(context.Background(), realTimeout)
	defer cancel()
	require.NoError(t, h.src.WaitUntilReady(ctx))
	h.clock.next(t) // renewals wait: whatever changes now came by the watch
	require.Eventually(t, func() bool { return h.ca.openWatches() == 1 }, realTimeout, pollEvery, "the watch opens")
	require.Empty(t, h.src.FederatedBundles())
	signs := len(h.ca.calls())

	// A peer is federated: its bundle arrives on the watch.
	h.ca.pushFederated(federatedMsg(otherTD, other))
	h.waitFor(t, "other.org's bundle", func() bool { return len(h.src.FederatedBundles()) == 1 })
	requireFederated(t, h.src, other.Bundle())
	got, err := h.src.GetX509BundleForTrustDomain(otherTD)
	require.NoError(t, err)
	require.True(t, got.Equal(other.Bundle()))
	// (The change is notified before it is logged.)
	require.Eventually(t, func() bool { return len(h.logs.find("federated bundles updated")) == 1 }, realTimeout, pollEvery)
	updated := h.logs.find("federated bundles updated")
	require.Equal(t, "watch", updated[0].attrs["from"])
	require.Equal(t, "[other.org]", updated[0].attrs["trust_domains"])

	// The peer rotates its root (prepared: both roots), a second peer is
	// added, and a bad bundle of the own trust domain comes along: it is
	// ignored, the federated bundles are taken, sorted, and one naming
	// the source's own trust domain is refused.
	rotated := testca.New(t, otherTD)
	h.ca.mu.Lock()
	h.ca.federated = []*meshcav1.TrustBundle{
		federatedMsg(otherTD, other, rotated),
		federatedMsg(sourceTD, h.ca.root),
		federatedMsg(anotherTD, another),
	}
	h.ca.pushLocked(&meshcav1.TrustBundle{TrustDomain: "evil.example", Sequence: 99, X509Authorities: [][]byte{another.Cert.Raw}})
	h.ca.mu.Unlock()
	h.waitFor(t, "two peers", func() bool { return len(h.src.FederatedBundles()) == 2 })
	b, err := h.src.GetX509BundleForTrustDomain(otherTD)
	require.NoError(t, err)
	require.True(t, b.HasX509Authority(rotated.Cert) && b.HasX509Authority(other.Cert), "both roots of the rotating peer")
	requireFederated(t, h.src, another.Bundle(), b)
	require.Equal(t, uint64(1), h.src.BundleSequence(), "the bad own bundle was not taken")
	require.Eventually(t, func() bool { return len(h.logs.find("federated bundles updated")) == 2 }, realTimeout, pollEvery)
	bad := h.logs.find("ignoring a bad bundle from the watch")
	require.Len(t, bad, 1)
	require.Equal(t, `rotation: bundle is for trust domain "evil.example"; want "example.org"`, bad[0].attrs["error"])
	refused := h.logs.find("ignoring a bad federated bundle")
	require.Len(t, refused, 1)
	require.Equal(t, `rotation: a federated bundle is for "example.org", the source's own trust domain`, refused[0].attrs["error"])

	// The same update again changes nothing.
	h.ca.setBundle(bundleMsg(2, h.ca.root))
	h.waitFor(t, "bundle 2", func() bool { return h.src.BundleSequence() == 2 })
	require.Eventually(t, func() bool {
		logged := h.logs.find("trust bundle updated")
		return len(logged) > 0 && logged[len(logged)-1].attrs["sequence"] == "2"
	}, realTimeout, pollEvery)
	require.Len(t, h.logs.find("federated bundles updated"), 2)

	// Federation ends: an update without federated bundles drops them.
	h.ca.pushFederated()
	h.waitFor(t, "no peers", func() bool { return len(h.src.FederatedBundles()) == 0 })
	_, err = h.src.GetX509BundleForTrustDomain(otherTD)
	require.EqualError(t, err, `rotation: no bundle for trust domain "other.org"; this source holds "example.org" and no federated bundle for it`)
	require.Len(t, h.ca.calls(), signs, "every change came by the watch, not by a renewal")
}
