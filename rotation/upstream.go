package rotation

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/meshca/meshca/ca"
)

// UpstreamStatus is how the Manager's upstream authority has answered, for
// `meshctl root status` and metrics. Only the replica that runs the
// Manager (the leader) calls the upstream.
type UpstreamStatus struct {
	// Upstream names the upstream, such as Vault's address and mount.
	Upstream string

	// Available reports whether the last call succeeded; false before the
	// first call.
	Available bool

	// LastSuccess is when a call last succeeded; zero if none has.
	LastSuccess time.Time

	// LastFailure is when a call last failed; zero if none has.
	LastFailure time.Time

	// LastError says why the last failed call failed. It never holds a
	// credential.
	LastError string

	// ConsecutiveFailures counts the calls that failed since the last
	// success.
	ConsecutiveFailures int

	// NextAttempt is when Run next calls the upstream: a retry after a
	// failure, else the next check. Zero when Run is not running.
	NextAttempt time.Time
}

// upstreamState is the Manager's record of its upstream's answers.
type upstreamState struct {
	up   ca.Upstream
	name string

	mu     sync.Mutex
	status UpstreamStatus
	calls  map[[2]string]uint64 // {op, result} → count, for metrics
}

func newUpstreamState(up ca.Upstream) *upstreamState {
	name := fmt.Sprintf("%T", up)
	if s, ok := up.(fmt.Stringer); ok {
		name = s.String()
	}
	return &upstreamState{up: up, name: name, status: UpstreamStatus{Upstream: name}, calls: map[[2]string]uint64{}}
}

// The upstream calls and their results, as metric labels.
const (
	opRoots = "roots"
	opSign  = "sign"

	resultOK          = "ok"
	resultUnavailable = "unavailable"
	resultDenied      = "denied"
	resultError       = "error"
)

// record notes the outcome of a call, unless it was cut short by ctx (the
// manager stopping says nothing of the upstream).
func (s *upstreamState) record(ctx context.Context, op string, now time.Time, err error) {
	if err != nil && ctx.Err() != nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	result := resultOK
	switch {
	case err == nil:
		s.status.Available = true
		s.status.LastSuccess = now
		s.status.ConsecutiveFailures = 0
	default:
		switch {
		case errors.Is(err, ca.ErrUpstreamUnavailable):
			result = resultUnavailable
		case errors.Is(err, ca.ErrUpstreamDenied):
			result = resultDenied
		default:
			result = resultError
		}
		s.status.Available = false
		s.status.LastFailure = now
		s.status.LastError = err.Error()
		s.status.ConsecutiveFailures++
	}
	s.calls[[2]string{op, result}]++
}

func (s *upstreamState) failures() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status.ConsecutiveFailures
}

func (s *upstreamState) setNextAttempt(t time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.status.NextAttempt = t
}

func (s *upstreamState) get() UpstreamStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status
}

// UpstreamStatus returns how the upstream has answered, and false when the
// Manager has no Upstream.
func (m *Manager) UpstreamStatus() (UpstreamStatus, bool) {
	if m.upstream == nil {
		return UpstreamStatus{}, false
	}
	return m.upstream.get(), true
}

// followUpstreamRoots reads the upstream's roots and, when the set's roots
// do not follow them, commits a set that does (ca.AuthoritySet.
// WithUpstreamRoots). It returns the set now current and the roots read.
// upErr is the upstream's failure: the set is then unchanged, and the
// caller goes on with what needs no upstream. err is a failure to commit.
func (m *Manager) followUpstreamRoots(ctx context.Context, set *ca.AuthoritySet, now time.Time) (_ *ca.AuthoritySet, roots []*x509.Certificate, upErr, err error) {
	roots, upErr = m.upstream.up.Roots(ctx)
	m.upstream.record(ctx, opRoots, m.clock.Now(), upErr)
	if upErr != nil {
		return set, nil, fmt.Errorf("rotation: reading the upstream's roots: %w", upErr), nil
	}
	n, changed, err := set.WithUpstreamRoots(roots, now)
	if err != nil {
		return set, nil, nil, fmt.Errorf("rotation: following the upstream's roots: %w", err)
	}
	if !changed {
		return set, roots, nil, nil
	}
	if err := m.commit(ctx, StepUpstreamRoots, n); err != nil {
		return set, nil, nil, err
	}
	m.log.Info("the trust bundle follows the upstream's roots", "upstream", m.upstream.name,
		"bundle_sequence", n.Sequence, "roots", len(n.Roots))
	return n, roots, nil, nil
}

