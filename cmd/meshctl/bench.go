package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
)

// Limits of the in-process crypto measurement.
const (
	cryptoBudget     = time.Second
	cryptoIterations = 2000
)

// The modes of meshctl bench.
const (
	modeSteady = "steady"
	modeStorm  = "storm"
	modeMixed  = "mixed"
)

// Defaults that depend on the mode.
const (
	defaultSteadyWorkers = 8
	defaultStormInFlight = 256
	defaultStormN        = 1000
)

type benchOptions struct {
	server      serverFlags
	mode        string
	concurrency int
	duration    time.Duration
	requests    int64
	csrs        int
	batch       int
	cpuProfile  string
	token       string
	tokenFile   string
	spiffeID    string
	metricsURL  string
	connections int
	output      string
	// transportProbe is how long steady runs the transport probe after
	// the run; 0 skips it.
	transportProbe time.Duration

	// storm and mixed
	keys            string
	workloadTimeout time.Duration
	renewals        int
	hold            bool
}

func newBenchCommand() *cobra.Command {
	o := &benchOptions{}
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Load a server with Sign requests; report rate, latency, errors, CPU and memory",
		Long: `bench loads meshca-server with CertificateService.Sign requests over gRPC and
TLS, in one of three modes, and reports what the clients saw and what the
server spent.

Modes (--mode):

  steady  (default) --concurrency workers send Sign one after the other
          over a few long-lived connections (--connections), for
          --duration or until --requests have been sent, with --csrs
          CSRs made before the run and sent in turn: the server's
          steady-state rate, without key generation or handshakes. Each
          connection is tried with one Sign before the run (not counted).
          --batch N sends SignBatch calls of N token entries instead:
          latency and errors are then those of the calls, and an entry
          the server refuses in a call that succeeded is counted apart
          ("refused", by code), not as a certificate.

  storm   -n new workloads, --concurrency of them in flight at once. Each
          workload has its own new P-256 key and CSR, opens a NEW TLS
          connection (no connection reuse, no TLS session resumption),
          sends Sign with the token, and closes the connection: the cost
          of a fleet of new pods starting at once. The run ends when every
          workload is certified or has failed.

  mixed   a storm of -n new workloads, plus --renewals renewing clients.
          Each renewing client gets a certificate with the token before
          the run (not counted), then during the run renews as fast as it
          can: a new TLS connection presenting its current certificate as
          client certificate (mTLS, no token), a CSR for a new key, and the
          certificate it gets is the one it presents next. The run ends
          when the new workloads are done; new and renewal figures are
          reported apart (the server is meant to serve first certificates
          before renewals).

Keys (storm, mixed; --keys): "ahead" (default) makes every workload's key
and CSR before the run, on all of this machine's cores, and reports how
long that took; renewals then take keys in turn from a pool of --csrs keys
made ahead too (each renewal presents a key other than the one it
replaces). "inline" makes each key when its workload starts or its
renewal is sent, inside the measured time. bench and a server on one
machine share its cores: key generation inline competes with the server,
so "ahead" measures the server and "inline" the whole fleet.

Load shedding and retries (storm, mixed): a ResourceExhausted refusal with
a google.rpc.RetryInfo detail is the server shedding load: bench waits the
hint plus a random 0-50% jitter and retries on a new connection, counting
it as "shed (retried)". Unavailable, DeadlineExceeded (an attempt longer
than --timeout) and ResourceExhausted without a hint are retried too,
after an exponential backoff from 100ms to 5s with the same jitter, and
counted as "retried" by code. Any other code is final at once. A workload
that has no certificate --workload-timeout after it started is a final
error: "errors" counts those by the code of their last attempt.

--hold (storm): each workload keeps its connection open once certified,
with a bundle watch stream (BundleService.WatchBundle) on it as an agent
would, until every workload is done; bench then reads the server's
resident memory again and reports the increase over the N held clients as
"memory per connected client": an upper bound, since the increase also
holds what issuing N certificates left on the heap. Every held connection
is a file descriptor: bench may open as many as its soft RLIMIT_NOFILE,
which Go raises to the hard limit at startup, and refuses an -n it cannot
hold. From one source address a host can hold
about as many connections to one server address as it has ephemeral ports
(net.ipv4.ip_local_port_range).

Every mode reports:

  rate        certificates issued to bench per second (storm, mixed: the
              new workloads over the wall time from the first start to the
              last certificate)
  latency     p50, p90, p99 and max of the successful requests; storm and
              mixed report the whole workload (connect, TLS handshake and
              Sign, with any retries and waits) and the Sign alone
  errors      the failures by gRPC code, with the first message of each
  server      the server's CPU time per certificate and its resident
              memory, from its Prometheus metrics (--metrics-url) scraped
              before and after the run: the CPU time the process used,
              over the certificates it issued (meshca_certificates_issued_total,
              every API, whoever asked) in between. Storm and mixed also
              poll process_resident_memory_bytes every 250ms during the
              run and report its peak.
  crypto      the cost, measured in this process before the run on one
              goroutine (the fastest of batches of 20, so that other load
              does not inflate it), of the crypto one certificate needs at
              least: checking one P-256 CSR signature and making one P-256
              signature; and the rate at which one core, or all the
              server's cores (its GOMAXPROCS, or this machine's), could
              sign if they did only that
  efficiency  crypto cost / server CPU per certificate: how much of the
              server's work per certificate is the crypto it cannot avoid

Steady also reports, after the run (--transport-probe, 0 to skip):

  transport   the server's CPU time per call of BundleService.GetBundle,
              sent by the same workers over the same connections with the
              same authorization header for --transport-probe: what a
              gRPC call over TLS costs when it does no work (HTTP/2, TLS
              records, system calls, waking goroutines). The server
              answers it faster than Sign, so more answers share a write:
              a lower bound of what Sign's calls cost
  ceiling     crypto / (crypto + transport per call, over --batch): the
              efficiency of a server that did nothing per certificate but
              the crypto and the call, an upper bound for this transport
              on this machine

An interrupt (Ctrl-C) ends the run and prints the results so far. Measure
on an otherwise idle server; bench and a server on the same machine share
its CPUs. The server's CPU includes everything it does per request: TLS
handshakes and HTTP/2, authentication, audit logging.`,
		Example: `  # steady: 8 workers for 10s over one connection
  meshctl bench --ca-bundle .meshca/bundle.pem --token-file .meshca/demo-token \
    --spiffe-id spiffe://meshca.local/ns/default/sa/demo
  meshctl bench -c 32 -d 30s --connections 4 --ca-bundle .meshca/bundle.pem \
    --token-file .meshca/demo-token --spiffe-id spiffe://meshca.local/ns/default/sa/demo
  meshctl bench -n 1000 -d 0 --metrics-url "" -o json --ca-bundle .meshca/bundle.pem \
    --token-file .meshca/demo-token --spiffe-id spiffe://meshca.local/ns/default/sa/demo
  # the same load as SignBatch calls of 32 certificates each
  meshctl bench --batch 32 --ca-bundle .meshca/bundle.pem --token-file .meshca/demo-token \
    --spiffe-id spiffe://meshca.local/ns/default/sa/demo

  # storm: 10,000 new workloads, 256 in flight, each a new key and a new connection
  meshctl bench --mode storm -n 10000 --ca-bundle .meshca/bundle.pem \
    --token-file .meshca/demo-token --spiffe-id spiffe://meshca.local/ns/default/sa/demo

  # the same, keeping every client connected: memory per connected client
  meshctl bench --mode storm -n 10000 --hold --ca-bundle .meshca/bundle.pem \
    --token-file .meshca/demo-token --spiffe-id spiffe://meshca.local/ns/default/sa/demo

  # mixed: 5,000 new workloads while 64 clients renew over mTLS
  meshctl bench --mode mixed -n 5000 --renewals 64 --ca-bundle .meshca/bundle.pem \
    --token-file .meshca/demo-token --spiffe-id spiffe://meshca.local/ns/default/sa/demo`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return o.run(cmd) },
	}
	o.server.register(cmd)
	f := cmd.Flags()
	f.StringVar(&o.mode, "mode", modeSteady, "steady, storm or mixed (see above)")
	f.IntVarP(&o.concurrency, "concurrency", "c", 0,
		fmt.Sprintf("steady: workers, each with one request in flight (default %d); storm, mixed: new workloads in flight at once (default %d)", defaultSteadyWorkers, defaultStormInFlight))
	f.DurationVarP(&o.duration, "duration", "d", 10*time.Second, "steady: how long to send requests (0: until --requests are sent)")
	f.Int64VarP(&o.requests, "requests", "n", 0,
		fmt.Sprintf("steady: stop after this many requests in all (0: no limit); storm, mixed: the number of new workloads (default %d)", defaultStormN))
	f.IntVar(&o.csrs, "csrs", 256, "steady: CSRs to make before the run and send in turn; mixed with --keys ahead: the renewals' key pool")
	f.StringVar(&o.token, "token", "", "bootstrap token (visible to other users in the process list; prefer --token-file)")
	f.StringVar(&o.tokenFile, "token-file", "", "file holding the bootstrap token")
	f.StringVar(&o.spiffeID, "spiffe-id", "", "SPIFFE ID of the token, asked for by every CSR")
	f.StringVar(&o.metricsURL, "metrics-url", "http://127.0.0.1:9402/metrics", `the server's Prometheus metrics, for its CPU and memory ("" to skip)`)
	f.IntVar(&o.connections, "connections", 1, "steady: number of gRPC connections the workers share")
	f.DurationVar(&o.transportProbe, "transport-probe", defaultTransportProbe, "steady: how long to measure a call that does no work after the run (0: skip)")
	f.IntVar(&o.batch, "batch", 1, fmt.Sprintf("steady: certificates per call; more than 1 sends SignBatch with that many token entries (at most %d) instead of Sign", maxBenchBatch))
	f.StringVarP(&o.output, "output", "o", "text", "output format: text or json")
	f.StringVar(&o.cpuProfile, "cpu-profile", "", "write bench's own CPU profile to this file (go tool pprof): where the load generator's time goes")
	f.StringVar(&o.keys, "keys", keysAhead, `storm, mixed: make the workloads' keys "ahead" of the run or "inline", inside it`)
	f.DurationVar(&o.workloadTimeout, "workload-timeout", 60*time.Second, "storm, mixed: a workload without a certificate this long after it started is a final error")
	f.IntVar(&o.renewals, "renewals", 0, "mixed: number of clients renewing over mTLS during the run")
	f.BoolVar(&o.hold, "hold", false, "storm: keep every connection open with a bundle watch until the end, and report memory per connected client")
	return cmd
}

