package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshca/meshca/testca"
)

func ms(f float64) time.Duration { return time.Duration(f * float64(time.Millisecond)) }

func TestPercentile(t *testing.T) {
	hundred := make([]time.Duration, 100)
	for i := range hundred {
		hundred[i] = time.Duration(i+1) * time.Millisecond
	}
	tests := []struct {
		name   string
		sorted []time.Duration
		q      float64
		want   time.Duration
	}{
		{name: "empty", sorted: nil, q: 0.5, want: 0},
		{name: "one value", sorted: []time.Duration{ms(3)}, q: 0.99, want: ms(3)},
		{name: "p50 of 100", sorted: hundred, q: 0.50, want: ms(50)},
		{name: "p90 of 100", sorted: hundred, q: 0.90, want: ms(90)},
		{name: "p99 of 100", sorted: hundred, q: 0.99, want: ms(99)},
		{name: "p100 is the max", sorted: hundred, q: 1, want: ms(100)},
		{name: "tiny q is the min", sorted: hundred, q: 0.0001, want: ms(1)},
		{name: "p50 of 4 is the 2nd", sorted: []time.Duration{ms(1), ms(2), ms(3), ms(4)}, q: 0.5, want: ms(2)},
		{name: "p90 of 4 is the 4th", sorted: []time.Duration{ms(1), ms(2), ms(3), ms(4)}, q: 0.9, want: ms(4)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.Equal(t, tt.want, percentile(tt.sorted, tt.q))
		})
	}
}

func TestSummarizeLatencies(t *testing.T) {
	require.Equal(t, latencySummary{}, summarizeLatencies(nil))

	sorted := []time.Duration{ms(1), ms(1), ms(2), ms(2), ms(2), ms(3), ms(3), ms(4), ms(8), ms(14)}
	require.Equal(t, latencySummary{
		Count: 10,
		P50:   ms(2),
		P90:   ms(8),
		P99:   ms(14),
		Max:   ms(14),
		Mean:  ms(4),
	}, summarizeLatencies(sorted))
}

const testMetrics = `# HELP go_sched_gomaxprocs_threads The current runtime.GOMAXPROCS setting.
# TYPE go_sched_gomaxprocs_threads gauge
go_sched_gomaxprocs_threads 4
# HELP meshca_certificates_issued_total Workload certificates issued, by API.
# TYPE meshca_certificates_issued_total counter
meshca_certificates_issued_total{api="istio"} 12
meshca_certificates_issued_total{api="native"} 1000
# HELP meshca_requests_denied_total Certificate requests refused, by API, gRPC code and reason.
# TYPE meshca_requests_denied_total counter
meshca_requests_denied_total{api="native",code="Unauthenticated",reason="unknown_token"} 3
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 12.5
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 4.74218496e+07
`

func TestParseMetrics(t *testing.T) {
	tests := []struct {
		name    string
		text    string
		want    metricsSample
		wantErr string
	}{
		{
			name: "all figures",
			text: testMetrics,
			want: metricsSample{cpuSeconds: 12.5, hasCPU: true, rssBytes: 47421849.6, hasRSS: true, issued: 1012, gomaxprocs: 4},
		},
		{
			name: "nothing issued yet, no process collector",
			text: "# TYPE meshca_bundle_sequence gauge\nmeshca_bundle_sequence 1\n",
			want: metricsSample{},
		},
		{
			name: "untyped",
			text: "process_cpu_seconds_total 3\nmeshca_certificates_issued_total{api=\"native\"} 7\n",
			want: metricsSample{cpuSeconds: 3, hasCPU: true, issued: 7},
		},
		{
			name:    "not metrics",
			text:    "<html>hello</html>\n",
			wantErr: "parsing metrics: text format parsing error in line 1: invalid metric name",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseMetrics(strings.NewReader(tt.text))
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			require.InDelta(t, tt.want.rssBytes, got.rssBytes, 1)
			got.rssBytes = tt.want.rssBytes
			require.Equal(t, tt.want, got)
		})
	}
}

