package ca_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/testca"
)

var (
	oidExtSAN = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidExtEKU = asn1.ObjectIdentifier{2, 5, 29, 37}
)

// testNow is a whole second, as certificates encode time, close to the real
// time, as testca's defaults are.
func testNow() time.Time { return time.Now().UTC().Truncate(time.Second) }

// newIssuer returns an intermediate under a new root, both valid from an
// hour before now; the intermediate for a week, the root for a year.
func newIssuer(t *testing.T, now time.Time, opts ...testca.Option) *testca.CA {
	t.Helper()
	root := testca.New(t, td, testca.WithLifetime(now.Add(-time.Hour), now.Add(365*24*time.Hour)))
	opts = append([]testca.Option{testca.WithLifetime(now.Add(-time.Hour), now.Add(7*24*time.Hour))}, opts...)
	return root.ChildCA(opts...)
}

func fakeClock(now time.Time) *clocktesting.FakePassiveClock {
	return clocktesting.NewFakePassiveClock(now)
}

func newCA(t *testing.T, set *ca.AuthoritySet, clk *clocktesting.FakePassiveClock, ttl ca.TTLPolicy) *ca.CA {
	t.Helper()
	c, err := ca.New(set, ca.Options{Clock: clk, TTL: ttl})
	require.NoError(t, err)
	return c
}

func sign(t *testing.T, c *ca.CA, req ca.SignRequest) *ca.Issued {
	t.Helper()
	issued, err := c.Sign(context.Background(), req)
	require.NoError(t, err)
	return issued
}

func findExtension(cert *x509.Certificate, id asn1.ObjectIdentifier) (ext struct{ Found, Critical bool }) {
	for _, e := range cert.Extensions {
		if e.Id.Equal(id) {
			ext.Found, ext.Critical = true, e.Critical
		}
	}
	return ext
}

func TestSignProfile(t *testing.T) {
	now := testNow()
	inter := newIssuer(t, now)
	clk := clocktesting.NewFakePassiveClock(now)
	c := newCA(t, inter.AuthoritySet(), clk, ca.TTLPolicy{})
	bundle, seq := c.Bundle()
	require.Equal(t, uint64(1), seq)

	tests := []struct {
		name      string
		key       crypto.Signer
		wantUsage x509.KeyUsage
	}{
		{name: "ECDSA P-256", key: testca.NewKey(t), wantUsage: x509.KeyUsageDigitalSignature},
		{name: "ECDSA P-384", key: ecKey(t, elliptic.P384()), wantUsage: x509.KeyUsageDigitalSignature},
		{name: "RSA 2048", key: rsaKey(t, 2048), wantUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			issued := sign(t, c, ca.SignRequest{PublicKey: tt.key.Public(), ID: workloadID})
			cert := issued.Cert

			require.Equal(t, 3, cert.Version)
			require.Len(t, cert.URIs, 1)
			require.Equal(t, workloadID.String(), cert.URIs[0].String())
			require.Empty(t, cert.DNSNames)
			require.Empty(t, cert.IPAddresses)
			require.Empty(t, cert.EmailAddresses)

			require.True(t, cert.BasicConstraintsValid)
			require.False(t, cert.IsCA)
			require.Equal(t, tt.wantUsage, cert.KeyUsage)
			require.Zero(t, cert.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign))
			require.Equal(t, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}, cert.ExtKeyUsage)
			require.Empty(t, cert.UnknownExtKeyUsage)

			// The X509-SVID profile marks keyUsage and basicConstraints
			// critical; with an empty subject, RFC 5280 makes the SAN
			// critical too.
			require.Empty(t, cert.Subject.Names)
			require.Equal(t, struct{ Found, Critical bool }{true, true}, findExtension(cert, oidKeyUsage), "keyUsage")
			require.Equal(t, struct{ Found, Critical bool }{true, true}, findExtension(cert, oidBasicConstraints), "basicConstraints")
			require.Equal(t, struct{ Found, Critical bool }{true, true}, findExtension(cert, oidExtSAN), "subjectAltName")
			require.True(t, findExtension(cert, oidExtEKU).Found, "extKeyUsage")

			require.True(t, tt.key.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(cert.PublicKey), "certificate is for another key")
			require.Equal(t, inter.Cert.RawSubject, cert.RawIssuer)
			require.NoError(t, cert.CheckSignatureFrom(inter.Cert))

			require.Equal(t, now.Add(-ca.Backdate), cert.NotBefore)
			require.Equal(t, now.Add(time.Hour), cert.NotAfter)

			require.Len(t, issued.Chain, 2)
			require.Same(t, cert, issued.Chain[0])
			require.Equal(t, inter.Cert.Raw, issued.Chain[1].Raw)
			require.Equal(t, uint64(1), issued.BundleSequence)

			id, chains, err := x509svid.Verify(issued.Chain, bundle, x509svid.WithTime(now))
			require.NoError(t, err)
			require.Equal(t, workloadID, id)
			require.Len(t, chains, 1)
			require.Len(t, chains[0], 3)
			require.Equal(t, inter.Root().Cert.Raw, chains[0][2].Raw)

			// The CA is itself a bundle source.
			id, _, err = x509svid.Verify(issued.Chain, c, x509svid.WithTime(now))
			require.NoError(t, err)
			require.Equal(t, workloadID, id)
		})
	}
}

