package federation

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/utils/clock"
)

// Defaults for the zero values of Options.
const (
	DefaultRefresh       = 5 * time.Minute
	DefaultMinRefresh    = 30 * time.Second
	DefaultMaxRefresh    = time.Hour
	DefaultRetryInterval = 10 * time.Second
	DefaultFetchTimeout  = 30 * time.Second
	DefaultMaxBundleSize = 1 << 20
	DefaultMaxPeers      = 64
)

// jitter is the largest fraction of a refresh interval a refresh is moved
// earlier by, so that peers refreshing together spread out. Refreshes are
// never later than the interval.
const jitter = 0.1

// saveTimeout bounds a save of the state after a fetch.
const saveTimeout = 30 * time.Second

// Options configure a Federator.
type Options struct {
	// TrustDomain is this server's own trust domain, which is never a
	// peer. Required.
	TrustDomain spiffeid.TrustDomain

	// Store keeps the peers and their last good bundles across restarts;
	// nil keeps them in memory only.
	Store Store

	// Clock tells the time and runs the refresh timers; nil means the real
	// clock.
	Clock clock.Clock

	// DefaultRefresh is how often a peer whose bundle has no
	// spiffe_refresh_hint is fetched; zero means DefaultRefresh.
	DefaultRefresh time.Duration

	// MinRefresh and MaxRefresh bound the interval a peer's refresh hint
	// asks for; zero means DefaultMinRefresh and DefaultMaxRefresh.
	MinRefresh, MaxRefresh time.Duration

	// RetryInterval is the wait before the first retry of a failed fetch;
	// it doubles with each failure in a row, up to the refresh interval.
	// Zero means DefaultRetryInterval.
	RetryInterval time.Duration

	// FetchTimeout bounds one fetch, body included; zero means
	// DefaultFetchTimeout.
	FetchTimeout time.Duration

	// MaxBundleSize bounds a fetched bundle document, in bytes; zero means
	// DefaultMaxBundleSize (1 MiB).
	MaxBundleSize int64

	// MaxPeers bounds the number of peers; zero means DefaultMaxPeers.
	MaxPeers int

	// Logger receives operational logs; nil discards them.
	Logger *slog.Logger

	// Registerer receives the federator's metrics; nil registers nowhere.
	Registerer prometheus.Registerer
}