// complete applies the defaults that depend on the mode and checks the
// flags.
func (o *benchOptions) complete(cmd *cobra.Command) error {
	changed := cmd.Flags().Changed
	if !changed("concurrency") {
		o.concurrency = defaultSteadyWorkers
	}
	switch o.mode {
	case modeSteady:
		for _, name := range []string{"keys", "workload-timeout", "renewals", "hold"} {
			if changed(name) {
				return fmt.Errorf("--%s is for --mode storm or mixed", name)
			}
		}
	case modeStorm, modeMixed:
		for _, name := range []string{"duration", "connections", "batch", "transport-probe"} {
			if changed(name) {
				return fmt.Errorf("--%s is for --mode steady: a %s ends when its -n workloads are done", name, o.mode)
			}
		}
		if changed("csrs") && (o.mode != modeMixed || o.keys != keysAhead) {
			return errors.New("--csrs is for --mode steady, or the renewals' key pool of --mode mixed with --keys ahead")
		}
		if !changed("concurrency") {
			o.concurrency = defaultStormInFlight
		}
		if !changed("requests") {
			o.requests = defaultStormN
		}
	default:
		return fmt.Errorf("--mode %q: want steady, storm or mixed", o.mode)
	}
	if o.mode != modeMixed && changed("renewals") {
		return errors.New("--renewals is for --mode mixed")
	}
	if o.mode != modeStorm && o.hold {
		return errors.New("--hold is for --mode storm")
	}
	return o.validate()
}

