package leader_test

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	coordinationv1client "k8s.io/client-go/kubernetes/typed/coordination/v1"
	k8stesting "k8s.io/client-go/testing"

	"github.com/meshca/meshca/internal/leader"
)

const (
	namespace = "meshca"
	leaseName = "meshca-leader"
	// wait bounds every wait, so that a broken election fails the test
	// instead of hanging it.
	wait = 20 * time.Second
)

// newClient returns a fake clientset that keeps resourceVersions as an API
// server does, so that two candidates updating one Lease conflict. (The
// fake alone accepts any update.)
func newClient(t *testing.T) *fake.Clientset {
	t.Helper()
	client := fake.NewClientset()
	var last int64 // reactors run under the Fake's lock
	next := func() string {
		last++
		return strconv.FormatInt(last, 10)
	}
	client.PrependReactor("create", "*", func(action k8stesting.Action) (bool, runtime.Object, error) {
		action.(k8stesting.CreateAction).GetObject().(metav1.Object).SetResourceVersion(next())
		return false, nil, nil
	})
	client.PrependReactor("update", "*", func(action k8stesting.Action) (bool, runtime.Object, error) {
		update := action.(k8stesting.UpdateAction)
		obj := update.GetObject().(metav1.Object)
		stored, err := client.Tracker().Get(update.GetResource(), update.GetNamespace(), obj.GetName())
		if err != nil {
			return false, nil, nil // the tracker answers NotFound
		}
		if stored.(metav1.Object).GetResourceVersion() != obj.GetResourceVersion() {
			gr := schema.GroupResource{Group: update.GetResource().Group, Resource: update.GetResource().Resource}
			return true, nil, apierrors.NewConflict(gr, obj.GetName(), errors.New("the object has been modified"))
		}
		obj.SetResourceVersion(next())
		return false, nil, nil
	})
	return client
}

// fast are short durations for tests.
func fast(client coordinationv1client.LeasesGetter, identity string) leader.Options {
	return leader.Options{
		Client:        client,
		Namespace:     namespace,
		Name:          leaseName,
		Identity:      identity,
		LeaseDuration: 2 * time.Second,
		RenewDeadline: 1500 * time.Millisecond,
		RetryPeriod:   250 * time.Millisecond,
	}
}

// holder is the identity in the Lease of ns.
func holder(t *testing.T, client coordinationv1client.LeasesGetter, ns string) string {
	t.Helper()
	lease, err := client.Leases(ns).Get(context.Background(), leaseName, metav1.GetOptions{})
	require.NoError(t, err)
	if lease.Spec.HolderIdentity == nil {
		return ""
	}
	return *lease.Spec.HolderIdentity
}

func TestNew(t *testing.T) {
	client := fake.NewClientset().CoordinationV1()
	work := func(context.Context) {}
	valid := leader.Options{Client: client, Namespace: namespace, Name: leaseName, Identity: "pod-a", OnStartedLeading: work}
	tests := []struct {
		name   string
		change func(*leader.Options)
		err    string
	}{
		{name: "defaults", change: func(*leader.Options) {}},
		{name: "no client", change: func(o *leader.Options) { o.Client = nil }, err: "leader: a Leases client is required"},
		{name: "no namespace", change: func(o *leader.Options) { o.Namespace = "" }, err: "leader: the Lease's namespace and name are required"},
		{name: "no name", change: func(o *leader.Options) { o.Name = "" }, err: "leader: the Lease's namespace and name are required"},
		{name: "no identity", change: func(o *leader.Options) { o.Identity = "" }, err: "leader: an identity (the pod's name) is required"},
		{name: "no work", change: func(o *leader.Options) { o.OnStartedLeading = nil }, err: "leader: OnStartedLeading is required"},
		{
			name:   "sub-second lease",
			change: func(o *leader.Options) { o.LeaseDuration = 500 * time.Millisecond },
			err:    "leader: lease duration 500ms is under a second; the Lease counts in whole seconds",
		},
		{
			name:   "renew deadline not under the lease",
			change: func(o *leader.Options) { o.LeaseDuration, o.RenewDeadline = 10*time.Second, 10*time.Second },
			err:    "leader: leaseDuration must be greater than renewDeadline",
		},
		{
			name:   "retry period too long",
			change: func(o *leader.Options) { o.RetryPeriod = 9 * time.Second },
			err:    "leader: renewDeadline must be greater than retryPeriod*JitterFactor",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := valid
			tt.change(&opts)
			e, err := leader.New(opts)
			if tt.err != "" {
				require.EqualError(t, err, tt.err)
				require.Nil(t, e)
				return
			}
			require.NoError(t, err)
			require.False(t, e.IsLeader())
			require.Empty(t, e.Leader())
		})
	}
}

