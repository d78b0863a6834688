package rotation_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/filestore"
	"github.com/meshca/meshca/ca/vaultca"
	"github.com/meshca/meshca/internal/testlog"
	"github.com/meshca/meshca/internal/vaulttest"
	"github.com/meshca/meshca/rotation"
	"github.com/meshca/meshca/testca"
)

var vault vaulttest.Shared

func TestMain(m *testing.M) { vault.Run(m) }

var upTD = spiffeid.RequireTrustDomainFromString("upstream.test")

// Intermediates from Vault live 10 minutes (and 30 s backdated), and
// leaves 1 minute: a successor is prepared with 3m30s left and takes over
// with 1m45s left.
// Vault signs on the real clock, so each cluster's fake clock starts at
// the real time and only goes forward, by less than an intermediate's
// life.
const (
	upInterTTL = 10 * time.Minute
	upLeafTTL  = time.Minute
)

// vaultPKI is a PKI mount of its own with a root, and the policy a meshca
// server needs on it.
type vaultPKI struct {
	s      *vaulttest.Server
	mount  string
	root   vaulttest.Issuer
	policy string
}

func newVaultPKI(t *testing.T, s *vaulttest.Server) *vaultPKI {
	t.Helper()
	p := &vaultPKI{s: s, mount: s.NewPKIMount(t, "pki-rotation-")}
	p.root = s.GenerateRoot(t, p.mount, "meshca rotation root")
	p.policy = "meshca-" + p.mount
	s.PutPolicy(t, p.policy, fmt.Sprintf(`
path "%[1]s/root/sign-intermediate" { capabilities = ["update"] }
path "%[1]s/issuers"                { capabilities = ["list"] }
path "%[1]s/issuer/+/json"          { capabilities = ["read"] }
`, p.mount))
	return p
}

// upstream is a vaultca.Upstream with a token of its own.
func (p *vaultPKI) upstream(t *testing.T) *vaultca.Upstream {
	t.Helper()
	up, err := vaultca.New(vaultca.Config{
		Address: p.s.Addr,
		Mount:   p.mount,
		Auth:    vaultca.Auth{Token: p.s.CreateToken(t, []string{p.policy}, time.Hour)},
	})
	require.NoError(t, err)
	return up
}

// cluster is one cluster's CA, store and manager, with its intermediate
// from Vault.
type cluster struct {
	clock   *clocktesting.FakeClock
	store   *filestore.Store
	ca      *ca.CA
	manager *rotation.Manager
	reg     *prometheus.Registry
	logs    *testlog.Buffer
}

func newCluster(t *testing.T, up ca.Upstream) *cluster {
	t.Helper()
	c := &cluster{clock: clocktesting.NewFakeClock(time.Now()), reg: prometheus.NewRegistry(), logs: &testlog.Buffer{}}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("the manager's log, as the test failed:\n%s", c.logs)
		}
	})
	authOpts := ca.AuthorityOptions{TrustDomain: upTD, IntermediateTTL: upInterTTL, Clock: c.clock}
	var err error
	c.store, err = filestore.New(filepath.Join(t.TempDir(), "data"))
	require.NoError(t, err)
	set, err := ca.LoadOrCreateUpstream(context.Background(), c.store, authOpts, up)
	// Successors live a minute longer: Vault signs on the real clock, to
	// the second, and a successor asked for within the same second as the
	// first intermediate would not outlive it.
	successorOpts := authOpts
	successorOpts.IntermediateTTL += time.Minute
	require.NoError(t, err)
	c.ca, err = ca.New(set, ca.Options{Clock: c.clock, TTL: ca.TTLPolicy{Default: upLeafTTL, Max: upLeafTTL}})
	require.NoError(t, err)
	c.manager, err = rotation.NewManager(rotation.ManagerOptions{
		CA:              c.ca,
		Store:           c.store,
		Authority:       successorOpts,
		MaxLeafTTL:      upLeafTTL,
		Clock:           c.clock,
		CheckInterval:   time.Minute,
		Logger:          slog.New(slog.NewTextHandler(c.logs, nil)),
		Upstream:        up,
		UpstreamBackoff: rotation.Backoff{Initial: 10 * time.Second, Max: 30 * time.Second, Jitter: -1},
		Registerer:      c.reg,
	})
	require.NoError(t, err)
	return c
}

