package rotation

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/internal/wire"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
)

// Dialer connects to meshca-server. Run calls it for every Sign request and
// every bundle watch, and closes the connection when done with it: a TLS
// client certificate is fixed for the life of a connection, so each
// renewal needs a new handshake to present the SVID current at that moment
// (a connection opened before the first SVID could never renew over
// mTLS). A new connection per attempt also lets a retry reach another
// replica behind a load balancer.
type Dialer func(ctx context.Context) (*grpc.ClientConn, error)

// Run gets the first X509-SVID, retrying until it succeeds, then renews it
// at its renew point for as long as ctx lasts, retrying failures with
// backoff (or after the delay the server asks for in a
// google.rpc.RetryInfo detail, with jitter) and serving the current SVID
// until it expires. Alongside, it watches the server's bundle and swaps in
// each newer one. Every response is checked before it is swapped in: the
// chain parses, is for Options.ID and the key the source made, and
// verifies against the bundle.
//
// Run returns only when ctx is done, with ctx's error. A Source runs once
// at a time.
func (s *Source) Run(ctx context.Context, dial Dialer) error {
	if dial == nil {
		return errors.New("rotation: Run needs a Dialer")
	}
	if !s.running.CompareAndSwap(false, true) {
		return errors.New("rotation: Run is already running on this source")
	}
	defer s.running.Store(false)

	watchCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	wg.Go(func() { s.watchBundles(watchCtx, dial) })
	s.renewLoop(ctx, dial)
	cancel()
	wg.Wait()
	return fmt.Errorf("rotation: stopped: %w", ctx.Err())
}

// renewLoop renews at each renew point until ctx is done.
func (s *Source) renewLoop(ctx context.Context, dial Dialer) {
	wait := s.untilRenewal() // zero unless there is an initial SVID
	failures := 0
	for {
		if !s.sleep(ctx, wait, s.renewal) {
			return
		}
		// This attempt answers any request to renew made so far.
		select {
		case <-s.renewal:
		default:
		}
		method, err := s.renew(ctx, dial)
		if ctx.Err() != nil {
			return
		}
		// When the server refused the SVID, the next attempt sends the
		// token instead. The server can refuse an SVID the source still
		// trusts: its root was retired, and the watch has not told the
		// source yet. One attempt only: should the token fail too, the
		// next one tries the SVID again.
		s.certRefused.Store(method == methodMTLS && status.Code(err) == codes.Unauthenticated)
		if err == nil {
			failures = 0
			wait = s.untilRenewal()
			continue
		}
		failures++
		hint := retryHint(err)
		wait = s.retryWait(failures, hint)
		s.logFailure(ctx, err, failures, wait, hint)
	}
}

// retryWait returns the wait before the retry after the given number of
// consecutive failures. When the server hinted at a delay (hint > 0), it
// is the hint plus up to half of it at random, so that callers shed
// together do not come back together; otherwise it is Backoff's. Either
// is held to Backoff.Max, and to retryCap of the time the current SVID has
// left while there is one that has not expired, so that a CA that comes
// back is used before the SVID runs out.
func (s *Source) retryWait(failures int, hint time.Duration) time.Duration {
	limit := s.backoff.Max
	if svid, err := s.GetX509SVID(); err == nil {
		limit = retryCap(svid.Certificates[0].NotAfter.Sub(s.clock.Now()))
	}
	if hint > 0 {
		return s.backoff.hintedDelay(hint, s.random(), limit)
	}
	return s.backoff.delayWithin(failures, s.random(), limit)
}

// untilRenewal returns the time left before the current SVID's renew
// point: zero when there is no SVID or the point is past.
func (s *Source) untilRenewal() time.Duration {
	svid, _, renewAt, _, _ := s.current()
	if svid == nil {
		return 0
	}
	return max(renewAt.Sub(s.clock.Now()), 0)
}

// maxSleep is the longest the source sleeps without looking at the wall
// clock.
const maxSleep = time.Minute

