package rotation_test

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/filestore"
	"github.com/meshca/meshca/rotation"
	"github.com/meshca/meshca/testca"
)

var (
	authTD    = spiffeid.RequireTrustDomainFromString("rotation.test")
	rotatedID = spiffeid.RequireFromPath(authTD, "/ns/default/sa/w")
)

const (
	interTTL = 12 * time.Hour
	leafTTL  = time.Hour
)

type managerFixture struct {
	clock   *clocktesting.FakeClock
	ca      *ca.CA
	store   *filestore.Store
	tracker *rotation.Tracker
	manager *rotation.Manager
	saved   []rotation.Step
}

func newManagerFixture(t *testing.T) *managerFixture {
	t.Helper()
	f := &managerFixture{clock: clocktesting.NewFakeClock(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))}
	authOpts := ca.AuthorityOptions{TrustDomain: authTD, IntermediateTTL: interTTL, RootTTL: 10 * 24 * time.Hour, Clock: f.clock}
	var err error
	f.store, err = filestore.New(filepath.Join(t.TempDir(), "data"))
	require.NoError(t, err)
	set, err := ca.LoadOrCreate(context.Background(), f.store, authOpts)
	require.NoError(t, err)
	f.ca, err = ca.New(set, ca.Options{Clock: f.clock, TTL: ca.TTLPolicy{Default: leafTTL, Max: leafTTL}})
	require.NoError(t, err)
	f.tracker = rotation.NewTracker(leafTTL, f.clock)
	f.manager, err = rotation.NewManager(rotation.ManagerOptions{
		CA:         f.ca,
		Store:      f.store,
		Authority:  authOpts,
		MaxLeafTTL: leafTTL,
		Tracker:    f.tracker,
		Clock:      f.clock,
		AfterSave:  func(s rotation.Step) { f.saved = append(f.saved, s) },
	})
	require.NoError(t, err)
	return f
}

// leaf issues a workload certificate now.
func (f *managerFixture) leaf(t *testing.T) *ca.Issued {
	t.Helper()
	issued, err := f.ca.Sign(context.Background(), ca.SignRequest{PublicKey: testca.NewKey(t).Public(), ID: rotatedID})
	require.NoError(t, err)
	return issued
}

// requireStored checks that the store holds what the CA signs with.
func (f *managerFixture) requireStored(t *testing.T) {
	t.Helper()
	stored, err := f.store.Load(context.Background())
	require.NoError(t, err)
	live := f.ca.Authorities()
	require.Equal(t, live.Sequence, stored.Sequence)
	require.Equal(t, live.Issuer.Cert.Raw, stored.Issuer.Cert.Raw)
	require.Len(t, stored.Roots, len(live.Roots))
	for i := range live.Roots {
		require.Equal(t, live.Roots[i].Cert.Raw, stored.Roots[i].Cert.Raw)
		require.Equal(t, live.Roots[i].State, stored.Roots[i].State)
	}
}

func bundleOf(roots ...*x509.Certificate) *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(authTD, roots)
}

