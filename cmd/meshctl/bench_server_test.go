package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/internal/server"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
)

const benchToken = "bench-token-0123456789abcdef"

var benchServerID = spiffeid.RequireFromPath(testTD, "/meshca/server")

// signCall is what the server saw of one Sign call.
type signCall struct {
	// conn numbers the connection the call came on, in accept order.
	conn int64
	// token is whether the call carried an authorization header.
	token bool
	// clientCert is the client certificate presented, if any.
	clientCert *x509.Certificate
	// resumed is whether the TLS session was resumed.
	resumed bool
	// csrKey is the CSR's public key (DER).
	csrKey string
	// issued is the certificate issued, when the call succeeded.
	issued *x509.Certificate
	// shed is whether the test shed the call.
	shed bool
}

// benchServer is meshca's gRPC server on loopback, as meshca-server runs
// it (static tokens, then mTLS renewal), with its metrics served over
// HTTP, a listener that numbers the connections it accepts, and an
// interceptor that records every Sign call.
type benchServer struct {
	addr       string
	bundleFile string
	tokenFile  string
	metricsURL string

	accepts atomic.Int64
	watches atomic.Int64
	// bundleCalls counts GetBundle calls, and bundleCallsWithToken those
	// of them that carried an authorization header.
	bundleCalls, bundleCallsWithToken atomic.Int64

	// shedFrom and shedCount make the server refuse Sign calls number
	// shedFrom+1 to shedFrom+shedCount (counting from 1) with
	// ResourceExhausted and a RetryInfo of shedHint.
	shedFrom, shedCount int64
	shedHint            time.Duration
	// gate, when set, holds token calls after the first gateAfter
	// until it is closed, which it is when gateOpensAt renewals (mTLS
	// calls) have been signed.
	gate        chan struct{}
	gateAfter   int64
	gateOpensAt int
	gateOnce    sync.Once
	renewed     int
	// refuseSecondEntry turns the second result of every SignBatch
	// answer into a refusal.
	refuseSecondEntry atomic.Bool

	mu    sync.Mutex
	calls []signCall
	n     int64
}

type benchServerOption func(*benchServer)

func withShedding(from, count int64, hint time.Duration) benchServerOption {
	return func(b *benchServer) { b.shedFrom, b.shedCount, b.shedHint = from, count, hint }
}

func startBenchServer(t *testing.T, opts ...benchServerOption) *benchServer {
	t.Helper()
	b := &benchServer{}
	for _, o := range opts {
		o(b)
	}
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: testTD})
	require.NoError(t, err)
	c, err := ca.New(set, ca.Options{})
	require.NoError(t, err)
	tokens, err := identity.NewStaticTokens(identity.TokenFile{Tokens: []identity.TokenFileEntry{
		{ID: testID.String(), Token: benchToken},
	}}, testTD)
	require.NoError(t, err)
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	srv, err := server.New(server.Options{
		CA:            c,
		Authenticator: identity.Chain(tokens, identity.NewSVIDAuthenticator(testTD, c, nil)),
		Policy:        identity.Policy{Reserved: []spiffeid.ID{benchServerID}},
		Registerer:    reg,
	})
	require.NoError(t, err)
	serving, err := server.NewServingCert(c, benchServerID, []string{"localhost"}, nil, time.Hour, nil)
	require.NoError(t, err)

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	g := srv.GRPCServer(serving.TLSConfig(),
		grpc.ChainUnaryInterceptor(b.intercept),
		grpc.ChainStreamInterceptor(func(s any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			if info.FullMethod == meshcav1.BundleService_WatchBundle_FullMethodName {
				b.watches.Add(1)
			}
			return h(s, ss)
		}))
	go func() { _ = g.Serve(&countingListener{Listener: lis, n: &b.accepts}) }()
	t.Cleanup(g.Stop)

	metrics := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	t.Cleanup(metrics.Close)

	dir := t.TempDir()
	bundle, _ := c.Bundle()
	b.addr = lis.Addr().String()
	b.bundleFile = filepath.Join(dir, "bundle.pem")
	b.tokenFile = filepath.Join(dir, "token")
	b.metricsURL = metrics.URL + "/metrics"
	require.NoError(t, os.WriteFile(b.bundleFile, pemutil.EncodeCertificates(bundle.X509Authorities()...), 0o600))
	require.NoError(t, os.WriteFile(b.tokenFile, []byte(benchToken+"\n"), 0o600))
	return b
}

