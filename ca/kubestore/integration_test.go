package kubestore_test

import (
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/kubestore"
	"github.com/meshca/meshca/internal/kubetest"
	"github.com/meshca/meshca/rotation"
)

// The tests named TestAPIServer* run against a real kube-apiserver: the
// fake clientset neither checks resourceVersions nor serves watch-lists.

var kube kubetest.Shared

func TestMain(m *testing.M) { kube.Run(m) }

// apiServerStore returns a Store for the Secret "authorities" in ns.
func apiServerStore(t *testing.T, c *kubetest.Cluster, ns string) *kubestore.Store {
	t.Helper()
	store, err := kubestore.New(kubestore.Options{Client: c.Client.CoreV1(), Namespace: ns, Name: secretName})
	require.NoError(t, err)
	return store
}

func TestAPIServerForcedConflict(t *testing.T) {
	// Concurrent writers never lose an update: B's write, made from the
	// set before A's, is refused; reloaded, B writes over A's.
	ctx := t.Context()
	c := kube.Cluster(t)
	ns := c.CreateNamespace(t, "kubestore-").Name
	a, b := apiServerStore(t, c, ns), apiServerStore(t, c, ns)

	set, err := kubestore.LoadOrCreate(ctx, a, ca.AuthorityOptions{TrustDomain: td})
	require.NoError(t, err)
	loaded, err := b.Load(ctx)
	require.NoError(t, err)
	requireSameSet(t, set, loaded)

	rotatedByA := withNewIssuer(t, set)
	require.NoError(t, a.Save(ctx, rotatedByA))

	err = b.Save(ctx, withPreparedRoot(t, loaded))
	require.ErrorIs(t, err, kubestore.ErrConflict)
	require.True(t, apierrors.IsConflict(err))
	require.ErrorContains(t, err, "kubestore: someone else changed the authorities; reload: Secret "+ns+"/authorities changed after resourceVersion ")

	reloaded, err := b.Load(ctx)
	require.NoError(t, err)
	requireSameSet(t, rotatedByA, reloaded)
	next := withPreparedRoot(t, reloaded)
	require.NoError(t, b.Save(ctx, next))
	stored, err := apiServerStore(t, c, ns).Load(ctx)
	require.NoError(t, err)
	requireSameSet(t, next, stored)

	secret, err := c.Client.CoreV1().Secrets(ns).Get(ctx, secretName, metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, corev1.SecretTypeOpaque, secret.Type)
	require.Equal(t, "meshca", secret.Labels["app.kubernetes.io/name"])
}

func TestAPIServerCreateRace(t *testing.T) {
	// Replicas starting together all end up with the one root stored.
	ctx := t.Context()
	c := kube.Cluster(t)
	ns := c.CreateNamespace(t, "kubestore-").Name
	const replicas = 6
	sets := make([]*ca.AuthoritySet, replicas)
	var wg sync.WaitGroup
	for i := range replicas {
		wg.Go(func() {
			set, err := kubestore.LoadOrCreate(ctx, apiServerStore(t, c, ns), ca.AuthorityOptions{TrustDomain: td})
			if err != nil {
				t.Errorf("replica %d: %v", i, err)
				return
			}
			sets[i] = set
		})
	}
	wg.Wait()
	stored, err := apiServerStore(t, c, ns).Load(ctx)
	require.NoError(t, err)
	for i, set := range sets {
		require.NotNil(t, set, "replica %d", i)
		requireSameSet(t, stored, set)
	}
}

