package rotation

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// upstreamCollector exports UpstreamStatus and the count of upstream calls
// as meshca_upstream_* metrics, read at each scrape.
type upstreamCollector struct {
	state *upstreamState

	available, lastSuccess, failures, nextAttempt, calls *prometheus.Desc
}

func (m *Manager) registerUpstreamMetrics(reg prometheus.Registerer) error {
	c := &upstreamCollector{
		state: m.upstream,
		available: prometheus.NewDesc("meshca_upstream_available",
			"1 when the last call to the upstream authority (Vault) succeeded, else 0: the CA signs with its current intermediate meanwhile.", nil, nil),
		lastSuccess: prometheus.NewDesc("meshca_upstream_last_success_timestamp_seconds",
			"When a call to the upstream authority last succeeded (Unix time); 0 if none has.", nil, nil),
		failures: prometheus.NewDesc("meshca_upstream_consecutive_failures",
			"Calls to the upstream authority that failed since the last success.", nil, nil),
		nextAttempt: prometheus.NewDesc("meshca_upstream_next_attempt_timestamp_seconds",
			"When the rotation loop next calls the upstream authority (Unix time): a retry with backoff after a failure, else the next check.", nil, nil),
		calls: prometheus.NewDesc("meshca_upstream_requests_total",
			"Calls to the upstream authority, by op (roots: read its roots; sign: have it sign an intermediate) and result (ok, unavailable, denied, error).",
			[]string{"op", "result"}, nil),
	}
	return reg.Register(c)
}

// Describe implements prometheus.Collector.
func (c *upstreamCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.available, c.lastSuccess, c.failures, c.nextAttempt, c.calls} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *upstreamCollector) Collect(ch chan<- prometheus.Metric) {
	c.state.mu.Lock()
	st := c.state.status
	calls := make(map[[2]string]uint64, len(c.state.calls))
	for k, v := range c.state.calls {
		calls[k] = v
	}
	c.state.mu.Unlock()

	available := 0.0
	if st.Available {
		available = 1
	}
	ch <- prometheus.MustNewConstMetric(c.available, prometheus.GaugeValue, available)
	ch <- prometheus.MustNewConstMetric(c.lastSuccess, prometheus.GaugeValue, unixSeconds(st.LastSuccess))
	ch <- prometheus.MustNewConstMetric(c.failures, prometheus.GaugeValue, float64(st.ConsecutiveFailures))
	ch <- prometheus.MustNewConstMetric(c.nextAttempt, prometheus.GaugeValue, unixSeconds(st.NextAttempt))
	for _, op := range []string{opRoots, opSign} {
		for _, result := range []string{resultOK, resultUnavailable, resultDenied, resultError} {
			ch <- prometheus.MustNewConstMetric(c.calls, prometheus.CounterValue, float64(calls[[2]string{op, result}]), op, result)
		}
	}
}

// unixSeconds is t as Unix time, and 0 for the zero time.
func unixSeconds(t time.Time) float64 {
	if t.IsZero() {
		return 0
	}
	return float64(t.Unix())
}
