package main_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	spiffeworkloadapi "github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"
)

// binDir holds meshca-server and meshca-agent, built once for the
// package.
var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "meshca-agent-e2e-bin-")
	if err != nil {
		panic(err)
	}
	build := exec.Command("go", "build", "-o", dir+string(os.PathSeparator), "github.com/meshca/meshca/cmd/meshca-server", "github.com/meshca/meshca/cmd/meshca-agent")
	build.Stdout, build.Stderr = os.Stdout, os.Stderr
	if err := build.Run(); err != nil {
		panic("building the binaries: " + err.Error())
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// timeout bounds every wait for a process.
const timeout = 60 * time.Second

// proc is a running meshca binary whose JSON log lines are read as they
// come.
type proc struct {
	t      *testing.T
	name   string
	cmd    *exec.Cmd
	mu     sync.Mutex
	lines  []map[string]any
	raw    bytes.Buffer
	more   chan struct{} // closed and replaced at each line
	exited chan error
}

// start runs binary name with args.
func start(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, name), args...)
	stderr, err := cmd.StderrPipe()
	require.NoError(t, err)
	cmd.Stdout = io.Discard
	require.NoError(t, cmd.Start())
	p := &proc{t: t, name: name, cmd: cmd, more: make(chan struct{}), exited: make(chan error, 1)}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			var line map[string]any
			_ = json.Unmarshal(sc.Bytes(), &line)
			p.mu.Lock()
			p.raw.Write(append(sc.Bytes(), '\n'))
			if line != nil {
				p.lines = append(p.lines, line)
			}
			close(p.more)
			p.more = make(chan struct{})
			p.mu.Unlock()
		}
		p.exited <- cmd.Wait()
	}()
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	return p
}

// waitFor waits for a log line with message msg whose attributes hold
// want, and returns it.
func (p *proc) waitFor(msg string, want map[string]string) map[string]any {
	p.t.Helper()
	deadline := time.After(timeout)
	seen := 0
	for {
		p.mu.Lock()
		lines, more := p.lines[seen:], p.more
		seen = len(p.lines)
		p.mu.Unlock()
	next:
		for _, l := range lines {
			if l["msg"] != msg {
				continue
			}
			for k, v := range want {
				if s, _ := l[k].(string); s != v {
					continue next
				}
			}
			return l
		}
		select {
		case <-more:
		case err := <-p.exited:
			p.exited <- err
			p.t.Fatalf("%s exited (%v) before logging %q:\n%s", p.name, err, msg, p.logs())
		case <-deadline:
			p.t.Fatalf("%s did not log %q:\n%s", p.name, msg, p.logs())
		}
	}
}

func (p *proc) logs() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.raw.String()
}

// stop sends SIGTERM and requires a clean exit.
func (p *proc) stop() {
	p.t.Helper()
	require.NoError(p.t, p.cmd.Process.Signal(syscall.SIGTERM))
	select {
	case err := <-p.exited:
		require.NoError(p.t, err, p.logs())
	case <-time.After(timeout):
		p.t.Fatalf("%s did not stop after SIGTERM", p.name)
	}
}

