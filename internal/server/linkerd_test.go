package server_test

import (
	"context"
	"crypto"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	securityv1alpha1 "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity/tokenreview"
	"github.com/meshca/meshca/internal/kubetest"
	"github.com/meshca/meshca/internal/server"
	linkerdpb "github.com/meshca/meshca/proto/linkerd/identity"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/testca"
)

// kube is a real kube-apiserver and etcd on loopback, started by the first
// test that needs one: Linkerd's API takes only service-account tokens.
var kube kubetest.Shared

func TestMain(m *testing.M) { kube.Run(m) }

var (
	linkerdAud = []string{server.LinkerdAudience}
	istioAud   = []string{server.IstioAudience}
	nativeAud  = []string{"meshca"}
)

// kubeHarness is a server whose chain reviews service-account tokens with
// a real API server (native audience "meshca"), and a namespace of the
// test's own with the service accounts web and web.v2.
type kubeHarness struct {
	*harness
	c  *kubetest.Cluster
	ns string
}

func startKube(t *testing.T) *kubeHarness {
	t.Helper()
	c := kube.Cluster(t)
	reviews, err := tokenreview.New(c.Client.AuthenticationV1(), tokenreview.Options{TrustDomain: td, Audiences: nativeAud})
	require.NoError(t, err)
	ns := c.CreateNamespace(t, "frontends-").Name
	c.CreateServiceAccount(t, ns, "web")
	c.CreateServiceAccount(t, ns, "web.v2")
	return &kubeHarness{harness: startWith(t, reviews), c: c, ns: ns}
}

func (k *kubeHarness) token(sa string, audiences []string) []byte {
	return []byte(k.c.Token(k.t, k.ns, sa, audiences, time.Hour))
}

// linkerdName is the Linkerd identity of service account sa of namespace
// ns under the default control plane namespace and cluster domain.
func linkerdName(sa, ns string) string {
	return sa + "." + ns + ".serviceaccount.identity.linkerd.cluster.local"
}

func linkerdCSR(t *testing.T, key crypto.Signer, tmpl *x509.CertificateRequest) []byte {
	t.Helper()
	return testca.SignCSR(t, tmpl, key)
}

// TestLinkerdCertify: a Certify client built from our proto, with a
// service-account token for identity.l5d.io reviewed by a real API server,
// gets a DER leaf whose only SAN is its identity as a DNS name, chaining
// to meshca's roots (Linkerd's trust anchors), valid until valid_until.
func TestLinkerdCertify(t *testing.T) {
	k := startKube(t)
	client := linkerdpb.NewIdentityClient(k.conn(nil))
	for _, sa := range []string{"web", "web.v2"} {
		t.Run(sa, func(t *testing.T) {
			name := linkerdName(sa, k.ns)
			key := testca.NewKey(t)
			resp, err := client.Certify(context.Background(), &linkerdpb.CertifyRequest{
				Identity:                  name,
				Token:                     k.token(sa, linkerdAud),
				CertificateSigningRequest: linkerdCSR(t, key, &x509.CertificateRequest{DNSNames: []string{name}}),
			})
			require.NoError(t, err)

			leaf, err := x509.ParseCertificate(resp.LeafCertificate)
			require.NoError(t, err)
			require.Equal(t, []string{name}, leaf.DNSNames)
			require.Empty(t, leaf.URIs, "no SPIFFE ID: the DNS name is the identity")
			require.Empty(t, leaf.IPAddresses)
			require.Empty(t, leaf.EmailAddresses)
			require.False(t, leaf.IsCA)
			require.Equal(t, x509.KeyUsageDigitalSignature, leaf.KeyUsage)
			require.Equal(t, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}, leaf.ExtKeyUsage)
			require.True(t, key.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(leaf.PublicKey))
			require.Equal(t, leaf.NotAfter, resp.ValidUntil.AsTime())
			require.InDelta(t, ca.DefaultTTL.Seconds(), leaf.NotAfter.Sub(leaf.NotBefore).Seconds()-ca.Backdate.Seconds(), 5)

			inters := x509.NewCertPool()
			chain := []*x509.Certificate{leaf}
			require.Len(t, resp.IntermediateCertificates, 1, "the issuer; never a root")
			for _, der := range resp.IntermediateCertificates {
				cert, err := x509.ParseCertificate(der)
				require.NoError(t, err)
				inters.AddCert(cert)
				chain = append(chain, cert)
			}
			roots := x509.NewCertPool()
			for _, r := range k.bundle.X509Authorities() {
				roots.AddCert(r)
			}
			// As a Linkerd proxy checks its peer: by DNS name, to the
			// trust anchors, as client and as server.
			for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
				_, err = leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: roots, Intermediates: inters, KeyUsages: []x509.ExtKeyUsage{usage}})
				require.NoError(t, err)
			}
			testca.RequireOpenSSLVerifies(t, time.Now(), k.bundle.X509Authorities(), chain)
		})
	}
	logs := k.logs.String()
	require.Contains(t, logs, `"msg":"certificate issued","audit":true,"api":"linkerd"`)
	require.Contains(t, logs, `"method":"kubernetes_token"`)
	require.Contains(t, logs, `"identity":"spiffe://example.org/ns/`+k.ns+`/sa/web.v2"`)
	require.Equal(t, 2.0, metricValue(t, k.reg, "meshca_certificates_issued_total", map[string]string{"api": "linkerd"}))
}