func TestSignExtraSANs(t *testing.T) {
	now := testNow()
	c := newCA(t, newIssuer(t, now).AuthoritySet(), clocktesting.NewFakePassiveClock(now), ca.TTLPolicy{})
	issued := sign(t, c, ca.SignRequest{
		PublicKey:   testca.NewKey(t).Public(),
		ID:          workloadID,
		DNSNames:    []string{"web.default.svc"},
		IPAddresses: []net.IP{net.ParseIP("10.0.0.1")},
	})
	require.Len(t, issued.Cert.URIs, 1)
	require.Equal(t, workloadID.String(), issued.Cert.URIs[0].String())
	require.Equal(t, []string{"web.default.svc"}, issued.Cert.DNSNames)
	require.Len(t, issued.Cert.IPAddresses, 1)
	require.True(t, issued.Cert.IPAddresses[0].Equal(net.ParseIP("10.0.0.1")))
}

func TestSignValidity(t *testing.T) {
	now := testNow()
	tests := []struct {
		name          string
		policy        ca.TTLPolicy
		requested     time.Duration
		issuerEndsIn  time.Duration // zero: a week
		wantExpiresIn time.Duration
		wantClamped   bool // Issued.TTLClamped
	}{
		{name: "default TTL", requested: 0, wantExpiresIn: time.Hour},
		{name: "negative request gets the default", requested: -time.Hour, wantExpiresIn: time.Hour},
		{name: "requested TTL", requested: 2 * time.Hour, wantExpiresIn: 2 * time.Hour},
		{name: "requested the maximum", requested: 24 * time.Hour, wantExpiresIn: 24 * time.Hour},
		{name: "clamped at 24h", requested: 48 * time.Hour, wantExpiresIn: 24 * time.Hour, wantClamped: true},
		{
			name:          "custom default",
			policy:        ca.TTLPolicy{Default: 10 * time.Minute, Max: 30 * time.Minute},
			requested:     0,
			wantExpiresIn: 10 * time.Minute,
		},
		{
			name:          "custom maximum",
			policy:        ca.TTLPolicy{Default: 10 * time.Minute, Max: 30 * time.Minute},
			requested:     time.Hour,
			wantExpiresIn: 30 * time.Minute,
			wantClamped:   true,
		},
		{
			name:          "clamped to the issuer's end",
			requested:     time.Hour,
			issuerEndsIn:  10 * time.Minute,
			wantExpiresIn: 10 * time.Minute,
			wantClamped:   true,
		},
		{
			name:          "default clamped to the issuer's end",
			requested:     0,
			issuerEndsIn:  time.Second,
			wantExpiresIn: time.Second,
		},
		{
			name:          "issuer ending just after the TTL does not clamp",
			requested:     time.Hour,
			issuerEndsIn:  time.Hour + time.Second,
			wantExpiresIn: time.Hour,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var opts []testca.Option
			if tt.issuerEndsIn != 0 {
				opts = append(opts, testca.WithLifetime(now.Add(-time.Hour), now.Add(tt.issuerEndsIn)))
			}
			inter := newIssuer(t, now, opts...)
			clk := clocktesting.NewFakePassiveClock(now)
			c := newCA(t, inter.AuthoritySet(), clk, tt.policy)
			issued := sign(t, c, ca.SignRequest{PublicKey: testca.NewKey(t).Public(), ID: workloadID, TTL: tt.requested})

			// Backdated 30s, or a tenth of the lifetime when that is less.
			require.Equal(t, now.Add(-min(ca.Backdate, tt.wantExpiresIn/10)).Truncate(time.Second), issued.Cert.NotBefore, "certificates hold whole seconds")
			require.Equal(t, now.Add(tt.wantExpiresIn), issued.Cert.NotAfter)
			require.False(t, issued.Cert.NotAfter.After(inter.Cert.NotAfter))
			require.Equal(t, tt.wantExpiresIn, issued.TTL, "the TTL granted")
			require.Equal(t, tt.wantClamped, issued.TTLClamped)

			_, _, err := x509svid.Verify(issued.Chain, inter.Bundle(), x509svid.WithTime(now))
			require.NoError(t, err)
		})
	}
}

