package federation_test

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/meshca/meshca/identity/federation"
	"github.com/meshca/meshca/internal/securefile"
	"github.com/meshca/meshca/testca"
)

func TestAddPeerRefusesInvalid(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	root := testca.New(t, peerTD)
	bootstrap := bundleOf(peerTD, 1, root)
	web := federation.Peer{TrustDomain: peerTD, URL: "https://east.example/", Profile: federation.ProfileHTTPSWeb}
	spiffe := federation.Peer{
		TrustDomain: peerTD, URL: "https://east.example:8443/", Profile: federation.ProfileHTTPSSPIFFE,
		EndpointID: serverID, Bootstrap: bootstrap,
	}
	with := func(p federation.Peer, change func(*federation.Peer)) federation.Peer {
		change(&p)
		return p
	}

	for _, tc := range []struct {
		name string
		peer federation.Peer
		err  string
	}{
		{"no trust domain", with(web, func(p *federation.Peer) { p.TrustDomain = spiffeid.TrustDomain{} }),
			"federation: invalid peer: no trust domain"},
		{"own trust domain", with(web, func(p *federation.Peer) { p.TrustDomain = ownTD }),
			`federation: invalid peer: "west.test" is this server's own trust domain`},
		{"no URL", with(web, func(p *federation.Peer) { p.URL = "" }),
			`federation: invalid peer: trust domain "east.test": no bundle endpoint URL`},
		{"http URL", with(web, func(p *federation.Peer) { p.URL = "http://east.example/" }),
			`federation: invalid peer: trust domain "east.test": bundle endpoint URL "http://east.example/": scheme must be https`},
		{"relative URL", with(web, func(p *federation.Peer) { p.URL = "/bundle" }),
			`federation: invalid peer: trust domain "east.test": bundle endpoint URL "/bundle": scheme must be https`},
		{"no host", with(web, func(p *federation.Peer) { p.URL = "https:///bundle" }),
			`federation: invalid peer: trust domain "east.test": bundle endpoint URL "https:///bundle" has no host`},
		{"credentials in the URL", with(web, func(p *federation.Peer) { p.URL = "https://admin:s3cret@east.example/" }),
			`federation: invalid peer: trust domain "east.test": bundle endpoint URL carries user information; credentials do not belong in it`},
		{"URL too long", with(web, func(p *federation.Peer) { p.URL = "https://east.example/" + strings.Repeat("a", 2048) }),
			`federation: invalid peer: trust domain "east.test": bundle endpoint URL is longer than 2048 bytes`},
		{"no profile", with(web, func(p *federation.Peer) { p.Profile = "" }),
			`federation: invalid peer: trust domain "east.test": no profile; want "https_web" or "https_spiffe"`},
		{"unknown profile", with(web, func(p *federation.Peer) { p.Profile = "http" }),
			`federation: invalid peer: trust domain "east.test": unknown profile "http"; want "https_web" or "https_spiffe"`},
		{"https_web with an endpoint ID", with(web, func(p *federation.Peer) { p.EndpointID = serverID }),
			`federation: invalid peer: trust domain "east.test": an endpoint SPIFFE ID is for profile https_spiffe only`},
		{"https_web with a bootstrap bundle", with(web, func(p *federation.Peer) { p.Bootstrap = bootstrap }),
			`federation: invalid peer: trust domain "east.test": a bootstrap bundle is for profile https_spiffe only`},
		{"https_spiffe without endpoint ID", with(spiffe, func(p *federation.Peer) { p.EndpointID = spiffeid.ID{} }),
			`federation: invalid peer: trust domain "east.test": profile https_spiffe needs the endpoint's SPIFFE ID`},
		{"https_spiffe with an endpoint ID of another trust domain",
			with(spiffe, func(p *federation.Peer) { p.EndpointID = spiffeid.RequireFromPath(otherTD, "/meshca/server") }),
			`federation: invalid peer: endpoint SPIFFE ID "spiffe://elsewhere.test/meshca/server" is not in trust domain "east.test"`},
		{"https_spiffe without bootstrap bundle", with(spiffe, func(p *federation.Peer) { p.Bootstrap = nil }),
			`federation: invalid peer: trust domain "east.test": profile https_spiffe needs a bootstrap bundle of the peer, obtained out of band`},
		{"https_spiffe with a bootstrap bundle of another trust domain",
			with(spiffe, func(p *federation.Peer) { p.Bootstrap = bundleOf(otherTD, 1, testca.New(t, otherTD)) }),
			`federation: invalid peer: the bootstrap bundle is for "elsewhere.test", the peer is "east.test"`},
		{"https_spiffe with an empty bootstrap bundle", with(spiffe, func(p *federation.Peer) { p.Bootstrap = spiffebundle.New(peerTD) }),
			`federation: invalid peer: trust domain "east.test": bootstrap bundle: the bundle holds no X.509 authority (no key with "use": "x509-svid")`},
		{"https_spiffe with Web PKI roots", with(spiffe, func(p *federation.Peer) { p.WebRoots = []*x509.Certificate{root.Cert} }),
			`federation: invalid peer: trust domain "east.test": Web PKI roots are for profile https_web only`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			store := &memStore{}
			fed := newFederator(t, federation.Options{Store: store})
			err := fed.AddPeer(ctx, tc.peer)
			require.ErrorIs(t, err, federation.ErrInvalidPeer)
			require.EqualError(t, err, tc.err)
			require.NotContains(t, err.Error(), "s3cret")
			require.Empty(t, fed.Peers())
			require.Zero(t, store.saves, "nothing is saved")
		})
	}

	t.Run("already a peer", func(t *testing.T) {
		t.Parallel()
		fed := newFederator(t, federation.Options{})
		require.NoError(t, fed.AddPeer(ctx, web))
		err := fed.AddPeer(ctx, spiffe)
		require.ErrorIs(t, err, federation.ErrPeerExists)
		require.EqualError(t, err, `federation: trust domain is already a peer: "east.test"; remove it first to change it`)
	})

	t.Run("too many peers", func(t *testing.T) {
		t.Parallel()
		fed := newFederator(t, federation.Options{MaxPeers: 1})
		require.NoError(t, fed.AddPeer(ctx, web))
		err := fed.AddPeer(ctx, with(web, func(p *federation.Peer) { p.TrustDomain = otherTD }))
		require.ErrorIs(t, err, federation.ErrTooManyPeers)
		require.EqualError(t, err, "federation: too many peers: the limit is 1")
	})

	t.Run("unknown peer", func(t *testing.T) {
		t.Parallel()
		fed := newFederator(t, federation.Options{})
		err := fed.RemovePeer(ctx, otherTD)
		require.ErrorIs(t, err, federation.ErrUnknownPeer)
		require.EqualError(t, err, `federation: trust domain is not a peer: "elsewhere.test"`)
		_, err = fed.Refresh(ctx, otherTD)
		require.ErrorIs(t, err, federation.ErrUnknownPeer)
		_, err = fed.Peer(otherTD)
		require.ErrorIs(t, err, federation.ErrUnknownPeer)
	})
}