func TestIntermediateRotatesByItself(t *testing.T) {
	f := newManagerFixture(t)
	ctx := context.Background()
	first := f.ca.Authorities()
	_, _, bundleChanged := f.ca.WatchBundle()

	// 12h intermediate, 1h leaves: a successor is prepared with 4h left
	// and takes over with 2h left.
	f.clock.Step(8*time.Hour - time.Minute)
	require.NoError(t, f.manager.RotateIntermediates(ctx))
	require.Nil(t, f.ca.Authorities().NextIssuer)
	require.Empty(t, f.saved)

	f.clock.Step(time.Minute)
	require.NoError(t, f.manager.RotateIntermediates(ctx))
	prepared := f.ca.Authorities()
	require.NotNil(t, prepared.NextIssuer)
	require.Equal(t, first.Issuer.Cert.Raw, prepared.Issuer.Cert.Raw, "prepared ahead, not yet signing")
	require.NoError(t, prepared.NextIssuer.Cert.CheckSignatureFrom(first.Roots[0].Cert))
	require.Equal(t, []rotation.Step{rotation.StepPrepareIntermediate}, f.saved)
	f.requireStored(t)

	f.clock.Step(2*time.Hour - time.Minute)
	require.NoError(t, f.manager.RotateIntermediates(ctx))
	require.Equal(t, first.Issuer.Cert.Raw, f.ca.Authorities().Issuer.Cert.Raw)
	oldLeaf := f.leaf(t)
	f.clock.Step(time.Minute)
	require.NoError(t, f.manager.RotateIntermediates(ctx))
	active := f.ca.Authorities()
	require.Equal(t, prepared.NextIssuer.Cert.Raw, active.Issuer.Cert.Raw)
	require.Nil(t, active.NextIssuer)
	require.Empty(t, active.Chain, "one root: nothing to cross-sign")
	require.Len(t, active.RetiringIssuers, 1)
	require.Equal(t, f.clock.Now().Add(leafTTL), active.RetiringIssuers[0].LeavesUntil)
	f.requireStored(t)

	// The bundle did not change: its sequence is the same and watchers
	// were not woken.
	require.Equal(t, first.Sequence, active.Sequence)
	select {
	case <-bundleChanged:
		t.Fatal("bundle watchers were told of an intermediate rotation")
	default:
	}

	// Leaves of both intermediates verify with the unchanged bundle.
	newLeaf := f.leaf(t)
	for _, l := range []*ca.Issued{oldLeaf, newLeaf} {
		_, _, err := x509svid.Verify(l.Chain, bundleOf(first.Roots[0].Cert), x509svid.WithTime(f.clock.Now()))
		require.NoError(t, err)
	}
	require.Equal(t, active.Issuer.Cert.Raw, newLeaf.Chain[1].Raw)

	// Once the old issuer's last leaf has expired, it is forgotten.
	f.clock.Step(leafTTL)
	require.NoError(t, f.manager.RotateIntermediates(ctx))
	require.Empty(t, f.ca.Authorities().RetiringIssuers)
	require.Equal(t, []rotation.Step{rotation.StepPrepareIntermediate, rotation.StepActivateIntermediate, rotation.StepPruneIntermediates}, f.saved)
	f.requireStored(t)
}