func TestScrapeMetrics(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/metrics" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		_, _ = w.Write([]byte(testMetrics))
	}))
	defer srv.Close()

	got, err := scrapeMetrics(context.Background(), srv.Client(), srv.URL+"/metrics")
	require.NoError(t, err)
	require.Equal(t, 1012.0, got.issued)
	require.Equal(t, 12.5, got.cpuSeconds)

	_, err = scrapeMetrics(context.Background(), srv.Client(), srv.URL+"/other")
	require.EqualError(t, err, "GET "+srv.URL+"/other: 404 Not Found")
}

func TestServerDelta(t *testing.T) {
	before := metricsSample{cpuSeconds: 10, hasCPU: true, rssBytes: 1 << 20, hasRSS: true, issued: 100, gomaxprocs: 2}
	tests := []struct {
		name        string
		before      metricsSample
		after       metricsSample
		want        serverFigures
		wantPerCert time.Duration
		wantErr     string
	}{
		{
			name:        "a run",
			before:      before,
			after:       metricsSample{cpuSeconds: 14, hasCPU: true, rssBytes: 3 << 20, hasRSS: true, issued: 10100, gomaxprocs: 2},
			want:        serverFigures{cpu: 4 * time.Second, hasCPU: true, issued: 10000, rssBytes: 3 << 20, hasRSS: true, gomaxprocs: 2},
			wantPerCert: 400 * time.Microsecond,
		},
		{
			name:   "no CPU metric",
			before: metricsSample{issued: 5},
			after:  metricsSample{issued: 15},
			want:   serverFigures{issued: 10},
		},
		{
			name:   "nothing issued",
			before: before,
			after:  metricsSample{cpuSeconds: 10.5, hasCPU: true, issued: 100},
			want:   serverFigures{cpu: 500 * time.Millisecond, hasCPU: true},
		},
		{
			name:    "server restarted",
			before:  before,
			after:   metricsSample{cpuSeconds: 1, hasCPU: true, issued: 40},
			wantErr: "meshca_certificates_issued_total went down from 100 to 40: did the server restart during the run?",
		},
		{
			name:    "CPU went down",
			before:  before,
			after:   metricsSample{cpuSeconds: 1, hasCPU: true, issued: 140},
			wantErr: "process_cpu_seconds_total went down from 10 to 1: did the server restart during the run?",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := serverDelta(tt.before, tt.after)
			if tt.wantErr != "" {
				require.EqualError(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tt.want, got)
			perCert, ok := got.cpuPerCert()
			require.Equal(t, tt.wantPerCert != 0, ok)
			require.Equal(t, tt.wantPerCert, perCert)
		})
	}
}

func TestEfficiency(t *testing.T) {
	tests := []struct {
		name           string
		crypto, server time.Duration
		want           float64
		wantOK         bool
	}{
		{name: "a quarter", crypto: 100 * time.Microsecond, server: 400 * time.Microsecond, want: 25, wantOK: true},
		{name: "the example", crypto: 95 * time.Microsecond, server: 412 * time.Microsecond, want: 100 * 95.0 / 412, wantOK: true},
		{name: "all crypto", crypto: time.Millisecond, server: time.Millisecond, want: 100, wantOK: true},
		{name: "server unknown", crypto: time.Millisecond},
		{name: "crypto unknown", server: time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := efficiency(tt.crypto, tt.server)
			require.Equal(t, tt.wantOK, ok)
			require.InDelta(t, tt.want, got, 1e-9)
		})
	}
}

func TestCryptoCostLimit(t *testing.T) {
	c := cryptoCost{perCert: 100 * time.Microsecond}
	require.InDelta(t, 10000, c.limit(1), 1e-6)
	require.InDelta(t, 40000, c.limit(4), 1e-6)
	require.Zero(t, cryptoCost{}.limit(4))
}

