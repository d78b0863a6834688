package ca_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/filestore"
	"github.com/meshca/meshca/testca"
)

// fakeUpstream signs intermediates with a testca root, as an upstream CA
// would, and lets a test spoil what it returns.
type fakeUpstream struct {
	signer *testca.CA              // signs
	roots  []*x509.Certificate     // Roots returns these
	err    error                   // every call fails with it
	edit   func(*x509.Certificate) // changes the template
	chain  func([]*x509.Certificate) []*x509.Certificate
	pub    any // signs this key instead of the CSR's
	ttls   []time.Duration
}

func (f *fakeUpstream) Roots(context.Context) ([]*x509.Certificate, error) {
	if f.err != nil {
		return nil, f.err
	}
	return f.roots, nil
}

func (f *fakeUpstream) SignIntermediate(_ context.Context, der []byte, ttl time.Duration) ([]*x509.Certificate, error) {
	if f.err != nil {
		return nil, f.err
	}
	f.ttls = append(f.ttls, ttl)
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, err
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, err
	}
	now := time.Now()
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
	if tmpl.NotAfter.After(f.signer.Cert.NotAfter) {
		tmpl.NotAfter = f.signer.Cert.NotAfter
	}
	if f.edit != nil {
		f.edit(tmpl)
	}
	pub := csr.PublicKey
	if f.pub != nil {
		pub = f.pub
	}
	raw, err := x509.CreateCertificate(rand.Reader, tmpl, f.signer.Cert, pub, f.signer.Key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(raw)
	if err != nil {
		return nil, err
	}
	chain := []*x509.Certificate{cert, f.signer.Cert}
	if f.chain != nil {
		chain = f.chain(chain)
	}
	return chain, nil
}

var _ ca.Upstream = (*fakeUpstream)(nil)

func newFakeUpstream(t *testing.T) *fakeUpstream {
	root := testca.New(t, td, testca.WithLifetime(time.Now().Add(-time.Hour), time.Now().Add(30*24*time.Hour)))
	return &fakeUpstream{signer: root, roots: []*x509.Certificate{root.Cert}}
}

func upstreamOptions() ca.AuthorityOptions {
	return ca.AuthorityOptions{TrustDomain: td, IntermediateTTL: 24 * time.Hour}
}

func TestNewUpstreamIntermediate(t *testing.T) {
	up := newFakeUpstream(t)
	inter, err := ca.NewUpstreamIntermediate(context.Background(), upstreamOptions(), up, up.roots)
	require.NoError(t, err)

	require.Equal(t, []time.Duration{24 * time.Hour}, up.ttls, "the TTL asked for")
	require.Same(t, up.signer.Cert, inter.Root)
	require.NoError(t, inter.Cert.CheckSignatureFrom(up.signer.Cert))
	requireSameKey(t, inter.Cert.PublicKey, inter.Signer.Public(), "the key made here")
	require.Equal(t, []string{"meshca"}, inter.Cert.Subject.Organization)
	require.Regexp(t, `^meshca intermediate example\.org [0-9a-f]{8}$`, inter.Cert.Subject.CommonName)
	require.Len(t, inter.Cert.URIs, 1)
	require.Equal(t, "spiffe://example.org", inter.Cert.URIs[0].String())

	// The CA signs with it.
	set := &ca.AuthoritySet{TrustDomain: td, Sequence: 1, Issuer: inter.Authority,
		Roots: []ca.Root{{Authority: ca.Authority{Cert: inter.Root}, State: ca.RootActive}}}
	c, err := ca.New(set, ca.Options{})
	require.NoError(t, err)
	issued, err := c.Sign(context.Background(), ca.SignRequest{PublicKey: testca.NewKey(t).Public(), ID: td.ID()})
	require.NoError(t, err)
	require.NoError(t, issued.Cert.CheckSignatureFrom(inter.Cert))
}

