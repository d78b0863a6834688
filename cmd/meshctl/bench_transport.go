package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"
	"time"

	"google.golang.org/grpc"

	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
)

// The transport probe measures what one gRPC call over TLS costs the
// server when the call itself does no work.
//
// The server's CPU per certificate is the crypto floor, plus meshca's own
// work around it (parsing the CSR, authenticating, building the
// certificate, the audit line), plus what every call costs: HTTP/2
// frames, header decoding, TLS records, the system calls that read and
// write them, and the goroutines they wake. That last part is grpc-go's,
// the kernel's and the machine's. The probe measures it on the run's own
// connections, so that the efficiency figure can be read against the
// best the transport allows.
//
// It sends BundleService.GetBundle, whose handler returns a bundle the
// server keeps ready, with an answer about the size of Sign's (the
// bundle's certificates and its SPIFFE JSON), from the same workers over
// the same connections, with Sign's authorization header. The server
// answers it faster than it answers Sign, and the more answers are
// waiting, the more of them share one write: the cost per call the probe
// measures is a lower bound of Sign's, and the ceiling it gives an upper
// bound.

// defaultTransportProbe is how long the probe runs by default.
const defaultTransportProbe = 3 * time.Second

// transportFigures is what the probe measured.
type transportFigures struct {
	calls   int
	elapsed time.Duration
	// cpu is the server's CPU time during the probe.
	cpu time.Duration
}

// perCall returns the server's CPU time per call, or false when no call
// was made or no CPU time was seen.
func (t transportFigures) perCall() (time.Duration, bool) {
	if t.calls <= 0 || t.cpu <= 0 {
		return 0, false
	}
	return t.cpu / time.Duration(t.calls), true
}

func (t transportFigures) rate() float64 {
	if t.elapsed <= 0 {
		return 0
	}
	return float64(t.calls) / t.elapsed.Seconds()
}

// ceiling returns the efficiency a server would reach if it did nothing
// per certificate but the crypto floor and, per call of batch
// certificates, what the probe's call cost: crypto / (crypto +
// perCall/batch), in percent. It returns false when either is unknown.
func (t transportFigures) ceiling(crypto time.Duration, batch int) (float64, bool) {
	perCall, ok := t.perCall()
	if !ok {
		return 0, false
	}
	return efficiency(crypto, crypto+perCall/time.Duration(max(batch, 1)))
}

// probeTransport runs the probe for d: workers send GetBundle one after
// the other over conns (worker w on conns[w%len(conns)]) with ctx's
// metadata, and the server's CPU time is read from metricsURL before and
// after. Any failed call fails the probe: its figure would not be the
// cost of a call.
func probeTransport(ctx context.Context, httpClient *http.Client, metricsURL string, conns []*grpc.ClientConn, workers int, d, timeout time.Duration) (transportFigures, error) {
	clients := make([]meshcav1.BundleServiceClient, len(conns))
	for i, conn := range conns {
		clients[i] = meshcav1.NewBundleServiceClient(conn)
	}
	before, err := scrapeMetrics(ctx, httpClient, metricsURL)
	if err != nil {
		return transportFigures{}, fmt.Errorf("scraping the metrics: %w", err)
	}
	if !before.hasCPU {
		return transportFigures{}, fmt.Errorf("the metrics have no %s", metricCPU)
	}
	res := runLoad(ctx, loadConfig{workers: workers, duration: d}, func(ctx context.Context, worker, _ int) error {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		b, err := clients[worker%len(clients)].GetBundle(ctx, &meshcav1.GetBundleRequest{})
		if err != nil {
			return err
		}
		if len(b.GetX509Authorities()) == 0 {
			return errInvalidResponse
		}
		return nil
	})
	if ctx.Err() != nil {
		return transportFigures{}, errors.New("interrupted")
	}
	if n := res.failed(); n > 0 {
		code := slices.Sorted(maps.Keys(res.errors))[0]
		return transportFigures{}, fmt.Errorf("%d of %d GetBundle calls failed (%s: %s)", n, n+res.ok(), code, truncate(res.errorSamples[code], 160))
	}
	after, err := scrapeMetrics(ctx, httpClient, metricsURL)
	if err != nil {
		return transportFigures{}, fmt.Errorf("scraping the metrics: %w", err)
	}
	f, err := serverDelta(before, after)
	if err != nil {
		return transportFigures{}, err
	}
	return transportFigures{calls: res.ok(), elapsed: res.elapsed, cpu: f.cpu}, nil
}

// writeTransport writes the transport and ceiling lines of a steady run.
func (r *benchReport) writeTransport(w io.Writer) {
	switch {
	case r.TransportError != "":
		fmt.Fprintf(w, "transport  not measured: %s\n", r.TransportError)
		return
	case r.Transport == nil:
		return
	}
	t := *r.Transport
	perCall, ok := t.perCall()
	if !ok {
		fmt.Fprintf(w, "transport  unknown: %d GetBundle calls, no server CPU seen\n", t.calls)
		return
	}
	fmt.Fprintf(w, "transport  %s server CPU per GetBundle call, a call that does no work (%.0f calls/s, same workers and connections)\n",
		formatDuration(perCall), t.rate())
	if c, ok := t.ceiling(r.Crypto.perCert, r.Batch); ok {
		per := "call"
		if r.Batch > 1 {
			per = fmt.Sprintf("call of %d", r.Batch)
		}
		fmt.Fprintf(w, "ceiling    %.1f%% (crypto / (crypto + transport per %s): the efficiency of a server doing nothing else)\n", c, per)
	}
}

// transportJSON is the probe's figures in -o json.
type transportJSON struct {
	Calls                int      `json:"calls"`
	CallsPerSecond       float64  `json:"callsPerSecond"`
	CPUSeconds           float64  `json:"cpuSeconds"`
	CPUPerCallMicros     *float64 `json:"cpuPerCallMicros,omitempty"`
	CeilingPercent       *float64 `json:"ceilingPercent,omitempty"`
	CertificatesPerCall  int      `json:"certificatesPerCall"`
	ProbeDurationSeconds float64  `json:"probeDurationSeconds"`
}

func (r *benchReport) transportJSON() *transportJSON {
	if r.Transport == nil {
		return nil
	}
	t := *r.Transport
	out := &transportJSON{
		Calls:                t.calls,
		CallsPerSecond:       t.rate(),
		CPUSeconds:           t.cpu.Seconds(),
		CertificatesPerCall:  max(r.Batch, 1),
		ProbeDurationSeconds: t.elapsed.Seconds(),
	}
	if perCall, ok := t.perCall(); ok {
		v := toMicros(perCall)
		out.CPUPerCallMicros = &v
	}
	if c, ok := t.ceiling(r.Crypto.perCert, r.Batch); ok {
		out.CeilingPercent = &c
	}
	return out
}