func TestRootRotation(t *testing.T) {
	f := newManagerFixture(t)
	ctx := context.Background()
	oldRoot := f.ca.Authorities().Roots[0].Cert
	f.tracker.Observe(rotatedID, 1)
	_, _, bundleChanged := f.ca.WatchBundle()

	// activate and retire have nothing to act on yet.
	_, err := f.manager.ActivateRoot(ctx, rotation.OpOptions{})
	require.ErrorIs(t, err, rotation.ErrNotApplicable)
	_, err = f.manager.RetireRoot(ctx, rotation.OpOptions{})
	require.ErrorIs(t, err, rotation.ErrNotApplicable)

	// A dry run changes nothing.
	res, err := f.manager.PrepareRoot(ctx, rotation.OpOptions{DryRun: true})
	require.NoError(t, err)
	require.False(t, res.Applied)
	require.Contains(t, res.Summary, "would: a new root joins the trust bundle (sequence 2)")
	require.Len(t, f.ca.Authorities().Roots, 1)

	// prepare: the new root joins the bundle, the sequence goes up,
	// watchers are told; the issuer does not change.
	res, err = f.manager.PrepareRoot(ctx, rotation.OpOptions{})
	require.NoError(t, err)
	require.True(t, res.Applied)
	set := f.ca.Authorities()
	require.Equal(t, uint64(2), set.Sequence)
	require.Len(t, set.Roots, 2)
	newRoot := set.Roots[1]
	require.Equal(t, ca.RootPrepared, newRoot.State)
	require.Equal(t, uint64(2), newRoot.BundleSequence)
	require.NoError(t, set.Issuer.Cert.CheckSignatureFrom(oldRoot))
	require.True(t, closed(bundleChanged))
	f.requireStored(t)

	_, err = f.manager.PrepareRoot(ctx, rotation.OpOptions{})
	var refused *rotation.RefusedError
	require.ErrorAs(t, err, &refused)
	require.ErrorContains(t, err, "is already prepared; activate it first")
	require.False(t, refused.Overridable, "force cannot prepare a second root")

	// activate refuses until the tracker has watched for one renewal
	// interval (half a leaf lifetime): before that it cannot have seen
	// every workload.
	_, err = f.manager.ActivateRoot(ctx, rotation.OpOptions{})
	require.ErrorAs(t, err, &refused)
	require.True(t, refused.Overridable)
	require.EqualError(t, err, "rotation: activate-root refused: propagation is tracked since 2030-01-01T00:00:00Z and every workload renews within 30m0s; activate after 2030-01-01T00:30:00Z")
	f.clock.Step(leafTTL / 2)
	f.tracker.Observe(rotatedID, 1)

	// Then it refuses while a workload seen recently holds the old bundle.
	_, err = f.manager.ActivateRoot(ctx, rotation.OpOptions{})
	require.ErrorAs(t, err, &refused)
	require.EqualError(t, err, "rotation: activate-root refused: 0 of 1 workloads seen in the last 1h0m0s hold bundle sequence 2 with the new root; activate when all do, or after 2030-01-01T01:00:00Z")
	res, err = f.manager.ActivateRoot(ctx, rotation.OpOptions{DryRun: true, Force: true})
	require.NoError(t, err)
	require.True(t, res.Forced)
	require.False(t, res.Applied)
	require.Equal(t, ca.RootPrepared, f.ca.Authorities().Roots[1].State)

	// Once the workload reports the new bundle, activate goes ahead.
	f.tracker.Observe(rotatedID, 2)
	oldLeaf := f.leaf(t)
	res, err = f.manager.ActivateRoot(ctx, rotation.OpOptions{})
	require.NoError(t, err)
	require.True(t, res.Applied)
	require.False(t, res.Forced)
	set = f.ca.Authorities()
	require.Equal(t, uint64(2), set.Sequence, "the bundle's roots did not change")
	require.Equal(t, ca.RootRetiring, set.Roots[0].State)
	require.Equal(t, ca.RootActive, set.Roots[1].State)
	require.NoError(t, set.Issuer.Cert.CheckSignatureFrom(newRoot.Cert))
	require.Len(t, set.Chain, 1, "the new root, cross-signed by the old one")
	require.NoError(t, set.Chain[0].CheckSignatureFrom(oldRoot))
	require.Equal(t, newRoot.Cert.RawSubjectPublicKeyInfo, set.Chain[0].RawSubjectPublicKeyInfo)
	require.Equal(t, newRoot.Cert.RawSubject, set.Chain[0].RawSubject)
	f.requireStored(t)

	// A new leaf verifies for a peer that trusts only the old root, only
	// the new one, or both; the leaf issued before still verifies.
	newLeaf := f.leaf(t)
	for name, b := range map[string]*x509bundle.Bundle{
		"old root only": bundleOf(oldRoot),
		"new root only": bundleOf(newRoot.Cert),
		"both":          bundleOf(oldRoot, newRoot.Cert),
	} {
		_, _, err := x509svid.Verify(newLeaf.Chain, b, x509svid.WithTime(f.clock.Now()))
		require.NoError(t, err, name)
		// OpenSSL builds chains differently (first candidate issuer,
		// trusted store first): it must agree.
		testca.RequireOpenSSLVerifies(t, f.clock.Now(), b.X509Authorities(), newLeaf.Chain)
	}
	_, _, err = x509svid.Verify(oldLeaf.Chain, bundleOf(oldRoot, newRoot.Cert), x509svid.WithTime(f.clock.Now()))
	require.NoError(t, err)

	// retire refuses while the old leaf can be valid.
	_, err = f.manager.RetireRoot(ctx, rotation.OpOptions{})
	require.ErrorAs(t, err, &refused)
	require.ErrorContains(t, err, "leaves under the retiring root can be valid until 2030-01-01T01:30:00Z")

	f.clock.Step(leafTTL)
	_, bundleSeq, bundleChanged := f.ca.WatchBundle()
	require.Equal(t, uint64(2), bundleSeq)
	res, err = f.manager.RetireRoot(ctx, rotation.OpOptions{})
	require.NoError(t, err)
	require.True(t, res.Applied)
	set = f.ca.Authorities()
	require.Equal(t, uint64(3), set.Sequence)
	require.Len(t, set.Roots, 1)
	require.Equal(t, newRoot.Cert.Raw, set.Roots[0].Cert.Raw)
	require.Empty(t, set.Chain, "the cross-signed copy goes with its root")
	require.True(t, closed(bundleChanged))
	f.requireStored(t)

	latest := f.leaf(t)
	require.Len(t, latest.Chain, 2)
	_, _, err = x509svid.Verify(latest.Chain, bundleOf(newRoot.Cert), x509svid.WithTime(f.clock.Now()))
	require.NoError(t, err)
	_, _, err = x509svid.Verify(latest.Chain, bundleOf(oldRoot), x509svid.WithTime(f.clock.Now()))
	require.Error(t, err, "the old root no longer verifies new leaves")

	require.Equal(t, []rotation.Step{rotation.StepPrepareRoot, rotation.StepActivateRoot, rotation.StepRetireRoot}, f.saved)
}

