package server_test

import (
	"context"
	"crypto/x509"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/federation"
	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/internal/server"
	"github.com/meshca/meshca/internal/testlog"
	adminv1 "github.com/meshca/meshca/proto/meshca/admin/v1"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/rotation"
	"github.com/meshca/meshca/testca"
)

var (
	peerTD       = spiffeid.RequireTrustDomainFromString("peer.example")
	peerServerID = spiffeid.RequireFromPath(peerTD, "/meshca/server")
)

// waitFed bounds every wait of the federation tests for a signal.
const waitFed = 10 * time.Second

// peerServer is another trust domain's meshca: its CA and its bundle
// endpoint (https_spiffe, serving its own X509-SVID) on loopback.
type peerServer struct {
	ca  *ca.CA
	url string
}

func startPeer(t *testing.T) *peerServer {
	t.Helper()
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: peerTD})
	require.NoError(t, err)
	c, err := ca.New(set, ca.Options{})
	require.NoError(t, err)
	serving, err := server.NewServingCert(c, peerServerID, nil, nil, time.Hour, nil)
	require.NoError(t, err)
	ep, err := federation.NewEndpoint(federation.EndpointOptions{
		TrustDomain:    peerTD,
		Bundles:        c,
		RefreshHint:    time.Minute,
		Profile:        federation.ProfileHTTPSSPIFFE,
		GetCertificate: serving.GetCertificate,
	})
	require.NoError(t, err)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ep.Serve(ctx, lis) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	return &peerServer{ca: c, url: "https://" + lis.Addr().String() + "/"}
}

// bundle returns the peer's bundle as an operator obtains it out of band:
// PEM, as `meshctl bundle` prints it.
func (p *peerServer) bundlePEM() []byte {
	b, _ := p.ca.Bundle()
	return pemutil.EncodeCertificates(b.X509Authorities()...)
}

// prepareRoot adds a new root to the peer's bundle, as `meshctl root
// prepare` does, and returns it.
func (p *peerServer) prepareRoot(t *testing.T) *x509.Certificate {
	t.Helper()
	root := testca.New(t, peerTD)
	set := p.ca.Authorities().Clone()
	set.Sequence++
	set.Roots = append(set.Roots, ca.Root{
		Authority:      ca.Authority{Cert: root.Cert, Signer: root.Key},
		State:          ca.RootPrepared,
		Since:          time.Now(),
		BundleSequence: set.Sequence,
	})
	require.NoError(t, p.ca.SetAuthorities(set))
	return root.Cert
}

func (p *peerServer) spiffePeer(t *testing.T) federation.Peer {
	t.Helper()
	bootstrap, err := server.ParsePeerBundle(peerTD, p.bundlePEM())
	require.NoError(t, err)
	return federation.Peer{TrustDomain: peerTD, URL: p.url, Profile: federation.ProfileHTTPSSPIFFE, EndpointID: peerServerID, Bootstrap: bootstrap}
}

// newFederator returns a federator of td that does not run: tests fetch
// with Refresh, so that every fetch is one they asked for.
func newFederator(t *testing.T, opts federation.Options) *federation.Federator {
	t.Helper()
	opts.TrustDomain = td
	f, err := federation.New(t.Context(), opts)
	require.NoError(t, err)
	return f
}

// startFederatedServer starts a server of td whose federated bundles come
// from fed, with the demo token, and returns its address and CA.
func startFederatedServer(t *testing.T, fed server.FederatedBundles) (string, *ca.CA) {
	t.Helper()
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: td})
	require.NoError(t, err)
	c, err := ca.New(set, ca.Options{})
	require.NoError(t, err)
	tokens, err := identity.NewStaticTokens(identity.TokenFile{Tokens: []identity.TokenFileEntry{{ID: demoID.String(), Token: demoToken}}}, td)
	require.NoError(t, err)
	srv, err := server.New(server.Options{
		CA:            c,
		Authenticator: identity.Chain(tokens, identity.NewSVIDAuthenticator(td, c, nil)),
		Federated:     fed,
	})
	require.NoError(t, err)
	serving, err := server.NewServingCert(c, serverID, nil, nil, time.Hour, nil)
	require.NoError(t, err)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	g := srv.GRPCServer(serving.TLSConfig())
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(func() {
		srv.Shutdown()
		g.Stop()
	})
	return lis.Addr().String(), c
}