func (o *benchOptions) validate() error {
	switch {
	case o.output != "text" && o.output != "json":
		return fmt.Errorf("--output %q: want text or json", o.output)
	case o.concurrency < 1:
		return fmt.Errorf("--concurrency %d: want at least 1", o.concurrency)
	case o.spiffeID == "":
		return errors.New("--spiffe-id is required: every CSR asks for the token's identity")
	case o.csrs < 1:
		return fmt.Errorf("--csrs %d: want at least 1", o.csrs)
	case o.batch < 1 || o.batch > maxBenchBatch:
		return fmt.Errorf("--batch %d: want 1 (Sign) to %d (SignBatch entries)", o.batch, maxBenchBatch)
	}
	if o.mode != modeSteady {
		switch {
		case o.requests < 1:
			return fmt.Errorf("-n %d: want at least 1 workload", o.requests)
		case o.requests > maxStormWorkloads:
			return fmt.Errorf("-n %d: want at most %d workloads", o.requests, maxStormWorkloads)
		case o.keys != keysAhead && o.keys != keysInline:
			return fmt.Errorf("--keys %q: want ahead or inline", o.keys)
		case o.workloadTimeout <= 0:
			return fmt.Errorf("--workload-timeout %s: want more than 0", o.workloadTimeout)
		case o.mode == modeMixed && o.keys == keysAhead && o.csrs < 2:
			return fmt.Errorf("--csrs %d: --mode mixed with --keys ahead needs at least 2 renewal keys, so that a renewal never presents the key it replaces", o.csrs)
		case o.mode == modeMixed && o.renewals < 1:
			return fmt.Errorf("--renewals %d: --mode mixed wants at least 1 renewing client", o.renewals)
		}
		return nil
	}
	switch {
	case o.connections < 1:
		return fmt.Errorf("--connections %d: want at least 1", o.connections)
	case o.connections > o.concurrency:
		return fmt.Errorf("--connections %d is more than --concurrency %d: some connections would carry no requests", o.connections, o.concurrency)
	case o.requests < 0:
		return fmt.Errorf("--requests %d: want 0 (no limit) or more", o.requests)
	case o.duration < 0:
		return fmt.Errorf("--duration %s: want 0 or more", o.duration)
	case o.duration == 0 && o.requests == 0:
		return errors.New("--duration 0 needs --requests: the run would never end")
	case o.transportProbe < 0:
		return fmt.Errorf("--transport-probe %s: want 0 (skip) or more", o.transportProbe)
	}
	return nil
}

