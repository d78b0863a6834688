package leader

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	coordinationv1client "k8s.io/client-go/kubernetes/typed/coordination/v1"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/klog/v2"
)

// Defaults of Options, those of Kubernetes' own controllers.
const (
	DefaultLeaseDuration = 15 * time.Second
	DefaultRenewDeadline = 10 * time.Second
	DefaultRetryPeriod   = 2 * time.Second
)

// Options configure an Elector.
type Options struct {
	// Client reaches the Leases API. Required.
	Client coordinationv1client.LeasesGetter

	// Namespace is the CA's namespace, where the Lease lives. Required.
	Namespace string

	// Name is the Lease's name. Required.
	Name string

	// Identity names this replica in the Lease, unique among the
	// candidates: the pod's name. Required.
	Identity string

	// LeaseDuration is how long the other candidates wait, after the last
	// renewal they saw, before they take the Lease; zero means
	// DefaultLeaseDuration.
	LeaseDuration time.Duration

	// RenewDeadline is how long the leader tries to renew before it gives
	// up leading; zero means DefaultRenewDeadline. It must be shorter than
	// LeaseDuration.
	RenewDeadline time.Duration

	// RetryPeriod is the wait between two tries to take or renew the
	// Lease; zero means DefaultRetryPeriod. RenewDeadline must be more
	// than 1.2 times as long.
	RetryPeriod time.Duration

	// Logger receives the election's events; nil discards.
	Logger *slog.Logger

	// OnStartedLeading runs the leader's work. Its ctx is cancelled when
	// the Lease is lost or Run's ctx is done, and it should return soon
	// after: on a graceful stop, the Lease is released only once it has
	// returned, so that two replicas never do the leader's work at once.
	// Required.
	OnStartedLeading func(ctx context.Context)

	// OnStoppedLeading, if set, is called each time OnStartedLeading has
	// returned.
	OnStoppedLeading func()
}

// Elector campaigns for a coordination.k8s.io Lease and runs the leader's
// work while it holds it. It is safe for concurrent use.
type Elector struct {
	opts   Options
	log    *slog.Logger
	work   atomic.Pointer[context.Context] // the leader's work's, while it runs
	leader atomic.Pointer[string]
}

// New returns an Elector, checking opts. It makes no API call.
func New(opts Options) (*Elector, error) {
	switch {
	case opts.Client == nil:
		return nil, errors.New("leader: a Leases client is required")
	case opts.Namespace == "" || opts.Name == "":
		return nil, errors.New("leader: the Lease's namespace and name are required")
	case opts.Identity == "":
		return nil, errors.New("leader: an identity (the pod's name) is required")
	case opts.OnStartedLeading == nil:
		return nil, errors.New("leader: OnStartedLeading is required")
	}
	if opts.LeaseDuration == 0 {
		opts.LeaseDuration = DefaultLeaseDuration
	}
	if opts.RenewDeadline == 0 {
		opts.RenewDeadline = DefaultRenewDeadline
	}
	if opts.RetryPeriod == 0 {
		opts.RetryPeriod = DefaultRetryPeriod
	}
	if opts.LeaseDuration < time.Second {
		return nil, fmt.Errorf("leader: lease duration %s is under a second; the Lease counts in whole seconds", opts.LeaseDuration)
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	e := &Elector{opts: opts, log: opts.Logger.With("lease", opts.Namespace+"/"+opts.Name, "identity", opts.Identity)}
	if _, err := e.elector(leaderelection.LeaderCallbacks{OnStartedLeading: func(context.Context) {}, OnStoppedLeading: func() {}}); err != nil {
		return nil, err
	}
	return e, nil
}

// Run campaigns for the Lease until ctx is done, running OnStartedLeading
// each time it is won, and campaigning again when it is lost. When ctx is
// done, it cancels the leader's work, waits for it, releases the Lease so
// that another replica takes over at once, and returns nil.
func Run(ctx context.Context, opts Options) error {
	e, err := New(opts)
	if err != nil {
		return err
	}
	return e.Run(ctx)
}

// Run is the package's Run with e's options.
func (e *Elector) Run(ctx context.Context) error {
	for ctx.Err() == nil {
		if err := e.term(ctx); err != nil {
			return err
		}
	}
	return nil
}

// IsLeader reports whether this replica holds the Lease and its
// OnStartedLeading is running.
func (e *Elector) IsLeader() bool {
	ctx := e.work.Load()
	return ctx != nil && (*ctx).Err() == nil
}

// Leader returns the identity of the last leader observed, for logs and
// status; empty before any.
func (e *Elector) Leader() string {
	if id := e.leader.Load(); id != nil {
		return *id
	}
	return ""
}

// term runs one campaign: until the Lease is lost once won, or ctx is done.
func (e *Elector) term(ctx context.Context) error {
	// The election outlives ctx until the leader's work has stopped; only
	// then is the Lease released.
	electCtx, stopElecting := context.WithCancel(context.WithoutCancel(ctx))
	defer stopElecting()
	electCtx = klog.NewContext(electCtx, logr.FromSlogHandler(e.log.Handler()))

	var (
		mu      sync.Mutex
		over    bool // no work starts once set
		working sync.WaitGroup
	)
	le, err := e.elector(leaderelection.LeaderCallbacks{
		OnStartedLeading: func(leadCtx context.Context) {
			mu.Lock()
			if over {
				mu.Unlock()
				return
			}
			working.Add(1)
			mu.Unlock()
			defer working.Done()
			e.lead(ctx, leadCtx)
		},
		OnStoppedLeading: func() {},
		OnNewLeader: func(id string) {
			e.leader.Store(&id)
			if id != e.opts.Identity {
				e.log.Info("another replica leads", "leader", id)
			}
		},
	})
	if err != nil {
		return err
	}
	electionDone := make(chan struct{})
	go func() {
		defer close(electionDone)
		le.Run(electCtx)
	}()
	stop := func() {
		mu.Lock()
		over = true
		mu.Unlock()
		working.Wait()
	}
	select {
	case <-ctx.Done():
		stop()
		stopElecting()
		<-electionDone
	case <-electionDone:
		// The Lease was lost; the work's ctx is cancelled already.
		stop()
	}
	return nil
}

// lead runs the leader's work with a ctx cancelled when the Lease is lost
// (leadCtx) or Run is asked to stop (ctx).
func (e *Elector) lead(ctx, leadCtx context.Context) {
	workCtx, cancel := context.WithCancel(leadCtx)
	defer cancel()
	stopOnCancel := context.AfterFunc(ctx, cancel)
	defer stopOnCancel()
	id := e.opts.Identity
	e.leader.Store(&id)
	e.work.Store(&workCtx)
	e.log.Info("started leading")
	e.opts.OnStartedLeading(workCtx)
	e.work.Store(nil)
	e.log.Info("stopped leading")
	if e.opts.OnStoppedLeading != nil {
		e.opts.OnStoppedLeading()
	}
}

func (e *Elector) elector(callbacks leaderelection.LeaderCallbacks) (*leaderelection.LeaderElector, error) {
	le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock: &resourcelock.LeaseLock{
			LeaseMeta:  metav1.ObjectMeta{Namespace: e.opts.Namespace, Name: e.opts.Name},
			Client:     e.opts.Client,
			LockConfig: resourcelock.ResourceLockConfig{Identity: e.opts.Identity},
			Labels:     map[string]string{"app.kubernetes.io/name": "meshca"},
		},
		LeaseDuration:   e.opts.LeaseDuration,
		RenewDeadline:   e.opts.RenewDeadline,
		RetryPeriod:     e.opts.RetryPeriod,
		Callbacks:       callbacks,
		ReleaseOnCancel: true,
		Name:            e.opts.Name,
	})
	if err != nil {
		return nil, fmt.Errorf("leader: %w", err)
	}
	return le, nil
}

