package server_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	securityv1alpha1 "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/federation"
	"github.com/meshca/meshca/identity/tokenreview"
	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/internal/server"
	linkerdpb "github.com/meshca/meshca/proto/linkerd/identity"
	adminv1 "github.com/meshca/meshca/proto/meshca/admin/v1"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/testca"
)

// slowRate refills a token every 1000 s: no token comes back while a test
// runs, whatever the machine's speed.
const slowRate = 0.001

// startLimited starts a harness as startWith does, with limits, its
// listener wrapped by LimitListener as meshca-server wraps it.
func startLimited(t *testing.T, limits server.Limits, authns ...identity.Authenticator) *harness {
	t.Helper()
	return startServer(t, harnessOptions{
		authns:        authns,
		configure:     func(o *server.Options) { o.Limits = limits },
		limitListener: true,
	})
}

// connFrom dials the server from the loopback address source (127.0.0.x),
// another source as far as the server can tell.
func (h *harness) connFrom(source string) *grpc.ClientConn {
	h.t.Helper()
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(source)}}
	cfg := tlsconfig.TLSClientConfig(h.bundle, tlsconfig.AuthorizeID(serverID))
	conn, err := grpc.NewClient(h.addr,
		grpc.WithTransportCredentials(credentials.NewTLS(cfg)),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return dialer.DialContext(ctx, "tcp", addr)
		}))
	require.NoError(h.t, err)
	h.t.Cleanup(func() { conn.Close() })
	return conn
}

// requireRateLimited checks a rate-limit refusal: ResourceExhausted, the
// message, and a RetryInfo detail within (0, most].
func requireRateLimited(t *testing.T, err error, msg string, most time.Duration) {
	t.Helper()
	st, ok := status.FromError(err)
	require.True(t, ok, "not a gRPC status: %v", err)
	require.Equal(t, codes.ResourceExhausted, st.Code(), st.Message())
	require.Contains(t, st.Message(), msg)
	var info *errdetails.RetryInfo
	for _, d := range st.Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			info = ri
		}
	}
	require.NotNil(t, info, "no RetryInfo in the status details: %v", st.Details())
	delay := info.GetRetryDelay().AsDuration()
	require.Positive(t, delay)
	require.LessOrEqual(t, delay, most)
	require.Contains(t, st.Message(), "; retry in ")
}

func signCSR(t *testing.T, id spiffeid.ID) *meshcav1.SignRequest {
	return &meshcav1.SignRequest{Csr: testca.CreateCSR(t, testca.NewKey(t), id.String())}
}

// TestRateLimitPerSource: a source over its rate is refused with
// ResourceExhausted and a retry hint on every API, before authentication
// (an unknown token is refused for the rate, not the token); another
// source is served; each refusal is counted and audited.
func TestRateLimitPerSource(t *testing.T) {
	h := startLimited(t, server.Limits{PerSource: server.Rate{PerSecond: slowRate, Burst: 3}})
	busy := meshcav1.NewCertificateServiceClient(h.connFrom("127.0.0.1"))
	for range 3 {
		_, err := busy.Sign(withToken(demoToken), signCSR(t, demoID))
		require.NoError(t, err)
	}
	const msg = "server: rate limited: source 127.0.0.1 sent more than 0.001 certificate requests a second (burst 3); retry in "
	_, err := busy.Sign(withToken(demoToken), signCSR(t, demoID))
	requireRateLimited(t, err, msg, 1000*time.Second)

	_, err = busy.Sign(withToken("not-a-known-token-at-all"), signCSR(t, demoID))
	requireRateLimited(t, err, msg, 1000*time.Second)

	_, err = securityv1alpha1.NewIstioCertificateServiceClient(h.connFrom("127.0.0.1")).CreateCertificate(withToken(demoToken),
		&securityv1alpha1.IstioCertificateRequest{Csr: istioCSR(t, testca.NewKey(t), demoID)})
	requireRateLimited(t, err, msg, 1000*time.Second)

	// Another source, the same identity: served.
	other := h.connFrom("127.0.0.2")
	svid, _ := h.sign(withToken(demoToken), other, demoID, 0)
	require.Equal(t, demoID, svid.ID)

	require.Equal(t, 2.0, metricValue(t, h.reg, "meshca_requests_denied_total", map[string]string{"api": "native", "code": "ResourceExhausted", "reason": "rate_limited"}))
	require.Equal(t, 1.0, metricValue(t, h.reg, "meshca_requests_denied_total", map[string]string{"api": "istio", "code": "ResourceExhausted", "reason": "rate_limited"}))
	require.Equal(t, 3.0, metricValue(t, h.reg, "meshca_rate_limited_requests_total", map[string]string{"limit": "source"}))
	require.Equal(t, 2.0, metricValue(t, h.reg, "meshca_rate_limit_tracked_keys", map[string]string{"limit": "source"}))
	logs := h.logs.String()
	require.Equal(t, 3, strings.Count(logs, `"result":"denied","code":"ResourceExhausted","reason":"rate_limited"`))
	require.NotContains(t, logs, demoToken)
}

