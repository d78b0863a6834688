package rotation

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	mathrand "math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"k8s.io/utils/clock"
)

// Defaults of Options.
const (
	// DefaultRenewFraction is the point of a certificate's life at which
	// it is renewed at the latest: half life.
	DefaultRenewFraction = 0.5

	// DefaultRenewJitter spreads renewals over the tenth of the life
	// before the renew point: by default each certificate is renewed at a
	// point drawn uniformly from [0.40, 0.50] of its life.
	DefaultRenewJitter = 0.1

	// DefaultRequestTimeout bounds one Sign request.
	DefaultRequestTimeout = 30 * time.Second
)

// Options configure a Source. Only ID and InitialBundle are required; the
// zero value of every other field is documented beside it.
type Options struct {
	// ID is the SPIFFE ID the source asks for: the only URI SAN of every
	// CSR. Required.
	ID spiffeid.ID

	// InitialBundle holds the roots of ID's trust domain. It verifies the
	// server, and the first certificates, until the server sends a bundle.
	// Required.
	InitialBundle *x509bundle.Bundle

	// InitialSVID is an X509-SVID of ID from an earlier run, such as the one
	// an agent wrote to disk before it restarted. While it is valid it is
	// served, and renewed over mTLS at its renew point, so that a restart
	// during a CA outage does not leave the workload without a
	// certificate. Nil means none; one that has expired, or that does not
	// verify against InitialBundle (its root was retired while the agent
	// was down), is ignored and logged.
	InitialSVID *x509svid.SVID

	// Token returns the credential for the first certificate: a bootstrap
	// or service-account token. Renewals authenticate with the current SVID
	// over mTLS; the token is called, and sent as "authorization: Bearer"
	// metadata, only when the source holds no SVID that can authenticate
	// (none yet, expired, or no longer verifying against the held bundle
	// because its root left it), and on the attempt after the server
	// refused the SVID as Unauthenticated. Nil, or an empty token, means no
	// metadata is sent (the connection may carry credentials of its own).
	Token func(ctx context.Context) (string, error)

	// TTL is the lifetime asked for. Zero means the server's default.
	TTL time.Duration

	// NewKey makes the key of each new certificate; every renewal has a
	// new key. Nil means ECDSA P-256.
	NewKey func() (crypto.Signer, error)

	// RenewFraction is the fraction of a certificate's life (NotBefore to
	// NotAfter) by which it is renewed, in (0, 1): the latest renew point.
	// Zero means DefaultRenewFraction.
	RenewFraction float64

	// RenewJitter spreads renewals: each renew point is drawn uniformly
	// from [RenewFraction − RenewJitter, RenewFraction], so that workloads
	// started together do not renew together, and none renews later than
	// RenewFraction. Zero means DefaultRenewJitter; negative means none.
	// RenewFraction − RenewJitter must be more than 0.
	RenewJitter float64

	// Backoff paces retries of failed renewals and reconnections of the
	// bundle watch. The zero value is 1s doubling to 1m, less up to 20%.
	// While the source holds an SVID that has not expired, no retry of a
	// renewal waits longer than a twentieth of the time the SVID has left
	// (but 100ms at least), whatever Backoff says: a CA that comes back
	// is used within that share of the SVID's remaining life. With no
	// valid SVID, retries follow Backoff alone. When a failed renewal
	// carries a google.rpc.RetryInfo delay (the server shedding load, or
	// a rate limit), the retry waits that delay plus up to half of it at
	// random instead (at least 100ms), held to Max and to the same cap.
	Backoff Backoff

	// RequestTimeout bounds one Sign request. It is a gRPC deadline, so it
	// runs on the real clock, not Clock. Zero means DefaultRequestTimeout.
	RequestTimeout time.Duration

	// Clock tells the time and runs the timers. Nil means the real clock;
	// tests pass a fake one (k8s.io/utils/clock/testing) to run a day of
	// renewals in milliseconds.
	Clock clock.Clock

	// Rand returns uniform random numbers in [0, 1) for jitter. The source
	// serialises its calls. Nil means math/rand/v2's Float64.
	Rand func() float64

	// Logger receives renewals, failures and bundle changes. Nil discards
	// them.
	Logger *slog.Logger
}