// TestFederatedBundlesReachWorkloads: a peer's bundle, fetched from its
// real bundle endpoint, reaches a workload (rotation.Source, over real
// gRPC) in its Sign response and on the bundle stream, follows the peer's
// root rotation, and leaves with the peer; the own bundle never changes.
func TestFederatedBundlesReachWorkloads(t *testing.T) {
	peer := startPeer(t)
	fed := newFederator(t, federation.Options{})
	addr, c := startFederatedServer(t, fed)
	ownBundle, _ := c.Bundle()

	// A watcher of the bundle stream sees the own bundle and no peer yet.
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentialsFor(ownBundle)))
	require.NoError(t, err)
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), waitFed)
	defer cancel()
	stream, err := meshcav1.NewBundleServiceClient(conn).WatchBundle(ctx, &meshcav1.WatchBundleRequest{})
	require.NoError(t, err)
	up, err := stream.Recv()
	require.NoError(t, err)
	require.Equal(t, uint64(1), up.GetBundle().GetSequence())
	require.Empty(t, up.GetFederatedBundles())

	// Added with its bootstrap bundle (PEM: no sequence, no hint), the
	// peer is published at once, before any fetch.
	require.NoError(t, fed.AddPeer(ctx, peer.spiffePeer(t)))
	up, err = stream.Recv()
	require.NoError(t, err)
	require.Equal(t, uint64(1), up.GetBundle().GetSequence())
	require.Len(t, up.GetFederatedBundles(), 1)
	boot := up.GetFederatedBundles()[0]
	require.Equal(t, peerTD.Name(), boot.GetTrustDomain())
	require.Zero(t, boot.GetSequence())
	require.Nil(t, boot.GetRefreshHint())
	peerBundle, _ := peer.ca.Bundle()
	requireRoots(t, boot, peerBundle.X509Authorities()...)

	// A workload of td gets it with its SVID.
	initial, _ := c.Bundle()
	src, err := rotation.NewSource(rotation.Options{
		ID:            demoID,
		InitialBundle: initial,
		Token:         func(context.Context) (string, error) { return demoToken, nil },
	})
	require.NoError(t, err)
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(runCtx, src.Dialer(addr, serverID)) }()
	defer func() { stop(); <-done }()
	require.NoError(t, src.WaitUntilReady(ctx))
	waitForSource(t, src, "the bootstrap bundle", func(b []*x509.Certificate) bool { return len(b) == 1 })

	// The first fetch brings the endpoint's bundle: sequence and hint.
	st, err := fed.Refresh(ctx, peerTD)
	require.NoError(t, err)
	require.False(t, st.LastSuccess.IsZero())
	up, err = stream.Recv()
	require.NoError(t, err)
	fetched := up.GetFederatedBundles()[0]
	require.Equal(t, uint64(1), fetched.GetSequence())
	require.Equal(t, time.Minute, fetched.GetRefreshHint().AsDuration())
	doc, err := spiffebundle.Parse(peerTD, fetched.GetSpiffeJson())
	require.NoError(t, err, "spiffe_json is the peer's SPIFFE bundle document")
	seq, ok := doc.SequenceNumber()
	require.True(t, ok)
	require.Equal(t, uint64(1), seq)

	// The peer prepares a new root: the next fetch carries it to the
	// stream and to the workload, between its renewals.
	newRoot := peer.prepareRoot(t)
	_, err = fed.Refresh(ctx, peerTD)
	require.NoError(t, err)
	up, err = stream.Recv()
	require.NoError(t, err)
	require.Equal(t, uint64(1), up.GetBundle().GetSequence(), "the own bundle did not change")
	rotated := up.GetFederatedBundles()[0]
	require.Equal(t, uint64(2), rotated.GetSequence())
	requireRoots(t, rotated, append(peerBundle.X509Authorities(), newRoot)...)
	waitForSource(t, src, "the prepared root", func(b []*x509.Certificate) bool { return len(b) == 2 })

	// A Sign response carries the same bundles.
	signConn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentialsFor(ownBundle)))
	require.NoError(t, err)
	defer signConn.Close()
	key := testca.NewKey(t)
	resp, err := meshcav1.NewCertificateServiceClient(signConn).Sign(withToken(demoToken), &meshcav1.SignRequest{Csr: testca.CreateCSR(t, key, demoID.String())})
	require.NoError(t, err)
	require.Len(t, resp.GetFederatedBundles(), 1)
	requireRoots(t, resp.GetFederatedBundles()[0], append(peerBundle.X509Authorities(), newRoot)...)

	// Removed, the peer leaves the stream and the workload.
	require.NoError(t, fed.RemovePeer(ctx, peerTD))
	up, err = stream.Recv()
	require.NoError(t, err)
	require.Empty(t, up.GetFederatedBundles())
	waitForSource(t, src, "no peer", func(b []*x509.Certificate) bool { return b == nil })
}