func TestNewUpstreamIntermediateChecks(t *testing.T) {
	other := testca.New(t, td)
	middle := other.ChildCA()
	unavailable := fmt.Errorf("fake: down: %w", ca.ErrUpstreamUnavailable)
	tests := []struct {
		name  string
		spoil func(*fakeUpstream)
		want  string
	}{
		{
			name:  "upstream fails",
			spoil: func(f *fakeUpstream) { f.err = unavailable },
			want:  "fake: down: ca: the upstream authority is unavailable",
		},
		{
			name:  "chain without the root",
			spoil: func(f *fakeUpstream) { f.chain = func(c []*x509.Certificate) []*x509.Certificate { return c[:1] } },
			want:  "ca: the upstream returned a chain of 1 certificates; want the intermediate and the root that signed it (meshca's intermediates are signed by a root)",
		},
		{
			name: "not a CA",
			spoil: func(f *fakeUpstream) {
				f.edit = func(c *x509.Certificate) {
					c.IsCA, c.KeyUsage, c.MaxPathLenZero = false, x509.KeyUsageDigitalSignature, false
				}
			},
			want: "ca: the upstream's intermediate: ca: issuer certificate is not a CA with keyCertSign",
		},
		{
			name:  "another key",
			spoil: func(f *fakeUpstream) { f.pub = testca.NewKey(t).Public() },
			want:  "ca: the upstream's intermediate: ca: issuer key does not match the issuer certificate",
		},
		{
			name: "another trust domain",
			spoil: func(f *fakeUpstream) {
				f.edit = func(c *x509.Certificate) { c.URIs = []*url.URL{{Scheme: "spiffe", Host: "other.org"}} }
			},
			want: `ca: the upstream's intermediate has URI SANs ["spiffe://other.org"]; want only "spiffe://example.org"`,
		},
		{
			name:  "signed by an intermediate",
			spoil: func(f *fakeUpstream) { f.signer, f.roots = middle, []*x509.Certificate{other.Cert} },
			want:  `ca: the upstream signed the intermediate with "CN=testca intermediate 1,O=testca", which is not a root; meshca's intermediates are signed by a root`,
		},
		{
			name: "chain names a root that did not sign",
			spoil: func(f *fakeUpstream) {
				f.chain = func(c []*x509.Certificate) []*x509.Certificate { return []*x509.Certificate{c[0], other.Cert} }
			},
			want: "ca: the upstream's intermediate is not signed by the root it names: x509: ECDSA verification failure",
		},
		{
			name:  "root not among the upstream's",
			spoil: func(f *fakeUpstream) { f.roots = []*x509.Certificate{other.Cert} },
			want:  `ca: the upstream's intermediate chains to "CN=testca root,O=testca", which is not one of its roots`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			up := newFakeUpstream(t)
			tt.spoil(up)
			_, err := ca.NewUpstreamIntermediate(context.Background(), upstreamOptions(), up, up.roots)
			require.EqualError(t, err, tt.want)
		})
	}
}

// upstreamSet is an authority set whose issuer is signed by active, with
// the roots given in their states.
func upstreamSet(t *testing.T, active *testca.CA, roots ...ca.Root) *ca.AuthoritySet {
	t.Helper()
	issuer := active.ChildCA()
	return &ca.AuthoritySet{TrustDomain: td, Sequence: 3, Roots: roots, Issuer: ca.Authority{Cert: issuer.Cert, Signer: issuer.Key}}
}

func root(c *testca.CA, state ca.RootState, seq uint64) ca.Root {
	return ca.Root{Authority: ca.Authority{Cert: c.Cert}, State: state, BundleSequence: seq}
}

type rootState struct {
	cert  *x509.Certificate
	state ca.RootState
	seq   uint64
}

func requireRoots(t *testing.T, set *ca.AuthoritySet, want ...rootState) {
	t.Helper()
	require.Len(t, set.Roots, len(want))
	for i, w := range want {
		require.True(t, bytes.Equal(w.cert.Raw, set.Roots[i].Cert.Raw), "root %d is %q", i, set.Roots[i].Cert.Subject)
		require.Equal(t, w.state, set.Roots[i].State, "root %d", i)
		require.Equal(t, w.seq, set.Roots[i].BundleSequence, "root %d", i)
	}
}

