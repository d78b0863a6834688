package vaulttest

import (
	"github.com/meshca/meshca/internal/testproc"

	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"

	"github.com/meshca/meshca/internal/pemutil"
)

const (
	// AssetsEnv names the folder holding the vault binary (scripts/vault.sh
	// fills it); unset, ~/.cache/meshca/vault.
	AssetsEnv = "MESHCA_VAULT_ASSETS"

	// SkipEnv, set to 1, skips the tests that need a Vault server instead
	// of failing them when the binary is missing. CI never sets it.
	SkipEnv = "MESHCA_SKIP_VAULT"
)

const (
	startTimeout = 2 * time.Minute // a loaded CI machine running -race tests
	stopGrace    = 10 * time.Second
	callTimeout  = 30 * time.Second
	logLines     = 40
	startTries   = 3 // a free port is picked, then bound: another may win
)

// Server is a running Vault dev server on 127.0.0.1.
type Server struct {
	// Addr is the server's URL: http://127.0.0.1:<port>, or https:// with
	// WithTLS.
	Addr string

	// RootToken is the root token, random for each server.
	RootToken string

	// CAFile, with WithTLS, holds the CA certificate that the server's
	// serving certificate chains to; empty otherwise.
	CAFile string

	// Client reaches the server with RootToken. It must not be given
	// another token (Clone it first).
	Client *vault.Client

	opts      options
	bin       string
	dir       string
	listen    string
	unsealKey string

	mu       sync.Mutex // guards proc
	proc     *testproc.Process
	stopOnce sync.Once
}

// Option configures a server of Start.
type Option func(*options)

type options struct {
	tls bool
}

// WithTLS serves HTTPS (vault server -dev-tls) with a certificate for
// 127.0.0.1 under a CA of its own, written to CAFile. Such a server
// cannot be restarted: dev mode makes a new CA at every start.
func WithTLS() Option { return func(o *options) { o.tls = true } }

// Start starts a server of the test's own and stops it, removing its
// files, when the test ends. It fails the test when the binary is
// missing, and skips it only when SkipEnv is set to 1.
func Start(t testing.TB, opts ...Option) *Server {
	t.Helper()
	skipIfOptedOut(t)
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	s, err := start(o, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("vaulttest: the server's log, as the test failed:%s", s.current().Tail(logLines))
		}
		s.stop()
	})
	return s
}

// Shared is one server shared by the tests of a package: declare one as a
// package variable, call Run from TestMain, and Server from each test. The
// server starts when a test first asks for it, so a run that selects no
// such test starts nothing. Safe for parallel tests.
type Shared struct {
	shared testproc.Shared[*Server]
}

// Run runs the package's tests (m.Run) and then stops the shared server,
// if one was started. It returns m.Run's exit code.
func (s *Shared) Run(m *testing.M) int {
	return s.shared.Run(m, (*Server).stop)
}

// Server is the shared server, started on the first call. It fails the
// test when the server cannot start (every test that asks fails with the
// same reason) and skips it only when SkipEnv is set to 1. Tests must not
// Stop or Restart it.
func (s *Shared) Server(t testing.TB) *Server {
	t.Helper()
	skipIfOptedOut(t)
	return s.shared.Get(t, "vaulttest: Shared.Server called outside Shared.Run: add `func TestMain(m *testing.M) { vault.Run(m) }` to the package's tests",
		func(logf func(string, ...any)) (*Server, error) { return start(options{}, logf) })
}

func skipIfOptedOut(t testing.TB) {
	t.Helper()
	if os.Getenv(SkipEnv) == "1" {
		t.Skip("vaulttest: " + SkipEnv + "=1: skipping a test that needs a real Vault server")
	}
}

// binary returns the path of the vault binary, or an error that says how
// to get it.
func binary() (string, error) {
	dir := os.Getenv(AssetsEnv)
	if dir == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("vaulttest: %s is not set and there is no home folder: %w", AssetsEnv, err)
		}
		dir = filepath.Join(home, ".cache", "meshca", "vault")
	}
	bin := filepath.Join(dir, "vault")
	if info, err := os.Stat(bin); err != nil || info.IsDir() || info.Mode()&0o111 == 0 {
		return "", fmt.Errorf("vaulttest: vault not found in %s (%s): run scripts/vault.sh (or make vault) to build it, "+
			"or set %s=1 to skip the tests that need a Vault server", dir, AssetsEnv, SkipEnv)
	}
	return bin, nil
}

// errPortTaken means the server could not bind the port picked as free.
var errPortTaken = errors.New("vaulttest: the picked port was taken")