// waitForSource waits, on the source's Changed channel, until the peer's
// roots it holds (nil when none) satisfy ok.
func waitForSource(t *testing.T, src *rotation.Source, what string, ok func([]*x509.Certificate) bool) {
	t.Helper()
	deadline := time.After(waitFed)
	for {
		changed := src.Changed()
		var roots []*x509.Certificate
		if b, err := src.GetX509BundleForTrustDomain(peerTD); err == nil {
			roots = b.X509Authorities()
		}
		if ok(roots) {
			return
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("the workload never held %s", what)
		}
	}
}

// credentialsFor verifies the server's SVID with bundle.
func credentialsFor(bundle *x509bundle.Bundle) credentials.TransportCredentials {
	return credentials.NewTLS(tlsconfig.TLSClientConfig(bundle, tlsconfig.AuthorizeID(serverID)))
}

func requireRoots(t *testing.T, pb *meshcav1.TrustBundle, want ...*x509.Certificate) {
	t.Helper()
	got, err := pemutil.ParseDER(pb.GetX509Authorities())
	require.NoError(t, err)
	require.Len(t, got, len(want))
	for i := range want {
		require.True(t, want[i].Equal(got[i]), "root %d", i)
	}
}

// adminHarness is the admin API on a Unix socket, with a federator.
type adminHarness struct {
	client adminv1.AdminServiceClient
	fed    *federation.Federator
	audit  *testlog.Buffer
}

func startAdmin(t *testing.T, opts server.AdminOptions) *adminHarness {
	t.Helper()
	if opts.CA == nil {
		set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: td})
		require.NoError(t, err)
		opts.CA, err = ca.New(set, ca.Options{})
		require.NoError(t, err)
	}
	audit := &testlog.Buffer{}
	opts.Logger = slog.New(slog.NewJSONHandler(audit, nil))
	g := server.NewAdminServer(opts)
	socket := filepath.Join(t.TempDir(), "admin.sock")
	lis, err := net.Listen("unix", socket)
	require.NoError(t, err)
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	conn, err := grpc.NewClient("unix:"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return &adminHarness{client: adminv1.NewAdminServiceClient(conn), fed: opts.Federator, audit: audit}
}

func requireStatus(t *testing.T, err error, code codes.Code, msg string) {
	t.Helper()
	require.Error(t, err)
	st := status.Convert(err)
	require.Equal(t, code.String(), st.Code().String(), st.Message())
	require.Equal(t, msg, st.Message())
}

