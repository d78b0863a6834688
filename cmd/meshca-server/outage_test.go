package main_test

import (
	"context"
	"crypto/tls"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/internal/testlog"
	"github.com/meshca/meshca/rotation"
)

// The phases of the outage, for counting handshakes in each.
const (
	outageBefore = iota
	outageDown
	outageAfter
)

// TestCAOutageOfHalfALeafLifetime: workloads (rotation.Source) keep doing
// mTLS with each other while meshca-server is killed (SIGKILL) and stays
// down for half a leaf lifetime, timed so that every workload's renew
// point falls inside the outage: each rides it out on the certificate it
// holds, renews once the server is back on the same address and data
// directory, and not one handshake fails.
//
// The workloads run rotation.Source's defaults: each renews at a point
// drawn from [0.40, 0.50] of its certificate's life, so even the
// worst-placed has half its life left when it first tries; and while it
// holds a certificate, no retry waits longer than a twentieth of the time
// that certificate has left, so each uses the restarted server well
// before its certificate expires.
func TestCAOutageOfHalfALeafLifetime(t *testing.T) {
	if testing.Short() {
		t.Skip("runs for about 45s; skipped with -short")
	}
	const (
		n          = 10
		ttl        = 30 * time.Second
		outage     = ttl / 2
		renewFrom  = rotation.DefaultRenewFraction - rotation.DefaultRenewJitter // the earliest renew point
		renewUntil = rotation.DefaultRenewFraction                               // the latest
	)
	dir := t.TempDir()
	dataDir := filepath.Join(dir, "data")
	ids := workloadIDs(td, "outage", n)
	config := filepath.Join(dir, "config.yaml")
	require.NoError(t, os.WriteFile(config, []byte(`
leaf:
  defaultTTL: 30s
  maxTTL: 30s
bootstrapTokens: `+writeBootstrapTokens(t, dir, ids)+"\n"), 0o600))

	srv, ready := startServer(t, "--config", config, "--data-dir", dataDir)
	addr := srv.addr
	initial, err := x509bundle.Load(td, filepath.Join(dataDir, "bundle.pem"))
	require.NoError(t, err)
	serverID := spiffeid.RequireFromPath(td, "/meshca/server")

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()

	// The workloads' logs tell how often they failed to renew.
	sourceLogs := &testlog.Buffer{}
	logger := slog.New(slog.NewJSONHandler(sourceLogs, nil))
	workloads := make([]*workload, n)
	for i := range workloads {
		token := bootstrapToken(i)
		src, err := rotation.NewSource(rotation.Options{
			ID:            ids[i],
			InitialBundle: initial,
			Token:         func(context.Context) (string, error) { return token, nil },
			Logger:        logger,
		})
		require.NoError(t, err)
		wg.Go(func() { _ = src.Run(ctx, src.Dialer(addr, serverID)) })
		readyCtx, readyCancel := context.WithTimeout(ctx, 20*time.Second)
		require.NoError(t, src.WaitUntilReady(readyCtx))
		readyCancel()
		w := &workload{id: ids[i], src: src}
		w.lis, err = tls.Listen("tcp", "127.0.0.1:0", tlsconfig.MTLSServerConfig(src, src, tlsconfig.AuthorizeMemberOf(td)))
		require.NoError(t, err)
		wg.Go(func() { w.serve(ctx) })
		workloads[i] = w
	}
	var hs handshakes
	for i, w := range workloads {
		wg.Go(func() { w.dialPeers(ctx, workloads, i, &hs) })
	}

	// Kill the server just before the earliest renew point of any
	// workload, so that every first renewal falls inside the outage.
	held := make([]*x509svid.SVID, n)
	killAt := time.Time{}
	for i, w := range workloads {
		svid, err := w.src.GetX509SVID()
		require.NoError(t, err)
		held[i] = svid
		leaf := svid.Certificates[0]
		at := leaf.NotBefore.Add(time.Duration(renewFrom * float64(leaf.NotAfter.Sub(leaf.NotBefore)))).Add(-500 * time.Millisecond)
		if killAt.IsZero() || at.Before(killAt) {
			killAt = at
		}
	}
	require.Eventually(t, func() bool { return hs.ok[outageBefore].Load() > 0 }, 20*time.Second, 10*time.Millisecond, "no handshake before the outage")
	time.Sleep(time.Until(killAt)) // the moment of the kill is the point of the test
	require.NoError(t, srv.cmd.Process.Signal(syscall.SIGKILL))
	killed := time.Now()
	srv.waitKilled()
	hs.phase.Store(outageDown)

	time.Sleep(outage - time.Since(killed)) // the outage itself
	failedBefore := strings.Count(sourceLogs.String(), `"msg":"getting an X509-SVID failed"`)
	srv, ready2 := startServer(t, "--config", config, "--data-dir", dataDir, "--listen", addr)
	down := time.Since(killed)
	hs.phase.Store(outageAfter)
	require.Equal(t, ready.RootSerial, ready2.RootSerial, "the restarted server has the same root")

	// Every workload was past its latest renew point when the server came
	// back, still holding the certificate it had at the kill.
	for i, w := range workloads {
		leaf := held[i].Certificates[0]
		latest := leaf.NotBefore.Add(time.Duration(renewUntil * float64(leaf.NotAfter.Sub(leaf.NotBefore))))
		require.True(t, killed.Add(down).After(latest), "%s: the outage ended before its renew point", w.id)
	}
	require.Positive(t, failedBefore, "no renewal was attempted during the outage")

	// Each renews with the restarted server...
	for i, w := range workloads {
		require.Eventually(t, func() bool {
			svid, err := w.src.GetX509SVID()
			return err == nil && svid.Certificates[0].SerialNumber.Cmp(held[i].Certificates[0].SerialNumber) != 0
		}, 20*time.Second, 20*time.Millisecond, "%s never renewed after the restart", w.id)
	}
	// ...and the mesh goes on for a while on the new certificates.
	afterRenewals := hs.ok[outageAfter].Load()
	require.Eventually(t, func() bool { return hs.ok[outageAfter].Load() >= afterRenewals+100 }, 30*time.Second, 20*time.Millisecond)
	cancel()
	wg.Wait()

	hs.mu.Lock()
	failures := hs.failures
	hs.mu.Unlock()
	require.Empty(t, failures, "%d failed handshakes", len(failures))
	for phase, name := range []string{"before the outage", "during the outage", "after the restart"} {
		require.Positive(t, hs.ok[phase].Load(), "no handshake completed %s", name)
	}
	for _, w := range workloads {
		svid, err := w.src.GetX509SVID()
		require.NoError(t, err)
		_, _, err = x509svid.Verify(svid.Certificates, initial)
		require.NoError(t, err)
		require.Positive(t, w.served.Load())
	}
	t.Logf("%d workloads, %s leaves, server down %s (killed, then restarted): %d handshakes (%d before, %d during the outage, %d after), 0 failed; %d renewal attempts failed while the server was down",
		n, ttl, down.Round(10*time.Millisecond), hs.total(), hs.ok[outageBefore].Load(), hs.ok[outageDown].Load(), hs.ok[outageAfter].Load(), failedBefore)
	srv.stop()
}