// countingListener numbers the connections it accepts, and hands the
// number to the connection's peer address.
type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &numberedConn{Conn: c, n: l.n.Add(1)}, nil
}

type numberedConn struct {
	net.Conn
	n int64
}

// numberedAddr is a connection's remote address with the connection's
// number.
type numberedAddr struct {
	net.Addr
	n int64
}

func (c *numberedConn) RemoteAddr() net.Addr { return numberedAddr{Addr: c.Conn.RemoteAddr(), n: c.n} }

func (b *benchServer) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	if info.FullMethod == meshcav1.BundleService_GetBundle_FullMethodName {
		b.bundleCalls.Add(1)
		if len(md.Get("authorization")) > 0 {
			b.bundleCallsWithToken.Add(1)
		}
	}
	if info.FullMethod == meshcav1.CertificateService_SignBatch_FullMethodName && b.refuseSecondEntry.Load() {
		resp, err := handler(ctx, req)
		if err != nil {
			return resp, err
		}
		if results := resp.(*meshcav1.SignBatchResponse).GetResults(); len(results) > 1 {
			results[1] = &meshcav1.SignBatchResult{Code: int32(codes.PermissionDenied), Message: "test: second entry refused"}
		}
		return resp, nil
	}
	if info.FullMethod != meshcav1.CertificateService_Sign_FullMethodName {
		return handler(ctx, req)
	}
	var call signCall
	call.token = len(md.Get("authorization")) > 0
	if p, ok := peer.FromContext(ctx); ok {
		if a, ok := p.Addr.(numberedAddr); ok {
			call.conn = a.n
		}
		if tlsInfo, ok := p.AuthInfo.(credentials.TLSInfo); ok {
			call.resumed = tlsInfo.State.DidResume
			if certs := tlsInfo.State.PeerCertificates; len(certs) > 0 {
				call.clientCert = certs[0]
			}
		}
	}
	if csr, err := x509.ParseCertificateRequest(req.(*meshcav1.SignRequest).GetCsr()); err == nil {
		call.csrKey = string(csr.RawSubjectPublicKeyInfo)
	}

	b.mu.Lock()
	b.n++
	k := b.n
	tokenCalls := 0
	for _, c := range b.calls {
		if c.token {
			tokenCalls++
		}
	}
	b.mu.Unlock()
	if b.gate != nil && call.token && int64(tokenCalls) >= b.gateAfter {
		select {
		case <-b.gate:
		case <-ctx.Done():
		}
	}

	var resp any
	var err error
	if k > b.shedFrom && k <= b.shedFrom+b.shedCount {
		call.shed = true
		st, _ := status.New(codes.ResourceExhausted, "server: shedding load").
			WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(b.shedHint)})
		err = st.Err()
	} else if resp, err = handler(ctx, req); err == nil {
		call.issued, _ = x509.ParseCertificate(resp.(*meshcav1.SignResponse).GetCertChain()[0])
	}
	b.mu.Lock()
	b.calls = append(b.calls, call)
	if call.clientCert != nil && call.issued != nil {
		b.renewed++
	}
	if b.gate != nil && b.renewed >= b.gateOpensAt {
		b.gateOnce.Do(func() { close(b.gate) })
	}
	b.mu.Unlock()
	return resp, err
}

func (b *benchServer) signCalls() []signCall {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]signCall(nil), b.calls...)
}

// args returns the flags that point bench at b.
func (b *benchServer) args(more ...string) []string {
	return append([]string{"bench",
		"--server", b.addr, "--ca-bundle", b.bundleFile, "--server-id", benchServerID.String(),
		"--token-file", b.tokenFile, "--spiffe-id", testID.String(), "--metrics-url", b.metricsURL,
	}, more...)
}

// runBenchJSON runs bench against b with -o json and returns its output
// parsed.
func runBenchJSON(t *testing.T, b *benchServer, args ...string) map[string]any {
	t.Helper()
	out, err := runMeshctl(t, b.args(append(args, "-o", "json")...)...)
	require.NoError(t, err)
	var got map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &got), out)
	return got
}

