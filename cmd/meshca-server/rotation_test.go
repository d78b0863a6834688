package main_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/filestore"
	adminv1 "github.com/meshca/meshca/proto/meshca/admin/v1"
)

var td = spiffeid.RequireTrustDomainFromString("meshca.local")

// rootStatus asks the server for its authorities through meshctl.
func rootStatus(t *testing.T, socket string) *adminv1.RootStatusResponse {
	t.Helper()
	stdout, stderr, err := meshctl(t, "root", "status", "--admin-socket", socket, "-o", "json")
	require.NoError(t, err, stderr)
	st := &adminv1.RootStatusResponse{}
	require.NoError(t, protojson.Unmarshal([]byte(stdout), st))
	return st
}

// storedSet reads the state file as the next start will.
func storedSet(t *testing.T, dataDir string) *ca.AuthoritySet {
	t.Helper()
	store, err := filestore.New(dataDir)
	require.NoError(t, err)
	set, err := store.Load(t.Context())
	require.NoError(t, err)
	return set
}

// waitKilled waits for the server to die of SIGKILL.
func (p *serverProc) waitKilled() {
	p.t.Helper()
	select {
	case err := <-p.exited:
		var exit *exec.ExitError
		require.True(p.t, errors.As(err, &exit), "server exited with %v, not killed", err)
		ws := exit.Sys().(syscall.WaitStatus)
		require.True(p.t, ws.Signaled() && ws.Signal() == syscall.SIGKILL, "server exited with %v, not killed", err)
	case <-time.After(30 * time.Second):
		p.t.Fatalf("server did not kill itself at the failpoint:\n%s", p.logs.String())
	}
}

// TestCrashAfterEachRotationStep kills the server (SIGKILL, from a
// failpoint) right after each rotation step's state is saved and before it
// takes effect, restarts it, and checks that the step is there, the served
// authorities and bundle agree with the state file, and the rotation
// completes.
func TestCrashAfterEachRotationStep(t *testing.T) {
	type setup struct {
		before []string // meshctl root commands run before the crashing one
		step   string   // meshctl command that crashes
		check  func(t *testing.T, set *ca.AuthoritySet)
		then   []string // meshctl root commands that finish the rotation
	}
	for failpoint, s := range map[string]setup{
		"prepare-root": {
			step: "prepare",
			then: []string{"activate", "retire"},
			check: func(t *testing.T, set *ca.AuthoritySet) {
				require.Len(t, set.Roots, 2)
				require.Equal(t, ca.RootPrepared, set.Roots[1].State)
				require.Equal(t, uint64(2), set.Sequence)
			},
		},
		"activate-root": {
			before: []string{"prepare"},
			step:   "activate",
			then:   []string{"retire"},
			check: func(t *testing.T, set *ca.AuthoritySet) {
				require.Equal(t, ca.RootRetiring, set.Roots[0].State)
				require.Equal(t, ca.RootActive, set.Roots[1].State)
				require.NoError(t, set.Issuer.Cert.CheckSignatureFrom(set.Roots[1].Cert))
				require.Len(t, set.Chain, 1)
			},
		},
		"retire-root": {
			before: []string{"prepare", "activate"},
			step:   "retire",
			then:   []string{"prepare", "activate", "retire"},
			check: func(t *testing.T, set *ca.AuthoritySet) {
				require.Len(t, set.Roots, 1)
				require.Equal(t, ca.RootActive, set.Roots[0].State)
				require.Equal(t, uint64(3), set.Sequence)
				require.Empty(t, set.Chain)
			},
		},
		"activate-intermediate": {
			step: "intermediate",
			then: []string{"prepare", "activate", "retire"},
			check: func(t *testing.T, set *ca.AuthoritySet) {
				require.Len(t, set.RetiringIssuers, 1)
				require.Equal(t, uint64(1), set.Sequence)
			},
		},
	} {
		t.Run(failpoint, func(t *testing.T) {
			dataDir := filepath.Join(t.TempDir(), "data")
			socket := filepath.Join(dataDir, "admin.sock")
			srv, _ := startServer(t, "--data-dir", dataDir)
			for _, cmd := range s.before {
				_, stderr, err := meshctl(t, "root", cmd, "--admin-socket", socket, "--force")
				require.NoError(t, err, stderr)
			}
			srv.stop()
			before := storedSet(t, dataDir)

			srv, _ = startServerEnv(t, []string{"MESHCA_FAILPOINT_KILL_AFTER_SAVE=" + failpoint}, "--data-dir", dataDir)
			args := []string{"root", s.step, "--admin-socket", socket, "--force"}
			if s.step == "intermediate" {
				args = []string{"intermediate", "rotate", "--admin-socket", socket}
			}
			_, _, err := meshctl(t, args...)
			require.Error(t, err, "the server died before answering")
			srv.waitKilled()

			// The step was saved before the crash...
			after := storedSet(t, dataDir)
			beforeJSON, err := ca.MarshalAuthoritySet(before)
			require.NoError(t, err)
			afterJSON, err := ca.MarshalAuthoritySet(after)
			require.NoError(t, err)
			require.NotEqual(t, string(beforeJSON), string(afterJSON), "the step was saved")
			s.check(t, after)

			// ...and a restart serves exactly what was saved.
			srv, _ = startServer(t, "--data-dir", dataDir)
			st := rootStatus(t, socket)
			require.Equal(t, after.Sequence, st.BundleSequence)
			require.Equal(t, after.Issuer.Cert.SerialNumber.Text(16), st.Issuer.Serial)
			require.Len(t, st.Roots, len(after.Roots))
			for i, r := range after.Roots {
				require.Equal(t, r.Cert.SerialNumber.Text(16), st.Roots[i].Serial)
				require.Equal(t, string(r.State), st.Roots[i].State)
			}
			bundle, err := x509bundle.Load(td, filepath.Join(dataDir, "bundle.pem"))
			require.NoError(t, err)
			require.True(t, bundle.Equal(after.Bundle()), "bundle.pem holds the saved roots")

			// The rotation completes from there.
			for _, cmd := range s.then {
				_, stderr, err := meshctl(t, "root", cmd, "--admin-socket", socket, "--force")
				require.NoError(t, err, stderr)
			}
			final := rootStatus(t, socket)
			require.Len(t, final.Roots, 1)
			require.Equal(t, "active", final.Roots[0].State)
			srv.stop()
		})
	}
}

