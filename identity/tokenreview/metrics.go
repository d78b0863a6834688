package tokenreview

import "github.com/prometheus/client_golang/prometheus"

// The results of a review, as metric labels.
const (
	resultAccepted    = "accepted"
	resultRefused     = "refused"
	resultUnavailable = "unavailable"
	resultCancelled   = "cancelled"
)

type metrics struct {
	reviews    *prometheus.CounterVec
	cacheHits  prometheus.Counter
	overloaded prometheus.Counter
}

// newMetrics makes the metrics and registers them with reg, when not nil,
// along with gauges of the cache's size read through entries and of the
// reviews under way read through inFlight.
func newMetrics(reg prometheus.Registerer, entries, inFlight func() float64) (*metrics, error) {
	m := &metrics{
		reviews: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_tokenreview_reviews_total",
			Help: "TokenReviews sent to the Kubernetes API server, by result: accepted, refused, unavailable (error or no answer in time), or cancelled (every caller waiting for it left).",
		}, []string{"result"}),
		cacheHits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshca_tokenreview_cache_hits_total",
			Help: "Service-account tokens authenticated from the cache of accepted reviews, without a TokenReview.",
		}),
		overloaded: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshca_tokenreview_overloaded_total",
			Help: "Service-account tokens refused without a TokenReview because the most reviews allowed at once were under way.",
		}),
	}
	for _, r := range []string{resultAccepted, resultRefused, resultUnavailable, resultCancelled} {
		m.reviews.WithLabelValues(r)
	}
	if reg == nil {
		return m, nil
	}
	size := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "meshca_tokenreview_cache_entries",
		Help: "Accepted reviews in the cache, expired ones included until they are looked up or evicted.",
	}, entries)
	reviewing := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "meshca_tokenreview_in_flight",
		Help: "TokenReviews under way, at most the configured maximum; those whose callers all left count until they end.",
	}, inFlight)
	for _, c := range []prometheus.Collector{m.reviews, m.cacheHits, m.overloaded, size, reviewing} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