// svid issues an X509-SVID for id.
func (c *cluster) svid(t *testing.T, id spiffeid.ID) *x509svid.SVID {
	t.Helper()
	key := testca.NewKey(t)
	issued, err := c.ca.Sign(context.Background(), ca.SignRequest{PublicKey: key.Public(), ID: id})
	require.NoError(t, err)
	return &x509svid.SVID{ID: id, Certificates: issued.Chain, PrivateKey: key}
}

func (c *cluster) requireStored(t *testing.T) {
	t.Helper()
	stored, err := c.store.Load(context.Background())
	require.NoError(t, err)
	live := c.ca.Authorities()
	require.Equal(t, live.Sequence, stored.Sequence)
	require.Equal(t, live.Issuer.Cert.Raw, stored.Issuer.Cert.Raw)
	require.Len(t, stored.Roots, len(live.Roots))
	for i := range live.Roots {
		require.Equal(t, live.Roots[i].Cert.Raw, stored.Roots[i].Cert.Raw)
		require.Equal(t, live.Roots[i].State, stored.Roots[i].State)
	}
}

// requireRootStates checks the set's roots, in order, and their states.
func requireRootStates(t *testing.T, set *ca.AuthoritySet, want ...any) {
	t.Helper()
	require.Len(t, set.Roots, len(want)/2)
	for i := 0; i < len(want); i += 2 {
		r := set.Roots[i/2]
		require.Equal(t, want[i].(*x509.Certificate).Raw, r.Cert.Raw, "root %d is %q", i/2, r.Cert.Subject)
		require.Equal(t, want[i+1].(ca.RootState), r.State, "root %d", i/2)
	}
}

// mtlsEcho serves server's SVID, trusting serverBundle, to a client with
// client's SVID trusting clientBundle, and echoes a message over it.
func mtlsEcho(t *testing.T, server *x509svid.SVID, serverBundle *x509bundle.Bundle, client *x509svid.SVID, clientBundle *x509bundle.Bundle) {
	t.Helper()
	lis, err := tls.Listen("tcp", "127.0.0.1:0", tlsconfig.MTLSServerConfig(server, serverBundle, tlsconfig.AuthorizeID(client.ID)))
	require.NoError(t, err)
	defer lis.Close()
	served := make(chan error, 1)
	go func() {
		conn, err := lis.Accept()
		if err != nil {
			served <- err
			return
		}
		defer conn.Close()
		_, err = io.CopyN(conn, conn, 4)
		served <- err
	}()
	conn, err := tls.Dial("tcp", lis.Addr().String(), tlsconfig.MTLSClientConfig(client, clientBundle, tlsconfig.AuthorizeID(server.ID)))
	require.NoError(t, err)
	defer conn.Close()
	_, err = conn.Write([]byte("ping"))
	require.NoError(t, err)
	buf := make([]byte, 4)
	_, err = io.ReadFull(conn, buf)
	require.NoError(t, err)
	require.Equal(t, "ping", string(buf))
	require.NoError(t, <-served)
}

// Two clusters of one trust domain take their intermediates from one Vault
// root: each one's workloads verify the other's, and mTLS works both ways.
func TestUpstreamTwoClusters(t *testing.T) {
	p := newVaultPKI(t, vault.Server(t))
	east := newCluster(t, p.upstream(t))
	west := newCluster(t, p.upstream(t))

	eastSet, westSet := east.ca.Authorities(), west.ca.Authorities()
	require.NotEqual(t, eastSet.Issuer.Cert.Raw, westSet.Issuer.Cert.Raw, "an intermediate each, with a key each")
	for _, set := range []*ca.AuthoritySet{eastSet, westSet} {
		requireRootStates(t, set, p.root.Cert, ca.RootActive)
		require.Nil(t, set.Roots[0].Signer, "Vault's root key is not held here")
		require.NoError(t, set.Issuer.Cert.CheckSignatureFrom(p.root.Cert))
	}

	eastID := spiffeid.RequireFromPath(upTD, "/ns/shop/sa/frontend")
	westID := spiffeid.RequireFromPath(upTD, "/ns/shop/sa/backend")
	eastSVID, westSVID := east.svid(t, eastID), west.svid(t, westID)
	eastBundle, _ := east.ca.Bundle()
	westBundle, _ := west.ca.Bundle()
	_, _, err := x509svid.Verify(eastSVID.Certificates, westBundle)
	require.NoError(t, err)
	_, _, err = x509svid.Verify(westSVID.Certificates, eastBundle)
	require.NoError(t, err)

	t.Run("east serves west", func(t *testing.T) { mtlsEcho(t, eastSVID, eastBundle, westSVID, westBundle) })
	t.Run("west serves east", func(t *testing.T) { mtlsEcho(t, westSVID, westBundle, eastSVID, eastBundle) })
}

