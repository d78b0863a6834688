package main

// meshctl bench --mode storm and --mode mixed: many new workloads, each
// with a new key and a new TLS connection, and (mixed) clients renewing
// over mTLS beside them.

import (
	"cmp"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net/http"
	"net/url"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/internal/wire"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
)

// Values of --keys.
const (
	keysAhead  = "ahead"
	keysInline = "inline"
)

const (
	// maxStormWorkloads bounds -n in storm and mixed.
	maxStormWorkloads = 1_000_000
	// rssPollInterval is how often storm and mixed read the server's
	// resident memory during the run.
	rssPollInterval = 250 * time.Millisecond
	// fdMargin is the file descriptors bench needs beside its connections.
	fdMargin = 64
	// stormReadBuffer is each storm connection's read buffer: small, so
	// that thousands of held connections cost bench little memory.
	stormReadBuffer = 4 << 10
	// Backoff of the retries the server gave no hint for.
	retryBackoffMin = 100 * time.Millisecond
	retryBackoffMax = 5 * time.Second
)

// workloadKey is one workload's key and its CSR.
type workloadKey struct {
	key *ecdsa.PrivateKey
	csr []byte
}

// newWorkloadKey makes a P-256 key and a CSR for id.
func newWorkloadKey(id spiffeid.ID) (workloadKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return workloadKey{}, fmt.Errorf("generating a key: %w", err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
	if err != nil {
		return workloadKey{}, fmt.Errorf("creating CSR: %w", err)
	}
	return workloadKey{key: key, csr: der}, nil
}

// makeWorkloadKeys makes n keys and CSRs for id on all of this process's
// cores.
func makeWorkloadKeys(ctx context.Context, n int, id spiffeid.ID) ([]workloadKey, error) {
	keys := make([]workloadKey, n)
	errs := make([]error, runtime.GOMAXPROCS(0))
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := range errs {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if keys[i], errs[w] = newWorkloadKey(id); errs[w] != nil {
					return
				}
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("interrupted while making keys: %w", err)
	}
	return keys, nil
}

// storm sends workloads' requests, each on a new connection.
type storm struct {
	target string
	// tls verifies the server. It has no client certificate, and no
	// session cache: no handshake resumes an earlier session.
	tls *tls.Config
	// creds are tls's, for the workloads (they authenticate with a token).
	creds           credentials.TransportCredentials
	attemptTimeout  time.Duration
	workloadTimeout time.Duration
	// hold keeps each workload's connection open with a bundle watch,
	// under holdCtx.
	hold    bool
	holdCtx context.Context
}

func newStorm(target string, cfg *tls.Config, attemptTimeout, workloadTimeout time.Duration) *storm {
	cfg = cfg.Clone()
	cfg.ClientSessionCache = nil
	cfg.SessionTicketsDisabled = true
	return &storm{
		target:          target,
		tls:             cfg,
		creds:           credentials.NewTLS(cfg),
		attemptTimeout:  attemptTimeout,
		workloadTimeout: workloadTimeout,
		holdCtx:         context.Background(),
	}
}

// mtlsCreds returns credentials that present svid as client certificate.
func (s *storm) mtlsCreds(svid *x509svid.SVID) credentials.TransportCredentials {
	cfg := s.tls.Clone()
	cfg.GetClientCertificate = tlsconfig.GetClientCertificate(svid)
	return credentials.NewTLS(cfg)
}

// dial returns a new connection, not yet connected.
func (s *storm) dial(creds credentials.TransportCredentials) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient(s.target,
		grpc.WithTransportCredentials(creds),
		grpc.WithReadBufferSize(stormReadBuffer),
		// bench retries, on a new connection, and counts the retries.
		grpc.WithDisableRetry(),
	)
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", s.target, err)
	}
	return conn, nil
}

// attemptTimes splits one successful attempt.
type attemptTimes struct {
	// connect is from the new connection to its being ready: TCP, the
	// TLS handshake and HTTP/2's preface.
	connect time.Duration
	// sign is the Sign RPC alone.
	sign time.Duration
}

