package rotation

import (
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/meshca/meshca/testca"
)

// TestSwapChecksTheSVIDAgainstTheBundle checks that whichever of a Sign
// response and the bundle watch swaps in last, the source ends asking for
// a renewal exactly when the SVID it holds does not verify against the
// bundle it holds.
func TestSwapChecksTheSVIDAgainstTheBundle(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	id := spiffeid.RequireFromPath(td, "/ns/shop/sa/web")
	start := time.Now().Truncate(time.Second)
	life := testca.WithLifetime(start.Add(-time.Hour), start.Add(72*time.Hour))
	leafLife := testca.WithLifetime(start.Add(-time.Minute), start.Add(time.Hour))
	rootA, rootB := testca.New(t, td, life), testca.New(t, td, life)
	svidA := rootA.ChildCA(life).CreateX509SVID(id, leafLife)
	svidB := rootB.ChildCA(life).CreateX509SVID(id, leafLife)
	bundleB := rootB.Bundle()
	renewAt := start.Add(30 * time.Minute)

	newSource := func(t *testing.T) *Source {
		t.Helper()
		s, err := NewSource(Options{ID: id, InitialBundle: rootA.Bundle(), InitialSVID: svidA, Clock: clocktesting.NewFakeClock(start)})
		require.NoError(t, err)
		requireRenewal(t, s, false)
		return s
	}

	t.Run("the watch's bundle first, then the response's SVID", func(t *testing.T) {
		// The response was checked against the old bundle; the watch
		// swapped a newer one in before the SVID.
		s := newSource(t)
		changed, err := s.setBundle(bundleB, 2)
		require.True(t, changed)
		require.ErrorContains(t, err, "certificate signed by unknown authority")
		requireRenewal(t, s, true)
		takeRenewal(t, s) // the renewal loop starts an attempt

		require.ErrorContains(t, s.setSVID(svidA, renewAt), "certificate signed by unknown authority")
		requireRenewal(t, s, true)
	})
	t.Run("the response's SVID first, then the watch's bundle", func(t *testing.T) {
		s := newSource(t)
		require.NoError(t, s.setSVID(svidA, renewAt))
		requireRenewal(t, s, false)
		changed, err := s.setBundle(bundleB, 2)
		require.True(t, changed)
		require.Error(t, err)
		requireRenewal(t, s, true)
	})
	t.Run("an SVID that verifies withdraws the request", func(t *testing.T) {
		s := newSource(t)
		_, err := s.setBundle(bundleB, 2)
		require.Error(t, err)
		requireRenewal(t, s, true)
		require.NoError(t, s.setSVID(svidB, renewAt))
		requireRenewal(t, s, false)
	})
	t.Run("the response's SVID and bundle together", func(t *testing.T) {
		// The old SVID does not verify against the response's bundle, but
		// the new one does: no renewal.
		s := newSource(t)
		changed, err := s.swap(update{svid: svidB, renewAt: renewAt, bundle: bundleB, seq: 2})
		require.True(t, changed.bundle)
		require.NoError(t, err)
		requireRenewal(t, s, false)
	})
	t.Run("an older bundle changes nothing", func(t *testing.T) {
		s := newSource(t)
		_, err := s.swap(update{bundle: rootA.Bundle(), seq: 3})
		require.NoError(t, err)
		changed, err := s.setBundle(bundleB, 3)
		require.False(t, changed)
		require.NoError(t, err)
		requireRenewal(t, s, false)
	})
}

// TestSwapNotifiesFederatedChanges checks that federated bundles alone
// notify Changed when they change, and only then.
func TestSwapNotifiesFederatedChanges(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	other := testca.New(t, spiffeid.RequireTrustDomainFromString("other.org"))
	s, err := NewSource(Options{ID: spiffeid.RequireFromPath(td, "/w"), InitialBundle: testca.New(t, td).Bundle()})
	require.NoError(t, err)

	changed := s.Changed()
	ch, err := s.swap(update{federated: []*x509bundle.Bundle{other.Bundle()}, setFederated: true})
	require.NoError(t, err)
	require.Equal(t, changes{federated: true}, ch)
	require.True(t, isClosed(changed))

	changed = s.Changed()
	ch, err = s.swap(update{federated: []*x509bundle.Bundle{other.Bundle()}, setFederated: true})
	require.NoError(t, err)
	require.Equal(t, changes{}, ch, "the same bundles")
	require.False(t, isClosed(changed))

	ch, err = s.swap(update{})
	require.NoError(t, err)
	require.Equal(t, changes{}, ch, "federated bundles not set")
	require.Len(t, s.FederatedBundles(), 1)

	ch, err = s.swap(update{setFederated: true})
	require.NoError(t, err)
	require.Equal(t, changes{federated: true}, ch, "none any more")
	require.True(t, isClosed(changed))
	require.Empty(t, s.FederatedBundles())
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// requireRenewal checks whether a renewal is asked for, without taking the
// request.
func requireRenewal(t *testing.T, s *Source, want bool) {
	t.Helper()
	require.Equal(t, want, len(s.renewal) == 1, "renewal asked for")
}

// takeRenewal takes the renewal request, as the renewal loop does.
func takeRenewal(t *testing.T, s *Source) {
	t.Helper()
	select {
	case <-s.renewal:
	default:
		t.Fatal("no renewal asked for")
	}
}