// waitStatus waits until the manager's upstream status satisfies ok: Run
// records each check there.
func waitStatus(t *testing.T, m *rotation.Manager, ok func(rotation.UpstreamStatus) bool) rotation.UpstreamStatus {
	t.Helper()
	var st rotation.UpstreamStatus
	require.Eventually(t, func() bool {
		st, _ = m.UpstreamStatus()
		return ok(st)
	}, time.Minute, time.Millisecond)
	return st
}

// waitWaiters waits until n timers and tickers wait on the fake clock:
// Run has reached its select.
func waitWaiters(t *testing.T, c *clocktesting.FakeClock, n int) {
	t.Helper()
	require.Eventually(t, func() bool { return c.Waiters() == n }, time.Minute, time.Millisecond)
}

// Vault stopped: the CA goes on signing with its intermediate, the manager
// reports the upstream unavailable and retries with backoff; Vault back,
// the next retry gets the successor, which then takes over.
func TestUpstreamOutage(t *testing.T) {
	s := vaulttest.Start(t)
	p := newVaultPKI(t, s)
	c := newCluster(t, p.upstream(t))
	first := c.ca.Authorities()

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = c.manager.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	start := c.clock.Now()
	st := waitStatus(t, c.manager, func(st rotation.UpstreamStatus) bool { return !st.NextAttempt.IsZero() })
	require.True(t, st.Available)
	require.Equal(t, start, st.LastSuccess)
	require.Equal(t, start.Add(time.Minute), st.NextAttempt, "the next check")
	require.Equal(t, fmt.Sprintf("Vault at %s, PKI mount %q", s.Addr, p.mount), st.Upstream)
	waitWaiters(t, c.clock, 1)

	s.Stop(t)
	// Past the prepare point (3m30s left of 10m30s): the check needs Vault.
	c.clock.Step(7 * time.Minute)
	failedAt := c.clock.Now()
	st = waitStatus(t, c.manager, func(st rotation.UpstreamStatus) bool {
		return st.ConsecutiveFailures == 1 && st.NextAttempt.After(failedAt)
	})
	require.False(t, st.Available)
	require.Equal(t, failedAt, st.LastFailure)
	require.Equal(t, failedAt.Add(10*time.Second), st.NextAttempt, "retried after UpstreamBackoff.Initial")
	require.Contains(t, st.LastError, "vaultca: listing the issuers: Vault at "+s.Addr+" cannot be reached: ca: the upstream authority is unavailable")

	// The CA signs with its intermediate all the while.
	leaf := c.svid(t, spiffeid.RequireFromPath(upTD, "/ns/shop/sa/outage"))
	require.Equal(t, first.Issuer.Cert.Raw, leaf.Certificates[1].Raw)
	require.Nil(t, c.ca.Authorities().NextIssuer)

	// It says so in its log and its metrics.
	require.Eventually(t, func() bool {
		return strings.Contains(c.logs.String(), `level=WARN msg="the upstream authority failed; signing goes on with the current intermediate; will retry"`)
	}, time.Minute, time.Millisecond)
	require.Contains(t, c.logs.String(), "retry_in=10s")
	require.Equal(t, 0.0, gauge(t, c.reg, "meshca_upstream_available"))
	require.Equal(t, 1.0, gauge(t, c.reg, "meshca_upstream_consecutive_failures"))
	require.Equal(t, float64(failedAt.Add(10*time.Second).Unix()), gauge(t, c.reg, "meshca_upstream_next_attempt_timestamp_seconds"))

	// The retry fails too, and waits twice as long.
	waitWaiters(t, c.clock, 2) // the ticker and the retry timer
	c.clock.Step(10 * time.Second)
	st = waitStatus(t, c.manager, func(st rotation.UpstreamStatus) bool { return st.ConsecutiveFailures == 2 })
	require.Equal(t, c.clock.Now().Add(20*time.Second), st.NextAttempt)

	// Vault back: the next retry prepares the successor.
	s.Restart(t)
	waitWaiters(t, c.clock, 2)
	c.clock.Step(20 * time.Second)
	st = waitStatus(t, c.manager, func(st rotation.UpstreamStatus) bool { return st.Available })
	require.Equal(t, c.clock.Now(), st.LastSuccess)
	require.Zero(t, st.ConsecutiveFailures)
	require.Eventually(t, func() bool { return c.ca.Authorities().NextIssuer != nil }, time.Minute, time.Millisecond)
	require.Equal(t, 1.0, gauge(t, c.reg, "meshca_upstream_available"))

	// ... which takes over at its time, under the same root.
	waitWaiters(t, c.clock, 1)
	c.clock.Step(time.Minute + 30*time.Second)
	require.Eventually(t, func() bool {
		return !bytes.Equal(c.ca.Authorities().Issuer.Cert.Raw, first.Issuer.Cert.Raw)
	}, time.Minute, time.Millisecond)
	renewed := c.ca.Authorities()
	require.NoError(t, renewed.Issuer.Cert.CheckSignatureFrom(p.root.Cert))
	require.Equal(t, first.Sequence, renewed.Sequence, "the bundle is the same")
	c.requireStored(t)
}

