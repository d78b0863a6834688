package sds_test

import (
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"io"
	"testing"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/envoyproxy/go-control-plane/pkg/client/sotw/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshca/meshca/agent/internal/fake"
	"github.com/meshca/meshca/agent/sds"
	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/rotation"
	"github.com/meshca/meshca/testca"
)

// The agent serves its rotation.Source.
var _ sds.Source = (*rotation.Source)(nil)

// Log messages the tests wait on: each is logged once the server has
// taken a request in, so that what the test does next happens after it.
const (
	logWatching        = "watching secrets"
	logWatchingDelta   = "watching secrets (delta)"
	logNotServed       = "a proxy asked only for secrets that are not served; not answering"
	logRejected        = "a proxy rejected secrets; holding them until the next change"
	logServing         = "serving secrets"
	logWaitingForSVID  = "waiting for the first X509-SVID before serving secrets"
	logCannotServe     = "cannot serve the current SVID and bundles; keeping the previous secrets"
	logFederatedIgnore = "ignoring a federated bundle with no X.509 authorities"
)

func TestNew(t *testing.T) {
	src := fake.NewSource()
	for _, tt := range []struct {
		name string
		opts sds.Options
		err  string
	}{
		{
			name: "no source",
			opts: sds.Options{},
			err:  "sds: Options.Source is required: the SVID and bundles to serve",
		},
		{
			name: "certificate named as the default validation context",
			opts: sds.Options{Source: src, CertificateName: "ROOTCA"},
			err:  `sds: secret names must differ; CertificateName "ROOTCA", ValidationContextName "ROOTCA", FederatedValidationContextName "ALL"`,
		},
		{
			name: "validation contexts named alike",
			opts: sds.Options{Source: src, ValidationContextName: "roots", FederatedValidationContextName: "roots"},
			err:  `sds: secret names must differ; CertificateName "default", ValidationContextName "roots", FederatedValidationContextName "roots"`,
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := sds.New(tt.opts)
			require.EqualError(t, err, tt.err)
		})
	}
}

// TestADSClient runs go-control-plane's own ADS client, as an xDS client
// library would, through a rotation of the SVID and a change of the
// bundle.
func TestADSClient(t *testing.T) {
	e := start(t, sds.Options{}, true)
	ctx := testContext(t)
	client := sotw.NewADSClient(ctx, envoyID, resource.SecretType)
	require.NoError(t, client.InitConnect(e.conn))

	resp, err := client.Fetch()
	require.NoError(t, err)
	got := secrets(t, resp.Resources)
	require.Equal(t, []string{"ALL", "ROOTCA", "default"}, names(got), "a wildcard request gets every secret")
	requireCertificate(t, got["default"], e.svid(t))
	requireRoots(t, got["ROOTCA"], e.root.Cert)
	require.NoError(t, client.Ack())

	// A renewal: a new certificate and key.
	svid := e.rotate()
	resp, err = client.Fetch()
	require.NoError(t, err)
	got = secrets(t, resp.Resources)
	requireCertificate(t, got["default"], svid)
	requireRoots(t, got["ROOTCA"], e.root.Cert)
	require.NoError(t, client.Ack())

	// A root prepared: the bundle holds two roots.
	next := testca.New(t, td)
	e.src.WithBundle(x509bundle.FromX509Authorities(td, []*x509.Certificate{e.root.Cert, next.Cert}))
	resp, err = client.Fetch()
	require.NoError(t, err)
	got = secrets(t, resp.Resources)
	requireRoots(t, got["ROOTCA"], e.root.Cert, next.Cert)
	requireCertificate(t, got["default"], svid)
	require.NoError(t, client.Ack())
}

