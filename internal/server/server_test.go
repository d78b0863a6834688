package server_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/internal/server"
	"github.com/meshca/meshca/internal/testlog"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/testca"
)

var (
	td       = spiffeid.RequireTrustDomainFromString("example.org")
	demoID   = spiffeid.RequireFromPath(td, "/ns/default/sa/demo")
	serverID = spiffeid.RequireFromPath(td, "/meshca/server")
)

const (
	demoToken   = "demo-token-0123456789abcdef"
	serverToken = "server-id-token-0123456789"
)

// harness is a meshca server on loopback, serving TLS with its own
// certificate, as meshca-server runs it.
type harness struct {
	t      *testing.T
	srv    *server.Server
	ca     *ca.CA
	addr   string
	logs   *testlog.Buffer
	reg    *prometheus.Registry
	bundle *x509bundle.Bundle
}

func start(t *testing.T) *harness {
	t.Helper()
	return startWith(t)
}

// startWith starts a harness whose authenticator chain is that of
// meshca-server: the static tokens, then authns (a TokenReview
// authenticator), then the SVID authenticator. Every front end is on.
func startWith(t *testing.T, authns ...identity.Authenticator) *harness {
	t.Helper()
	return startServer(t, harnessOptions{authns: authns})
}

// harnessOptions vary the harness's server.
type harnessOptions struct {
	authns []identity.Authenticator

	// configure, when set, changes the server's options.
	configure func(*server.Options)

	// issuer, when set, wraps the issuing key (after the harness's own
	// serving certificate is signed).
	issuer func(crypto.Signer) crypto.Signer

	// limitListener wraps the listener with Server.LimitListener, as
	// meshca-server does.
	limitListener bool
}

func startServer(t *testing.T, o harnessOptions) *harness {
	t.Helper()
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: td})
	require.NoError(t, err)
	c, err := ca.New(set, ca.Options{})
	require.NoError(t, err)
	tokens, err := identity.NewStaticTokens(identity.TokenFile{Tokens: []identity.TokenFileEntry{
		{ID: demoID.String(), Token: demoToken},
		{ID: serverID.String(), Token: serverToken},
	}}, td)
	require.NoError(t, err)
	logs := &testlog.Buffer{}
	reg := prometheus.NewRegistry()
	chain := append(append([]identity.Authenticator{tokens}, o.authns...), identity.NewSVIDAuthenticator(td, c, nil))
	opts := server.Options{
		CA:            c,
		Authenticator: identity.Chain(chain...),
		Policy:        identity.Policy{Reserved: []spiffeid.ID{serverID}},
		Logger:        slog.New(slog.NewJSONHandler(logs, nil)),
		Registerer:    reg,
		Istio:         server.IstioOptions{Enabled: true},
		Linkerd:       server.LinkerdOptions{Enabled: true},
	}
	if o.configure != nil {
		o.configure(&opts)
	}
	srv, err := server.New(opts)
	require.NoError(t, err)
	serving, err := server.NewServingCert(c, serverID, []string{"localhost"}, nil, time.Hour, nil)
	require.NoError(t, err)
	if o.issuer != nil {
		set := c.Authorities().Clone()
		set.Issuer.Signer = o.issuer(set.Issuer.Signer)
		require.NoError(t, c.SetAuthorities(set))
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	if o.limitListener {
		lis = srv.LimitListener(lis)
	}
	g := srv.GRPCServer(serving.TLSConfig())
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	bundle, _ := c.Bundle()
	return &harness{t: t, srv: srv, ca: c, addr: lis.Addr().String(), logs: logs, reg: reg, bundle: bundle}
}

// conn dials the server, verifying its SVID, presenting svid if not nil.
func (h *harness) conn(svid x509svid.Source) *grpc.ClientConn {
	h.t.Helper()
	cfg := tlsconfig.TLSClientConfig(h.bundle, tlsconfig.AuthorizeID(serverID))
	if svid != nil {
		cfg = tlsconfig.MTLSClientConfig(svid, h.bundle, tlsconfig.AuthorizeID(serverID))
	}
	return h.dial(cfg)
}

