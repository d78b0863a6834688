package ban_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshca/meshca/identity/ban"
	"github.com/meshca/meshca/internal/kubetest"
)

// kube is a real kube-apiserver and etcd, shared by the package's tests.
var kube kubetest.Shared

func TestMain(m *testing.M) { kube.Run(m) }

// replica is one CA replica's view of the shared bans.
type replica struct {
	bans *ban.Registry
	reg  *prometheus.Registry
}

// startReplicas returns n Registries on one Secret of a fresh namespace,
// each following the others' changes.
func startReplicas(t *testing.T, n int) (*kubetest.Cluster, string, []replica) {
	t.Helper()
	c := kube.Cluster(t)
	ns := c.CreateNamespace(t, "bans-").Name
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })
	out := make([]replica, n)
	for i := range out {
		store, err := ban.NewKubeStore(ban.KubeOptions{Client: c.Client.CoreV1(), Namespace: ns})
		require.NoError(t, err)
		reg := prometheus.NewRegistry()
		r, err := ban.New(ctx, ban.Options{Store: store, TrustDomain: td, Registerer: reg})
		require.NoError(t, err)
		wg.Go(func() { _ = r.Run(ctx) })
		out[i] = replica{bans: r, reg: reg}
	}
	return c, ns, out
}

// TestKubeStoreReachesEveryReplica: a ban taken on one replica is
// enforced by the other as soon as the watch tells it; removing lifts it
// there too.
func TestKubeStoreReachesEveryReplica(t *testing.T) {
	ctx := context.Background()
	_, _, rs := startReplicas(t, 2)
	a, b := rs[0].bans, rs[1].bans
	web := id("/ns/shop/sa/web")

	start := time.Now()
	_, _, err := a.Add(ctx, ban.Ban{Target: ban.NamespaceTarget(td, "shop"), Reason: "INC-7", By: "alice"}, 0)
	require.NoError(t, err)
	_, banned := a.Banned(web)
	require.True(t, banned, "in force on the replica that took it when Add returns")
	require.Eventually(t, func() bool { _, banned := b.Banned(web); return banned }, 10*time.Second, 5*time.Millisecond)
	t.Logf("ban reached the other replica in %s", time.Since(start))
	got, _ := b.Banned(web)
	require.Equal(t, "INC-7", got.Reason)
	require.Equal(t, "alice", got.By)

	_, err = b.Remove(ctx, ban.NamespaceTarget(td, "shop"))
	require.NoError(t, err, "any replica lifts a ban")
	require.Eventually(t, func() bool { _, banned := a.Banned(web); return !banned }, 10*time.Second, 5*time.Millisecond)
}

// TestKubeStoreNeverLosesAConcurrentAdd: two replicas adding bans at once,
// from many goroutines each, conflict on the Secret's resourceVersion;
// every ban lands all the same.
func TestKubeStoreNeverLosesAConcurrentAdd(t *testing.T) {
	ctx := context.Background()
	c, ns, rs := startReplicas(t, 2)
	const each = 8
	var wg sync.WaitGroup
	errs := make(chan error, 2*each)
	for i, r := range rs {
		for j := range each {
			wg.Go(func() {
				target := ban.NamespaceTarget(td, fmt.Sprintf("ns-%d-%d", i, j))
				_, _, err := r.bans.Add(ctx, ban.Ban{Target: target, Reason: "concurrent"}, 0)
				errs <- err
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	secret, err := c.Client.CoreV1().Secrets(ns).Get(ctx, ban.DefaultSecretName, metav1.GetOptions{})
	require.NoError(t, err)
	stored, err := ban.Unmarshal(secret.Data[ban.SecretKey])
	require.NoError(t, err)
	require.Len(t, stored, 2*each)
	for _, r := range rs {
		require.Eventually(t, func() bool { return len(r.bans.List()) == 2*each }, 10*time.Second, 10*time.Millisecond)
	}
}

// TestKubeStoreKeepsBansWhenTheWatchFails: a Secret that does not decode
// is a failed watch, counted; the replica keeps the bans it knew. A
// Registry cannot start on such a Secret at all (fail closed).
func TestKubeStoreKeepsBansWhenTheWatchFails(t *testing.T) {
	ctx := context.Background()
	c, ns, rs := startReplicas(t, 1)
	r := rs[0]
	_, _, err := r.bans.Add(ctx, ban.Ban{Target: ban.NamespaceTarget(td, "shop"), Reason: "INC-9"}, 0)
	require.NoError(t, err)

	secrets := c.Client.CoreV1().Secrets(ns)
	secret, err := secrets.Get(ctx, ban.DefaultSecretName, metav1.GetOptions{})
	require.NoError(t, err)
	secret.Data[ban.SecretKey] = []byte(`{"version": 99}`)
	_, err = secrets.Update(ctx, secret, metav1.UpdateOptions{})
	require.NoError(t, err)
	require.Eventually(t, func() bool { return gauge(t, r.reg, "meshca_ban_watch_failures_total") >= 1 }, 10*time.Second, 10*time.Millisecond)
	_, banned := r.bans.Banned(id("/ns/shop/sa/web"))
	require.True(t, banned, "the last bans known stay in force")

	// A Secret that does not decode is never overwritten.
	_, _, err = r.bans.Add(ctx, ban.Ban{Target: ban.NamespaceTarget(td, "other"), Reason: "x"}, 0)
	require.ErrorContains(t, err, "format version 99")

	// A new replica does not start on it.
	store, err := ban.NewKubeStore(ban.KubeOptions{Client: c.Client.CoreV1(), Namespace: ns})
	require.NoError(t, err)
	_, err = ban.New(ctx, ban.Options{Store: store, TrustDomain: td})
	require.ErrorContains(t, err, "ban: loading the bans: ban: stored bans have format version 99; this build reads version 1 (Secret "+ns+"/meshca-bans key bans.json)")

	// The Secret repaired, the watch goes on.
	data, err := ban.Marshal(nil)
	require.NoError(t, err)
	secret, err = secrets.Get(ctx, ban.DefaultSecretName, metav1.GetOptions{})
	require.NoError(t, err)
	secret.Data = map[string][]byte{ban.SecretKey: data}
	_, err = secrets.Update(ctx, secret, metav1.UpdateOptions{})
	require.NoError(t, err)
	require.Eventually(t, func() bool { return len(r.bans.List()) == 0 }, 10*time.Second, 10*time.Millisecond)
	require.Equal(t, corev1.SecretTypeOpaque, secret.Type)
}