// sleep waits d on the clock, or less when wake receives. It reports
// false when ctx is done first.
//
// Timers run on the monotonic clock, which stops while the machine is
// suspended or the VM paused: a timer for the whole wait would fire that
// much late, past the renew point and perhaps past the certificate's
// expiry. So the wall clock is read every maxSleep too, and the sleep ends
// once d has passed by either clock: at most maxSleep after a resume.
func (s *Source) sleep(ctx context.Context, d time.Duration, wake <-chan struct{}) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	deadline := s.wallNow().Add(d)
	// The check is armed before the timer, so that a fake clock that
	// reports the timer has both. After's timer need not be stopped: it
	// is collected once it fires, a minute at most after the sleep. A
	// wait no longer than maxSleep needs none.
	var check <-chan time.Time
	if d > maxSleep {
		check = s.clock.After(maxSleep)
	}
	t := s.clock.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return false
		case <-t.C():
			return true
		case <-wake:
			return true
		case <-check:
			left := deadline.Sub(s.wallNow())
			if left <= 0 {
				return true
			}
			check = s.clock.After(min(left, maxSleep))
		}
	}
}

// wallNow returns the clock's time without its monotonic reading, so that
// durations between such times are measured on the wall clock, which goes
// on while the machine sleeps.
func (s *Source) wallNow() time.Time { return s.clock.Now().Round(0) }

// logFailure logs a failed attempt: how many in a row, the wait before the
// next, and the delay the server hinted at, if any.
func (s *Source) logFailure(ctx context.Context, err error, failures int, wait, hint time.Duration) {
	level := slog.LevelWarn
	attrs := []slog.Attr{
		slog.Int("failures", failures),
		slog.Duration("retry_in", wait),
	}
	if hint > 0 {
		attrs = append(attrs, slog.Duration("server_hint", hint))
	}
	if st, ok := status.FromError(err); ok {
		attrs = append(attrs, slog.String("code", st.Code().String()))
	}
	if svid, _ := s.GetX509SVID(); svid != nil {
		attrs = append(attrs, slog.Time("current_expires", svid.Certificates[0].NotAfter))
	} else {
		// Nothing valid to serve: the workload's TLS is failing.
		level = slog.LevelError
	}
	attrs = append(attrs, slog.Any("error", err))
	s.log.LogAttrs(ctx, level, "getting an X509-SVID failed", attrs...)
}

// The credentials of a renewal, as logged.
const (
	methodMTLS  = "mtls"  // the current SVID, as the TLS client certificate
	methodToken = "token" // Options.Token, and no client certificate
	methodNone  = "none"  // neither
)

