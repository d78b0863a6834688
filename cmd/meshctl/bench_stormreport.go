package main

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"
)

// stormReport is everything bench --mode storm or mixed measured.
type stormReport struct {
	Mode      string
	Workloads int
	InFlight  int
	Keys      string
	KeysMade  int
	// PoolKeys are the renewals' keys made ahead (mixed).
	PoolKeys        int
	KeygenTime      time.Duration
	WorkloadTimeout time.Duration
	Hold            bool
	Renewers        int
	// FileLimit is this process's RLIMIT_NOFILE, or 0 when unknown.
	FileLimit uint64

	Interrupted bool
	// Elapsed is the wall time from the first workload's start to the
	// last certificate.
	Elapsed  time.Duration
	New      stormFigures
	Renewals stormFigures

	// Held counts the clients connected at the end (--hold);
	// HoldFailed the certified ones whose bundle watch failed.
	Held       int
	HoldFailed codeCounts

	// RSSBefore is the server's resident memory before the run, when
	// HasRSSBefore.
	RSSBefore    float64
	HasRSSBefore bool
	// PeakRSS is the highest resident memory polled during the run (of
	// RSSSamples polls) or read at its end; RSSError is the last poll's
	// error, if any.
	PeakRSS    float64
	RSSSamples int
	RSSError   string

	benchCommon
}

func (r *stormReport) setResult(res *stormResult) {
	r.Elapsed = res.elapsed
	r.New = res.new
	r.Renewals = res.renewals
	r.Held = res.held
	r.HoldFailed = res.holdFailed
}

// rate is the new workloads certified per second of wall time.
func (r *stormReport) rate() float64 {
	return perSecond(r.New.OK, r.Elapsed)
}

func perSecond(n int, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(n) / d.Seconds()
}

// memoryPerClient returns the server's resident memory increase, from
// before the run to the end with every client held, over the clients
// held; false when unknown.
func (r *stormReport) memoryPerClient() (increase, perClient float64, ok bool) {
	if !r.Hold || r.Held == 0 || !r.HasRSSBefore || r.Server == nil || !r.Server.hasRSS {
		return 0, 0, false
	}
	increase = r.Server.rssBytes - r.RSSBefore
	return increase, increase / float64(r.Held), true
}

func (r *stormReport) header() string {
	var b strings.Builder
	fmt.Fprintf(&b, "meshctl bench %s: %d new workloads, %d in flight, each a new P-256 key and a new TLS connection", r.Mode, r.Workloads, r.InFlight)
	if r.Mode == modeMixed {
		fmt.Fprintf(&b, ", and %d clients renewing over mTLS", r.Renewers)
	}
	if r.Hold {
		b.WriteString(", held open with a bundle watch")
	}
	if r.Keys == keysAhead {
		fmt.Fprintf(&b, "; %d keys", r.KeysMade)
		if r.PoolKeys > 0 {
			fmt.Fprintf(&b, " (and %d for renewals)", r.PoolKeys)
		}
		fmt.Fprintf(&b, " made ahead in %s (not measured)", formatDuration(r.KeygenTime))
	} else {
		b.WriteString("; keys made inline (measured)")
	}
	fmt.Fprintf(&b, "; workload timeout %s", r.WorkloadTimeout)
	return b.String()
}