func TestSignSerials(t *testing.T) {
	now := testNow()
	c := newCA(t, newIssuer(t, now).AuthoritySet(), clocktesting.NewFakePassiveClock(now), ca.TTLPolicy{})
	pub := testca.NewKey(t).Public()
	limit := new(big.Int).Lsh(big.NewInt(1), 128)

	const n = 100
	seen := make(map[string]bool, n)
	for range n {
		serial := sign(t, c, ca.SignRequest{PublicKey: pub, ID: workloadID}).Cert.SerialNumber
		require.Positive(t, serial.Sign(), "serial %s is not positive", serial)
		require.LessOrEqual(t, serial.BitLen(), 128, "serial %s is longer than 128 bits", serial)
		require.Negative(t, serial.Cmp(limit))
		require.False(t, seen[serial.String()], "serial %s issued twice", serial)
		seen[serial.String()] = true
	}
	require.Len(t, seen, n)
}

func TestSignRefusals(t *testing.T) {
	now := testNow()

	t.Run("ID of another trust domain", func(t *testing.T) {
		c := newCA(t, newIssuer(t, now).AuthoritySet(), clocktesting.NewFakePassiveClock(now), ca.TTLPolicy{})
		issued, err := c.Sign(context.Background(), ca.SignRequest{
			PublicKey: testca.NewKey(t).Public(),
			ID:        spiffeid.RequireFromPath(otherTD, "/ns/default/sa/web"),
		})
		require.EqualError(t, err, `ca: cannot sign "spiffe://other.org/ns/default/sa/web": not in trust domain "example.org"`)
		require.Nil(t, issued)
	})

	t.Run("zero ID", func(t *testing.T) {
		c := newCA(t, newIssuer(t, now).AuthoritySet(), clocktesting.NewFakePassiveClock(now), ca.TTLPolicy{})
		_, err := c.Sign(context.Background(), ca.SignRequest{PublicKey: testca.NewKey(t).Public()})
		require.Error(t, err)
	})

	t.Run("cancelled context", func(t *testing.T) {
		c := newCA(t, newIssuer(t, now).AuthoritySet(), clocktesting.NewFakePassiveClock(now), ca.TTLPolicy{})
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		issued, err := c.Sign(ctx, ca.SignRequest{PublicKey: testca.NewKey(t).Public(), ID: workloadID})
		require.ErrorIs(t, err, context.Canceled)
		require.Nil(t, issued)
	})

	t.Run("unsupported public key", func(t *testing.T) {
		c := newCA(t, newIssuer(t, now).AuthoritySet(), clocktesting.NewFakePassiveClock(now), ca.TTLPolicy{})
		_, err := c.Sign(context.Background(), ca.SignRequest{PublicKey: "not a key", ID: workloadID})
		require.ErrorContains(t, err, `ca: signing "spiffe://example.org/ns/default/sa/web": `)
	})

	t.Run("issuer expired after New", func(t *testing.T) {
		inter := newIssuer(t, now, testca.WithLifetime(now.Add(-time.Hour), now.Add(time.Hour)))
		clk := clocktesting.NewFakePassiveClock(now)
		c := newCA(t, inter.AuthoritySet(), clk, ca.TTLPolicy{})

		// A second before the end the CA still signs, up to the end.
		clk.SetTime(inter.Cert.NotAfter.Add(-time.Second))
		issued := sign(t, c, ca.SignRequest{PublicKey: testca.NewKey(t).Public(), ID: workloadID})
		require.Equal(t, inter.Cert.NotAfter, issued.Cert.NotAfter)

		for _, at := range []time.Time{inter.Cert.NotAfter, inter.Cert.NotAfter.Add(time.Hour)} {
			clk.SetTime(at)
			issued, err := c.Sign(context.Background(), ca.SignRequest{PublicKey: testca.NewKey(t).Public(), ID: workloadID})
			require.ErrorIs(t, err, ca.ErrNoIssuer)
			require.EqualError(t, err, fmt.Sprintf("ca: no valid issuing authority: the issuer expired at %s", inter.Cert.NotAfter.UTC()))
			require.Nil(t, issued)
		}
	})
}