// TestAdminFederation drives the federation commands of the admin API over
// its real socket: add, list, show, refresh and remove of real peers, and
// every refusal with its code and message, each audited.
func TestAdminFederation(t *testing.T) {
	peer := startPeer(t)
	configTD := spiffeid.RequireTrustDomainFromString("config.example")
	h := startAdmin(t, server.AdminOptions{
		Federator:   newFederator(t, federation.Options{MaxPeers: 2}),
		ConfigPeers: []spiffeid.TrustDomain{configTD},
	})
	ctx, cancel := context.WithTimeout(context.Background(), waitFed)
	defer cancel()
	good := &adminv1.FederationAddRequest{
		TrustDomain:      peerTD.Name(),
		Url:              peer.url,
		Profile:          "https_spiffe",
		EndpointSpiffeId: peerServerID.String(),
		BootstrapBundle:  peer.bundlePEM(),
	}
	with := func(change func(*adminv1.FederationAddRequest)) *adminv1.FederationAddRequest {
		r := &adminv1.FederationAddRequest{
			TrustDomain: good.TrustDomain, Url: good.Url, Profile: good.Profile,
			EndpointSpiffeId: good.EndpointSpiffeId, BootstrapBundle: good.BootstrapBundle,
		}
		change(r)
		return r
	}

	for _, tt := range []struct {
		name string
		req  *adminv1.FederationAddRequest
		code codes.Code
		msg  string
	}{
		{"no trust domain", with(func(r *adminv1.FederationAddRequest) { r.TrustDomain = "" }), codes.InvalidArgument, "trust_domain is required"},
		{"bad trust domain", with(func(r *adminv1.FederationAddRequest) { r.TrustDomain = "Peer.Example" }), codes.InvalidArgument,
			`trust_domain "Peer.Example": trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores`},
		{"own trust domain", with(func(r *adminv1.FederationAddRequest) { r.TrustDomain = td.Name() }), codes.InvalidArgument,
			`federation: invalid peer: "example.org" is this server's own trust domain`},
		{"http", with(func(r *adminv1.FederationAddRequest) { r.Url = "http://" + strings.TrimPrefix(peer.url, "https://") }), codes.InvalidArgument,
			`federation: invalid peer: trust domain "peer.example": bundle endpoint URL "http://` + strings.TrimPrefix(peer.url, "https://") + `": scheme must be https`},
		{"credentials in the URL", with(func(r *adminv1.FederationAddRequest) { r.Url = "https://admin:hunter2@peer.example/" }), codes.InvalidArgument,
			`federation: invalid peer: trust domain "peer.example": bundle endpoint URL carries user information; credentials do not belong in it`},
		{"no bootstrap bundle", with(func(r *adminv1.FederationAddRequest) { r.BootstrapBundle = nil }), codes.InvalidArgument,
			`federation: invalid peer: trust domain "peer.example": profile https_spiffe needs a bootstrap bundle of the peer, obtained out of band`},
		{"bad bootstrap bundle", with(func(r *adminv1.FederationAddRequest) { r.BootstrapBundle = []byte("not a bundle") }), codes.InvalidArgument,
			"bootstrap_bundle: the bundle is neither a SPIFFE bundle document (JSON) nor PEM certificates: pemutil: no PEM certificate found"},
		{"endpoint ID of another trust domain", with(func(r *adminv1.FederationAddRequest) { r.EndpointSpiffeId = "spiffe://other.example/meshca/server" }), codes.InvalidArgument,
			`federation: invalid peer: endpoint SPIFFE ID "spiffe://other.example/meshca/server" is not in trust domain "peer.example"`},
		{"unknown profile", with(func(r *adminv1.FederationAddRequest) { r.Profile = "https" }), codes.InvalidArgument,
			`federation: invalid peer: trust domain "peer.example": unknown profile "https"; want "https_web" or "https_spiffe"`},
		{"web roots that do not parse", &adminv1.FederationAddRequest{TrustDomain: "web.example", Url: "https://127.0.0.1:1/", Profile: "https_web", WebRoots: []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")},
			codes.InvalidArgument, "web_roots: pemutil: certificate 1: x509: malformed certificate"},
		{"peer of the config file", with(func(r *adminv1.FederationAddRequest) { r.TrustDomain = configTD.Name(); r.BootstrapBundle = nil }), codes.FailedPrecondition,
			`trust domain "config.example" is a peer of the server's config file (federation.peers): change it there and restart the server`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := h.client.FederationAdd(ctx, tt.req)
			requireStatus(t, err, tt.code, tt.msg)
		})
	}
	require.Empty(t, h.fed.Peers(), "nothing refused was added")

	// Added: published with its bootstrap bundle, before any fetch.
	added, err := h.client.FederationAdd(ctx, good)
	require.NoError(t, err)
	require.Equal(t, peerTD.Name(), added.GetTrustDomain())
	require.Equal(t, "https_spiffe", added.GetProfile())
	require.Equal(t, peerServerID.String(), added.GetEndpointSpiffeId())
	require.True(t, added.GetBootstrap())
	require.Nil(t, added.Sequence)
	require.Len(t, added.GetRoots(), 1)
	peerBundle, _ := peer.ca.Bundle()
	require.Equal(t, peerBundle.X509Authorities()[0].SerialNumber.Text(16), added.GetRoots()[0].GetSerial())
	require.Len(t, added.GetRoots()[0].GetSha256(), 64)

	_, err = h.client.FederationAdd(ctx, good)
	requireStatus(t, err, codes.AlreadyExists, `federation: trust domain is already a peer: "peer.example"; remove it first to change it`)

	// An https_web peer whose endpoint is down; the limit is two.
	down := &adminv1.FederationAddRequest{TrustDomain: "down.example", Url: "https://127.0.0.1:1/", Profile: "https_web"}
	_, err = h.client.FederationAdd(ctx, down)
	require.NoError(t, err)
	_, err = h.client.FederationAdd(ctx, &adminv1.FederationAddRequest{TrustDomain: "third.example", Url: "https://127.0.0.1:1/", Profile: "https_web"})
	requireStatus(t, err, codes.ResourceExhausted, "federation: too many peers: the limit is 2")

	list, err := h.client.FederationList(ctx, &adminv1.FederationListRequest{})
	require.NoError(t, err)
	require.Len(t, list.GetPeers(), 2)
	require.Equal(t, "down.example", list.GetPeers()[0].GetTrustDomain())
	require.Empty(t, list.GetPeers()[0].GetRoots(), "https_web: no bundle before a first fetch")
	require.Equal(t, peerTD.Name(), list.GetPeers()[1].GetTrustDomain())

	// Refresh fetches now: the endpoint's bundle, with its sequence.
	refreshed, err := h.client.FederationRefresh(ctx, &adminv1.FederationRefreshRequest{TrustDomain: peerTD.Name()})
	require.NoError(t, err)
	require.False(t, refreshed.GetBootstrap())
	require.Equal(t, uint64(1), refreshed.GetSequence())
	require.Equal(t, time.Minute, refreshed.GetRefreshHint().AsDuration())
	require.NotNil(t, refreshed.GetLastSuccess())
	require.Nil(t, refreshed.GetLastError())
	require.NotNil(t, refreshed.GetNextRefresh())

	// A failed fetch is the peer's status, not the call's.
	failed, err := h.client.FederationRefresh(ctx, &adminv1.FederationRefreshRequest{TrustDomain: "down.example"})
	require.NoError(t, err)
	require.Equal(t, "transport", failed.GetLastError().GetReason())
	require.Contains(t, failed.GetLastError().GetMessage(), `federation: bundle of "down.example": transport: `)
	require.Equal(t, int64(1), failed.GetConsecutiveFailures())

	shown, err := h.client.FederationShow(ctx, &adminv1.FederationShowRequest{TrustDomain: peerTD.Name()})
	require.NoError(t, err)
	require.Equal(t, uint64(1), shown.GetSequence())
	_, err = h.client.FederationShow(ctx, &adminv1.FederationShowRequest{TrustDomain: "nobody.example"})
	requireStatus(t, err, codes.NotFound, `federation: trust domain is not a peer: "nobody.example"`)
	_, err = h.client.FederationRefresh(ctx, &adminv1.FederationRefreshRequest{TrustDomain: "nobody.example"})
	requireStatus(t, err, codes.NotFound, `federation: trust domain is not a peer: "nobody.example"`)

	// Removed, and removed again.
	_, err = h.client.FederationRemove(ctx, &adminv1.FederationRemoveRequest{TrustDomain: peerTD.Name()})
	require.NoError(t, err)
	_, err = h.client.FederationRemove(ctx, &adminv1.FederationRemoveRequest{TrustDomain: peerTD.Name()})
	requireStatus(t, err, codes.NotFound, `federation: trust domain is not a peer: "peer.example"`)
	_, err = h.client.FederationRemove(ctx, &adminv1.FederationRemoveRequest{TrustDomain: configTD.Name()})
	requireStatus(t, err, codes.FailedPrecondition, `trust domain "config.example" is a peer of the server's config file (federation.peers): change it there and restart the server`)
	require.Len(t, h.fed.Peers(), 1)

	// Every change and refusal is audited; no credential of a URL is.
	audit := h.audit.String()
	require.Contains(t, audit, `"msg":"admin step","audit":true,"api":"admin","step":"federation-add","trust_domain":"peer.example"`)
	require.Contains(t, audit, `"step":"federation-remove","trust_domain":"peer.example","result":"applied"`)
	require.Contains(t, audit, `"step":"federation-refresh","trust_domain":"peer.example","result":"updated","sequence":1`)
	require.Contains(t, audit, `"step":"federation-refresh","trust_domain":"down.example","result":"fetch_failed","reason":"transport"`)
	require.Contains(t, audit, `"result":"refused","code":"AlreadyExists"`)
	require.Contains(t, audit, `"url":"https://REDACTED@peer.example/"`)
	require.NotContains(t, audit, "hunter2")
	require.NotContains(t, audit, "BEGIN CERTIFICATE")
}