func (o *benchOptions) run(cmd *cobra.Command) error {
	if err := o.complete(cmd); err != nil {
		return err
	}
	id, err := spiffeid.FromString(o.spiffeID)
	if err != nil {
		return fmt.Errorf("--spiffe-id: %w", err)
	}
	token, err := (&issueOptions{token: o.token, tokenFile: o.tokenFile}).readToken()
	if err != nil {
		return err
	}
	if token == "" {
		return errors.New("no credential: give --token-file (or --token)")
	}
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if o.cpuProfile != "" {
		f, err := os.Create(o.cpuProfile)
		if err != nil {
			return fmt.Errorf("--cpu-profile: %w", err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("--cpu-profile: %w", err)
		}
		defer pprof.StopCPUProfile()
	}
	if o.mode == modeSteady {
		return o.runSteady(ctx, stop, cmd, id, token)
	}
	return o.runStorm(ctx, stop, cmd, id, token)
}

// measureCrypto measures the in-process crypto floor with a CSR for id.
func measureCrypto(ctx context.Context, sample *x509.CertificateRequest) (cryptoCost, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return cryptoCost{}, err
	}
	return measureCryptoCost(ctx, sample, key, cryptoBudget, cryptoIterations)
}

// scrapeAfter scrapes the metrics after a run into r, with a context of
// its own: the run's may have been interrupted.
func (c *benchCommon) scrapeAfter(parent context.Context, client *http.Client, before metricsSample) metricsSample {
	ctx, cancel := context.WithTimeout(parent, 10*time.Second)
	defer cancel()
	after, err := scrapeMetrics(ctx, client, c.MetricsURL)
	if err == nil {
		var f serverFigures
		if f, err = serverDelta(before, after); err == nil {
			c.Server = &f
		}
	}
	if err != nil {
		c.ServerError = err.Error()
	}
	return after
}