// TestRateLimitPerIdentity: one identity has one bucket across the native,
// Istio and Linkerd APIs (service-account tokens of each API's audience,
// reviewed by a real API server): over it, each API refuses with
// ResourceExhausted and a retry hint, before the CSR is looked at (a
// garbage CSR is refused for the rate); another identity is served.
func TestRateLimitPerIdentity(t *testing.T) {
	c := kube.Cluster(t)
	reviews, err := tokenreview.New(c.Client.AuthenticationV1(), tokenreview.Options{TrustDomain: td, Audiences: nativeAud})
	require.NoError(t, err)
	ns := c.CreateNamespace(t, "limits-").Name
	c.CreateServiceAccount(t, ns, "web")
	h := startLimited(t, server.Limits{PerIdentity: server.Rate{PerSecond: slowRate, Burst: 3}}, reviews)
	token := func(aud []string) string { return c.Token(t, ns, "web", aud, time.Hour) }
	webID := spiffeid.RequireFromPath(td, "/ns/"+ns+"/sa/web")
	name := linkerdName("web", ns)
	conn := h.conn(nil)
	native := meshcav1.NewCertificateServiceClient(conn)
	istio := securityv1alpha1.NewIstioCertificateServiceClient(conn)
	linkerd := linkerdpb.NewIdentityClient(conn)
	nativeTok, istioTok, linkerdTok := token(nativeAud), token(istioAud), []byte(token(linkerdAud))

	calls := map[string]func(csrOK bool) error{
		"native": func(csrOK bool) error {
			req := signCSR(t, webID)
			if !csrOK {
				req.Csr = []byte("garbage")
			}
			_, err := native.Sign(withToken(nativeTok), req)
			return err
		},
		"istio": func(csrOK bool) error {
			csr := istioCSR(t, testca.NewKey(t), webID)
			if !csrOK {
				csr = "garbage"
			}
			_, err := istio.CreateCertificate(withToken(istioTok), &securityv1alpha1.IstioCertificateRequest{Csr: csr})
			return err
		},
		"linkerd": func(csrOK bool) error {
			csr := linkerdCSR(t, testca.NewKey(t), &x509.CertificateRequest{DNSNames: []string{name}})
			if !csrOK {
				csr = []byte("garbage")
			}
			_, err := linkerd.Certify(context.Background(), &linkerdpb.CertifyRequest{Identity: name, Token: linkerdTok, CertificateSigningRequest: csr})
			return err
		},
	}
	// The burst of 3: one request on each API.
	for _, api := range []string{"native", "istio", "linkerd"} {
		require.NoError(t, calls[api](true), api)
	}
	msg := "server: rate limited: identity " + webID.String() + " asked for more than 0.001 certificates a second (burst 3) across all APIs; retry in "
	for _, api := range []string{"native", "istio", "linkerd"} {
		t.Run(api, func(t *testing.T) {
			requireRateLimited(t, calls[api](true), msg, 1000*time.Second)
			requireRateLimited(t, calls[api](false), msg, 1000*time.Second)
			require.Equal(t, 2.0, metricValue(t, h.reg, "meshca_requests_denied_total", map[string]string{"api": api, "code": "ResourceExhausted", "reason": "rate_limited"}))
		})
	}
	require.Equal(t, 6.0, metricValue(t, h.reg, "meshca_rate_limited_requests_total", map[string]string{"limit": "identity"}))
	logs := h.logs.String()
	require.Equal(t, 6, strings.Count(logs, `"identity":"`+webID.String()+`","result":"denied","code":"ResourceExhausted","reason":"rate_limited"`))
	require.NotContains(t, logs, nativeTok)

	// Another identity, from the same source: served.
	svid, _ := h.sign(withToken(demoToken), conn, demoID, 0)
	require.Equal(t, demoID, svid.ID)
}

