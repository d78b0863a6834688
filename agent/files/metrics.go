package files

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the writer's Prometheus metrics.
type metrics struct {
	writes   *prometheus.CounterVec
	commands *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		writes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_agent_files_writes_total",
			Help: "Generations of the certificate files written, by result (ok, error).",
		}, []string{"result"}),
		commands: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshca_agent_files_command_runs_total",
			Help: "Runs of the command after a change of the certificate files, by result (ok, failed, timeout).",
		}, []string{"result"}),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.writes, m.commands} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("files: registering metrics: %w", err)
		}
	}
	return m, nil
}