func (r *stormReport) writeText(w io.Writer) {
	if r.Interrupted {
		fmt.Fprintf(w, "interrupted after %s: partial results\n", formatDuration(r.Elapsed))
	}
	f := r.New
	fmt.Fprintf(w, "workloads  %d certified, %d failed in %s (wall: first start to last certificate)\n",
		f.OK, f.Failed.total(), formatDuration(r.Elapsed))
	fmt.Fprintf(w, "rate       %.1f certs/s\n", r.rate())
	writeRetries(w, [3]string{"shed", "retried", "errors"}, f)
	writeLatency(w, "workload", f.Total, "new connection, TLS handshake and Sign, with retries")
	writeLatency(w, "connect", f.Connect, "TCP, TLS handshake, HTTP/2 ready")
	writeLatency(w, "sign", f.Sign, "the Sign RPC alone")
	if r.Mode == modeMixed {
		g := r.Renewals
		fmt.Fprintf(w, "renewals   %d clients: %d renewed, %d failed (%.1f certs/s)\n",
			r.Renewers, g.OK, g.Failed.total(), perSecond(g.OK, r.Elapsed))
		writeRetries(w, [3]string{"ren. shed", "ren. retry", "ren. error"}, g)
		writeLatency(w, "renewal", g.Total, "new mTLS connection and Sign, with retries")
		writeLatency(w, "renew sign", g.Sign, "the Sign RPC alone")
	}
	if r.Hold {
		fmt.Fprintf(w, "held       %d clients connected with a bundle watch, %d failed to open one\n", r.Held, r.HoldFailed.total())
		writeCodes(w, "hold fail ", r.HoldFailed)
		if increase, perClient, ok := r.memoryPerClient(); ok {
			fmt.Fprintf(w, "memory     %s server RSS with %d clients connected: at most %s per connected client\n",
				formatBytes(increase, true), r.Held, formatBytes(perClient, false))
		} else {
			fmt.Fprintln(w, "memory     per connected client unknown (needs the server's RSS before and after)")
		}
	}
	switch {
	case r.MetricsURL == "":
	case r.RSSSamples > 0:
		fmt.Fprintf(w, "peak RSS   %.1f MiB (%d samples, every %s)\n", r.PeakRSS/(1<<20), r.RSSSamples, rssPollInterval)
	default:
		fmt.Fprintf(w, "peak RSS   unknown: %s\n", r.RSSError)
	}
	r.writeFigures(w)
}

// writeRetries writes the shed, retried and errors lines of f, with
// labels.
func writeRetries(w io.Writer, labels [3]string, f stormFigures) {
	fmt.Fprintf(w, "%-11s%d (ResourceExhausted with RetryInfo, shed or rate-limited: retried after the hint)\n", labels[0], f.Shed)
	writeCodes(w, labels[1], f.Retried)
	if f.Failed.total() == 0 {
		fmt.Fprintf(w, "%-11snone\n", labels[2])
	}
	writeCodes(w, labels[2], f.Failed)
}

func writeCodes(w io.Writer, label string, c codeCounts) {
	for _, code := range slices.Sorted(maps.Keys(c.counts)) {
		fmt.Fprintf(w, "%-11s%s %d (first: %s)\n", label, code, c.counts[code], truncate(c.first[code], 160))
	}
}

func writeLatency(w io.Writer, label string, l latencySummary, what string) {
	if l.Count == 0 {
		fmt.Fprintf(w, "%-11sno successful request\n", label)
		return
	}
	fmt.Fprintf(w, "%-11sp50 %s  p90 %s  p99 %s  max %s  (%s)\n", label,
		formatDuration(l.P50), formatDuration(l.P90), formatDuration(l.P99), formatDuration(l.Max), what)
}

// formatBytes prints b in KiB or MiB, with a sign when signed.
func formatBytes(b float64, signed bool) string {
	sign := ""
	if signed && b >= 0 {
		sign = "+"
	}
	if b >= 1<<20 || b <= -(1<<20) {
		return fmt.Sprintf("%s%.1f MiB", sign, b/(1<<20))
	}
	return fmt.Sprintf("%s%.1f KiB", sign, b/(1<<10))
}

// stormJSON is the storm's details in -o json.
type stormJSON struct {
	Workloads              int     `json:"workloads"`
	InFlight               int     `json:"inFlight"`
	Keys                   string  `json:"keys"`
	KeysMadeAhead          int     `json:"keysMadeAhead,omitempty"`
	RenewalKeysMadeAhead   int     `json:"renewalKeysMadeAhead,omitempty"`
	KeygenSeconds          float64 `json:"keygenSeconds,omitempty"`
	WorkloadTimeoutSeconds float64 `json:"workloadTimeoutSeconds"`
	Hold                   bool    `json:"hold"`
	FileLimit              uint64  `json:"fileLimit,omitempty"`

	Certified      int               `json:"certified"`
	Failed         int               `json:"failed"`
	ShedRetried    int               `json:"shedRetried"`
	Retried        map[string]int    `json:"retried"`
	RetriedSamples map[string]string `json:"retriedSamples,omitempty"`
	WallSeconds    float64           `json:"wallSeconds"`

	WorkloadLatencyMs *latencyJSON `json:"workloadLatencyMs,omitempty"`
	ConnectLatencyMs  *latencyJSON `json:"connectLatencyMs,omitempty"`
	SignLatencyMs     *latencyJSON `json:"signLatencyMs,omitempty"`

	RSSBeforeBytes *float64 `json:"rssBeforeBytes,omitempty"`
	PeakRSSBytes   *float64 `json:"peakRSSBytes,omitempty"`
	RSSSamples     int      `json:"rssSamples"`
	RSSError       string   `json:"rssError,omitempty"`

	Held                 int            `json:"held,omitempty"`
	HoldFailed           map[string]int `json:"holdFailed,omitempty"`
	RSSIncreaseBytes     *float64       `json:"rssIncreaseBytes,omitempty"`
	MemoryPerClientBytes *float64       `json:"memoryPerClientBytes,omitempty"`
}