// TestClientChainBounds: a client certificate chain over the length or
// size bound is refused as such (Unauthenticated, chain_too_large) before
// it is verified: a chain that would verify is refused, and so is one that
// would not, with the same reason.
func TestClientChainBounds(t *testing.T) {
	h := startLimited(t, server.Limits{})
	root := testca.New(t, td)
	deep := root
	for range identity.MaxClientChainLength {
		deep = deep.ChildCA()
	}
	deepSVID := deep.CreateX509SVID(demoID)
	require.Len(t, deepSVID.Certificates, identity.MaxClientChainLength+1)

	bigKey := testca.NewKey(t)
	bigTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(7),
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		URIs:         []*url.URL{demoID.URL()},
		ExtraExtensions: []pkix.Extension{{
			Id:    asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 99999, 1},
			Value: mustASN1(t, make([]byte, identity.MaxClientChainBytes)),
		}},
	}
	bigDER, err := x509.CreateCertificate(nil, bigTmpl, bigTmpl, bigKey.Public(), bigKey)
	require.NoError(t, err)

	for _, tt := range []struct {
		name  string
		chain [][]byte
		key   any
		msg   string
	}{
		{name: "too long, would verify", chain: ders(deepSVID.Certificates), key: deepSVID.PrivateKey,
			msg: "identity: client certificate chain has 9 certificates, more than the limit of 8; present your SVID and its intermediates only"},
		{name: "too large", chain: [][]byte{bigDER}, key: bigKey,
			msg: "identity: client certificate chain is " + itoa(len(bigDER)) + " bytes, more than the limit of 32768; present your SVID and its intermediates only"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tlsconfig.TLSClientConfig(h.bundle, tlsconfig.AuthorizeID(serverID))
			cfg.Certificates = []tls.Certificate{{Certificate: tt.chain, PrivateKey: tt.key}}
			_, err := meshcav1.NewCertificateServiceClient(h.dial(cfg)).Sign(context.Background(), signCSR(t, demoID))
			requireStatus(t, err, codes.Unauthenticated, tt.msg)
		})
	}
	require.Equal(t, 2.0, metricValue(t, h.reg, "meshca_requests_denied_total", map[string]string{"api": "native", "code": "Unauthenticated", "reason": "chain_too_large"}))
}

func ders(certs []*x509.Certificate) [][]byte {
	out := make([][]byte, len(certs))
	for i, c := range certs {
		out[i] = c.Raw
	}
	return out
}

func itoa(n int) string { return big.NewInt(int64(n)).String() }

// TestCSRBounds: a CSR with too many extensions or SANs is refused before
// its signature is checked, on the native API.
func TestCSRBounds(t *testing.T) {
	h := startLimited(t, server.Limits{})
	client := meshcav1.NewCertificateServiceClient(h.conn(nil))
	key := testca.NewKey(t)
	exts := make([]pkix.Extension, ca.MaxCSRExtensions)
	for i := range exts {
		exts[i] = pkix.Extension{Id: asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 99999, i + 1}, Value: []byte{5, 0}}
	}
	uris := make([]*url.URL, ca.MaxCSRSANs+1)
	for i := range uris {
		uris[i] = spiffeid.RequireFromPathf(td, "/w/%d", i).URL()
	}
	for _, tt := range []struct {
		name string
		tmpl *x509.CertificateRequest
		msg  string
	}{
		// The SAN extension is the 17th.
		{name: "extensions", tmpl: &x509.CertificateRequest{URIs: []*url.URL{demoID.URL()}, ExtraExtensions: exts},
			msg: "ca: CSR has 17 extensions, more than the limit of 16; a workload CSR needs its SAN only"},
		{name: "SANs", tmpl: &x509.CertificateRequest{URIs: uris},
			msg: "ca: CSR has 9 SANs, more than the limit of 8; a workload CSR has exactly one"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := client.Sign(withToken(demoToken), &meshcav1.SignRequest{Csr: testca.SignCSR(t, tt.tmpl, key)})
			requireStatus(t, err, codes.InvalidArgument, tt.msg)
		})
	}
	require.Equal(t, 2.0, metricValue(t, h.reg, "meshca_requests_denied_total", map[string]string{"api": "native", "code": "InvalidArgument", "reason": "too_many_extensions"}))
}