// TestLinkerdRefusals sends each bad Certify request and checks the code,
// the message, the denial metric under api="linkerd", and that no token
// reaches the logs.
func TestLinkerdRefusals(t *testing.T) {
	k := startKube(t)
	client := linkerdpb.NewIdentityClient(k.conn(nil))
	key := testca.NewKey(t)
	web := linkerdName("web", k.ns)
	other := linkerdName("other", k.ns)
	token := k.token("web", linkerdAud)
	csrFor := func(name string) []byte {
		return linkerdCSR(t, key, &x509.CertificateRequest{DNSNames: []string{name}})
	}
	webID := spiffeid.RequireFromPath(td, "/ns/"+k.ns+"/sa/web")
	suffix := ".serviceaccount.identity.linkerd.cluster.local"

	for _, tt := range []struct {
		name   string
		req    *linkerdpb.CertifyRequest
		code   codes.Code
		reason string
		msg    string
	}{
		{name: "identity of another service account", req: &linkerdpb.CertifyRequest{Identity: other, Token: token, CertificateSigningRequest: csrFor(other)},
			code: codes.PermissionDenied, reason: "identity_mismatch",
			msg: `server: identity "` + other + `" is "spiffe://example.org/ns/` + k.ns + `/sa/other": identity: CSR asks for "spiffe://example.org/ns/` + k.ns + `/sa/other" but the credential is for "` + webID.String() + `"; ask for the credential's ID`},
		{name: "identity of another namespace", req: &linkerdpb.CertifyRequest{Identity: linkerdName("web", "default"), Token: token, CertificateSigningRequest: csrFor(linkerdName("web", "default"))},
			code: codes.PermissionDenied, reason: "identity_mismatch", msg: `but the credential is for "` + webID.String() + `"`},
		{name: "CSR DNS SAN is not the identity", req: &linkerdpb.CertifyRequest{Identity: web, Token: token, CertificateSigningRequest: csrFor(other)},
			code: codes.InvalidArgument, reason: "csr_identity_mismatch",
			msg: `server: the CSR's DNS SAN "` + other + `" is not the request's identity "` + web + `"; put the identity in both`},
		{name: "CSR with a URI SAN", req: &linkerdpb.CertifyRequest{Identity: web, Token: token, CertificateSigningRequest: linkerdCSR(t, key, &x509.CertificateRequest{DNSNames: []string{web}, URIs: []*url.URL{webID.URL()}})},
			code: codes.InvalidArgument, reason: "forbidden_san", msg: "ca: CSR asks for URI, IP or email SANs; a request of the DNS form carries only its DNS name"},
		{name: "CSR with no DNS SAN", req: &linkerdpb.CertifyRequest{Identity: web, Token: token, CertificateSigningRequest: linkerdCSR(t, key, &x509.CertificateRequest{})},
			code: codes.InvalidArgument, reason: "bad_dns_san", msg: "ca: CSR has no DNS SAN; put the identity name in exactly one"},
		{name: "garbage CSR", req: &linkerdpb.CertifyRequest{Identity: web, Token: token, CertificateSigningRequest: []byte("garbage")},
			code: codes.InvalidArgument, reason: "malformed", msg: "ca: CSR is not a PKCS#10 request"},
		{name: "P-384 key", req: &linkerdpb.CertifyRequest{Identity: web, Token: token, CertificateSigningRequest: linkerdCSR(t, ecKey(t, elliptic.P384()), &x509.CertificateRequest{DNSNames: []string{web}})},
			code: codes.InvalidArgument, reason: "unsupported_key", msg: "ca: ECDSA curve P-384 is not supported for this request; use P-256"},
		{name: "wrong control-plane namespace", req: &linkerdpb.CertifyRequest{Identity: "web." + k.ns + ".serviceaccount.identity.linkerd-edge.cluster.local", Token: token, CertificateSigningRequest: csrFor("web." + k.ns + ".serviceaccount.identity.linkerd-edge.cluster.local")},
			code: codes.InvalidArgument, reason: "wrong_identity_suffix",
			msg: `server: identity "web.` + k.ns + `.serviceaccount.identity.linkerd-edge.cluster.local" does not end in "` + suffix + `": ask for <service-account>.<namespace>` + suffix},
		{name: "wrong cluster domain", req: &linkerdpb.CertifyRequest{Identity: "web." + k.ns + ".serviceaccount.identity.linkerd.example.com", Token: token, CertificateSigningRequest: csrFor("web." + k.ns + ".serviceaccount.identity.linkerd.example.com")},
			code: codes.InvalidArgument, reason: "wrong_identity_suffix", msg: `does not end in "` + suffix + `"`},
		{name: "no namespace", req: &linkerdpb.CertifyRequest{Identity: "web" + suffix, Token: token, CertificateSigningRequest: csrFor("web" + suffix)},
			code: codes.InvalidArgument, reason: "bad_identity", msg: `server: identity "web` + suffix + `" is not <service-account>.<namespace>` + suffix},
		{name: "identity longer than a DNS name", req: &linkerdpb.CertifyRequest{Identity: strings.Repeat("a", 300) + suffix, Token: token, CertificateSigningRequest: csrFor(web)},
			code: codes.InvalidArgument, reason: "bad_identity", msg: "server: the request's identity is 346 bytes, longer than a DNS name (253)"},
		{name: "token of another audience (meshca)", req: &linkerdpb.CertifyRequest{Identity: web, Token: k.token("web", nativeAud), CertificateSigningRequest: csrFor(web)},
			code: codes.Unauthenticated, reason: "unknown_token", msg: `tokenreview: service-account token refused by the API server for audiences ["identity.l5d.io"]: [invalid bearer token, token audiences ["meshca"] is invalid for the target audiences ["identity.l5d.io"]]`},
		{name: "token of another audience (istio-ca)", req: &linkerdpb.CertifyRequest{Identity: web, Token: k.token("web", istioAud), CertificateSigningRequest: csrFor(web)},
			code: codes.Unauthenticated, reason: "unknown_token", msg: `token audiences ["istio-ca"] is invalid for the target audiences ["identity.l5d.io"]`},
		{name: "foreign token", req: &linkerdpb.CertifyRequest{Identity: web, Token: []byte(foreignJWT(t, k.ns)), CertificateSigningRequest: csrFor(web)},
			code: codes.Unauthenticated, reason: "unknown_token", msg: `tokenreview: service-account token refused by the API server for audiences ["identity.l5d.io"]: [invalid bearer token`},
		{name: "garbage token", req: &linkerdpb.CertifyRequest{Identity: web, Token: []byte("garbage"), CertificateSigningRequest: csrFor(web)},
			code: codes.Unauthenticated, reason: "unknown_token", msg: "tokenreview: bearer token is not a Kubernetes service-account token: it is not a JWT"},
		{name: "no token", req: &linkerdpb.CertifyRequest{Identity: web, CertificateSigningRequest: csrFor(web)},
			code: codes.Unauthenticated, reason: "no_credential", msg: "identity: no credential: the request's token is empty; send the workload's service-account token"},
		{name: "token with a space", req: &linkerdpb.CertifyRequest{Identity: web, Token: []byte("abc def"), CertificateSigningRequest: csrFor(web)},
			code: codes.Unauthenticated, reason: "malformed_token", msg: "identity: the request's token has a character outside printable ASCII at offset 3"},
		// A bootstrap token proves an ID, not a service account; Linkerd's
		// API takes only what Kubernetes vouches for.
		{name: "bootstrap token", req: &linkerdpb.CertifyRequest{Identity: linkerdName("demo", "default"), Token: []byte(demoToken), CertificateSigningRequest: csrFor(linkerdName("demo", "default"))},
			code: codes.Unauthenticated, reason: "method_not_accepted", msg: "identity: a credential of method bootstrap_token is not accepted by this API; present one of method kubernetes_token"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			labels := map[string]string{"api": "linkerd", "code": tt.code.String(), "reason": tt.reason}
			before := metricValue(t, k.reg, "meshca_requests_denied_total", labels)
			_, err := client.Certify(context.Background(), tt.req)
			st, ok := status.FromError(err)
			require.True(t, ok, "not a gRPC status: %v", err)
			require.Equal(t, tt.code, st.Code(), st.Message())
			require.Contains(t, st.Message(), tt.msg)
			require.Equal(t, before+1, metricValue(t, k.reg, "meshca_requests_denied_total", labels))
		})
	}
	logs := k.logs.String()
	require.Equal(t, 18, strings.Count(logs, `"msg":"certificate request denied","audit":true,"api":"linkerd"`))
	require.NotContains(t, logs, string(token))
	require.NotContains(t, logs, demoToken)
	require.Zero(t, metricValue(t, k.reg, "meshca_certificates_issued_total", map[string]string{"api": "linkerd"}))
}

