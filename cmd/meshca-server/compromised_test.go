package main_test

import (
	"context"
	"crypto"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	securityv1alpha1 "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/internal/pemutil"
	linkerdpb "github.com/meshca/meshca/proto/linkerd/identity"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/testca"
)

// Extensions a hostile CSR asks for.
var (
	oidBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}
	oidKeyUsage         = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidExtKeyUsage      = asn1.ObjectIdentifier{2, 5, 29, 37}
)

// mustMarshal returns v in DER, for the extensions of a CSR.
func mustMarshal(t *testing.T, v any) []byte {
	t.Helper()
	b, err := asn1.Marshal(v)
	require.NoError(t, err)
	return b
}

// TestCompromisedWorkload: a workload with valid credentials (its
// service-account tokens, and the certificate it was issued) turns
// hostile, and asks meshca-server, through the native, Istio and Linkerd
// front ends, for another workload's identity, an identity of another
// trust domain, a CA certificate, and a longer lifetime than the policy
// allows. Every identity and CA request is refused with its code, reason
// and message, and audited with the caller's true identity; the lifetime
// is clamped to leaf.maxTTL (as SPIRE does) and the issued leaf's audit
// line records its not_after. Whatever extensions a CSR carries, the leaf
// is never a CA.
func TestCompromisedWorkload(t *testing.T) {
	const maxTTL = time.Hour
	k := startKubeServer(t, "leaf:\n  defaultTTL: 10m\n  maxTTL: 1h\n")
	web, other := k.id("web"), k.id("other")
	evil := spiffeid.RequireFromPath(spiffeid.RequireTrustDomainFromString("evil.example"), "/ns/"+k.ns+"/sa/web")
	key := testca.NewKey(t)
	tokenConn := dialServer(t, k.srv.addr, k.bundle)

	// The workload's own certificate, as it holds it after a first
	// issuance: a compromised workload may renew with it over mTLS.
	held := nativeSign(t, meshcav1.NewCertificateServiceClient(tokenConn), bearer(k.token(t, "web", "meshca")), key, testca.CreateCSR(t, key, web.String()), 0)
	mtlsConn := dialServerWithSVID(t, k.srv.addr, k.bundle, held)

	caTrue := pkix.Extension{Id: oidBasicConstraints, Critical: true, Value: mustMarshal(t, struct{ IsCA bool }{true})}
	certSign := pkix.Extension{Id: oidKeyUsage, Critical: true, Value: mustMarshal(t, asn1.BitString{Bytes: []byte{0x04}, BitLength: 6})}
	svidCSR := func(id spiffeid.ID, exts ...pkix.Extension) []byte {
		return testca.SignCSR(t, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}, ExtraExtensions: exts}, key)
	}
	l5dCSR := func(name string, exts ...pkix.Extension) []byte {
		return testca.SignCSR(t, &x509.CertificateRequest{DNSNames: []string{name}, ExtraExtensions: exts}, key)
	}
	pemCSR := func(der []byte) string {
		return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	}
	otherMsg := `identity: CSR asks for "` + other.String() + `" but the credential is for "` + web.String() + `"`
	tdMsg := `ca: CSR asks for an ID in trust domain "evil.example"; this CA issues for "meshca.local"`
	caMsg := "ca: CSR asks for CA=true; workload certificates are never CAs"
	signMsg := "ca: CSR asks for keyCertSign or cRLSign; workload certificates never sign certificates"

	type attempt struct {
		api, method string
		call        func() error
		code        codes.Code
		reason, msg string
	}
	var attempts []attempt
	// The native API, with a token and with the held certificate.
	for _, cred := range []struct {
		method string
		conn   *grpc.ClientConn
		ctx    func() context.Context
	}{
		{"kubernetes_token", tokenConn, func() context.Context { return bearer(k.token(t, "web", "meshca")) }},
		{"mtls", mtlsConn, context.Background},
	} {
		client := meshcav1.NewCertificateServiceClient(cred.conn)
		sign := func(csr []byte) func() error {
			return func() error { _, err := client.Sign(cred.ctx(), &meshcav1.SignRequest{Csr: csr}); return err }
		}
		attempts = append(attempts,
			attempt{"native", cred.method, sign(svidCSR(other)), codes.PermissionDenied, "identity_mismatch", otherMsg},
			attempt{"native", cred.method, sign(svidCSR(evil)), codes.InvalidArgument, "wrong_trust_domain", tdMsg},
			attempt{"native", cred.method, sign(svidCSR(web, caTrue)), codes.InvalidArgument, "ca_request", caMsg},
			attempt{"native", cred.method, sign(svidCSR(web, certSign)), codes.InvalidArgument, "ca_request", signMsg},
		)
	}
	// Istio's API, with a token and with the held certificate.
	for _, cred := range []struct {
		method string
		conn   *grpc.ClientConn
		ctx    func() context.Context
	}{
		{"kubernetes_token", tokenConn, func() context.Context { return bearer(k.token(t, "web", "istio-ca")) }},
		{"mtls", mtlsConn, context.Background},
	} {
		client := securityv1alpha1.NewIstioCertificateServiceClient(cred.conn)
		create := func(csr []byte) func() error {
			return func() error {
				_, err := client.CreateCertificate(cred.ctx(), &securityv1alpha1.IstioCertificateRequest{Csr: pemCSR(csr)})
				return err
			}
		}
		attempts = append(attempts,
			attempt{"istio", cred.method, create(svidCSR(other)), codes.PermissionDenied, "identity_mismatch", otherMsg},
			attempt{"istio", cred.method, create(svidCSR(evil)), codes.InvalidArgument, "wrong_trust_domain", tdMsg},
			attempt{"istio", cred.method, create(svidCSR(web, caTrue)), codes.InvalidArgument, "ca_request", caMsg},
			attempt{"istio", cred.method, create(svidCSR(web, certSign)), codes.InvalidArgument, "ca_request", signMsg},
		)
	}
	// Linkerd's API, with its token: the identity of another service
	// account, one under another cluster domain (Linkerd's trust domain),
	// and a CA.
	l5d := linkerdpb.NewIdentityClient(tokenConn)
	certify := func(name string, csr []byte) func() error {
		return func() error {
			_, err := l5d.Certify(context.Background(), &linkerdpb.CertifyRequest{Identity: name, Token: []byte(k.token(t, "web", "identity.l5d.io")), CertificateSigningRequest: csr})
			return err
		}
	}
	foreignName := "web." + k.ns + ".serviceaccount.identity.linkerd.evil.example"
	attempts = append(attempts,
		attempt{"linkerd", "kubernetes_token", certify(k.linkerdName("other"), l5dCSR(k.linkerdName("other"))), codes.PermissionDenied, "identity_mismatch",
			`server: identity "` + k.linkerdName("other") + `" is "` + other.String() + `": ` + otherMsg},
		attempt{"linkerd", "kubernetes_token", certify(foreignName, l5dCSR(foreignName)), codes.InvalidArgument, "wrong_identity_suffix",
			`identity "` + foreignName + `" does not end in ".serviceaccount.identity.linkerd.cluster.local"`},
		attempt{"linkerd", "kubernetes_token", certify(k.linkerdName("web"), l5dCSR(k.linkerdName("web"), caTrue)), codes.InvalidArgument, "ca_request", caMsg},
		attempt{"linkerd", "kubernetes_token", certify(k.linkerdName("web"), l5dCSR(k.linkerdName("web"), certSign)), codes.InvalidArgument, "ca_request", signMsg},
	)

	for _, a := range attempts {
		before := k.srv.logs.String()
		err := a.call()
		st, ok := status.FromError(err)
		require.True(t, ok, "%s/%s: not a gRPC status: %v", a.api, a.method, err)
		require.Equal(t, a.code, st.Code(), "%s/%s: %s", a.api, a.method, st.Message())
		require.Contains(t, st.Message(), a.msg, "%s/%s", a.api, a.method)
		// Audited with who the caller really is.
		var lines []logLine
		require.Eventually(t, func() bool {
			lines = auditLines(strings.TrimPrefix(k.srv.logs.String(), before), "certificate request denied",
				map[string]string{"api": a.api, "method": a.method, "identity": web.String(), "reason": a.reason, "code": a.code.String()})
			return len(lines) == 1
		}, 5*time.Second, 10*time.Millisecond, "%s/%s %s: no audit line", a.api, a.method, a.reason)
		require.Contains(t, lines[0].str("error"), a.msg)
	}

	// A longer lifetime than the policy is clamped, not refused: the leaf
	// is within leaf.maxTTL, and its audit line says when it expires, what
	// was asked and that it was clamped.
	clamped := func(api, method string, leaf *x509.Certificate, asked time.Time) {
		t.Helper()
		require.False(t, leaf.NotAfter.After(time.Now().Add(maxTTL)), "%s/%s: the leaf outlives the policy", api, method)
		require.True(t, leaf.NotAfter.After(asked.Add(maxTTL-time.Minute)), "%s/%s: the leaf has the default lifetime, not the clamped maximum", api, method)
		line := requireIssuedAudit(t, k.srv, api, method, web, leaf)
		require.Equal(t, true, line["ttl_clamped"], "%s/%s", api, method)
		require.Equal(t, float64(1000*time.Hour), line["requested_ttl"], "%s/%s: requested_ttl, in nanoseconds", api, method)
		require.Equal(t, float64(maxTTL), line["ttl"], "%s/%s: the TTL granted, in nanoseconds", api, method)
	}
	asked := time.Now()
	svid := nativeSign(t, meshcav1.NewCertificateServiceClient(tokenConn), bearer(k.token(t, "web", "meshca")), key, svidCSR(web), 1000*time.Hour)
	clamped("native", "kubernetes_token", svid.Certificates[0], asked)
	asked = time.Now()
	svid = nativeSign(t, meshcav1.NewCertificateServiceClient(mtlsConn), context.Background(), key, svidCSR(web), 1000*time.Hour)
	clamped("native", "mtls", svid.Certificates[0], asked)
	for _, cred := range []struct {
		method string
		conn   *grpc.ClientConn
		ctx    context.Context
	}{
		{"kubernetes_token", tokenConn, bearer(k.token(t, "web", "istio-ca"))},
		{"mtls", mtlsConn, context.Background()},
	} {
		asked := time.Now()
		resp, err := securityv1alpha1.NewIstioCertificateServiceClient(cred.conn).CreateCertificate(cred.ctx,
			&securityv1alpha1.IstioCertificateRequest{Csr: pemCSR(svidCSR(web)), ValidityDuration: int64((1000 * time.Hour).Seconds())})
		require.NoError(t, err)
		leaf, err := pemutil.ParseCertificates([]byte(resp.CertChain[0]))
		require.NoError(t, err)
		clamped("istio", cred.method, leaf[0], asked)
	}
	// Linkerd's request has no lifetime to ask for: it gets the default,
	// within the policy.
	resp, err := l5d.Certify(context.Background(), &linkerdpb.CertifyRequest{Identity: k.linkerdName("web"), Token: []byte(k.token(t, "web", "identity.l5d.io")), CertificateSigningRequest: l5dCSR(k.linkerdName("web"))})
	require.NoError(t, err)
	l5dLeaf, err := x509.ParseCertificate(resp.LeafCertificate)
	require.NoError(t, err)
	require.False(t, l5dLeaf.NotAfter.After(time.Now().Add(10*time.Minute)))
	line := requireIssuedAudit(t, k.srv, "linkerd", "kubernetes_token", web, l5dLeaf)
	require.Equal(t, false, line["ttl_clamped"], "the default is not clamped")
	require.Equal(t, float64(0), line["requested_ttl"])

	// Extensions a CSR may carry that do not ask for a CA are ignored:
	// the leaf has the X509-SVID profile, never a CA's.
	benign := svidCSR(web,
		pkix.Extension{Id: oidBasicConstraints, Value: mustMarshal(t, struct{}{})},
		pkix.Extension{Id: oidKeyUsage, Value: mustMarshal(t, asn1.BitString{Bytes: []byte{0x80}, BitLength: 1})},
		pkix.Extension{Id: oidExtKeyUsage, Value: mustMarshal(t, []asn1.ObjectIdentifier{{1, 3, 6, 1, 5, 5, 7, 3, 3}})}, // codeSigning
	)
	svid = nativeSign(t, meshcav1.NewCertificateServiceClient(tokenConn), bearer(k.token(t, "web", "meshca")), key, benign, 0)
	leaf := svid.Certificates[0]
	require.True(t, leaf.BasicConstraintsValid)
	require.False(t, leaf.IsCA)
	require.Zero(t, leaf.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign))
	require.Equal(t, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}, leaf.ExtKeyUsage)

	// Once the process has ended, its log is all there.
	k.srv.stop()
	require.NotContains(t, k.srv.logs.String(), "PRIVATE KEY")
	t.Logf("%d hostile requests (native and Istio with a token and with the held certificate, Linkerd with its token) refused and audited; 4 lifetimes of 1000h clamped to %s and audited; Linkerd's default within policy",
		len(attempts), maxTTL)
}