// Source holds an X509-SVID and the trust bundle of its trust domain, and
// keeps both current while Run runs. It is an x509svid.Source and an
// x509bundle.Source, so TLS configs built on it (ClientTLSConfig, or
// go-spiffe's tlsconfig) always present the current certificate and verify
// peers with the current bundle. A Source is safe for concurrent use.
type Source struct {
	id             spiffeid.ID
	td             spiffeid.TrustDomain
	token          func(context.Context) (string, error)
	ttl            time.Duration
	newKey         func() (crypto.Signer, error)
	renewFraction  float64
	renewJitter    float64
	backoff        Backoff
	requestTimeout time.Duration
	clock          clock.Clock
	log            *slog.Logger

	randMu sync.Mutex
	rand   func() float64

	running atomic.Bool
	renewal chan struct{} // asks the renewal loop to renew now; buffered

	// certRefused is set while the renewal attempt after one the server
	// refused as Unauthenticated runs, and the backoff before it: that
	// attempt presents no client certificate, and sends the token.
	certRefused atomic.Bool

	mu        sync.RWMutex
	svid      *x509svid.SVID   // nil before the first
	tlsCert   *tls.Certificate // svid for crypto/tls
	renewAt   time.Time
	bundle    *x509bundle.Bundle
	bundleSeq uint64
	federated []*x509bundle.Bundle // sorted by trust domain; never s.td
	changed   chan struct{}        // closed and replaced on every change
	ready     chan struct{}        // closed when the first SVID is held
}

var (
	_ x509svid.Source   = (*Source)(nil)
	_ x509bundle.Source = (*Source)(nil)
)

// NewSource returns a Source for opts. It holds opts.InitialSVID, if valid,
// and opts.InitialBundle; Run gets and renews the rest.
func NewSource(opts Options) (*Source, error) {
	if opts.ID.IsZero() {
		return nil, errors.New("rotation: Options.ID is required: the SPIFFE ID to ask for")
	}
	td := opts.ID.TrustDomain()
	if opts.InitialBundle == nil {
		return nil, errors.New("rotation: Options.InitialBundle is required: the roots that verify the server")
	}
	if opts.InitialBundle.TrustDomain() != td {
		return nil, fmt.Errorf("rotation: Options.InitialBundle is for trust domain %q; want %q, the trust domain of %q", opts.InitialBundle.TrustDomain(), td, opts.ID)
	}
	if len(opts.InitialBundle.X509Authorities()) == 0 {
		return nil, errors.New("rotation: Options.InitialBundle has no X.509 authorities")
	}
	if opts.TTL < 0 {
		return nil, fmt.Errorf("rotation: Options.TTL is %s; want zero (the server's default) or more", opts.TTL)
	}
	if opts.RenewFraction == 0 {
		opts.RenewFraction = DefaultRenewFraction
	}
	switch {
	case opts.RenewJitter == 0:
		opts.RenewJitter = DefaultRenewJitter
	case opts.RenewJitter < 0:
		opts.RenewJitter = 0
	}
	if lo, hi := opts.RenewFraction-opts.RenewJitter, opts.RenewFraction; lo <= 0 || hi >= 1 {
		return nil, fmt.Errorf("rotation: Options.RenewFraction %g and RenewJitter %g put renew points in [%g, %g] of the life; want them within (0, 1)", opts.RenewFraction, opts.RenewJitter, lo, hi)
	}
	backoff, err := opts.Backoff.complete()
	if err != nil {
		return nil, err
	}
	if opts.RequestTimeout < 0 {
		return nil, fmt.Errorf("rotation: Options.RequestTimeout is %s; want zero (%s) or more", opts.RequestTimeout, DefaultRequestTimeout)
	}
	if opts.RequestTimeout == 0 {
		opts.RequestTimeout = DefaultRequestTimeout
	}
	if opts.NewKey == nil {
		opts.NewKey = newP256Key
	}
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
	}
	if opts.Rand == nil {
		opts.Rand = mathrand.Float64
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Source{
		id:             opts.ID,
		td:             td,
		token:          opts.Token,
		ttl:            opts.TTL,
		newKey:         opts.NewKey,
		renewFraction:  opts.RenewFraction,
		renewJitter:    opts.RenewJitter,
		backoff:        backoff,
		requestTimeout: opts.RequestTimeout,
		clock:          opts.Clock,
		log:            opts.Logger.With(slog.String("spiffe_id", opts.ID.String())),
		rand:           opts.Rand,
		renewal:        make(chan struct{}, 1),
		bundle:         opts.InitialBundle,
		changed:        make(chan struct{}),
		ready:          make(chan struct{}),
	}
	if svid := opts.InitialSVID; svid != nil {
		if err := s.checkInitialSVID(svid); err != nil {
			return nil, err
		}
		now := s.clock.Now()
		leaf := svid.Certificates[0]
		switch err := s.verify(svid, opts.InitialBundle); {
		case !now.Before(leaf.NotAfter):
			s.log.Info("ignoring the initial X509-SVID: it has expired", slog.Time("not_after", leaf.NotAfter))
		case err != nil:
			// Renewing over mTLS with it would be refused: get a new one
			// with the token instead.
			s.log.Warn("ignoring the initial X509-SVID: it does not verify against the initial bundle",
				slog.String("serial", leaf.SerialNumber.Text(16)), slog.Any("error", err))
		default:
			s.setSVID(svid, s.renewPoint(leaf, now, false))
		}
	}
	return s, nil
}

