package main_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	securityv1alpha1 "istio.io/api/security/v1alpha1"

	linkerdpb "github.com/meshca/meshca/proto/linkerd/identity"
	adminv1 "github.com/meshca/meshca/proto/meshca/admin/v1"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/testca"
)

// badRPC is one bad request to a gRPC API of the server.
type badRPC struct {
	name string
	api  string // the API's label in audit lines; empty when the request is refused before the request path
	call func() error
	code codes.Code
	msg  string
}

// badHTTP is one bad request to the federation bundle endpoint.
type badHTTP struct {
	name   string
	do     func() (*http.Response, error)
	status int
	body   string
}

// withUnknownField adds an unknown field of n bytes to m, which the server
// must read (and refuse for its size) before it can parse m.
func withUnknownField[M proto.Message](m M, n int) M {
	m.ProtoReflect().SetUnknown(protowire.AppendBytes(protowire.AppendTag(nil, 1000, protowire.BytesType), make([]byte, n)))
	return m
}

// bearer returns a context whose calls carry "authorization: Bearer
// <token>" metadata.
func bearer(token string) context.Context {
	return metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+token)
}

// TestBadInputAcrossAPIs sends bad requests to every API of a
// meshca-server binary in Kubernetes mode, from outside and over real
// sockets: the native Sign API, GetBundle and WatchBundle, Istio's
// CreateCertificate, Linkerd's Certify (service-account tokens reviewed
// by a real kube-apiserver), the admin socket, the federation bundle
// endpoint (HTTPS) and the plain-text health port. Each is refused with
// the right code and a message saying what was wrong; every refusal of a
// certificate request is audited, and no token reaches the log. After all
// of them the server is healthy and still issues through each front end.
func TestBadInputAcrossAPIs(t *testing.T) {
	k := startKubeServer(t, "")
	conn := dialServer(t, k.srv.addr, k.bundle)
	native := meshcav1.NewCertificateServiceClient(conn)
	bundles := meshcav1.NewBundleServiceClient(conn)
	istio := securityv1alpha1.NewIstioCertificateServiceClient(conn)
	linkerd := linkerdpb.NewIdentityClient(conn)
	admin := adminv1.NewAdminServiceClient(dialUnix(t, k.socket))
	healthConn, err := grpc.NewClient(k.ready.HealthAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { healthConn.Close() })
	health := healthpb.NewHealthClient(healthConn)

	web := k.id("web")
	webToken := k.token(t, "web", "meshca")
	istioToken := k.token(t, "web", "istio-ca")
	l5dToken := []byte(k.token(t, "web", "identity.l5d.io"))
	l5dName := k.linkerdName("web")
	key := testca.NewKey(t)
	good := testca.CreateCSR(t, key, web.String())
	goodPEM := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: good}))
	tampered := bytes.Clone(good)
	tampered[len(tampered)-3] ^= 0xff
	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	require.NoError(t, err)
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	require.NoError(t, err)
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	require.NoError(t, err)
	foreign := testca.New(t, td).ChildCA().CreateX509SVID(web)
	foreignConn := dialServerWithSVID(t, k.srv.addr, k.bundle, foreign)
	impersonate, err := structpb.NewStruct(map[string]any{"ImpersonatedIdentity": k.id("other").String()})
	require.NoError(t, err)
	l5dCSR := testca.SignCSR(t, &x509.CertificateRequest{DNSNames: []string{l5dName}}, key)
	sign := func(ctx context.Context, req *meshcav1.SignRequest) func() error {
		return func() error { _, err := native.Sign(ctx, req); return err }
	}
	create := func(ctx context.Context, req *securityv1alpha1.IstioCertificateRequest) func() error {
		return func() error { _, err := istio.CreateCertificate(ctx, req); return err }
	}
	certify := func(req *linkerdpb.CertifyRequest) func() error {
		return func() error { _, err := linkerd.Certify(context.Background(), req); return err }
	}
	suffix := ".serviceaccount.identity.linkerd.cluster.local"

	rpcs := []badRPC{
		// The native API.
		{"native: no credential", "native", sign(context.Background(), &meshcav1.SignRequest{Csr: good}), codes.Unauthenticated, "identity: no credential"},
		{"native: token that is not a JWT", "native", sign(bearer("not-a-token-at-all"), &meshcav1.SignRequest{Csr: good}), codes.Unauthenticated, "it is not a JWT"},
		{"native: Basic authorization", "native", sign(metadata.AppendToOutgoingContext(context.Background(), "authorization", "Basic Zm9vOmJhcg=="), &meshcav1.SignRequest{Csr: good}),
			codes.Unauthenticated, `identity: authorization header is not "Bearer <token>"`},
		{"native: oversized token", "native", sign(bearer(strings.Repeat("x", 8193)), &meshcav1.SignRequest{Csr: good}), codes.Unauthenticated, "identity: bearer token is 8193 bytes, more than the limit of 8192"},
		{"native: token for Istio's audience", "native", sign(bearer(istioToken), &meshcav1.SignRequest{Csr: good}), codes.Unauthenticated, `token audiences ["istio-ca"] is invalid for the target audiences ["meshca"]`},
		{"native: client certificate of another CA", "native", func() error {
			_, err := meshcav1.NewCertificateServiceClient(foreignConn).Sign(context.Background(), &meshcav1.SignRequest{Csr: good})
			return err
		}, codes.Unauthenticated, "identity: client certificate does not verify against the trust bundle"},
		{"native: empty CSR", "native", sign(bearer(webToken), &meshcav1.SignRequest{}), codes.InvalidArgument, "ca: CSR is empty"},
		{"native: not a CSR", "native", sign(bearer(webToken), &meshcav1.SignRequest{Csr: []byte("hello")}), codes.InvalidArgument, "ca: CSR is not a PKCS#10 request"},
		{"native: CSR signature tampered", "native", sign(bearer(webToken), &meshcav1.SignRequest{Csr: tampered}), codes.InvalidArgument, "ca: CSR signature does not verify"},
		{"native: two URI SANs", "native", sign(bearer(webToken), &meshcav1.SignRequest{Csr: testca.CreateCSR(t, key, web.String(), k.id("other").String())}),
			codes.InvalidArgument, "ca: CSR has 2 URI SANs; an X509-SVID has exactly one"},
		{"native: RSA 1024 key", "native", sign(bearer(webToken), &meshcav1.SignRequest{Csr: testca.CreateCSR(t, rsa1024, web.String())}),
			codes.InvalidArgument, "ca: RSA key of 1024 bits is not supported; use 2048 to 8192 bits"},
		{"native: CSR over its limit", "native", sign(bearer(webToken), &meshcav1.SignRequest{Csr: make([]byte, 16<<10+1)}),
			codes.InvalidArgument, "ca: CSR is 16385 bytes, more than the limit of 16384"},
		{"native: message over the transport limit", "", sign(bearer(webToken), &meshcav1.SignRequest{Csr: make([]byte, 64<<10+1)}),
			codes.ResourceExhausted, "grpc: received message larger than max"},
		{"native: invalid ttl", "native", sign(bearer(webToken), &meshcav1.SignRequest{Csr: good, Ttl: &durationpb.Duration{Seconds: 1, Nanos: -1}}),
			codes.InvalidArgument, "ttl is not a valid duration"},

		// The bundle API.
		{"GetBundle: message over the transport limit", "", func() error {
			_, err := bundles.GetBundle(context.Background(), withUnknownField(&meshcav1.GetBundleRequest{}, 64<<10))
			return err
		}, codes.ResourceExhausted, "grpc: received message larger than max"},
		{"WatchBundle: message over the transport limit", "", func() error {
			stream, err := bundles.WatchBundle(context.Background(), withUnknownField(&meshcav1.WatchBundleRequest{}, 64<<10))
			if err != nil {
				return err
			}
			_, err = stream.Recv()
			return err
		}, codes.ResourceExhausted, "grpc: received message larger than max"},
		{"BundleService: unknown method", "", func() error {
			return conn.Invoke(context.Background(), "/meshca.v1.BundleService/DeleteBundle", &meshcav1.GetBundleRequest{}, &meshcav1.TrustBundle{})
		}, codes.Unimplemented, "unknown method DeleteBundle"},

		// Istio's API.
		{"istio: no credential", "istio", create(context.Background(), &securityv1alpha1.IstioCertificateRequest{Csr: goodPEM}), codes.Unauthenticated, "identity: no credential"},
		{"istio: token for Linkerd's audience", "istio", create(bearer(string(l5dToken)), &securityv1alpha1.IstioCertificateRequest{Csr: goodPEM}),
			codes.Unauthenticated, `token audiences ["identity.l5d.io"] is invalid for the target audiences ["istio-ca"]`},
		{"istio: base64 DER, not PEM", "istio", create(bearer(istioToken), &securityv1alpha1.IstioCertificateRequest{Csr: base64.StdEncoding.EncodeToString(good)}),
			codes.InvalidArgument, `ca: CSR is not PEM; send a PEM block of type "CERTIFICATE REQUEST"`},
		{"istio: PEM of a certificate", "istio", create(bearer(istioToken), &securityv1alpha1.IstioCertificateRequest{Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: good}))}),
			codes.InvalidArgument, `ca: PEM block is "CERTIFICATE", want "CERTIFICATE REQUEST"`},
		{"istio: P-224 key", "istio", create(bearer(istioToken), &securityv1alpha1.IstioCertificateRequest{Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: testca.CreateCSR(t, p224, web.String())}))}),
			codes.InvalidArgument, "ca: ECDSA curve P-224 is not supported; use P-256 or P-384"},
		{"istio: impersonation", "istio", create(bearer(istioToken), &securityv1alpha1.IstioCertificateRequest{Csr: goodPEM, Metadata: impersonate}),
			codes.PermissionDenied, "meshca does not support impersonation and issues only the caller's own identity"},

		// Linkerd's API.
		{"linkerd: no token", "linkerd", certify(&linkerdpb.CertifyRequest{Identity: l5dName, CertificateSigningRequest: l5dCSR}),
			codes.Unauthenticated, "identity: no credential: the request's token is empty; send the workload's service-account token"},
		{"linkerd: token with a space", "linkerd", certify(&linkerdpb.CertifyRequest{Identity: l5dName, Token: []byte("abc def"), CertificateSigningRequest: l5dCSR}),
			codes.Unauthenticated, "identity: the request's token has a character outside printable ASCII at offset 3"},
		{"linkerd: token for the native audience", "linkerd", certify(&linkerdpb.CertifyRequest{Identity: l5dName, Token: []byte(webToken), CertificateSigningRequest: l5dCSR}),
			codes.Unauthenticated, `token audiences ["meshca"] is invalid for the target audiences ["identity.l5d.io"]`},
		{"linkerd: wrong cluster domain", "linkerd", certify(&linkerdpb.CertifyRequest{Identity: "web." + k.ns + ".serviceaccount.identity.linkerd.example.com", Token: l5dToken,
			CertificateSigningRequest: testca.SignCSR(t, &x509.CertificateRequest{DNSNames: []string{"web." + k.ns + ".serviceaccount.identity.linkerd.example.com"}}, key)}),
			codes.InvalidArgument, `does not end in "` + suffix + `"`},
		{"linkerd: CSR name is not the identity", "linkerd", certify(&linkerdpb.CertifyRequest{Identity: l5dName, Token: l5dToken,
			CertificateSigningRequest: testca.SignCSR(t, &x509.CertificateRequest{DNSNames: []string{k.linkerdName("other")}}, key)}),
			codes.InvalidArgument, `server: the CSR's DNS SAN "` + k.linkerdName("other") + `" is not the request's identity "` + l5dName + `"; put the identity in both`},
		{"linkerd: P-384 key", "linkerd", certify(&linkerdpb.CertifyRequest{Identity: l5dName, Token: l5dToken,
			CertificateSigningRequest: testca.SignCSR(t, &x509.CertificateRequest{DNSNames: []string{l5dName}}, p384)}),
			codes.InvalidArgument, "ca: ECDSA curve P-384 is not supported for this request; use P-256"},
		{"linkerd: identity longer than a DNS name", "linkerd", certify(&linkerdpb.CertifyRequest{Identity: strings.Repeat("a", 300) + suffix, Token: l5dToken, CertificateSigningRequest: l5dCSR}),
			codes.InvalidArgument, "server: the request's identity is 346 bytes, longer than a DNS name (253)"},

		// The admin socket.
		{"admin: federation add without a trust domain", "", func() error {
			_, err := admin.FederationAdd(context.Background(), &adminv1.FederationAddRequest{Url: "https://b.example/", Profile: "https_web"})
			return err
		}, codes.InvalidArgument, "trust_domain is required"},
		{"admin: federation add in Kubernetes mode", "", func() error {
			_, err := admin.FederationAdd(context.Background(), &adminv1.FederationAddRequest{TrustDomain: "b.example", Url: "https://b.example/", Profile: "https_web"})
			return err
		}, codes.FailedPrecondition, "in Kubernetes mode the federation peers come from the config (federation.peers)"},
		{"admin: show an unknown peer", "", func() error {
			_, err := admin.FederationShow(context.Background(), &adminv1.FederationShowRequest{TrustDomain: "nowhere.example"})
			return err
		}, codes.NotFound, "nowhere.example"},
		{"admin: show a malformed trust domain", "", func() error {
			_, err := admin.FederationShow(context.Background(), &adminv1.FederationShowRequest{TrustDomain: "Not A Domain"})
			return err
		}, codes.InvalidArgument, `trust_domain "Not A Domain"`},
		{"admin: retire with no retiring root", "", func() error {
			_, err := admin.RetireRoot(context.Background(), &adminv1.OperationRequest{})
			return err
		}, codes.FailedPrecondition, "rotation: nothing to do: no root is retiring; activate a prepared root first"},
		{"admin: activate with no prepared root", "", func() error {
			_, err := admin.ActivateRoot(context.Background(), &adminv1.OperationRequest{})
			return err
		}, codes.FailedPrecondition, "rotation: nothing to do: no root is prepared; run prepare first"},
		{"admin: message over the limit", "", func() error {
			_, err := admin.FederationAdd(context.Background(), &adminv1.FederationAddRequest{TrustDomain: "b.example", BootstrapBundle: make([]byte, 256<<10+1)})
			return err
		}, codes.ResourceExhausted, "grpc: received message larger than max"},

		// The health port.
		{"health: unknown service", "", func() error {
			_, err := health.Check(context.Background(), &healthpb.HealthCheckRequest{Service: "meshca.v1.NoSuchService"})
			return err
		}, codes.NotFound, "unknown service"},
		{"health: message over the limit", "", func() error {
			_, err := health.Check(context.Background(), &healthpb.HealthCheckRequest{Service: strings.Repeat("a", 2<<10)})
			return err
		}, codes.ResourceExhausted, "grpc: received message larger than max"},
		{"health: the CA API on the health port", "", func() error {
			_, err := meshcav1.NewCertificateServiceClient(healthConn).Sign(bearer(webToken), &meshcav1.SignRequest{Csr: good})
			return err
		}, codes.Unimplemented, "unknown service meshca.v1.CertificateService"},
	}

	fedURL := "https://" + k.fedAddr + "/"
	https := federationClient(t, k.bundle)
	httpReqs := []badHTTP{
		{"federation: POST", func() (*http.Response, error) { return https.Post(fedURL, "application/json", strings.NewReader("{}")) }, http.StatusMethodNotAllowed, "method is not allowed"},
		{"federation: another path", func() (*http.Response, error) { return https.Get(fedURL + "bundle") }, http.StatusNotFound, "404 page not found"},
		{"federation: plain HTTP on the TLS port", func() (*http.Response, error) { return http.Get("http://" + k.fedAddr + "/") }, http.StatusBadRequest, "Client sent an HTTP request to an HTTPS server"},
	}

	// The root steps are refused for what they ask, not because the
	// replica does not lead yet.
	k.waitLeader(t)
	audited := map[string]int{} // by API
	for _, tt := range rpcs {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			st, ok := status.FromError(err)
			require.True(t, ok, "not a gRPC status: %v", err)
			require.Equal(t, tt.code, st.Code(), st.Message())
			require.Contains(t, st.Message(), tt.msg)
		})
		if tt.api != "" {
			audited[tt.api]++
		}
	}
	for _, tt := range httpReqs {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := tt.do()
			require.NoError(t, err)
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			require.Equal(t, tt.status, resp.StatusCode, string(body))
			require.Contains(t, string(body), tt.body)
		})
	}
	require.GreaterOrEqual(t, len(rpcs)+len(httpReqs), 30)

	// Every refused certificate request left an audit line, and no token
	// reached the log.
	// (The log is read from the server's stderr as it comes.)
	total := audited["native"] + audited["istio"] + audited["linkerd"]
	require.Eventually(t, func() bool {
		return len(auditLines(k.srv.logs.String(), "certificate request denied", nil)) >= total
	}, 5*time.Second, 10*time.Millisecond)
	logs := k.srv.logs.String()
	require.Len(t, auditLines(logs, "certificate request denied", nil), total)
	for api, n := range audited {
		require.Len(t, auditLines(logs, "certificate request denied", map[string]string{"api": api, "result": "denied"}), n, "denials audited under api %q", api)
	}
	for _, secret := range []string{webToken, istioToken, string(l5dToken)} {
		require.NotContains(t, logs, secret)
	}
	require.NotContains(t, logs, "PRIVATE KEY")

	// The server is healthy, on both ports, and issues through each front
	// end.
	for _, c := range []healthpb.HealthClient{health, healthpb.NewHealthClient(conn)} {
		hc, err := c.Check(context.Background(), &healthpb.HealthCheckRequest{})
		require.NoError(t, err)
		require.Equal(t, healthpb.HealthCheckResponse_SERVING, hc.Status)
	}
	_, err = native.Sign(bearer(webToken), &meshcav1.SignRequest{Csr: good})
	require.NoError(t, err)
	_, err = istio.CreateCertificate(bearer(istioToken), &securityv1alpha1.IstioCertificateRequest{Csr: goodPEM})
	require.NoError(t, err)
	_, err = linkerd.Certify(context.Background(), &linkerdpb.CertifyRequest{Identity: l5dName, Token: l5dToken, CertificateSigningRequest: l5dCSR})
	require.NoError(t, err)
	resp, err := https.Get(fedURL)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	t.Logf("%d bad requests refused (%d gRPC, %d HTTP), %d of them audited as denied certificate requests; the server stayed SERVING and issued through native, Istio and Linkerd afterwards",
		len(rpcs)+len(httpReqs), len(rpcs), len(httpReqs), total)
	k.srv.stop()
}

// dialUnix connects to the admin socket.
func dialUnix(t *testing.T, socket string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return conn
}

// federationClient is an HTTPS client of a meshca bundle endpoint of
// profile https_spiffe, authenticating it by the server's SPIFFE ID.
func federationClient(t *testing.T, bundlePath string) *http.Client {
	t.Helper()
	bundle, err := x509bundle.Load(td, bundlePath)
	require.NoError(t, err)
	cfg := tlsconfig.TLSClientConfig(bundle, tlsconfig.AuthorizeID(spiffeid.RequireFromPath(td, "/meshca/server")))
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
}