func TestMeasureCryptoCost(t *testing.T) {
	reqs, csr, err := makeSignRequests(2, testID)
	require.NoError(t, err)
	require.Len(t, reqs, 2)
	require.Equal(t, testID.String(), csr.URIs[0].String())
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)

	t.Run("stops at the iteration cap", func(t *testing.T) {
		got, err := measureCryptoCost(context.Background(), csr, key, time.Minute, 20)
		require.NoError(t, err)
		require.Equal(t, 20, got.iterations)
		require.Positive(t, got.perCert)
	})
	t.Run("bad CSR signature", func(t *testing.T) {
		bad := *csr
		bad.Signature = append([]byte(nil), csr.Signature...)
		bad.Signature[len(bad.Signature)-1] ^= 0xff
		_, err := measureCryptoCost(context.Background(), &bad, key, time.Minute, 20)
		require.ErrorContains(t, err, "checking the CSR's signature: ")
	})
	t.Run("interrupted", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_, err := measureCryptoCost(ctx, csr, key, time.Minute, 20)
		require.ErrorIs(t, err, context.Canceled)
	})
	t.Run("CSRs are distinct", func(t *testing.T) {
		other, err := x509.ParseCertificateRequest(reqs[1].GetCsr())
		require.NoError(t, err)
		require.NotEqual(t, csr.RawSubjectPublicKeyInfo, other.RawSubjectPublicKeyInfo)
	})
}

func TestRunLoad(t *testing.T) {
	t.Run("request cap", func(t *testing.T) {
		var calls atomic.Int64
		res := runLoad(context.Background(), loadConfig{workers: 8, requests: 1000}, func(context.Context, int, int) error {
			calls.Add(1)
			return nil
		})
		require.Equal(t, int64(1000), calls.Load())
		require.Equal(t, 1000, res.ok())
		require.Zero(t, res.failed())
		require.True(t, isSorted(res.latencies))
	})
	t.Run("errors by code", func(t *testing.T) {
		var calls atomic.Int64
		res := runLoad(context.Background(), loadConfig{workers: 4, requests: 400}, func(_ context.Context, worker, _ int) error {
			switch k := calls.Add(1); {
			case k%4 == 1:
				return status.Errorf(codes.Unavailable, "worker %d is unlucky", worker)
			case k%8 == 2:
				return errInvalidResponse
			}
			return nil
		})
		require.Equal(t, 400, res.ok()+res.failed())
		require.Equal(t, map[string]int{"Unavailable": 100, "invalid response": 50}, res.errors)
		require.Equal(t, 250, res.ok())
		require.Regexp(t, `^worker \d is unlucky$`, res.errorSamples["Unavailable"])
		require.Equal(t, "the response holds no certificate", res.errorSamples["invalid response"])
	})
	t.Run("duration", func(t *testing.T) {
		res := runLoad(context.Background(), loadConfig{workers: 2, duration: 50 * time.Millisecond}, func(context.Context, int, int) error {
			time.Sleep(time.Millisecond)
			return nil
		})
		require.Positive(t, res.ok())
		require.GreaterOrEqual(t, res.elapsed, 50*time.Millisecond)
	})
	t.Run("interrupt drops the requests it cuts short", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		var calls atomic.Int64
		res := runLoad(ctx, loadConfig{workers: 4, duration: time.Minute}, func(ctx context.Context, _, _ int) error {
			if calls.Add(1) == 20 {
				cancel()
			}
			if ctx.Err() != nil {
				return status.FromContextError(ctx.Err()).Err()
			}
			return nil
		})
		require.Zero(t, res.failed())
		require.Less(t, res.ok(), int(calls.Load()))
		require.Less(t, res.elapsed, time.Minute)
	})
}

func isSorted(d []time.Duration) bool {
	for i := 1; i < len(d); i++ {
		if d[i] < d[i-1] {
			return false
		}
	}
	return true
}

func testReport() benchReport {
	return benchReport{
		Workers: 8, Connections: 1, CSRs: 256, Duration: 10 * time.Second,
		Elapsed:     10 * time.Second,
		OK:          41234,
		Errors:      map[string]int{},
		Latency:     latencySummary{Count: 41234, P50: ms(1.71), P90: ms(2.8), P99: ms(4.9), Max: ms(12.3), Mean: ms(1.9)},
		benchCommon: testCommon(),
	}
}

func testCommon() benchCommon {
	return benchCommon{
		MetricsURL: "http://127.0.0.1:9402/metrics",
		Server: &serverFigures{
			cpu: 19800 * time.Millisecond, hasCPU: true, issued: 48011,
			rssBytes: 45.2 * (1 << 20), hasRSS: true, gomaxprocs: 2,
		},
		Crypto:          cryptoCost{perCert: 95 * time.Microsecond, iterations: 2000},
		LocalGOMAXPROCS: 8,
	}
}