func (o Options) complete() (Options, error) {
	if o.TrustDomain.IsZero() {
		return o, errors.New("federation: Options.TrustDomain is required")
	}
	setDefault(&o.DefaultRefresh, DefaultRefresh)
	setDefault(&o.MinRefresh, DefaultMinRefresh)
	setDefault(&o.MaxRefresh, DefaultMaxRefresh)
	setDefault(&o.RetryInterval, DefaultRetryInterval)
	setDefault(&o.FetchTimeout, DefaultFetchTimeout)
	setDefault(&o.MaxBundleSize, DefaultMaxBundleSize)
	setDefault(&o.MaxPeers, DefaultMaxPeers)
	switch {
	case o.DefaultRefresh < 0, o.MinRefresh < 0, o.MaxRefresh < 0, o.RetryInterval < 0, o.FetchTimeout < 0, o.MaxBundleSize < 0, o.MaxPeers < 0:
		return o, errors.New("federation: Options durations, sizes and counts must not be negative")
	case o.MinRefresh > o.MaxRefresh:
		return o, fmt.Errorf("federation: MinRefresh %s is above MaxRefresh %s", o.MinRefresh, o.MaxRefresh)
	}
	if o.Clock == nil {
		o.Clock = clock.RealClock{}
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o, nil
}

func setDefault[T int | int64 | time.Duration](v *T, def T) {
	if *v == 0 {
		*v = def
	}
}

// Federator keeps the bundles of the trust domains this one federates
// with. For each peer it fetches the bundle from the peer's endpoint at
// the bundle's refresh hint, checks it, and keeps the last good bundle
// when a fetch fails or is refused. It publishes the bundles through
// Watch, and is a spiffebundle.Source and an x509bundle.Source of the
// peers' trust domains.
//
// Create one with New, call Run once, and add and remove peers at any
// time. It is safe for concurrent use.
type Federator struct {
	opts    Options
	log     *slog.Logger
	clock   clock.Clock
	metrics *metrics

	// regMu serialises changes of the peer set and saves of the state,
	// so that the last save holds the last state. It is taken before mu.
	regMu sync.Mutex

	mu      sync.Mutex
	peers   map[spiffeid.TrustDomain]*peer
	changed chan struct{} // closed and replaced when the bundles change
	runCtx  context.Context
	ran     bool
	wg      sync.WaitGroup
}

// peer is a Peer with its fetcher and fetch state.
type peer struct {
	cfg     Peer
	fetcher *fetcher

	fetchMu sync.Mutex    // one fetch at a time
	kick    chan struct{} // wakes the refresh loop to reschedule

	// Guarded by Federator.mu.
	stop        context.CancelFunc // ends the refresh loop; nil when none runs
	bundle      *spiffebundle.Bundle
	lastAttempt time.Time
	lastSuccess time.Time
	next        time.Time
	lastErr     *FetchError
	failures    int
	removed     bool
}

// PeerStatus is a peer with the state of its federation.
type PeerStatus struct {
	// Peer is the peer as added.
	Peer Peer

	// Bundle is the peer's last good bundle (the bootstrap bundle until a
	// first fetch succeeds); nil when there is none. It must not be
	// modified.
	Bundle *spiffebundle.Bundle

	// LastAttempt and LastSuccess are when a fetch last ended, and last
	// ended with a bundle taken; zero if never.
	LastAttempt, LastSuccess time.Time

	// LastError is why the last fetch failed; nil when it succeeded.
	LastError *FetchError

	// ConsecutiveFailures counts the failed fetches since the last good
	// one.
	ConsecutiveFailures int

	// NextRefresh is when the peer is fetched next; zero means at once
	// (when the federator runs).
	NextRefresh time.Time
}

// New returns a Federator for the peers in opts.Store, published with
// their last good bundles at once, before any fetch.
func New(ctx context.Context, opts Options) (*Federator, error) {
	opts, err := opts.complete()
	if err != nil {
		return nil, err
	}
	f := &Federator{
		opts:    opts,
		log:     opts.Logger,
		clock:   opts.Clock,
		peers:   make(map[spiffeid.TrustDomain]*peer),
		changed: make(chan struct{}),
	}
	if opts.Store != nil {
		state, err := opts.Store.Load(ctx)
		if err != nil {
			return nil, fmt.Errorf("federation: loading the peers: %w", err)
		}
		if err := f.restore(state); err != nil {
			return nil, err
		}
	}
	f.metrics, err = newMetrics(opts.Registerer, f)
	if err != nil {
		return nil, fmt.Errorf("federation: registering metrics: %w", err)
	}
	return f, nil
}

// restore adds the peers of a loaded state.
func (f *Federator) restore(state *State) error {
	if state == nil {
		return nil
	}
	if len(state.Peers) > f.opts.MaxPeers {
		return fmt.Errorf("%w: the stored state has %d peers, over the limit of %d", ErrTooManyPeers, len(state.Peers), f.opts.MaxPeers)
	}
	for _, ps := range state.Peers {
		if err := ps.Peer.validate(f.opts.TrustDomain); err != nil {
			return fmt.Errorf("federation: stored peer: %w", err)
		}
		td := ps.Peer.TrustDomain
		if _, ok := f.peers[td]; ok {
			return fmt.Errorf("federation: stored peers: %w: %q appears twice", ErrPeerExists, td)
		}
		p := f.newPeer(ps.Peer)
		if ps.Bundle != nil {
			if ps.Bundle.TrustDomain() != td {
				return fmt.Errorf("federation: stored bundle of peer %q is for %q", td, ps.Bundle.TrustDomain())
			}
			p.bundle, p.lastSuccess = ps.Bundle, ps.LastSuccess
		}
		f.peers[td] = p
	}
	return nil
}

// newPeer returns the running state of cfg, with its bootstrap bundle as
// the last good one.
func (f *Federator) newPeer(cfg Peer) *peer {
	p := &peer{cfg: cfg.clone(), kick: make(chan struct{}, 1)}
	p.bundle = p.cfg.Bootstrap
	p.fetcher = newFetcher(p.cfg, peerTrust{f: f, p: p}, f.opts.FetchTimeout, f.opts.MaxBundleSize)
	return p
}

// peerTrust is an x509bundle.Source of one peer's last good bundle: the
// bundle an https_spiffe endpoint is authenticated with.
type peerTrust struct {
	f *Federator
	p *peer
}

func (t peerTrust) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	t.f.mu.Lock()
	b := t.p.bundle
	t.f.mu.Unlock()
	if b == nil || td != t.p.cfg.TrustDomain {
		return nil, fmt.Errorf("federation: no bundle of trust domain %q to authenticate the endpoint of %q", td, t.p.cfg.TrustDomain)
	}
	return b.X509Bundle(), nil
}