func (h *harness) dial(cfg *tls.Config) *grpc.ClientConn {
	h.t.Helper()
	conn, err := grpc.NewClient(h.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	require.NoError(h.t, err)
	h.t.Cleanup(func() { conn.Close() })
	return conn
}

func withToken(token string) context.Context {
	return metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+token)
}

// sign asks for an SVID for id with a new P-256 key and returns it.
func (h *harness) sign(ctx context.Context, conn *grpc.ClientConn, id spiffeid.ID, ttl time.Duration) (*x509svid.SVID, *meshcav1.SignResponse) {
	h.t.Helper()
	key := testca.NewKey(h.t)
	req := &meshcav1.SignRequest{Csr: testca.CreateCSR(h.t, key, id.String())}
	if ttl != 0 {
		req.Ttl = durationpb.New(ttl)
	}
	resp, err := meshcav1.NewCertificateServiceClient(conn).Sign(ctx, req)
	require.NoError(h.t, err)
	svid, err := x509svid.ParseRaw(bytes.Join(resp.CertChain, nil), mustPKCS8(h.t, key))
	require.NoError(h.t, err)
	return svid, resp
}

func mustPKCS8(t *testing.T, key crypto.Signer) []byte {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	require.NoError(t, err)
	return der
}

func TestSignIssuesVerifiableSVID(t *testing.T) {
	h := start(t)
	svid, resp := h.sign(withToken(demoToken), h.conn(nil), demoID, 0)

	require.Equal(t, demoID, svid.ID)
	require.Equal(t, demoID.String(), resp.SpiffeId)
	require.Len(t, resp.CertChain, 2, "leaf and intermediate, no root")
	leaf := svid.Certificates[0]
	require.Equal(t, leaf.NotAfter.Unix(), resp.ExpiresAt.AsTime().Unix())
	require.InDelta(t, time.Hour.Seconds(), leaf.NotAfter.Sub(leaf.NotBefore).Seconds()-ca.Backdate.Seconds(), 5)

	// The response's bundle verifies the chain, with go-spiffe...
	require.Equal(t, td.Name(), resp.Bundle.TrustDomain)
	require.Equal(t, uint64(1), resp.Bundle.Sequence)
	roots := make([]*x509.Certificate, len(resp.Bundle.X509Authorities))
	for i, der := range resp.Bundle.X509Authorities {
		var err error
		roots[i], err = x509.ParseCertificate(der)
		require.NoError(t, err)
	}
	id, _, err := x509svid.Verify(svid.Certificates, x509bundle.FromX509Authorities(td, roots))
	require.NoError(t, err)
	require.Equal(t, demoID, id)

	// ...its SPIFFE JSON form is a valid SPIFFE bundle of the same roots...
	sb, err := spiffebundle.Parse(td, resp.Bundle.SpiffeJson)
	require.NoError(t, err)
	seq, ok := sb.SequenceNumber()
	require.True(t, ok)
	require.Equal(t, uint64(1), seq)
	require.Equal(t, roots, sb.X509Authorities())
	hint, ok := sb.RefreshHint()
	require.True(t, ok)
	require.Equal(t, server.DefaultRefreshHint, hint)

	// ...and openssl agrees.
	testca.RequireOpenSSLVerifies(t, time.Now(), roots, svid.Certificates)
}

func TestRenewWithCurrentSVID(t *testing.T) {
	h := start(t)
	first, _ := h.sign(withToken(demoToken), h.conn(nil), demoID, 0)

	// Renew over mTLS with no token: the identity comes from the SVID.
	renewed, _ := h.sign(context.Background(), h.conn(first), demoID, 0)
	require.Equal(t, demoID, renewed.ID)
	require.NotEqual(t, first.Certificates[0].SerialNumber, renewed.Certificates[0].SerialNumber)
	require.Contains(t, h.logs.String(), `"method":"mtls"`)
}