// attempt opens a new connection with creds and sends req on it. On
// success the caller owns the connection.
func (s *storm) attempt(ctx context.Context, creds credentials.TransportCredentials, req *meshcav1.SignRequest) (*meshcav1.SignResponse, *grpc.ClientConn, attemptTimes, error) {
	t0 := time.Now()
	conn, err := s.dial(creds)
	if err != nil {
		return nil, nil, attemptTimes{}, err
	}
	waitReady(ctx, conn)
	t1 := time.Now()
	// When the connection failed, Sign fails at once with its reason.
	resp, err := meshcav1.NewCertificateServiceClient(conn).Sign(ctx, req)
	t2 := time.Now()
	if err == nil && len(resp.GetCertChain()) == 0 {
		err = errInvalidResponse
	}
	if err != nil {
		conn.Close()
		return nil, nil, attemptTimes{}, err
	}
	return resp, conn, attemptTimes{connect: t1.Sub(t0), sign: t2.Sub(t1)}, nil
}

// waitReady connects conn and waits until it is ready, has failed, or ctx
// is done.
func waitReady(ctx context.Context, conn *grpc.ClientConn) {
	conn.Connect()
	for {
		state := conn.GetState()
		switch state {
		case connectivity.Ready, connectivity.TransientFailure, connectivity.Shutdown:
			return
		}
		if !conn.WaitForStateChange(ctx, state) {
			return
		}
	}
}

// certify sends req until it is signed, retrying on a new connection
// when the server sheds load or is unavailable, for at most the workload
// timeout from start. Retries are counted in t. It returns the last
// error when it gives up, or ctx's when ctx ended first.
func (s *storm) certify(ctx context.Context, creds credentials.TransportCredentials, req *meshcav1.SignRequest, start time.Time, t *tally) (*meshcav1.SignResponse, *grpc.ClientConn, attemptTimes, error) {
	wctx, cancel := context.WithDeadline(ctx, start.Add(s.workloadTimeout))
	defer cancel()
	for attempt := 0; ; attempt++ {
		actx, acancel := context.WithTimeout(wctx, s.attemptTimeout)
		resp, conn, times, err := s.attempt(actx, creds, req)
		acancel()
		if err == nil {
			return resp, conn, times, nil
		}
		if ctx.Err() != nil {
			return nil, nil, attemptTimes{}, ctx.Err()
		}
		wait, shed, retry := retryDelay(err, attempt)
		if deadline, _ := wctx.Deadline(); !retry || time.Now().Add(wait).After(deadline) {
			return nil, nil, attemptTimes{}, err
		}
		if shed {
			t.shed++
		} else {
			t.retried.add(err)
		}
		timer := time.NewTimer(wait)
		select {
		case <-timer.C:
		case <-wctx.Done():
			timer.Stop()
			if ctx.Err() != nil {
				return nil, nil, attemptTimes{}, ctx.Err()
			}
			return nil, nil, attemptTimes{}, err
		}
	}
}

// retryDelay says whether a request that failed with err is worth
// another attempt, and after how long: when the server shed it
// (ResourceExhausted with a google.rpc.RetryInfo), its hint plus a random
// 0-50%; for the codes that mean "later" (Unavailable, DeadlineExceeded,
// ResourceExhausted without a hint), an exponential backoff with the same
// jitter.
func retryDelay(err error, attempt int) (wait time.Duration, shed, retry bool) {
	st, ok := status.FromError(err)
	if !ok {
		return 0, false, false
	}
	switch st.Code() {
	case codes.ResourceExhausted:
		if hint, ok := wire.RetryAfter(err); ok {
			return withJitter(hint), true, true
		}
	case codes.Unavailable, codes.DeadlineExceeded:
	default:
		return 0, false, false
	}
	backoff := retryBackoffMax
	if attempt < 6 {
		backoff = min(retryBackoffMin<<attempt, retryBackoffMax)
	}
	return withJitter(backoff), false, true
}

// withJitter returns d plus a random 0 to 50% of d.
func withJitter(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return d + mrand.N(d/2+1)
}

// watch opens a bundle watch stream on conn, as an agent does, and waits
// for its first bundle.
//
// The stream lives until the end of the hold (holdCtx), but its first
// bundle must come within one attempt's timeout, and before the run is
// interrupted: a server that never sends one cannot hang bench.
func (s *storm) watch(ctx context.Context, conn *grpc.ClientConn) error {
	streamCtx, cancel := context.WithCancel(s.holdCtx)
	firstBundle := time.AfterFunc(s.attemptTimeout, cancel)
	interrupt := context.AfterFunc(ctx, cancel)
	stream, err := meshcav1.NewBundleServiceClient(conn).WatchBundle(streamCtx, &meshcav1.WatchBundleRequest{})
	if err == nil {
		_, err = stream.Recv()
	}
	// From here the stream lives as long as the hold.
	timedOut := !firstBundle.Stop()
	interrupt()
	if err != nil || timedOut {
		cancel()
		return cmp.Or(err, context.DeadlineExceeded)
	}
	return nil
}