// renew asks for a new SVID and swaps it in. It returns the credential it
// chose, one of the methods above ("" when it failed before choosing).
func (s *Source) renew(ctx context.Context, dial Dialer) (string, error) {
	key, err := s.newKey()
	if err != nil {
		return "", fmt.Errorf("rotation: generating a key: %w", err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{s.id.URL()}}, key)
	if err != nil {
		return "", fmt.Errorf("rotation: creating the CSR: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, s.requestTimeout)
	defer cancel()

	// The client certificate is chosen at the handshake by the same rules
	// (getClientCertificate): the SVID when it can authenticate, and not
	// on the attempt after the server refused it.
	method := methodMTLS
	if s.certRefused.Load() || s.usableCert() == nil {
		// No SVID the server would take: authenticate with the token, if
		// any.
		method = methodNone
		if s.token != nil {
			token, err := s.token(ctx)
			if err != nil {
				return method, fmt.Errorf("rotation: getting the token: %w", err)
			}
			if token != "" {
				method = methodToken
				ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
			}
		}
	}
	req := &meshcav1.SignRequest{Csr: csr, BundleSequence: s.BundleSequence()}
	if s.ttl > 0 {
		req.Ttl = durationpb.New(s.ttl)
	}
	conn, err := dial(ctx)
	if err != nil {
		return method, fmt.Errorf("rotation: connecting to the CA: %w", err)
	}
	defer conn.Close()
	resp, err := meshcav1.NewCertificateServiceClient(conn).Sign(ctx, req)
	if err != nil {
		return method, fmt.Errorf("rotation: Sign: %w", err)
	}

	svid, bundle, seq, err := s.check(resp, key)
	if err != nil {
		return method, err
	}
	federated := s.federatedFrom(ctx, resp.GetFederatedBundles())
	now := s.clock.Now()
	leaf := svid.Certificates[0]
	renewAt := s.renewPoint(leaf, now, true)
	changed, stale := s.swap(update{svid: svid, renewAt: renewAt, bundle: bundle, seq: seq, federated: federated, setFederated: true})
	s.log.LogAttrs(ctx, slog.LevelInfo, "X509-SVID issued",
		slog.String("method", method),
		slog.String("serial", leaf.SerialNumber.Text(16)),
		slog.Time("not_after", leaf.NotAfter),
		slog.Time("renew_at", renewAt))
	if changed.bundle {
		s.log.LogAttrs(ctx, slog.LevelInfo, "trust bundle updated", slog.String("from", "sign"), slog.Uint64("sequence", seq))
	}
	if changed.federated {
		s.log.LogAttrs(ctx, slog.LevelInfo, "federated bundles updated", slog.Any("trust_domains", trustDomains(federated)))
	}
	if stale != nil {
		// The watch swapped in a newer bundle between check and swap.
		s.log.LogAttrs(ctx, slog.LevelWarn, "the new X509-SVID does not verify against a bundle that arrived meanwhile; renewing now",
			slog.Any("error", stale))
	}
	return method, nil
}

// check validates a Sign response for key. It returns the SVID, and the
// response's bundle with its sequence when that is newer than the held
// one (nil otherwise). The chain must verify against the newer of the two
// bundles, the one the source will hold: a lagging replica's certificate
// under a root that has since left the bundle is refused.
func (s *Source) check(resp *meshcav1.SignResponse, key crypto.Signer) (*x509svid.SVID, *x509bundle.Bundle, uint64, error) {
	ders := resp.GetCertChain()
	if len(ders) == 0 {
		return nil, nil, 0, errors.New("rotation: the CA's response has no certificate chain")
	}
	chain, err := pemutil.ParseDER(ders)
	if err != nil {
		return nil, nil, 0, fmt.Errorf("rotation: the CA's certificate chain: %w", err)
	}
	leaf := chain[0]
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return nil, nil, 0, fmt.Errorf("rotation: the CA issued a certificate that is not an X509-SVID: %w", err)
	}
	if id != s.id {
		return nil, nil, 0, fmt.Errorf("rotation: the CA issued a certificate for %q; asked for %q", id, s.id)
	}
	if !keyMatches(key, leaf) {
		return nil, nil, 0, errors.New("rotation: the CA issued a certificate for another public key than the CSR's")
	}

	_, _, _, bundle, seq := s.current()
	var newer *x509bundle.Bundle
	if resp.GetBundle() != nil {
		b, bseq, err := s.parseBundle(resp.GetBundle())
		if err != nil {
			return nil, nil, 0, fmt.Errorf("rotation: the CA's response: %w", err)
		}
		if bseq > seq {
			newer, bundle, seq = b, b, bseq
		}
	}
	if _, _, err := x509svid.Verify(chain, bundle, x509svid.WithTime(s.verifyTime(leaf))); err != nil {
		return nil, nil, 0, fmt.Errorf("rotation: the CA's certificate chain does not verify against the trust bundle (sequence %d): %w", seq, err)
	}
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}, newer, seq, nil
}

// verifyTime returns the time to verify leaf's chain at: now, or leaf's
// NotBefore when that is later. A certificate not yet valid by this clock
// (the server's clock is ahead by more than its backdating) is still the
// best there is, and peers judge it by their own clocks; one expired is
// refused.
func (s *Source) verifyTime(leaf *x509.Certificate) time.Time {
	now := s.clock.Now()
	if now.Before(leaf.NotBefore) {
		return leaf.NotBefore
	}
	return now
}

// parseBundle parses a bundle of the source's trust domain.
func (s *Source) parseBundle(pb *meshcav1.TrustBundle) (*x509bundle.Bundle, uint64, error) {
	bundle, seq, err := wire.ParseBundle(pb)
	if err != nil {
		return nil, 0, err
	}
	if td := bundle.TrustDomain(); td != s.td {
		return nil, 0, fmt.Errorf("bundle is for trust domain %q; want %q", td, s.td)
	}
	return bundle, seq, nil
}