func TestRequestedTTLIsClampedToMax(t *testing.T) {
	h := start(t)
	svid, _ := h.sign(withToken(demoToken), h.conn(nil), demoID, 1000*time.Hour)
	leaf := svid.Certificates[0]
	require.InDelta(t, ca.MaxTTL.Seconds(), leaf.NotAfter.Sub(leaf.NotBefore).Seconds()-ca.Backdate.Seconds(), 5)

	svid, _ = h.sign(withToken(demoToken), h.conn(nil), demoID, 10*time.Minute)
	leaf = svid.Certificates[0]
	require.InDelta(t, (10 * time.Minute).Seconds(), leaf.NotAfter.Sub(leaf.NotBefore).Seconds()-ca.Backdate.Seconds(), 5)
}

// TestIssuedSVIDsDoMTLS: two workloads with issued SVIDs complete a real
// mTLS handshake with go-spiffe, each authorising the other by ID.
func TestIssuedSVIDsDoMTLS(t *testing.T) {
	h := start(t)
	otherID := spiffeid.RequireFromPath(td, "/ns/default/sa/other")
	otherToken := "other-token-0123456789abcdef"
	// The harness knows only demo's token; renew demo, then get other's
	// SVID from a CA with a token for it.
	clientSVID, _ := h.sign(withToken(demoToken), h.conn(nil), demoID, 0)
	tokens, err := identity.NewStaticTokens(identity.TokenFile{Tokens: []identity.TokenFileEntry{{ID: otherID.String(), Token: otherToken}}}, td)
	require.NoError(t, err)
	caller, err := tokens.Authenticate(context.Background(), identity.Credential{Token: otherToken})
	require.NoError(t, err)
	key := testca.NewKey(t)
	issued, err := h.ca.Sign(context.Background(), ca.SignRequest{PublicKey: key.Public(), ID: caller.ID})
	require.NoError(t, err)
	serverSVID := &x509svid.SVID{ID: otherID, Certificates: issued.Chain, PrivateKey: key}

	lis, err := spiffetls.ListenWithMode(context.Background(), "tcp", "127.0.0.1:0",
		spiffetls.MTLSServerWithRawConfig(tlsconfig.AuthorizeID(demoID), serverSVID, h.bundle))
	require.NoError(t, err)
	defer lis.Close()
	serverErr := make(chan error, 2)
	go func() {
		for {
			conn, err := lis.Accept()
			if err != nil {
				return
			}
			go func() { serverErr <- echoPeer(conn, demoID) }()
		}
	}()

	conn, err := spiffetls.DialWithMode(context.Background(), "tcp", lis.Addr().String(),
		spiffetls.MTLSClientWithRawConfig(tlsconfig.AuthorizeID(otherID), clientSVID, h.bundle))
	require.NoError(t, err)
	defer conn.Close()
	_, err = conn.Write([]byte("hello"))
	require.NoError(t, err)
	buf := make([]byte, 5)
	_, err = conn.Read(buf)
	require.NoError(t, err)
	require.Equal(t, "world", string(buf))
	require.NoError(t, <-serverErr)
	peerID, err := spiffetls.PeerIDFromConn(conn)
	require.NoError(t, err)
	require.Equal(t, otherID, peerID)

	// The same client, authorising some other ID, refuses the server.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = spiffetls.DialWithMode(ctx, "tcp", lis.Addr().String(),
		spiffetls.MTLSClientWithRawConfig(tlsconfig.AuthorizeID(spiffeid.RequireFromPath(td, "/ns/x/sa/y")), clientSVID, h.bundle))
	require.ErrorContains(t, err, `unexpected ID "spiffe://example.org/ns/default/sa/other"`)
}