// TestConnectionsPerSource: connections over the per-source bound are
// closed as they are accepted, and counted; another source connects; a
// closed connection frees its place.
func TestConnectionsPerSource(t *testing.T) {
	h := startLimited(t, server.Limits{MaxConnectionsPerSource: 2})
	var held []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", h.addr)
		require.NoError(t, err)
		t.Cleanup(func() { c.Close() })
		held = append(held, c)
	}
	// The kernel hands connections to Accept in order: the third is over.
	third, err := net.Dial("tcp", h.addr)
	require.NoError(t, err)
	defer third.Close()
	_, err = third.Read(make([]byte, 1))
	require.True(t, errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || isReset(err), "the third connection is closed by the server: %v", err)
	require.Equal(t, 1.0, metricValue(t, h.reg, "meshca_limit_refused_total", map[string]string{"what": "connection"}))

	refusedConn := h.connFrom("127.0.0.1")
	_, err = meshcav1.NewCertificateServiceClient(refusedConn).Sign(withToken(demoToken), signCSR(t, demoID))
	require.Equal(t, codes.Unavailable, status.Code(err), "a gRPC client of the full source cannot connect: %v", err)
	refusedConn.Close() // no reconnection in the background

	svid, _ := h.sign(withToken(demoToken), h.connFrom("127.0.0.2"), demoID, 0)
	require.Equal(t, demoID, svid.ID, "another source is served")
	require.Equal(t, 3.0, metricValue(t, h.reg, "meshca_connections_open", nil))

	// A held connection closes: its place is free once the server sees it.
	held[0].Close()
	require.Eventually(t, func() bool {
		conn := h.connFrom("127.0.0.1")
		_, err := meshcav1.NewCertificateServiceClient(conn).Sign(withToken(demoToken), signCSR(t, demoID))
		if err != nil {
			conn.Close()
		}
		return err == nil
	}, 10*time.Second, 10*time.Millisecond, "the source connects again")
	require.Equal(t, 3.0, metricValue(t, h.reg, "meshca_connections_open", nil), "two held or in use from 127.0.0.1, one from 127.0.0.2")
}

func isReset(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && strings.Contains(op.Err.Error(), "connection reset")
}

// TestWatchStreamsPerSource: bundle watch streams over the per-source bound
// are refused with ResourceExhausted; another source may watch; a stream
// that ends frees its place.
func TestWatchStreamsPerSource(t *testing.T) {
	h := startLimited(t, server.Limits{MaxWatchStreamsPerSource: 2})
	client := meshcav1.NewBundleServiceClient(h.conn(nil))
	var cancels []context.CancelFunc
	for range 2 {
		ctx, cancel := context.WithCancel(context.Background())
		t.Cleanup(cancel)
		cancels = append(cancels, cancel)
		stream, err := client.WatchBundle(ctx, &meshcav1.WatchBundleRequest{})
		require.NoError(t, err)
		_, err = stream.Recv()
		require.NoError(t, err)
	}
	stream, err := client.WatchBundle(context.Background(), &meshcav1.WatchBundleRequest{})
	require.NoError(t, err)
	_, err = stream.Recv()
	requireStatus(t, err, codes.ResourceExhausted, "too many bundle watch streams from source 127.0.0.1 (at most 2); close the ones not in use, one stream per agent is enough")
	require.Equal(t, 1.0, metricValue(t, h.reg, "meshca_limit_refused_total", map[string]string{"what": "watch_stream"}))

	otherCtx, cancelOther := context.WithCancel(context.Background())
	defer cancelOther()
	other, err := meshcav1.NewBundleServiceClient(h.connFrom("127.0.0.2")).WatchBundle(otherCtx, &meshcav1.WatchBundleRequest{})
	require.NoError(t, err)
	_, err = other.Recv()
	require.NoError(t, err, "another source may watch")

	cancels[0]()
	require.Eventually(t, func() bool {
		ctx, cancel := context.WithCancel(context.Background())
		stream, err := client.WatchBundle(ctx, &meshcav1.WatchBundleRequest{})
		if err != nil {
			cancel()
			return false
		}
		_, err = stream.Recv()
		if err != nil {
			cancel()
			return false
		}
		t.Cleanup(cancel)
		return true
	}, 10*time.Second, 10*time.Millisecond, "a place is free once a stream ends")
}

