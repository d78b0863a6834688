package server_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	securityv1alpha1 "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/testca"
)

func ecKey(t *testing.T, curve elliptic.Curve) *ecdsa.PrivateKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(curve, rand.Reader)
	require.NoError(t, err)
	return key
}

func istioCSR(t *testing.T, key crypto.Signer, id spiffeid.ID) string {
	t.Helper()
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: testca.CreateCSR(t, key, id.String())}))
}

// istioSign asks Istio's API for a certificate for id with a new key, and
// checks the response's shape: PEM, one certificate an element, leaf
// first, the trust bundle last, the chain an X509-SVID of id that
// go-spiffe verifies with that bundle.
func (h *harness) istioSign(ctx context.Context, conn *grpc.ClientConn, id spiffeid.ID, validity int64) *x509svid.SVID {
	h.t.Helper()
	t := h.t
	key := testca.NewKey(t)
	resp, err := securityv1alpha1.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &securityv1alpha1.IstioCertificateRequest{
		Csr:              istioCSR(t, key, id),
		ValidityDuration: validity,
	})
	require.NoError(t, err)
	require.Len(t, resp.CertChain, 3, "leaf, issuer, then the roots")
	var chain []*x509.Certificate
	for _, elem := range resp.CertChain[:len(resp.CertChain)-1] {
		certs, err := pemutil.ParseCertificates([]byte(elem))
		require.NoError(t, err)
		require.Len(t, certs, 1, "one certificate an element")
		chain = append(chain, certs...)
	}
	roots, err := pemutil.ParseCertificates([]byte(resp.CertChain[len(resp.CertChain)-1]))
	require.NoError(t, err)
	require.Equal(t, h.bundle.X509Authorities(), roots, "the last element is the trust bundle")

	gotID, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(td, roots))
	require.NoError(t, err)
	require.Equal(t, id, gotID)
	require.True(t, key.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(chain[0].PublicKey))
	testca.RequireOpenSSLVerifies(t, time.Now(), roots, chain)
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}
}

// TestIstioCreateCertificate: Istio's API, called with the generated
// istio.io/api client over TLS, issues with a token, renews over mTLS
// with no token, and honours validity_duration within the TTL policy.
func TestIstioCreateCertificate(t *testing.T) {
	h := start(t)
	first := h.istioSign(withToken(demoToken), h.conn(nil), demoID, 0)
	leaf := first.Certificates[0]
	require.InDelta(t, ca.DefaultTTL.Seconds(), leaf.NotAfter.Sub(leaf.NotBefore).Seconds()-ca.Backdate.Seconds(), 5, "no validity asks for the default")
	require.Contains(t, h.logs.String(), `"msg":"certificate issued","audit":true,"api":"istio"`)
	require.Contains(t, h.logs.String(), `"method":"bootstrap_token"`)

	// Renewal: the current certificate over mTLS, no token.
	renewed := h.istioSign(context.Background(), h.conn(first), demoID, 0)
	require.NotEqual(t, leaf.SerialNumber, renewed.Certificates[0].SerialNumber)
	require.Contains(t, h.logs.String(), `"api":"istio","peer":`)
	require.Contains(t, h.logs.String(), `"method":"mtls"`)
	require.Equal(t, 2.0, metricValue(t, h.reg, "meshca_certificates_issued_total", map[string]string{"api": "istio"}))

	for _, tt := range []struct {
		name     string
		validity int64
		want     time.Duration
	}{
		{name: "ten minutes", validity: 600, want: 10 * time.Minute},
		{name: "longer than the maximum, clamped", validity: int64((1000 * time.Hour).Seconds()), want: ca.MaxTTL},
		{name: "past what a Duration holds, clamped", validity: 1 << 62, want: ca.MaxTTL},
		{name: "negative, the default", validity: -5, want: ca.DefaultTTL},
	} {
		t.Run(tt.name, func(t *testing.T) {
			svid := h.istioSign(withToken(demoToken), h.conn(nil), demoID, tt.validity)
			leaf := svid.Certificates[0]
			require.InDelta(t, tt.want.Seconds(), leaf.NotAfter.Sub(leaf.NotBefore).Seconds()-ca.Backdate.Seconds(), 5)
		})
	}

	// An empty ImpersonatedIdentity is none, as Istio's own CA takes it.
	t.Run("empty ImpersonatedIdentity", func(t *testing.T) {
		md, err := structpb.NewStruct(map[string]any{"ImpersonatedIdentity": ""})
		require.NoError(t, err)
		_, err = securityv1alpha1.NewIstioCertificateServiceClient(h.conn(nil)).CreateCertificate(withToken(demoToken), &securityv1alpha1.IstioCertificateRequest{
			Csr:      istioCSR(t, testca.NewKey(t), demoID),
			Metadata: md,
		})
		require.NoError(t, err)
	})
}