// echoPeer reads "hello" from conn, checks the peer is want, and answers
// "world".
func echoPeer(conn net.Conn, want spiffeid.ID) error {
	defer conn.Close()
	buf := make([]byte, 5)
	if _, err := conn.Read(buf); err != nil {
		return err
	}
	peerID, err := spiffetls.PeerIDFromConn(conn)
	if err != nil {
		return err
	}
	if peerID != want {
		return errUnexpectedPeer
	}
	_, err = conn.Write([]byte("world"))
	return err
}

var errUnexpectedPeer = errorString("unexpected peer ID")

type errorString string

func (e errorString) Error() string { return string(e) }

// TestBadInput sends every kind of bad request from outside and checks the
// status code and message, that the denial is audited and counted, and
// that the server is healthy afterwards.
func TestBadInput(t *testing.T) {
	h := start(t)
	conn := h.conn(nil)
	client := meshcav1.NewCertificateServiceClient(conn)
	key := testca.NewKey(t)
	good := testca.CreateCSR(t, key, demoID.String())
	now := time.Now()

	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	require.NoError(t, err)
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	require.NoError(t, err)
	tampered := bytes.Clone(good)
	tampered[len(tampered)-3] ^= 0xff
	caExt := pkix.Extension{Id: asn1.ObjectIdentifier{2, 5, 29, 19}, Critical: true, Value: mustASN1(t, struct{ IsCA bool }{true})}
	certSignExt := pkix.Extension{Id: asn1.ObjectIdentifier{2, 5, 29, 15}, Critical: true, Value: mustASN1(t, asn1.BitString{Bytes: []byte{0x04}, BitLength: 6})}
	root := testca.New(t, td)
	foreignSVID := root.ChildCA().CreateX509SVID(demoID)
	expiredSVID := expiredFromCA(t, h, now)

	csrWith := func(tmpl *x509.CertificateRequest) []byte { return testca.SignCSR(t, tmpl, key) }
	uri := func(s string) *url.URL { u, err := url.Parse(s); require.NoError(t, err); return u }

	for _, tt := range []struct {
		name   string
		ctx    context.Context
		conn   *grpc.ClientConn
		csr    []byte
		code   codes.Code
		msg    string
		reason string
	}{
		{name: "not a CSR", csr: []byte("hello, I am not a CSR"), code: codes.InvalidArgument, msg: "ca: CSR is not a PKCS#10 request", reason: "malformed"},
		{name: "garbage PEM", csr: []byte("-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n"), code: codes.InvalidArgument, msg: "ca: CSR is not valid PEM", reason: "malformed"},
		{name: "empty CSR", csr: nil, code: codes.InvalidArgument, msg: "ca: CSR is empty", reason: "malformed"},
		{name: "bad signature", csr: tampered, code: codes.InvalidArgument, msg: "ca: CSR signature does not verify", reason: "bad_signature"},
		{name: "no URI SAN", csr: csrWith(&x509.CertificateRequest{}), code: codes.InvalidArgument, msg: "ca: CSR has no URI SAN; put the SPIFFE ID in exactly one", reason: "bad_uri_san"},
		{name: "two URI SANs", csr: csrWith(&x509.CertificateRequest{URIs: []*url.URL{demoID.URL(), uri("spiffe://example.org/b")}}), code: codes.InvalidArgument, msg: "ca: CSR has 2 URI SANs; an X509-SVID has exactly one", reason: "bad_uri_san"},
		{name: "not spiffe URI", csr: csrWith(&x509.CertificateRequest{URIs: []*url.URL{uri("https://example.org/ns/default/sa/demo")}}), code: codes.InvalidArgument, msg: "ca: CSR URI SAN is not a SPIFFE ID: scheme is missing or invalid", reason: "bad_uri_san"},
		{name: "another trust domain", csr: csrWith(&x509.CertificateRequest{URIs: []*url.URL{uri("spiffe://evil.org/ns/default/sa/demo")}}), code: codes.InvalidArgument, msg: `ca: CSR asks for an ID in trust domain "evil.org"; this CA issues for "example.org"`, reason: "wrong_trust_domain"},
		{name: "ID other than the credential's", csr: csrWith(&x509.CertificateRequest{URIs: []*url.URL{uri("spiffe://example.org/ns/kube-system/sa/admin")}}), code: codes.PermissionDenied, msg: `identity: CSR asks for "spiffe://example.org/ns/kube-system/sa/admin" but the credential is for "spiffe://example.org/ns/default/sa/demo"`, reason: "identity_mismatch"},
		{name: "DNS SAN", csr: csrWith(&x509.CertificateRequest{URIs: []*url.URL{demoID.URL()}, DNSNames: []string{"demo.default.svc"}}), code: codes.InvalidArgument, msg: "ca: CSR asks for DNS, IP or email SANs", reason: "forbidden_san"},
		{name: "IP SAN", csr: csrWith(&x509.CertificateRequest{URIs: []*url.URL{demoID.URL()}, IPAddresses: []net.IP{net.IPv4(10, 0, 0, 1)}}), code: codes.InvalidArgument, msg: "ca: CSR asks for DNS, IP or email SANs", reason: "forbidden_san"},
		{name: "email SAN", csr: csrWith(&x509.CertificateRequest{URIs: []*url.URL{demoID.URL()}, EmailAddresses: []string{"a@example.org"}}), code: codes.InvalidArgument, msg: "ca: CSR asks for DNS, IP or email SANs", reason: "forbidden_san"},
		{name: "CA=true", csr: csrWith(&x509.CertificateRequest{URIs: []*url.URL{demoID.URL()}, ExtraExtensions: []pkix.Extension{caExt}}), code: codes.InvalidArgument, msg: "ca: CSR asks for CA=true; workload certificates are never CAs", reason: "ca_request"},
		{name: "keyCertSign", csr: csrWith(&x509.CertificateRequest{URIs: []*url.URL{demoID.URL()}, ExtraExtensions: []pkix.Extension{certSignExt}}), code: codes.InvalidArgument, msg: "ca: CSR asks for keyCertSign or cRLSign", reason: "ca_request"},
		{name: "RSA 1024", csr: testca.CreateCSR(t, rsa1024, demoID.String()), code: codes.InvalidArgument, msg: "ca: RSA key of 1024 bits is not supported; use 2048 to 8192 bits", reason: "unsupported_key"},
		{name: "P-224", csr: testca.CreateCSR(t, p224, demoID.String()), code: codes.InvalidArgument, msg: "ca: ECDSA curve P-224 is not supported; use P-256 or P-384", reason: "unsupported_key"},
		{name: "server's own ID", ctx: withToken(serverToken), csr: testca.CreateCSR(t, key, serverID.String()), code: codes.PermissionDenied, msg: `identity: "spiffe://example.org/meshca/server" is reserved`, reason: "reserved_identity"},
		{name: "CSR over the field limit", csr: bytes.Repeat([]byte{0x30}, ca.MaxCSRSize+1), code: codes.InvalidArgument, msg: "ca: CSR is 16385 bytes, more than the limit of 16384", reason: "too_large"},
		{name: "no credential", ctx: context.Background(), csr: good, code: codes.Unauthenticated, msg: "identity: no credential", reason: "no_credential"},
		{name: "unknown token", ctx: withToken("not-a-known-token-at-all"), csr: good, code: codes.Unauthenticated, msg: "identity: bearer token is not known", reason: "unknown_token"},
		{name: "malformed authorization", ctx: metadata.AppendToOutgoingContext(context.Background(), "authorization", "Basic Zm9vOmJhcg=="), csr: good, code: codes.Unauthenticated, msg: `identity: authorization header is not "Bearer <token>"`, reason: "malformed_token"},
		{name: "oversized token", ctx: withToken(strings.Repeat("x", identity.MaxTokenLength+1)), csr: good, code: codes.Unauthenticated, msg: "identity: bearer token is 8193 bytes, more than the limit of 8192", reason: "malformed_token"},
		{name: "expired client certificate", ctx: context.Background(), conn: h.conn(expiredSVID), csr: good, code: codes.Unauthenticated, msg: "identity: client certificate does not verify against the trust bundle: x509svid: could not verify leaf certificate: x509: certificate has expired or is not yet valid", reason: "bad_certificate"},
		{name: "foreign client certificate", ctx: context.Background(), conn: h.conn(foreignSVID), csr: good, code: codes.Unauthenticated, msg: "identity: client certificate does not verify against the trust bundle: x509svid: could not verify leaf certificate: x509: certificate signed by unknown authority", reason: "bad_certificate"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ctx := tt.ctx
			if ctx == nil {
				ctx = withToken(demoToken)
			}
			c := client
			if tt.conn != nil {
				c = meshcav1.NewCertificateServiceClient(tt.conn)
			}
			labels := map[string]string{"api": "native", "code": tt.code.String(), "reason": tt.reason}
			before := metricValue(t, h.reg, "meshca_requests_denied_total", labels)
			_, err := c.Sign(ctx, &meshcav1.SignRequest{Csr: tt.csr})
			st, ok := status.FromError(err)
			require.True(t, ok, "not a gRPC status: %v", err)
			require.Equal(t, tt.code, st.Code(), st.Message())
			require.Contains(t, st.Message(), tt.msg)
			require.Equal(t, before+1, metricValue(t, h.reg, "meshca_requests_denied_total", labels), "denial counted once with reason %s", tt.reason)
		})
	}

	t.Run("request over the transport limit", func(t *testing.T) {
		_, err := client.Sign(withToken(demoToken), &meshcav1.SignRequest{Csr: make([]byte, server.MaxRequestBytes+1)})
		require.Equal(t, codes.ResourceExhausted, status.Code(err))
		require.Contains(t, status.Convert(err).Message(), "grpc: received message larger than max")
	})
	t.Run("invalid ttl", func(t *testing.T) {
		_, err := client.Sign(withToken(demoToken), &meshcav1.SignRequest{Csr: good, Ttl: &durationpb.Duration{Seconds: 1, Nanos: -1}})
		require.Equal(t, codes.InvalidArgument, status.Code(err))
		require.Contains(t, status.Convert(err).Message(), "ttl is not a valid duration")
	})

	// Nothing above leaked a token into the logs, and every denial left an
	// audit line.
	logs := h.logs.String()
	require.NotContains(t, logs, demoToken)
	require.NotContains(t, logs, "not-a-known-token-at-all")
	require.Equal(t, 25, strings.Count(logs, `"msg":"certificate request denied"`), "the table, and the invalid ttl")

	// The server is still healthy and still issues.
	hc, err := healthpb.NewHealthClient(conn).Check(context.Background(), &healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	require.Equal(t, healthpb.HealthCheckResponse_SERVING, hc.Status)
	svid, _ := h.sign(withToken(demoToken), conn, demoID, 0)
	require.Equal(t, demoID, svid.ID)
}

