package rotation_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"math/big"
	mathrand "math/rand/v2"
	"net"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/utils/clock"
	clocktesting "k8s.io/utils/clock/testing"

	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/rotation"
	"github.com/meshca/meshca/testca"
)

var (
	sourceTD   = spiffeid.RequireTrustDomainFromString("example.org")
	workloadID = spiffeid.RequireFromPath(sourceTD, "/ns/shop/sa/web")
	caServerID = spiffeid.RequireFromPath(sourceTD, "/meshca/server")
)

const bootstrapToken = "s3cret-bootstrap-token"

// realTimeout bounds every real-time wait of the tests: a hang fails
// instead of blocking the run. It is generous, as a loaded machine running
// the race detector can stall a step for seconds.
const realTimeout = 20 * time.Second

// timerClock is a fake clock that reports every timer the source starts,
// so that a test can step exactly to the source's next wake-up. Each of the
// source's waits is one timer, for the whole wait; the source's checks of
// the wall clock every minute meanwhile use After, which is not reported.
type timerClock struct {
	*clocktesting.FakeClock
	timers chan startedTimer
}

// startedTimer is a timer the source started.
type startedTimer struct {
	d        time.Duration
	deadline time.Time
}

var _ clock.Clock = (*timerClock)(nil)

func newTimerClock(start time.Time) *timerClock {
	return &timerClock{FakeClock: clocktesting.NewFakeClock(start), timers: make(chan startedTimer, 1000)}
}

func (c *timerClock) NewTimer(d time.Duration) clock.Timer {
	t := c.FakeClock.NewTimer(d)
	c.timers <- startedTimer{d: d, deadline: c.Now().Add(d)}
	return t
}

// next returns the next timer the source starts; once it is returned, the
// source is waiting on it.
func (c *timerClock) next(t *testing.T) startedTimer {
	t.Helper()
	select {
	case tm := <-c.timers:
		return tm
	case <-time.After(realTimeout):
		t.Fatal("the source started no timer")
		return startedTimer{}
	}
}

// fire sets the clock to tm's deadline, firing it.
func (c *timerClock) fire(tm startedTimer) { c.SetTime(tm.deadline) }

// signCall is one Sign request the fake CA received.
type signCall struct {
	at        time.Time
	token     string // the bearer token, "" when none
	peerCerts []*x509.Certificate
	bundleSeq uint64
	issued    *x509.Certificate // nil when the call failed
}

// leafRequest is what the fake CA is about to issue; a tamper function
// changes it to script a bad response.
type leafRequest struct {
	uri       *url.URL
	publicKey crypto.PublicKey
	issuer    *testca.CA
	notAfter  time.Time
	bundle    *meshcav1.TrustBundle
}

// fakeCA is meshca's CertificateService and BundleService over a real
// gRPC server, signing with a testca intermediate on the fake clock, with
// scriptable faults.
type fakeCA struct {
	meshcav1.UnimplementedCertificateServiceServer
	meshcav1.UnimplementedBundleServiceServer

	clock clock.PassiveClock
	root  *testca.CA

	mu            sync.Mutex
	issuer        *testca.CA
	bundle        *meshcav1.TrustBundle
	down          bool // Sign fails with Unavailable
	refuseCerts   bool // Sign with a client certificate fails with Unauthenticated
	tamper        func(*leafRequest)
	federated     []*meshcav1.TrustBundle                  // sent in every Sign response and watch update
	refuseWatches int                                      // the next watches fail at once
	watchers      map[chan *meshcav1.BundleUpdate]struct{} // one per open watch
	broken        chan struct{}                            // closed to break the open watches
	watches       int                                      // watches opened
	signs         []signCall
}

func newFakeCA(t *testing.T, clk *timerClock) *fakeCA {
	t.Helper()
	start := clk.Now()
	life := testca.WithLifetime(start.Add(-time.Hour), start.Add(72*time.Hour))
	root := testca.New(t, sourceTD, life)
	f := &fakeCA{
		clock:    clk,
		root:     root,
		issuer:   root.ChildCA(life),
		watchers: map[chan *meshcav1.BundleUpdate]struct{}{},
		broken:   make(chan struct{}),
	}
	f.bundle = bundleMsg(1, root)
	return f
}

