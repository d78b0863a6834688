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
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
)

// Limits of the in-process crypto measurement.
const (
	cryptoBudget     = time.Second
	cryptoIterations = 2000
)

type benchOptions struct {
	server      serverFlags
	concurrency int
	duration    time.Duration
	requests    int64
	csrs        int
	token       string
	tokenFile   string
	spiffeID    string
	metricsURL  string
	connections int
	output      string
}

func newBenchCommand() *cobra.Command {
	o := &benchOptions{}
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Load a server with Sign requests; report rate, latency and CPU per certificate",
		Long: `bench sends CertificateService.Sign requests to meshca-server over gRPC and
TLS from --concurrency workers for --duration (or until --requests have been
sent, or until interrupted, which prints the results so far), and reports:

  requests    how many succeeded, and the failures by gRPC code
  rate        certificates issued to bench per second
  latency     p50, p90, p99 and max of the successful requests
  server      the server's CPU time per certificate and its resident memory,
              from its Prometheus metrics (--metrics-url) scraped before and
              after the run: the CPU time the process used, over the
              certificates it issued (meshca_certificates_issued_total,
              every API, whoever asked) in between
  crypto      the cost, measured in this process before the run on one
              goroutine, of the crypto one certificate needs at least:
              checking one P-256 CSR signature and making one P-256
              signature; and the rate at which one core, or all the
              server's cores (its GOMAXPROCS, or this machine's), could
              sign if they did only that
  efficiency  crypto cost / server CPU per certificate: how much of the
              server's work per certificate is the crypto it cannot avoid
              (Go's x509.CreateCertificate also checks each signature it
              makes: one more verification the server does and this floor
              leaves out)

The CSRs (P-256 keys, the --spiffe-id as their URI SAN) are made before
the run and reused in turn, so the run measures the server, not key
generation. Workers share --connections gRPC connections round robin; each
connection is tried with one Sign before the run, so that a wrong token or
bundle fails at once, and those certificates are not counted.

Measure on an otherwise idle server, and note that bench and a server on
the same machine share its CPUs. The server's CPU includes everything it
does per request: TLS and HTTP/2, authentication, audit logging.`,
		Example: `  meshctl bench --ca-bundle .meshca/bundle.pem --token-file .meshca/demo-token \
    --spiffe-id spiffe://meshca.local/ns/default/sa/demo
  meshctl bench -c 32 -d 30s --connections 4 --ca-bundle .meshca/bundle.pem \
    --token-file .meshca/demo-token --spiffe-id spiffe://meshca.local/ns/default/sa/demo
  meshctl bench -n 1000 -d 0 --metrics-url "" -o json --ca-bundle .meshca/bundle.pem \
    --token-file .meshca/demo-token --spiffe-id spiffe://meshca.local/ns/default/sa/demo`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return o.run(cmd) },
	}
	o.server.register(cmd)
	f := cmd.Flags()
	f.IntVarP(&o.concurrency, "concurrency", "c", 8, "number of workers, each with one request in flight")
	f.DurationVarP(&o.duration, "duration", "d", 10*time.Second, "how long to send requests (0: until --requests are sent)")
	f.Int64VarP(&o.requests, "requests", "n", 0, "stop after this many requests in all (0: no limit)")
	f.IntVar(&o.csrs, "csrs", 256, "number of CSRs to make before the run and send in turn")
	f.StringVar(&o.token, "token", "", "bootstrap token (visible to other users in the process list; prefer --token-file)")
	f.StringVar(&o.tokenFile, "token-file", "", "file holding the bootstrap token")
	f.StringVar(&o.spiffeID, "spiffe-id", "", "SPIFFE ID of the token, asked for by every CSR")
	f.StringVar(&o.metricsURL, "metrics-url", "http://127.0.0.1:9402/metrics", `the server's Prometheus metrics, for its CPU and memory ("" to skip)`)
	f.IntVar(&o.connections, "connections", 1, "number of gRPC connections the workers share")
	f.StringVarP(&o.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func (o *benchOptions) validate() error {
	switch {
	case o.output != "text" && o.output != "json":
		return fmt.Errorf("--output %q: want text or json", o.output)
	case o.concurrency < 1:
		return fmt.Errorf("--concurrency %d: want at least 1", o.concurrency)
	case o.connections < 1:
		return fmt.Errorf("--connections %d: want at least 1", o.connections)
	case o.connections > o.concurrency:
		return fmt.Errorf("--connections %d is more than --concurrency %d: some connections would carry no requests", o.connections, o.concurrency)
	case o.csrs < 1:
		return fmt.Errorf("--csrs %d: want at least 1", o.csrs)
	case o.requests < 0:
		return fmt.Errorf("--requests %d: want 0 (no limit) or more", o.requests)
	case o.duration < 0:
		return fmt.Errorf("--duration %s: want 0 or more", o.duration)
	case o.duration == 0 && o.requests == 0:
		return errors.New("--duration 0 needs --requests: the run would never end")
	case o.spiffeID == "":
		return errors.New("--spiffe-id is required: every CSR asks for the token's identity")
	}
	return nil
}

func (o *benchOptions) run(cmd *cobra.Command) error {
	if err := o.validate(); err != nil {
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
	stdout := cmd.OutOrStdout()

	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	r := benchReport{
		Workers:     o.concurrency,
		Connections: o.connections,
		CSRs:        o.csrs,
		Duration:    o.duration,
		Requests:    o.requests,
		MetricsURL:  o.metricsURL,
	}

	reqs, sample, err := makeSignRequests(o.csrs, id)
	if err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	if r.Crypto, err = measureCryptoCost(ctx, sample, key, cryptoBudget, cryptoIterations); err != nil {
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
	res := runLoad(authCtx, loadConfig{workers: workers, duration: o.duration, requests: o.requests},
		func(ctx context.Context, worker, i int) error {
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
		})
	r.Interrupted = ctx.Err() != nil
	stop() // a second interrupt ends meshctl at once
	r.setLoad(res)

	if o.metricsURL != "" {
		sctx, cancel := context.WithTimeout(cmd.Context(), 10*time.Second)
		after, err := scrapeMetrics(sctx, httpClient, o.metricsURL)
		cancel()
		if err == nil {
			var f serverFigures
			if f, err = serverDelta(before, after); err == nil {
				r.Server = &f
			}
		}
		if err != nil {
			r.ServerError = err.Error()
		}
	}
	r.LocalGOMAXPROCS = runtime.GOMAXPROCS(0)

	if o.output == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(r.json())
	}
	r.writeText(stdout)
	return nil
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

// benchReport is everything bench measured.
type benchReport struct {
	Workers, Connections, CSRs int
	Duration                   time.Duration
	Requests                   int64
	MetricsURL                 string

	Interrupted  bool
	Elapsed      time.Duration
	OK           int
	Errors       map[string]int
	ErrorSamples map[string]string
	Latency      latencySummary

	// Server is nil when not measured; ServerError then says why, if
	// it was asked for.
	Server      *serverFigures
	ServerError string

	Crypto          cryptoCost
	LocalGOMAXPROCS int
}

func (r *benchReport) setLoad(res loadResult) {
	r.Elapsed = res.elapsed
	r.OK = res.ok()
	r.Errors = res.errors
	r.ErrorSamples = res.errorSamples
	r.Latency = summarizeLatencies(res.latencies)
}

func (r *benchReport) failed() int {
	n := 0
	for _, c := range r.Errors {
		n += c
	}
	return n
}

func (r *benchReport) rate() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.OK) / r.Elapsed.Seconds()
}

// cores returns the number of cores the multi-core limit is for: the
// server's GOMAXPROCS if its metrics say, else this process's.
func (r *benchReport) cores() (int, string) {
	if r.Server != nil && r.Server.gomaxprocs > 0 {
		return r.Server.gomaxprocs, "server"
	}
	return r.LocalGOMAXPROCS, "local"
}

func (r *benchReport) efficiency() (float64, bool) {
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
	return fmt.Sprintf("meshctl bench: %d workers, %s, %d connection(s), %d pre-made P-256 CSRs",
		r.Workers, limit, r.Connections, r.CSRs)
}

func (r *benchReport) writeText(w io.Writer) {
	if r.Interrupted {
		fmt.Fprintf(w, "interrupted after %s: partial results\n", formatDuration(r.Elapsed))
	}
	fmt.Fprintf(w, "requests   %d ok, %d errors in %s\n", r.OK, r.failed(), formatDuration(r.Elapsed))
	for _, code := range slices.Sorted(maps.Keys(r.Errors)) {
		fmt.Fprintf(w, "errors     %s %d (first: %s)\n", code, r.Errors[code], truncate(r.ErrorSamples[code], 160))
	}
	fmt.Fprintf(w, "rate       %.1f certs/s\n", r.rate())
	if r.Latency.Count == 0 {
		fmt.Fprintln(w, "latency    no successful request")
	} else {
		fmt.Fprintf(w, "latency    p50 %s  p90 %s  p99 %s  max %s\n",
			formatDuration(r.Latency.P50), formatDuration(r.Latency.P90), formatDuration(r.Latency.P99), formatDuration(r.Latency.Max))
	}
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

func (r *benchReport) serverText() string {
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

// benchJSON is bench's -o json output.
type benchJSON struct {
	Workers         int               `json:"workers"`
	Connections     int               `json:"connections"`
	CSRs            int               `json:"csrs"`
	DurationSeconds float64           `json:"durationSeconds"`
	RequestLimit    int64             `json:"requestLimit,omitempty"`
	Interrupted     bool              `json:"interrupted"`
	ElapsedSeconds  float64           `json:"elapsedSeconds"`
	OK              int               `json:"ok"`
	Errors          map[string]int    `json:"errors"`
	ErrorSamples    map[string]string `json:"errorSamples,omitempty"`
	CertsPerSecond  float64           `json:"certsPerSecond"`
	LatencyMs       *latencyJSON      `json:"latencyMs,omitempty"`
	Server          *serverJSON       `json:"server,omitempty"`
	ServerError     string            `json:"serverError,omitempty"`
	Crypto          cryptoJSON        `json:"crypto"`
	// EfficiencyPercent is absent when the server's CPU per cert is unknown.
	EfficiencyPercent *float64 `json:"efficiencyPercent,omitempty"`
}

type latencyJSON struct {
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	Max  float64 `json:"max"`
	Mean float64 `json:"mean"`
}

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

func (r *benchReport) json() benchJSON {
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	cores, whose := r.cores()
	out := benchJSON{
		Workers:         r.Workers,
		Connections:     r.Connections,
		CSRs:            r.CSRs,
		DurationSeconds: r.Duration.Seconds(),
		RequestLimit:    r.Requests,
		Interrupted:     r.Interrupted,
		ElapsedSeconds:  r.Elapsed.Seconds(),
		OK:              r.OK,
		Errors:          r.Errors,
		ErrorSamples:    r.ErrorSamples,
		CertsPerSecond:  r.rate(),
		ServerError:     r.ServerError,
		Crypto: cryptoJSON{
			PerCertMicros: us(r.Crypto.perCert),
			Iterations:    r.Crypto.iterations,
			LimitPerCore:  r.Crypto.limit(1),
			Cores:         cores,
			LimitAllCores: r.Crypto.limit(cores),
			CoresFrom:     whose,
		},
	}
	if out.Errors == nil {
		out.Errors = map[string]int{}
	}
	if l := r.Latency; l.Count > 0 {
		out.LatencyMs = &latencyJSON{P50: ms(l.P50), P90: ms(l.P90), P99: ms(l.P99), Max: ms(l.Max), Mean: ms(l.Mean)}
	}
	if f := r.Server; f != nil {
		s := &serverJSON{Issued: f.issued, GOMAXPROCS: f.gomaxprocs}
		if f.hasCPU {
			cpu := f.cpu.Seconds()
			s.CPUSeconds = &cpu
		}
		if perCert, ok := f.cpuPerCert(); ok {
			v := us(perCert)
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
