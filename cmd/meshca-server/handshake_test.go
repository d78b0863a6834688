package main_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/rotation"
)

// workload is one mesh workload: a rotation.Source renewing its SVID from
// the server, a TLS server accepting its peers, and a client dialling them.
type workload struct {
	id     spiffeid.ID
	src    *rotation.Source
	lis    net.Listener
	served atomic.Int64
}

// handshakes counts the mTLS handshakes the workloads make with each
// other, and keeps every failure.
type handshakes struct {
	phase    atomic.Int32    // the rotation step the operator reached
	ok       [4]atomic.Int64 // handshakes completed in each phase
	mu       sync.Mutex
	failures []string
}

// The phases of the rotation, for counting handshakes in each.
var phases = [4]string{"before prepare", "prepared", "activated", "retired"}

func (h *handshakes) total() (n int64) {
	for i := range h.ok {
		n += h.ok[i].Load()
	}
	return n
}

func (h *handshakes) fail(format string, args ...any) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.failures = append(h.failures, fmt.Sprintf(format, args...))
}

// TestRotationWithZeroFailedHandshakes: 20 workloads renew through
// rotation.Source and keep opening mTLS connections to each other,
// authorising the peer by SPIFFE ID, while an operator prepares, activates
// and retires a root with meshctl and the intermediate rotates by itself.
// Not one handshake may fail, and no workload restarts.
func TestRotationWithZeroFailedHandshakes(t *testing.T) {
	if testing.Short() {
		t.Skip("runs for about 30s; skipped with -short")
	}
	const n = 20
	dir := t.TempDir()
	dataDir := filepath.Join(dir, "data")
	socket := filepath.Join(dataDir, "admin.sock")

	// 6s leaves (renewed every 3s); 12s intermediates, which rotate by
	// themselves every 6s (a successor is prepared at once, and takes over
	// with one leaf lifetime left).
	var tokens strings.Builder
	tokens.WriteString("tokens:\n")
	ids := make([]spiffeid.ID, n)
	for i := range ids {
		ids[i] = spiffeid.RequireFromPath(td, fmt.Sprintf("/ns/e2e/sa/w%02d", i))
		fmt.Fprintf(&tokens, "- id: %s\n  token: bootstrap-token-%02d-0123456789\n", ids[i], i)
	}
	tokenFile := filepath.Join(dir, "tokens.yaml")
	require.NoError(t, os.WriteFile(tokenFile, []byte(tokens.String()), 0o600))
	config := filepath.Join(dir, "config.yaml")
	require.NoError(t, os.WriteFile(config, []byte(`
leaf:
  defaultTTL: 6s
  maxTTL: 6s
authority:
  intermediateTTL: 12s
  rotationCheckInterval: 200ms
bootstrapTokens: `+tokenFile+"\n"), 0o600))

	srv, _ := startServer(t, "--config", config, "--data-dir", dataDir)
	initial, err := x509bundle.Load(td, filepath.Join(dataDir, "bundle.pem"))
	require.NoError(t, err)
	serverID := spiffeid.RequireFromPath(td, "/meshca/server")

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()

	workloads := make([]*workload, n)
	for i := range workloads {
		token := fmt.Sprintf("bootstrap-token-%02d-0123456789", i)
		src, err := rotation.NewSource(rotation.Options{
			ID:            ids[i],
			InitialBundle: initial,
			Token:         func(context.Context) (string, error) { return token, nil },
		})
		require.NoError(t, err)
		w := &workload{id: ids[i], src: src}
		wg.Go(func() { _ = src.Run(ctx, src.Dialer(srv.addr, serverID)) })
		readyCtx, readyCancel := context.WithTimeout(ctx, 20*time.Second)
		require.NoError(t, src.WaitUntilReady(readyCtx))
		readyCancel()
		w.lis, err = tls.Listen("tcp", "127.0.0.1:0", tlsconfig.MTLSServerConfig(src, src, tlsconfig.AuthorizeMemberOf(td)))
		require.NoError(t, err)
		wg.Go(func() { w.serve(ctx) })
		workloads[i] = w
	}

	var hs handshakes
	for i, w := range workloads {
		wg.Go(func() { w.dialPeers(ctx, workloads, i, &hs) })
	}

	// The operator's rotation, each step retried until the server allows
	// it: activate waits for every workload to hold the new root, retire
	// for the old root's last leaf to expire.
	time.Sleep(2 * time.Second)
	step := func(cmd string) {
		t.Helper()
		var lastErr string
		require.Eventually(t, func() bool {
			_, stderr, err := meshctl(t, "root", cmd, "--admin-socket", socket)
			lastErr = stderr
			return err == nil
		}, 40*time.Second, 250*time.Millisecond, "meshctl root %s never succeeded: %s", cmd, lastErr)
	}
	for i, cmd := range []string{"prepare", "activate", "retire"} {
		if cmd == "activate" {
			// Propagation is tracked: every workload reports, on its
			// next renewal, that it holds the prepared root.
			require.Eventually(t, func() bool {
				p := rootStatus(t, socket).GetPropagation()
				return p.GetWorkloadsSeen() == n && p.GetWorkloadsHolding() == n
			}, 30*time.Second, 200*time.Millisecond, "the workloads never all reported the prepared root")
		}
		step(cmd)
		hs.phase.Store(int32(i + 1))
	}
	time.Sleep(3 * time.Second) // handshakes on the new root alone
	cancel()
	wg.Wait()

	hs.mu.Lock()
	failures := hs.failures
	hs.mu.Unlock()
	require.Empty(t, failures, "%d failed handshakes", len(failures))
	for i, name := range phases {
		require.Positive(t, hs.ok[i].Load(), "no handshake completed while %s", name)
	}
	rotations := strings.Count(srv.logs.String(), `"step":"activate-intermediate"`)
	require.Positive(t, rotations, "the intermediate never rotated by itself during the test")
	t.Logf("%d handshakes between %d workloads (%d before prepare, %d prepared, %d activated, %d retired), none failed, across a root rotation and %d intermediate rotations",
		hs.total(), n, hs.ok[0].Load(), hs.ok[1].Load(), hs.ok[2].Load(), hs.ok[3].Load(), rotations)

	// Every workload ends with the new root alone, and a certificate under it.
	final := rootStatus(t, socket)
	require.Len(t, final.Roots, 1)
	for _, w := range workloads {
		require.Equal(t, final.BundleSequence, w.src.BundleSequence())
		svid, err := w.src.GetX509SVID()
		require.NoError(t, err)
		b, err := w.src.GetX509BundleForTrustDomain(td)
		require.NoError(t, err)
		require.Len(t, b.X509Authorities(), 1)
		require.Equal(t, final.Roots[0].Serial, b.X509Authorities()[0].SerialNumber.Text(16))
		_, _, err = x509svid.Verify(svid.Certificates, b)
		require.NoError(t, err)
		require.Positive(t, w.served.Load())
	}
	srv.stop()
}