// bundleMsg returns a bundle of sourceTD holding the roots of cas.
func bundleMsg(seq uint64, cas ...*testca.CA) *meshcav1.TrustBundle {
	pb := &meshcav1.TrustBundle{TrustDomain: sourceTD.Name(), Sequence: seq}
	for _, c := range cas {
		pb.X509Authorities = append(pb.X509Authorities, c.Root().Cert.Raw)
	}
	return pb
}

// serveBufconn serves f on an in-memory listener without TLS, and returns
// a Dialer for it.
func (f *fakeCA) serveBufconn(t *testing.T) rotation.Dialer {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	f.serve(t, lis, grpc.NewServer())
	return func(context.Context) (*grpc.ClientConn, error) {
		return grpc.NewClient("passthrough:///bufconn",
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
			grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
}

// serveTLS serves f over TLS on loopback, presenting an SVID of caServerID
// and requesting (not verifying) client certificates, as meshca-server
// does. It returns the address.
func (f *fakeCA) serveTLS(t *testing.T) string {
	t.Helper()
	// Valid as long as the issuer, so that tests can run the fake clock
	// for days.
	now := f.clock.Now()
	svid := f.issuer.CreateX509SVID(caServerID, testca.WithLifetime(now.Add(-time.Hour), now.Add(72*time.Hour)))
	cert := tls.Certificate{PrivateKey: svid.PrivateKey, Leaf: svid.Certificates[0]}
	for _, c := range svid.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequestClientCert,
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	f.serve(t, lis, grpc.NewServer(grpc.Creds(credentials.NewTLS(cfg))))
	return lis.Addr().String()
}

func (f *fakeCA) serve(t *testing.T, lis net.Listener, srv *grpc.Server) {
	meshcav1.RegisterCertificateServiceServer(srv, f)
	meshcav1.RegisterBundleServiceServer(srv, f)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(lis)
	}()
	t.Cleanup(func() {
		srv.Stop()
		<-done
	})
}

func (f *fakeCA) Sign(ctx context.Context, req *meshcav1.SignRequest) (*meshcav1.SignResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	call := signCall{at: f.clock.Now(), bundleSeq: req.GetBundleSequence()}
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get("authorization"); len(v) > 0 {
			call.token = strings.TrimPrefix(v[0], "Bearer ")
		}
	}
	if p, ok := peer.FromContext(ctx); ok {
		if info, ok := p.AuthInfo.(credentials.TLSInfo); ok {
			call.peerCerts = info.State.PeerCertificates
		}
	}
	var (
		resp *meshcav1.SignResponse
		err  error
	)
	if f.refuseCerts && len(call.peerCerts) > 0 {
		// As meshca-server refuses an SVID under a root it retired.
		err = status.Error(codes.Unauthenticated, "client certificate does not verify against the trust bundle")
	} else {
		resp, err = f.signLocked(req)
	}
	if err == nil {
		call.issued, _ = x509.ParseCertificate(resp.CertChain[0])
	}
	f.signs = append(f.signs, call)
	return resp, err
}

func (f *fakeCA) signLocked(req *meshcav1.SignRequest) (*meshcav1.SignResponse, error) {
	if f.down {
		return nil, status.Error(codes.Unavailable, "fake CA is down")
	}
	csr, err := x509.ParseCertificateRequest(req.GetCsr())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "bad CSR: %v", err)
	}
	if err := csr.CheckSignature(); err != nil || len(csr.URIs) != 1 {
		return nil, status.Error(codes.InvalidArgument, "bad CSR signature or SANs")
	}
	now := f.clock.Now()
	ttl := time.Hour
	if req.GetTtl() != nil {
		ttl = req.GetTtl().AsDuration()
	}
	lr := &leafRequest{uri: csr.URIs[0], publicKey: csr.PublicKey, issuer: f.issuer, notAfter: now.Add(ttl), bundle: f.bundle}
	if f.tamper != nil {
		f.tamper(lr)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             now,
		NotAfter:              lr.notAfter,
		URIs:                  []*url.URL{lr.uri},
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, lr.issuer.Cert, lr.publicKey, lr.issuer.Key)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &meshcav1.SignResponse{
		CertChain:        [][]byte{der, lr.issuer.Cert.Raw},
		Bundle:           lr.bundle,
		FederatedBundles: f.federated,
		ExpiresAt:        timestamppb.New(lr.notAfter),
		SpiffeId:         lr.uri.String(),
	}, nil
}