// TestStreamSecrets runs a state-of-the-world SDS stream as Envoy does:
// named secrets, each response ACKed with its version and nonce.
func TestStreamSecrets(t *testing.T) {
	e := start(t, sds.Options{}, true)
	stream, err := secretv3.NewSecretDiscoveryServiceClient(e.conn).StreamSecrets(testContext(t))
	require.NoError(t, err)
	require.NoError(t, stream.Send(&discoveryv3.DiscoveryRequest{
		Node:          envoyID,
		TypeUrl:       resource.SecretType,
		ResourceNames: []string{"default", "ROOTCA"},
	}))

	resp, err := stream.Recv()
	require.NoError(t, err)
	require.Equal(t, resource.SecretType, resp.GetTypeUrl())
	require.NotEmpty(t, resp.GetVersionInfo())
	got := secrets(t, resp.GetResources())
	require.Equal(t, []string{"ROOTCA", "default"}, names(got), "only the named secrets")
	requireCertificate(t, got["default"], e.svid(t))
	requireRoots(t, got["ROOTCA"], e.root.Cert)
	ack := func(resp *discoveryv3.DiscoveryResponse) {
		t.Helper()
		require.NoError(t, stream.Send(&discoveryv3.DiscoveryRequest{
			TypeUrl:       resource.SecretType,
			ResourceNames: []string{"default", "ROOTCA"},
			VersionInfo:   resp.GetVersionInfo(),
			ResponseNonce: resp.GetNonce(),
		}))
	}
	ack(resp)

	svid := e.rotate()
	next, err := stream.Recv()
	require.NoError(t, err)
	require.NotEqual(t, resp.GetVersionInfo(), next.GetVersionInfo())
	got = secrets(t, next.GetResources())
	requireCertificate(t, got["default"], svid)
	ack(next)

	root2 := testca.New(t, td)
	e.src.WithBundle(x509bundle.FromX509Authorities(td, []*x509.Certificate{root2.Cert}))
	next, err = stream.Recv()
	require.NoError(t, err)
	got = secrets(t, next.GetResources())
	requireRoots(t, got["ROOTCA"], root2.Cert)
	requireCertificate(t, got["default"], svid)
}

// TestDeltaSecrets runs a delta SDS stream: each update carries only the
// secrets that changed.
func TestDeltaSecrets(t *testing.T) {
	e := start(t, sds.Options{}, true)
	stream, err := secretv3.NewSecretDiscoveryServiceClient(e.conn).DeltaSecrets(testContext(t))
	require.NoError(t, err)
	require.NoError(t, stream.Send(&discoveryv3.DeltaDiscoveryRequest{
		Node:                   envoyID,
		TypeUrl:                resource.SecretType,
		ResourceNamesSubscribe: []string{"default", "ROOTCA"},
	}))
	recv := func() map[string]*tlsv3.Secret {
		t.Helper()
		resp, err := stream.Recv()
		require.NoError(t, err)
		require.Empty(t, resp.GetRemovedResources())
		var anys []*anypb.Any
		for _, r := range resp.GetResources() {
			require.NotEmpty(t, r.GetVersion())
			anys = append(anys, r.GetResource())
		}
		got := secrets(t, anys)
		for _, r := range resp.GetResources() {
			require.Equal(t, r.GetName(), got[r.GetName()].GetName())
		}
		// ACK.
		require.NoError(t, stream.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resource.SecretType, ResponseNonce: resp.GetNonce()}))
		return got
	}

	got := recv()
	require.Equal(t, []string{"ROOTCA", "default"}, names(got))
	requireCertificate(t, got["default"], e.svid(t))
	requireRoots(t, got["ROOTCA"], e.root.Cert)

	svid := e.rotate()
	got = recv()
	require.Equal(t, []string{"default"}, names(got), "only the certificate changed")
	requireCertificate(t, got["default"], svid)

	root2 := testca.New(t, td)
	e.src.WithBundle(x509bundle.FromX509Authorities(td, []*x509.Certificate{e.root.Cert, root2.Cert}))
	got = recv()
	require.Equal(t, []string{"ROOTCA"}, names(got), "only the roots changed; ALL is not subscribed")
	requireRoots(t, got["ROOTCA"], e.root.Cert, root2.Cert)
}

// TestADSDelta runs a delta stream on the AggregatedDiscoveryService.
func TestADSDelta(t *testing.T) {
	e := start(t, sds.Options{}, true)
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(e.conn).DeltaAggregatedResources(testContext(t))
	require.NoError(t, err)
	require.NoError(t, stream.Send(&discoveryv3.DeltaDiscoveryRequest{
		Node:                   envoyID,
		TypeUrl:                resource.SecretType,
		ResourceNamesSubscribe: []string{"default"},
	}))
	resp, err := stream.Recv()
	require.NoError(t, err)
	require.Len(t, resp.GetResources(), 1)
	var s tlsv3.Secret
	require.NoError(t, resp.GetResources()[0].GetResource().UnmarshalTo(&s))
	requireCertificate(t, &s, e.svid(t))
}

