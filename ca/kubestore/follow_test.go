package kubestore_test

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/kubestore"
	"github.com/meshca/meshca/internal/testlog"
)

// runFollow runs kubestore.Follow until the test ends.
func runFollow(t *testing.T, store *kubestore.Store, c *ca.CA, logger *slog.Logger) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- kubestore.Follow(ctx, store, c, logger, 20*time.Millisecond) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(wait):
			t.Error("Follow did not return after its ctx was done")
		}
	})
}

// requireCAHas waits until c's authorities are want.
func requireCAHas(t *testing.T, c *ca.CA, want *ca.AuthoritySet) {
	t.Helper()
	wantData := string(encode(t, want))
	require.Eventually(t, func() bool {
		return string(encode(t, c.Authorities())) == wantData
	}, wait, 5*time.Millisecond, "the CA did not take up bundle sequence %d", want.Sequence)
}

func TestFollow(t *testing.T) {
	ctx := context.Background()
	client := newClient(t)
	leader := newStore(t, client, nil)
	set1, err := kubestore.LoadOrCreate(ctx, leader, ca.AuthorityOptions{TrustDomain: td})
	require.NoError(t, err)

	followerStore := newStore(t, client, nil)
	loaded, err := kubestore.LoadOrCreate(ctx, followerStore, ca.AuthorityOptions{TrustDomain: td})
	require.NoError(t, err)
	requireSameSet(t, set1, loaded)
	follower, err := ca.New(loaded, ca.Options{})
	require.NoError(t, err)
	logger, logs := newLogger()
	runFollow(t, followerStore, follower, logger)

	// An intermediate rotation: same bundle, new issuer.
	set2 := withNewIssuer(t, set1)
	require.NoError(t, leader.Save(ctx, set2))
	requireCAHas(t, follower, set2)

	// A root prepared: the bundle changes and its watchers hear of it.
	_, _, changed := follower.WatchBundle()
	set3 := withPreparedRoot(t, set2)
	require.NoError(t, leader.Save(ctx, set3))
	select {
	case <-changed:
	case <-time.After(wait):
		t.Fatal("the follower's bundle did not change")
	}
	requireCAHas(t, follower, set3)
	requireLogged(t, logs, `level=INFO msg="authorities updated from the store" secret=meshca/authorities bundle_sequence=2`)

	// A set that would take the sequence back, and one of another trust
	// domain, are refused and logged; the next good one is taken up.
	require.NoError(t, leader.Save(ctx, set1))
	other, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: spiffeid.RequireTrustDomainFromString("other.org")})
	require.NoError(t, err)
	other.Sequence = set3.Sequence
	require.NoError(t, leader.Save(ctx, other))
	set4 := withNewIssuer(t, set3)
	require.NoError(t, leader.Save(ctx, set4))
	requireCAHas(t, follower, set4)
	requireLogged(t, logs, `level=ERROR msg="stored authorities not applied" secret=meshca/authorities stored_sequence=1 error="stored bundle sequence 1 is below the CA's 2; the store holds older authorities than this replica"`)
	requireLogged(t, logs, `level=ERROR msg="stored authorities not applied" secret=meshca/authorities stored_sequence=2 error="ca: authority set is for \"other.org\", the CA for \"example.org\""`)
}

func TestReload(t *testing.T) {
	ctx := context.Background()
	client := newClient(t)
	store := newStore(t, client, nil)
	set1, err := kubestore.LoadOrCreate(ctx, store, ca.AuthorityOptions{TrustDomain: td})
	require.NoError(t, err)
	c, err := ca.New(set1, ca.Options{})
	require.NoError(t, err)

	// Another replica rotates: this one's save conflicts, it reloads, and
	// its next change is made to the stored set.
	other := newStore(t, client, nil)
	_, err = other.Load(ctx)
	require.NoError(t, err)
	set2 := withPreparedRoot(t, set1)
	require.NoError(t, other.Save(ctx, set2))
	require.ErrorIs(t, store.Save(ctx, withNewIssuer(t, set1)), kubestore.ErrConflict)

	require.NoError(t, kubestore.Reload(ctx, store, c))
	requireSameSet(t, set2, c.Authorities())
	require.NoError(t, kubestore.Reload(ctx, store, c), "reloading the CA's own set")
	require.NoError(t, store.Save(ctx, withNewIssuer(t, c.Authorities())))

	// A store older than the CA is refused.
	_, err = other.Load(ctx)
	require.NoError(t, err)
	require.NoError(t, other.Save(ctx, withNewIssuer(t, set1)))
	err = kubestore.Reload(ctx, store, c)
	require.EqualError(t, err, "kubestore: reloading authorities: stored bundle sequence 1 is below the CA's 2; the store holds older authorities than this replica")
	require.Equal(t, set2.Sequence, c.Authorities().Sequence)
}

// requireLogged waits until logs has line: Follow logs after it applies.
func requireLogged(t *testing.T, logs *testlog.Buffer, line string) {
	t.Helper()
	require.Eventually(t, func() bool { return strings.Contains(logs.String(), line) }, wait, 5*time.Millisecond, "not logged: %s\nlogs:\n%s", line, logs)
}

// A set the follower refuses (an intermediate not yet valid on its slow
// clock) is tried again until it applies, without a new write.
func TestFollowRetriesARefusedSet(t *testing.T) {
	ctx := context.Background()
	client := newClient(t)
	leader := newStore(t, client, nil)
	set1, err := kubestore.LoadOrCreate(ctx, leader, ca.AuthorityOptions{TrustDomain: td})
	require.NoError(t, err)
	followerStore := newStore(t, client, nil)
	loaded, err := followerStore.Load(ctx)
	require.NoError(t, err)
	slow := clocktesting.NewFakePassiveClock(time.Now())
	follower, err := ca.New(loaded, ca.Options{Clock: slow})
	require.NoError(t, err)
	logger, logs := newLogger()
	runFollow(t, followerStore, follower, logger)

	// The leader's clock is an hour ahead: its new intermediate starts
	// in the follower's future.
	ahead := clocktesting.NewFakePassiveClock(time.Now().Add(time.Hour))
	issuer, err := ca.NewIntermediate(ca.AuthorityOptions{TrustDomain: td, Clock: ahead}, set1.Roots[0].Authority)
	require.NoError(t, err)
	set2 := set1.Clone()
	set2.Issuer = issuer
	require.NoError(t, leader.Save(ctx, set2))
	requireLogged(t, logs, `level=ERROR msg="stored authorities not applied" secret=meshca/authorities stored_sequence=1 error="ca: issuer certificate is not valid now`)

	slow.SetTime(time.Now().Add(2 * time.Hour))
	requireCAHas(t, follower, set2)
}