// start starts a server, trying again with a new port when one was taken
// between picking and binding it.
func start(o options, logf func(format string, args ...any)) (*Server, error) {
	bin, err := binary()
	if err != nil {
		return nil, err
	}
	for try := 1; ; try++ {
		began := time.Now()
		s, err := startOnce(o, bin)
		if err == nil {
			logf("vaulttest: Vault ready at %s in %s", s.Addr, time.Since(began).Round(time.Millisecond))
			return s, nil
		}
		if !errors.Is(err, errPortTaken) || try == startTries {
			return nil, err
		}
		logf("vaulttest: %v; trying again with another port", err)
	}
}

func startOnce(o options, bin string) (_ *Server, err error) {
	dir, err := os.MkdirTemp("", "vaulttest-")
	if err != nil {
		return nil, fmt.Errorf("vaulttest: creating a temporary folder: %w", err)
	}
	s := &Server{opts: o, bin: bin, dir: dir}
	defer func() {
		if err != nil {
			logs := s.proc.Tail(logLines)
			if strings.Contains(logs, "address already in use") {
				err = fmt.Errorf("%w: %w", errPortTaken, err)
			}
			s.stop()
			err = fmt.Errorf("%w%s", err, logs)
		}
	}()
	// Storage in files, so that a restarted server holds what it held.
	config := fmt.Sprintf("storage \"file\" {\n  path = %q\n}\ndisable_mlock = true\n", filepath.Join(dir, "data"))
	if err := os.WriteFile(filepath.Join(dir, "config.hcl"), []byte(config), 0o600); err != nil {
		return nil, fmt.Errorf("vaulttest: writing the config: %w", err)
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	s.listen = "127.0.0.1:" + strconv.Itoa(port)
	s.Addr = "http://" + s.listen
	raw := make([]byte, 16)
	if _, err := rand.Read(raw); err != nil {
		return nil, fmt.Errorf("vaulttest: generating the root token: %w", err)
	}
	s.RootToken = "root-" + hex.EncodeToString(raw)
	if o.tls {
		s.Addr = "https://" + s.listen
		if err := os.Mkdir(filepath.Join(dir, "tls"), 0o700); err != nil {
			return nil, fmt.Errorf("vaulttest: creating the TLS folder: %w", err)
		}
		s.CAFile = filepath.Join(dir, "tls", "vault-ca.pem")
	}

	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if err := s.launch("-dev-root-token-id=" + s.RootToken); err != nil {
		return nil, err
	}
	if o.tls {
		// Written before the server listens.
		if err := s.waitFile(ctx, s.CAFile); err != nil {
			return nil, err
		}
	}
	if s.Client, err = s.newClient(); err != nil {
		return nil, err
	}
	if err := s.waitHealthy(ctx, true); err != nil {
		return nil, err
	}
	// Dev mode prints the unseal key (after it serves); Restart needs it.
	key, err := s.waitUnsealKey(ctx)
	if err != nil {
		return nil, err
	}
	s.unsealKey = key
	return s, nil
}

// launch starts the vault process with the common flags and extra.
func (s *Server) launch(extra ...string) error {
	args := []string{"server", "-dev", "-dev-no-store-token", "-dev-listen-address=" + s.listen,
		"-config=" + filepath.Join(s.dir, "config.hcl")}
	if s.opts.tls {
		args = append(args, "-dev-tls", "-dev-tls-cert-dir="+filepath.Join(s.dir, "tls"))
	}
	args = append(args, extra...)
	// Nothing of the developer's Vault setup (VAULT_ADDR, VAULT_TOKEN,
	// ~/.vault-token) reaches the server.
	env := []string{"HOME=" + s.dir, "PATH=" + os.Getenv("PATH"), "VAULT_LOG_LEVEL=info"}
	logPath := filepath.Join(s.dir, fmt.Sprintf("vault-%d.log", time.Now().UnixNano()))
	p, err := testproc.Start("vault", s.bin, args, env, logPath)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.proc = p
	s.mu.Unlock()
	return nil
}

func (s *Server) current() *testproc.Process {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.proc
}

// newClient returns a client of the server with the root token.
func (s *Server) newClient() (*vault.Client, error) {
	tlsConfig := &tls.Config{MinVersion: tls.VersionTLS12}
	if s.opts.tls {
		data, err := os.ReadFile(s.CAFile)
		if err != nil {
			return nil, fmt.Errorf("vaulttest: reading the dev server's CA: %w", err)
		}
		certs, err := pemutil.FindCertificates(data)
		if err != nil {
			return nil, fmt.Errorf("vaulttest: the dev server's CA: %w", err)
		}
		tlsConfig.RootCAs = x509.NewCertPool()
		for _, c := range certs {
			tlsConfig.RootCAs.AddCert(c)
		}
	}
	c, err := vault.NewClient(&vault.Config{
		Address:    s.Addr,
		HttpClient: &http.Client{Transport: &http.Transport{TLSClientConfig: tlsConfig, ForceAttemptHTTP2: true}},
		Timeout:    callTimeout,
		MaxRetries: 0,
	})
	if err != nil {
		return nil, fmt.Errorf("vaulttest: creating the client: %w", err)
	}
	c.SetToken(s.RootToken)
	c.ClearNamespace()
	return c, nil
}

// waitFile waits until the server has written a non-empty file at path.
func (s *Server) waitFile(ctx context.Context, path string) error {
	p := s.current()
	for {
		if info, err := os.Stat(path); err == nil && info.Size() > 0 {
			return nil
		}
		if done, err := p.Exited(); done {
			return fmt.Errorf("vaulttest: vault exited while starting: %w", testproc.ExitError(err))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("vaulttest: vault wrote no %s in %s", filepath.Base(path), startTimeout)
		case <-p.Done():
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// waitHealthy waits until sys/health answers: with unsealed, until the
// server is unsealed and active; else until it answers at all (sealed).
func (s *Server) waitHealthy(ctx context.Context, unsealed bool) error {
	var last string
	p := s.current()
	for {
		if done, err := p.Exited(); done {
			return fmt.Errorf("vaulttest: vault exited while starting: %w", testproc.ExitError(err))
		}
		callCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
		health, err := s.Client.Sys().HealthWithContext(callCtx)
		cancel()
		switch {
		case err != nil:
			last = err.Error()
		case !unsealed && health.Initialized:
			return nil
		case health.Initialized && !health.Sealed && !health.Standby:
			return nil
		default:
			last = fmt.Sprintf("initialized %t, sealed %t, standby %t", health.Initialized, health.Sealed, health.Standby)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("vaulttest: vault not ready after %s: %s", startTimeout, last)
		case <-p.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
}

var unsealKeyLine = regexp.MustCompile(`(?m)^Unseal Key: (\S+)$`)

func (s *Server) waitUnsealKey(ctx context.Context) (string, error) {
	p := s.current()
	for {
		data, err := os.ReadFile(p.LogPath())
		if err != nil {
			return "", fmt.Errorf("vaulttest: reading the server's output: %w", err)
		}
		if m := unsealKeyLine.FindSubmatch(data); m != nil {
			return string(m[1]), nil
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("vaulttest: the dev server printed no unseal key in %s", startTimeout)
		case <-p.Done():
			return "", errors.New("vaulttest: vault exited before it printed its unseal key")
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Stop stops the server (SIGTERM, then SIGKILL after a grace period). Its
// address refuses connections until Restart. Not for a Shared server.
func (s *Server) Stop(t testing.TB) {
	t.Helper()
	s.current().Stop(stopGrace)
}

// Restart starts a stopped server again at the same address with the
// same storage, unseals it, and waits until it serves: every mount,
// issuer, policy and token it held is back. Not for a Shared server, nor
// one started WithTLS.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	if s.opts.tls {
		t.Fatal("vaulttest: a server started WithTLS cannot be restarted: dev mode makes a new CA at every start")
	}
	if done, _ := s.current().Exited(); !done {
		t.Fatal("vaulttest: Restart of a server that is running; Stop it first")
	}
	ctx, cancel := context.WithTimeout(t.Context(), startTimeout)
	defer cancel()
	// Initialised already: the dev setup (root token, kv mount) is not
	// made again.
	if err := s.launch("-dev-skip-init"); err != nil {
		t.Fatal(err)
	}
	if err := s.waitHealthy(ctx, false); err != nil {
		t.Fatalf("%v%s", err, s.current().Tail(logLines))
	}
	if _, err := s.Client.Sys().UnsealWithContext(ctx, s.unsealKey); err != nil {
		t.Fatalf("vaulttest: unsealing the restarted server: %v%s", err, s.current().Tail(logLines))
	}
	if err := s.waitHealthy(ctx, true); err != nil {
		t.Fatalf("%v%s", err, s.current().Tail(logLines))
	}
}

// stop stops the server and removes its files.
func (s *Server) stop() {
	s.stopOnce.Do(func() {
		s.current().Stop(stopGrace)
		_ = os.RemoveAll(s.dir)
	})
}

// freePort returns a loopback port that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("vaulttest: picking a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
