package main_test

import (
	"bufio"
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
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
	securityv1alpha1 "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/internal/testlog"
	linkerdpb "github.com/meshca/meshca/proto/linkerd/identity"
	"github.com/meshca/meshca/testca"
)

// binDir holds meshca-server and meshctl, built once for the package.
var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "meshca-e2e-bin-")
	if err != nil {
		panic(err)
	}
	build := exec.Command("go", "build", "-o", dir+string(os.PathSeparator), "github.com/meshca/meshca/cmd/meshca-server", "github.com/meshca/meshca/cmd/meshctl")
	build.Stdout, build.Stderr = os.Stdout, os.Stderr
	if err := build.Run(); err != nil {
		panic("building the binaries: " + err.Error())
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// serverProc is a meshca-server process.
type serverProc struct {
	t       *testing.T
	cmd     *exec.Cmd
	addr    string
	metrics string
	stdout  *testlog.Buffer
	logs    *testlog.Buffer
	exited  chan error
}

type readyLine struct {
	Msg            string `json:"msg"`
	Address        string `json:"address"`
	MetricsAddress string `json:"metrics_address"`
	HealthAddress  string `json:"health_address"`
	RootSerial     string `json:"root_serial"`
}

// startServer runs meshca-server with args on free loopback ports and
// waits until it says it is ready.
func startServer(t *testing.T, args ...string) (*serverProc, readyLine) {
	t.Helper()
	return startServerEnv(t, nil, args...)
}

// startServerEnv is startServer with extra environment variables.
func startServerEnv(t *testing.T, env []string, args ...string) (*serverProc, readyLine) {
	t.Helper()
	args = append([]string{"--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"}, args...)
	cmd := exec.Command(filepath.Join(binDir, "meshca-server"), args...)
	cmd.Env = append(os.Environ(), env...)
	stdout := &testlog.Buffer{}
	cmd.Stdout = stdout
	stderr, err := cmd.StderrPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	p := &serverProc{t: t, cmd: cmd, stdout: stdout, logs: &testlog.Buffer{}, exited: make(chan error, 1)}
	ready := make(chan readyLine, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			line := sc.Text()
			_, _ = p.logs.Write([]byte(line + "\n"))
			var r readyLine
			if json.Unmarshal([]byte(line), &r) == nil && r.Msg == "meshca-server ready" {
				ready <- r
			}
		}
		p.exited <- cmd.Wait()
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
	})
	select {
	case r := <-ready:
		p.addr, p.metrics = r.Address, r.MetricsAddress
		return p, r
	case err := <-p.exited:
		t.Fatalf("meshca-server exited before ready: %v\n%s", err, p.logs.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("meshca-server not ready after 30s:\n%s", p.logs.String())
	}
	panic("unreachable")
}

// stop sends SIGTERM and requires a clean exit.
func (p *serverProc) stop() {
	p.t.Helper()
	require.NoError(p.t, p.cmd.Process.Signal(syscall.SIGTERM))
	select {
	case err := <-p.exited:
		require.NoError(p.t, err, p.logs.String())
	case <-time.After(20 * time.Second):
		p.t.Fatalf("meshca-server did not stop within 20s of SIGTERM")
	}
	require.Contains(p.t, p.logs.String(), `"msg":"stopped"`)
}

// meshctl runs meshctl and returns its stdout, stderr and error.
func meshctl(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "meshctl"), args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.String(), stderr.String(), err
}