func TestBenchReportText(t *testing.T) {
	r := testReport()
	require.Equal(t, "meshctl bench: 8 workers, 10s, 1 connection(s), 256 pre-made P-256 CSRs", r.header())
	var out bytes.Buffer
	r.writeText(&out)
	require.Equal(t, `requests   41234 ok, 0 errors in 10.0s
rate       4123.4 certs/s
latency    p50 1.71ms  p90 2.80ms  p99 4.90ms  max 12.3ms
server     CPU 412µs/cert (19.80s CPU for 48011 certs), RSS 45.2 MiB
crypto     in-process P-256 CSR verify + sign: 95.0µs/cert (limit 10526 certs/s per core, 21053 certs/s on 2 cores, server GOMAXPROCS)
efficiency 23.0% (crypto cost / server CPU per cert)
`, out.String())

	t.Run("interrupted with errors, no metrics", func(t *testing.T) {
		r := testReport()
		r.Interrupted = true
		r.Elapsed = 3210 * time.Millisecond
		r.OK = 0
		r.Latency = latencySummary{}
		r.Errors = map[string]int{"Unauthenticated": 12, "DeadlineExceeded": 1}
		r.ErrorSamples = map[string]string{"Unauthenticated": "bearer token is not valid", "DeadlineExceeded": "context deadline exceeded"}
		r.MetricsURL, r.Server = "", nil
		r.Requests = 500
		require.Equal(t, "meshctl bench: 8 workers, 10s or 500 requests, 1 connection(s), 256 pre-made P-256 CSRs", r.header())
		var out bytes.Buffer
		r.writeText(&out)
		require.Equal(t, `interrupted after 3.21s: partial results
requests   0 ok, 13 errors in 3.21s
errors     DeadlineExceeded 1 (first: context deadline exceeded)
errors     Unauthenticated 12 (first: bearer token is not valid)
rate       0.0 certs/s
latency    no successful request
server     not measured (--metrics-url is empty)
crypto     in-process P-256 CSR verify + sign: 95.0µs/cert (limit 10526 certs/s per core, 84211 certs/s on 8 cores, local GOMAXPROCS)
efficiency unknown (needs the server's CPU per cert)
`, out.String())
	})
	t.Run("transport probe", func(t *testing.T) {
		r := testReport()
		r.Transport = &transportFigures{calls: 60000, elapsed: 3 * time.Second, cpu: 2400 * time.Millisecond}
		var out bytes.Buffer
		r.writeText(&out)
		require.Contains(t, out.String(), `efficiency 23.0% (crypto cost / server CPU per cert)
transport  40.0µs server CPU per GetBundle call, a call that does no work (20000 calls/s, same workers and connections)
ceiling    70.4% (crypto / (crypto + transport per call): the efficiency of a server doing nothing else)
`)
		r.Batch = 32
		out.Reset()
		r.writeText(&out)
		require.Contains(t, out.String(), "ceiling    98.7% (crypto / (crypto + transport per call of 32)")

		r.Transport, r.TransportError = nil, "3 of 9 GetBundle calls failed (Unavailable: gone)"
		out.Reset()
		r.writeText(&out)
		require.True(t, strings.HasSuffix(out.String(), "\ntransport  not measured: 3 of 9 GetBundle calls failed (Unavailable: gone)\n"), out.String())
	})
	t.Run("scrape failed", func(t *testing.T) {
		r := testReport()
		r.Server, r.ServerError = nil, "connection refused"
		var out bytes.Buffer
		r.writeText(&out)
		require.Contains(t, out.String(), "server     not measured: connection refused\n")
	})
}