// renewer is a client that renews its certificate over mTLS.
type renewer struct {
	svid *x509svid.SVID
}

// stormPlan is what one storm run does.
type stormPlan struct {
	id       spiffeid.ID
	n        int
	inFlight int
	// keys are the workloads' keys, made ahead; nil: each workload makes
	// its own.
	keys     []workloadKey
	renewers []*renewer
	// pool holds the renewals' keys, made ahead; nil: each renewal makes
	// its own.
	pool []workloadKey
}

// tally is what one goroutine of a storm saw; tallies are merged at the
// end, so that the goroutines share no lock.
type tally struct {
	total, connect, sign []time.Duration
	// last is when the last certificate came.
	last time.Time
	// shed counts the attempts the server shed and that were retried.
	shed    int
	retried codeCounts
	// failed counts the final errors.
	failed codeCounts
}

func (t *tally) success(total time.Duration, at attemptTimes) {
	t.last = time.Now()
	t.total = append(t.total, total)
	t.connect = append(t.connect, at.connect)
	t.sign = append(t.sign, at.sign)
}

// codeCounts counts errors by gRPC code, keeping the first message of
// each.
type codeCounts struct {
	counts map[string]int
	first  map[string]string
}

func (c *codeCounts) add(err error) {
	c.addN(errorKey(err), errorMessage(err), 1)
}

func (c *codeCounts) addN(key, msg string, n int) {
	if c.counts == nil {
		c.counts, c.first = map[string]int{}, map[string]string{}
	}
	if _, ok := c.first[key]; !ok {
		c.first[key] = msg
	}
	c.counts[key] += n
}

func (c *codeCounts) merge(o codeCounts) {
	for k, n := range o.counts {
		c.addN(k, o.first[k], n)
	}
}

func (c codeCounts) total() int { return sumCounts(c.counts) }

// stormFigures are the merged tallies of the workloads or the renewals.
type stormFigures struct {
	OK              int
	Shed            int
	Retried, Failed codeCounts
	Total           latencySummary
	Connect         latencySummary
	Sign            latencySummary
}

func mergeTallies(ts []tally) stormFigures {
	var f stormFigures
	var total, connect, sign []time.Duration
	for _, t := range ts {
		total = append(total, t.total...)
		connect = append(connect, t.connect...)
		sign = append(sign, t.sign...)
		f.Shed += t.shed
		f.Retried.merge(t.retried)
		f.Failed.merge(t.failed)
	}
	for _, d := range [][]time.Duration{total, connect, sign} {
		slices.Sort(d)
	}
	f.OK = len(total)
	f.Total, f.Connect, f.Sign = summarizeLatencies(total), summarizeLatencies(connect), summarizeLatencies(sign)
	return f
}

// stormResult is the outcome of a storm run.
type stormResult struct {
	elapsed    time.Duration
	new        stormFigures
	renewals   stormFigures
	held       int
	holdFailed codeCounts
	// release closes the held connections.
	release func()
}

// run runs p: p.n workloads, p.inFlight at a time, and p.renewers renewing
// until the workloads are done. authCtx carries the workloads' token; its
// end (an interrupt) ends the run.
func (s *storm) run(authCtx context.Context, p *stormPlan) *stormResult {
	ctx := authCtx
	newTallies := make([]tally, p.inFlight)
	renewTallies := make([]tally, len(p.renewers))
	held := make([][]*grpc.ClientConn, p.inFlight)
	holdFailed := make([]codeCounts, p.inFlight)

	// Renewals carry no token.
	renewCtx, stopRenewals := context.WithCancel(metadata.NewOutgoingContext(ctx, nil))
	defer stopRenewals()
	var renewing sync.WaitGroup
	for i, rn := range p.renewers {
		renewing.Go(func() { s.renew(renewCtx, p, i, rn, &renewTallies[i]) })
	}

	var next atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for w := range p.inFlight {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= p.n {
					return
				}
				conn := s.workload(authCtx, p, i, &newTallies[w])
				if conn == nil {
					continue
				}
				if !s.hold {
					conn.Close()
					continue
				}
				if err := s.watch(ctx, conn); err != nil {
					holdFailed[w].add(err)
					conn.Close()
					continue
				}
				held[w] = append(held[w], conn)
			}
		})
	}
	wg.Wait()
	// The wall time ends at the last certificate, not at the last
	// workload's end (which may be a failure retried until its timeout,
	// or a held client waiting for its first bundle).
	elapsed := time.Since(start)
	var last time.Time
	for _, t := range newTallies {
		if t.last.After(last) {
			last = t.last
		}
	}
	if !last.IsZero() {
		elapsed = last.Sub(start)
	}
	stopRenewals()
	renewing.Wait()

	res := &stormResult{
		elapsed:  elapsed,
		new:      mergeTallies(newTallies),
		renewals: mergeTallies(renewTallies),
	}
	for w := range held {
		res.held += len(held[w])
		res.holdFailed.merge(holdFailed[w])
	}
	res.release = func() {
		for _, conns := range held {
			for _, c := range conns {
				c.Close()
			}
		}
	}
	return res
}