func (f *fakeCA) WatchBundle(_ *meshcav1.WatchBundleRequest, stream meshcav1.BundleService_WatchBundleServer) error {
	f.mu.Lock()
	f.watches++
	if f.refuseWatches > 0 {
		f.refuseWatches--
		f.mu.Unlock()
		return status.Error(codes.Unavailable, "fake CA refuses watches")
	}
	updates := make(chan *meshcav1.BundleUpdate, 16)
	f.watchers[updates] = struct{}{}
	current := &meshcav1.BundleUpdate{Bundle: f.bundle, FederatedBundles: f.federated}
	broken := f.broken
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		delete(f.watchers, updates)
		f.mu.Unlock()
	}()
	for up := current; ; {
		if err := stream.Send(up); err != nil {
			return err
		}
		select {
		case up = <-updates:
		case <-broken:
			return status.Error(codes.Unavailable, "fake CA broke the watch")
		case <-stream.Context().Done():
			return status.FromContextError(stream.Context().Err()).Err()
		}
	}
}

// setBundle makes pb the CA's bundle and sends it on every open watch.
func (f *fakeCA) setBundle(pb *meshcav1.TrustBundle) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.bundle = pb
	f.pushLocked(pb)
}

// push sends pb on every open watch without changing the CA's bundle.
func (f *fakeCA) push(pb *meshcav1.TrustBundle) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pushLocked(pb)
}

func (f *fakeCA) pushLocked(pb *meshcav1.TrustBundle) {
	for w := range f.watchers {
		w <- &meshcav1.BundleUpdate{Bundle: pb, FederatedBundles: f.federated}
	}
}

// pushFederated makes pbs the federated bundles of the next Sign
// responses and sends them, with the CA's bundle, on every open watch, as
// meshca-server does when its federated bundles change.
func (f *fakeCA) pushFederated(pbs ...*meshcav1.TrustBundle) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.federated = pbs
	f.pushLocked(f.bundle)
}

// breakWatches ends every open watch with Unavailable; the next n watches
// are refused.
func (f *fakeCA) breakWatches(refuseNext int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	close(f.broken)
	f.broken = make(chan struct{})
	f.refuseWatches = refuseNext
}

func (f *fakeCA) setDown(down bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.down = down
}

// setRefuseCerts makes Sign refuse, or accept again, callers that present
// a client certificate.
func (f *fakeCA) setRefuseCerts(refuse bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.refuseCerts = refuse
}

// setFederated makes pbs the federated bundles of the next Sign
// responses and watch updates, without sending them on the open watches.
func (f *fakeCA) setFederated(pbs ...*meshcav1.TrustBundle) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.federated = pbs
}

func (f *fakeCA) setTamper(tamper func(*leafRequest)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.tamper = tamper
}

// setSignBundle makes pb the bundle of Sign responses and of new watches,
// without sending it on the open ones: a watch that lags.
func (f *fakeCA) setSignBundle(pb *meshcav1.TrustBundle) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.bundle = pb
}

// watching reports whether the nth watch is the one open now.
func (f *fakeCA) watching(n int) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.watches == n && len(f.watchers) == 1
}

// openWatches returns the number of watches open now.
func (f *fakeCA) openWatches() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.watchers)
}

func (f *fakeCA) setIssuer(issuer *testca.CA) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.issuer = issuer
}

func (f *fakeCA) calls() []signCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]signCall(nil), f.signs...)
}

func (f *fakeCA) watchCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.watches
}

// logRecorder records what the source logs.
type logRecorder struct {
	mu      sync.Mutex
	records []logRecord
}

// logRecord is one log line: its level, message and attributes as text.
type logRecord struct {
	level slog.Level
	msg   string
	attrs map[string]string
}

func (l *logRecorder) handler() slog.Handler { return recordingHandler{logs: l} }

// find returns the records with message msg.
func (l *logRecorder) find(msg string) []logRecord {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []logRecord
	for _, r := range l.records {
		if r.msg == msg {
			out = append(out, r)
		}
	}
	return out
}