func TestBenchReportJSON(t *testing.T) {
	r := testReport()
	data, err := json.Marshal(r.json())
	require.NoError(t, err)
	var got map[string]any
	require.NoError(t, json.Unmarshal(data, &got))
	require.Equal(t, float64(41234), got["ok"])
	require.Equal(t, map[string]any{}, got["errors"])
	require.InDelta(t, 4123.4, got["certsPerSecond"], 1e-9)
	require.InDelta(t, 1.71, got["latencyMs"].(map[string]any)["p50"], 1e-9)
	server := got["server"].(map[string]any)
	require.InDelta(t, 412.4, server["cpuPerCertMicros"], 0.1)
	require.Equal(t, float64(48011), server["issued"])
	crypto := got["crypto"].(map[string]any)
	require.InDelta(t, 95, crypto["perCertMicros"], 1e-9)
	require.Equal(t, float64(2), crypto["cores"])
	require.Equal(t, "server", crypto["coresFrom"])
	require.InDelta(t, 23.03, got["efficiencyPercent"], 0.01)
	require.Equal(t, false, got["interrupted"])
	require.Equal(t, "steady", got["mode"])
	require.NotContains(t, got, "storm")
	require.NotContains(t, got, "transport")

	r.Transport = &transportFigures{calls: 60000, elapsed: 3 * time.Second, cpu: 2400 * time.Millisecond}
	data, err = json.Marshal(r.json())
	require.NoError(t, err)
	got = map[string]any{}
	require.NoError(t, json.Unmarshal(data, &got))
	require.Equal(t, map[string]any{
		"calls": float64(60000), "callsPerSecond": float64(20000), "cpuSeconds": 2.4,
		"cpuPerCallMicros": float64(40), "ceilingPercent": 100 * 95.0 / 135,
		"certificatesPerCall": float64(1), "probeDurationSeconds": float64(3),
	}, got["transport"])
}

func TestTransportCeiling(t *testing.T) {
	tr := transportFigures{calls: 1000, elapsed: time.Second, cpu: 50 * time.Millisecond}
	perCall, ok := tr.perCall()
	require.True(t, ok)
	require.Equal(t, 50*time.Microsecond, perCall)
	c, ok := tr.ceiling(100*time.Microsecond, 1)
	require.True(t, ok)
	require.InDelta(t, 66.67, c, 0.01)
	// A batch shares the call's cost among its certificates.
	c, ok = tr.ceiling(100*time.Microsecond, 10)
	require.True(t, ok)
	require.InDelta(t, 95.24, c, 0.01)

	for _, tr := range []transportFigures{{calls: 0, cpu: time.Second}, {calls: 10, cpu: 0}} {
		_, ok := tr.perCall()
		require.False(t, ok)
		_, ok = tr.ceiling(100*time.Microsecond, 1)
		require.False(t, ok)
	}
	_, ok = tr.ceiling(0, 1)
	require.False(t, ok, "no crypto floor, no ceiling")
}

func TestFormatDuration(t *testing.T) {
	tests := []struct {
		d    time.Duration
		want string
	}{
		{d: 500 * time.Nanosecond, want: "500ns"},
		{d: 95200 * time.Nanosecond, want: "95.2µs"},
		{d: 412 * time.Microsecond, want: "412µs"},
		{d: 1710 * time.Microsecond, want: "1.71ms"},
		{d: 12300 * time.Microsecond, want: "12.3ms"},
		{d: 10 * time.Second, want: "10.0s"},
		{d: 150 * time.Second, want: "150s"},
	}
	for _, tt := range tests {
		t.Run(tt.want, func(t *testing.T) {
			require.Equal(t, tt.want, formatDuration(tt.d))
		})
	}
}

