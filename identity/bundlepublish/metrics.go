package bundlepublish

import (
	"maps"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/apimachinery/pkg/labels"
)

type metrics struct {
	syncs *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer, p *Publisher) (*metrics, error) {
	m := &metrics{
		syncs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_bundle_configmap_syncs_total",
			Help: "Namespaces checked by the trust bundle publisher, by result: created, updated, deleted, unchanged, " +
				"skipped (namespace gone, terminating or opted out), not_ours (a ConfigMap of the name without meshca's label), " +
				"newer_sequence (the ConfigMap holds a later bundle than this replica), conflict (retried), error (retried).",
		}, []string{"result"}),
	}
	for _, col := range []prometheus.Collector{m.syncs, namespaceCollector{p}} {
		if err := reg.Register(col); err != nil {
			return nil, err
		}
	}
	return m, nil
}

var namespacesDesc = prometheus.NewDesc("meshca_bundle_configmap_namespaces",
	"Namespaces by the state of their trust bundle ConfigMap: current (holds the current bundle and federated bundles), "+
		"pending (should and does not yet), opted_out. Reported by the replica that publishes only.",
	[]string{"state"}, nil)

// namespaceCollector counts namespaces at scrape time from the running
// publisher's caches, so that the count follows every event.
type namespaceCollector struct{ p *Publisher }

func (namespaceCollector) Describe(ch chan<- *prometheus.Desc) { ch <- namespacesDesc }

func (c namespaceCollector) Collect(ch chan<- prometheus.Metric) {
	c.p.mu.Lock()
	r := c.p.cur
	c.p.mu.Unlock()
	if r == nil {
		return // not running: another replica publishes
	}
	want, err := c.p.desired()
	if err != nil {
		return // nothing can be published
	}
	nss, err := r.namespaces.List(labels.Everything())
	if err != nil {
		return
	}
	var current, pending, optedOut int
	for _, ns := range nss {
		switch {
		case terminating(ns):
			continue
		case c.p.optedOut(ns):
			optedOut++
			continue
		}
		cm, err := r.configMaps.ConfigMaps(ns.Name).Get(c.p.name)
		if err == nil && ours(cm) && maps.Equal(cm.Data, want.data) {
			current++
		} else {
			pending++
		}
	}
	ch <- prometheus.MustNewConstMetric(namespacesDesc, prometheus.GaugeValue, float64(current), "current")
	ch <- prometheus.MustNewConstMetric(namespacesDesc, prometheus.GaugeValue, float64(pending), "pending")
	ch <- prometheus.MustNewConstMetric(namespacesDesc, prometheus.GaugeValue, float64(optedOut), "opted_out")
}