// renewalsJSON is the renewing clients' figures in -o json.
type renewalsJSON struct {
	Clients        int               `json:"clients"`
	OK             int               `json:"ok"`
	CertsPerSecond float64           `json:"certsPerSecond"`
	ShedRetried    int               `json:"shedRetried"`
	Retried        map[string]int    `json:"retried"`
	Errors         map[string]int    `json:"errors"`
	ErrorSamples   map[string]string `json:"errorSamples,omitempty"`
	LatencyMs      *latencyJSON      `json:"latencyMs,omitempty"`
	SignLatencyMs  *latencyJSON      `json:"signLatencyMs,omitempty"`
}

func nonNil(m map[string]int) map[string]int {
	if m == nil {
		return map[string]int{}
	}
	return m
}

func (r *stormReport) json() benchJSON {
	f := r.New
	out := benchJSON{
		Mode:           r.Mode,
		Interrupted:    r.Interrupted,
		ElapsedSeconds: r.Elapsed.Seconds(),
		OK:             f.OK,
		Errors:         nonNil(f.Failed.counts),
		ErrorSamples:   f.Failed.first,
		CertsPerSecond: r.rate(),
		LatencyMs:      latencyMs(f.Total),
	}
	s := &stormJSON{
		Workloads:              r.Workloads,
		InFlight:               r.InFlight,
		Keys:                   r.Keys,
		KeysMadeAhead:          r.KeysMade,
		RenewalKeysMadeAhead:   r.PoolKeys,
		KeygenSeconds:          r.KeygenTime.Seconds(),
		WorkloadTimeoutSeconds: r.WorkloadTimeout.Seconds(),
		Hold:                   r.Hold,
		FileLimit:              r.FileLimit,
		Certified:              f.OK,
		Failed:                 f.Failed.total(),
		ShedRetried:            f.Shed,
		Retried:                nonNil(f.Retried.counts),
		RetriedSamples:         f.Retried.first,
		WallSeconds:            r.Elapsed.Seconds(),
		WorkloadLatencyMs:      latencyMs(f.Total),
		ConnectLatencyMs:       latencyMs(f.Connect),
		SignLatencyMs:          latencyMs(f.Sign),
		RSSSamples:             r.RSSSamples,
		RSSError:               r.RSSError,
		Held:                   r.Held,
		HoldFailed:             r.HoldFailed.counts,
	}
	if r.HasRSSBefore {
		v := r.RSSBefore
		s.RSSBeforeBytes = &v
	}
	if r.RSSSamples > 0 {
		v := r.PeakRSS
		s.PeakRSSBytes = &v
	}
	if increase, perClient, ok := r.memoryPerClient(); ok {
		s.RSSIncreaseBytes, s.MemoryPerClientBytes = &increase, &perClient
	}
	out.Storm = s
	if r.Mode == modeMixed {
		g := r.Renewals
		out.Renewals = &renewalsJSON{
			Clients:        r.Renewers,
			OK:             g.OK,
			CertsPerSecond: perSecond(g.OK, r.Elapsed),
			ShedRetried:    g.Shed,
			Retried:        nonNil(g.Retried.counts),
			Errors:         nonNil(g.Failed.counts),
			ErrorSamples:   g.Failed.first,
			LatencyMs:      latencyMs(g.Total),
			SignLatencyMs:  latencyMs(g.Sign),
		}
	}
	r.fillJSON(&out)
	return out
}