// Run fetches every peer's bundle at once, then at its refresh hint, until
// ctx ends. Peers added while it runs are fetched at once too. It may be
// called once.
func (f *Federator) Run(ctx context.Context) error {
	f.mu.Lock()
	if f.ran {
		f.mu.Unlock()
		return errors.New("federation: Run called twice")
	}
	f.ran, f.runCtx = true, ctx
	for _, p := range f.peers {
		f.startLocked(p)
	}
	f.mu.Unlock()

	<-ctx.Done()
	f.mu.Lock()
	f.runCtx = nil
	f.mu.Unlock()
	f.wg.Wait()
	return nil
}

// startLocked starts p's refresh loop if the federator runs.
func (f *Federator) startLocked(p *peer) {
	if f.runCtx == nil || f.runCtx.Err() != nil {
		return
	}
	ctx, cancel := context.WithCancel(f.runCtx)
	p.stop = cancel
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		f.refreshLoop(ctx, p)
	}()
}

// refreshLoop fetches p whenever its next refresh is due, until ctx ends.
func (f *Federator) refreshLoop(ctx context.Context, p *peer) {
	for {
		f.mu.Lock()
		next := p.next
		f.mu.Unlock()
		if wait := next.Sub(f.clock.Now()); wait > 0 {
			t := f.clock.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-p.kick:
				t.Stop()
				continue // Refresh fetched: schedule again
			case <-t.C():
			}
		}
		if ctx.Err() != nil {
			return
		}
		_ = f.fetch(ctx, p)
	}
}

// Refresh fetches the bundle of peer td now, whatever its schedule, and
// returns the peer's status after it; the error is the fetch's
// *FetchError, or ErrUnknownPeer.
func (f *Federator) Refresh(ctx context.Context, td spiffeid.TrustDomain) (PeerStatus, error) {
	f.mu.Lock()
	p, ok := f.peers[td]
	f.mu.Unlock()
	if !ok {
		return PeerStatus{}, fmt.Errorf("%w: %q", ErrUnknownPeer, td)
	}
	ferr := f.fetch(ctx, p)
	select {
	case p.kick <- struct{}{}:
	default:
	}
	f.mu.Lock()
	st := p.statusLocked()
	f.mu.Unlock()
	if ferr != nil {
		return st, ferr
	}
	if err := ctx.Err(); err != nil {
		return st, err
	}
	return st, nil
}

// fetch fetches p's bundle and takes it or keeps the last good one. A
// fetch ended by ctx is not recorded.
func (f *Federator) fetch(ctx context.Context, p *peer) *FetchError {
	p.fetchMu.Lock()
	defer p.fetchMu.Unlock()
	b, ferr := p.fetcher.fetch(ctx)
	if ctx.Err() != nil {
		return ferr
	}
	now := f.clock.Now()

	f.mu.Lock()
	if p.removed {
		f.mu.Unlock()
		return ferr
	}
	last := p.bundle
	if ferr == nil {
		ferr = checkOrder(last, b)
	}
	p.lastAttempt = now
	changed := false
	if ferr != nil {
		p.lastErr = ferr
		p.failures++
		p.next = now.Add(f.retryDelay(last, p.failures))
	} else {
		p.lastErr, p.failures, p.lastSuccess = nil, 0, now
		if !b.Equal(last) {
			p.bundle, changed = b, true
			f.notifyLocked()
		}
		p.next = now.Add(withJitter(f.interval(b)))
	}
	next := p.next
	td := p.cfg.TrustDomain
	// Counted under mu, so that a removed peer's series, once deleted,
	// stay deleted.
	switch {
	case ferr != nil:
		f.metrics.fetched(td, string(ferr.Reason))
	case changed:
		f.metrics.fetched(td, "updated")
	default:
		f.metrics.fetched(td, "unchanged")
	}
	f.mu.Unlock()

	switch {
	case ferr != nil:
		f.log.Warn("federation: no new bundle of a peer; keeping the last good one",
			"trust_domain", td.Name(), "reason", string(ferr.Reason), "error", ferr.Err, "next_refresh", next)
	case changed:
		seq, _ := b.SequenceNumber()
		f.log.Info("federation: new bundle of a peer", "trust_domain", td.Name(), "sequence", seq,
			"x509_authorities", len(b.X509Authorities()), "next_refresh", next)
		f.save()
	default:
		f.log.Debug("federation: peer's bundle unchanged", "trust_domain", td.Name(), "next_refresh", next)
	}
	return ferr
}