// gauge is the value of the gauge name in reg.
func gauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	families, err := reg.Gather()
	require.NoError(t, err)
	for _, f := range families {
		if f.GetName() == name {
			require.Len(t, f.Metric, 1)
			return f.Metric[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

// A root added in Vault joins the bundle; made the default, the next
// intermediate chains to it; deleted in Vault, the old root leaves the
// bundle once no leaf under it can be valid.
func TestUpstreamRootRotation(t *testing.T) {
	s := vault.Server(t)
	p := newVaultPKI(t, s)
	c := newCluster(t, p.upstream(t))
	ctx := context.Background()
	r1 := p.root.Cert
	first := c.ca.Authorities()
	_, _, changed := c.ca.WatchBundle()

	require.NoError(t, c.manager.RotateIntermediates(ctx))
	require.Same(t, first, c.ca.Authorities(), "nothing changed in Vault, nothing here")

	r2 := s.RotateRoot(t, p.mount, "meshca rotation root 2")
	require.NoError(t, c.manager.RotateIntermediates(ctx))
	prepared := c.ca.Authorities()
	require.Equal(t, first.Sequence+1, prepared.Sequence)
	requireRootStates(t, prepared, r1, ca.RootActive, r2.Cert, ca.RootPrepared)
	require.Equal(t, prepared.Sequence, prepared.Roots[1].BundleSequence)
	require.True(t, closed(changed), "bundle watchers are told")
	require.Equal(t, first.Issuer.Cert.Raw, prepared.Issuer.Cert.Raw, "the issuer is the same")
	c.requireStored(t)
	oldLeaf := c.svid(t, spiffeid.RequireFromPath(upTD, "/ns/shop/sa/old"))

	// Made the default in Vault: the operator's rotation takes an
	// intermediate under it now.
	s.SetDefaultIssuer(t, p.mount, r2.ID)
	res, err := c.manager.RotateIntermediate(ctx, rotation.OpOptions{})
	require.NoError(t, err)
	require.True(t, res.Applied)
	require.Contains(t, res.Summary, "which becomes active")
	switched := c.ca.Authorities()
	require.NoError(t, switched.Issuer.Cert.CheckSignatureFrom(r2.Cert))
	requireRootStates(t, switched, r1, ca.RootRetiring, r2.Cert, ca.RootActive)
	require.Equal(t, prepared.Sequence, switched.Sequence, "the bundle is the same")
	c.requireStored(t)
	newLeaf := c.svid(t, spiffeid.RequireFromPath(upTD, "/ns/shop/sa/new"))
	bundle, _ := c.ca.Bundle()
	for _, leaf := range []*x509svid.SVID{oldLeaf, newLeaf} {
		_, _, err := x509svid.Verify(leaf.Certificates, bundle)
		require.NoError(t, err)
	}

	// Deleted in Vault, the old root stays while leaves under it live...
	s.DeleteIssuer(t, p.mount, p.root.ID)
	require.NoError(t, c.manager.RotateIntermediates(ctx))
	requireRootStates(t, c.ca.Authorities(), r1, ca.RootRetiring, r2.Cert, ca.RootActive)

	// ... and leaves the bundle after them.
	c.clock.Step(upLeafTTL)
	require.NoError(t, c.manager.RotateIntermediates(ctx))
	gone := c.ca.Authorities()
	requireRootStates(t, gone, r2.Cert, ca.RootActive)
	require.Equal(t, switched.Sequence+1, gone.Sequence)
	require.Empty(t, gone.RetiringIssuers)
	c.requireStored(t)
}

// With Vault, an operator's root steps are refused, saying how roots are
// rotated in Vault; Force does not override it.
func TestUpstreamRefusesRootSteps(t *testing.T) {
	p := newVaultPKI(t, vault.Server(t))
	c := newCluster(t, p.upstream(t))
	ctx := context.Background()
	for _, step := range []struct {
		name string
		op   func(context.Context, rotation.OpOptions) (rotation.Result, error)
	}{
		{"prepare-root", c.manager.PrepareRoot},
		{"activate-root", c.manager.ActivateRoot},
		{"retire-root", c.manager.RetireRoot},
	} {
		t.Run(step.name, func(t *testing.T) {
			_, err := step.op(ctx, rotation.OpOptions{Force: true})
			var refused *rotation.RefusedError
			require.ErrorAs(t, err, &refused)
			require.False(t, refused.Overridable)
			require.EqualError(t, err, fmt.Sprintf("rotation: %s refused: roots are managed in Vault (%s): "+
				"add a root with `vault write %s/root/rotate/internal common_name=...` (it joins the trust bundle at the next check), "+
				"make it the default issuer with `vault write %s/root/replace default=<issuer>` once every workload holds it "+
				"(the next intermediate chains to it; `meshctl intermediate rotate` takes one now), "+
				"and delete the old issuer with `vault delete %s/issuer/<ref>` (it leaves the bundle once no live leaf needs it)",
				step.name, p.s.Addr, p.mount, p.mount, p.mount))
		})
	}
}

// The first start needs Vault; a restart with saved state does not.
func TestUpstreamFirstStart(t *testing.T) {
	s := vaulttest.Start(t)
	p := newVaultPKI(t, s)
	up := p.upstream(t)
	store, err := filestore.New(filepath.Join(t.TempDir(), "data"))
	require.NoError(t, err)
	opts := ca.AuthorityOptions{TrustDomain: upTD, IntermediateTTL: upInterTTL}
	ctx := context.Background()

	s.Stop(t)
	_, err = ca.LoadOrCreateUpstream(ctx, store, opts, up)
	require.ErrorIs(t, err, ca.ErrUpstreamUnavailable)
	require.ErrorContains(t, err, "ca: no authorities are saved yet and the upstream's roots cannot be read: vaultca: ")
	require.ErrorContains(t, err, "Vault at "+s.Addr+" cannot be reached: ca: the upstream authority is unavailable")

	s.Restart(t)
	set, err := ca.LoadOrCreateUpstream(ctx, store, opts, up)
	require.NoError(t, err)

	s.Stop(t)
	again, err := ca.LoadOrCreateUpstream(ctx, store, opts, up)
	require.NoError(t, err)
	require.Equal(t, set.Issuer.Cert.Raw, again.Issuer.Cert.Raw)
	c, err := ca.New(again, ca.Options{})
	require.NoError(t, err)
	_, err = c.Sign(ctx, ca.SignRequest{PublicKey: testca.NewKey(t).Public(), ID: spiffeid.RequireFromPath(upTD, "/ns/a/sa/b")})
	require.NoError(t, err)
}