// TestAdminFederationFixedPeers: where peers come from the config only
// (Kubernetes mode), add and remove are refused and the rest works; with
// no federator, every command is refused.
func TestAdminFederationFixedPeers(t *testing.T) {
	const why = "in Kubernetes mode peers come from the config (federation.peers), the same on every replica"
	h := startAdmin(t, server.AdminOptions{Federator: newFederator(t, federation.Options{}), FixedPeers: why})
	ctx, cancel := context.WithTimeout(context.Background(), waitFed)
	defer cancel()
	_, err := h.client.FederationAdd(ctx, &adminv1.FederationAddRequest{TrustDomain: "web.example", Url: "https://127.0.0.1:1/", Profile: "https_web"})
	requireStatus(t, err, codes.FailedPrecondition, why)
	_, err = h.client.FederationRemove(ctx, &adminv1.FederationRemoveRequest{TrustDomain: "web.example"})
	requireStatus(t, err, codes.FailedPrecondition, why)
	list, err := h.client.FederationList(ctx, &adminv1.FederationListRequest{})
	require.NoError(t, err)
	require.Empty(t, list.GetPeers())

	off := startAdmin(t, server.AdminOptions{})
	_, err = off.client.FederationList(ctx, &adminv1.FederationListRequest{})
	requireStatus(t, err, codes.FailedPrecondition, "federation is off on this server")
	_, err = off.client.FederationAdd(ctx, &adminv1.FederationAddRequest{TrustDomain: "web.example"})
	requireStatus(t, err, codes.FailedPrecondition, "federation is off on this server")
}