// requireFigures checks the fields every mode's JSON has.
func requireFigures(t *testing.T, got map[string]any, mode string) {
	t.Helper()
	require.Equal(t, mode, got["mode"])
	require.Equal(t, false, got["interrupted"])
	require.Contains(t, got, "elapsedSeconds")
	require.Contains(t, got, "certsPerSecond")
	require.Contains(t, got, "latencyMs")
	server, ok := got["server"].(map[string]any)
	require.True(t, ok, "server figures: %v (%v)", got["server"], got["serverError"])
	require.Positive(t, server["issued"])
	require.Contains(t, server, "rssBytes")
	require.Contains(t, server, "cpuSeconds")
	crypto := got["crypto"].(map[string]any)
	require.Positive(t, crypto["perCertMicros"])
	require.Positive(t, crypto["limitPerCore"])
}

func distinctKeys(calls []signCall) int {
	keys := map[string]bool{}
	for _, c := range calls {
		keys[c.csrKey] = true
	}
	return len(keys)
}

func distinctConns(calls []signCall) int {
	conns := map[int64]bool{}
	for _, c := range calls {
		conns[c.conn] = true
	}
	return len(conns)
}

func TestBenchStormNewKeyNewConnectionEach(t *testing.T) {
	b := startBenchServer(t)
	const n = 50
	got := runBenchJSON(t, b, "--mode", "storm", "-n", "50", "-c", "8")

	requireFigures(t, got, "storm")
	require.Equal(t, float64(n), got["ok"])
	require.Equal(t, map[string]any{}, got["errors"])
	storm := got["storm"].(map[string]any)
	require.Equal(t, float64(n), storm["workloads"])
	require.Equal(t, float64(8), storm["inFlight"])
	require.Equal(t, "ahead", storm["keys"])
	require.Equal(t, float64(n), storm["keysMadeAhead"])
	require.Equal(t, float64(n), storm["certified"])
	require.Equal(t, float64(0), storm["failed"])
	require.Equal(t, float64(0), storm["shedRetried"])
	require.Equal(t, map[string]any{}, storm["retried"])
	for _, k := range []string{"workloadLatencyMs", "connectLatencyMs", "signLatencyMs", "peakRSSBytes", "rssBeforeBytes", "wallSeconds"} {
		require.Contains(t, storm, k)
	}
	require.Positive(t, storm["rssSamples"])
	require.NotContains(t, got, "renewals")

	// The server saw the first request (not counted) and the n
	// workloads, each with the token, a key of its own, on a connection
	// of its own, none resuming a TLS session.
	calls := b.signCalls()
	require.Len(t, calls, n+1)
	require.Equal(t, int64(n+1), b.accepts.Load())
	require.Equal(t, n+1, distinctConns(calls))
	require.Equal(t, n+1, distinctKeys(calls))
	for _, c := range calls {
		require.True(t, c.token)
		require.Nil(t, c.clientCert)
		require.False(t, c.resumed)
		require.NotNil(t, c.issued)
	}
	require.Zero(t, b.watches.Load())
}

func TestBenchStormRetriesWhatTheServerSheds(t *testing.T) {
	const n, shed = 30, 7
	// The first call, bench's check before the run, goes through; the
	// next seven are shed with a RetryInfo.
	b := startBenchServer(t, withShedding(1, shed, 20*time.Millisecond))
	got := runBenchJSON(t, b, "--mode", "storm", "-n", "30", "-c", "4", "--keys", "inline")

	requireFigures(t, got, "storm")
	require.Equal(t, float64(n), got["ok"])
	require.Equal(t, map[string]any{}, got["errors"])
	storm := got["storm"].(map[string]any)
	require.Equal(t, "inline", storm["keys"])
	require.NotContains(t, storm, "keysMadeAhead")
	require.Equal(t, float64(shed), storm["shedRetried"])
	require.Equal(t, map[string]any{}, storm["retried"])
	require.Equal(t, float64(0), storm["failed"])

	// Every retry came on a new connection, with the same key.
	calls := b.signCalls()
	require.Len(t, calls, 1+n+shed)
	require.Equal(t, int64(1+n+shed), b.accepts.Load())
	require.Equal(t, 1+n+shed, distinctConns(calls))
	require.Equal(t, 1+n, distinctKeys(calls))
	shedKeys := map[string]bool{}
	for _, c := range calls {
		if c.shed {
			shedKeys[c.csrKey] = true
		}
	}
	for _, c := range calls {
		if !c.shed && shedKeys[c.csrKey] {
			require.NotNil(t, c.issued)
			delete(shedKeys, c.csrKey)
		}
	}
	require.Empty(t, shedKeys, "every shed workload was certified on a retry")
}

