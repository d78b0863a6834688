package ban

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultMaxBans bounds the bans a Registry holds when Options.MaxBans is
// zero: a Kubernetes Secret holds at most 1 MiB.
const DefaultMaxBans = 1000

// Store keeps the bans. Update is a read-modify-write that never loses a
// concurrent writer's change: a store shared by replicas re-reads and
// applies fn again when another writer got there first.
type Store interface {
	// Load returns the stored bans; none when nothing is stored yet.
	Load(ctx context.Context) ([]Ban, error)

	// Update stores what fn makes of the stored bans, and returns it.
	// When fn fails, nothing is stored and its error is returned.
	Update(ctx context.Context, fn func([]Ban) ([]Ban, error)) ([]Ban, error)
}

// Watcher is a Store that tells of changes made by other writers (other
// replicas).
type Watcher interface {
	// Watch calls changed with the stored bans on every change, and
	// failed when the watch breaks, until ctx is done; it retries on its
	// own. It returns nil when ctx is done.
	Watch(ctx context.Context, changed func([]Ban), failed func(error)) error
}

// Options configure a Registry.
type Options struct {
	// Store keeps the bans. Required.
	Store Store

	// TrustDomain is the CA's: only its IDs and namespaces are banned.
	// Required.
	TrustDomain spiffeid.TrustDomain

	// Now is the clock deciding expiry; nil means time.Now.
	Now func() time.Time

	// MaxBans bounds the bans in force; zero means DefaultMaxBans.
	MaxBans int

	// Logger receives the changes heard from the store and watch
	// failures; nil discards.
	Logger *slog.Logger

	// Registerer receives the registry's metrics; nil registers nowhere.
	Registerer prometheus.Registerer
}

// Registry is the set of bans in force, checked on every request and
// changed by the admin API. It is safe for concurrent use.
type Registry struct {
	store   Store
	td      spiffeid.TrustDomain
	now     func() time.Time
	max     int
	log     *slog.Logger
	failed  prometheus.Counter
	updates prometheus.Counter

	mu   sync.RWMutex
	bans []Ban
}

// New loads the stored bans and returns a Registry holding them. It fails
// when they cannot be loaded: a CA must not sign while it does not know
// its bans.
func New(ctx context.Context, opts Options) (*Registry, error) {
	if opts.Store == nil || opts.TrustDomain.IsZero() {
		return nil, errors.New("ban: a Store and a TrustDomain are required")
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.MaxBans <= 0 {
		opts.MaxBans = DefaultMaxBans
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Registerer == nil {
		opts.Registerer = prometheus.NewRegistry()
	}
	r := &Registry{
		store: opts.Store,
		td:    opts.TrustDomain,
		now:   opts.Now,
		max:   opts.MaxBans,
		log:   opts.Logger,
		failed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshca_ban_watch_failures_total",
			Help: "Times the watch of the shared bans broke; the bans last known stay in force while it is retried.",
		}),
		updates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshca_ban_updates_received_total",
			Help: "Changes of the shared bans heard from the store (made by any replica).",
		}),
	}
	inForce := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "meshca_bans_in_force",
		Help: "Bans in force: SPIFFE IDs and namespaces for which no certificate is issued.",
	}, func() float64 { return float64(len(r.List())) })
	for _, c := range []prometheus.Collector{r.failed, r.updates, inForce} {
		if err := opts.Registerer.Register(c); err != nil {
			return nil, fmt.Errorf("ban: registering metrics: %w", err)
		}
	}
	bans, err := opts.Store.Load(ctx)
	if err != nil {
		return nil, fmt.Errorf("ban: loading the bans: %w", err)
	}
	r.set(bans)
	return r, nil
}

// Run follows the changes other replicas make to a shared store, until
// ctx is done. A broken watch is logged, counted
// (meshca_ban_watch_failures_total) and retried; the bans last known stay
// in force meanwhile. For a store that is not a Watcher it returns at once.
func (r *Registry) Run(ctx context.Context) error {
	w, ok := r.store.(Watcher)
	if !ok {
		return nil
	}
	return w.Watch(ctx, func(bans []Ban) {
		r.updates.Inc()
		if r.set(bans) {
			r.log.Info("bans updated from the store", "bans_in_force", len(r.List()))
		}
	}, func(err error) {
		r.failed.Inc()
		r.log.Error("watching the stored bans failed; the bans last known stay in force, retrying", "error", err)
	})
}