// interval is how long b asks to be kept before the next fetch, within
// the configured bounds.
func (f *Federator) interval(b *spiffebundle.Bundle) time.Duration {
	d := f.opts.DefaultRefresh
	if b != nil {
		if hint, ok := b.RefreshHint(); ok && hint > 0 {
			d = hint
		}
	}
	return min(max(d, f.opts.MinRefresh), f.opts.MaxRefresh)
}

// retryDelay is the wait after the failures-th failed fetch in a row:
// RetryInterval doubling, up to the refresh interval of the last good
// bundle.
func (f *Federator) retryDelay(last *spiffebundle.Bundle, failures int) time.Duration {
	limit := f.interval(last)
	d := f.opts.RetryInterval
	for i := 1; i < failures && d < limit; i++ {
		d *= 2
	}
	return withJitter(min(d, limit))
}

func withJitter(d time.Duration) time.Duration {
	return d - time.Duration(rand.Float64()*jitter*float64(d))
}

// notifyLocked tells watchers that the bundles changed.
func (f *Federator) notifyLocked() {
	close(f.changed)
	f.changed = make(chan struct{})
}

// save writes the state to the store, if any. A failure is logged and
// counted: the bundles are kept in memory and saved with the next change.
func (f *Federator) save() {
	if f.opts.Store == nil {
		return
	}
	f.regMu.Lock()
	defer f.regMu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), saveTimeout)
	defer cancel()
	if err := f.opts.Store.Save(ctx, f.state(nil, spiffeid.TrustDomain{})); err != nil {
		f.metrics.storeErrors.Inc()
		f.log.Error("federation: saving the federated bundles", "error", err)
	}
}

// state returns the state to store: the current peers, plus add if not
// nil, minus the peer of trust domain drop.
func (f *Federator) state(add *peer, drop spiffeid.TrustDomain) *State {
	f.mu.Lock()
	defer f.mu.Unlock()
	ps := make([]*peer, 0, len(f.peers)+1)
	for td, p := range f.peers {
		if td != drop {
			ps = append(ps, p)
		}
	}
	if add != nil {
		ps = append(ps, add)
	}
	slices.SortFunc(ps, func(a, b *peer) int { return compareTD(a.cfg.TrustDomain, b.cfg.TrustDomain) })
	s := &State{Peers: make([]PeerState, 0, len(ps))}
	for _, p := range ps {
		st := PeerState{Peer: p.cfg, LastSuccess: p.lastSuccess}
		if p.bundle != p.cfg.Bootstrap {
			st.Bundle = p.bundle
		}
		s.Peers = append(s.Peers, st)
	}
	return s
}

func compareTD(a, b spiffeid.TrustDomain) int {
	switch {
	case a.Name() < b.Name():
		return -1
	case a.Name() > b.Name():
		return 1
	}
	return 0
}

// Watch returns the peers' current bundles, ordered by trust domain, and
// a channel closed when they next change: a peer's new bundle, a peer
// added with a bootstrap bundle, a peer removed. The bundles must not be
// modified.
func (f *Federator) Watch() ([]*spiffebundle.Bundle, <-chan struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.bundlesLocked(), f.changed
}

// Bundles returns the peers' current bundles, ordered by trust domain.
// They must not be modified.
func (f *Federator) Bundles() []*spiffebundle.Bundle {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.bundlesLocked()
}

func (f *Federator) bundlesLocked() []*spiffebundle.Bundle {
	out := make([]*spiffebundle.Bundle, 0, len(f.peers))
	for _, p := range f.peers {
		if p.bundle != nil {
			out = append(out, p.bundle)
		}
	}
	slices.SortFunc(out, func(a, b *spiffebundle.Bundle) int { return compareTD(a.TrustDomain(), b.TrustDomain()) })
	return out
}

// GetBundleForTrustDomain implements spiffebundle.Source with the peers'
// last good bundles.
func (f *Federator) GetBundleForTrustDomain(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if p, ok := f.peers[td]; ok && p.bundle != nil {
		return p.bundle, nil
	}
	return nil, fmt.Errorf("federation: no bundle for trust domain %q", td)
}

// GetX509BundleForTrustDomain implements x509bundle.Source with the
// peers' last good bundles, so that SVIDs of federated trust domains can
// be verified.
func (f *Federator) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	b, err := f.GetBundleForTrustDomain(td)
	if err != nil {
		return nil, err
	}
	return b.X509Bundle(), nil
}

var (
	_ spiffebundle.Source = (*Federator)(nil)
	_ x509bundle.Source   = (*Federator)(nil)
)