// TestIstioRefusals sends each bad request to Istio's API and checks the
// code, the message, and that the denial is counted under api="istio".
func TestIstioRefusals(t *testing.T) {
	h := start(t)
	conn := h.conn(nil)
	client := securityv1alpha1.NewIstioCertificateServiceClient(conn)
	key := testca.NewKey(t)
	good := istioCSR(t, key, demoID)
	impersonate, err := structpb.NewStruct(map[string]any{"ImpersonatedIdentity": "spiffe://example.org/ns/default/sa/other"})
	require.NoError(t, err)
	impersonateNumber, err := structpb.NewStruct(map[string]any{"ImpersonatedIdentity": 7})
	require.NoError(t, err)
	foreignSVID := testca.New(t, td).ChildCA().CreateX509SVID(demoID)
	otherID := spiffeid.RequireFromPath(td, "/ns/kube-system/sa/admin")
	der := testca.CreateCSR(t, key, demoID.String())

	for _, tt := range []struct {
		name   string
		ctx    context.Context
		conn   *grpc.ClientConn
		req    *securityv1alpha1.IstioCertificateRequest
		code   codes.Code
		reason string
		msg    string
	}{
		{name: "no credential", ctx: context.Background(), req: &securityv1alpha1.IstioCertificateRequest{Csr: good},
			code: codes.Unauthenticated, reason: "no_credential", msg: "identity: no credential"},
		{name: "wrong token", ctx: withToken("not-a-known-token-at-all"), req: &securityv1alpha1.IstioCertificateRequest{Csr: good},
			code: codes.Unauthenticated, reason: "unknown_token", msg: "identity: bearer token is not known"},
		{name: "malformed authorization", ctx: metadata.AppendToOutgoingContext(context.Background(), "authorization", "Basic Zm9vOmJhcg=="), req: &securityv1alpha1.IstioCertificateRequest{Csr: good},
			code: codes.Unauthenticated, reason: "malformed_token", msg: `identity: authorization header is not "Bearer <token>"`},
		{name: "foreign client certificate", ctx: context.Background(), conn: h.conn(foreignSVID), req: &securityv1alpha1.IstioCertificateRequest{Csr: good},
			code: codes.Unauthenticated, reason: "bad_certificate", msg: "identity: client certificate does not verify against the trust bundle"},
		{name: "CSR for another identity", req: &securityv1alpha1.IstioCertificateRequest{Csr: istioCSR(t, key, otherID)},
			code: codes.PermissionDenied, reason: "identity_mismatch", msg: `identity: CSR asks for "spiffe://example.org/ns/kube-system/sa/admin" but the credential is for "spiffe://example.org/ns/default/sa/demo"; ask for the credential's ID`},
		{name: "the server's own identity", ctx: withToken(serverToken), req: &securityv1alpha1.IstioCertificateRequest{Csr: istioCSR(t, key, serverID)},
			code: codes.PermissionDenied, reason: "reserved_identity", msg: `identity: "spiffe://example.org/meshca/server" is reserved`},
		{name: "malformed PEM", req: &securityv1alpha1.IstioCertificateRequest{Csr: "-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n"},
			code: codes.InvalidArgument, reason: "malformed", msg: "ca: CSR is not valid PEM"},
		{name: "PEM of another type", req: &securityv1alpha1.IstioCertificateRequest{Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))},
			code: codes.InvalidArgument, reason: "malformed", msg: `ca: PEM block is "CERTIFICATE", want "CERTIFICATE REQUEST"`},
		{name: "not PEM (base64 DER, no armour)", req: &securityv1alpha1.IstioCertificateRequest{Csr: base64.StdEncoding.EncodeToString(der)},
			code: codes.InvalidArgument, reason: "malformed", msg: `ca: CSR is not PEM; send a PEM block of type "CERTIFICATE REQUEST"`},
		{name: "not PEM (text)", req: &securityv1alpha1.IstioCertificateRequest{Csr: "hello"},
			code: codes.InvalidArgument, reason: "malformed", msg: `ca: CSR is not PEM; send a PEM block of type "CERTIFICATE REQUEST"`},
		{name: "empty CSR", req: &securityv1alpha1.IstioCertificateRequest{},
			code: codes.InvalidArgument, reason: "malformed", msg: "ca: CSR is empty"},
		{name: "DNS SAN", req: &securityv1alpha1.IstioCertificateRequest{Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: testca.SignCSR(t, &x509.CertificateRequest{URIs: []*url.URL{demoID.URL()}, DNSNames: []string{"demo.default.svc"}}, key)}))},
			code: codes.InvalidArgument, reason: "forbidden_san", msg: "ca: CSR asks for DNS, IP or email SANs"},
		{name: "P-224 key", req: &securityv1alpha1.IstioCertificateRequest{Csr: istioCSR(t, ecKey(t, elliptic.P224()), demoID)},
			code: codes.InvalidArgument, reason: "unsupported_key", msg: "ca: ECDSA curve P-224 is not supported; use P-256 or P-384"},
		{name: "impersonation", req: &securityv1alpha1.IstioCertificateRequest{Csr: good, Metadata: impersonate},
			code: codes.PermissionDenied, reason: "impersonation", msg: "server: the request's metadata asks for a certificate of another identity (ImpersonatedIdentity); meshca does not support impersonation and issues only the caller's own identity"},
		{name: "impersonation by a value that is not a string", req: &securityv1alpha1.IstioCertificateRequest{Csr: good, Metadata: impersonateNumber},
			code: codes.PermissionDenied, reason: "impersonation", msg: "meshca does not support impersonation"},
		// Who the caller is comes first: an anonymous impersonation is
		// refused for its missing credential.
		{name: "impersonation without a credential", ctx: context.Background(), req: &securityv1alpha1.IstioCertificateRequest{Csr: good, Metadata: impersonate},
			code: codes.Unauthenticated, reason: "no_credential", msg: "identity: no credential"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ctx := tt.ctx
			if ctx == nil {
				ctx = withToken(demoToken)
			}
			c := client
			if tt.conn != nil {
				c = securityv1alpha1.NewIstioCertificateServiceClient(tt.conn)
			}
			labels := map[string]string{"api": "istio", "code": tt.code.String(), "reason": tt.reason}
			before := metricValue(t, h.reg, "meshca_requests_denied_total", labels)
			_, err := c.CreateCertificate(ctx, tt.req)
			st, ok := status.FromError(err)
			require.True(t, ok, "not a gRPC status: %v", err)
			require.Equal(t, tt.code, st.Code(), st.Message())
			require.Contains(t, st.Message(), tt.msg)
			require.Equal(t, before+1, metricValue(t, h.reg, "meshca_requests_denied_total", labels))
		})
	}
	logs := h.logs.String()
	require.Equal(t, 16, strings.Count(logs, `"msg":"certificate request denied","audit":true,"api":"istio"`))
	require.NotContains(t, logs, demoToken)
	require.Zero(t, metricValue(t, h.reg, "meshca_certificates_issued_total", map[string]string{"api": "istio"}))
}