// workload certifies workload i and returns its connection, or nil when
// it failed (counted in t) or was cut short by the end of ctx (counted
// nowhere).
func (s *storm) workload(ctx context.Context, p *stormPlan, i int, t *tally) *grpc.ClientConn {
	start := time.Now()
	var csr []byte
	if p.keys != nil {
		csr = p.keys[i].csr
	} else {
		k, err := newWorkloadKey(p.id)
		if err != nil {
			t.failed.add(err)
			return nil
		}
		csr = k.csr
	}
	_, conn, times, err := s.certify(ctx, s.creds, &meshcav1.SignRequest{Csr: csr}, start, t)
	if err != nil {
		if ctx.Err() == nil {
			t.failed.add(err)
		}
		return nil
	}
	t.success(time.Since(start), times)
	return conn
}

// renew renews rn's certificate over mTLS, one renewal after the other,
// until ctx ends. Renewal j uses a key other than the one it replaces.
func (s *storm) renew(ctx context.Context, p *stormPlan, i int, rn *renewer, t *tally) {
	for j := 1; ctx.Err() == nil; j++ {
		start := time.Now()
		var k workloadKey
		if p.pool != nil {
			k = p.pool[(i+j)%len(p.pool)]
		} else {
			var err error
			if k, err = newWorkloadKey(rn.svid.ID); err != nil {
				t.failed.add(err)
				return
			}
		}
		resp, conn, times, err := s.certify(ctx, s.mtlsCreds(rn.svid), &meshcav1.SignRequest{Csr: k.csr}, start, t)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			// A final error (certify retried what was worth it): wait
			// before the next renewal, not to spin handshakes beside the
			// storm.
			t.failed.add(err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(withJitter(retryBackoffMax)):
			}
			continue
		}
		conn.Close()
		svid, err := svidFromResponse(rn.svid.ID, resp, k.key)
		if err != nil {
			t.failed.add(err)
			continue
		}
		t.success(time.Since(start), times)
		rn.svid = svid
	}
}