// expiredFromCA returns an SVID that the harness's own CA signed, already
// expired: refused for expiry, not for its issuer.
func expiredFromCA(t *testing.T, h *harness, now time.Time) *x509svid.SVID {
	t.Helper()
	iss := h.ca.Authorities().Issuer
	key := testca.NewKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(42),
		NotBefore:             now.Add(-2 * time.Hour),
		NotAfter:              now.Add(-time.Hour),
		URIs:                  []*url.URL{demoID.URL()},
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, iss.Cert, key.Public(), iss.Signer)
	require.NoError(t, err)
	leaf, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return &x509svid.SVID{ID: demoID, Certificates: []*x509.Certificate{leaf, iss.Cert}, PrivateKey: key}
}

// metricValue returns the value of the series of name with exactly
// labels in reg, or 0 when there is none.
func metricValue(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	families, err := reg.Gather()
	require.NoError(t, err)
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	series:
		for _, m := range f.GetMetric() {
			if len(m.GetLabel()) != len(labels) {
				continue
			}
			for _, l := range m.GetLabel() {
				if labels[l.GetName()] != l.GetValue() {
					continue series
				}
			}
			if c := m.GetCounter(); c != nil {
				return c.GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	return 0
}

func mustASN1(t *testing.T, v any) []byte {
	b, err := asn1.Marshal(v)
	require.NoError(t, err)
	return b
}

// TestExpiredBootstrapToken: a bootstrap token past its expiry is refused
// with Unauthenticated and reason expired_token, in the status, the
// metric and the audit line, and is echoed in none of them.
func TestExpiredBootstrapToken(t *testing.T) {
	const expiredToken = "expired-token-0123456789"
	expired, err := identity.NewStaticTokens(identity.TokenFile{Tokens: []identity.TokenFileEntry{
		{ID: demoID.String(), Token: expiredToken, Expires: "2020-01-01T00:00:00Z"},
	}}, td)
	require.NoError(t, err)
	h := startServer(t, harnessOptions{authns: []identity.Authenticator{expired}})
	_, err = meshcav1.NewCertificateServiceClient(h.conn(nil)).Sign(withToken(expiredToken), signCSR(t, demoID))
	require.Equal(t, codes.Unauthenticated, status.Code(err), "%v", err)
	require.Contains(t, status.Convert(err).Message(), "bootstrap token for "+demoID.String()+" expired at 2020-01-01T00:00:00Z")
	require.NotContains(t, err.Error(), expiredToken)
	require.Equal(t, 1.0, metricValue(t, h.reg, "meshca_requests_denied_total",
		map[string]string{"api": server.APINative, "code": "Unauthenticated", "reason": string(identity.ReasonExpiredToken)}))
	require.Contains(t, h.logs.String(), `"reason":"expired_token"`)
	require.NotContains(t, h.logs.String(), expiredToken)
}

// TestPlainTextCallIsRefused: a client that speaks plain-text HTTP/2 to
// the TLS port reaches no service: its call fails as the TLS handshake
// does (Unavailable), nothing is issued, and the next client, over TLS,
// is served.
func TestPlainTextCallIsRefused(t *testing.T) {
	h := startServer(t, harnessOptions{})
	conn, err := grpc.NewClient(h.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	ctx, cancel := context.WithTimeout(withToken(demoToken), 10*time.Second)
	defer cancel()
	_, err = meshcav1.NewCertificateServiceClient(conn).Sign(ctx, signCSR(t, demoID))
	require.Equal(t, codes.Unavailable, status.Code(err), "%v", err)
	_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	require.Equal(t, codes.Unavailable, status.Code(err), "%v", err)
	issued := map[string]string{"api": server.APINative}
	require.Zero(t, metricValue(t, h.reg, "meshca_certificates_issued_total", issued))

	h.sign(withToken(demoToken), h.conn(nil), demoID, 0)
	require.Equal(t, 1.0, metricValue(t, h.reg, "meshca_certificates_issued_total", issued))
}

func TestWatchBundleStreamsChanges(t *testing.T) {
	h := start(t)
	client := meshcav1.NewBundleServiceClient(h.conn(nil))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	got, err := client.GetBundle(ctx, &meshcav1.GetBundleRequest{})
	require.NoError(t, err)
	require.Equal(t, uint64(1), got.Sequence)

	stream, err := client.WatchBundle(ctx, &meshcav1.WatchBundleRequest{})
	require.NoError(t, err)
	up, err := stream.Recv()
	require.NoError(t, err)
	require.Empty(t, up.FederatedBundles, "no federation")
	first := up.Bundle
	require.Equal(t, uint64(1), first.Sequence)
	require.Len(t, first.X509Authorities, 1)

	// A new root enters the bundle (as a prepared root would): the stream
	// pushes it.
	next := *h.ca.Authorities()
	newRoot := testca.New(t, td)
	next.Roots = append(append([]ca.Root{}, next.Roots...), ca.Root{Authority: ca.Authority{Cert: newRoot.Cert}, State: ca.RootPrepared})
	next.Sequence = 2
	require.NoError(t, h.ca.SetAuthorities(&next))

	up, err = stream.Recv()
	require.NoError(t, err)
	second := up.Bundle
	require.Equal(t, uint64(2), second.Sequence)
	require.Len(t, second.X509Authorities, 2)
	require.Equal(t, newRoot.Cert.Raw, second.X509Authorities[1])

	got, err = client.GetBundle(ctx, &meshcav1.GetBundleRequest{})
	require.NoError(t, err)
	require.Equal(t, uint64(2), got.Sequence)
}

func TestAuditLines(t *testing.T) {
	h := start(t)
	svid, _ := h.sign(withToken(demoToken), h.conn(nil), demoID, 0)
	logs := h.logs.String()
	require.Contains(t, logs, `"msg":"certificate issued","audit":true,"api":"native"`)
	require.Contains(t, logs, `"method":"bootstrap_token"`)
	require.Contains(t, logs, `"identity":"spiffe://example.org/ns/default/sa/demo"`)
	require.Contains(t, logs, `"serial":"`+svid.Certificates[0].SerialNumber.Text(16)+`"`)
	require.Contains(t, logs, `"not_after":"`)
	require.NotContains(t, logs, demoToken)
	require.NotContains(t, logs, "PRIVATE KEY")
	require.Equal(t, 1.0, metricValue(t, h.reg, "meshca_certificates_issued_total", map[string]string{"api": "native"}))
}

// TestShutdownEndsWatchStreams: a graceful stop must not wait for bundle
// watchers, which would otherwise hold it until its deadline.
func TestShutdownEndsWatchStreams(t *testing.T) {
	h := start(t)
	conn := h.conn(nil)
	stream, err := meshcav1.NewBundleServiceClient(conn).WatchBundle(context.Background(), &meshcav1.WatchBundleRequest{})
	require.NoError(t, err)
	_, err = stream.Recv()
	require.NoError(t, err)

	h.srv.Shutdown()
	_, err = stream.Recv()
	require.Equal(t, codes.Unavailable, status.Code(err))
	require.Contains(t, status.Convert(err).Message(), "server shutting down")

	hc, err := healthpb.NewHealthClient(conn).Check(context.Background(), &healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	require.Equal(t, healthpb.HealthCheckResponse_NOT_SERVING, hc.Status)
}

// TestServingCertFollowsTheBundle: after a root change, the server's own
// certificate is issued again, so clients holding the new bundle alone
// still verify the server.
func TestServingCertFollowsTheBundle(t *testing.T) {
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: td})
	require.NoError(t, err)
	c, err := ca.New(set, ca.Options{})
	require.NoError(t, err)
	sc, err := server.NewServingCert(c, serverID, nil, nil, time.Hour, nil)
	require.NoError(t, err)
	first, err := sc.GetCertificate(nil)
	require.NoError(t, err)
	again, err := sc.GetCertificate(nil)
	require.NoError(t, err)
	require.Same(t, first, again, "reissued with nothing changed")

	// Replace the root, as a retire after activate does.
	newSet, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: td})
	require.NoError(t, err)
	newSet.Sequence = 2
	require.NoError(t, c.SetAuthorities(newSet))

	next, err := sc.GetCertificate(nil)
	require.NoError(t, err)
	require.NotSame(t, first, next)
	newBundle, _ := c.Bundle()
	id, _, err := x509svid.ParseAndVerify(next.Certificate, newBundle)
	require.NoError(t, err, "the new bundle verifies the server")
	require.Equal(t, serverID, id)
	_, _, err = x509svid.ParseAndVerify(first.Certificate, newBundle)
	require.Error(t, err, "the old certificate would have failed clients with the new bundle")
}