func TestAPIServerSecretCreatedEmpty(t *testing.T) {
	ctx := t.Context()
	c := kube.Cluster(t)
	ns := c.CreateNamespace(t, "kubestore-").Name
	_, err := c.Client.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: secretName, Labels: map[string]string{"helm.sh/chart": "meshca"}},
		Type:       corev1.SecretTypeOpaque,
	}, metav1.CreateOptions{})
	require.NoError(t, err)

	set, err := kubestore.LoadOrCreate(ctx, apiServerStore(t, c, ns), ca.AuthorityOptions{TrustDomain: td})
	require.NoError(t, err)
	secret, err := c.Client.CoreV1().Secrets(ns).Get(ctx, secretName, metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, map[string]string{"helm.sh/chart": "meshca", "app.kubernetes.io/name": "meshca"}, secret.Labels)
	require.Equal(t, string(encode(t, set)), string(secret.Data[kubestore.DataKey]))
}

func TestAPIServerNoLostUpdate(t *testing.T) {
	// Writers × increments of the sequence, each a load, a change and a
	// save retried on conflict: every increment lands.
	ctx := t.Context()
	c := kube.Cluster(t)
	ns := c.CreateNamespace(t, "kubestore-").Name
	start, err := kubestore.LoadOrCreate(ctx, apiServerStore(t, c, ns), ca.AuthorityOptions{TrustDomain: td})
	require.NoError(t, err)

	const writers, increments = 5, 8
	var conflicts atomic.Int64
	var wg sync.WaitGroup
	for w := range writers {
		store := apiServerStore(t, c, ns)
		wg.Go(func() {
			for range increments {
				for {
					set, err := store.Load(ctx)
					if err != nil {
						t.Errorf("writer %d: %v", w, err)
						return
					}
					next := set.Clone()
					next.Sequence++
					err = store.Save(ctx, next)
					if errors.Is(err, kubestore.ErrConflict) {
						conflicts.Add(1)
						continue
					}
					if err != nil {
						t.Errorf("writer %d: %v", w, err)
						return
					}
					break
				}
			}
		})
	}
	wg.Wait()
	final, err := apiServerStore(t, c, ns).Load(ctx)
	require.NoError(t, err)
	require.Equal(t, start.Sequence+writers*increments, final.Sequence)
	t.Logf("%d conflicts retried", conflicts.Load())
}

func TestAPIServerFollow(t *testing.T) {
	// The leader rotates with the rotation manager; a replica following
	// the Secret takes up each step.
	ctx := t.Context()
	c := kube.Cluster(t)
	ns := c.CreateNamespace(t, "kubestore-").Name
	opts := ca.AuthorityOptions{TrustDomain: td, RootTTL: 48 * time.Hour, IntermediateTTL: 24 * time.Hour}

	leaderStore := apiServerStore(t, c, ns)
	set, err := kubestore.LoadOrCreate(ctx, leaderStore, opts)
	require.NoError(t, err)
	leaderCA, err := ca.New(set, ca.Options{})
	require.NoError(t, err)
	manager, err := rotation.NewManager(rotation.ManagerOptions{
		CA:         leaderCA,
		Store:      leaderStore,
		Authority:  opts,
		MaxLeafTTL: time.Hour,
		Tracker:    rotation.NewTracker(time.Hour, nil),
	})
	require.NoError(t, err)

	followerStore := apiServerStore(t, c, ns)
	set, err = kubestore.LoadOrCreate(ctx, followerStore, opts)
	require.NoError(t, err)
	follower, err := ca.New(set, ca.Options{})
	require.NoError(t, err)
	logger, logs := newLogger()
	runFollow(t, followerStore, follower, logger)

	_, err = manager.RotateIntermediate(ctx, rotation.OpOptions{})
	require.NoError(t, err)
	requireCAHas(t, follower, leaderCA.Authorities())
	require.NotEqual(t, set.Issuer.Cert.Raw, follower.Authorities().Issuer.Cert.Raw)

	_, err = manager.PrepareRoot(ctx, rotation.OpOptions{})
	require.NoError(t, err)
	requireCAHas(t, follower, leaderCA.Authorities())
	_, followerSeq := follower.Bundle()
	require.Equal(t, set.Sequence+1, followerSeq)
	require.NotContains(t, logs.String(), "level=ERROR")
}