// After a restart the peers and their last good bundles are published
// before any fetch, even while a peer is down; removing a peer removes it
// from the file too.
func TestStateSurvivesRestart(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "federation.json")
	store := federation.NewFileStore(path)

	fp := newFakePeer(t)
	root := testca.New(t, peerTD)
	good := bundleOf(peerTD, 5, root)
	good.SetRefreshHint(time.Minute)
	fp.serveBundle(t, good)
	east := testca.New(t, otherTD)
	bootstrap := bundleOf(otherTD, 1, east)
	spiffePeer := federation.Peer{
		TrustDomain: otherTD, URL: "https://elsewhere.example:8443/", Profile: federation.ProfileHTTPSSPIFFE,
		EndpointID: spiffeid.RequireFromPath(otherTD, "/meshca/server"), Bootstrap: bootstrap,
	}

	first := newFederator(t, federation.Options{Store: store})
	require.NoError(t, first.AddPeer(ctx, fp.webPeer(peerTD)))
	require.NoError(t, first.AddPeer(ctx, spiffePeer))
	fetched, err := first.Refresh(ctx, peerTD)
	require.NoError(t, err)
	info, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), info.Mode().Perm())

	// Restart with the web peer down.
	fp.serve(500, "")
	second := newFederator(t, federation.Options{Store: store})
	bundles := second.Bundles()
	require.Len(t, bundles, 2)
	require.True(t, good.Equal(bundles[0]), "the last good bundle of east.test")
	require.True(t, bootstrap.Equal(bundles[1]), "the bootstrap bundle of elsewhere.test")
	st, err := second.Peer(peerTD)
	require.NoError(t, err)
	require.True(t, fetched.LastSuccess.Equal(st.LastSuccess))
	require.Equal(t, fp.URL, st.Peer.URL)
	require.Len(t, st.Peer.WebRoots, 1)
	require.True(t, fp.Roots[0].Equal(st.Peer.WebRoots[0]))
	_, err = second.Refresh(ctx, peerTD)
	require.Error(t, err)
	require.True(t, good.Equal(second.Bundles()[0]), "kept while the peer fails")

	_, changed := second.Watch()
	require.NoError(t, second.RemovePeer(ctx, peerTD))
	select {
	case <-changed:
	default:
		t.Fatal("removing a peer is a change of the bundles")
	}
	third := newFederator(t, federation.Options{Store: store})
	peers := third.Peers()
	require.Len(t, peers, 1)
	require.Equal(t, otherTD, peers[0].Peer.TrustDomain)
	require.Equal(t, spiffePeer.EndpointID, peers[0].Peer.EndpointID)
	require.True(t, bootstrap.Equal(peers[0].Peer.Bootstrap))
}