func TestActivateAllowedAfterOneLeafLifetime(t *testing.T) {
	f := newManagerFixture(t)
	ctx := context.Background()
	f.tracker.Observe(rotatedID, 1)
	_, err := f.manager.PrepareRoot(ctx, rotation.OpOptions{})
	require.NoError(t, err)

	// The lagging workload keeps renewing with the old bundle...
	f.clock.Step(leafTTL - time.Second)
	f.tracker.Observe(rotatedID, 1)
	_, err = f.manager.ActivateRoot(ctx, rotation.OpOptions{})
	require.Error(t, err)

	// ...but one leaf lifetime after prepare, activate goes ahead.
	f.clock.Step(time.Second)
	res, err := f.manager.ActivateRoot(ctx, rotation.OpOptions{})
	require.NoError(t, err)
	require.True(t, res.Applied)
}

func TestForceOverridesAndSaysSo(t *testing.T) {
	f := newManagerFixture(t)
	ctx := context.Background()
	f.tracker.Observe(rotatedID, 1)
	_, err := f.manager.PrepareRoot(ctx, rotation.OpOptions{})
	require.NoError(t, err)
	res, err := f.manager.ActivateRoot(ctx, rotation.OpOptions{Force: true})
	require.NoError(t, err)
	require.True(t, res.Forced)
	require.True(t, res.Applied)
	res, err = f.manager.RetireRoot(ctx, rotation.OpOptions{Force: true})
	require.NoError(t, err)
	require.True(t, res.Forced)
	require.Len(t, f.ca.Authorities().Roots, 1)
}

// A step whose save fails takes no effect.
func TestFailedSaveChangesNothing(t *testing.T) {
	f := newManagerFixture(t)
	broken := &failingStore{err: errors.New("disk full")}
	m, err := rotation.NewManager(rotation.ManagerOptions{CA: f.ca, Store: broken, MaxLeafTTL: leafTTL, Tracker: f.tracker, Clock: f.clock})
	require.NoError(t, err)
	before := f.ca.Authorities()
	_, err = m.PrepareRoot(context.Background(), rotation.OpOptions{})
	require.ErrorIs(t, err, broken.err)
	require.Same(t, before, f.ca.Authorities())

	f.clock.Step(interTTL - time.Hour)
	require.ErrorIs(t, m.RotateIntermediates(context.Background()), broken.err)
	require.Same(t, before, f.ca.Authorities())
}

type failingStore struct{ err error }

func (s *failingStore) Load(context.Context) (*ca.AuthoritySet, error) { return nil, s.err }
func (s *failingStore) Save(context.Context, *ca.AuthoritySet) error   { return s.err }