func TestWithUpstreamRoots(t *testing.T) {
	now := time.Now()
	r1 := testca.New(t, td)
	r2 := testca.New(t, td)
	r3 := testca.New(t, td)
	certs := func(cs ...*testca.CA) []*x509.Certificate {
		var out []*x509.Certificate
		for _, c := range cs {
			out = append(out, c.Cert)
		}
		return out
	}

	t.Run("unchanged", func(t *testing.T) {
		set := upstreamSet(t, r1, root(r1, ca.RootActive, 1), root(r2, ca.RootPrepared, 2))
		got, changed, err := set.WithUpstreamRoots(certs(r2, r1), now)
		require.NoError(t, err)
		require.False(t, changed)
		require.Equal(t, uint64(3), got.Sequence)
		requireRoots(t, got, rootState{r1.Cert, ca.RootActive, 1}, rootState{r2.Cert, ca.RootPrepared, 2})
	})
	t.Run("a root added upstream is prepared", func(t *testing.T) {
		set := upstreamSet(t, r1, root(r1, ca.RootActive, 1))
		got, changed, err := set.WithUpstreamRoots(certs(r1, r2), now)
		require.NoError(t, err)
		require.True(t, changed)
		require.Equal(t, uint64(4), got.Sequence)
		requireRoots(t, got, rootState{r1.Cert, ca.RootActive, 1}, rootState{r2.Cert, ca.RootPrepared, 4})
		require.Equal(t, now, got.Roots[1].Since)
		require.NoError(t, got.Validate(now))
		require.Len(t, set.Roots, 1, "the set given is not changed")
	})
	t.Run("a root removed upstream leaves", func(t *testing.T) {
		set := upstreamSet(t, r1, root(r1, ca.RootActive, 1), root(r2, ca.RootPrepared, 2), root(r3, ca.RootPrepared, 3))
		got, changed, err := set.WithUpstreamRoots(certs(r1, r3), now)
		require.NoError(t, err)
		require.True(t, changed)
		require.Equal(t, uint64(4), got.Sequence)
		requireRoots(t, got, rootState{r1.Cert, ca.RootActive, 1}, rootState{r3.Cert, ca.RootPrepared, 3})
	})
	t.Run("the issuer's root stays active when removed upstream", func(t *testing.T) {
		set := upstreamSet(t, r1, root(r1, ca.RootActive, 1), root(r2, ca.RootPrepared, 2))
		got, changed, err := set.WithUpstreamRoots(certs(r2), now)
		require.NoError(t, err)
		require.False(t, changed)
		requireRoots(t, got, rootState{r1.Cert, ca.RootActive, 1}, rootState{r2.Cert, ca.RootPrepared, 2})
	})
	t.Run("a root with live leaves retires, then leaves", func(t *testing.T) {
		// r2 signs now; r1 signed the former issuer, whose leaves live
		// for another hour.
		set := upstreamSet(t, r2, root(r1, ca.RootActive, 1), root(r2, ca.RootPrepared, 2))
		set.RetiringIssuers = []ca.RetiringIssuer{{Cert: r1.ChildCA().Cert, LeavesUntil: now.Add(time.Hour)}}
		got, changed, err := set.WithUpstreamRoots(certs(r2), now)
		require.NoError(t, err)
		require.True(t, changed)
		require.Equal(t, uint64(3), got.Sequence, "the bundle is the same")
		requireRoots(t, got, rootState{r1.Cert, ca.RootRetiring, 1}, rootState{r2.Cert, ca.RootActive, 2})
		require.NoError(t, got.Validate(now))

		later := now.Add(time.Hour)
		got, changed, err = got.WithUpstreamRoots(certs(r2), later)
		require.NoError(t, err)
		require.True(t, changed)
		require.Equal(t, uint64(4), got.Sequence)
		requireRoots(t, got, rootState{r2.Cert, ca.RootActive, 2})
	})
	t.Run("a root still upstream with live leaves retires, then is prepared", func(t *testing.T) {
		set := upstreamSet(t, r2, root(r1, ca.RootActive, 1), root(r2, ca.RootPrepared, 2))
		set.RetiringIssuers = []ca.RetiringIssuer{{Cert: r1.ChildCA().Cert, LeavesUntil: now.Add(time.Hour)}}
		got, _, err := set.WithUpstreamRoots(certs(r1, r2), now)
		require.NoError(t, err)
		requireRoots(t, got, rootState{r1.Cert, ca.RootRetiring, 1}, rootState{r2.Cert, ca.RootActive, 2})
		got, _, err = got.WithUpstreamRoots(certs(r1, r2), now.Add(time.Hour))
		require.NoError(t, err)
		requireRoots(t, got, rootState{r1.Cert, ca.RootPrepared, 1}, rootState{r2.Cert, ca.RootActive, 2})
	})
	t.Run("no roots", func(t *testing.T) {
		set := upstreamSet(t, r1, root(r1, ca.RootActive, 1))
		_, _, err := set.WithUpstreamRoots(nil, now)
		require.EqualError(t, err, "ca: the upstream reports no roots")
	})
	t.Run("the issuer chains to no root", func(t *testing.T) {
		set := upstreamSet(t, r3, root(r1, ca.RootActive, 1))
		_, _, err := set.WithUpstreamRoots(certs(r1, r2), now)
		require.EqualError(t, err, "ca: the issuer chains to none of the set's roots nor of the upstream's")
	})
	t.Run("an upstream root that is not self-signed", func(t *testing.T) {
		set := upstreamSet(t, r1, root(r1, ca.RootActive, 1))
		_, _, err := set.WithUpstreamRoots(append(certs(r1), r2.ChildCA().Cert), now)
		require.EqualError(t, err, `ca: the upstream's root "CN=testca intermediate 1,O=testca" is not a self-signed CA certificate`)
	})
}