func (s *Source) checkInitialSVID(svid *x509svid.SVID) error {
	if len(svid.Certificates) == 0 || svid.PrivateKey == nil {
		return errors.New("rotation: Options.InitialSVID needs its certificates and private key")
	}
	leaf := svid.Certificates[0]
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return fmt.Errorf("rotation: Options.InitialSVID: %w", err)
	}
	if id != s.id {
		return fmt.Errorf("rotation: Options.InitialSVID is for %q; want %q, Options.ID", id, s.id)
	}
	if !keyMatches(svid.PrivateKey, leaf) {
		return errors.New("rotation: Options.InitialSVID's private key is not the key of its certificate")
	}
	return nil
}

// GetX509SVID returns the current X509-SVID. It returns an error before
// the first one is issued and once the current one has expired (when
// renewals have failed for half its life). The SVID is shared: callers
// must not modify it.
func (s *Source) GetX509SVID() (*x509svid.SVID, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.svid == nil {
		return nil, fmt.Errorf("rotation: no X509-SVID for %q yet", s.id)
	}
	if leaf := s.svid.Certificates[0]; !s.clock.Now().Before(leaf.NotAfter) {
		return nil, fmt.Errorf("rotation: the X509-SVID for %q expired at %s and could not be renewed yet", s.id, leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	return s.svid, nil
}

// GetX509BundleForTrustDomain returns the current bundle of td: the
// source's own trust domain, or a federated one the server sent (see
// FederatedBundles). It returns an error for any other trust domain. The
// bundle is shared: callers must not modify it.
func (s *Source) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if td == s.td {
		return s.bundle, nil
	}
	if b := findBundle(s.federated, td); b != nil {
		return b, nil
	}
	return nil, fmt.Errorf("rotation: no bundle for trust domain %q; this source holds %q and no federated bundle for it", td, s.td)
}

// BundleSequence returns the sequence number of the bundle the source
// holds: 0 while it holds Options.InitialBundle.
func (s *Source) BundleSequence() uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.bundleSeq
}

// Changed returns a channel that is closed at the next change of the SVID,
// the bundle or the federated bundles. Expiry is not a change: an SVID that expires unrenewed
// stays until the next one, and GetX509SVID refuses it. Take the channel
// before reading the state, so that no change is missed:
//
//	for {
//		changed := src.Changed()
//		svid, err := src.GetX509SVID()
//		... // push svid to clients
//		<-changed
//	}
func (s *Source) Changed() <-chan struct{} {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.changed
}

// WaitUntilReady returns when the source holds its first X509-SVID, or with
// an error when ctx is done first.
func (s *Source) WaitUntilReady(ctx context.Context) error {
	select {
	case <-s.ready:
		return nil
	default:
	}
	select {
	case <-s.ready:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("rotation: waiting for the first X509-SVID for %q: %w", s.id, ctx.Err())
	}
}

// setSVID swaps svid in, to be renewed at renewAt. See swap for the error.
func (s *Source) setSVID(svid *x509svid.SVID, renewAt time.Time) error {
	_, err := s.swap(update{svid: svid, renewAt: renewAt})
	return err
}

// setBundle swaps bundle in when seq is newer than the held bundle's, and
// reports whether it did. See swap for the error.
func (s *Source) setBundle(bundle *x509bundle.Bundle, seq uint64) (bool, error) {
	changes, err := s.swap(update{bundle: bundle, seq: seq})
	return changes.bundle, err
}

// update is what swap swaps in; its zero value changes nothing.
type update struct {
	// svid, unless nil, replaces the held SVID, to be renewed at renewAt.
	svid    *x509svid.SVID
	renewAt time.Time

	// bundle, unless nil, replaces the held bundle when seq is newer.
	bundle *x509bundle.Bundle
	seq    uint64

	// federated, when setFederated, replaces the federated bundles: sorted
	// by trust domain, none of the source's own.
	federated    []*x509bundle.Bundle
	setFederated bool
}

// changes says what a swap changed.
type changes struct {
	bundle    bool // the bundle of the source's trust domain
	federated bool // the set of federated bundles, or one of them
}

