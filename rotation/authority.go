package rotation

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/utils/clock"

	"github.com/meshca/meshca/ca"
)

// Step names a change of the authority set, in logs and for the AfterSave
// hook.
type Step string

// The steps of rotation.
const (
	StepPrepareRoot          Step = "prepare-root"
	StepActivateRoot         Step = "activate-root"
	StepRetireRoot           Step = "retire-root"
	StepPrepareIntermediate  Step = "prepare-intermediate"
	StepActivateIntermediate Step = "activate-intermediate"
	StepPruneIntermediates   Step = "prune-intermediates"

	// StepUpstreamRoots: the bundle follows the upstream's roots (one
	// added or removed there, or a state changed here).
	StepUpstreamRoots Step = "upstream-roots"
)

// RefusedError is an operation refused because it is not safe yet. Force
// overrides it.
type RefusedError struct {
	Step Step

	// Overridable reports whether OpOptions.Force would override it.
	Overridable bool

	msg string
}

func (e *RefusedError) Error() string { return fmt.Sprintf("rotation: %s refused: %s", e.Step, e.msg) }

// ErrNotApplicable is wrapped by an operation that has nothing to act on:
// activate with no prepared root, retire with no retiring root.
var ErrNotApplicable = errors.New("rotation: nothing to do")

// ManagerOptions configure a Manager.
type ManagerOptions struct {
	// CA whose authorities are rotated. Required.
	CA *ca.CA

	// Store keeps the authority set; every step is saved before it takes
	// effect. Required.
	Store ca.Store

	// Authority configures the authorities the manager creates: trust
	// domain, lifetimes. Its Clock is replaced by Clock.
	Authority ca.AuthorityOptions

	// MaxLeafTTL is the longest lifetime of a certificate the CA issues.
	// Required.
	MaxLeafTTL time.Duration

	// Tracker tells how far a prepared root has propagated, so that
	// activate may go ahead once every workload holds it. Nil means
	// propagation is not known here (replicas each see only the workloads
	// that renew with them), and activate waits one maximum leaf lifetime
	// after prepare.
	Tracker *Tracker

	// Clock tells the time and ticks; nil means the real clock.
	Clock clock.WithTicker

	// CheckInterval is how often Run checks the intermediate; zero means
	// a minute, or a twentieth of the intermediate lifetime if shorter.
	CheckInterval time.Duration

	// Logger receives what the manager does; nil discards.
	Logger *slog.Logger

	// AfterSave, when set, is called after each step's state is saved and
	// before it takes effect. Crash tests kill the process there.
	AfterSave func(Step)

	// Upstream, when set, holds the trust domain's roots (Vault's PKI
	// engine, ca/vaultca): successor intermediates are signed by it
	// instead of a local root, the bundle follows its roots at every
	// check, and the operator's root steps are refused, since roots are
	// rotated in the upstream. ca.LoadOrCreateUpstream gets the first
	// intermediate.
	Upstream ca.Upstream

	// UpstreamBackoff paces Run's retries after the upstream failed; no
	// wait is longer than the check interval. Zero fields take Backoff's
	// defaults.
	UpstreamBackoff Backoff

	// Registerer, when set with Upstream, receives the upstream's metrics
	// (meshca_upstream_*), read from UpstreamStatus.
	Registerer prometheus.Registerer
}

// Manager rotates a CA's authorities: intermediates on their own before
// they expire, and roots by an operator's prepare, activate and retire. It
// is safe for concurrent use; one step runs at a time.
type Manager struct {
	opts  ManagerOptions
	log   *slog.Logger
	clock clock.WithTicker

	mu     sync.Mutex // serialises steps
	warned string     // issuer serial warnNoSuccessor last warned about

	upstream *upstreamState // nil without ManagerOptions.Upstream
}

// OpOptions modify an operator's step.
type OpOptions struct {
	// Force overrides a refusal.
	Force bool

	// DryRun says what would happen and changes nothing.
	DryRun bool
}

// Result is the outcome of an operator's step.
type Result struct {
	// Summary says what was done, or with DryRun what would be.
	Summary string

	// Applied reports whether the authority set changed.
	Applied bool

	// Forced reports whether Force overrode a refusal.
	Forced bool
}