// upstreamSuccessor has the upstream sign an intermediate to follow the
// issuer; false, with no call, when none of the upstream's roots outlives
// the issuer (the upstream caps an intermediate at its root's end), and
// false when the one it signed does not outlive the issuer either.
func (m *Manager) upstreamSuccessor(ctx context.Context, set *ca.AuthoritySet, roots []*x509.Certificate) (ca.Authority, *x509.Certificate, bool, error) {
	end := set.Issuer.Cert.NotAfter
	if !slices.ContainsFunc(roots, func(r *x509.Certificate) bool { return r.NotAfter.After(end) }) {
		return ca.Authority{}, nil, false, nil
	}
	inter, err := ca.NewUpstreamIntermediate(ctx, m.opts.Authority, m.upstream.up, roots)
	m.upstream.record(ctx, opSign, m.clock.Now(), err)
	if err != nil {
		return ca.Authority{}, nil, false, fmt.Errorf("rotation: getting an intermediate from the upstream: %w", err)
	}
	if !inter.Cert.NotAfter.After(end) {
		return ca.Authority{}, nil, false, nil
	}
	return inter.Authority, inter.Root, true, nil
}

// underNewRoot returns set with issuer, signed by root, signing from now
// on: root becomes active, the old active root retiring (its leaves are
// still valid), and the roots then follow the upstream's.
func (m *Manager) underNewRoot(set *ca.AuthoritySet, issuer ca.Authority, root *x509.Certificate, roots []*x509.Certificate, now time.Time) (*ca.AuthoritySet, error) {
	n := set.Clone()
	found := false
	for i := range n.Roots {
		switch {
		case bytes.Equal(n.Roots[i].Cert.Raw, root.Raw):
			n.Roots[i].State, n.Roots[i].Since, found = ca.RootActive, now, true
		case n.Roots[i].State == ca.RootActive:
			n.Roots[i].State, n.Roots[i].Since = ca.RootRetiring, now
		}
	}
	if !found {
		// A root added to the upstream since its roots were read.
		n.Sequence++
		n.Roots = append(n.Roots, ca.Root{Authority: ca.Authority{Cert: root}, State: ca.RootActive, Since: now, BundleSequence: n.Sequence})
		roots = append(slices.Clip(roots), root)
	}
	n, err := m.withIssuer(n, issuer, now)
	if err != nil {
		return nil, err
	}
	n, _, err = n.WithUpstreamRoots(roots, now)
	return n, err
}

// rotateFromUpstream is RotateIntermediate with an Upstream: a new
// intermediate from the upstream takes over now, under whichever root the
// upstream signs with.
func (m *Manager) rotateFromUpstream(ctx context.Context, set *ca.AuthoritySet, op OpOptions) (Result, error) {
	summary := fmt.Sprintf("a new intermediate signed by the upstream (%s) takes over from %s; leaves of the old one stay valid until they expire", m.upstream.name, serial(set.Issuer.Cert))
	if op.DryRun {
		return Result{Summary: "would: " + summary}, nil
	}
	now := m.clock.Now()
	set, roots, upErr, err := m.followUpstreamRoots(ctx, set, now)
	if err != nil {
		return Result{}, err
	}
	if upErr != nil {
		return Result{}, upErr
	}
	inter, err := ca.NewUpstreamIntermediate(ctx, m.opts.Authority, m.upstream.up, roots)
	m.upstream.record(ctx, opSign, m.clock.Now(), err)
	if err != nil {
		return Result{}, fmt.Errorf("rotation: getting an intermediate from the upstream: %w", err)
	}
	step := StepActivateIntermediate
	var n *ca.AuthoritySet
	if active, _ := set.ActiveRoot(); bytes.Equal(inter.Root.Raw, active.Cert.Raw) {
		n, err = m.withIssuer(set, inter.Authority, now)
	} else {
		step = StepActivateRoot
		summary += fmt.Sprintf("; it chains to root %s, the upstream's default now, which becomes active", serial(inter.Root))
		n, err = m.underNewRoot(set, inter.Authority, inter.Root, roots, now)
	}
	if err != nil {
		return Result{}, err
	}
	if err := m.commit(ctx, step, n); err != nil {
		return Result{}, err
	}
	return Result{Summary: summary, Applied: true}, nil
}

// rootRotationHelper is implemented by an upstream that says how roots are
// rotated in it (vaultca.Upstream).
type rootRotationHelper interface {
	RootRotation() string
}

// refuseWithUpstream refuses an operator's root step when the roots are
// the upstream's.
func (m *Manager) refuseWithUpstream(step Step) error {
	if m.upstream == nil {
		return nil
	}
	msg := fmt.Sprintf("roots are managed by the upstream authority (%s); rotate them there, and the trust bundle follows", m.upstream.name)
	if h, ok := m.upstream.up.(rootRotationHelper); ok {
		msg = h.RootRotation()
	}
	return &RefusedError{Step: step, msg: msg}
}