func TestEndToEnd(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "data")
	out := t.TempDir()
	srv, ready := startServer(t, "--data-dir", dataDir, "--demo", "--health-listen", "127.0.0.1:0")
	bundle := filepath.Join(dataDir, "bundle.pem")

	// Kubelet-style probe: plain-text gRPC health.
	healthConn, err := grpc.NewClient(ready.HealthAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer healthConn.Close()
	hc, err := healthpb.NewHealthClient(healthConn).Check(t.Context(), &healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	require.Equal(t, healthpb.HealthCheckResponse_SERVING, hc.Status)
	token := filepath.Join(dataDir, "demo-token")
	demo := "spiffe://meshca.local/ns/default/sa/demo"

	// The banner tells a newcomer what to paste.
	require.Eventually(t, func() bool { return strings.Contains(srv.stdout.String(), "meshctl issue") }, 5*time.Second, 10*time.Millisecond)
	require.Contains(t, srv.stdout.String(), "--token-file "+token)
	require.Contains(t, srv.stdout.String(), "trust domain  meshca.local")

	// Issue with the demo token, then renew with the issued certificate.
	stdout, stderr, err := meshctl(t, "issue", "--server", srv.addr, "--ca-bundle", bundle,
		"--token-file", token, "--spiffe-id", demo, "--out-dir", out)
	require.NoError(t, err, stderr)
	require.Contains(t, stdout, "issued "+demo)
	info, err := os.Stat(filepath.Join(out, "svid-key.pem"))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), info.Mode().Perm())
	first, err := x509svid.Load(filepath.Join(out, "svid.pem"), filepath.Join(out, "svid-key.pem"))
	require.NoError(t, err)

	stdout, stderr, err = meshctl(t, "issue", "--server", srv.addr, "--ca-bundle", bundle,
		"--cert", filepath.Join(out, "svid.pem"), "--key", filepath.Join(out, "svid-key.pem"), "--out-dir", out, "-o", "json")
	require.NoError(t, err, stderr)
	var renewed struct {
		SpiffeID string `json:"spiffeID"`
		Serial   string `json:"serial"`
	}
	require.NoError(t, json.Unmarshal([]byte(stdout), &renewed))
	require.Equal(t, demo, renewed.SpiffeID)
	require.NotEqual(t, first.Certificates[0].SerialNumber.Text(16), renewed.Serial)

	// openssl verifies the renewed chain with the bundle meshctl wrote.
	osslOut, err := opensslVerify(filepath.Join(out, "svid.pem"), filepath.Join(out, "bundle.pem"))
	require.NoError(t, err, osslOut)

	// inspect reads it back for a person, and as data.
	stdout, stderr, err = meshctl(t, "inspect", filepath.Join(out, "svid.pem"), "-o", "json")
	require.NoError(t, err, stderr)
	require.Contains(t, stdout, demo)
	require.Contains(t, stdout, renewed.Serial)

	// bundle serves the SPIFFE JSON form of the same roots.
	stdout, stderr, err = meshctl(t, "bundle", "--server", srv.addr, "--ca-bundle", bundle, "--format", "spiffe")
	require.NoError(t, err, stderr)
	sb, err := spiffebundle.Parse(spiffeid.RequireTrustDomainFromString("meshca.local"), []byte(stdout))
	require.NoError(t, err)
	require.Len(t, sb.X509Authorities(), 1)
	require.Equal(t, ready.RootSerial, sb.X509Authorities()[0].SerialNumber.Text(16))

	// A token asking for another identity is refused, and says why.
	_, stderr, err = meshctl(t, "issue", "--server", srv.addr, "--ca-bundle", bundle,
		"--token-file", token, "--spiffe-id", "spiffe://meshca.local/ns/kube-system/sa/admin", "--out-dir", t.TempDir())
	require.Error(t, err)
	require.Contains(t, stderr, "code = PermissionDenied")
	require.Contains(t, stderr, `but the credential is for "spiffe://meshca.local/ns/default/sa/demo"`)

	// Istio's CA API is on by default and takes the demo token: a PEM
	// chain, leaf first, the roots last. Linkerd's needs Kubernetes mode.
	conn := dialServer(t, srv.addr, bundle)
	istioKey := testca.NewKey(t)
	demoID := spiffeid.RequireFromString(demo)
	istioResp, err := securityv1alpha1.NewIstioCertificateServiceClient(conn).CreateCertificate(
		metadata.AppendToOutgoingContext(t.Context(), "authorization", "Bearer "+strings.TrimSpace(string(mustRead(t, token)))),
		&securityv1alpha1.IstioCertificateRequest{
			Csr:              string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: testca.CreateCSR(t, istioKey, demo)})),
			ValidityDuration: 600,
		})
	require.NoError(t, err)
	require.Len(t, istioResp.CertChain, 3)
	istioSVID, err := x509svid.Parse([]byte(strings.Join(istioResp.CertChain[:2], "")), pemKey(t, istioKey))
	require.NoError(t, err)
	require.Equal(t, demoID, istioSVID.ID)
	require.Equal(t, string(mustRead(t, bundle)), istioResp.CertChain[2])
	_, err = linkerdpb.NewIdentityClient(conn).Certify(t.Context(), &linkerdpb.CertifyRequest{})
	require.Equal(t, codes.Unimplemented, status.Code(err), "Linkerd's API is off outside Kubernetes mode")
	srv.logs.WaitFor(t, `"istio_api":true,"linkerd_api":false`)

	// bench runs against it and reports server figures.
	stdout, stderr, err = meshctl(t, "bench", "--server", srv.addr, "--ca-bundle", bundle, "--token-file", token,
		"--spiffe-id", demo, "-c", "2", "-d", "1s", "--csrs", "8", "--metrics-url", "http://"+srv.metrics+"/metrics",
		"--transport-probe", "300ms")
	require.NoError(t, err, stderr)
	require.Contains(t, stdout, " 0 errors")
	require.Contains(t, stdout, "\nefficiency ")
	require.Contains(t, stdout, "\ntransport  ")
	require.Contains(t, stdout, "\nceiling    ")

	// Nothing secret reached the log.
	tokenBytes, err := os.ReadFile(token)
	require.NoError(t, err)
	require.NotContains(t, srv.logs.String(), strings.TrimSpace(string(tokenBytes)))
	require.NotContains(t, srv.logs.String(), "PRIVATE KEY")

	srv.stop()

	// A restart keeps the same root and trust bundle; nothing needs
	// deleting, and the state file is private.
	bundleBefore, err := os.ReadFile(bundle)
	require.NoError(t, err)
	srv2, ready2 := startServer(t, "--data-dir", dataDir, "--demo")
	require.Equal(t, ready.RootSerial, ready2.RootSerial)
	bundleAfter, err := os.ReadFile(bundle)
	require.NoError(t, err)
	require.Equal(t, bundleBefore, bundleAfter)
	info, err = os.Stat(filepath.Join(dataDir, "authorities.json"))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), info.Mode().Perm())
	// The certificate issued before the restart still renews.
	_, stderr, err = meshctl(t, "issue", "--server", srv2.addr, "--ca-bundle", bundle,
		"--cert", filepath.Join(out, "svid.pem"), "--key", filepath.Join(out, "svid-key.pem"), "--out-dir", out)
	require.NoError(t, err, stderr)
	srv2.stop()
}

