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
// authorities waits while another replica holds the leader Lease and
// renews it, and goes on when the authorities are stored, or when the
// Lease shows that no replica runs.
func TestAwaitStoredAuthorities(t *testing.T) {
	c := kubetest.Start(t)
	ctx := t.Context()
	c.CreateNamespace(t, stateNamespace)
	k := &kubeEnv{
		cfg: KubernetesConfig{Namespace: stateNamespace, LeaseName: "meshca-leader", StateSecret: "meshca-state", PodName: "meshca-new",
			LeaseDuration: Duration(time.Second), RetryPeriod: Duration(100 * time.Millisecond)},
		client: c.Client,
		log:    slog.New(slog.DiscardHandler),
	}
	store, err := k.store()
	require.NoError(t, err)
	leases := c.Client.CoordinationV1().Leases(stateNamespace)
	// hold writes the Lease as held by holder, renewed now: every write
	// is a change, as a renewal is.
	hold := func(holder string) {
		seconds := int32(1)
		lease := &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Namespace: stateNamespace, Name: "meshca-leader"},
			Spec: coordinationv1.LeaseSpec{
				HolderIdentity: &holder, LeaseDurationSeconds: &seconds, RenewTime: &metav1.MicroTime{Time: time.Now()},
			},
		}
		if _, err := leases.Create(ctx, lease, metav1.CreateOptions{}); !apierrors.IsAlreadyExists(err) {
			require.NoError(t, err)
			return
		}
		current, err := leases.Get(ctx, "meshca-leader", metav1.GetOptions{})
		require.NoError(t, err)
		lease.ResourceVersion = current.ResourceVersion
		_, err = leases.Update(ctx, lease, metav1.UpdateOptions{})
		require.NoError(t, err)
	}
	// renew has holder renew the Lease every 100 ms until the returned
	// function is called.
	renew := func(holder string) (stop func()) {
		hold(holder)
		done, stopped := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(stopped)
			for {
				select {
				case <-done:
					return
				case <-time.After(100 * time.Millisecond):
					hold(holder)
				}
			}
		}()
		return func() { close(done); <-stopped }
	}
	await := func(maxWait time.Duration) <-chan error {
		result := make(chan error, 1)
		go func() { result <- k.awaitStoredAuthorities(ctx, store, maxWait, 50*time.Millisecond) }()
		return result
	}
	within := func(result <-chan error, d time.Duration) error {
		t.Helper()
		select {
		case err := <-result:
			return err
		case <-time.After(d):
			t.Fatalf("still waiting after %s", d)
			return nil
		}
	}

	// No Lease: a first start, nobody else runs.
	require.NoError(t, within(await(time.Minute), time.Second))

	// A leader renewing, and no authorities: wait, and give up saying
	// what to do.
	stop := renew("meshca-a")
	err = within(await(time.Second), 10*time.Second)
	require.ErrorContains(t, err, "Secret "+stateNamespace+"/meshca-state holds no authorities while replica meshca-a runs")
	require.ErrorContains(t, err, "Not making a second root")

	// The leader restores them while this replica waits: it goes on.
	result := await(time.Minute)
	select {
	case err := <-result:
		t.Fatalf("returned while the leader runs and before the authorities were stored: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: spiffeid.RequireTrustDomainFromString("meshca.local")})
	require.NoError(t, err)
	leaderStore, err := k.store()
	require.NoError(t, err)
	restored, err := leaderStore.Restore(ctx, set)
	require.NoError(t, err)
	require.True(t, restored)
	require.NoError(t, within(result, 10*time.Second))
	stop()

	// No authorities, and a Lease nobody renews (held by a replica that
	// died, released, or this replica's own from before a restart): once
	// it has not changed for a lease duration and three retry periods, nobody
	// runs.
	require.NoError(t, c.Client.CoreV1().Secrets(stateNamespace).Delete(ctx, "meshca-state", metav1.DeleteOptions{}))
	for _, holder := range []string{"meshca-a", "", "meshca-new"} {
		hold(holder)
		start := time.Now()
		require.NoError(t, within(await(time.Minute), 10*time.Second), "holder %q", holder)
		require.GreaterOrEqual(t, time.Since(start), 1300*time.Millisecond, "holder %q: gave up watching before the Lease settled", holder)
	}

	// Not settled in time: no decision, no root.
	hold("meshca-a")
	err = within(await(300*time.Millisecond), 10*time.Second)
	require.ErrorContains(t, err, "whether another replica runs was not settled within 300ms")
}
