package rotation_test

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"math/big"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"k8s.io/utils/clock"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/rotation"
	"github.com/meshca/meshca/testca"
)

// fakeUpstream signs intermediates with a testca root on the manager's
// clock, as an upstream CA would, and fails while err is set.
type fakeUpstream struct {
	root  *testca.CA
	clock clock.PassiveClock
	err   error
}

func (f *fakeUpstream) Roots(context.Context) ([]*x509.Certificate, error) {
	if f.err != nil {
		return nil, f.err
	}
	return []*x509.Certificate{f.root.Cert}, nil
}

func (f *fakeUpstream) SignIntermediate(_ context.Context, der []byte, ttl time.Duration) ([]*x509.Certificate, error) {
	if f.err != nil {
		return nil, f.err
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, err
	}
	now := f.clock.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(now.UnixNano()),
		Subject:               csr.Subject,
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(ttl),
		URIs:                  csr.URIs,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	raw, err := x509.CreateCertificate(rand.Reader, tmpl, f.root.Cert, csr.PublicKey, f.root.Key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(raw)
	if err != nil {
		return nil, err
	}
	return []*x509.Certificate{cert, f.root.Cert}, nil
}

// withUpstream replaces the fixture's manager by one with a fake upstream
// whose root is valid around the fixture's time.
func (f *managerFixture) withUpstream(t *testing.T) *fakeUpstream {
	t.Helper()
	now := f.clock.Now()
	up := &fakeUpstream{root: testca.New(t, authTD, testca.WithLifetime(now.Add(-time.Hour), now.Add(10*24*time.Hour))), clock: f.clock}
	var err error
	f.manager, err = rotation.NewManager(rotation.ManagerOptions{
		CA:         f.ca,
		Store:      f.store,
		Authority:  ca.AuthorityOptions{TrustDomain: authTD, IntermediateTTL: interTTL, Clock: f.clock},
		MaxLeafTTL: leafTTL,
		Clock:      f.clock,
		AfterSave:  func(s rotation.Step) { f.saved = append(f.saved, s) },
		Upstream:   up,
	})
	require.NoError(t, err)
	return up
}

// A CA that signed under its own root moves to an upstream's: the
// upstream's root joins the bundle, the next intermediate comes from the
// upstream and is served cross-signed by the old root, which leaves the
// bundle once its leaves have expired.
func TestUpstreamTakesOverFromSelfSigned(t *testing.T) {
	f := newManagerFixture(t)
	ctx := context.Background()
	own := f.ca.Authorities().Roots[0].Cert
	up := f.withUpstream(t)

	require.NoError(t, f.manager.RotateIntermediates(ctx))
	joined := f.ca.Authorities()
	requireRootStates(t, joined, own, ca.RootActive, up.root.Cert, ca.RootPrepared)
	require.Equal(t, uint64(2), joined.Sequence)
	require.Equal(t, []rotation.Step{rotation.StepUpstreamRoots}, f.saved)

	// At the prepare point, the upstream's intermediate takes over at
	// once: it is under another root.
	f.clock.Step(8 * time.Hour)
	oldLeaf := f.leaf(t)
	require.NoError(t, f.manager.RotateIntermediates(ctx))
	moved := f.ca.Authorities()
	require.Equal(t, rotation.StepActivateRoot, f.saved[len(f.saved)-1])
	require.NoError(t, moved.Issuer.Cert.CheckSignatureFrom(up.root.Cert))
	requireRootStates(t, moved, own, ca.RootRetiring, up.root.Cert, ca.RootActive)
	require.Equal(t, joined.Sequence, moved.Sequence)
	require.Len(t, moved.Chain, 1, "the upstream's root, cross-signed by the old one")
	require.NoError(t, moved.Chain[0].CheckSignatureFrom(own))
	f.requireStored(t)

	// New leaves verify for peers that trust either root; old ones still
	// verify too.
	newLeaf := f.leaf(t)
	for name, bundle := range map[string][]*x509.Certificate{"old root only": {own}, "upstream root only": {up.root.Cert}} {
		_, _, err := x509svid.Verify(newLeaf.Chain, bundleOf(bundle...), x509svid.WithTime(f.clock.Now()))
		require.NoError(t, err, name)
	}
	_, _, err := x509svid.Verify(oldLeaf.Chain, bundleOf(own), x509svid.WithTime(f.clock.Now()))
	require.NoError(t, err)

	// Once the old issuer's leaves have expired, the old root leaves the
	// bundle, and its cross-signature the chain.
	f.clock.Step(leafTTL)
	require.NoError(t, f.manager.RotateIntermediates(ctx))
	gone := f.ca.Authorities()
	requireRootStates(t, gone, up.root.Cert, ca.RootActive)
	require.Equal(t, moved.Sequence+1, gone.Sequence)
	require.Empty(t, gone.Chain)
	require.Empty(t, gone.RetiringIssuers)
	f.requireStored(t)

	_, err = f.manager.PrepareRoot(ctx, rotation.OpOptions{})
	require.EqualError(t, err, "rotation: prepare-root refused: roots are managed by the upstream authority (*rotation_test.fakeUpstream); rotate them there, and the trust bundle follows")
}

// With the upstream down, a successor prepared earlier still takes over,
// and the error says the upstream is unavailable.
func TestUpstreamDownPreparedSuccessorTakesOver(t *testing.T) {
	f := newManagerFixture(t)
	ctx := context.Background()
	up := f.withUpstream(t)
	require.NoError(t, f.manager.RotateIntermediates(ctx))

	// Under the upstream's root first (a takeover at the prepare point),
	// then a successor from it at the next prepare point.
	f.clock.Step(8 * time.Hour)
	require.NoError(t, f.manager.RotateIntermediates(ctx))
	f.clock.Step(8 * time.Hour)
	require.NoError(t, f.manager.RotateIntermediates(ctx))
	prepared := f.ca.Authorities()
	require.NotNil(t, prepared.NextIssuer)

	up.err = fmt.Errorf("fake: %w", ca.ErrUpstreamUnavailable)
	f.clock.Step(2 * time.Hour)
	err := f.manager.RotateIntermediates(ctx)
	require.ErrorIs(t, err, ca.ErrUpstreamUnavailable)
	require.EqualError(t, err, "rotation: reading the upstream's roots: fake: ca: the upstream authority is unavailable")
	require.Equal(t, prepared.NextIssuer.Cert.Raw, f.ca.Authorities().Issuer.Cert.Raw, "took over without the upstream")
	f.requireStored(t)

	st, ok := f.manager.UpstreamStatus()
	require.True(t, ok)
	require.False(t, st.Available)
	require.Equal(t, 1, st.ConsecutiveFailures)
	require.Equal(t, "fake: ca: the upstream authority is unavailable", st.LastError)
}