// dialServer connects to meshca-server over TLS, verifying its SVID
// against the bundle file.
func dialServer(t *testing.T, addr, bundlePath string) *grpc.ClientConn {
	t.Helper()
	bundle, err := x509bundle.Load(td, bundlePath)
	require.NoError(t, err)
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(
		tlsconfig.TLSClientConfig(bundle, tlsconfig.AuthorizeID(spiffeid.RequireFromPath(td, "/meshca/server"))))))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return conn
}

// pemKey returns key as a PKCS#8 PEM block.
func pemKey(t *testing.T, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	require.NoError(t, err)
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

func TestServerRefusesBadSetup(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		path := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(path, []byte(content), mode))
		require.NoError(t, os.Chmod(path, mode))
		return path
	}
	openDataDir := filepath.Join(dir, "open")
	require.NoError(t, os.Mkdir(openDataDir, 0o755))
	leakyDataDir := filepath.Join(dir, "leaky")
	require.NoError(t, os.Mkdir(leakyDataDir, 0o700))
	write("leaky/authorities.json", "{}", 0o644)

	for _, tt := range []struct {
		name string
		args []string
		want string
	}{
		{"unknown config field", []string{"--config", write("unknown.yaml", "trustDomain: a.example\nlisten: x\n", 0o600)}, `unknown field "listen"`},
		{"config not YAML", []string{"--config", write("broken.yaml", "trustDomain: [\n", 0o600)}, "config: " + filepath.Join(dir, "broken.yaml")},
		{"bad trust domain", []string{"--trust-domain", "Not A Domain"}, "config: trustDomain: trust domain characters are limited"},
		{"bad duration", []string{"--config", write("dur.yaml", "leaf:\n  maxTTL: forever\n", 0o600)}, `duration "forever"`},
		{"default over max", []string{"--config", write("ttl.yaml", "leaf:\n  defaultTTL: 48h\n", 0o600)}, "leaf.defaultTTL 48h0m0s is longer than the maximum 24h0m0s"},
		{"bad mode", []string{"--config", write("mode.yaml", "authority:\n  mode: hsm\n", 0o600)}, `authority.mode "hsm": want "selfsigned", "files" or "vault"`},
		{"intermediate as short as a leaf", []string{"--config", write("inter.yaml", "leaf:\n  maxTTL: 1h\nauthority:\n  intermediateTTL: 90m\n", 0o600)}, "authority.intermediateTTL 1h30m0s is shorter than twice the longest leaf (1h0m0s)"},
		{"files mode without files", []string{"--config", write("files.yaml", "authority:\n  mode: files\n", 0o600)}, "rootCert, caCert and caKey are required"},
		{"data dir open to others", []string{"--data-dir", openDataDir}, "has mode 0755; it holds CA keys, chmod 700 it"},
		{"state file readable by others", []string{"--data-dir", leakyDataDir}, "is accessible by group or others; chmod 600 it"},
		{"token file readable by others", []string{"--data-dir", filepath.Join(dir, "d1"), "--bootstrap-tokens", write("tokens.yaml", "tokens: []\n", 0o644)}, "chmod 600 it"},
		{"argument", []string{"extra"}, `unknown command "extra"`},
		{"linkerd outside Kubernetes mode", []string{"--config", write("linkerd.yaml", "linkerd:\n  enabled: true\n", 0o600)}, "linkerd.enabled needs kubernetes.enabled: Linkerd's proxies prove their identity with service-account tokens only"},
		{"audience shared by two APIs", []string{"--config", write("shared.yaml", "kubernetes:\n  enabled: true\n  namespace: x\n  podName: p\n  tokenAudiences: [meshca, identity.l5d.io]\n", 0o600)}, `kubernetes.tokenAudiences and linkerd.audiences share the audience "identity.l5d.io": a token for one API would be a credential on the other; give each its own`},
		{"bad Linkerd control plane namespace", []string{"--config", write("cpns.yaml", "linkerd:\n  controlPlaneNamespace: Linkerd.System\n", 0o600)}, `linkerd.controlPlaneNamespace "Linkerd.System" is not a namespace name`},
		{"empty Istio audience", []string{"--config", write("aud.yaml", "istio:\n  audiences: [\"\"]\n", 0o600)}, "istio.audiences has an empty audience"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"--listen", "127.0.0.1:0", "--metrics-listen", "off"}, tt.args...)
			cmd := exec.Command(filepath.Join(binDir, "meshca-server"), args...)
			cmd.Dir = dir
			out, err := cmd.CombinedOutput()
			var exit *exec.ExitError
			require.ErrorAs(t, err, &exit, string(out))
			require.Equal(t, 1, exit.ExitCode())
			require.Contains(t, string(out), tt.want)
		})
	}
}

// opensslVerify checks the chain in chainPath (leaf first) with openssl,
// trusting the roots in bundlePath.
func opensslVerify(chainPath, bundlePath string) (string, error) {
	chain, err := os.ReadFile(chainPath)
	if err != nil {
		return "", err
	}
	end := []byte("-----END CERTIFICATE-----\n")
	i := bytes.Index(chain, end)
	if i < 0 {
		return "", fmt.Errorf("%s holds no certificate", chainPath)
	}
	dir, err := os.MkdirTemp("", "meshca-openssl-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(dir)
	leaf, rest := filepath.Join(dir, "leaf.pem"), filepath.Join(dir, "rest.pem")
	if err := os.WriteFile(leaf, chain[:i+len(end)], 0o600); err != nil {
		return "", err
	}
	if err := os.WriteFile(rest, chain[i+len(end):], 0o600); err != nil {
		return "", err
	}
	out, err := exec.Command("openssl", "verify", "-CAfile", bundlePath, "-untrusted", rest, leaf).CombinedOutput()
	return string(out), err
}