// TestParsePeerBundle reads a bundle obtained out of band in both forms.
func TestParsePeerBundle(t *testing.T) {
	root := testca.New(t, peerTD)
	sb := spiffebundle.FromX509Authorities(peerTD, []*x509.Certificate{root.Cert})
	sb.SetSequenceNumber(7)
	doc, err := sb.Marshal()
	require.NoError(t, err)

	for name, data := range map[string][]byte{
		"PEM":               pemutil.EncodeCertificates(root.Cert),
		"SPIFFE JSON":       doc,
		"JSON with padding": append(append([]byte("\n  "), doc...), '\n'),
	} {
		t.Run(name, func(t *testing.T) {
			b, err := server.ParsePeerBundle(peerTD, data)
			require.NoError(t, err)
			require.Equal(t, peerTD, b.TrustDomain())
			require.True(t, b.X509Bundle().HasX509Authority(root.Cert))
		})
	}
	for name, tt := range map[string]struct {
		data string
		want string
	}{
		"empty":    {"  \n", "the bundle is empty"},
		"bad JSON": {`{"keys": 1}`, "the bundle is not a SPIFFE bundle document: spiffebundle: unable to parse JWKS: json: cannot unmarshal number into Go struct field bundleDoc.JSONWebKeySet.keys of type []jose.JSONWebKey"},
		"garbage":  {"hello", "the bundle is neither a SPIFFE bundle document (JSON) nor PEM certificates: pemutil: no PEM certificate found"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := server.ParsePeerBundle(peerTD, []byte(tt.data))
			require.EqualError(t, err, tt.want)
		})
	}
}