// contains reports whether any message or attribute holds s.
func (l *logRecorder) contains(s string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, r := range l.records {
		if strings.Contains(r.msg, s) {
			return true
		}
		for _, v := range r.attrs {
			if strings.Contains(v, s) {
				return true
			}
		}
	}
	return false
}

type recordingHandler struct {
	logs  *logRecorder
	attrs []slog.Attr
}

func (recordingHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h recordingHandler) Handle(_ context.Context, r slog.Record) error {
	rec := logRecord{level: r.Level, msg: r.Message, attrs: map[string]string{}}
	for _, a := range h.attrs {
		rec.attrs[a.Key] = a.Value.String()
	}
	r.Attrs(func(a slog.Attr) bool {
		rec.attrs[a.Key] = a.Value.String()
		return true
	})
	h.logs.mu.Lock()
	defer h.logs.mu.Unlock()
	h.logs.records = append(h.logs.records, rec)
	return nil
}

func (h recordingHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return recordingHandler{logs: h.logs, attrs: append(slices.Clip(h.attrs), attrs...)}
}

func (h recordingHandler) WithGroup(string) slog.Handler { return h }

// sourceHarness is a source running against a fake CA on a fake clock.
type sourceHarness struct {
	clock *timerClock
	ca    *fakeCA
	src   *rotation.Source
	logs  *logRecorder
	start time.Time
}

// newSourceFixture returns a fake CA on a fake clock set to now, with no
// source yet.
func newSourceFixture(t *testing.T) *sourceHarness {
	t.Helper()
	return newSourceFixtureAt(t, time.Now().Truncate(time.Second))
}

// newSourceFixtureAt returns a fake CA on a fake clock set to start.
func newSourceFixtureAt(t *testing.T, start time.Time) *sourceHarness {
	t.Helper()
	h := &sourceHarness{clock: newTimerClock(start), logs: &logRecorder{}, start: start}
	h.ca = newFakeCA(t, h.clock)
	return h
}

// newSourceHarness returns a fixture with a source made with opts.
func newSourceHarness(t *testing.T, opts rotation.Options) *sourceHarness {
	t.Helper()
	h := newSourceFixture(t)
	h.newSource(t, opts)
	return h
}

// newSource makes the fixture's source with opts, filled in with the
// workload ID, the fake CA's bundle, the test token, the fake clock, a
// seeded Rand and the log recorder where they are zero.
func (h *sourceHarness) newSource(t *testing.T, opts rotation.Options) {
	t.Helper()
	if opts.ID.IsZero() {
		opts.ID = workloadID
	}
	if opts.InitialBundle == nil {
		opts.InitialBundle = h.ca.root.Bundle()
	}
	if opts.Token == nil {
		opts.Token = func(context.Context) (string, error) { return bootstrapToken, nil }
	}
	if opts.Clock == nil {
		opts.Clock = h.clock
	}
	if opts.Rand == nil {
		opts.Rand = mathrand.New(mathrand.NewPCG(1, 2)).Float64
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(h.logs.handler())
	}
	src, err := rotation.NewSource(opts)
	require.NoError(t, err)
	h.src = src
}

// run runs the source until the test ends.
func (h *sourceHarness) run(t *testing.T, dial rotation.Dialer) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.src.Run(ctx, dial) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			require.ErrorIs(t, err, context.Canceled)
		case <-time.After(realTimeout):
			t.Error("Run did not return after its context was canceled")
		}
	})
}

// svid returns the source's current SVID, failing the test when there is
// none.
func (h *sourceHarness) svid(t *testing.T) *x509svid.SVID {
	t.Helper()
	svid, err := h.src.GetX509SVID()
	require.NoError(t, err)
	return svid
}

// waitFor waits, on the source's Changed channel, until cond holds.
func (h *sourceHarness) waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(realTimeout)
	for {
		changed := h.src.Changed()
		if cond() {
			return
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// requireSameCert fails unless want and got are the same certificate.
func requireSameCert(t *testing.T, want, got *x509.Certificate) {
	t.Helper()
	require.Equal(t, want.SerialNumber, got.SerialNumber, "serial")
}