func TestNew(t *testing.T) {
	now := testNow()

	t.Run("default TTL longer than the maximum", func(t *testing.T) {
		_, err := ca.New(newIssuer(t, now).AuthoritySet(), ca.Options{
			Clock: clocktesting.NewFakePassiveClock(now),
			TTL:   ca.TTLPolicy{Default: 2 * time.Hour, Max: time.Hour},
		})
		require.EqualError(t, err, "ca: default TTL 2h0m0s is longer than the maximum 1h0m0s")
	})

	t.Run("expired issuer", func(t *testing.T) {
		inter := newIssuer(t, now)
		_, err := ca.New(inter.AuthoritySet(), ca.Options{Clock: clocktesting.NewFakePassiveClock(inter.Cert.NotAfter)})
		require.ErrorContains(t, err, "ca: issuer certificate is not valid now")
	})

	t.Run("real clock by default", func(t *testing.T) {
		// testca's defaults are relative to the real time: an issuer valid
		// from an hour ago for a day.
		inter := testca.New(t, td).ChildCA()
		c, err := ca.New(inter.AuthoritySet(), ca.Options{})
		require.NoError(t, err)
		require.Equal(t, td, c.TrustDomain())
		issued := sign(t, c, ca.SignRequest{PublicKey: testca.NewKey(t).Public(), ID: workloadID})
		_, _, err = x509svid.Verify(issued.Chain, inter.Bundle())
		require.NoError(t, err)
		require.Equal(t, ca.DefaultTTL+ca.Backdate, issued.Cert.NotAfter.Sub(issued.Cert.NotBefore))
	})
}

func TestGetX509BundleForTrustDomain(t *testing.T) {
	now := testNow()
	inter := newIssuer(t, now)
	c := newCA(t, inter.AuthoritySet(), clocktesting.NewFakePassiveClock(now), ca.TTLPolicy{})

	b, err := c.GetX509BundleForTrustDomain(td)
	require.NoError(t, err)
	require.True(t, b.Equal(inter.Bundle()))

	_, err = c.GetX509BundleForTrustDomain(otherTD)
	require.EqualError(t, err, `ca: no bundle for trust domain "other.org"`)
}