func (o *benchOptions) runSteady(ctx context.Context, stop context.CancelFunc, cmd *cobra.Command, id spiffeid.ID, token string) error {
	stdout := cmd.OutOrStdout()
	r := benchReport{
		Workers:     o.concurrency,
		Connections: o.connections,
		CSRs:        o.csrs,
		Batch:       o.batch,
		Duration:    o.duration,
		Requests:    o.requests,
		benchCommon: benchCommon{MetricsURL: o.metricsURL},
	}
	if o.batch > 1 {
		r.Entries = &entryTally{}
	}

	reqs, sample, err := makeSignRequests(o.csrs, id)
	if err != nil {
		return err
	}
	if r.Crypto, err = measureCrypto(ctx, sample); err != nil {
		return err
	}

	conns := make([]*grpc.ClientConn, o.connections)
	clients := make([]meshcav1.CertificateServiceClient, o.connections)
	o.server.sendsCredential = true
	for i := range conns {
		if conns[i], err = o.server.dial(nil); err != nil {
			return err
		}
		defer conns[i].Close()
		clients[i] = meshcav1.NewCertificateServiceClient(conns[i])
	}
	authCtx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	for i, client := range clients {
		if err := o.preflight(authCtx, client, reqs[i%len(reqs)]); err != nil {
			return fmt.Errorf("first request on connection %d: %w", i+1, err)
		}
	}

	httpClient := &http.Client{Timeout: 10 * time.Second}
	var before metricsSample
	if o.metricsURL != "" {
		if before, err = scrapeMetrics(ctx, httpClient, o.metricsURL); err != nil {
			return fmt.Errorf("scraping --metrics-url (pass --metrics-url \"\" to skip the server's figures): %w", err)
		}
	}

	if o.output == "text" {
		fmt.Fprintln(stdout, r.header())
	}
	workers := o.concurrency
	call := func(ctx context.Context, worker, i int) error {
		ctx, cancel := context.WithTimeout(ctx, o.server.timeout)
		defer cancel()
		return signBatch(ctx, clients[worker%len(clients)], reqs, (worker+i*workers)*o.batch, o.batch, token, r.Entries)
	}
	if o.batch == 1 {
		call = func(ctx context.Context, worker, i int) error {
			ctx, cancel := context.WithTimeout(ctx, o.server.timeout)
			defer cancel()
			req := reqs[(worker+i*workers)%len(reqs)]
			resp, err := clients[worker%len(clients)].Sign(ctx, req)
			if err != nil {
				return err
			}
			if len(resp.GetCertChain()) == 0 {
				return errInvalidResponse
			}
			return nil
		}
	}
	res := runLoad(authCtx, loadConfig{workers: workers, duration: o.duration, requests: o.requests}, call)
	r.Interrupted = ctx.Err() != nil
	r.setLoad(res)

	if o.metricsURL != "" {
		r.scrapeAfter(cmd.Context(), httpClient, before)
		if !r.Interrupted && o.transportProbe > 0 {
			t, err := probeTransport(authCtx, httpClient, o.metricsURL, conns, workers, o.transportProbe, o.server.timeout)
			if err != nil {
				r.TransportError = err.Error()
			} else {
				r.Transport = &t
			}
		}
	}
	stop() // a second interrupt ends meshctl at once
	r.LocalGOMAXPROCS = runtime.GOMAXPROCS(0)

	if o.output == "json" {
		return writeJSON(stdout, r.json())
	}
	r.writeText(stdout)
	return nil
}

// maxBenchBatch is the most entries --batch sends in one SignBatch: the
// server's limit.
const maxBenchBatch = 64

// entryTally counts the entries of SignBatch calls: a refused entry does
// not fail its call, so the certificates issued and the entries refused
// are counted apart from the calls.
type entryTally struct {
	certs atomic.Int64

	mu      sync.Mutex
	refused codeCounts
}

func (t *entryTally) refuse(code codes.Code, msg string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.refused.addN(code.String(), msg, 1)
}

// refusals returns the refused entries by code, and the first message of
// each.
func (t *entryTally) refusals() codeCounts {
	t.mu.Lock()
	defer t.mu.Unlock()
	return codeCounts{counts: maps.Clone(t.refused.counts), first: maps.Clone(t.refused.first)}
}

// signBatch sends one SignBatch of n entries, each with the token and the
// next of reqs' CSRs from first on, and counts its entries in tally. The
// call fails when SignBatch fails or its answer is malformed; a refused
// entry is counted, not failed.
func signBatch(ctx context.Context, client meshcav1.CertificateServiceClient, reqs []*meshcav1.SignRequest, first, n int, token string, tally *entryTally) error {
	entries := make([]*meshcav1.SignBatchEntry, n)
	for k := range entries {
		entries[k] = &meshcav1.SignBatchEntry{
			Csr:        reqs[(first+k)%len(reqs)].GetCsr(),
			Credential: &meshcav1.SignBatchEntry_Token{Token: token},
		}
	}
	resp, err := client.SignBatch(ctx, &meshcav1.SignBatchRequest{Entries: entries})
	if err != nil {
		return err
	}
	if len(resp.GetResults()) != n {
		return errInvalidResponse
	}
	for _, res := range resp.GetResults() {
		if c := codes.Code(res.GetCode()); c != codes.OK {
			tally.refuse(c, res.GetMessage())
			continue
		}
		if len(res.GetCertChain()) == 0 {
			return errInvalidResponse
		}
		tally.certs.Add(1)
	}
	return nil
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (o *benchOptions) preflight(ctx context.Context, client meshcav1.CertificateServiceClient, req *meshcav1.SignRequest) error {
	ctx, cancel := o.server.context(ctx)
	defer cancel()
	resp, err := client.Sign(ctx, req)
	if err != nil {
		return err
	}
	if len(resp.GetCertChain()) == 0 {
		return errInvalidResponse
	}
	return nil
}

// makeSignRequests returns n requests, each with a CSR of a new P-256 key
// for id, and the first CSR parsed.
func makeSignRequests(n int, id spiffeid.ID) ([]*meshcav1.SignRequest, *x509.CertificateRequest, error) {
	reqs := make([]*meshcav1.SignRequest, n)
	tmpl := &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}
	for i := range reqs {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, nil, err
		}
		der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
		if err != nil {
			return nil, nil, fmt.Errorf("creating CSR: %w", err)
		}
		reqs[i] = &meshcav1.SignRequest{Csr: der}
	}
	sample, err := x509.ParseCertificateRequest(reqs[0].GetCsr())
	if err != nil {
		return nil, nil, fmt.Errorf("parsing CSR: %w", err)
	}
	return reqs, sample, nil
}

