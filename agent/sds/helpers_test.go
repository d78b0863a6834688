package sds_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshca/meshca/agent/internal/fake"
	"github.com/meshca/meshca/agent/sds"
	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/testca"
)

var (
	td      = spiffeid.RequireTrustDomainFromString("cluster.local")
	id      = spiffeid.RequireFromPath(td, "/ns/shop/sa/web")
	envoyID = &corev3.Node{Id: "sidecar~10.0.0.1~web-0.shop~shop.svc.cluster.local", Cluster: "web"}
)

// waitTimeout bounds every wait on the server, so that a broken server
// fails the test instead of hanging it. It is never a timing assertion.
const waitTimeout = 30 * time.Second

// env is a running SDS server on a Unix socket, a fake Source behind it,
// and a client connection to it.
type env struct {
	src       *fake.Source
	srv       *sds.Server
	conn      *grpc.ClientConn
	logs      *logSink
	root      *testca.CA
	inter     *testca.CA
	cancelRun context.CancelFunc
	runDone   chan struct{}
	runErr    error
}

// start starts a server for opts (its Source and Logger are set here) over
// a Unix socket in t.TempDir(), and Runs it. The source holds the bundle
// of td; with svid, also an X509-SVID.
func start(t *testing.T, opts sds.Options, svid bool) *env {
	t.Helper()
	root := testca.New(t, td)
	e := &env{
		src:     fake.NewSource().WithBundle(root.Bundle()),
		logs:    newLogSink(),
		root:    root,
		inter:   root.ChildCA(),
		runDone: make(chan struct{}),
	}
	if svid {
		e.src.WithSVID(e.inter.CreateX509SVID(id))
	}
	opts.Source = e.src
	opts.Logger = slog.New(e.logs.handler())
	srv, err := sds.New(opts)
	require.NoError(t, err)
	e.srv = srv

	sock := filepath.Join(t.TempDir(), "sds.sock")
	lis, err := net.Listen("unix", sock)
	require.NoError(t, err)
	g := grpc.NewServer()
	srv.Register(g)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = g.Serve(lis)
	}()
	t.Cleanup(func() {
		g.Stop()
		<-served
	})

	ctx, cancel := context.WithCancel(context.Background())
	e.cancelRun = cancel
	go func() {
		defer close(e.runDone)
		e.runErr = srv.Run(ctx)
	}()
	t.Cleanup(func() { _ = e.stopRun() })

	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	e.conn = conn
	return e
}

// stopRun ends Run and returns its error.
func (e *env) stopRun() error {
	e.cancelRun()
	<-e.runDone
	return e.runErr
}

// testContext returns a context that ends with the test or after
// waitTimeout.
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), waitTimeout)
	t.Cleanup(cancel)
	return ctx
}

// rotate gives the source a new X509-SVID, as a renewal does, and returns
// it.
func (e *env) rotate() *x509svid.SVID {
	svid := e.inter.CreateX509SVID(id)
	e.src.WithSVID(svid)
	return svid
}

// svid returns the source's current X509-SVID.
func (e *env) svid(t *testing.T) *x509svid.SVID {
	svid, err := e.src.GetX509SVID()
	require.NoError(t, err)
	return svid
}

// secrets decodes resources, which must all be secrets, by name.
func secrets(t *testing.T, resources []*anypb.Any) map[string]*tlsv3.Secret {
	t.Helper()
	out := make(map[string]*tlsv3.Secret, len(resources))
	for _, r := range resources {
		var s tlsv3.Secret
		require.NoError(t, r.UnmarshalTo(&s))
		require.NotContains(t, out, s.GetName(), "secret named twice")
		out[s.GetName()] = &s
	}
	return out
}