// LeaseState is what a LeaseObserver has learned of a Lease.
type LeaseState int

const (
	// LeaseUnknown: not watched long enough to tell.
	LeaseUnknown LeaseState = iota
	// LeaseAbsent: there is no Lease, so no candidate has ever led.
	LeaseAbsent
	// LeaseHeld: another candidate holds the Lease and renewed it while
	// it was watched: a replica is running and leading.
	LeaseHeld
	// LeaseIdle: the Lease has not changed for a lease duration and
	// three retry periods: nobody renews it and nobody has taken it, so
	// no candidate runs.
	LeaseIdle
)

// LeaseObserver tells whether another candidate runs, by watching a Lease
// change rather than by comparing its renew time with this machine's
// clock: another node's clock may be off by more than a lease duration. A
// leader renews its Lease every retry period. A running candidate takes a
// released Lease at its next try, and a lapsed one a lease duration after
// it last saw it change; it tries every retry period plus up to 120 %
// jitter (client-go's). A Lease that does not change for a lease duration
// and three retry periods is nobody's.
type LeaseObserver struct {
	Client        coordinationv1client.LeasesGetter
	Namespace     string
	Name          string
	Self          string // this candidate's identity
	LeaseDuration time.Duration
	RetryPeriod   time.Duration

	observed bool
	version  string    // the resourceVersion last read
	since    time.Time // when version was first read
	changed  bool      // whether the Lease changed while watched
}

// Observe reads the Lease at now, a time of this machine's monotonic
// clock, and returns what is known so far, with the Lease's holder.
func (o *LeaseObserver) Observe(ctx context.Context, now time.Time) (LeaseState, string, error) {
	lease, err := o.Client.Leases(o.Namespace).Get(ctx, o.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return LeaseAbsent, "", nil
	case err != nil:
		return LeaseUnknown, "", fmt.Errorf("leader: reading Lease %s/%s: %w", o.Namespace, o.Name, err)
	}
	var holder string
	if lease.Spec.HolderIdentity != nil {
		holder = *lease.Spec.HolderIdentity
	}
	if !o.observed || lease.ResourceVersion != o.version {
		o.changed = o.observed
		o.observed, o.version, o.since = true, lease.ResourceVersion, now
	}
	quiet := now.Sub(o.since)
	switch {
	case o.changed && holder != "" && holder != o.Self && quiet < o.LeaseDuration:
		return LeaseHeld, holder, nil
	case quiet >= o.LeaseDuration+3*o.RetryPeriod:
		return LeaseIdle, holder, nil
	}
	return LeaseUnknown, holder, nil
}