func TestBenchFlags(t *testing.T) {
	id := "--spiffe-id=" + testID.String()
	tests := []struct {
		name string
		args []string
		want string
	}{
		{name: "output", args: []string{"-o", "yaml", id}, want: `--output "yaml": want text or json`},
		{name: "concurrency", args: []string{"-c", "0", id}, want: "--concurrency 0: want at least 1"},
		{name: "connections", args: []string{"--connections", "0", id}, want: "--connections 0: want at least 1"},
		{name: "more connections than workers", args: []string{"-c", "2", "--connections", "3", id}, want: "--connections 3 is more than --concurrency 2: some connections would carry no requests"},
		{name: "csrs", args: []string{"--csrs", "0", id}, want: "--csrs 0: want at least 1"},
		{name: "endless", args: []string{"-d", "0", id}, want: "--duration 0 needs --requests: the run would never end"},
		{name: "no id", args: []string{"--token", "x"}, want: "--spiffe-id is required: every CSR asks for the token's identity"},
		{name: "bad id", args: []string{"--spiffe-id", "http://x/y"}, want: "--spiffe-id: scheme is missing or invalid"},
		{name: "no token", args: []string{id}, want: "no credential: give --token-file (or --token)"},
		{name: "two tokens", args: []string{id, "--token", "x", "--token-file", "y"}, want: "give --token or --token-file, not both"},
		{name: "mode", args: []string{"--mode", "burst", id}, want: `--mode "burst": want steady, storm or mixed`},
		{name: "storm has no duration", args: []string{"--mode", "storm", "-d", "5s", id}, want: "--duration is for --mode steady: a storm ends when its -n workloads are done"},
		{name: "storm has no connections", args: []string{"--mode", "storm", "--connections", "2", id}, want: "--connections is for --mode steady: a storm ends when its -n workloads are done"},
		{name: "storm has no csrs", args: []string{"--mode", "storm", "--csrs", "2", id}, want: "--csrs is for --mode steady, or the renewals' key pool of --mode mixed with --keys ahead"},
		{name: "storm workloads", args: []string{"--mode", "storm", "-n", "0", id}, want: "-n 0: want at least 1 workload"},
		{name: "storm keys", args: []string{"--mode", "storm", "--keys", "later", id}, want: `--keys "later": want ahead or inline`},
		{name: "workload timeout", args: []string{"--mode", "storm", "--workload-timeout", "0s", id}, want: "--workload-timeout 0s: want more than 0"},
		{name: "renewals outside mixed", args: []string{"--mode", "storm", "--renewals", "3", id}, want: "--renewals is for --mode mixed"},
		{name: "mixed needs renewals", args: []string{"--mode", "mixed", id}, want: "--renewals 0: --mode mixed wants at least 1 renewing client"},
		{name: "hold outside storm", args: []string{"--mode", "mixed", "--renewals", "2", "--hold", id}, want: "--hold is for --mode storm"},
		{name: "mixed with one renewal key", args: []string{"--mode", "mixed", "--renewals", "2", "--csrs", "1", id}, want: "--csrs 1: --mode mixed with --keys ahead needs at least 2 renewal keys, so that a renewal never presents the key it replaces"},
		{name: "steady has no hold", args: []string{"--hold", id}, want: "--hold is for --mode storm or mixed"},
		{name: "steady has no keys", args: []string{"--keys", "inline", id}, want: "--keys is for --mode storm or mixed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := runMeshctl(t, append([]string{"bench"}, tt.args...)...)
			require.EqualError(t, err, tt.want)
		})
	}
}

func TestErrorKey(t *testing.T) {
	require.Equal(t, "PermissionDenied", errorKey(status.Error(codes.PermissionDenied, "no")))
	require.Equal(t, "invalid response", errorKey(errInvalidResponse))
	require.Equal(t, "invalid response", errorKey(errors.New("other")))
}

func TestInsecureNeverCarriesACredential(t *testing.T) {
	f := &serverFlags{insecure: true, sendsCredential: true}
	_, err := f.tlsConfig(nil)
	require.EqualError(t, err, "--insecure would send the credential to a server nobody verified; use --ca-bundle")
	f.sendsCredential = false
	cfg, err := f.tlsConfig(nil)
	require.NoError(t, err)
	require.True(t, cfg.InsecureSkipVerify, "bundle may fetch the bundle on first contact")
}

func TestCheckIssued(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("meshca.test")
	id := spiffeid.RequireFromPath(td, "/ns/a/sa/b")
	inter := testca.New(t, td).ChildCA()
	svid := inter.CreateX509SVID(id)
	key := svid.PrivateKey
	roots := []*x509.Certificate{inter.Root().Cert}

	require.NoError(t, checkIssued(svid.Certificates, roots, id, key))
	require.EqualError(t, checkIssued(svid.Certificates, roots, spiffeid.RequireFromPath(td, "/other"), key),
		`server issued a certificate for "spiffe://meshca.test/ns/a/sa/b"; asked for "spiffe://meshca.test/other"`)
	require.EqualError(t, checkIssued(svid.Certificates, roots, id, testca.NewKey(t)), "server issued a certificate for another key")
	err := checkIssued(svid.Certificates, []*x509.Certificate{testca.New(t, td).Cert}, id, key)
	require.ErrorContains(t, err, "server's response does not verify against its bundle: ")
}