func TestBenchStormFinalErrors(t *testing.T) {
	b := startBenchServer(t)
	// A token the server does not know fails the first request.
	bad := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(bad, []byte("not-the-token-0123456789"), 0o600))
	args := b.args("--mode", "storm", "-n", "5")
	args[slicesIndex(args, "--token-file")+1] = bad
	_, err := runMeshctl(t, args...)
	require.Error(t, err)
	require.True(t, strings.HasPrefix(err.Error(), "first request: rpc error: code = Unauthenticated"), err.Error())
	require.NotContains(t, err.Error(), "not-the-token")
}

func slicesIndex(s []string, v string) int {
	for i, x := range s {
		if x == v {
			return i
		}
	}
	return -1
}

func TestBenchStormHold(t *testing.T) {
	b := startBenchServer(t)
	got := runBenchJSON(t, b, "--mode", "storm", "-n", "12", "-c", "4", "--hold")
	requireFigures(t, got, "storm")
	require.Equal(t, float64(12), got["ok"])
	storm := got["storm"].(map[string]any)
	require.Equal(t, true, storm["hold"])
	require.Equal(t, float64(12), storm["held"])
	require.Contains(t, storm, "memoryPerClientBytes")
	require.Contains(t, storm, "rssIncreaseBytes")
	require.Positive(t, storm["fileLimit"])
	// Each held client watched the bundle on its own connection.
	require.Equal(t, int64(12), b.watches.Load())
	require.Equal(t, int64(13), b.accepts.Load())
}

func TestBenchMixedRenewsOverMTLS(t *testing.T) {
	const n, renewers = 20, 3
	b := startBenchServer(t)
	// The new workloads wait until the renewing clients have renewed
	// twice each: so that renewals surely happen during the run.
	b.gate, b.gateAfter, b.gateOpensAt = make(chan struct{}), 1+renewers, 2*renewers
	got := runBenchJSON(t, b, "--mode", "mixed", "-n", "20", "-c", "4", "--renewals", "3", "--csrs", "8")

	requireFigures(t, got, "mixed")
	require.Equal(t, float64(n), got["ok"])
	require.Equal(t, map[string]any{}, got["errors"])
	ren := got["renewals"].(map[string]any)
	require.Equal(t, float64(renewers), ren["clients"])
	require.GreaterOrEqual(t, ren["ok"], float64(2*renewers))
	require.Equal(t, map[string]any{}, ren["errors"])
	require.Contains(t, ren, "latencyMs")
	require.Contains(t, ren, "signLatencyMs")
	storm := got["storm"].(map[string]any)
	require.Equal(t, float64(n), storm["keysMadeAhead"])
	require.Equal(t, float64(8), storm["renewalKeysMadeAhead"])

	calls := b.signCalls()
	issued := map[string]*x509.Certificate{}
	for _, c := range calls {
		if c.issued != nil {
			issued[string(c.issued.Raw)] = c.issued
		}
	}
	var tokenCalls, mtlsCalls int
	for _, c := range calls {
		require.False(t, c.resumed)
		if c.token {
			// The first request, the renewing clients' first
			// certificates and the new workloads: a token, no
			// certificate.
			tokenCalls++
			require.Nil(t, c.clientCert)
			continue
		}
		// A renewal: no token, the client's current certificate, one
		// this server issued, and a CSR for a new key.
		mtlsCalls++
		require.NotNil(t, c.clientCert, "a call with neither token nor certificate")
		require.Contains(t, issued, string(c.clientCert.Raw))
		require.Equal(t, testID.String(), c.clientCert.URIs[0].String())
		spki, err := x509.MarshalPKIXPublicKey(c.clientCert.PublicKey)
		require.NoError(t, err)
		require.NotEqual(t, string(spki), c.csrKey, "a renewal keeps its key")
	}
	require.Equal(t, 1+renewers+n, tokenCalls)
	require.GreaterOrEqual(t, mtlsCalls, int(ren["ok"].(float64)))
	// One connection a call, but for the clients' first certificates,
	// which share one; a renewal cut short by the end of the run may
	// have connected without calling.
	require.GreaterOrEqual(t, b.accepts.Load(), int64(2+n+mtlsCalls))
}