func TestFetchSecrets(t *testing.T) {
	e := start(t, sds.Options{}, false)
	client := secretv3.NewSecretDiscoveryServiceClient(e.conn)
	ctx := testContext(t)
	fetch := func(names ...string) (*discoveryv3.DiscoveryResponse, error) {
		return client.FetchSecrets(ctx, &discoveryv3.DiscoveryRequest{Node: envoyID, ResourceNames: names})
	}

	e.logs.waitFor(t, logWaitingForSVID, 1)
	_, err := fetch("default")
	require.Equal(t, codes.Unavailable, status.Code(err))
	require.EqualError(t, err, "rpc error: code = Unavailable desc = sds: no secrets yet: the agent has no X509-SVID yet; retry later")

	svid := e.rotate()
	e.logs.waitFor(t, logServing, 1)
	resp, err := fetch("default")
	require.NoError(t, err)
	got := secrets(t, resp.GetResources())
	require.Equal(t, []string{"default"}, names(got))
	requireCertificate(t, got["default"], svid)

	// The version a client holds does not matter: the answer is current.
	resp, err = client.FetchSecrets(ctx, &discoveryv3.DiscoveryRequest{ResourceNames: []string{"ROOTCA"}, VersionInfo: resp.GetVersionInfo()})
	require.NoError(t, err)
	requireRoots(t, secrets(t, resp.GetResources())["ROOTCA"], e.root.Cert)

	svid = e.rotate()
	e.logs.waitFor(t, logServing, 2)
	resp, err = fetch()
	require.NoError(t, err)
	got = secrets(t, resp.GetResources())
	require.Equal(t, []string{"ALL", "ROOTCA", "default"}, names(got), "no names means every secret")
	requireCertificate(t, got["default"], svid)

	resp, err = fetch("nope")
	require.NoError(t, err)
	require.Empty(t, resp.GetResources(), "a name that is not served gets nothing")
}

// TestUnknownName: a request for a name that is not served gets no answer,
// as SotW has no way to say "no such secret" that Envoy would accept, and
// the stream goes on.
func TestUnknownName(t *testing.T) {
	e := start(t, sds.Options{}, true)
	stream, err := secretv3.NewSecretDiscoveryServiceClient(e.conn).StreamSecrets(testContext(t))
	require.NoError(t, err)
	require.NoError(t, stream.Send(&discoveryv3.DiscoveryRequest{Node: envoyID, ResourceNames: []string{"spiffe://cluster.local/ns/other/sa/db"}}))
	e.logs.waitFor(t, logNotServed, 1)

	// Nothing was answered, so this request carries no nonce. Had the
	// first been answered, that answer would be received first.
	require.NoError(t, stream.Send(&discoveryv3.DiscoveryRequest{ResourceNames: []string{"spiffe://cluster.local/ns/other/sa/db", "default"}}))
	resp, err := stream.Recv()
	require.NoError(t, err)
	got := secrets(t, resp.GetResources())
	require.Equal(t, []string{"default"}, names(got))
	requireCertificate(t, got["default"], e.svid(t))
	require.NoError(t, stream.Send(&discoveryv3.DiscoveryRequest{
		ResourceNames: []string{"spiffe://cluster.local/ns/other/sa/db", "default"},
		VersionInfo:   resp.GetVersionInfo(),
		ResponseNonce: resp.GetNonce(),
	}))

	svid := e.rotate()
	resp, err = stream.Recv()
	require.NoError(t, err)
	requireCertificate(t, secrets(t, resp.GetResources())["default"], svid)

	t.Run("delta", func(t *testing.T) {
		stream, err := secretv3.NewSecretDiscoveryServiceClient(e.conn).DeltaSecrets(testContext(t))
		require.NoError(t, err)
		before := e.logs.count(logWatchingDelta)
		require.NoError(t, stream.Send(&discoveryv3.DeltaDiscoveryRequest{Node: envoyID, ResourceNamesSubscribe: []string{"nope"}}))
		e.logs.waitFor(t, logWatchingDelta, before+1)
		require.NoError(t, stream.Send(&discoveryv3.DeltaDiscoveryRequest{ResourceNamesSubscribe: []string{"ROOTCA"}}))
		resp, err := stream.Recv()
		require.NoError(t, err)
		require.Len(t, resp.GetResources(), 1)
		require.Equal(t, "ROOTCA", resp.GetResources()[0].GetName())
	})
}

