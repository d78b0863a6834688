package main

// The measurements of meshctl bench, apart from the command so that they
// can be tested without a server: the load loop, latency percentiles, the
// server's metrics, and the in-process crypto cost.

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/grpc/status"
)

// loadConfig is one load run.
type loadConfig struct {
	// workers send requests concurrently, each one at a time.
	workers int
	// duration after which no new request starts; zero means none.
	duration time.Duration
	// requests caps the requests started by all workers; zero means none.
	requests int64
}

// requestFunc sends request number i of worker. It returns nil on
// success.
type requestFunc func(ctx context.Context, worker, i int) error

// loadResult is the outcome of a load run.
type loadResult struct {
	// latencies of the successful requests, sorted.
	latencies []time.Duration
	// errors counts failed requests by gRPC code (or "invalid response").
	errors map[string]int
	// errorSamples holds the first message of each key of errors.
	errorSamples map[string]string
	// elapsed is from the start of the run to the end of its last
	// request.
	elapsed time.Duration
}

func (r loadResult) ok() int { return len(r.latencies) }

func (r loadResult) failed() int {
	n := 0
	for _, c := range r.errors {
		n += c
	}
	return n
}

type workerResult struct {
	latencies    []time.Duration
	errors       map[string]int
	errorSamples map[string]string
}

// runLoad runs cfg.workers goroutines that call do one request after the
// other until cfg.duration has passed, cfg.requests have started, or ctx
// is done. A request under way when the duration ends is waited for; one
// cut short by ctx (an interrupt) counts neither as a success nor as an
// error. Each worker records into its own slice, merged at the end, so
// that the workers share no lock.
func runLoad(ctx context.Context, cfg loadConfig, do requestFunc) loadResult {
	workers := max(cfg.workers, 1)
	perWorker := 1 << 14
	if cfg.requests > 0 {
		perWorker = int(min(cfg.requests/int64(workers)+1, int64(perWorker)))
	}
	results := make([]workerResult, workers)
	var started atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for w := range workers {
		res := &results[w]
		res.latencies = make([]time.Duration, 0, perWorker)
		wg.Go(func() {
			for i := 0; ; i++ {
				if ctx.Err() != nil || (cfg.duration > 0 && time.Since(start) >= cfg.duration) {
					return
				}
				if cfg.requests > 0 && started.Add(1) > cfg.requests {
					return
				}
				t0 := time.Now()
				err := do(ctx, w, i)
				lat := time.Since(t0)
				if err == nil {
					res.latencies = append(res.latencies, lat)
					continue
				}
				if ctx.Err() != nil {
					return
				}
				key := errorKey(err)
				if res.errors == nil {
					res.errors, res.errorSamples = map[string]int{}, map[string]string{}
				}
				if res.errors[key] == 0 {
					res.errorSamples[key] = errorMessage(err)
				}
				res.errors[key]++
			}
		})
	}
	wg.Wait()
	return mergeResults(results, time.Since(start))
}

func mergeResults(results []workerResult, elapsed time.Duration) loadResult {
	n := 0
	for _, r := range results {
		n += len(r.latencies)
	}
	out := loadResult{
		latencies:    make([]time.Duration, 0, n),
		errors:       map[string]int{},
		errorSamples: map[string]string{},
		elapsed:      elapsed,
	}
	for _, r := range results {
		out.latencies = append(out.latencies, r.latencies...)
		for k, c := range r.errors {
			if _, ok := out.errorSamples[k]; !ok {
				out.errorSamples[k] = r.errorSamples[k]
			}
			out.errors[k] += c
		}
	}
	slices.Sort(out.latencies)
	return out
}

// errInvalidResponse is a request's error when the server answered with
// no certificate.
var errInvalidResponse = errors.New("the response holds no certificate")

func errorKey(err error) string {
	if s, ok := status.FromError(err); ok {
		return s.Code().String()
	}
	return "invalid response"
}

func errorMessage(err error) string {
	if s, ok := status.FromError(err); ok {
		return s.Message()
	}
	return err.Error()
}

// latencySummary holds the percentiles of a run's latencies.
type latencySummary struct {
	Count              int
	P50, P90, P99, Max time.Duration
	Mean               time.Duration
}

// summarizeLatencies summarizes sorted, a sorted slice.
func summarizeLatencies(sorted []time.Duration) latencySummary {
	if len(sorted) == 0 {
		return latencySummary{}
	}
	var sum time.Duration
	for _, d := range sorted {
		sum += d
	}
	return latencySummary{
		Count: len(sorted),
		P50:   percentile(sorted, 0.50),
		P90:   percentile(sorted, 0.90),
		P99:   percentile(sorted, 0.99),
		Max:   sorted[len(sorted)-1],
		Mean:  sum / time.Duration(len(sorted)),
	}
}

