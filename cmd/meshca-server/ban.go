package main

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshca/meshca/identity/ban"
)

// bansFile is the file of the bans in the data directory (embedded mode).
const bansFile = "bans.json"

// loadBans returns the emergency bans, loaded from their store: a Secret
// shared by the replicas in Kubernetes mode, else <dataDir>/bans.json. It
// fails when they cannot be loaded, and the server does not start: a CA
// that has forgotten a ban must not sign. The caller runs the Registry, so
// that it follows the other replicas' bans.
func loadBans(ctx context.Context, cfg *completeConfig, kube *kubeEnv, reg prometheus.Registerer, log *slog.Logger) (*ban.Registry, error) {
	var store ban.Store
	var err error
	if kube != nil {
		store, err = kube.banStore()
	} else {
		store, err = ban.NewFileStore(filepath.Join(cfg.DataDir, bansFile))
	}
	if err != nil {
		return nil, err
	}
	bans, err := ban.New(ctx, ban.Options{Store: store, TrustDomain: cfg.td, Logger: log, Registerer: reg})
	if err != nil {
		return nil, fmt.Errorf("emergency bans (refusing to start without them): %w", err)
	}
	return bans, nil
}