func TestFileStoreRefuses(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()

	t.Run("a file others may write", func(t *testing.T) {
		path := filepath.Join(dir, "open.json")
		require.NoError(t, os.WriteFile(path, []byte(`{"version":1,"peers":[]}`), 0o666))
		require.NoError(t, os.Chmod(path, 0o666))
		_, err := federation.NewFileStore(path).Load(ctx)
		require.ErrorIs(t, err, securefile.ErrTooOpen)
		_, err = federation.New(ctx, federation.Options{TrustDomain: ownTD, Store: federation.NewFileStore(path)})
		require.ErrorIs(t, err, securefile.ErrTooOpen)
	})
	t.Run("another version", func(t *testing.T) {
		path := filepath.Join(dir, "v2.json")
		require.NoError(t, securefile.WriteFile(path, []byte(`{"version":2,"peers":[]}`), 0o600))
		_, err := federation.NewFileStore(path).Load(ctx)
		require.EqualError(t, err, "federation: state version 2; this server reads version 1 (in "+path+")")
	})
	t.Run("a stored peer of the own trust domain", func(t *testing.T) {
		path := filepath.Join(dir, "own.json")
		store := federation.NewFileStore(path)
		require.NoError(t, store.Save(ctx, &federation.State{Peers: []federation.PeerState{{
			Peer: federation.Peer{TrustDomain: ownTD, URL: "https://west.example/", Profile: federation.ProfileHTTPSWeb},
		}}}))
		_, err := federation.New(ctx, federation.Options{TrustDomain: ownTD, Store: store})
		require.EqualError(t, err, `federation: stored peer: federation: invalid peer: "west.test" is this server's own trust domain`)
	})
	t.Run("a missing file is an empty state", func(t *testing.T) {
		st, err := federation.NewFileStore(filepath.Join(dir, "none.json")).Load(ctx)
		require.NoError(t, err)
		require.Empty(t, st.Peers)
	})
}