func TestRetryDelay(t *testing.T) {
	shed, err := status.New(codes.ResourceExhausted, "shedding").WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(200 * time.Millisecond)})
	require.NoError(t, err)
	tests := []struct {
		name      string
		err       error
		attempt   int
		min, max  time.Duration
		shed, try bool
	}{
		{name: "shed: the hint plus up to half", err: shed.Err(), attempt: 3, min: 200 * time.Millisecond, max: 300 * time.Millisecond, shed: true, try: true},
		{name: "exhausted without a hint: backoff", err: status.Error(codes.ResourceExhausted, "full"), min: 100 * time.Millisecond, max: 150 * time.Millisecond, try: true},
		{name: "unavailable: backoff doubles", err: status.Error(codes.Unavailable, "refused"), attempt: 2, min: 400 * time.Millisecond, max: 600 * time.Millisecond, try: true},
		{name: "deadline: backoff is capped", err: status.Error(codes.DeadlineExceeded, "slow"), attempt: 40, min: 5 * time.Second, max: 7500 * time.Millisecond, try: true},
		{name: "denied is final", err: status.Error(codes.PermissionDenied, "banned")},
		{name: "unauthenticated is final", err: status.Error(codes.Unauthenticated, "bad token")},
		{name: "not a status is final", err: errInvalidResponse},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for range 50 {
				wait, shed, try := retryDelay(tt.err, tt.attempt)
				require.Equal(t, tt.shed, shed)
				require.Equal(t, tt.try, try)
				require.GreaterOrEqual(t, wait, tt.min)
				require.LessOrEqual(t, wait, tt.max)
			}
		})
	}
}

func testStormReport() stormReport {
	lat := func(p50, p90, p99, mx float64) latencySummary {
		return latencySummary{Count: 1, P50: ms(p50), P90: ms(p90), P99: ms(p99), Max: ms(mx)}
	}
	c := testCommon()
	c.Server.issued = 10000
	c.Server.rssBytes = 140 * (1 << 20)
	return stormReport{
		Mode: modeStorm, Workloads: 10000, InFlight: 256, Keys: keysAhead, KeysMade: 10000, KeygenTime: 1500 * time.Millisecond,
		WorkloadTimeout: time.Minute, FileLimit: 20000,
		Elapsed: 8 * time.Second,
		New: stormFigures{
			OK: 9998, Shed: 37,
			Retried: codeCounts{counts: map[string]int{"Unavailable": 3}, first: map[string]string{"Unavailable": "connection refused"}},
			Failed:  codeCounts{counts: map[string]int{"DeadlineExceeded": 2}, first: map[string]string{"DeadlineExceeded": "context deadline exceeded"}},
			Total:   lat(180, 320, 610, 1900),
			Connect: lat(150, 280, 550, 1800),
			Sign:    lat(20, 35, 60, 120),
		},
		RSSBefore: 40 * (1 << 20), HasRSSBefore: true,
		PeakRSS: 180 * (1 << 20), RSSSamples: 33,
		benchCommon: c,
	}
}

