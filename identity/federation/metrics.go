package federation

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

type metrics struct {
	fetches     *prometheus.CounterVec
	storeErrors prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, f *Federator) (*metrics, error) {
	m := &metrics{
		fetches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_federation_fetches_total",
			Help: "Fetches of federated trust domains' bundles, by peer trust domain and result: updated, unchanged, " +
				"or why the bundle was refused (transport, endpoint_authentication, http_status, too_large, malformed, " +
				"wrong_trust_domain, no_x509_authorities, stale_sequence, sequence_conflict, missing_sequence).",
		}, []string{"peer", "result"}),
		storeErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshca_federation_store_errors_total",
			Help: "Failed saves of the federated bundles after a fetch; they are kept in memory and saved with the next change.",
		}),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.fetches, m.storeErrors, peerCollector{f}} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func (m *metrics) fetched(td spiffeid.TrustDomain, result string) {
	m.fetches.WithLabelValues(td.Name(), result).Inc()
}

func (m *metrics) forget(td spiffeid.TrustDomain) {
	m.fetches.DeletePartialMatch(prometheus.Labels{"peer": td.Name()})
}

var (
	sequenceDesc = prometheus.NewDesc("meshca_federation_bundle_sequence",
		"spiffe_sequence of each peer's last good bundle; absent when the bundle has none.",
		[]string{"peer"}, nil)
	ageDesc = prometheus.NewDesc("meshca_federation_bundle_age_seconds",
		"Seconds since each peer's last good bundle was fetched; absent until a first fetch succeeds.",
		[]string{"peer"}, nil)
)

// peerCollector reports the peers' bundles at scrape time.
type peerCollector struct{ f *Federator }

func (peerCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- sequenceDesc
	ch <- ageDesc
}

func (c peerCollector) Collect(ch chan<- prometheus.Metric) {
	now := c.f.clock.Now()
	for _, st := range c.f.Peers() {
		name := st.Peer.TrustDomain.Name()
		if st.Bundle != nil {
			if seq, ok := st.Bundle.SequenceNumber(); ok {
				ch <- prometheus.MustNewConstMetric(sequenceDesc, prometheus.GaugeValue, float64(seq), name)
			}
		}
		if !st.LastSuccess.IsZero() {
			ch <- prometheus.MustNewConstMetric(ageDesc, prometheus.GaugeValue, now.Sub(st.LastSuccess).Seconds(), name)
		}
	}
}
