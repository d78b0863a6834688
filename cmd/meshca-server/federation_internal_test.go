package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"log/slog"
	"path/filepath"
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/identity/federation"
	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/internal/server"
	"github.com/meshca/meshca/testca"
)

// TestApplyConfigPeers: the config's peers are applied over the stored
// ones at every start. A peer stored as configured is kept as it is (its
// last good bundle with it), through the store's encoding; a changed one is
// replaced; a runtime peer stays, unless only the config's peers may be
// (Kubernetes mode).
func TestApplyConfigPeers(t *testing.T) {
	own := spiffeid.RequireTrustDomainFromString("own.example")
	spiffeTD := spiffeid.RequireTrustDomainFromString("spiffe.example")
	webTD := spiffeid.RequireTrustDomainFromString("web.example")
	runtimeTD := spiffeid.RequireTrustDomainFromString("runtime.example")
	bootstrap, err := server.ParsePeerBundle(spiffeTD, pemutil.EncodeCertificates(testca.New(t, spiffeTD).Cert))
	require.NoError(t, err)
	webRoot := testca.New(t, webTD).Cert
	peers := []federation.Peer{
		{TrustDomain: spiffeTD, URL: "https://spiffe.example/", Profile: federation.ProfileHTTPSSPIFFE,
			EndpointID: spiffeid.RequireFromPath(spiffeTD, "/meshca/server"), Bootstrap: bootstrap},
		{TrustDomain: webTD, URL: "https://web.example/", Profile: federation.ProfileHTTPSWeb, WebRoots: []*x509.Certificate{webRoot}},
	}
	store := filepath.Join(t.TempDir(), federationStateFile)
	start := func(peers []federation.Peer, only bool) (*federation.Federator, string) {
		t.Helper()
		var logs bytes.Buffer
		log := slog.New(slog.NewTextHandler(&logs, nil))
		fed, err := federation.New(context.Background(), federation.Options{TrustDomain: own, Store: federation.NewFileStore(store)})
		require.NoError(t, err)
		require.NoError(t, applyConfigPeers(context.Background(), fed, peers, only, log))
		return fed, logs.String()
	}

	fed, _ := start(peers, false)
	require.Len(t, fed.Peers(), 2)
	require.NoError(t, fed.AddPeer(context.Background(), federation.Peer{TrustDomain: runtimeTD, URL: "https://runtime.example/", Profile: federation.ProfileHTTPSWeb}))

	// Restarted with the same config: nothing replaced, the runtime peer
	// kept.
	fed, logs := start(peers, false)
	require.NotContains(t, logs, "replacing")
	require.Len(t, fed.Peers(), 3)

	// A peer's URL changed in the config: it is replaced.
	changed := append([]federation.Peer(nil), peers...)
	changed[1].URL = "https://web.example:8444/"
	fed, logs = start(changed, false)
	require.Contains(t, logs, `msg="federation: the config changed a peer; replacing it" trust_domain=web.example`)
	st, err := fed.Peer(webTD)
	require.NoError(t, err)
	require.Equal(t, "https://web.example:8444/", st.Peer.URL)

	// Only the config's peers (Kubernetes mode): the runtime peer goes.
	fed, logs = start(changed, true)
	require.Contains(t, logs, `msg="federation: a stored peer is not in the config; removing it" trust_domain=runtime.example`)
	require.Len(t, fed.Peers(), 2)
	_, err = fed.Peer(runtimeTD)
	require.ErrorIs(t, err, federation.ErrUnknownPeer)

	// A bootstrap bundle given as SPIFFE JSON with a sequence is another
	// bundle than the PEM one: replaced too.
	doc := spiffebundle.FromX509Authorities(spiffeTD, bootstrap.X509Authorities())
	doc.SetSequenceNumber(3)
	changed[0].Bootstrap = doc
	_, logs = start(changed, true)
	require.Contains(t, logs, "trust_domain=spiffe.example")
}