// TestCrashAfterIntermediatePrepared: the intermediate's own rotation is
// crash-safe too. A short-lived intermediate makes the server prepare a
// successor at once; it dies right after saving it, and after a restart
// the saved successor is the one that takes over.
func TestCrashAfterIntermediatePrepared(t *testing.T) {
	dir := t.TempDir()
	dataDir := filepath.Join(dir, "data")
	config := filepath.Join(dir, "config.yaml")
	require.NoError(t, os.WriteFile(config, []byte(`
leaf:
  defaultTTL: 2s
  maxTTL: 2s
authority:
  intermediateTTL: 9s
  rotationCheckInterval: 100ms
`), 0o600))
	args := []string{"--config", config, "--data-dir", dataDir, "--listen", "127.0.0.1:0", "--metrics-listen", "off"}

	cmd := exec.Command(filepath.Join(binDir, "meshca-server"), args...)
	cmd.Env = append(os.Environ(), "MESHCA_FAILPOINT_KILL_AFTER_SAVE=prepare-intermediate")
	done := make(chan error, 1)
	require.NoError(t, cmd.Start())
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var exit *exec.ExitError
		require.ErrorAs(t, err, &exit)
		ws := exit.Sys().(syscall.WaitStatus)
		require.True(t, ws.Signaled() && ws.Signal() == syscall.SIGKILL, "exited with %v", err)
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("the server never prepared an intermediate")
	}

	saved := storedSet(t, dataDir)
	require.NotNil(t, saved.NextIssuer, "the prepared successor was saved")
	successor := saved.NextIssuer.Cert.SerialNumber.Text(16)

	srv, _ := startServer(t, "--config", config, "--data-dir", dataDir)
	socket := filepath.Join(dataDir, "admin.sock")
	require.Eventually(t, func() bool {
		return rootStatus(t, socket).Issuer.Serial == successor
	}, 20*time.Second, 100*time.Millisecond, "the saved successor takes over")
	srv.stop()
}