// TestBenchSteadyBatch: --batch sends SignBatch calls of token entries;
// the rate counts certificates, and the server issued every one.
func TestBenchSteadyBatch(t *testing.T) {
	b := startBenchServer(t)
	got := runBenchJSON(t, b, "-d", "0", "-n", "5", "-c", "2", "--batch", "4", "--transport-probe", "0")
	requireFigures(t, got, "steady")
	require.Equal(t, float64(4), got["batch"])
	require.Equal(t, float64(5), got["ok"], "5 calls")
	require.Equal(t, float64(20), got["server"].(map[string]any)["issued"], "4 certificates a call")
	require.Len(t, b.signCalls(), 1, "one Sign, the preflight; the rest were SignBatch")
	require.NotContains(t, got, "transport", "--transport-probe 0 skips the probe")
	require.Zero(t, b.bundleCalls.Load())

	require.Equal(t, float64(20), got["certificates"])
	require.NotContains(t, got, "refusedEntries", "no entry was refused")

	_, err := runMeshctl(t, b.args("--batch", "65")...)
	require.ErrorContains(t, err, "--batch 65: want 1 (Sign) to 64 (SignBatch entries)")
	_, err = runMeshctl(t, b.args("--mode", "storm", "--batch", "2")...)
	require.ErrorContains(t, err, "--batch is for --mode steady")
}

// TestBenchSteadyTransportProbe: after a steady run, bench sends GetBundle
// over the same connections with the same header, and reports the
// server's CPU per call and the ceiling it gives.
func TestBenchSteadyTransportProbe(t *testing.T) {
	b := startBenchServer(t)
	got := runBenchJSON(t, b, "-d", "0", "-n", "20", "-c", "3", "--connections", "2", "--transport-probe", "300ms")
	requireFigures(t, got, "steady")
	require.Equal(t, float64(20), got["ok"])
	require.NotContains(t, got, "transportError")
	tr, ok := got["transport"].(map[string]any)
	require.True(t, ok, "transport figures: %v", got)

	// Every call the probe counted reached the server, with the token,
	// over the run's two connections: no connection was added for it.
	calls := b.bundleCalls.Load()
	require.Positive(t, calls)
	require.Equal(t, float64(calls), tr["calls"])
	require.Equal(t, calls, b.bundleCallsWithToken.Load())
	require.Equal(t, int64(2), b.accepts.Load())
	require.InDelta(t, 0.3, tr["probeDurationSeconds"], 0.25)
	require.Equal(t, float64(1), tr["certificatesPerCall"])

	// The ceiling is the crypto floor over the floor plus the server's
	// CPU per call.
	perCall := tr["cpuPerCallMicros"].(float64)
	require.InDelta(t, tr["cpuSeconds"].(float64)*1e6/float64(calls), perCall, 0.01)
	floor := got["crypto"].(map[string]any)["perCertMicros"].(float64)
	require.InDelta(t, 100*floor/(floor+perCall), tr["ceilingPercent"], 0.01)

	_, err := runMeshctl(t, b.args("--transport-probe", "-1s")...)
	require.ErrorContains(t, err, "--transport-probe -1s: want 0 (skip) or more")
	_, err = runMeshctl(t, b.args("--mode", "storm", "--transport-probe", "1s")...)
	require.ErrorContains(t, err, "--transport-probe is for --mode steady")
}

// TestBenchSteadyBatchCountsEntries: an entry the server refuses does not
// fail its call; it is counted by code, and not as a certificate.
func TestBenchSteadyBatchCountsEntries(t *testing.T) {
	b := startBenchServer(t)
	b.refuseSecondEntry.Store(true)
	out, err := runMeshctl(t, b.args("-d", "0", "-n", "6", "-c", "2", "--batch", "3", "--transport-probe", "0")...)
	require.NoError(t, err)
	require.Contains(t, out, "requests   6 ok, 0 errors")
	require.Contains(t, out, "\nentries    12 certificates, 6 refused\n")
	require.Contains(t, out, "\nrefused    PermissionDenied 6 (first: test: second entry refused)\n")

	got := runBenchJSON(t, b, "-d", "0", "-n", "4", "-c", "2", "--batch", "3", "--transport-probe", "0")
	require.Equal(t, float64(4), got["ok"])
	require.Equal(t, map[string]any{}, got["errors"])
	require.Equal(t, float64(8), got["certificates"])
	require.Equal(t, map[string]any{"PermissionDenied": float64(4)}, got["refusedEntries"])
	require.Equal(t, map[string]any{"PermissionDenied": "test: second entry refused"}, got["refusedEntrySamples"])
	// The rate counts certificates only.
	require.InDelta(t, 8/got["elapsedSeconds"].(float64), got["certsPerSecond"], 1e-6)
}