// TestRunRotatesOnTicks: Run checks on its ticker, not only at start.
func TestRunRotatesOnTicks(t *testing.T) {
	f := newManagerFixture(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = f.manager.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	first := f.ca.Authorities().Issuer.Cert
	// The ticker is set up; the check at start found nothing due.
	require.Eventually(t, f.clock.HasWaiters, 5*time.Second, time.Millisecond)
	require.Nil(t, f.ca.Authorities().NextIssuer)

	// Past the prepare point (4h left of 12h), a tick prepares...
	f.clock.Step(8 * time.Hour)
	require.Eventually(t, func() bool { return f.ca.Authorities().NextIssuer != nil }, 5*time.Second, time.Millisecond)
	require.Equal(t, first.Raw, f.ca.Authorities().Issuer.Cert.Raw)

	// ...and past the activation point (2h left), a tick activates.
	f.clock.Step(2 * time.Hour)
	require.Eventually(t, func() bool {
		return f.ca.Authorities().Issuer.Cert.SerialNumber.Cmp(first.SerialNumber) != 0
	}, 5*time.Second, time.Millisecond)
}

func TestTracker(t *testing.T) {
	clk := clocktesting.NewFakePassiveClock(time.Unix(0, 0))
	tr := rotation.NewTracker(time.Hour, clk)
	a := spiffeid.RequireFromPath(authTD, "/a")
	b := spiffeid.RequireFromPath(authTD, "/b")
	tr.Observe(a, 1)
	tr.Observe(b, 2)
	seen, holding := tr.Count(2)
	require.Equal(t, 2, seen)
	require.Equal(t, 1, holding)

	tr.Observe(a, 3) // the latest report counts
	seen, holding = tr.Count(2)
	require.Equal(t, 2, seen)
	require.Equal(t, 2, holding)

	clk.SetTime(time.Unix(0, 0).Add(time.Hour + time.Second))
	tr.Observe(b, 1)
	seen, holding = tr.Count(2)
	require.Equal(t, 1, seen, "a was not seen within the window")
	require.Equal(t, 0, holding)
}

func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// conflictStore loses every Save to another replica, whose set Load
// returns.
type conflictStore struct{ theirs *ca.AuthoritySet }

func (s *conflictStore) Load(context.Context) (*ca.AuthoritySet, error) { return s.theirs, nil }
func (s *conflictStore) Save(context.Context, *ca.AuthoritySet) error {
	return fmt.Errorf("test store: %w", ca.ErrConflict)
}

// After a conflict the manager takes what the other replica saved, so its
// next step starts from there instead of conflicting forever.
func TestConflictReloads(t *testing.T) {
	f := newManagerFixture(t)
	theirs := f.ca.Authorities().Clone()
	other, err := ca.NewIntermediate(ca.AuthorityOptions{TrustDomain: authTD, Clock: f.clock}, theirs.Roots[0].Authority)
	require.NoError(t, err)
	theirs.Issuer = other
	m, err := rotation.NewManager(rotation.ManagerOptions{CA: f.ca, Store: &conflictStore{theirs: theirs}, MaxLeafTTL: leafTTL, Tracker: f.tracker, Clock: f.clock})
	require.NoError(t, err)

	_, err = m.PrepareRoot(context.Background(), rotation.OpOptions{})
	require.ErrorIs(t, err, ca.ErrConflict)
	require.Equal(t, other.Cert.Raw, f.ca.Authorities().Issuer.Cert.Raw, "the other replica's set was loaded")
	require.Len(t, f.ca.Authorities().Roots, 1, "the refused step took no effect")
}

// Without a tracker (replicas, each seeing only its own callers), activate
// waits one maximum leaf lifetime after prepare, and says why.
func TestActivateWithoutTracker(t *testing.T) {
	f := newManagerFixture(t)
	m, err := rotation.NewManager(rotation.ManagerOptions{CA: f.ca, Store: f.store, MaxLeafTTL: leafTTL, Clock: f.clock})
	require.NoError(t, err)
	ctx := context.Background()
	_, err = m.PrepareRoot(ctx, rotation.OpOptions{})
	require.NoError(t, err)
	_, err = m.ActivateRoot(ctx, rotation.OpOptions{})
	require.EqualError(t, err, "rotation: activate-root refused: propagation is not tracked by this deployment (replicas each see only their own callers); activate after 2030-01-01T01:00:00Z, one maximum leaf lifetime after prepare")
	f.clock.Step(leafTTL)
	res, err := m.ActivateRoot(ctx, rotation.OpOptions{})
	require.NoError(t, err)
	require.True(t, res.Applied)
}
