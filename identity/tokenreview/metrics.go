package tokenreview

import "github.com/prometheus/client_golang/prometheus"

// The results of a review, as metric labels.
const (
	resultAccepted    = "accepted"
	resultRefused     = "refused"
	resultUnavailable = "unavailable"
)

type metrics struct {
	reviews   *prometheus.CounterVec
	cacheHits prometheus.Counter
}

// newMetrics makes the metrics and registers them with reg, when not nil,
// along with a gauge of the cache's size read through entries.
func newMetrics(reg prometheus.Registerer, entries func() float64) (*metrics, error) {
	m := &metrics{
		reviews: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_tokenreview_reviews_total",
			Help: "TokenReviews sent to the Kubernetes API server, by result: accepted, refused, or unavailable (error or no answer in time).",
		}, []string{"result"}),
		cacheHits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshca_tokenreview_cache_hits_total",
			Help: "Service-account tokens authenticated from the cache of accepted reviews, without a TokenReview.",
		}),
	}
	for _, r := range []string{resultAccepted, resultRefused, resultUnavailable} {
		m.reviews.WithLabelValues(r)
	}
	if reg == nil {
		return m, nil
	}
	size := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "meshca_tokenreview_cache_entries",
		Help: "Accepted reviews in the cache, expired ones included until they are looked up or evicted.",
	}, entries)
	for _, c := range []prometheus.Collector{m.reviews, m.cacheHits, size} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