// benchCommon is what every mode reports beside its load: the server's
// figures and the crypto floor.
type benchCommon struct {
	MetricsURL string

	// Server is nil when not measured; ServerError then says why, if
	// it was asked for.
	Server      *serverFigures
	ServerError string

	Crypto          cryptoCost
	LocalGOMAXPROCS int
}

// benchReport is everything bench --mode steady measured.
type benchReport struct {
	Workers, Connections, CSRs int
	// Batch is the certificates asked for per call: 1 is Sign, more is
	// SignBatch.
	Batch    int
	Duration time.Duration
	Requests int64

	Interrupted  bool
	Elapsed      time.Duration
	OK           int
	Errors       map[string]int
	ErrorSamples map[string]string
	Latency      latencySummary

	// Entries counts SignBatch's entries; nil unless Batch is more
	// than 1.
	Entries *entryTally

	// Transport is the transport probe's figures, nil when it did not
	// run; TransportError says why it failed.
	Transport      *transportFigures
	TransportError string

	benchCommon
}

func (r *benchReport) setLoad(res loadResult) {
	r.Elapsed = res.elapsed
	r.OK = res.ok()
	r.Errors = res.errors
	r.ErrorSamples = res.errorSamples
	r.Latency = summarizeLatencies(res.latencies)
}

func (r *benchReport) failed() int { return sumCounts(r.Errors) }

func sumCounts(m map[string]int) int {
	n := 0
	for _, c := range m {
		n += c
	}
	return n
}

func (r *benchReport) rate() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	if r.Entries != nil {
		return float64(r.Entries.certs.Load()) / r.Elapsed.Seconds()
	}
	return float64(r.OK) / r.Elapsed.Seconds()
}

// cores returns the number of cores the multi-core limit is for: the
// server's GOMAXPROCS if its metrics say, else this process's.
func (r *benchCommon) cores() (int, string) {
	if r.Server != nil && r.Server.gomaxprocs > 0 {
		return r.Server.gomaxprocs, "server"
	}
	return r.LocalGOMAXPROCS, "local"
}

func (r *benchCommon) efficiency() (float64, bool) {
	if r.Server == nil {
		return 0, false
	}
	perCert, ok := r.Server.cpuPerCert()
	if !ok {
		return 0, false
	}
	return efficiency(r.Crypto.perCert, perCert)
}

func (r *benchReport) header() string {
	limit := r.Duration.String()
	switch {
	case r.Requests > 0 && r.Duration > 0:
		limit = fmt.Sprintf("%s or %d requests", limit, r.Requests)
	case r.Requests > 0:
		limit = fmt.Sprintf("%d requests", r.Requests)
	}
	api := ""
	if r.Batch > 1 {
		api = fmt.Sprintf(", SignBatch of %d token entries (latency and requests are per call; rate is in certificates)", r.Batch)
	}
	return fmt.Sprintf("meshctl bench: %d workers, %s, %d connection(s), %d pre-made P-256 CSRs%s",
		r.Workers, limit, r.Connections, r.CSRs, api)
}

func (r *benchReport) writeText(w io.Writer) {
	if r.Interrupted {
		fmt.Fprintf(w, "interrupted after %s: partial results\n", formatDuration(r.Elapsed))
	}
	fmt.Fprintf(w, "requests   %d ok, %d errors in %s\n", r.OK, r.failed(), formatDuration(r.Elapsed))
	for _, code := range slices.Sorted(maps.Keys(r.Errors)) {
		fmt.Fprintf(w, "errors     %s %d (first: %s)\n", code, r.Errors[code], truncate(r.ErrorSamples[code], 160))
	}
	if r.Entries != nil {
		refused := r.Entries.refusals()
		fmt.Fprintf(w, "entries    %d certificates, %d refused\n", r.Entries.certs.Load(), refused.total())
		for _, code := range slices.Sorted(maps.Keys(refused.counts)) {
			fmt.Fprintf(w, "refused    %s %d (first: %s)\n", code, refused.counts[code], truncate(refused.first[code], 160))
		}
	}
	fmt.Fprintf(w, "rate       %.1f certs/s\n", r.rate())
	if r.Latency.Count == 0 {
		fmt.Fprintln(w, "latency    no successful request")
	} else {
		fmt.Fprintf(w, "latency    p50 %s  p90 %s  p99 %s  max %s\n",
			formatDuration(r.Latency.P50), formatDuration(r.Latency.P90), formatDuration(r.Latency.P99), formatDuration(r.Latency.Max))
	}
	r.writeFigures(w)
	r.writeTransport(w)
}