func TestRunLeadsAndReleases(t *testing.T) {
	client := newClient(t).CoordinationV1()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	leading := make(chan struct{})
	var stopped atomic.Int32
	var holderWhileStopping atomic.Value
	opts := fast(client, "pod-a")
	var e *leader.Elector
	opts.OnStartedLeading = func(ctx context.Context) {
		close(leading)
		<-ctx.Done()
		// Winding down, the replica still holds the Lease: no other may
		// start leading before this work has returned.
		holderWhileStopping.Store(holder(t, client, namespace))
		if e.IsLeader() {
			t.Error("IsLeader is true once the work's ctx is done")
		}
	}
	opts.OnStoppedLeading = func() { stopped.Add(1) }
	e, err := leader.New(opts)
	require.NoError(t, err)

	done := make(chan error)
	go func() { done <- e.Run(ctx) }()
	select {
	case <-leading:
	case <-time.After(wait):
		t.Fatal("the only candidate did not lead")
	}
	require.True(t, e.IsLeader())
	require.Equal(t, "pod-a", e.Leader())
	require.Equal(t, "pod-a", holder(t, client, namespace))
	require.Zero(t, stopped.Load())

	cancel()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(wait):
		t.Fatal("Run did not return after its ctx was done")
	}
	require.Equal(t, "pod-a", holderWhileStopping.Load())
	require.Empty(t, holder(t, client, namespace), "the Lease is released")
	require.False(t, e.IsLeader())
	require.Equal(t, int32(1), stopped.Load())
}

func TestRunStopsBeforeLeading(t *testing.T) {
	client := newClient(t).CoordinationV1()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a := startCandidate(t, ctx, client, "pod-a")
	<-a.leading

	opts := fast(client, "pod-b")
	var stopped atomic.Bool
	opts.OnStartedLeading = func(context.Context) { t.Error("pod-b led while pod-a held the Lease") }
	opts.OnStoppedLeading = func() { stopped.Store(true) }
	b, err := leader.New(opts)
	require.NoError(t, err)
	bctx, bcancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- b.Run(bctx) }()
	// pod-b campaigns until it has seen pod-a's Lease, then stops.
	require.Eventually(t, func() bool { return b.Leader() == "pod-a" }, wait, 10*time.Millisecond)
	bcancel()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(wait):
		t.Fatal("Run did not return after its ctx was done")
	}
	require.False(t, stopped.Load(), "OnStoppedLeading runs only after leading")
	require.Equal(t, "pod-a", holder(t, client, namespace))
}

func TestHandOver(t *testing.T) {
	client := newClient(t).CoordinationV1()
	ctxA, cancelA := context.WithCancel(context.Background())
	defer cancelA()
	ctxB, cancelB := context.WithCancel(context.Background())
	defer cancelB()
	a := startCandidate(t, ctxA, client, "pod-a")
	<-a.leading
	b := startCandidate(t, ctxB, client, "pod-b")
	require.Eventually(t, func() bool { return b.elector.Leader() == "pod-a" }, wait, 10*time.Millisecond)
	require.False(t, b.elector.IsLeader())

	cancelA()
	select {
	case <-b.leading:
	case <-time.After(wait):
		t.Fatal("pod-b did not take over from pod-a")
	}
	require.Equal(t, "pod-b", holder(t, client, namespace))
	require.False(t, a.elector.IsLeader())
	require.True(t, b.elector.IsLeader())
}

func TestLeaseLost(t *testing.T) {
	// The leader cannot renew (the API server refuses it): its work is
	// cancelled, and it leads again once it can.
	fakeClient := newClient(t)
	var refuse atomic.Bool
	fakeClient.PrependReactor("update", "leases", func(k8stesting.Action) (bool, runtime.Object, error) {
		if refuse.Load() {
			return true, nil, apierrors.NewServiceUnavailable("etcd is down")
		}
		return false, nil, nil
	})
	client := fakeClient.CoordinationV1()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	terms := make(chan context.Context, 2)
	opts := fast(client, "pod-a")
	opts.OnStartedLeading = func(ctx context.Context) {
		terms <- ctx
		<-ctx.Done()
	}
	e, err := leader.New(opts)
	require.NoError(t, err)
	go func() { _ = e.Run(ctx) }()

	first := receive(t, terms)
	refuse.Store(true)
	select {
	case <-first.Done():
	case <-time.After(wait):
		t.Fatal("the work went on after the Lease could not be renewed")
	}
	require.Eventually(t, func() bool { return !e.IsLeader() }, wait, 10*time.Millisecond)
	refuse.Store(false)
	second := receive(t, terms)
	require.NoError(t, second.Err())
	require.True(t, e.IsLeader())
}

type candidate struct {
	elector *leader.Elector
	leading chan struct{} // closed when it starts leading
}

// startCandidate runs a candidate until ctx is done or the test ends.
func startCandidate(t *testing.T, ctx context.Context, client coordinationv1client.LeasesGetter, identity string) *candidate {
	t.Helper()
	c := &candidate{leading: make(chan struct{})}
	opts := fast(client, identity)
	var once sync.Once
	opts.OnStartedLeading = func(ctx context.Context) {
		once.Do(func() { close(c.leading) })
		<-ctx.Done()
	}
	var err error
	c.elector, err = leader.New(opts)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan error)
	go func() { done <- c.elector.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(wait):
			t.Errorf("%s: Run did not return after its ctx was done", identity)
		}
	})
	return c
}