func TestStormReportText(t *testing.T) {
	r := testStormReport()
	require.Equal(t, "meshctl bench storm: 10000 new workloads, 256 in flight, each a new P-256 key and a new TLS connection; 10000 keys made ahead in 1.50s (not measured); workload timeout 1m0s", r.header())
	var out bytes.Buffer
	r.writeText(&out)
	require.Equal(t, `workloads  9998 certified, 2 failed in 8.00s (wall: first start to last certificate)
rate       1249.8 certs/s
shed       37 (ResourceExhausted with RetryInfo, shed or rate-limited: retried after the hint)
retried    Unavailable 3 (first: connection refused)
errors     DeadlineExceeded 2 (first: context deadline exceeded)
workload   p50 180ms  p90 320ms  p99 610ms  max 1.90s  (new connection, TLS handshake and Sign, with retries)
connect    p50 150ms  p90 280ms  p99 550ms  max 1.80s  (TCP, TLS handshake, HTTP/2 ready)
sign       p50 20.0ms  p90 35.0ms  p99 60.0ms  max 120ms  (the Sign RPC alone)
peak RSS   180.0 MiB (33 samples, every 250ms)
server     CPU 1.98ms/cert (19.80s CPU for 10000 certs), RSS 140.0 MiB
crypto     in-process P-256 CSR verify + sign: 95.0µs/cert (limit 10526 certs/s per core, 21053 certs/s on 2 cores, server GOMAXPROCS)
efficiency 4.8% (crypto cost / server CPU per cert)
`, out.String())

	t.Run("mixed and hold", func(t *testing.T) {
		r := testStormReport()
		r.Mode, r.Renewers, r.Keys = modeMixed, 64, keysInline
		r.New.Retried, r.New.Failed = codeCounts{}, codeCounts{}
		r.Renewals = stormFigures{OK: 4000, Total: ms2(3, 5, 9, 20), Sign: ms2(1, 2, 4, 8)}
		require.Equal(t, "meshctl bench mixed: 10000 new workloads, 256 in flight, each a new P-256 key and a new TLS connection, and 64 clients renewing over mTLS; keys made inline (measured); workload timeout 1m0s", r.header())
		var out bytes.Buffer
		r.writeText(&out)
		require.Contains(t, out.String(), "errors     none\n")
		require.Contains(t, out.String(), `renewals   64 clients: 4000 renewed, 0 failed (500.0 certs/s)
ren. shed  0 (ResourceExhausted with RetryInfo, shed or rate-limited: retried after the hint)
ren. error none
renewal    p50 3.00ms  p90 5.00ms  p99 9.00ms  max 20.0ms  (new mTLS connection and Sign, with retries)
renew sign p50 1.00ms  p90 2.00ms  p99 4.00ms  max 8.00ms  (the Sign RPC alone)
`)

		r.Mode, r.Hold, r.Held = modeStorm, true, 10000
		out.Reset()
		r.writeText(&out)
		require.Contains(t, out.String(), `held       10000 clients connected with a bundle watch, 0 failed to open one
memory     +100.0 MiB server RSS with 10000 clients connected: at most 10.2 KiB per connected client
`)
		got := r.json()
		require.InDelta(t, 10.24*1024, *got.Storm.MemoryPerClientBytes, 1)
		require.InDelta(t, 100*(1<<20), *got.Storm.RSSIncreaseBytes, 1)
	})
}

func ms2(p50, p90, p99, mx float64) latencySummary {
	return latencySummary{Count: 1, P50: ms(p50), P90: ms(p90), P99: ms(p99), Max: ms(mx)}
}

func TestStormReportJSON(t *testing.T) {
	r := testStormReport()
	data, err := json.Marshal(r.json())
	require.NoError(t, err)
	var got map[string]any
	require.NoError(t, json.Unmarshal(data, &got))
	require.Equal(t, "storm", got["mode"])
	require.Equal(t, float64(9998), got["ok"])
	require.Equal(t, map[string]any{"DeadlineExceeded": float64(2)}, got["errors"])
	require.InDelta(t, 1249.75, got["certsPerSecond"], 1e-9)
	require.InDelta(t, 180, got["latencyMs"].(map[string]any)["p50"], 1e-9)
	for _, k := range []string{"workers", "connections", "csrs", "durationSeconds", "renewals"} {
		require.NotContains(t, got, k)
	}
	storm := got["storm"].(map[string]any)
	require.Equal(t, float64(37), storm["shedRetried"])
	require.Equal(t, map[string]any{"Unavailable": float64(3)}, storm["retried"])
	require.Equal(t, float64(2), storm["failed"])
	require.InDelta(t, 8, storm["wallSeconds"], 1e-9)
	require.InDelta(t, 20, storm["signLatencyMs"].(map[string]any)["p50"], 1e-9)
	require.InDelta(t, 180*(1<<20), storm["peakRSSBytes"], 1)
	require.Equal(t, float64(20000), storm["fileLimit"])
	require.NotContains(t, storm, "memoryPerClientBytes")
	require.InDelta(t, 1980, got["server"].(map[string]any)["cpuPerCertMicros"], 1e-6)
	require.Contains(t, got, "efficiencyPercent")
}
