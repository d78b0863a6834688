package istio_test

import (
	"bufio"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/meshca/meshca/internal/securefile"
)

// binDir holds meshca-server and meshctl, built from this repository for
// the package.
var binDir string

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "meshca-istio-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	// Built in the main module (two directories up), with the build cache
	// the rest of the repository's tests share.
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	binDir = dir
	build := exec.Command("go", "build", "-o", dir+string(os.PathSeparator), "./cmd/meshca-server", "./cmd/meshctl")
	build.Dir = root
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "building meshca-server and meshctl in %s: %v\n", root, err)
		return 1
	}
	return m.Run()
}

// trustDomain is Istio's default trust domain.
var trustDomain = spiffeid.RequireTrustDomainFromString("cluster.local")

// meshca is a running meshca-server with one bootstrap token.
type meshca struct {
	// Addr is the gRPC API's address (CA_ADDR), 127.0.0.1:<port>.
	Addr string
	// RootCertPath is the PEM trust bundle the server keeps in its data
	// directory: what istio-agent is given as the CA's root certificate.
	RootCertPath string
	// Bundle is the same roots, read with go-spiffe.
	Bundle *x509bundle.Bundle
	// TokenPath is a file holding the bootstrap token, mode 0600, as the
	// projected service-account token is for istio-agent.
	TokenPath string
	// Token is the bootstrap token for TokenID.
	Token   string
	TokenID spiffeid.ID
	// MaxTTL is the longest leaf the server issues.
	MaxTTL time.Duration
	// AdminSocket is the admin API's Unix socket, for meshctl root.
	AdminSocket string

	logs *lockedBuffer
}

// readyLine is the log line meshca-server writes once it serves.
type readyLine struct {
	Msg           string `json:"msg"`
	Address       string `json:"address"`
	HealthAddress string `json:"health_address"`
	Bundle        string `json:"bundle"`
	AdminSocket   string `json:"admin_socket"`
}

// startMeshca starts meshca-server for trustDomain on loopback, with a
// bootstrap token for spiffe://cluster.local/ns/<ns>/sa/<sa>, and waits
// until its gRPC health says SERVING. The server is killed when the test
// ends; its logs are printed if the test failed.
func startMeshca(t *testing.T, ns, sa string) *meshca {
	t.Helper()
	dir := t.TempDir()
	m := &meshca{
		TokenPath: filepath.Join(dir, "istio-token"),
		Token:     randomToken(t),
		TokenID:   spiffeid.RequireFromSegments(trustDomain, "ns", ns, "sa", sa),
		MaxTTL:    2 * time.Hour,
		logs:      &lockedBuffer{},
	}
	require.NoError(t, securefile.WriteFile(m.TokenPath, []byte(m.Token+"\n"), 0o600))

	// The token file holds only the token's hash.
	sum := sha256.Sum256([]byte(m.Token))
	tokens := filepath.Join(dir, "tokens.yaml")
	require.NoError(t, securefile.WriteFile(tokens, fmt.Appendf(nil,
		"tokens:\n- id: %s\n  sha256: %s\n", m.TokenID, hex.EncodeToString(sum[:])), 0o600))

	config := filepath.Join(dir, "meshca.yaml")
	require.NoError(t, os.WriteFile(config, fmt.Appendf(nil, `trustDomain: %s
listenAddress: 127.0.0.1:0
healthAddress: 127.0.0.1:0
metricsAddress: "off"
dataDir: %s
bootstrapTokens: %s
leaf:
  defaultTTL: 1h
  maxTTL: %s
`, trustDomain.Name(), filepath.Join(dir, "data"), tokens, m.MaxTTL), 0o600))

	cmd := exec.Command(filepath.Join(binDir, "meshca-server"), "--config", config)
	stderr, err := cmd.StderrPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	ready := make(chan readyLine, 1)
	exited := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			line := sc.Text()
			_, _ = m.logs.Write([]byte(line + "\n"))
			var r readyLine
			if json.Unmarshal([]byte(line), &r) == nil && r.Msg == "meshca-server ready" {
				ready <- r
			}
		}
		exited <- cmd.Wait()
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("meshca-server log:\n%s", m.logs.String())
		}
	})

	var r readyLine
	select {
	case r = <-ready:
	case err := <-exited:
		exited <- err
		t.Fatalf("meshca-server exited before it was ready: %v", err)
	case <-time.After(time.Minute):
		// A guard against a hung start, not a timing assertion.
		t.Fatal("meshca-server was not ready within a minute")
	}
	m.Addr, m.RootCertPath, m.AdminSocket = r.Address, r.Bundle, r.AdminSocket
	m.Bundle, err = x509bundle.Load(trustDomain, m.RootCertPath)
	require.NoError(t, err)

	// Wait for health the way a kubelet probe sees it.
	conn, err := grpc.NewClient(r.HealthAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	resp, err := healthpb.NewHealthClient(conn).Check(t.Context(), &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
	require.NoError(t, err)
	require.Equal(t, healthpb.HealthCheckResponse_SERVING, resp.Status)
	return m
}

// prepareRoot runs `meshctl root prepare`: a new root joins the trust
// bundle, signing nothing yet. It returns the new root's serial (hex).
func (m *meshca) prepareRoot(t *testing.T) string {
	t.Helper()
	out, err := exec.Command(filepath.Join(binDir, "meshctl"), "root", "prepare", "--admin-socket", m.AdminSocket).CombinedOutput()
	require.NoError(t, err, "%s", out)
	match := regexp.MustCompile(`root ([0-9a-f]+) prepared`).FindSubmatch(out)
	require.NotNil(t, match, "meshctl root prepare said:\n%s", out)
	return string(match[1])
}

// requireNoSecretsLogged checks that the server logged neither the token
// nor a private key.
func (m *meshca) requireNoSecretsLogged(t *testing.T) {
	t.Helper()
	logs := m.logs.String()
	require.NotContains(t, logs, m.Token)
	require.NotContains(t, logs, "PRIVATE KEY")
}

// randomToken returns a bootstrap token of 64 hex digits.
func randomToken(t *testing.T) string {
	b := make([]byte, 32)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return hex.EncodeToString(b)
}

// auditLine waits for the server's audit line of the certificate with
// serial, and returns it.
func (m *meshca) auditLine(t *testing.T, serial *big.Int) map[string]any {
	t.Helper()
	want := serial.Text(16)
	// A guard against a hang, not a timing assertion.
	guard := time.After(time.Minute)
	for {
		logs, changed := m.logs.snapshot()
		for line := range strings.Lines(logs) {
			var entry map[string]any
			if json.Unmarshal([]byte(line), &entry) == nil && entry["audit"] == true && entry["serial"] == want {
				return entry
			}
		}
		select {
		case <-changed:
		case <-guard:
			t.Fatalf("no audit line for serial %s in:\n%s", want, logs)
		}
	}
}

// lockedBuffer is a buffer written by a process while the test reads it.
type lockedBuffer struct {
	mu      sync.Mutex
	buf     strings.Builder
	changed chan struct{} // closed on the next write
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.changed != nil {
		close(b.changed)
		b.changed = nil
	}
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	s, _ := b.snapshot()
	return s
}

// snapshot returns what was written so far, and a channel closed on the
// next write.
func (b *lockedBuffer) snapshot() (string, <-chan struct{}) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.changed == nil {
		b.changed = make(chan struct{})
	}
	return b.buf.String(), b.changed
}
