package main_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/kubestore"
	"github.com/meshca/meshca/internal/kubetest"
)

// storedRoots returns the DER of the roots in the state Secret, or nil
// when it is absent or holds none. It does not fail the test: it runs in
// require.Eventually's conditions.
func storedRoots(ctx context.Context, c *kubetest.Cluster) []string {
	secret, err := c.Client.CoreV1().Secrets(caNamespace).Get(ctx, "meshca-state", metav1.GetOptions{})
	if err != nil {
		return nil
	}
	set, err := ca.UnmarshalAuthoritySet(secret.Data[kubestore.DataKey])
	if err != nil {
		return nil
	}
	var roots []string
	for _, r := range set.Roots {
		roots = append(roots, string(r.Cert.Raw))
	}
	return roots
}

// TestStateSecretDeletedUnderRunningReplicas: the state Secret deleted
// while two replicas run is written back by the leader from memory, with
// the same root; a third replica started after that joins the same CA
// rather than make a second root; and when the leader stops, the other
// replica, taking the lead, restores a Secret deleted again.
func TestStateSecretDeletedUnderRunningReplicas(t *testing.T) {
	c := kubetest.Start(t)
	dir := t.TempDir()
	config := kubeModeConfig(t, c, dir, "")
	type replica struct {
		proc   *serverProc
		bundle string
	}
	start := func(name string) *replica {
		data := filepath.Join(dir, name)
		proc, _ := startServerEnv(t, []string{"POD_NAME=meshca-" + name}, "--config", config, "--data-dir", data)
		return &replica{proc: proc, bundle: filepath.Join(data, "bundle.pem")}
	}
	a, b := start("a"), start("b")
	roots := storedRoots(t.Context(), c)
	require.NotEmpty(t, roots)
	leaderName := func() string {
		lease, err := c.Client.CoordinationV1().Leases(caNamespace).Get(t.Context(), "meshca-leader", metav1.GetOptions{})
		if err != nil || lease.Spec.HolderIdentity == nil {
			return ""
		}
		return *lease.Spec.HolderIdentity
	}
	require.Eventually(t, func() bool { return leaderName() != "" }, 20*time.Second, 50*time.Millisecond, "no leader")
	first, second := a, b
	if leaderName() == "meshca-b" {
		first, second = b, a
	}

	deleteSecret := func() {
		require.NoError(t, c.Client.CoreV1().Secrets(caNamespace).Delete(t.Context(), "meshca-state", metav1.DeleteOptions{}))
	}
	// Deleted, and a third replica starting at once: whether it finds the
	// Secret restored or waits for the leader to restore it, it joins the
	// same CA.
	deleteSecret()
	third := start("c")
	require.Eventually(t, func() bool { return storedRoots(t.Context(), c) != nil }, 20*time.Second, 50*time.Millisecond, "the Secret was not restored")
	require.Equal(t, roots, storedRoots(t.Context(), c), "restored with the same root")
	first.proc.logs.WaitFor(t, "restored it from memory")
	bundleA, err := os.ReadFile(a.bundle)
	require.NoError(t, err)
	bundleC, err := os.ReadFile(third.bundle)
	require.NoError(t, err)
	require.Equal(t, string(bundleA), string(bundleC))

	// The leader stops; deleted again, the Secret is restored by
	// whichever replica leads next.
	first.proc.stop()
	deleteSecret()
	require.Eventually(t, func() bool { return storedRoots(t.Context(), c) != nil }, 30*time.Second, 50*time.Millisecond, "the Secret was not restored by the next leader")
	require.Equal(t, roots, storedRoots(t.Context(), c))
	require.Eventually(t, func() bool {
		return strings.Contains(second.proc.logs.String()+third.proc.logs.String(), "restored it from memory")
	}, 10*time.Second, 50*time.Millisecond)
}