// writeFigures writes the server, crypto and efficiency lines.
func (r *benchCommon) writeFigures(w io.Writer) {
	fmt.Fprintf(w, "server     %s\n", r.serverText())
	cores, whose := r.cores()
	fmt.Fprintf(w, "crypto     in-process P-256 CSR verify + sign: %s/cert (limit %.0f certs/s per core, %.0f certs/s on %d cores, %s GOMAXPROCS)\n",
		formatDuration(r.Crypto.perCert), r.Crypto.limit(1), r.Crypto.limit(cores), cores, whose)
	if e, ok := r.efficiency(); ok {
		fmt.Fprintf(w, "efficiency %.1f%% (crypto cost / server CPU per cert)\n", e)
	} else {
		fmt.Fprintln(w, "efficiency unknown (needs the server's CPU per cert)")
	}
}

func (r *benchCommon) serverText() string {
	switch {
	case r.MetricsURL == "":
		return "not measured (--metrics-url is empty)"
	case r.Server == nil:
		return "not measured: " + r.ServerError
	}
	f := r.Server
	var parts []string
	switch perCert, ok := f.cpuPerCert(); {
	case ok:
		parts = append(parts, fmt.Sprintf("CPU %s/cert (%.2fs CPU for %.0f certs)", formatDuration(perCert), f.cpu.Seconds(), f.issued))
	case !f.hasCPU:
		parts = append(parts, fmt.Sprintf("CPU unknown (no %s), %.0f certs", metricCPU, f.issued))
	default:
		parts = append(parts, fmt.Sprintf("CPU %.2fs for %.0f certs", f.cpu.Seconds(), f.issued))
	}
	if f.hasRSS {
		parts = append(parts, fmt.Sprintf("RSS %.1f MiB", f.rssBytes/(1<<20)))
	}
	return strings.Join(parts, ", ")
}

// benchJSON is bench's -o json output. The fields of a mode that does
// not have them are left out.
type benchJSON struct {
	Mode            string  `json:"mode"`
	Workers         int     `json:"workers,omitempty"`
	Connections     int     `json:"connections,omitempty"`
	CSRs            int     `json:"csrs,omitempty"`
	Batch           int     `json:"batch,omitempty"`
	DurationSeconds float64 `json:"durationSeconds,omitempty"`
	RequestLimit    int64   `json:"requestLimit,omitempty"`
	Interrupted     bool    `json:"interrupted"`
	ElapsedSeconds  float64 `json:"elapsedSeconds"`
	// OK, Errors, CertsPerSecond and LatencyMs are those of the new
	// workloads in storm and mixed: their final errors, and the latency of
	// the whole workload.
	OK             int               `json:"ok"`
	Errors         map[string]int    `json:"errors"`
	ErrorSamples   map[string]string `json:"errorSamples,omitempty"`
	CertsPerSecond float64           `json:"certsPerSecond"`
	LatencyMs      *latencyJSON      `json:"latencyMs,omitempty"`
	// Storm is the storm's details (storm and mixed).
	Storm *stormJSON `json:"storm,omitempty"`
	// Renewals are the renewing clients' figures (mixed).
	Renewals    *renewalsJSON `json:"renewals,omitempty"`
	Server      *serverJSON   `json:"server,omitempty"`
	ServerError string        `json:"serverError,omitempty"`
	Crypto      cryptoJSON    `json:"crypto"`
	// EfficiencyPercent is absent when the server's CPU per cert is unknown.
	EfficiencyPercent *float64 `json:"efficiencyPercent,omitempty"`
	// Certificates and RefusedEntries count SignBatch's entries (steady
	// with --batch); RefusedEntries is absent when none was refused.
	Certificates        *int64            `json:"certificates,omitempty"`
	RefusedEntries      map[string]int    `json:"refusedEntries,omitempty"`
	RefusedEntrySamples map[string]string `json:"refusedEntrySamples,omitempty"`
	// Transport is the transport probe's figures (steady).
	Transport      *transportJSON `json:"transport,omitempty"`
	TransportError string         `json:"transportError,omitempty"`
}

