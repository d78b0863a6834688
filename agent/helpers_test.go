package agent_test

import (
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"

	"github.com/meshca/meshca/agent"
	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/internal/server"
)

var (
	td       = spiffeid.RequireTrustDomainFromString("example.org")
	webID    = spiffeid.RequireFromPath(td, "/ns/shop/sa/web")
	dbID     = spiffeid.RequireFromPath(td, "/ns/shop/sa/db")
	serverID = spiffeid.RequireFromPath(td, "/meshca/server")
)

// tokens are the bootstrap tokens of the test CA.
var tokens = map[spiffeid.ID]string{
	webID: "web-bootstrap-token-0123456789",
	dbID:  "db-bootstrap-token-0123456789",
}

// timeout bounds every real-time wait: a hang fails instead of blocking.
const timeout = 30 * time.Second

// meshca is meshca's real server, in-process on loopback.
type meshca struct {
	ca   *ca.CA
	addr string
	g    *grpc.Server
	done chan struct{}
	once sync.Once
}

// startMeshca starts meshca's real CA and server with bootstrap tokens for
// webID and dbID; opts are added to the gRPC server's options.
func startMeshca(t *testing.T, opts ...grpc.ServerOption) *meshca {
	t.Helper()
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: td})
	require.NoError(t, err)
	c, err := ca.New(set, ca.Options{})
	require.NoError(t, err)
	file := identity.TokenFile{}
	for id, token := range tokens {
		file.Tokens = append(file.Tokens, identity.TokenFileEntry{ID: id.String(), Token: token})
	}
	static, err := identity.NewStaticTokens(file, td)
	require.NoError(t, err)
	srv, err := server.New(server.Options{
		CA:            c,
		Authenticator: identity.Chain(static, identity.NewSVIDAuthenticator(td, c, nil)),
		Policy:        identity.Policy{TrustDomain: td, Reserved: []spiffeid.ID{serverID}},
		Logger:        slog.New(slog.DiscardHandler),
		Registerer:    prometheus.NewRegistry(),
	})
	require.NoError(t, err)
	serving, err := server.NewServingCert(c, serverID, nil, nil, 24*time.Hour, nil)
	require.NoError(t, err)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	m := &meshca{ca: c, addr: lis.Addr().String(), g: srv.GRPCServer(serving.TLSConfig(), opts...), done: make(chan struct{})}
	go func() {
		defer close(m.done)
		_ = m.g.Serve(lis)
	}()
	t.Cleanup(m.stop)
	return m
}

// stop stops the server: the CA is unreachable from now on.
func (m *meshca) stop() {
	m.once.Do(func() {
		m.g.Stop()
		<-m.done
	})
}

// prepareRoot adds a new root to the CA's bundle, as `meshctl root
// prepare` does, and returns the new bundle's sequence.
func (m *meshca) prepareRoot(t *testing.T) uint64 {
	t.Helper()
	root, err := ca.NewRoot(ca.AuthorityOptions{TrustDomain: td})
	require.NoError(t, err)
	set := m.ca.Authorities().Clone()
	set.Sequence++
	set.Roots = append(set.Roots, ca.Root{Authority: root, State: ca.RootPrepared, Since: time.Now(), BundleSequence: set.Sequence})
	require.NoError(t, m.ca.SetAuthorities(set))
	return set.Sequence
}

// runningAgent is an agent running until the test ends or stop is called.
type runningAgent struct {
	agent  *agent.Agent
	socket string // the Workload API socket's path
	addr   string // its address for go-spiffe's client
	logs   *logRecorder
	cancel context.CancelFunc
	done   chan error
}

// socketDir returns a new short directory for sockets: a Unix socket path
// has at most 107 bytes, and t.TempDir's can be longer.
func socketDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "ag-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// agentConfig returns a config for id against m, with its bootstrap token
// and a new socket.
func agentConfig(t *testing.T, m *meshca, id spiffeid.ID) agent.Config {
	t.Helper()
	bundle, _ := m.ca.Bundle()
	token := tokens[id]
	return agent.Config{
		ID:            id,
		ServerAddress: m.addr,
		TrustBundle:   bundle,
		Token:         func(context.Context) (string, error) { return token, nil },
		SocketPath:    filepath.Join(socketDir(t), "agent.sock"),
	}
}

// startAgent runs an agent for cfg and waits until it listens.
func startAgent(t *testing.T, cfg agent.Config) *runningAgent {
	t.Helper()
	logs := &logRecorder{changed: make(chan struct{})}
	cfg.Logger = slog.New(logs.handler())
	a, err := agent.New(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	r := &runningAgent{agent: a, socket: cfg.SocketPath, addr: "unix://" + cfg.SocketPath, logs: logs, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- a.Run(ctx) }()
	select {
	case <-a.Listening():
	case err := <-r.done:
		t.Fatalf("the agent stopped before listening: %v", err)
	case <-time.After(timeout):
		t.Fatal("the agent is not listening")
	}
	t.Cleanup(func() { r.stop(t) })
	return r
}

// stop stops the agent and requires a clean exit.
func (r *runningAgent) stop(t *testing.T) {
	t.Helper()
	r.cancel()
	select {
	case err, ok := <-r.done:
		if ok {
			require.NoError(t, err)
			close(r.done)
		}
	case <-time.After(timeout):
		t.Fatal("the agent did not stop")
	}
}

// logRecorder records what the agent logs, and signals each record.
type logRecorder struct {
	mu      sync.Mutex
	records []logRecord
	changed chan struct{} // closed and replaced at each record
}

type logRecord struct {
	level slog.Level
	msg   string
	attrs map[string]string
}

func (l *logRecorder) handler() slog.Handler { return recordingHandler{logs: l} }

// waitFor waits until a record with message msg for which match (nil: any)
// holds has been logged, and returns it.
func (l *logRecorder) waitFor(t *testing.T, msg string, match func(logRecord) bool) logRecord {
	t.Helper()
	deadline := time.After(timeout)
	seen := 0
	for {
		l.mu.Lock()
		changed, records := l.changed, l.records[seen:]
		seen = len(l.records)
		l.mu.Unlock()
		for _, r := range records {
			if r.msg == msg && (match == nil || match(r)) {
				return r
			}
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("%q was not logged", msg)
		}
	}
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
	close(h.logs.changed)
	h.logs.changed = make(chan struct{})
	return nil
}

func (h recordingHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return recordingHandler{logs: h.logs, attrs: append(slices.Clip(h.attrs), attrs...)}
}

func (h recordingHandler) WithGroup(string) slog.Handler { return h }

func testContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	return ctx
}