// serve accepts peers, completes the handshake and echoes one byte.
func (w *workload) serve(ctx context.Context) {
	go func() { <-ctx.Done(); w.lis.Close() }()
	for {
		conn, err := w.lis.Accept()
		if err != nil {
			return
		}
		go func() {
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 1)
			if _, err := conn.Read(buf); err != nil {
				return
			}
			if _, err := conn.Write(buf); err == nil {
				w.served.Add(1)
			}
		}()
	}
}

// dialPeers opens a new mTLS connection to a random peer every 100ms,
// authorising exactly that peer's ID, until ctx is done.
func (w *workload) dialPeers(ctx context.Context, peers []*workload, self int, hs *handshakes) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		j := rand.IntN(len(peers) - 1)
		if j >= self {
			j++
		}
		peer := peers[j]
		cfg := tlsconfig.MTLSClientConfig(w.src, w.src, tlsconfig.AuthorizeID(peer.id))
		d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: cfg}
		conn, err := d.DialContext(ctx, "tcp", peer.lis.Addr().String())
		if err != nil {
			if ctx.Err() == nil {
				hs.fail("%s -> %s: handshake: %v", w.id, peer.id, err)
			}
			continue
		}
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		buf := []byte{1}
		_, err = conn.Write(buf)
		if err == nil {
			_, err = conn.Read(buf)
		}
		conn.Close()
		switch {
		case err == nil:
			hs.ok[hs.phase.Load()].Add(1)
		case ctx.Err() == nil:
			// With TLS 1.3 the server's verdict on the client's
			// certificate arrives with the first read.
			hs.fail("%s -> %s: exchange: %v", w.id, peer.id, err)
		}
	}
}