// NewManager returns a Manager.
func NewManager(opts ManagerOptions) (*Manager, error) {
	if opts.CA == nil || opts.Store == nil {
		return nil, errors.New("rotation: a CA and a Store are required")
	}
	if opts.MaxLeafTTL <= 0 {
		return nil, errors.New("rotation: MaxLeafTTL is required")
	}
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
	}
	opts.Authority.Clock = opts.Clock
	opts.Authority.TrustDomain = opts.CA.TrustDomain()
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	m := &Manager{opts: opts, log: opts.Logger, clock: opts.Clock}
	if opts.Upstream != nil {
		var err error
		if m.opts.UpstreamBackoff, err = opts.UpstreamBackoff.complete(); err != nil {
			return nil, fmt.Errorf("rotation: ManagerOptions.UpstreamBackoff: %w", err)
		}
		m.upstream = newUpstreamState(opts.Upstream)
		if opts.Registerer != nil {
			if err := m.registerUpstreamMetrics(opts.Registerer); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

// Run checks the intermediate at start and then every CheckInterval until
// ctx is done, preparing, activating and pruning intermediates when due
// (and, with an Upstream, following its roots). A failed check is logged
// and tried again at the next tick; one that failed because the upstream
// did is retried sooner, with UpstreamBackoff, while the CA goes on
// signing with its current intermediate.
func (m *Manager) Run(ctx context.Context) error {
	interval := m.opts.CheckInterval
	if interval <= 0 {
		interval = time.Minute
		if life := m.issuerLife(); life > 0 && life/20 < interval {
			interval = life / 20
		}
	}
	t := m.clock.NewTicker(interval)
	defer t.Stop()
	var retry clock.Timer
	defer func() {
		if retry != nil {
			retry.Stop()
		}
	}()
	for {
		err := m.RotateIntermediates(ctx)
		if ctx.Err() != nil {
			return nil
		}
		wait, retrying := interval, false
		if m.upstream != nil {
			if failures := m.upstream.failures(); failures > 0 {
				wait = min(m.opts.UpstreamBackoff.delay(failures, rand.Float64()), interval)
				retrying = true
			}
			m.upstream.setNextAttempt(m.clock.Now().Add(wait))
		}
		switch {
		case err != nil && retrying:
			iss := m.opts.CA.Authorities().Issuer.Cert
			m.log.Warn("the upstream authority failed; signing goes on with the current intermediate; will retry",
				"upstream", m.upstream.name, "error", err, "retry_in", wait.String(), "issuer_not_after", iss.NotAfter.UTC())
		case err != nil:
			m.log.Error("intermediate rotation failed; will retry", "error", err, "retry_in", interval.String())
		}
		var retryC <-chan time.Time
		if retrying {
			retry = m.clock.NewTimer(wait)
			retryC = retry.C()
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C():
		case <-retryC:
		}
		if retry != nil {
			retry.Stop()
			retry = nil
		}
	}
}

func (m *Manager) issuerLife() time.Duration {
	iss := m.opts.CA.Authorities().Issuer.Cert
	return iss.NotAfter.Sub(iss.NotBefore)
}

// Thresholds of intermediate rotation, as fractions of its life left: a
// successor is prepared with a third left, and takes over with a sixth
// left, but always with room for one full leaf lifetime, so that leaves are
// never cut short by their issuer's end.
func (m *Manager) prepareAt(iss *ca.Authority) time.Time {
	life := iss.Cert.NotAfter.Sub(iss.Cert.NotBefore)
	return iss.Cert.NotAfter.Add(-max(life/3, 2*m.opts.MaxLeafTTL))
}

func (m *Manager) activateAt(iss *ca.Authority) time.Time {
	life := iss.Cert.NotAfter.Sub(iss.Cert.NotBefore)
	return iss.Cert.NotAfter.Add(-max(life/6, m.opts.MaxLeafTTL))
}

// RotateIntermediates makes whichever intermediate steps are due: prepare
// a successor, let it take over, forget retired issuers whose leaves have
// all expired. The bundle does not change, but with an Upstream, whose
// roots it follows first.
//
// With an Upstream that cannot be reached, the steps that need it wait
// (the error says so, wrapping ca.ErrUpstreamUnavailable) and the others
// are made: a successor prepared earlier still takes over.
func (m *Manager) RotateIntermediates(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.clock.Now()
	set := m.opts.CA.Authorities()

	var roots []*x509.Certificate
	var upErr error
	if m.upstream != nil {
		var err error
		if set, roots, upErr, err = m.followUpstreamRoots(ctx, set, now); err != nil {
			return err
		}
	}

	switch due := !now.Before(m.activateAt(&set.Issuer)); {
	case due || (set.NextIssuer == nil && !now.Before(m.prepareAt(&set.Issuer))):
		next := set.NextIssuer
		if next == nil {
			if upErr != nil {
				break // no successor until the upstream answers
			}
			// Prepare one; when the activation is due already (a check ran
			// late), it takes over at once.
			made, root, ok, err := m.successor(ctx, set, roots)
			if err != nil {
				return err
			}
			if !ok {
				m.warnNoSuccessor(set)
				break
			}
			if active, _ := set.ActiveRoot(); !bytes.Equal(root.Raw, active.Cert.Raw) {
				// The upstream signs under another root now (its default
				// issuer changed): that root becomes active with the new
				// intermediate, at once.
				n, err := m.underNewRoot(set, made, root, roots, now)
				if err != nil {
					return err
				}
				if err := m.commit(ctx, StepActivateRoot, n); err != nil {
					return err
				}
				set = n
				break
			}
			next = &made
		}
		if !due {
			n := set.Clone()
			n.NextIssuer = next
			if err := m.commit(ctx, StepPrepareIntermediate, n); err != nil {
				return err
			}
			set = n
			break
		}
		n, err := m.withIssuer(set, *next, now)
		if err != nil {
			return err
		}
		if err := m.commit(ctx, StepActivateIntermediate, n); err != nil {
			return err
		}
		set = n
	}
	if kept := liveIssuers(set.RetiringIssuers, now); len(kept) != len(set.RetiringIssuers) {
		n := set.Clone()
		n.RetiringIssuers = kept
		if err := m.commit(ctx, StepPruneIntermediates, n); err != nil {
			return err
		}
	}
	return upErr
}

// warnNoSuccessor says, once per issuer, that the issuer cannot be
// followed: the active root ends first, or its key is not held here.
func (m *Manager) warnNoSuccessor(set *ca.AuthoritySet) {
	serialNo := serial(set.Issuer.Cert)
	if m.warned == serialNo {
		return
	}
	m.warned = serialNo
	root, _ := set.ActiveRoot()
	if m.upstream != nil {
		m.log.Warn("the intermediate cannot be rotated: no root of the upstream authority outlives it; add a root there and make it the default issuer",
			"upstream", m.upstream.name, "issuer_serial", serialNo, "issuer_not_after", set.Issuer.Cert.NotAfter)
		return
	}
	m.log.Warn("the intermediate cannot be rotated: the active root's key is not held here, or the root ends before a successor could outlive the issuer; rotate the root",
		"issuer_serial", serialNo, "issuer_not_after", set.Issuer.Cert.NotAfter, "root_not_after", root.Cert.NotAfter)
}

// successor makes an intermediate to follow the issuer and returns it
// with the root that signed it: the active root, or with an Upstream,
// whichever root the upstream signs with (roots are the upstream's). It
// returns false when that root's key is not held, or the root would end
// the successor no later than the issuer (a root rotation is due, not an
// intermediate one).
func (m *Manager) successor(ctx context.Context, set *ca.AuthoritySet, roots []*x509.Certificate) (ca.Authority, *x509.Certificate, bool, error) {
	if m.upstream != nil {
		return m.upstreamSuccessor(ctx, set, roots)
	}
	root, ok := set.ActiveRoot()
	if !ok || root.Signer == nil || !root.Cert.NotAfter.After(set.Issuer.Cert.NotAfter) {
		return ca.Authority{}, nil, false, nil
	}
	next, err := ca.NewIntermediate(m.opts.Authority, root.Authority)
	return next, root.Cert, err == nil, err
}

func liveIssuers(issuers []ca.RetiringIssuer, now time.Time) []ca.RetiringIssuer {
	var kept []ca.RetiringIssuer
	for _, r := range issuers {
		if now.Before(r.LeavesUntil) {
			kept = append(kept, r)
		}
	}
	return kept
}

// withIssuer returns set with issuer, signed by the active root, signing
// from now on; the old issuer retires.
//
// While a retiring root is still trusted, chains carry a copy of the
// active root cross-signed by it (leaf, issuer, cross-signed root), so
// that a peer trusting only the retiring root verifies new leaves. The
// root is cross-signed rather than the intermediate, as Web PKI roots
// are: a verifier that takes the first candidate issuer it finds (OpenSSL,
// BoringSSL) still builds leaf → issuer → root, finding the new root in
// its trust store when it has it, and the cross-signed copy when it does
// not.
func (m *Manager) withIssuer(set *ca.AuthoritySet, issuer ca.Authority, now time.Time) (*ca.AuthoritySet, error) {
	n := set.Clone()
	old := set.Issuer.Cert
	n.RetiringIssuers = append(liveIssuers(n.RetiringIssuers, now), ca.RetiringIssuer{
		Cert:        old,
		LeavesUntil: minTime(old.NotAfter, now.Add(m.opts.MaxLeafTTL)),
	})
	n.Issuer, n.IssuerSince, n.NextIssuer = issuer, now, nil
	active, ok := n.ActiveRoot()
	if !ok {
		return nil, errors.New("rotation: the authority set has no active root")
	}
	// Keep the cross-signed copies of the active root; make the missing
	// ones.
	n.Chain = slices.DeleteFunc(n.Chain, func(c *x509.Certificate) bool {
		return !bytes.Equal(c.RawSubjectPublicKeyInfo, active.Cert.RawSubjectPublicKeyInfo)
	})
	for _, r := range n.Roots {
		if r.State != ca.RootRetiring || r.Signer == nil || slices.ContainsFunc(n.Chain, func(c *x509.Certificate) bool { return c.CheckSignatureFrom(r.Cert) == nil }) {
			continue
		}
		cross, err := ca.CrossSign(active.Cert, r.Authority)
		if err != nil {
			return nil, err
		}
		n.Chain = append(n.Chain, cross)
	}
	return n, nil
}

// commit saves set, then makes it the CA's. A crash between the two
// leaves the saved set, which the next start loads: every step either
// happened or did not.
func (m *Manager) commit(ctx context.Context, step Step, set *ca.AuthoritySet) error {
	if err := set.Validate(m.clock.Now()); err != nil {
		return fmt.Errorf("rotation: %s would make an invalid authority set: %w", step, err)
	}
	if err := m.opts.Store.Save(ctx, set); err != nil {
		if errors.Is(err, ca.ErrConflict) {
			m.reload(ctx)
		}
		return fmt.Errorf("rotation: %s: saving: %w", step, err)
	}
	if m.opts.AfterSave != nil {
		m.opts.AfterSave(step)
	}
	if err := m.opts.CA.SetAuthorities(set); err != nil {
		return fmt.Errorf("rotation: %s: %w", step, err)
	}
	m.log.Info("authorities rotated", "step", string(step), "bundle_sequence", set.Sequence,
		"issuer_serial", set.Issuer.Cert.SerialNumber.Text(16))
	return nil
}

// reload makes the stored set the CA's after a conflict, so that the next
// step starts from what another replica saved.
func (m *Manager) reload(ctx context.Context) {
	set, err := m.opts.Store.Load(ctx)
	if err == nil {
		err = m.opts.CA.SetAuthorities(set)
	}
	if err != nil {
		m.log.Error("reloading the authorities after a conflict failed", "error", err)
	}
}

// RotateIntermediate replaces the issuer now with a new intermediate under
// the active root (an operator's rotation, say after a suspected key
// leak). The bundle does not change.
func (m *Manager) RotateIntermediate(ctx context.Context, op OpOptions) (Result, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	set := m.opts.CA.Authorities()
	if m.upstream != nil {
		return m.rotateFromUpstream(ctx, set, op)
	}
	root, ok := set.ActiveRoot()
	if !ok || root.Signer == nil {
		return Result{}, &RefusedError{Step: StepActivateIntermediate, msg: "the active root's key is not held here, so no new intermediate can be made; replace the CA files instead"}
	}
	summary := fmt.Sprintf("a new intermediate under root %s takes over from %s; leaves of the old one stay valid until they expire", serial(root.Cert), serial(set.Issuer.Cert))
	if op.DryRun {
		return Result{Summary: "would: " + summary}, nil
	}
	now := m.clock.Now()
	next, err := ca.NewIntermediate(m.opts.Authority, root.Authority)
	if err != nil {
		return Result{}, err
	}
	n, err := m.withIssuer(set, next, now)
	if err != nil {
		return Result{}, err
	}
	if err := m.commit(ctx, StepActivateIntermediate, n); err != nil {
		return Result{}, err
	}
	return Result{Summary: summary, Applied: true}, nil
}

// PrepareRoot creates a new self-signed root and adds it to the bundle,
// raising the bundle sequence. It does not sign yet.
func (m *Manager) PrepareRoot(ctx context.Context, op OpOptions) (Result, error) {
	if err := m.refuseWithUpstream(StepPrepareRoot); err != nil {
		return Result{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	set := m.opts.CA.Authorities()
	if p, ok := rootIn(set, ca.RootPrepared); ok {
		return Result{}, &RefusedError{Step: StepPrepareRoot, msg: fmt.Sprintf("root %s is already prepared; activate it first", serial(p.Cert))}
	}
	summary := fmt.Sprintf("a new root joins the trust bundle (sequence %d); it signs nothing until activate", set.Sequence+1)
	if op.DryRun {
		return Result{Summary: "would: " + summary}, nil
	}
	root, err := ca.NewRoot(m.opts.Authority)
	if err != nil {
		return Result{}, err
	}
	n := set.Clone()
	n.Sequence++
	n.Roots = append(n.Roots, ca.Root{Authority: root, State: ca.RootPrepared, Since: m.clock.Now(), BundleSequence: n.Sequence})
	if err := m.commit(ctx, StepPrepareRoot, n); err != nil {
		return Result{}, err
	}
	return Result{Summary: fmt.Sprintf("root %s prepared: in the trust bundle (sequence %d), not signing", serial(root.Cert), n.Sequence), Applied: true}, nil
}

// ActivateRoot makes the prepared root active: a new intermediate under
// it signs from now on, and chains carry the new root cross-signed by the
// old one (which becomes retiring), so that peers that trust only the old
// root verify new leaves.
//
// It refuses until every workload seen within the maximum leaf lifetime
// reported holding the prepared root, or that lifetime has passed since
// prepare.
func (m *Manager) ActivateRoot(ctx context.Context, op OpOptions) (Result, error) {
	if err := m.refuseWithUpstream(StepActivateRoot); err != nil {
		return Result{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	set := m.opts.CA.Authorities()
	prepared, ok := rootIn(set, ca.RootPrepared)
	if !ok {
		return Result{}, fmt.Errorf("%w: no root is prepared; run prepare first", ErrNotApplicable)
	}
	now := m.clock.Now()
	var forced bool
	if refusal := m.activateRefusal(prepared, now); refusal != "" {
		if !op.Force {
			return Result{}, &RefusedError{Step: StepActivateRoot, Overridable: true, msg: refusal}
		}
		forced = true
		m.log.Warn("root activation forced", "refusal_overridden", refusal)
	}
	summary := fmt.Sprintf("root %s becomes active with a new intermediate; chains carry it cross-signed by the current root, which retires", serial(prepared.Cert))
	if op.DryRun {
		return Result{Summary: "would: " + summary, Forced: forced}, nil
	}
	issuer, err := ca.NewIntermediate(m.opts.Authority, prepared.Authority)
	if err != nil {
		return Result{}, err
	}
	n := set.Clone()
	for i := range n.Roots {
		switch n.Roots[i].State {
		case ca.RootActive:
			n.Roots[i].State, n.Roots[i].Since = ca.RootRetiring, now
		case ca.RootPrepared:
			n.Roots[i].State, n.Roots[i].Since = ca.RootActive, now
		}
	}
	n, err = m.withIssuer(n, issuer, now)
	if err != nil {
		return Result{}, err
	}
	if err := m.commit(ctx, StepActivateRoot, n); err != nil {
		return Result{}, err
	}
	return Result{Summary: summary, Applied: true, Forced: forced}, nil
}

// activateRefusal says why activating prepared now is not yet safe, or "".
func (m *Manager) activateRefusal(prepared ca.Root, now time.Time) string {
	allowedAt := prepared.Since.Add(m.opts.MaxLeafTTL)
	if !now.Before(allowedAt) {
		return ""
	}
	if m.opts.Tracker == nil {
		return fmt.Sprintf("propagation is not tracked by this deployment (replicas each see only their own callers); activate after %s, one maximum leaf lifetime after prepare",
			allowedAt.UTC().Format(time.RFC3339))
	}
	// Every workload renews within half a leaf lifetime: until the tracker
	// has watched for that long (after a restart), it has not seen them
	// all, and "all it has seen" proves nothing.
	if watched := m.opts.Tracker.Since().Add(m.opts.MaxLeafTTL / 2); now.Before(watched) {
		return fmt.Sprintf("propagation is tracked since %s and every workload renews within %s; activate after %s",
			m.opts.Tracker.Since().UTC().Format(time.RFC3339), m.opts.MaxLeafTTL/2, minTime(watched, allowedAt).UTC().Format(time.RFC3339))
	}
	seen, holding := m.opts.Tracker.Count(prepared.BundleSequence)
	if holding == seen {
		return ""
	}
	return fmt.Sprintf("%d of %d workloads seen in the last %s hold bundle sequence %d with the new root; activate when all do, or after %s",
		holding, seen, m.opts.MaxLeafTTL, prepared.BundleSequence, allowedAt.UTC().Format(time.RFC3339))
}

// RetireRoot removes the retiring roots from the bundle, raising its
// sequence, and stops serving certificates they signed. It refuses while a
// leaf under a retiring root can still be valid.
func (m *Manager) RetireRoot(ctx context.Context, op OpOptions) (Result, error) {
	if err := m.refuseWithUpstream(StepRetireRoot); err != nil {
		return Result{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	set := m.opts.CA.Authorities()
	now := m.clock.Now()
	retiring := rootsIn(set, ca.RootRetiring)
	if len(retiring) == 0 {
		return Result{}, fmt.Errorf("%w: no root is retiring; activate a prepared root first", ErrNotApplicable)
	}
	var forced bool
	if until := m.leavesUntil(set, retiring); now.Before(until) {
		refusal := fmt.Sprintf("leaves under the retiring root can be valid until %s", until.UTC().Format(time.RFC3339))
		if !op.Force {
			return Result{}, &RefusedError{Step: StepRetireRoot, Overridable: true, msg: refusal}
		}
		forced = true
		m.log.Warn("root retirement forced", "refusal_overridden", refusal)
	}
	summary := fmt.Sprintf("%d retiring root(s) leave the trust bundle (sequence %d)", len(retiring), set.Sequence+1)
	if op.DryRun {
		return Result{Summary: "would: " + summary, Forced: forced}, nil
	}
	n := set.Clone()
	n.Sequence++
	n.Roots = slices.DeleteFunc(n.Roots, func(r ca.Root) bool { return r.State == ca.RootRetiring })
	n.Chain = slices.DeleteFunc(n.Chain, func(c *x509.Certificate) bool { return signedByAny(c, retiring) })
	n.RetiringIssuers = slices.DeleteFunc(n.RetiringIssuers, func(r ca.RetiringIssuer) bool { return signedByAny(r.Cert, retiring) })
	if err := m.commit(ctx, StepRetireRoot, n); err != nil {
		return Result{}, err
	}
	return Result{Summary: summary, Applied: true, Forced: forced}, nil
}

// RetireAllowedAt returns when RetireRoot stops refusing, and false when
// no root is retiring.
func (m *Manager) RetireAllowedAt() (time.Time, bool) {
	set := m.opts.CA.Authorities()
	retiring := rootsIn(set, ca.RootRetiring)
	if len(retiring) == 0 {
		return time.Time{}, false
	}
	return m.leavesUntil(set, retiring), true
}

func rootsIn(set *ca.AuthoritySet, state ca.RootState) []ca.Root {
	var out []ca.Root
	for _, r := range set.Roots {
		if r.State == state {
			out = append(out, r)
		}
	}
	return out
}

// leavesUntil returns when the last leaf that only the retiring roots
// verify expires: leaves of retired issuers they signed.
func (m *Manager) leavesUntil(set *ca.AuthoritySet, retiring []ca.Root) time.Time {
	var until time.Time
	for _, r := range set.RetiringIssuers {
		if signedByAny(r.Cert, retiring) && r.LeavesUntil.After(until) {
			until = r.LeavesUntil
		}
	}
	// A retiring root's own leaves were issued until it stopped being
	// active, at most a leaf lifetime before now.
	for _, r := range retiring {
		if u := r.Since.Add(m.opts.MaxLeafTTL); u.After(until) {
			until = u
		}
	}
	return until
}

func signedByAny(c *x509.Certificate, roots []ca.Root) bool {
	for _, r := range roots {
		if c.CheckSignatureFrom(r.Cert) == nil {
			return true
		}
	}
	return false
}

func rootIn(set *ca.AuthoritySet, state ca.RootState) (ca.Root, bool) {
	for _, r := range set.Roots {
		if r.State == state {
			return r, true
		}
	}
	return ca.Root{}, false
}

func serial(c *x509.Certificate) string { return c.SerialNumber.Text(16) }

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