func TestLoadOrCreateUpstream(t *testing.T) {
	ctx := context.Background()
	newStore := func(t *testing.T) *filestore.Store {
		s, err := filestore.New(filepath.Join(t.TempDir(), "data"))
		require.NoError(t, err)
		return s
	}

	t.Run("first start", func(t *testing.T) {
		up := newFakeUpstream(t)
		other := testca.New(t, td)
		up.roots = append(up.roots, other.Cert)
		store := newStore(t)
		set, err := ca.LoadOrCreateUpstream(ctx, store, upstreamOptions(), up)
		require.NoError(t, err)
		require.Equal(t, uint64(1), set.Sequence)
		requireRoots(t, set, rootState{up.signer.Cert, ca.RootActive, 1}, rootState{other.Cert, ca.RootPrepared, 1})
		require.NoError(t, set.Issuer.Cert.CheckSignatureFrom(up.signer.Cert))
		stored, err := store.Load(ctx)
		require.NoError(t, err)
		require.Equal(t, set.Issuer.Cert.Raw, stored.Issuer.Cert.Raw, "saved before it is returned")

		// Restarted while the upstream is down: the saved set serves.
		up.err = fmt.Errorf("fake: %w", ca.ErrUpstreamUnavailable)
		again, err := ca.LoadOrCreateUpstream(ctx, store, upstreamOptions(), up)
		require.NoError(t, err)
		require.Equal(t, set.Issuer.Cert.Raw, again.Issuer.Cert.Raw)
	})
	t.Run("first start with the upstream down", func(t *testing.T) {
		up := newFakeUpstream(t)
		up.err = fmt.Errorf("fake: connection refused: %w", ca.ErrUpstreamUnavailable)
		store := newStore(t)
		_, err := ca.LoadOrCreateUpstream(ctx, store, upstreamOptions(), up)
		require.ErrorIs(t, err, ca.ErrUpstreamUnavailable)
		require.EqualError(t, err, "ca: no authorities are saved yet and the upstream's roots cannot be read: fake: connection refused: ca: the upstream authority is unavailable")
		_, err = store.Load(ctx)
		require.ErrorIs(t, err, ca.ErrNotFound, "nothing saved")
	})
	t.Run("expired issuer", func(t *testing.T) {
		up := newFakeUpstream(t)
		store := newStore(t)
		set, err := ca.LoadOrCreateUpstream(ctx, store, upstreamOptions(), up)
		require.NoError(t, err)
		later := clocktesting.NewFakePassiveClock(set.Issuer.Cert.NotAfter.Add(time.Second))
		opts := upstreamOptions()
		opts.Clock = later
		// The fake signs on the real clock; the new issuer must be valid
		// at the later time.
		opts.IntermediateTTL = 48 * time.Hour

		up.err = errors.New("fake: down")
		_, err = ca.LoadOrCreateUpstream(ctx, store, opts, up)
		require.EqualError(t, err, fmt.Sprintf("ca: the saved issuer expired at %s and the upstream's roots cannot be read: fake: down",
			set.Issuer.Cert.NotAfter.UTC().Format(time.RFC3339)))

		up.err = nil
		renewed, err := ca.LoadOrCreateUpstream(ctx, store, opts, up)
		require.NoError(t, err)
		require.NotEqual(t, set.Issuer.Cert.Raw, renewed.Issuer.Cert.Raw)
		require.Equal(t, set.Sequence, renewed.Sequence, "the bundle is the same")
		stored, err := store.Load(ctx)
		require.NoError(t, err)
		require.Equal(t, renewed.Issuer.Cert.Raw, stored.Issuer.Cert.Raw)
	})
	t.Run("another trust domain", func(t *testing.T) {
		up := newFakeUpstream(t)
		store := newStore(t)
		_, err := ca.LoadOrCreateUpstream(ctx, store, upstreamOptions(), up)
		require.NoError(t, err)
		opts := upstreamOptions()
		opts.TrustDomain = otherTD
		_, err = ca.LoadOrCreateUpstream(ctx, store, opts, up)
		require.EqualError(t, err, `ca: stored authorities are for trust domain "example.org", configured is "other.org"; a trust domain cannot be renamed in place`)
	})
}