// TestEndToEnd runs meshca-server and meshca-agent as built: a workload
// fetches its SVID over the Workload API with go-spiffe's client, the
// files are written and the command run, the agent is ready; after a
// SIGTERM it exits cleanly and removes its socket; restarted while the
// server is down, it serves the same SVID from its files at once.
func TestEndToEnd(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "data")
	server := start(t, "meshca-server", "--data-dir", dataDir, "--demo", "--listen", "127.0.0.1:0", "--metrics-listen", "off")
	ready := server.waitFor("meshca-server ready", nil)
	addr := ready["address"].(string)

	sockDir, err := os.MkdirTemp("", "ag-e2e-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	socket := filepath.Join(sockDir, "agent.sock")
	certs := filepath.Join(t.TempDir(), "certs")
	marker := filepath.Join(t.TempDir(), "marker.pem")
	demo := "spiffe://meshca.local/ns/default/sa/demo"
	args := []string{
		"--server-address", addr,
		"--trust-bundle-file", filepath.Join(dataDir, "bundle.pem"),
		"--bootstrap-token-file", filepath.Join(dataDir, "demo-token"),
		"--spiffe-id", demo,
		"--socket", socket,
		"--socket-mode", "0660",
		"--files-dir", certs,
		"--files-command", `cp "$MESHCA_CERT_FILE" ` + marker,
		"--health-listen", "127.0.0.1:0",
		"--ttl", "1h",
	}
	agent := start(t, "meshca-agent", args...)
	line := agent.waitFor("meshca-agent ready", map[string]string{"spiffe_id": demo, "socket": socket, "spiffe_id_from": "spiffeID"})
	health := "http://" + line["health_address"].(string)
	info, err := os.Lstat(socket)
	require.NoError(t, err)
	require.Equal(t, fs.ModeSocket|0o660, info.Mode())

	ctx := t.Context()
	svid, err := spiffeworkloadapi.FetchX509SVID(ctx, spiffeworkloadapi.WithAddr("unix://"+socket))
	require.NoError(t, err)
	require.Equal(t, spiffeid.RequireFromString(demo), svid.ID)
	serial := svid.Certificates[0].SerialNumber.Text(16)

	// The files, and the command run after they were written.
	agent.waitFor("certificate files written", map[string]string{"serial": serial})
	agent.waitFor("command run after the files changed", nil)
	onDisk, err := x509svid.Load(filepath.Join(certs, "cert.pem"), filepath.Join(certs, "key.pem"))
	require.NoError(t, err)
	require.Equal(t, svid.Certificates, onDisk.Certificates)
	copied, err := os.ReadFile(marker)
	require.NoError(t, err)
	cert, err := os.ReadFile(filepath.Join(certs, "cert.pem"))
	require.NoError(t, err)
	require.Equal(t, string(cert), string(copied))

	requireHTTP(t, health+"/readyz", http.StatusOK, "ok")
	requireHTTP(t, health+"/healthz", http.StatusOK, "ok")
	requireHTTP(t, health+"/metrics", http.StatusOK, "meshca_agent_svid_expiry_timestamp_seconds "+expiry(svid))

	// Nothing secret reached the log.
	token, err := os.ReadFile(filepath.Join(dataDir, "demo-token"))
	require.NoError(t, err)
	require.NotContains(t, agent.logs(), strings.TrimSpace(string(token)))
	require.NotContains(t, agent.logs(), "PRIVATE KEY")

	agent.stop()
	require.Contains(t, agent.logs(), `"msg":"meshca-agent stopped"`)
	_, err = os.Lstat(socket)
	require.ErrorIs(t, err, fs.ErrNotExist, "the socket is removed")

	// The CA goes down; the agent restarts and serves its SVID at once.
	server.stop()
	again := start(t, "meshca-agent", args...)
	requireHTTP(t, "http://"+again.waitFor("meshca-agent ready", nil)["health_address"].(string)+"/readyz", http.StatusOK, "ok")
	served, err := spiffeworkloadapi.FetchX509SVID(ctx, spiffeworkloadapi.WithAddr("unix://"+socket))
	require.NoError(t, err)
	require.Equal(t, svid.Certificates, served.Certificates)
	again.stop()
}

func TestAgentRefusesBadSetup(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		path := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(path, []byte(content), mode))
		require.NoError(t, os.Chmod(path, mode))
		return path
	}
	token := write("token", "a-bootstrap-token-of-some-length\n", 0o600)
	base := []string{"--socket", filepath.Join(dir, "a.sock"), "--bootstrap-token-file", token, "--spiffe-id", "spiffe://meshca.local/ns/a/sa/b"}
	for _, tt := range []struct {
		name string
		args []string
		want string
	}{
		{"unknown config field", []string{"--config", write("unknown.yaml", "serverAddress: x\nsocketPath: y\n", 0o600)}, `unknown field "socketPath"`},
		{"bad duration", []string{"--config", write("dur.yaml", "ttl: forever\n", 0o600)}, `duration "forever"`},
		{"bad socket mode", []string{"--config", write("mode.yaml", "socketMode: \"rw\"\n", 0o600)}, `file mode "rw": want octal permissions`},
		{"no trust bundle", nil, "config: trustBundleFile is required"},
		{"trust bundle missing", []string{"--trust-bundle-file", filepath.Join(dir, "none.pem")}, "trustBundleFile: x509bundle: unable to load X.509 bundle file"},
		{"argument", []string{"extra"}, `unknown command "extra"`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cmd := exec.Command(filepath.Join(binDir, "meshca-agent"), append(append([]string{}, base...), tt.args...)...)
			out, err := cmd.CombinedOutput()
			var exit *exec.ExitError
			require.ErrorAs(t, err, &exit, string(out))
			require.Equal(t, 1, exit.ExitCode())
			require.Contains(t, string(out), tt.want)
		})
	}
}

func requireHTTP(t *testing.T, url string, code int, contains string) {
	t.Helper()
	resp, err := http.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, code, resp.StatusCode, string(body))
	require.Contains(t, string(body), contains)
}

// expiry returns the SVID's NotAfter as Prometheus prints the gauge.
func expiry(svid *x509svid.SVID) string {
	return strconv.FormatFloat(float64(svid.Certificates[0].NotAfter.Unix()), 'g', -1, 64)
}