// swap swaps in what u holds: an SVID, a bundle newer than the held one,
// federated bundles. It reports which bundles changed, and notifies
// Changed when anything did.
//
// Then, whichever came first, it checks that the held SVID verifies
// against the held bundle. When it does not (a bundle without its root
// arrived, from the watch, while the SVID was being issued or after), it
// asks the renewal loop to renew at once, and returns the verification
// error; the renewal will send the token, as the server refuses such an
// SVID. When it does, any such request still pending is withdrawn: it was
// about an SVID since replaced, or a bundle since replaced. Both checks
// are made under one lock with both swaps, so the SVID and bundle held
// at the end are checked together, in whatever order the Sign response
// and the watch swap theirs in.
func (s *Source) swap(u update) (changes, error) {
	var cert *tls.Certificate
	if u.svid != nil {
		cert = &tls.Certificate{
			Certificate: make([][]byte, len(u.svid.Certificates)),
			PrivateKey:  u.svid.PrivateKey,
			Leaf:        u.svid.Certificates[0],
		}
		for i, c := range u.svid.Certificates {
			cert.Certificate[i] = c.Raw
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var ch changes
	if u.bundle != nil && u.seq > s.bundleSeq {
		s.bundle, s.bundleSeq = u.bundle, u.seq
		ch.bundle = true
	}
	if u.setFederated && !sameBundles(s.federated, u.federated) {
		s.federated = u.federated
		ch.federated = true
	}
	if u.svid != nil {
		first := s.svid == nil
		s.svid, s.tlsCert, s.renewAt = u.svid, cert, u.renewAt
		if first {
			close(s.ready)
		}
	}
	if !ch.bundle && u.svid == nil {
		if ch.federated {
			s.notifyLocked()
		}
		return ch, nil
	}
	s.notifyLocked()
	if s.svid == nil || !s.clock.Now().Before(s.svid.Certificates[0].NotAfter) {
		// Nothing to renew early: the renewal loop is already getting one.
		return ch, nil
	}
	if err := s.verify(s.svid, s.bundle); err != nil {
		select {
		case s.renewal <- struct{}{}:
		default:
		}
		return ch, err
	}
	select {
	case <-s.renewal:
	default:
	}
	return ch, nil
}

func (s *Source) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// current returns the held SVID, its TLS form and renew point, and the
// bundle with its sequence.
func (s *Source) current() (*x509svid.SVID, *tls.Certificate, time.Time, *x509bundle.Bundle, uint64) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.svid, s.tlsCert, s.renewAt, s.bundle, s.bundleSeq
}

// usableCert returns the current SVID as a TLS certificate when it can
// authenticate a renewal: it has not expired and its chain verifies
// against the held bundle, as the server verifies it against its own. It
// returns nil otherwise: when there is none, when it expired, and when its
// root has left the bundle. Both the renewal's choice of credential and
// the TLS client certificate go by it, so a source whose SVID the server
// would refuse presents none and sends the token.
func (s *Source) usableCert() *tls.Certificate {
	svid, cert, _, bundle, _ := s.current()
	if cert == nil || s.verify(svid, bundle) != nil {
		return nil
	}
	return cert
}

// verify verifies svid's chain against bundle at verifyTime: it fails once
// the SVID has expired.
func (s *Source) verify(svid *x509svid.SVID, bundle *x509bundle.Bundle) error {
	_, _, err := x509svid.Verify(svid.Certificates, bundle, x509svid.WithTime(s.verifyTime(svid.Certificates[0])))
	return err
}

// renewPoint returns when leaf should be renewed: at a fraction of its life
// drawn from [RenewFraction − RenewJitter, RenewFraction]. A fresh
// certificate issued with its renew point already past (its life clamped
// to an expiring intermediate's, or a clock skew) is renewed at that
// fraction of what is left, and not sooner than Backoff.Initial, so that
// such a CA is not asked again in a tight loop. An initial SVID past its
// renew point is renewed at once.
func (s *Source) renewPoint(leaf *x509.Certificate, now time.Time, fresh bool) time.Time {
	// Jitter only brings the renew point forward, as Backoff's only
	// shortens a wait: no certificate is renewed later than RenewFraction.
	f := s.renewFraction - s.renewJitter*s.random()
	at := leaf.NotBefore.Add(time.Duration(f * float64(leaf.NotAfter.Sub(leaf.NotBefore))))
	if !fresh || !at.Before(now) {
		return at
	}
	at = now.Add(time.Duration(f * float64(leaf.NotAfter.Sub(now))))
	if earliest := now.Add(s.backoff.Initial); at.Before(earliest) {
		at = earliest
	}
	return at
}

func (s *Source) random() float64 {
	s.randMu.Lock()
	defer s.randMu.Unlock()
	return s.rand()
}

func newP256Key() (crypto.Signer, error) {
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

// keyMatches reports whether key is the private key of cert.
func keyMatches(key crypto.Signer, cert *x509.Certificate) bool {
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	return ok && pub.Equal(cert.PublicKey)
}