// percentile returns the q-quantile (0 < q <= 1) of sorted by the
// nearest-rank method: the smallest value with at least q of the values
// at or below it. It returns 0 for no values.
func percentile(sorted []time.Duration, q float64) time.Duration {
	n := len(sorted)
	if n == 0 {
		return 0
	}
	rank := int(math.Ceil(q * float64(n)))
	rank = min(max(rank, 1), n)
	return sorted[rank-1]
}

// metricsSample is what bench reads from one scrape of the server's
// metrics.
type metricsSample struct {
	// cpuSeconds is process_cpu_seconds_total, when hasCPU.
	cpuSeconds float64
	hasCPU     bool
	// rssBytes is process_resident_memory_bytes, when hasRSS.
	rssBytes float64
	hasRSS   bool
	// issued is meshca_certificates_issued_total summed over its labels
	// (0 when the server has issued nothing yet, so has no series).
	issued float64
	// gomaxprocs is go_sched_gomaxprocs_threads, or 0.
	gomaxprocs int
}

const (
	metricCPU        = "process_cpu_seconds_total"
	metricRSS        = "process_resident_memory_bytes"
	metricIssued     = "meshca_certificates_issued_total"
	metricGOMAXPROCS = "go_sched_gomaxprocs_threads"
)

// parseMetrics reads the Prometheus text exposition format.
func parseMetrics(r io.Reader) (metricsSample, error) {
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(r)
	if err != nil {
		return metricsSample{}, fmt.Errorf("parsing metrics: %w", err)
	}
	var s metricsSample
	if f, ok := families[metricCPU]; ok && len(f.GetMetric()) > 0 {
		s.cpuSeconds, s.hasCPU = metricValue(f.GetMetric()[0]), true
	}
	if f, ok := families[metricRSS]; ok && len(f.GetMetric()) > 0 {
		s.rssBytes, s.hasRSS = metricValue(f.GetMetric()[0]), true
	}
	if f, ok := families[metricIssued]; ok {
		for _, m := range f.GetMetric() {
			s.issued += metricValue(m)
		}
	}
	if f, ok := families[metricGOMAXPROCS]; ok && len(f.GetMetric()) > 0 {
		s.gomaxprocs = int(metricValue(f.GetMetric()[0]))
	}
	return s, nil
}

func metricValue(m *dto.Metric) float64 {
	switch {
	case m.GetCounter() != nil:
		return m.GetCounter().GetValue()
	case m.GetGauge() != nil:
		return m.GetGauge().GetValue()
	case m.GetUntyped() != nil:
		return m.GetUntyped().GetValue()
	}
	return 0
}

