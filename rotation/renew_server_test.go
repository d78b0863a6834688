package rotation_test

import (
	"context"
	"crypto/x509"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/internal/server"
	"github.com/meshca/meshca/rotation"
)

// meshcaServer starts meshca's real server on loopback, on clk, with a
// bootstrap token for workloadID, and returns its address and CA. As in
// production, a caller's token is tried before its client certificate, so
// that a caller whose SVID the server refuses (under a retired root) can
// recover with its token.
func meshcaServer(t *testing.T, clk *timerClock) (string, *ca.CA) {
	t.Helper()
	return meshcaServerWithLimits(t, clk, server.Limits{})
}

// meshcaServerWithLimits is meshcaServer with limits.
func meshcaServerWithLimits(t *testing.T, clk *timerClock, limits server.Limits) (string, *ca.CA) {
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
		Limits:        limits,
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
		require.WithinDuration(t, leaf.NotBefore.Add(time.Duration(0.5*float64(leaf.NotAfter.Sub(leaf.NotBefore)))), tm.deadline, time.Nanosecond)
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

// TestRunRecoversFromARetiredRootAgainstMeshcaServer retires the root of
// the source's SVID at once against meshca's own server, which verifies a
// renewing SVID against its live bundle and refuses one under a root that
// left it: the CA moves to a new authority set whose only root is B. The
// bundle stream brings B, and the source, whose SVID under A no longer
// verifies, renews at once with the token instead of presenting an SVID
// the server would refuse; the renewal after that is over mTLS again.
func TestRunRecoversFromARetiredRootAgainstMeshcaServer(t *testing.T) {
	h := &sourceHarness{logs: &logRecorder{}, start: time.Now().Truncate(time.Second)}
	h.clock = newTimerClock(h.start)
	addr, c := meshcaServer(t, h.clock)
	bundleA, seqA := c.Bundle()
	src, err := rotation.NewSource(rotation.Options{
		ID:            workloadID,
		InitialBundle: bundleA,
		Token:         func(context.Context) (string, error) { return bootstrapToken, nil },
		TTL:           time.Hour,
		Clock:         h.clock,
		Rand:          zeroRand,
		Logger:        slog.New(h.logs.handler()),
	})
	require.NoError(t, err)
	h.src = src
	h.run(t, src.Dialer("passthrough:///"+addr, caServerID))
	h.clock.next(t) // the first SVID's renew point, half an hour away
	first := h.svid(t).Certificates[0]
	require.Eventually(t, func() bool { return src.BundleSequence() == seqA }, realTimeout, time.Millisecond, "the bundle watch runs")

	setB, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: sourceTD, Clock: h.clock})
	require.NoError(t, err)
	setB.Sequence = seqA + 1
	setB.Roots[0].BundleSequence = setB.Sequence
	require.NoError(t, c.SetAuthorities(setB))
	bundleB, seqB := c.Bundle()
	require.Equal(t, []*x509.Certificate{setB.Roots[0].Cert}, bundleB.X509Authorities())

	// Each attempt ends with a timer: the next renew point, or a retry.
	underB := func() bool {
		svid, err := src.GetX509SVID()
		if err != nil {
			return false
		}
		_, _, err = x509svid.Verify(svid.Certificates, bundleB, x509svid.WithTime(h.clock.Now()))
		return err == nil
	}
	tm := h.clock.next(t)
	for attempts := 1; !underB(); attempts++ {
		require.Less(t, attempts, 2, "no SVID under the new root after %d renew attempts", attempts)
		h.clock.fire(tm)
		tm = h.clock.next(t)
	}
	require.Equal(t, seqB, src.BundleSequence())
	second := h.svid(t).Certificates[0]
	require.NotEqual(t, first.SerialNumber, second.SerialNumber)

	// The next renewal presents the SVID under B.
	h.clock.fire(tm)
	h.clock.next(t)
	require.True(t, underB())
	issued := h.logs.find("X509-SVID issued")
	require.Len(t, issued, 3)
	require.Equal(t, []string{"token", "token", "mtls"}, []string{issued[0].attrs["method"], issued[1].attrs["method"], issued[2].attrs["method"]})
	require.Equal(t, second.SerialNumber.Text(16), issued[1].attrs["serial"])
}