func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func TestSetAuthorities(t *testing.T) {
	now := testNow()

	// setup returns a CA on a first root, and a set under a second root.
	setup := func(t *testing.T) (*ca.CA, *testca.CA, *testca.CA) {
		first := newIssuer(t, now)
		second := newIssuer(t, now)
		return newCA(t, first.AuthoritySet(), clocktesting.NewFakePassiveClock(now), ca.TTLPolicy{}), first, second
	}

	t.Run("the sequence never goes back", func(t *testing.T) {
		c, first, _ := setup(t)
		up := first.AuthoritySet()
		up.Sequence = 5
		require.NoError(t, c.SetAuthorities(up))
		down := first.AuthoritySet()
		down.Sequence = 2
		require.EqualError(t, c.SetAuthorities(down), "ca: bundle sequence 2 would go back from 5")
		_, seq := c.Bundle()
		require.Equal(t, uint64(5), seq)
	})

	t.Run("new roots without a higher sequence are refused", func(t *testing.T) {
		for _, seq := range []uint64{0, 1} {
			c, first, second := setup(t)
			_, _, changed := c.WatchBundle()
			set := second.AuthoritySet()
			set.Sequence = seq

			err := c.SetAuthorities(set)
			want := "ca: bundle changed but sequence 1 is not above 1"
			if seq == 0 {
				want = "ca: bundle sequence 0 would go back from 1"
			}
			require.EqualError(t, err, want)
			require.False(t, closed(changed))
			b, gotSeq := c.Bundle()
			require.True(t, b.Equal(first.Bundle()))
			require.Equal(t, uint64(1), gotSeq)
			require.Equal(t, first.Cert.Raw, c.Authorities().Issuer.Cert.Raw)
		}
	})

	t.Run("new roots with a higher sequence", func(t *testing.T) {
		c, first, second := setup(t)
		oldBundle, oldSeq, changed := c.WatchBundle()
		require.Equal(t, uint64(1), oldSeq)
		require.True(t, oldBundle.Equal(first.Bundle()))
		require.False(t, closed(changed))

		set := second.AuthoritySet()
		set.Sequence = 2
		require.NoError(t, c.SetAuthorities(set))
		require.True(t, closed(changed), "the channel from before the change is not closed")

		b, seq := c.Bundle()
		require.Equal(t, uint64(2), seq)
		require.True(t, b.Equal(second.Bundle()))
		require.Same(t, set, c.Authorities())

		b, seq, next := c.WatchBundle()
		require.Equal(t, uint64(2), seq)
		require.True(t, b.Equal(second.Bundle()))
		require.False(t, closed(next), "the new channel is already closed")

		issued := sign(t, c, ca.SignRequest{PublicKey: testca.NewKey(t).Public(), ID: workloadID})
		require.Equal(t, uint64(2), issued.BundleSequence)
		require.Equal(t, second.Cert.Raw, issued.Chain[1].Raw)
		_, _, err := x509svid.Verify(issued.Chain, b, x509svid.WithTime(now))
		require.NoError(t, err)
		_, _, err = x509svid.Verify(issued.Chain, oldBundle, x509svid.WithTime(now))
		require.Error(t, err, "a certificate of the new issuer verifies with the old bundle")
	})

	t.Run("a root added", func(t *testing.T) {
		c, first, second := setup(t)
		_, _, changed := c.WatchBundle()
		set := first.AuthoritySet()
		added := second.AuthoritySet().Roots[0]
		added.State = ca.RootPrepared
		set.Roots = append(set.Roots, added)
		set.Sequence = 2
		require.NoError(t, c.SetAuthorities(set))
		require.True(t, closed(changed))
		b, _ := c.Bundle()
		require.Len(t, b.X509Authorities(), 2)
	})

	t.Run("same roots, new issuer", func(t *testing.T) {
		c, first, _ := setup(t)
		_, _, changed := c.WatchBundle()
		sibling := first.Root().ChildCA(testca.WithLifetime(now.Add(-time.Hour), now.Add(7*24*time.Hour)))
		set := sibling.AuthoritySet()
		require.Equal(t, uint64(1), set.Sequence)

		require.NoError(t, c.SetAuthorities(set))
		require.False(t, closed(changed), "the bundle did not change, but watchers were told")
		require.Equal(t, sibling.Cert.Raw, c.Authorities().Issuer.Cert.Raw)
		b, seq := c.Bundle()
		require.Equal(t, uint64(1), seq)
		require.True(t, b.Equal(first.Bundle()))

		issued := sign(t, c, ca.SignRequest{PublicKey: testca.NewKey(t).Public(), ID: workloadID})
		require.NoError(t, issued.Cert.CheckSignatureFrom(sibling.Cert))
		require.Equal(t, sibling.Cert.Raw, issued.Chain[1].Raw)
	})

	t.Run("another trust domain", func(t *testing.T) {
		c, _, _ := setup(t)
		root := testca.New(t, otherTD)
		set := root.ChildCA().AuthoritySet()
		set.Sequence = 2
		require.EqualError(t, c.SetAuthorities(set), `ca: authority set is for "other.org", the CA for "example.org"`)
	})

	t.Run("invalid set", func(t *testing.T) {
		c, first, _ := setup(t)
		_, _, changed := c.WatchBundle()
		expired := first.Root().ChildCA(testca.WithLifetime(now.Add(-2*time.Hour), now.Add(-time.Hour)))
		err := c.SetAuthorities(expired.AuthoritySet())
		require.ErrorContains(t, err, "ca: issuer certificate is not valid now")
		require.False(t, closed(changed))
		require.Equal(t, first.Cert.Raw, c.Authorities().Issuer.Cert.Raw)
	})
}