// set makes bans those in memory and reports whether they changed.
func (r *Registry) set(bans []Ban) bool {
	bans = slices.Clone(bans)
	sortBans(bans)
	r.mu.Lock()
	defer r.mu.Unlock()
	changed := !slices.Equal(r.bans, bans)
	r.bans = bans
	return changed
}

// Banned returns the ban in force on id, if any: one on id itself, or on
// its namespace.
func (r *Registry) Banned(id spiffeid.ID) (Ban, bool) {
	now := r.now()
	r.mu.RLock()
	defer r.mu.RUnlock()
	for _, b := range r.bans {
		if b.InForce(now) && b.Target.Matches(id) {
			return b, true
		}
	}
	return Ban{}, false
}

// List returns the bans in force, sorted by target.
func (r *Registry) List() []Ban {
	now := r.now()
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]Ban, 0, len(r.bans))
	for _, b := range r.bans {
		if b.InForce(now) {
			out = append(out, b)
		}
	}
	return out
}

// Add bans b.Target for ttl (zero: until removed), created now, and
// stores it before it returns: the ban is in force on this replica at
// once, and on the others when they hear of it. A ban of the same target
// is replaced (replaced is then true). Its errors wrap ErrInvalid for a
// bad ban, ErrTooMany when the store is full.
func (r *Registry) Add(ctx context.Context, b Ban, ttl time.Duration) (added Ban, replaced bool, err error) {
	switch {
	case b.Target.IsZero():
		return Ban{}, false, fmt.Errorf("%w: a target is required", ErrInvalid)
	case b.Target.TrustDomain() != r.td:
		return Ban{}, false, fmt.Errorf("%w: target %q is not in trust domain %q", ErrInvalid, b.Target, r.td.Name())
	case ttl < 0:
		return Ban{}, false, fmt.Errorf("%w: the lifetime %s is negative; zero means until removed", ErrInvalid, ttl)
	}
	if err := checkReason(b.Reason); err != nil {
		return Ban{}, false, err
	}
	now := r.now()
	// Round(0) drops the monotonic reading: the times are stored.
	b.Created = now.Round(0).UTC()
	b.Expires = time.Time{}
	if ttl > 0 {
		b.Expires = now.Add(ttl).Round(0).UTC()
	}
	stored, err := r.store.Update(ctx, func(bans []Ban) ([]Ban, error) {
		out := r.prune(bans, now)
		i := slices.IndexFunc(out, func(x Ban) bool { return x.Target == b.Target })
		replaced = i >= 0
		if replaced {
			out[i] = b
			return out, nil
		}
		if len(out) >= r.max {
			return nil, fmt.Errorf("%w: %d bans are in force, the most this CA keeps; remove some, or ban a namespace", ErrTooMany, len(out))
		}
		return append(out, b), nil
	})
	if err != nil {
		return Ban{}, false, err
	}
	r.set(stored)
	return b, replaced, nil
}

// Remove lifts the ban on target and stores that before it returns. It
// returns the ban lifted; its error wraps ErrNotBanned when target has
// no ban in force.
func (r *Registry) Remove(ctx context.Context, target Target) (Ban, error) {
	now := r.now()
	var removed Ban
	stored, err := r.store.Update(ctx, func(bans []Ban) ([]Ban, error) {
		out := r.prune(bans, now)
		i := slices.IndexFunc(out, func(x Ban) bool { return x.Target == target })
		if i < 0 {
			return nil, fmt.Errorf("%w: %s has no ban in force", ErrNotBanned, target.Describe())
		}
		removed = out[i]
		return slices.Delete(out, i, i+1), nil
	})
	if err != nil {
		return Ban{}, err
	}
	r.set(stored)
	return removed, nil
}

// prune returns the bans of bans still in force at now: expired bans
// leave the store at the next change.
func (r *Registry) prune(bans []Ban, now time.Time) []Ban {
	out := make([]Ban, 0, len(bans)+1)
	for _, b := range bans {
		if b.InForce(now) {
			out = append(out, b)
		}
	}
	return out
}