// nativeSign asks the native API for a certificate for csr, made with
// key, asking ttl, and returns it as an SVID.
func nativeSign(t *testing.T, client meshcav1.CertificateServiceClient, ctx context.Context, key crypto.Signer, csr []byte, ttl time.Duration) *x509svid.SVID {
	t.Helper()
	req := &meshcav1.SignRequest{Csr: csr}
	if ttl != 0 {
		req.Ttl = durationpb.New(ttl)
	}
	resp, err := client.Sign(ctx, req)
	require.NoError(t, err)
	var raw []byte
	for _, der := range resp.CertChain {
		raw = append(raw, der...)
	}
	svid, err := x509svid.ParseRaw(raw, mustPKCS8(t, key))
	require.NoError(t, err)
	return svid
}

func mustPKCS8(t *testing.T, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	require.NoError(t, err)
	return der
}

// requireIssuedAudit requires the audit line of leaf's issuance: the API,
// the caller's method and identity, the serial and not_after; and returns
// it. The line may reach the log reader after the response.
func requireIssuedAudit(t *testing.T, srv *serverProc, api, method string, id spiffeid.ID, leaf *x509.Certificate) logLine {
	t.Helper()
	var lines []logLine
	require.Eventually(t, func() bool {
		lines = auditLines(srv.logs.String(), "certificate issued", map[string]string{
			"api": api, "method": method, "identity": id.String(), "serial": leaf.SerialNumber.Text(16),
		})
		return len(lines) == 1
	}, 5*time.Second, 10*time.Millisecond, "%s/%s: the issuance of %s is not audited", api, method, leaf.SerialNumber.Text(16))
	notAfter, err := time.Parse(time.RFC3339Nano, lines[0].str("not_after"))
	require.NoError(t, err)
	require.True(t, notAfter.Equal(leaf.NotAfter), "%s/%s: audited not_after %s, leaf's %s", api, method, notAfter, leaf.NotAfter)
	return lines[0]
}
