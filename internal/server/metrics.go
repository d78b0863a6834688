package server

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshca/meshca/ca"
)

type metrics struct {
	issued  *prometheus.CounterVec
	denied  *prometheus.CounterVec
	latency *prometheus.HistogramVec
}

func newMetrics(reg prometheus.Registerer, c *ca.CA) (*metrics, error) {
	m := &metrics{
		issued: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_certificates_issued_total",
			Help: "Workload certificates issued, by API.",
		}, []string{"api"}),
		denied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_requests_denied_total",
			Help: "Certificate requests refused, by API, gRPC code and reason.",
		}, []string{"api", "code", "reason"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "meshca_sign_duration_seconds",
			Help:    "Time to handle a certificate request, from authentication to signed chain, by API and result.",
			Buckets: []float64{.0005, .001, .002, .003, .005, .0075, .01, .025, .05, .1, .25, 1},
		}, []string{"api", "result"}),
	}
	for _, col := range []prometheus.Collector{m.issued, m.denied, m.latency, authorityCollector{c}} {
		if err := reg.Register(col); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// authorityCollector reports the current authorities' expiry and the
// bundle sequence at scrape time, so that they follow every rotation.
type authorityCollector struct{ ca *ca.CA }

var (
	expiryDesc = prometheus.NewDesc("meshca_authority_expiry_timestamp_seconds",
		"NotAfter of each authority, as a Unix time: kind is root or issuer.",
		[]string{"kind", "serial"}, nil)
	sequenceDesc = prometheus.NewDesc("meshca_bundle_sequence",
		"Sequence number of the current trust bundle.", nil, nil)
)

func (authorityCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- expiryDesc
	ch <- sequenceDesc
}

func (a authorityCollector) Collect(ch chan<- prometheus.Metric) {
	set := a.ca.Authorities()
	for _, r := range set.Roots {
		ch <- prometheus.MustNewConstMetric(expiryDesc, prometheus.GaugeValue, float64(r.Cert.NotAfter.Unix()), "root", r.Cert.SerialNumber.Text(16))
	}
	iss := set.Issuer.Cert
	ch <- prometheus.MustNewConstMetric(expiryDesc, prometheus.GaugeValue, float64(iss.NotAfter.Unix()), "issuer", iss.SerialNumber.Text(16))
	ch <- prometheus.MustNewConstMetric(sequenceDesc, prometheus.GaugeValue, float64(set.Sequence))
}