// scrapeMetrics fetches and parses the metrics at url.
func scrapeMetrics(ctx context.Context, client *http.Client, url string) (metricsSample, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return metricsSample{}, err
	}
	req.Header.Set("Accept", "text/plain;version=0.0.4")
	resp, err := client.Do(req)
	if err != nil {
		return metricsSample{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return metricsSample{}, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return parseMetrics(io.LimitReader(resp.Body, 16<<20))
}

// serverFigures is what the server spent during a run, from its metrics
// before and after.
type serverFigures struct {
	// cpu is the server's CPU time during the run, when hasCPU.
	cpu    time.Duration
	hasCPU bool
	// issued is how many certificates the server issued during the run,
	// to bench or to anyone else.
	issued float64
	// rssBytes is the server's resident memory after the run, when hasRSS.
	rssBytes float64
	hasRSS   bool
	// gomaxprocs is the server's GOMAXPROCS, or 0 when unknown.
	gomaxprocs int
}

// cpuPerCert returns the server's CPU time per certificate issued, or
// false when either is unknown or zero.
func (f serverFigures) cpuPerCert() (time.Duration, bool) {
	if !f.hasCPU || f.issued <= 0 || f.cpu <= 0 {
		return 0, false
	}
	return time.Duration(float64(f.cpu) / f.issued), true
}

// serverDelta returns what the server spent between two scrapes. It fails
// when a counter went down: the server restarted, or the two scrapes were
// of different servers.
func serverDelta(before, after metricsSample) (serverFigures, error) {
	f := serverFigures{
		issued:     after.issued - before.issued,
		rssBytes:   after.rssBytes,
		hasRSS:     after.hasRSS,
		gomaxprocs: after.gomaxprocs,
	}
	if f.issued < 0 {
		return serverFigures{}, fmt.Errorf("%s went down from %g to %g: did the server restart during the run?", metricIssued, before.issued, after.issued)
	}
	if before.hasCPU && after.hasCPU {
		cpu := after.cpuSeconds - before.cpuSeconds
		if cpu < 0 {
			return serverFigures{}, fmt.Errorf("%s went down from %g to %g: did the server restart during the run?", metricCPU, before.cpuSeconds, after.cpuSeconds)
		}
		f.cpu, f.hasCPU = time.Duration(cpu*float64(time.Second)), true
	}
	return f, nil
}

// efficiency returns crypto/server as a percentage: the share of the
// server's CPU time per certificate that the irreducible crypto would
// take. It returns false when either is unknown.
func efficiency(crypto, server time.Duration) (float64, bool) {
	if crypto <= 0 || server <= 0 {
		return 0, false
	}
	return 100 * float64(crypto) / float64(server), true
}

// cryptoCost is the in-process cost of the crypto each certificate needs
// at least: verifying the CSR's signature and making one signature.
type cryptoCost struct {
	perCert    time.Duration
	iterations int
}

// limit returns the certificates per second that cores could sign if
// they did nothing but this crypto.
func (c cryptoCost) limit(cores int) float64 {
	if c.perCert <= 0 {
		return 0
	}
	return float64(cores) * float64(time.Second) / float64(c.perCert)
}

// measureCryptoCost runs, on the calling goroutine, csr.CheckSignature
// and an ECDSA signature by key over the SHA-256 digest of the CSR's
// signed part, for budget or maxIterations pairs, whichever ends first,
// after a short warm-up. The cost is that of the fastest batch of
// cryptoBatch pairs: the measure is of wall time, and other work on the
// machine can only slow a batch down, never speed it up, so the fastest is
// the closest to the crypto's own cost (and the efficiency ratio is not
// flattered by a floor that load inflated).
func measureCryptoCost(ctx context.Context, csr *x509.CertificateRequest, key *ecdsa.PrivateKey, budget time.Duration, maxIterations int) (cryptoCost, error) {
	pair := func() error {
		if err := csr.CheckSignature(); err != nil {
			return fmt.Errorf("checking the CSR's signature: %w", err)
		}
		digest := sha256.Sum256(csr.RawTBSCertificateRequest)
		if _, err := ecdsa.SignASN1(rand.Reader, key, digest[:]); err != nil {
			return fmt.Errorf("signing: %w", err)
		}
		return nil
	}
	for range 10 {
		if err := pair(); err != nil {
			return cryptoCost{}, err
		}
	}
	start := time.Now()
	n := 0
	var best time.Duration
	for n < maxIterations && time.Since(start) < budget {
		if ctx.Err() != nil {
			return cryptoCost{}, ctx.Err()
		}
		batch := min(cryptoBatch, maxIterations-n)
		batchStart := time.Now()
		for range batch {
			if err := pair(); err != nil {
				return cryptoCost{}, err
			}
		}
		if per := time.Since(batchStart) / time.Duration(batch); best == 0 || per < best {
			best = per
		}
		n += batch
	}
	if n == 0 {
		return cryptoCost{}, errors.New("measuring the crypto cost: no iteration ran")
	}
	return cryptoCost{perCert: best, iterations: n}, nil
}

// cryptoBatch is the number of crypto pairs timed together.
const cryptoBatch = 20

// rssPeak is the highest resident memory seen by polling the server's
// metrics.
type rssPeak struct {
	bytes float64
	// samples counts the scrapes that had the resident memory.
	samples int
	// err is the last failed scrape's error.
	err error
}

// pollRSS scrapes url every interval, from now until the returned stop
// is called, and keeps the highest process_resident_memory_bytes.
func pollRSS(ctx context.Context, client *http.Client, url string, interval time.Duration) (stop func() rssPeak) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan rssPeak, 1)
	go func() {
		var p rssPeak
		ticker := time.NewTicker(interval)
		defer ticker.Stop()
		for {
			s, err := scrapeMetrics(ctx, client, url)
			switch {
			case err != nil:
				if ctx.Err() == nil {
					p.err = err
				}
			case s.hasRSS:
				p.samples++
				p.bytes = max(p.bytes, s.rssBytes)
			default:
				p.err = fmt.Errorf("no %s in the metrics", metricRSS)
			}
			select {
			case <-ctx.Done():
				done <- p
				return
			case <-ticker.C:
			}
		}
	}()
	return func() rssPeak {
		cancel()
		return <-done
	}
}