type latencyJSON struct {
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	Max  float64 `json:"max"`
	Mean float64 `json:"mean"`
}

// latencyMs returns l in milliseconds, or nil when it holds nothing.
func latencyMs(l latencySummary) *latencyJSON {
	if l.Count == 0 {
		return nil
	}
	return &latencyJSON{P50: toMs(l.P50), P90: toMs(l.P90), P99: toMs(l.P99), Max: toMs(l.Max), Mean: toMs(l.Mean)}
}

func toMs(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func toMicros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

type serverJSON struct {
	CPUSeconds       *float64 `json:"cpuSeconds,omitempty"`
	Issued           float64  `json:"issued"`
	CPUPerCertMicros *float64 `json:"cpuPerCertMicros,omitempty"`
	RSSBytes         *float64 `json:"rssBytes,omitempty"`
	GOMAXPROCS       int      `json:"gomaxprocs,omitempty"`
}

type cryptoJSON struct {
	PerCertMicros float64 `json:"perCertMicros"`
	Iterations    int     `json:"iterations"`
	LimitPerCore  float64 `json:"limitPerCore"`
	Cores         int     `json:"cores"`
	LimitAllCores float64 `json:"limitAllCores"`
	CoresFrom     string  `json:"coresFrom"`
}

// fillJSON sets the server, crypto and efficiency fields of out.
func (r *benchCommon) fillJSON(out *benchJSON) {
	cores, whose := r.cores()
	out.ServerError = r.ServerError
	out.Crypto = cryptoJSON{
		PerCertMicros: toMicros(r.Crypto.perCert),
		Iterations:    r.Crypto.iterations,
		LimitPerCore:  r.Crypto.limit(1),
		Cores:         cores,
		LimitAllCores: r.Crypto.limit(cores),
		CoresFrom:     whose,
	}
	if f := r.Server; f != nil {
		s := &serverJSON{Issued: f.issued, GOMAXPROCS: f.gomaxprocs}
		if f.hasCPU {
			cpu := f.cpu.Seconds()
			s.CPUSeconds = &cpu
		}
		if perCert, ok := f.cpuPerCert(); ok {
			v := toMicros(perCert)
			s.CPUPerCertMicros = &v
		}
		if f.hasRSS {
			rss := f.rssBytes
			s.RSSBytes = &rss
		}
		out.Server = s
	}
	if e, ok := r.efficiency(); ok {
		out.EfficiencyPercent = &e
	}
}

func (r *benchReport) json() benchJSON {
	out := benchJSON{
		Mode:            modeSteady,
		Workers:         r.Workers,
		Connections:     r.Connections,
		CSRs:            r.CSRs,
		Batch:           max(r.Batch, 1),
		DurationSeconds: r.Duration.Seconds(),
		RequestLimit:    r.Requests,
		Interrupted:     r.Interrupted,
		ElapsedSeconds:  r.Elapsed.Seconds(),
		OK:              r.OK,
		Errors:          r.Errors,
		ErrorSamples:    r.ErrorSamples,
		CertsPerSecond:  r.rate(),
		LatencyMs:       latencyMs(r.Latency),
	}
	if out.Errors == nil {
		out.Errors = map[string]int{}
	}
	if r.Entries != nil {
		certs := r.Entries.certs.Load()
		out.Certificates = &certs
		refused := r.Entries.refusals()
		out.RefusedEntries, out.RefusedEntrySamples = refused.counts, refused.first
	}
	r.fillJSON(&out)
	out.Transport, out.TransportError = r.transportJSON(), r.TransportError
	return out
}

// formatDuration prints d with three significant digits: 95.2µs, 1.71ms,
// 12.3ms, 10.0s.
func formatDuration(d time.Duration) string {
	var v float64
	var unit string
	switch {
	case d < time.Microsecond:
		return d.String()
	case d < time.Millisecond:
		v, unit = float64(d)/float64(time.Microsecond), "µs"
	case d < time.Second:
		v, unit = float64(d)/float64(time.Millisecond), "ms"
	default:
		v, unit = d.Seconds(), "s"
	}
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f%s", v, unit)
	case v >= 10:
		return fmt.Sprintf("%.1f%s", v, unit)
	}
	return fmt.Sprintf("%.2f%s", v, unit)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