func TestCustomNames(t *testing.T) {
	e := start(t, sds.Options{
		CertificateName:                "spiffe://cluster.local/ns/shop/sa/web",
		ValidationContextName:          "spiffe://cluster.local",
		FederatedValidationContextName: "federated",
	}, true)
	ctx := testContext(t)
	e.logs.waitFor(t, logServing, 1)
	resp, err := secretv3.NewSecretDiscoveryServiceClient(e.conn).FetchSecrets(ctx, &discoveryv3.DiscoveryRequest{})
	require.NoError(t, err)
	got := secrets(t, resp.GetResources())
	require.Equal(t, []string{"federated", "spiffe://cluster.local", "spiffe://cluster.local/ns/shop/sa/web"}, names(got))

	stream, err := secretv3.NewSecretDiscoveryServiceClient(e.conn).StreamSecrets(ctx)
	require.NoError(t, err)
	require.NoError(t, stream.Send(&discoveryv3.DiscoveryRequest{Node: envoyID, ResourceNames: []string{"default", "ROOTCA", "spiffe://cluster.local/ns/shop/sa/web"}}))
	sresp, err := stream.Recv()
	require.NoError(t, err)
	got = secrets(t, sresp.GetResources())
	require.Equal(t, []string{"spiffe://cluster.local/ns/shop/sa/web"}, names(got), "the default names are not served")
	requireCertificate(t, got["spiffe://cluster.local/ns/shop/sa/web"], e.svid(t))
}

// TestBeforeFirstSVID: streams opened before the agent has a certificate
// wait, unanswered and open, and are pushed the secrets when it comes.
func TestBeforeFirstSVID(t *testing.T) {
	e := start(t, sds.Options{}, false)
	ctx := testContext(t)
	client := secretv3.NewSecretDiscoveryServiceClient(e.conn)

	sotwStream, err := client.StreamSecrets(ctx)
	require.NoError(t, err)
	require.NoError(t, sotwStream.Send(&discoveryv3.DiscoveryRequest{Node: envoyID, ResourceNames: []string{"default", "ROOTCA"}}))
	deltaStream, err := client.DeltaSecrets(ctx)
	require.NoError(t, err)
	require.NoError(t, deltaStream.Send(&discoveryv3.DeltaDiscoveryRequest{Node: envoyID, ResourceNamesSubscribe: []string{"default"}}))
	ads := sotw.NewADSClient(ctx, envoyID, resource.SecretType)
	require.NoError(t, ads.InitConnect(e.conn))
	e.logs.waitFor(t, logWatching, 2)
	e.logs.waitFor(t, logWatchingDelta, 1)
	_, err = client.FetchSecrets(ctx, &discoveryv3.DiscoveryRequest{Node: envoyID})
	require.Equal(t, codes.Unavailable, status.Code(err))
	require.Zero(t, e.logs.count(logServing))

	// Whatever a stream received before now would be received first.
	svid := e.rotate()

	resp, err := sotwStream.Recv()
	require.NoError(t, err)
	got := secrets(t, resp.GetResources())
	require.Equal(t, []string{"ROOTCA", "default"}, names(got))
	requireCertificate(t, got["default"], svid)

	dresp, err := deltaStream.Recv()
	require.NoError(t, err)
	require.Len(t, dresp.GetResources(), 1)
	var s tlsv3.Secret
	require.NoError(t, dresp.GetResources()[0].GetResource().UnmarshalTo(&s))
	requireCertificate(t, &s, svid)

	aresp, err := ads.Fetch()
	require.NoError(t, err)
	requireCertificate(t, secrets(t, aresp.Resources)["default"], svid)
}

