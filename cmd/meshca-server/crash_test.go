package main_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/kubestore"
	"github.com/meshca/meshca/internal/kubetest"
	"github.com/meshca/meshca/internal/pemutil"
	adminv1 "github.com/meshca/meshca/proto/meshca/admin/v1"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/testca"
)

// crashSeedEnv replays TestSIGKILLUnderLoad with the seed a failed run
// logged.
const crashSeedEnv = "MESHCA_CRASH_SEED"

// crashTarget is a meshca-server to kill, with the store its state lives
// in.
type crashTarget struct {
	start  func(t *testing.T) (*serverProc, readyLine)
	stored func(t *testing.T) *ca.AuthoritySet // the saved state, as the next start loads it
	socket string
	bundle string // bundle.pem, rewritten at every start
}

// TestSIGKILLUnderLoad kills meshca-server with SIGKILL at a random moment
// (seeded; the seed is logged, and MESHCA_CRASH_SEED replays it) while
// several clients issue certificates as fast as they can and an operator
// rotates the intermediate every 100ms, so that the state is being saved
// when the kill lands; then restarts it, 20 times, with its state in a
// data directory and in a Kubernetes Secret (a real kube-apiserver).
// After every kill the saved state loads, its root is the one of the
// first start, it holds every intermediate that signed a certificate, the
// restarted server signs with the saved intermediate, and every
// certificate received before the kill verifies against the restarted
// server's bundle.
func TestSIGKILLUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("runs for about two minutes; skipped with -short")
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv(crashSeedEnv); s != "" {
		var err error
		seed, err = strconv.ParseUint(s, 10, 64)
		require.NoError(t, err, crashSeedEnv)
	}
	t.Logf("seed %d (replay with %s=%d)", seed, crashSeedEnv, seed)
	ids := workloadIDs(td, "crash", 4)
	leaf := "leaf:\n  defaultTTL: 1m\n  maxTTL: 1m\n"

	t.Run("data directory", func(t *testing.T) {
		dir := t.TempDir()
		dataDir := filepath.Join(dir, "data")
		config := filepath.Join(dir, "config.yaml")
		require.NoError(t, os.WriteFile(config, []byte(leaf+"bootstrapTokens: "+writeBootstrapTokens(t, dir, ids)+"\n"), 0o600))
		crashUnderLoad(t, rand.New(rand.NewPCG(seed, 1)), ids, crashTarget{
			start: func(t *testing.T) (*serverProc, readyLine) {
				return startServer(t, "--config", config, "--data-dir", dataDir, "--metrics-listen", "off")
			},
			stored: func(t *testing.T) *ca.AuthoritySet { return storedSet(t, dataDir) },
			socket: filepath.Join(dataDir, "admin.sock"),
			bundle: filepath.Join(dataDir, "bundle.pem"),
		})
		// A kill during a save leaves its temporary file: never read, so
		// never corrupt state, but never removed either.
		tmp, _ := filepath.Glob(filepath.Join(dataDir, ".*.tmp-*"))
		leftover := map[string]int{}
		for _, f := range tmp {
			name, _, _ := strings.Cut(strings.TrimPrefix(filepath.Base(f), "."), ".tmp-")
			leftover[name]++
		}
		t.Logf("temporary files left in the data directory by kills during a save: %v", leftover)
	})

	t.Run("Kubernetes Secret", func(t *testing.T) {
		c := kubetest.Start(t)
		dir := t.TempDir()
		const caNS = "meshca-system"
		c.CreateNamespace(t, caNS)
		kubeconfig := filepath.Join(dir, "kubeconfig")
		writeKubeconfig(t, c, kubeconfig)
		dataDir := filepath.Join(dir, "data")
		config := filepath.Join(dir, "config.yaml")
		require.NoError(t, os.WriteFile(config, []byte(leaf+"bootstrapTokens: "+writeBootstrapTokens(t, dir, ids)+`
kubernetes:
  enabled: true
  kubeconfig: `+kubeconfig+`
  namespace: `+caNS+`
  bundleConfigMap: "off"
`), 0o600))
		store, err := kubestore.New(kubestore.Options{Client: c.Client.CoreV1(), Namespace: caNS, Name: "meshca-state"})
		require.NoError(t, err)
		crashUnderLoad(t, rand.New(rand.NewPCG(seed, 2)), ids, crashTarget{
			start: func(t *testing.T) (*serverProc, readyLine) {
				return startServerEnv(t, []string{"POD_NAME=meshca-0"}, "--config", config, "--data-dir", dataDir, "--metrics-listen", "off")
			},
			stored: func(t *testing.T) *ca.AuthoritySet {
				set, err := store.Load(t.Context())
				require.NoError(t, err)
				return set
			},
			socket: filepath.Join(dataDir, "admin.sock"),
			bundle: filepath.Join(dataDir, "bundle.pem"),
		})
	})
}