// TestSignWhileSwapping signs from several goroutines while the issuer is
// swapped; run with -race.
func TestSignWhileSwapping(t *testing.T) {
	now := testNow()
	inter := newIssuer(t, now)
	c := newCA(t, inter.AuthoritySet(), clocktesting.NewFakePassiveClock(now), ca.TTLPolicy{})
	bundle := inter.Bundle()
	siblings := make([]*ca.AuthoritySet, 5)
	for i := range siblings {
		siblings[i] = inter.Root().ChildCA(testca.WithLifetime(now.Add(-time.Hour), now.Add(time.Hour))).AuthoritySet()
	}
	pub := testca.NewKey(t).Public()

	var wg sync.WaitGroup
	errs := make(chan error, 4*20)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 20 {
				issued, err := c.Sign(context.Background(), ca.SignRequest{PublicKey: pub, ID: workloadID})
				if err == nil {
					_, _, err = x509svid.Verify(issued.Chain, bundle, x509svid.WithTime(now))
				}
				errs <- err
			}
		}()
	}
	for _, set := range siblings {
		require.NoError(t, c.SetAuthorities(set))
		_, _, _ = c.WatchBundle()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
}

func writePEM(t *testing.T, path string, certs ...*x509.Certificate) {
	t.Helper()
	var buf bytes.Buffer
	for _, c := range certs {
		require.NoError(t, pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
	}
	require.NoError(t, os.WriteFile(path, buf.Bytes(), 0o600))
}

// TestSignOpenSSLVerify checks issued chains with another implementation
// than Go's. It uses the CA's own authorities: testca gives every CA the
// same subject, so OpenSSL takes its intermediates for self-signed roots.
func TestSignOpenSSLVerify(t *testing.T) {
	openssl, err := exec.LookPath("openssl")
	require.NoError(t, err, "openssl is needed for this test")

	now := testNow()
	selfSigned, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: td, Clock: clocktesting.NewFakePassiveClock(now)})
	require.NoError(t, err)

	tests := []struct {
		name string
		set  *ca.AuthoritySet
		key  crypto.Signer
	}{
		{name: "self-signed authorities, P-256 leaf", set: selfSigned, key: testca.NewKey(t)},
		{name: "self-signed authorities, RSA leaf", set: selfSigned, key: rsaKey(t, 2048)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newCA(t, tt.set, clocktesting.NewFakePassiveClock(now), ca.TTLPolicy{})
			issued := sign(t, c, ca.SignRequest{PublicKey: tt.key.Public(), ID: workloadID})
			bundle, _ := c.Bundle()
			require.Len(t, issued.Chain, 2)

			dir := t.TempDir()
			rootPath := filepath.Join(dir, "root.pem")
			interPath := filepath.Join(dir, "inter.pem")
			leafPath := filepath.Join(dir, "leaf.pem")
			writePEM(t, rootPath, bundle.X509Authorities()...)
			writePEM(t, interPath, issued.Chain[1:]...)
			writePEM(t, leafPath, issued.Cert)

			for _, extra := range [][]string{
				nil,
				{"-purpose", "sslserver"},
				{"-purpose", "sslclient"},
				{"-x509_strict"},
			} {
				args := append([]string{"verify", "-attime", strconv.FormatInt(now.Unix(), 10)}, extra...)
				args = append(args, "-CAfile", rootPath, "-untrusted", interPath, leafPath)
				out, err := exec.Command(openssl, args...).CombinedOutput()
				require.NoError(t, err, "openssl %v:\n%s", args, out)
				require.Equal(t, leafPath+": OK\n", string(out), "openssl %v", args)
			}

			// And openssl refuses the leaf without its intermediate.
			out, err := exec.Command(openssl, "verify", "-attime", strconv.FormatInt(now.Unix(), 10), "-CAfile", rootPath, leafPath).CombinedOutput()
			require.Error(t, err, "openssl verified a leaf without its intermediate:\n%s", out)
		})
	}
}

func TestMarshalSPIFFEBundle(t *testing.T) {
	root := testca.New(t, td)
	doc, err := ca.MarshalSPIFFEBundle(root.Bundle(), 7, 5*time.Minute)
	require.NoError(t, err)
	sb, err := spiffebundle.Parse(td, doc)
	require.NoError(t, err)
	seq, ok := sb.SequenceNumber()
	require.True(t, ok)
	require.Equal(t, uint64(7), seq)
	hint, ok := sb.RefreshHint()
	require.True(t, ok)
	require.Equal(t, 5*time.Minute, hint)
	require.Equal(t, []*x509.Certificate{root.Cert}, sb.X509Authorities())
}