// names returns the sorted names of secrets.
func names(secrets map[string]*tlsv3.Secret) []string {
	out := make([]string, 0, len(secrets))
	for n := range secrets {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// requireCertificate checks that secret is the tls_certificate of svid:
// its chain is svid's, leaf first, and its key is PKCS#8 PEM of the leaf's
// key.
func requireCertificate(t *testing.T, secret *tlsv3.Secret, svid *x509svid.SVID) {
	t.Helper()
	tc := secret.GetTlsCertificate()
	require.NotNil(t, tc, "secret %q is not a tls_certificate", secret.GetName())
	chain, err := pemutil.ParseCertificates(tc.GetCertificateChain().GetInlineBytes())
	require.NoError(t, err)
	require.Len(t, chain, len(svid.Certificates))
	for i := range chain {
		require.Equal(t, svid.Certificates[i].Raw, chain[i].Raw, "certificate %d of the chain", i)
	}
	got, err := x509svid.ParseRaw(derChain(chain), pkcs8(t, tc.GetPrivateKey().GetInlineBytes()))
	require.NoError(t, err, "the chain and the key must make a valid X509-SVID")
	require.Equal(t, svid.ID, got.ID)
}

// pkcs8 returns the DER of the one PRIVATE KEY PEM block of data.
func pkcs8(t *testing.T, data []byte) []byte {
	t.Helper()
	block, rest := pem.Decode(data)
	require.NotNil(t, block)
	require.Equal(t, "PRIVATE KEY", block.Type)
	require.Empty(t, bytes.TrimSpace(rest))
	_, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	require.NoError(t, err)
	return block.Bytes
}

func derChain(certs []*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, c.Raw...)
	}
	return out
}

// requireRoots checks that secret is a validation_context whose trusted_ca
// is exactly roots.
func requireRoots(t *testing.T, secret *tlsv3.Secret, roots ...*x509.Certificate) {
	t.Helper()
	vc := secret.GetValidationContext()
	require.NotNil(t, vc, "secret %q is not a validation_context", secret.GetName())
	require.Nil(t, vc.GetCustomValidatorConfig())
	got, err := pemutil.ParseCertificates(vc.GetTrustedCa().GetInlineBytes())
	require.NoError(t, err)
	require.Equal(t, rawCerts(roots), rawCerts(got))
}

func rawCerts(certs []*x509.Certificate) [][]byte {
	out := make([][]byte, len(certs))
	for i, c := range certs {
		out[i] = c.Raw
	}
	return out
}

// logSink records a server's logs: the messages, to wait on, and their
// text, to search.
type logSink struct {
	mu      sync.Mutex
	text    bytes.Buffer
	msgs    []string
	changed chan struct{}
}

func newLogSink() *logSink {
	return &logSink{changed: make(chan struct{})}
}

func (s *logSink) handler() slog.Handler {
	return &sinkHandler{sink: s, h: slog.NewTextHandler(&s.text, &slog.HandlerOptions{Level: slog.LevelDebug})}
}

// waitFor waits until msg has been logged n times in all.
func (s *logSink) waitFor(t *testing.T, msg string, n int) {
	t.Helper()
	timeout := time.After(waitTimeout)
	for {
		s.mu.Lock()
		count := 0
		for _, m := range s.msgs {
			if m == msg {
				count++
			}
		}
		changed := s.changed
		s.mu.Unlock()
		if count >= n {
			return
		}
		select {
		case <-changed:
		case <-timeout:
			t.Fatalf("%q was logged %d times, want %d", msg, count, n)
		}
	}
}

// count returns how many times msg has been logged.
func (s *logSink) count(msg string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, m := range s.msgs {
		if m == msg {
			n++
		}
	}
	return n
}

func (s *logSink) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.text.String()
}

type sinkHandler struct {
	sink *logSink
	h    slog.Handler
}

func (h *sinkHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *sinkHandler) Handle(ctx context.Context, r slog.Record) error {
	h.sink.mu.Lock()
	defer h.sink.mu.Unlock()
	h.sink.msgs = append(h.sink.msgs, r.Message)
	close(h.sink.changed)
	h.sink.changed = make(chan struct{})
	return h.h.Handle(ctx, r)
}

func (h *sinkHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &sinkHandler{sink: h.sink, h: h.h.WithAttrs(attrs)}
}

func (h *sinkHandler) WithGroup(name string) slog.Handler {
	return &sinkHandler{sink: h.sink, h: h.h.WithGroup(name)}
}
