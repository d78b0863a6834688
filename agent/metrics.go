package agent

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshca/meshca/rotation"
)

// registerMetrics registers the state of src on reg: when the served SVID
// expires, and the bundle sequence held. Nil reg registers nothing.
func registerMetrics(reg prometheus.Registerer, src *rotation.Source) error {
	if reg == nil {
		return nil
	}
	collectors := []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "meshca_agent_svid_expiry_timestamp_seconds",
			Help: "When the served X509-SVID expires (Unix time); 0 while there is no valid one. Alert when it comes near: renewals are failing.",
		}, func() float64 {
			svid, err := src.GetX509SVID()
			if err != nil {
				return 0
			}
			return float64(svid.Certificates[0].NotAfter.Unix())
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "meshca_agent_bundle_sequence",
			Help: "The sequence number of the trust bundle held; 0 for the initial bundle.",
		}, func() float64 { return float64(src.BundleSequence()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "meshca_agent_federated_bundles",
			Help: "The number of federated trust domains whose bundles are held.",
		}, func() float64 { return float64(len(src.FederatedBundles())) }),
	}
	for _, c := range collectors {
		if err := reg.Register(c); err != nil {
			return fmt.Errorf("agent: registering metrics: %w", err)
		}
	}
	return nil
}
