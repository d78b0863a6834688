package main

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/internal/server"
)

// TestLimitsDefaultOff: with no limits block nothing is bounded per source
// or identity, so that `make run` and `meshctl bench` are never limited.
func TestLimitsDefaultOff(t *testing.T) {
	cc, err := Config{}.complete()
	require.NoError(t, err)
	require.Equal(t, server.Limits{}, cc.limits)
}

func TestLimitsConfigValues(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.yaml")
	require.NoError(t, os.WriteFile(path, []byte(`
limits:
  perSource: {rate: 20, burst: 200}
  perIdentity: {rate: 50}
  maxConnectionsPerSource: 64
  maxWatchStreamsPerSource: 8
  maxTrackedKeys: 5000
`), 0o600))
	cfg, err := loadConfig(path)
	require.NoError(t, err)
	cc, err := cfg.complete()
	require.NoError(t, err)
	require.Equal(t, server.Limits{
		PerSource:                server.Rate{PerSecond: 20, Burst: 200},
		PerIdentity:              server.Rate{PerSecond: 50},
		MaxConnectionsPerSource:  64,
		MaxWatchStreamsPerSource: 8,
		MaxTrackedKeys:           5000,
	}, cc.limits)
}

func TestLimitsConfigRefused(t *testing.T) {
	_, err := Config{Limits: LimitsConfig{
		PerSource:               RateConfig{Rate: -1},
		PerIdentity:             RateConfig{Burst: 10},
		MaxConnectionsPerSource: -2,
	}}.complete()
	require.EqualError(t, err, "config: limits.perSource.rate -1: want requests a second, 0 for no limit\n"+
		"limits.perIdentity.burst is set but rate is 0 (no limit): set a rate too\n"+
		"limits.maxConnectionsPerSource -2 must not be negative (0 is the default)")

	path := filepath.Join(t.TempDir(), "config.yaml")
	require.NoError(t, os.WriteFile(path, []byte("limits:\n  perSource: {rate: 1, brust: 2}\n"), 0o600))
	_, err = loadConfig(path)
	require.ErrorContains(t, err, `unknown field "brust"`)
}

// TestAdmissionConfig: admission is on by default (the zero
// server.Admission); the config sets every bound, and refuses nonsense.
func TestAdmissionConfig(t *testing.T) {
	cc, err := Config{}.complete()
	require.NoError(t, err)
	require.Equal(t, server.Admission{}, cc.admit)

	path := filepath.Join(t.TempDir(), "config.yaml")
	require.NoError(t, os.WriteFile(path, []byte(`
admission:
  maxInFlight: 16
  maxQueue: 1000
  maxWaitFirst: 3s
  maxWaitRenewal: 100ms
  maxHandshakes: 64
`), 0o600))
	cfg, err := loadConfig(path)
	require.NoError(t, err)
	cc, err = cfg.complete()
	require.NoError(t, err)
	require.Equal(t, server.Admission{MaxInFlight: 16, MaxQueue: 1000, MaxWaitFirst: 3 * time.Second, MaxWaitRenewal: 100 * time.Millisecond, MaxHandshakes: 64}, cc.admit)

	_, err = Config{Admission: AdmissionConfig{MaxInFlight: -2}}.complete()
	require.EqualError(t, err, "config: admission.maxInFlight -2: want a number of requests, 0 for the default or -1 for no bound")
	_, err = Config{Admission: AdmissionConfig{MaxWaitRenewal: Duration(-time.Second)}}.complete()
	require.ErrorContains(t, err, "admission.maxWaitFirst and admission.maxWaitRenewal must not be negative")
}