// TestPEMBlockBound: a PEM input with more blocks than pemutil.MaxBlocks is
// refused before it is decoded: web roots sent to the admin API.
func TestPEMBlockBound(t *testing.T) {
	h := startAdmin(t, server.AdminOptions{Federator: newFederator(t, federation.Options{})})
	block := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{0}})
	_, err := h.client.FederationAdd(context.Background(), &adminv1.FederationAddRequest{
		TrustDomain: "east.test",
		Url:         "https://east.test/bundle",
		Profile:     string(federation.ProfileHTTPSWeb),
		WebRoots:    []byte(strings.Repeat(string(block), pemutil.MaxBlocks+1)),
	})
	requireStatus(t, err, codes.InvalidArgument, "web_roots: pemutil: 501 PEM blocks, more than the limit of 500")
}

// TestMetadataBound: request metadata over the server's header list bound
// (16 KiB) is refused. grpc-go's client refuses to send it, having read
// the server's SETTINGS; a raw HTTP/2 client that sends it anyway has its
// stream reset before any handler runs. The connection still serves.
func TestMetadataBound(t *testing.T) {
	h := startLimited(t, server.Limits{})
	conn := h.conn(nil)
	client := meshcav1.NewCertificateServiceClient(conn)
	ctx := metadata.AppendToOutgoingContext(withToken(demoToken), "x-padding", strings.Repeat("a", 20<<10))
	_, err := client.Sign(ctx, signCSR(t, demoID))
	requireStatus(t, err, codes.Internal, "header list size to send violates the maximum size (16384 bytes) set by server")

	cfg := tlsconfig.TLSClientConfig(h.bundle, tlsconfig.AuthorizeID(serverID))
	cfg.NextProtos = []string{"h2"}
	raw, err := tls.Dial("tcp", h.addr, cfg)
	require.NoError(t, err)
	defer raw.Close()
	_, err = io.WriteString(raw, http2.ClientPreface)
	require.NoError(t, err)
	fr := http2.NewFramer(raw, raw)
	require.NoError(t, fr.WriteSettings())
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	for _, f := range [][2]string{
		{":method", "POST"}, {":scheme", "https"}, {":path", "/meshca.v1.CertificateService/Sign"}, {":authority", "localhost"},
		{"content-type", "application/grpc"}, {"te", "trailers"},
		// Each value is under the bound (one over it would end the
		// whole connection, a compression error); together they are over.
		{"x-padding-1", strings.Repeat("a", 7<<10)}, {"x-padding-2", strings.Repeat("b", 7<<10)}, {"x-padding-3", strings.Repeat("c", 7<<10)},
	} {
		require.NoError(t, enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]}))
	}
	frag := block.Bytes()
	// Two frames, each under the default frame size: the list is over the
	// bound once decoded.
	half := len(frag) / 2
	require.NoError(t, fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: frag[:half], EndStream: true}))
	require.NoError(t, fr.WriteContinuation(1, true, frag[half:]))
	for {
		f, err := fr.ReadFrame()
		require.NoError(t, err, "the server answers before closing")
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				require.NoError(t, fr.WriteSettingsAck())
			}
			continue
		case *http2.RSTStreamFrame:
			require.Equal(t, uint32(1), f.StreamID)
			require.Equal(t, http2.ErrCodeFrameSize, f.ErrCode)
		case *http2.HeadersFrame:
			t.Fatalf("the server answered stream %d with headers: it ran the request", f.StreamID)
		default:
			continue
		}
		break
	}
	svid, _ := h.sign(withToken(demoToken), conn, demoID, 0)
	require.Equal(t, demoID, svid.ID)
}