// TestFederation: ROOTCA holds only the own roots; ALL configures Envoy's
// SPIFFE validator with each trust domain's roots apart, and follows
// federation changes.
func TestFederation(t *testing.T) {
	e := start(t, sds.Options{}, true)
	partner := spiffeid.RequireTrustDomainFromString("partner.example")
	bank := spiffeid.RequireTrustDomainFromString("bank.example")
	partnerCA, bankCA := testca.New(t, partner), testca.New(t, bank)
	e.logs.waitFor(t, logServing, 1)
	require.Equal(t, map[string][]*x509.Certificate{"cluster.local": {e.root.Cert}}, fetchSPIFFEDomains(t, e),
		"with no federation, ALL holds the own trust domain")
	e.src.WithFederated(partnerCA.Bundle())
	e.logs.waitFor(t, logServing, 2)

	client := sotw.NewADSClient(testContext(t), envoyID, resource.SecretType)
	require.NoError(t, client.InitConnect(e.conn))
	resp, err := client.Fetch()
	require.NoError(t, err)
	require.NoError(t, client.Ack())
	got := secrets(t, resp.Resources)
	requireRoots(t, got["ROOTCA"], e.root.Cert)
	require.Equal(t, map[string][]*x509.Certificate{
		"cluster.local":   {e.root.Cert},
		"partner.example": {partnerCA.Cert},
	}, spiffeDomains(t, got["ALL"]))

	// bank.example federates; an empty bundle of a third domain is left
	// out, as Envoy would reject the whole validation context.
	empty := x509bundle.New(spiffeid.RequireTrustDomainFromString("empty.example"))
	e.src.WithFederated(partnerCA.Bundle(), bankCA.Bundle(), empty)
	resp, err = client.Fetch()
	require.NoError(t, err)
	got = secrets(t, resp.Resources)
	require.Equal(t, map[string][]*x509.Certificate{
		"bank.example":    {bankCA.Cert},
		"cluster.local":   {e.root.Cert},
		"partner.example": {partnerCA.Cert},
	}, spiffeDomains(t, got["ALL"]))
	requireRoots(t, got["ROOTCA"], e.root.Cert)
	require.Positive(t, e.logs.count(logFederatedIgnore))
}

// fetchSPIFFEDomains fetches ALL and returns its trust domains and roots.
func fetchSPIFFEDomains(t *testing.T, e *env) map[string][]*x509.Certificate {
	t.Helper()
	resp, err := secretv3.NewSecretDiscoveryServiceClient(e.conn).FetchSecrets(testContext(t), &discoveryv3.DiscoveryRequest{ResourceNames: []string{"ALL"}})
	require.NoError(t, err)
	return spiffeDomains(t, secrets(t, resp.GetResources())["ALL"])
}

// spiffeDomains returns the trust domains and roots of a validation
// context of Envoy's SPIFFE validator, checking that they are sorted.
func spiffeDomains(t *testing.T, secret *tlsv3.Secret) map[string][]*x509.Certificate {
	t.Helper()
	vc := secret.GetValidationContext()
	require.NotNil(t, vc)
	require.Nil(t, vc.GetTrustedCa(), "the SPIFFE validator takes its roots from its own config")
	require.Equal(t, sds.SPIFFEValidatorName, vc.GetCustomValidatorConfig().GetName())
	var cfg tlsv3.SPIFFECertValidatorConfig
	require.NoError(t, vc.GetCustomValidatorConfig().GetTypedConfig().UnmarshalTo(&cfg))
	out := make(map[string][]*x509.Certificate)
	var order []string
	for _, d := range cfg.GetTrustDomains() {
		roots, err := pemutil.ParseCertificates(d.GetTrustBundle().GetInlineBytes())
		require.NoError(t, err)
		out[d.GetName()] = roots
		order = append(order, d.GetName())
	}
	require.IsNonDecreasing(t, order)
	return out
}