// TestTokenAudiencesPerAPI: a service-account token is a credential only
// for the API whose audience it carries.
func TestTokenAudiencesPerAPI(t *testing.T) {
	k := startKube(t)
	conn := k.conn(nil)
	webID := spiffeid.RequireFromPath(td, "/ns/"+k.ns+"/sa/web")
	native := func(token []byte) error {
		_, err := meshcav1.NewCertificateServiceClient(conn).Sign(withToken(string(token)), &meshcav1.SignRequest{Csr: testca.CreateCSR(t, testca.NewKey(t), webID.String())})
		return err
	}
	istio := func(token []byte) error {
		_, err := securityv1alpha1.NewIstioCertificateServiceClient(conn).CreateCertificate(withToken(string(token)), &securityv1alpha1.IstioCertificateRequest{Csr: istioCSR(t, testca.NewKey(t), webID)})
		return err
	}
	linkerd := func(token []byte) error {
		name := linkerdName("web", k.ns)
		_, err := linkerdpb.NewIdentityClient(conn).Certify(context.Background(), &linkerdpb.CertifyRequest{Identity: name, Token: token, CertificateSigningRequest: linkerdCSR(t, testca.NewKey(t), &x509.CertificateRequest{DNSNames: []string{name}})})
		return err
	}
	apis := map[string]func([]byte) error{"native": native, "istio": istio, "linkerd": linkerd}
	tokens := map[string][]byte{"native": k.token("web", nativeAud), "istio": k.token("web", istioAud), "linkerd": k.token("web", linkerdAud)}
	// Each API first with its own token, so that a cached review of it
	// is there to be (wrongly) reused by the others.
	for _, api := range []string{"native", "istio", "linkerd"} {
		require.NoError(t, apis[api](tokens[api]), "%s with its own token", api)
	}
	for _, api := range []string{"native", "istio", "linkerd"} {
		for _, tokenFor := range []string{"native", "istio", "linkerd"} {
			if api == tokenFor {
				continue
			}
			err := apis[api](tokens[tokenFor])
			require.Equal(t, codes.Unauthenticated, status.Code(err), "%s with a token for %s: %v", api, tokenFor, err)
			require.Contains(t, status.Convert(err).Message(), "is invalid for the target audiences")
		}
	}
	require.Contains(t, k.logs.String(), `"api":"istio","peer":`)
}

// foreignJWT is a service-account token of the right shape and claims,
// for identity.l5d.io, signed by no key the API server knows.
func foreignJWT(t *testing.T, ns string) string {
	t.Helper()
	enc := func(v any) string {
		b, err := json.Marshal(v)
		require.NoError(t, err)
		return base64.RawURLEncoding.EncodeToString(b)
	}
	now := time.Now()
	return enc(map[string]string{"alg": "ES256", "kid": "foreign"}) + "." + enc(map[string]any{
		"iss": kubetest.Issuer, "sub": "system:serviceaccount:" + ns + ":web", "aud": linkerdAud,
		"iat": now.Unix(), "nbf": now.Unix(), "exp": now.Add(time.Hour).Unix(),
	}) + "." + base64.RawURLEncoding.EncodeToString(make([]byte, 64))
}