// crashUnderLoad runs the kills of TestSIGKILLUnderLoad on target, ids
// issuing.
func crashUnderLoad(t *testing.T, rnd *rand.Rand, ids []spiffeid.ID, target crashTarget) {
	const (
		iterations = 20
		maxDelay   = 1500 * time.Millisecond // the latest kill, after the first certificates
	)
	started := time.Now()
	var (
		firstRoot string
		total     int
		rotations int
		chains    [][]*x509.Certificate // received before the last kill
		saved     *ca.AuthoritySet      // saved at the last kill
	)
	for i := range iterations + 1 {
		srv, ready := target.start(t)
		if i == 0 {
			firstRoot = ready.RootSerial
		}
		require.Equal(t, firstRoot, ready.RootSerial, "start %d: the root changed", i)
		bundle, err := x509bundle.Load(td, target.bundle)
		require.NoError(t, err)

		// The restarted server signs with the saved intermediate, and
		// every certificate received before the kill verifies against its
		// bundle.
		if saved != nil {
			st := rootStatus(t, target.socket)
			require.Equal(t, saved.Issuer.Cert.SerialNumber.Text(16), st.Issuer.Serial, "start %d: the restarted server signs with another intermediate than the saved one", i)
			for _, chain := range chains {
				_, _, err := x509svid.Verify(chain, bundle)
				require.NoError(t, err, "start %d: certificate %s received before the kill", i, chain[0].SerialNumber.Text(16))
			}
		}
		if i == iterations {
			srv.stop()
			break
		}

		load := startLoad(t, srv.addr, bundle, ids, target.socket)
		// The kill lands at a random moment once certificates flow.
		require.Eventually(t, func() bool { return load.issued.Load() >= int64(len(ids)) }, 30*time.Second, 5*time.Millisecond,
			"iteration %d: no certificates issued", i)
		time.Sleep(time.Duration(rnd.Int64N(int64(maxDelay))))
		require.NoError(t, srv.cmd.Process.Signal(syscall.SIGKILL))
		srv.waitKilled()
		var rotated int
		chains, rotated = load.stop(t)
		total += len(chains)
		rotations += rotated

		// The saved state loads, with the same root, and holds every
		// intermediate that signed.
		saved = target.stored(t)
		active, ok := saved.ActiveRoot()
		require.True(t, ok, "iteration %d: no active root in the saved state", i)
		require.Equal(t, firstRoot, active.Cert.SerialNumber.Text(16), "iteration %d: the saved root changed", i)
		known := []*x509.Certificate{saved.Issuer.Cert}
		for _, r := range saved.RetiringIssuers {
			known = append(known, r.Cert)
		}
		for _, chain := range chains {
			require.True(t, containsCert(known, chain[1]), "iteration %d: certificate %s was signed by intermediate %s, which the saved state does not hold",
				i, chain[0].SerialNumber.Text(16), chain[1].SerialNumber.Text(16))
		}
	}
	t.Logf("%d kills under load in %s: %d certificates received before the kills, all verified after the restarts; %d intermediate rotations saved",
		iterations, time.Since(started).Round(100*time.Millisecond), total, rotations)
}

// issueLoad issues certificates from several clients, and rotates the
// intermediate through the admin socket, until the server dies.
type issueLoad struct {
	issued  atomic.Int64
	rotated atomic.Int64
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	mu      sync.Mutex
	chains  [][]*x509.Certificate
	bad     []string // responses that are no chain of a leaf and its issuer
}

func startLoad(t *testing.T, addr string, bundle *x509bundle.Bundle, ids []spiffeid.ID, socket string) *issueLoad {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	l := &issueLoad{cancel: cancel}
	conn := dialServerBundle(t, addr, bundle)
	client := meshcav1.NewCertificateServiceClient(conn)
	for i, id := range ids {
		key := testca.NewKey(t)
		csr := testca.CreateCSR(t, key, id.String())
		callCtx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+bootstrapToken(i))
		l.wg.Go(func() {
			for ctx.Err() == nil {
				resp, err := client.Sign(callCtx, &meshcav1.SignRequest{Csr: csr})
				if err != nil {
					continue // the server died; stop ends the loop
				}
				chain, err := pemutil.ParseDER(resp.CertChain)
				l.mu.Lock()
				if err != nil || len(chain) < 2 {
					l.bad = append(l.bad, fmt.Sprintf("a response's chain of %d certificates: %v", len(chain), err))
				} else {
					l.chains = append(l.chains, chain)
				}
				l.mu.Unlock()
				l.issued.Add(1)
			}
		})
	}
	admin, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	l.wg.Go(func() {
		defer admin.Close()
		c := adminv1.NewAdminServiceClient(admin)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			if _, err := c.RotateIntermediate(ctx, &adminv1.OperationRequest{}); err == nil {
				l.rotated.Add(1)
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	})
	return l
}

// stop ends the load and returns the certificate chains received and the
// number of intermediate rotations made. It fails t if a response was not
// a chain.
func (l *issueLoad) stop(t *testing.T) ([][]*x509.Certificate, int) {
	t.Helper()
	l.cancel()
	l.wg.Wait()
	require.Empty(t, l.bad)
	return l.chains, int(l.rotated.Load())
}

// dialServerBundle is dialServer with the bundle in hand.
func dialServerBundle(t *testing.T, addr string, bundle *x509bundle.Bundle) *grpc.ClientConn {
	t.Helper()
	path := filepath.Join(t.TempDir(), "bundle.pem")
	data, err := bundle.Marshal()
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(path, data, 0o600))
	return dialServer(t, addr, path)
}

func containsCert(certs []*x509.Certificate, c *x509.Certificate) bool {
	for _, k := range certs {
		if bytes.Equal(k.Raw, c.Raw) {
			return true
		}
	}
	return false
}