func receive(t *testing.T, terms <-chan context.Context) context.Context {
	t.Helper()
	select {
	case ctx := <-terms:
		return ctx
	case <-time.After(wait):
		t.Fatal("the candidate did not lead")
		return nil
	}
}

// TestLeaseObserver: another candidate runs when it holds the Lease and
// the Lease changes while watched; nobody runs when there is no Lease, or
// when it stays unchanged for a lease duration and three retry periods,
// whatever its renew time says (another node's clock may be off).
func TestLeaseObserver(t *testing.T) {
	ctx := context.Background()
	t0 := time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
	newObserver := func(client *fake.Clientset) *leader.LeaseObserver {
		return &leader.LeaseObserver{Client: client.CoordinationV1(), Namespace: namespace, Name: leaseName,
			Self: "meshca-self", LeaseDuration: 15 * time.Second, RetryPeriod: 2 * time.Second}
	}
	version := 0
	put := func(client *fake.Clientset, holder string, renew time.Time) {
		version++
		seconds := int32(15)
		lease := &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: leaseName, ResourceVersion: strconv.Itoa(version)},
			Spec:       coordinationv1.LeaseSpec{HolderIdentity: &holder, RenewTime: &metav1.MicroTime{Time: renew}, LeaseDurationSeconds: &seconds},
		}
		leases := client.CoordinationV1().Leases(namespace)
		if _, err := leases.Update(ctx, lease, metav1.UpdateOptions{}); apierrors.IsNotFound(err) {
			_, err = leases.Create(ctx, lease, metav1.CreateOptions{})
			require.NoError(t, err)
		} else {
			require.NoError(t, err)
		}
	}
	observe := func(o *leader.LeaseObserver, at time.Time) (leader.LeaseState, string) {
		state, holder, err := o.Observe(ctx, at)
		require.NoError(t, err)
		return state, holder
	}

	t.Run("no Lease", func(t *testing.T) {
		state, _ := observe(newObserver(fake.NewClientset()), t0)
		require.Equal(t, leader.LeaseAbsent, state)
	})
	t.Run("renewed by another: held", func(t *testing.T) {
		client := fake.NewClientset()
		o := newObserver(client)
		// Its renew time is an hour off: only the change counts.
		put(client, "meshca-a", t0.Add(-time.Hour))
		state, holder := observe(o, t0)
		require.Equal(t, leader.LeaseUnknown, state, "one read cannot tell")
		require.Equal(t, "meshca-a", holder)
		put(client, "meshca-a", t0.Add(-time.Hour))
		state, holder = observe(o, t0.Add(2*time.Second))
		require.Equal(t, leader.LeaseHeld, state)
		require.Equal(t, "meshca-a", holder)
		// It stops renewing: a lease duration after the last change
		// seen it is no longer held, and after three retry periods more,
		// idle.
		state, _ = observe(o, t0.Add(16*time.Second))
		require.Equal(t, leader.LeaseHeld, state)
		state, _ = observe(o, t0.Add(22*time.Second))
		require.Equal(t, leader.LeaseUnknown, state)
		state, _ = observe(o, t0.Add(23*time.Second))
		require.Equal(t, leader.LeaseIdle, state)
	})
	t.Run("released, then taken by another", func(t *testing.T) {
		client := fake.NewClientset()
		o := newObserver(client)
		put(client, "", t0)
		state, _ := observe(o, t0)
		require.Equal(t, leader.LeaseUnknown, state)
		put(client, "meshca-b", t0)
		state, holder := observe(o, t0.Add(time.Second))
		require.Equal(t, leader.LeaseHeld, state)
		require.Equal(t, "meshca-b", holder)
	})
	t.Run("released and left: idle", func(t *testing.T) {
		client := fake.NewClientset()
		o := newObserver(client)
		put(client, "", t0)
		state, _ := observe(o, t0)
		require.Equal(t, leader.LeaseUnknown, state)
		state, _ = observe(o, t0.Add(20*time.Second))
		require.Equal(t, leader.LeaseUnknown, state)
		state, _ = observe(o, t0.Add(21*time.Second))
		require.Equal(t, leader.LeaseIdle, state)
	})
	t.Run("held by self, from before a restart: idle once unchanged", func(t *testing.T) {
		client := fake.NewClientset()
		o := newObserver(client)
		put(client, "meshca-self", t0)
		state, _ := observe(o, t0)
		require.Equal(t, leader.LeaseUnknown, state)
		put(client, "meshca-self", t0)
		state, _ = observe(o, t0.Add(time.Second))
		require.Equal(t, leader.LeaseUnknown, state, "this candidate is not another")
		state, _ = observe(o, t0.Add(22*time.Second))
		require.Equal(t, leader.LeaseIdle, state)
	})
}