// TestNACK: a rejected response is not sent again at once; the next
// change is.
func TestNACK(t *testing.T) {
	e := start(t, sds.Options{}, true)
	client := sotw.NewADSClient(testContext(t), envoyID, resource.SecretType)
	require.NoError(t, client.InitConnect(e.conn))
	_, err := client.Fetch()
	require.NoError(t, err)
	require.NoError(t, client.Nack("Failed to load private key from <inline>"))
	e.logs.waitFor(t, logRejected, 1)

	// Had the rejected secrets been sent again, they would come first.
	svid := e.rotate()
	resp, err := client.Fetch()
	require.NoError(t, err)
	requireCertificate(t, secrets(t, resp.Resources)["default"], svid)
	require.Contains(t, e.logs.String(), "Failed to load private key from <inline>")
}

// TestSourceWithoutBundle: a source that cannot be served is logged, and
// what was served stays.
func TestSourceWithoutBundle(t *testing.T) {
	e := start(t, sds.Options{}, true)
	e.logs.waitFor(t, logServing, 1)
	served := e.svid(t)

	// An SVID of another trust domain, whose bundle the source lacks.
	other := testca.New(t, spiffeid.RequireTrustDomainFromString("other.example"))
	e.src.WithSVID(other.CreateX509SVID(spiffeid.RequireFromPath(other.Bundle().TrustDomain(), "/x")))
	e.logs.waitFor(t, logCannotServe, 1)
	require.Contains(t, e.logs.String(), `sds: getting the bundle of \"other.example\": fake: no bundle for other.example`)

	resp, err := secretv3.NewSecretDiscoveryServiceClient(e.conn).FetchSecrets(testContext(t), &discoveryv3.DiscoveryRequest{ResourceNames: []string{"default"}})
	require.NoError(t, err)
	requireCertificate(t, secrets(t, resp.GetResources())["default"], served)
}

// TestRunEndsStreams: when Run returns, open streams end, so that the
// agent's gRPC server can stop gracefully; Run runs once.
func TestRunEndsStreams(t *testing.T) {
	e := start(t, sds.Options{}, true)
	stream, err := secretv3.NewSecretDiscoveryServiceClient(e.conn).StreamSecrets(testContext(t))
	require.NoError(t, err)
	require.NoError(t, stream.Send(&discoveryv3.DiscoveryRequest{Node: envoyID, ResourceNames: []string{"default"}}))
	_, err = stream.Recv()
	require.NoError(t, err)

	require.EqualError(t, e.stopRun(), "sds: stopped: context canceled")
	_, err = stream.Recv()
	require.ErrorIs(t, err, io.EOF)

	require.EqualError(t, e.srv.Run(t.Context()), "sds: Run has already been called on this server")
}

// TestPrivateKeyNeverLogged runs streams of every kind with debug logs
// on, and searches the logs for the key.
func TestPrivateKeyNeverLogged(t *testing.T) {
	e := start(t, sds.Options{}, true)
	ctx := testContext(t)
	client := sotw.NewADSClient(ctx, envoyID, resource.SecretType)
	require.NoError(t, client.InitConnect(e.conn))
	resp, err := client.Fetch()
	require.NoError(t, err)
	require.NoError(t, client.Nack("bad"))
	e.rotate()
	_, err = client.Fetch()
	require.NoError(t, err)
	delta, err := secretv3.NewSecretDiscoveryServiceClient(e.conn).DeltaSecrets(ctx)
	require.NoError(t, err)
	require.NoError(t, delta.Send(&discoveryv3.DeltaDiscoveryRequest{Node: envoyID}))
	_, err = delta.Recv()
	require.NoError(t, err)
	_ = e.stopRun()

	logs := e.logs.String()
	require.Contains(t, logs, "serving secrets", "the logs were captured")
	for _, svid := range []string{"first", "second"} {
		var key []byte
		if svid == "first" {
			key = pkcs8(t, secrets(t, resp.Resources)["default"].GetTlsCertificate().GetPrivateKey().GetInlineBytes())
		} else {
			k, err := x509.MarshalPKCS8PrivateKey(e.svid(t).PrivateKey)
			require.NoError(t, err)
			key = k
		}
		require.NotContains(t, logs, base64.StdEncoding.EncodeToString(key), "the %s key", svid)
		require.NotContains(t, logs, hex.EncodeToString(key), "the %s key", svid)
	}
	require.NotContains(t, logs, "PRIVATE KEY")
}
