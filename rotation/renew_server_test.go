package rotation_test

import (
	"context"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/internal/server"
	"github.com/meshca/meshca/rotation"
)

// meshcaServer starts meshca's real server on loopback, on clk, with a
// bootstrap token for workloadID, and returns its address and CA.
func meshcaServer(t *testing.T, clk *timerClock) (string, *ca.CA) {
	t.Helper()
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: sourceTD, Clock: clk})
	require.NoError(t, err)
	c, err := ca.New(set, ca.Options{Clock: clk})
	require.NoError(t, err)
	tokens, err := identity.NewStaticTokens(identity.TokenFile{Tokens: []identity.TokenFileEntry{
		{ID: workloadID.String(), Token: bootstrapToken},
	}}, sourceTD)
	require.NoError(t, err)
	srv, err := server.New(server.Options{
		CA:            c,
		Authenticator: identity.Chain(tokens, identity.NewSVIDAuthenticator(sourceTD, c, clk)),
		Logger:        slog.New(slog.DiscardHandler),
		Registerer:    prometheus.NewRegistry(),
	})
	require.NoError(t, err)
	serving, err := server.NewServingCert(c, caServerID, nil, nil, 24*time.Hour, clk)
	require.NoError(t, err)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	g := srv.GRPCServer(serving.TLSConfig())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = g.Serve(lis)
	}()
	t.Cleanup(func() {
		g.Stop()
		<-done
	})
	return lis.Addr().String(), c
}

// TestRunAgainstMeshcaServer runs the source against meshca's own server:
// the first SVID with the bootstrap token, every renewal over mTLS with
// the current SVID.
func TestRunAgainstMeshcaServer(t *testing.T) {
	h := &sourceHarness{logs: &logRecorder{}, start: time.Now().Truncate(time.Second)}
	h.clock = newTimerClock(h.start)
	addr, c := meshcaServer(t, h.clock)
	bundle, seq := c.Bundle()
	src, err := rotation.NewSource(rotation.Options{
		ID:            workloadID,
		InitialBundle: bundle,
		Token:         func(context.Context) (string, error) { return bootstrapToken, nil },
		TTL:           time.Hour,
		Clock:         h.clock,
		Rand:          zeroRand,
		Logger:        slog.New(h.logs.handler()),
	})
	require.NoError(t, err)
	h.src = src
	h.run(t, src.Dialer("passthrough:///"+addr, caServerID))

	var serials []string
	for range 4 {
		tm := h.clock.next(t)
		leaf := h.svid(t).Certificates[0]
		serials = append(serials, leaf.SerialNumber.Text(16))
		require.WithinDuration(t, leaf.NotBefore.Add(time.Duration(0.45*float64(leaf.NotAfter.Sub(leaf.NotBefore)))), tm.deadline, time.Nanosecond)
		h.clock.fire(tm)
	}
	h.clock.next(t)

	issued := h.logs.find("X509-SVID issued")
	require.Len(t, issued, 5)
	require.Equal(t, "token", issued[0].attrs["method"])
	for i, r := range issued[1:] {
		require.Equal(t, "mtls", r.attrs["method"], "renewal %d", i+1)
		require.NotContains(t, serials[:i+1], r.attrs["serial"], "renewal %d issued a new certificate", i+1)
	}
	require.Empty(t, h.logs.find("getting an X509-SVID failed"))
	require.Equal(t, seq, src.BundleSequence())
}
