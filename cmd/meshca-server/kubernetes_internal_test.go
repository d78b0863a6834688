package main

import (
	"log/slog"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/kubetest"
)

// stateNamespace is where TestAwaitStoredAuthorities keeps the Lease and
// the Secret.
const stateNamespace = "meshca-system"

// TestAwaitStoredAuthorities: a starting replica that finds no stored
// authorities waits while another replica holds the leader Lease, and
// goes on when they are stored or when no replica runs.
func TestAwaitStoredAuthorities(t *testing.T) {
	c := kubetest.Start(t)
	ctx := t.Context()
	c.CreateNamespace(t, stateNamespace)
	k := &kubeEnv{
		cfg:    KubernetesConfig{Namespace: stateNamespace, LeaseName: "meshca-leader", StateSecret: "meshca-state", PodName: "meshca-new"},
		client: c.Client,
		log:    slog.New(slog.DiscardHandler),
	}
	store, err := k.store()
	require.NoError(t, err)
	leases := c.Client.CoordinationV1().Leases(stateNamespace)
	hold := func(holder string, renewed time.Time, seconds int32) {
		lease := &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Namespace: stateNamespace, Name: "meshca-leader"},
			Spec: coordinationv1.LeaseSpec{
				HolderIdentity: &holder, LeaseDurationSeconds: &seconds, RenewTime: &metav1.MicroTime{Time: renewed},
			},
		}
		if _, err := leases.Create(ctx, lease, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
			current, err := leases.Get(ctx, "meshca-leader", metav1.GetOptions{})
			require.NoError(t, err)
			lease.ResourceVersion = current.ResourceVersion
			_, err = leases.Update(ctx, lease, metav1.UpdateOptions{})
			require.NoError(t, err)
		} else {
			require.NoError(t, err)
		}
	}

	// No Lease: a first start creates.
	require.NoError(t, k.awaitStoredAuthorities(ctx, store, time.Minute, 50*time.Millisecond))

	// A live leader, and no authorities: wait, and give up with what to do.
	hold("meshca-a", time.Now(), 60)
	err = k.awaitStoredAuthorities(ctx, store, 300*time.Millisecond, 50*time.Millisecond)
	require.ErrorContains(t, err, "Secret "+stateNamespace+"/meshca-state holds no authorities while replica meshca-a runs")
	require.ErrorContains(t, err, "Not making a second root")

	// The leader restores them while this replica waits: it goes on.
	done := make(chan error, 1)
	go func() { done <- k.awaitStoredAuthorities(ctx, store, time.Minute, 50*time.Millisecond) }()
	select {
	case err := <-done:
		t.Fatalf("returned before the authorities were stored: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: spiffeid.RequireTrustDomainFromString("meshca.local")})
	require.NoError(t, err)
	leaderStore, err := k.store()
	require.NoError(t, err)
	restored, err := leaderStore.Restore(ctx, set)
	require.NoError(t, err)
	require.True(t, restored)
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("still waiting after the authorities were stored")
	}

	// No authorities, and a Lease that lapsed or that this replica holds:
	// no other replica runs, so it creates.
	require.NoError(t, c.Client.CoreV1().Secrets(stateNamespace).Delete(ctx, "meshca-state", metav1.DeleteOptions{}))
	hold("meshca-a", time.Now().Add(-time.Minute), 15)
	require.NoError(t, k.awaitStoredAuthorities(ctx, store, time.Minute, 50*time.Millisecond))
	hold("meshca-new", time.Now(), 60)
	require.NoError(t, k.awaitStoredAuthorities(ctx, store, time.Minute, 50*time.Millisecond))
}