func TestStateJSONRoundTrip(t *testing.T) {
	t.Parallel()
	webRoot := testca.New(t, webTD)
	b := bundleOf(peerTD, 7, testca.New(t, peerTD))
	b.SetRefreshHint(90 * time.Second)
	boot := bundleOf(otherTD, 3, testca.New(t, otherTD))
	when := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	in := federation.State{Peers: []federation.PeerState{
		{
			Peer:        federation.Peer{TrustDomain: peerTD, URL: "https://east.example/", Profile: federation.ProfileHTTPSWeb, WebRoots: []*x509.Certificate{webRoot.Cert}},
			Bundle:      b,
			LastSuccess: when,
		},
		{
			Peer: federation.Peer{TrustDomain: otherTD, URL: "https://elsewhere.example/", Profile: federation.ProfileHTTPSSPIFFE,
				EndpointID: spiffeid.RequireFromPath(otherTD, "/meshca/server"), Bootstrap: boot},
		},
	}}
	doc, err := json.Marshal(in)
	require.NoError(t, err)
	var out federation.State
	require.NoError(t, json.Unmarshal(doc, &out))
	require.Len(t, out.Peers, 2)

	web, spiffe := out.Peers[0], out.Peers[1]
	require.Equal(t, in.Peers[0].Peer.URL, web.Peer.URL)
	require.Equal(t, federation.ProfileHTTPSWeb, web.Peer.Profile)
	require.True(t, webRoot.Cert.Equal(web.Peer.WebRoots[0]))
	require.True(t, b.Equal(web.Bundle))
	require.True(t, when.Equal(web.LastSuccess))

	require.Equal(t, in.Peers[1].Peer.EndpointID, spiffe.Peer.EndpointID)
	require.True(t, boot.Equal(spiffe.Peer.Bootstrap))
	require.Nil(t, spiffe.Bundle)
	require.True(t, spiffe.LastSuccess.IsZero())
}

func TestMetrics(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	fp := newFakePeer(t)
	root := testca.New(t, peerTD)
	fp.serveBundle(t, bundleOf(peerTD, 3, root))
	clk := clocktesting.NewFakeClock(time.Now())
	reg := prometheus.NewPedanticRegistry()
	fed := newFederator(t, federation.Options{Clock: clk, Registerer: reg})
	require.NoError(t, fed.AddPeer(ctx, fp.webPeer(peerTD)))
	require.Empty(t, gather(t, reg), "no series before a fetch")

	_, err := fed.Refresh(ctx, peerTD)
	require.NoError(t, err)
	_, err = fed.Refresh(ctx, peerTD)
	require.NoError(t, err)
	fp.serveBundle(t, bundleOf(peerTD, 2, root))
	_, err = fed.Refresh(ctx, peerTD)
	require.Error(t, err)
	clk.Step(90 * time.Second)

	require.Equal(t, map[string]float64{
		`meshca_federation_fetches_total{peer="east.test",result="updated"}`:        1,
		`meshca_federation_fetches_total{peer="east.test",result="unchanged"}`:      1,
		`meshca_federation_fetches_total{peer="east.test",result="stale_sequence"}`: 1,
		`meshca_federation_bundle_sequence{peer="east.test"}`:                       3,
		`meshca_federation_bundle_age_seconds{peer="east.test"}`:                    90,
	}, gather(t, reg))

	require.NoError(t, fed.RemovePeer(ctx, peerTD))
	require.Empty(t, gather(t, reg), "a removed peer's series are gone")
}

// gather returns the series of reg as name{labels} to value, leaving out
// the store error counter.
func gather(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	out := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() == "meshca_federation_store_errors_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			v := m.GetGauge().GetValue() + m.GetCounter().GetValue()
			out[mf.GetName()+"{"+strings.Join(labels, ",")+"}"] = v
		}
	}
	return out
}