// svidFromResponse returns the SVID of a Sign response for key.
func svidFromResponse(id spiffeid.ID, resp *meshcav1.SignResponse, key *ecdsa.PrivateKey) (*x509svid.SVID, error) {
	certs := make([]*x509.Certificate, 0, len(resp.GetCertChain()))
	for _, der := range resp.GetCertChain() {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("server's response: %w", err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errInvalidResponse
	}
	return &x509svid.SVID{ID: id, Certificates: certs, PrivateKey: key}, nil
}

// enrol gives n renewing clients their first certificate, with the token
// in ctx, over one connection. These certificates are not counted.
func (s *storm) enrol(ctx context.Context, id spiffeid.ID, n int, pool []workloadKey) ([]*renewer, error) {
	conn, err := s.dial(s.creds)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	client := meshcav1.NewCertificateServiceClient(conn)
	renewers := make([]*renewer, n)
	for i := range renewers {
		var k workloadKey
		if pool != nil {
			k = pool[i%len(pool)]
		} else if k, err = newWorkloadKey(id); err != nil {
			return nil, err
		}
		rctx, cancel := context.WithTimeout(ctx, s.attemptTimeout)
		resp, err := client.Sign(rctx, &meshcav1.SignRequest{Csr: k.csr})
		cancel()
		if err != nil {
			return nil, fmt.Errorf("first certificate of renewing client %d: %w", i+1, err)
		}
		svid, err := svidFromResponse(id, resp, k.key)
		if err != nil {
			return nil, fmt.Errorf("first certificate of renewing client %d: %w", i+1, err)
		}
		renewers[i] = &renewer{svid: svid}
	}
	return renewers, nil
}

// runStorm runs --mode storm or mixed and prints the report.
func (o *benchOptions) runStorm(ctx context.Context, stop context.CancelFunc, cmd *cobra.Command, id spiffeid.ID, token string) error {
	stdout := cmd.OutOrStdout()
	n := int(o.requests)
	r := stormReport{
		Mode:            o.mode,
		Workloads:       n,
		InFlight:        min(o.concurrency, n),
		Keys:            o.keys,
		WorkloadTimeout: o.workloadTimeout,
		Hold:            o.hold,
		Renewers:        o.renewals,
		benchCommon:     benchCommon{MetricsURL: o.metricsURL},
	}

	limit, limitErr := fileLimit()
	r.FileLimit = limit
	need, what := r.InFlight+o.renewals+fdMargin, "--concurrency"
	if o.hold {
		need, what = n+fdMargin, "-n with --hold"
	}
	if limitErr == nil && limit > 0 && uint64(need) > limit {
		return fmt.Errorf("%s needs about %d file descriptors, one a connection; this process may open %d (RLIMIT_NOFILE, raised to its hard limit): lower it, or raise the hard limit (ulimit -Hn)", what, need, limit)
	}

	o.server.sendsCredential = true
	cfg, err := o.server.tlsConfig(nil)
	if err != nil {
		return err
	}
	s := newStorm(o.server.address, cfg, o.server.timeout, o.workloadTimeout)
	authCtx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)

	plan := &stormPlan{id: id, n: n, inFlight: r.InFlight}
	if o.keys == keysAhead {
		t0 := time.Now()
		if plan.keys, err = makeWorkloadKeys(ctx, n, id); err != nil {
			return err
		}
		if o.mode == modeMixed {
			if plan.pool, err = makeWorkloadKeys(ctx, o.csrs, id); err != nil {
				return err
			}
		}
		r.KeysMade, r.PoolKeys, r.KeygenTime = len(plan.keys), len(plan.pool), time.Since(t0)
	}

	// The crypto floor, and a first workload (not counted) so that a
	// wrong token or bundle fails at once.
	first, err := newWorkloadKey(id)
	if err != nil {
		return err
	}
	sample, err := x509.ParseCertificateRequest(first.csr)
	if err != nil {
		return fmt.Errorf("parsing CSR: %w", err)
	}
	if r.Crypto, err = measureCrypto(ctx, sample); err != nil {
		return err
	}
	actx, cancel := context.WithTimeout(authCtx, o.server.timeout)
	_, conn, _, err := s.attempt(actx, s.creds, &meshcav1.SignRequest{Csr: first.csr})
	cancel()
	if err != nil {
		return fmt.Errorf("first request: %w", err)
	}
	conn.Close()
	if o.mode == modeMixed {
		if plan.renewers, err = s.enrol(authCtx, id, o.renewals, plan.pool); err != nil {
			return err
		}
	}

	httpClient := &http.Client{Timeout: 10 * time.Second}
	var before metricsSample
	var stopPolling func() rssPeak
	if o.metricsURL != "" {
		if before, err = scrapeMetrics(ctx, httpClient, o.metricsURL); err != nil {
			return fmt.Errorf("scraping --metrics-url (pass --metrics-url \"\" to skip the server's figures): %w", err)
		}
		r.RSSBefore, r.HasRSSBefore = before.rssBytes, before.hasRSS
		stopPolling = pollRSS(ctx, httpClient, o.metricsURL, rssPollInterval)
	}

	if o.output == "text" {
		fmt.Fprintln(stdout, r.header())
	}
	holdCtx, endHold := context.WithCancel(context.WithoutCancel(ctx))
	defer endHold()
	s.hold, s.holdCtx = o.hold, holdCtx
	res := s.run(authCtx, plan)
	r.Interrupted = ctx.Err() != nil
	stop() // a second interrupt ends meshctl at once

	if stopPolling != nil {
		peak := stopPolling()
		r.PeakRSS, r.RSSSamples = peak.bytes, peak.samples
		if peak.err != nil {
			r.RSSError = peak.err.Error()
		}
	}
	if o.metricsURL != "" {
		// Read while the held clients are still connected.
		r.scrapeAfter(cmd.Context(), httpClient, before)
		if r.Server != nil && r.Server.hasRSS && r.RSSSamples > 0 {
			r.PeakRSS = max(r.PeakRSS, r.Server.rssBytes)
		}
	}
	endHold()
	res.release()
	r.setResult(res)
	r.LocalGOMAXPROCS = runtime.GOMAXPROCS(0)

	if o.output == "json" {
		return writeJSON(stdout, r.json())
	}
	r.writeText(stdout)
	return nil
}
