package ca_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/testca"
)

func requireSameKey(t *testing.T, want, got crypto.PublicKey, msgAndArgs ...any) {
	t.Helper()
	k, ok := want.(interface{ Equal(crypto.PublicKey) bool })
	require.True(t, ok, "key of type %T has no Equal", want)
	require.True(t, k.Equal(got), msgAndArgs...)
}

func TestNewSelfSigned(t *testing.T) {
	now := testNow()
	clk := clocktesting.NewFakePassiveClock(now)
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: td, Clock: clk})
	require.NoError(t, err)

	require.Equal(t, td, set.TrustDomain)
	require.Equal(t, uint64(1), set.Sequence)
	require.Len(t, set.Roots, 1)
	require.Empty(t, set.Chain)
	require.NoError(t, set.Validate(now))

	root := set.Roots[0]
	t.Run("root", func(t *testing.T) {
		c := root.Cert
		require.NoError(t, c.CheckSignatureFrom(c), "root is not self-signed")
		require.Equal(t, c.RawSubject, c.RawIssuer)
		require.True(t, c.BasicConstraintsValid)
		require.True(t, c.IsCA)
		require.NotZero(t, c.KeyUsage&x509.KeyUsageCertSign)
		require.Len(t, c.URIs, 1)
		require.Equal(t, "spiffe://example.org", c.URIs[0].String())
		require.Equal(t, now.Add(-ca.Backdate), c.NotBefore)
		require.Equal(t, now.Add(ca.DefaultRootTTL), c.NotAfter)
		require.NotNil(t, root.Signer, "the root key of a self-signed CA is held")
		requireSameKey(t, c.PublicKey, root.Signer.Public())
		require.Equal(t, elliptic.P256(), root.Signer.Public().(*ecdsa.PublicKey).Curve)
	})

	t.Run("intermediate", func(t *testing.T) {
		c := set.Issuer.Cert
		require.NoError(t, c.CheckSignatureFrom(root.Cert), "intermediate is not signed by the root")
		require.Equal(t, root.Cert.RawSubject, c.RawIssuer)
		require.NotEqual(t, c.RawSubject, c.RawIssuer, "intermediate's subject is its issuer's")
		require.True(t, c.BasicConstraintsValid)
		require.True(t, c.IsCA)
		require.True(t, c.MaxPathLenZero)
		require.Equal(t, 0, c.MaxPathLen)
		require.NotZero(t, c.KeyUsage&x509.KeyUsageCertSign)
		require.Len(t, c.URIs, 1)
		require.Equal(t, "spiffe://example.org", c.URIs[0].String())
		require.Equal(t, now.Add(-ca.Backdate), c.NotBefore)
		require.Equal(t, now.Add(ca.DefaultIntermediateTTL), c.NotAfter)
		requireSameKey(t, c.PublicKey, set.Issuer.Signer.Public())
		require.False(t, bytes.Equal(c.RawSubjectPublicKeyInfo, root.Cert.RawSubjectPublicKeyInfo), "intermediate reuses the root key")

		pool := x509.NewCertPool()
		pool.AddCert(root.Cert)
		_, err := c.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
		require.NoError(t, err)
	})

	t.Run("two sets share nothing", func(t *testing.T) {
		other, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: td, Clock: clk})
		require.NoError(t, err)
		require.NotEqual(t, root.Cert.SerialNumber, other.Roots[0].Cert.SerialNumber)
		require.NotEqual(t, root.Cert.RawSubjectPublicKeyInfo, other.Roots[0].Cert.RawSubjectPublicKeyInfo)
		require.NotEqual(t, set.Issuer.Cert.SerialNumber, other.Issuer.Cert.SerialNumber)
	})
}

func TestNewSelfSignedLifetimes(t *testing.T) {
	now := testNow()
	tests := []struct {
		name          string
		rootTTL       time.Duration
		interTTL      time.Duration
		wantRootEnd   time.Duration
		wantIssuerEnd time.Duration
	}{
		{name: "custom", rootTTL: 48 * time.Hour, interTTL: 6 * time.Hour, wantRootEnd: 48 * time.Hour, wantIssuerEnd: 6 * time.Hour},
		{name: "intermediate clamped to the root", rootTTL: 2 * time.Hour, interTTL: 6 * time.Hour, wantRootEnd: 2 * time.Hour, wantIssuerEnd: 2 * time.Hour},
		{name: "negative means default", rootTTL: -1, interTTL: -1, wantRootEnd: ca.DefaultRootTTL, wantIssuerEnd: ca.DefaultIntermediateTTL},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			set, err := ca.NewSelfSigned(ca.AuthorityOptions{
				TrustDomain:     td,
				RootTTL:         tt.rootTTL,
				IntermediateTTL: tt.interTTL,
				Clock:           clocktesting.NewFakePassiveClock(now),
			})
			require.NoError(t, err)
			require.Equal(t, now.Add(tt.wantRootEnd), set.Roots[0].Cert.NotAfter)
			require.Equal(t, now.Add(tt.wantIssuerEnd), set.Issuer.Cert.NotAfter)
			require.NoError(t, set.Validate(now))
		})
	}
}

func TestNewSelfSignedNoTrustDomain(t *testing.T) {
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{})
	require.EqualError(t, err, "ca: a trust domain is required")
	require.Nil(t, set)
}

func TestValidate(t *testing.T) {
	now := testNow()
	week := testca.WithLifetime(now.Add(-time.Hour), now.Add(7*24*time.Hour))

	tests := []struct {
		name    string
		set     func(t *testing.T) *ca.AuthoritySet
		wantErr string // the full text, or with wantPart a prefix
		partial bool
		wantAs  any // when set, errors.As must find this type
	}{
		{
			name: "valid testca set",
			set:  func(t *testing.T) *ca.AuthoritySet { return newIssuer(t, now).AuthoritySet() },
		},
		{
			name: "valid two-level chain",
			set: func(t *testing.T) *ca.AuthoritySet {
				return newIssuer(t, now).ChildCA(week).AuthoritySet()
			},
		},
		{
			name: "root without its key",
			set: func(t *testing.T) *ca.AuthoritySet {
				set := newIssuer(t, now).AuthoritySet()
				set.Roots[0].Signer = nil
				return set
			},
		},
		{
			name: "no trust domain",
			set: func(t *testing.T) *ca.AuthoritySet {
				set := newIssuer(t, now).AuthoritySet()
				set.TrustDomain = spiffeid.TrustDomain{}
				return set
			},
			wantErr: "ca: authority set has no trust domain",
		},
		{
			name: "no roots",
			set: func(t *testing.T) *ca.AuthoritySet {
				set := newIssuer(t, now).AuthoritySet()
				set.Roots = nil
				return set
			},
			wantErr: "ca: authority set has no root",
		},
		{
			name: "no issuer",
			set: func(t *testing.T) *ca.AuthoritySet {
				set := newIssuer(t, now).AuthoritySet()
				set.Issuer = ca.Authority{}
				return set
			},
			wantErr: "ca: authority set has no issuer certificate and key",
		},
		{
			name: "issuer without its key",
			set: func(t *testing.T) *ca.AuthoritySet {
				set := newIssuer(t, now).AuthoritySet()
				set.Issuer.Signer = nil
				return set
			},
			wantErr: "ca: authority set has no issuer certificate and key",
		},
		{
			name: "issuer is a leaf",
			set: func(t *testing.T) *ca.AuthoritySet {
				inter := newIssuer(t, now)
				svid := inter.CreateX509SVID(workloadID)
				set := inter.AuthoritySet()
				set.Issuer = ca.Authority{Cert: svid.Certificates[0], Signer: svid.PrivateKey}
				set.Chain = []*x509.Certificate{inter.Cert}
				return set
			},
			wantErr: "ca: issuer certificate is not a CA with keyCertSign",
		},
		{
			name: "mismatched issuer key",
			set: func(t *testing.T) *ca.AuthoritySet {
				set := newIssuer(t, now).AuthoritySet()
				set.Issuer.Signer = testca.NewKey(t)
				return set
			},
			wantErr: "ca: issuer key does not match the issuer certificate",
		},
		{
			name: "issuer key is the root's",
			set: func(t *testing.T) *ca.AuthoritySet {
				set := newIssuer(t, now).AuthoritySet()
				set.Issuer.Signer = set.Roots[0].Signer
				return set
			},
			wantErr: "ca: issuer key does not match the issuer certificate",
		},
		{
			name: "expired issuer",
			set: func(t *testing.T) *ca.AuthoritySet {
				return newIssuer(t, now, testca.WithLifetime(now.Add(-2*time.Hour), now)).AuthoritySet()
			},
			wantErr: "ca: issuer certificate is not valid now (valid " +
				now.Add(-2*time.Hour).Format(time.RFC3339) + " to " + now.Format(time.RFC3339) + ")",
		},
		{
			name: "issuer not yet valid",
			set: func(t *testing.T) *ca.AuthoritySet {
				return newIssuer(t, now, testca.WithLifetime(now.Add(time.Second), now.Add(time.Hour))).AuthoritySet()
			},
			wantErr: "ca: issuer certificate is not valid now (valid " +
				now.Add(time.Second).Format(time.RFC3339) + " to " + now.Add(time.Hour).Format(time.RFC3339) + ")",
		},
		{
			name: "issuer not chaining to the roots",
			set: func(t *testing.T) *ca.AuthoritySet {
				set := newIssuer(t, now).AuthoritySet()
				set.Roots = newIssuer(t, now).AuthoritySet().Roots
				return set
			},
			wantErr: "ca: issuer does not chain to the active root: ",
			partial: true,
			wantAs:  &x509.UnknownAuthorityError{},
		},
		{
			name: "two-level chain without its middle",
			set: func(t *testing.T) *ca.AuthoritySet {
				set := newIssuer(t, now).ChildCA(week).AuthoritySet()
				set.Chain = nil
				return set
			},
			wantErr: "ca: issuer does not chain to the active root: ",
			partial: true,
			wantAs:  &x509.UnknownAuthorityError{},
		},
		{
			name: "root is not a CA",
			set: func(t *testing.T) *ca.AuthoritySet {
				inter := newIssuer(t, now)
				set := inter.AuthoritySet()
				set.Roots = []ca.Root{{Authority: ca.Authority{Cert: inter.CreateX509SVID(workloadID).Certificates[0]}, State: ca.RootActive}}
				return set
			},
			wantErr: `ca: root "" is not a CA certificate`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.set(t).Validate(now)
			switch {
			case tt.wantErr == "":
				require.NoError(t, err)
			case tt.partial:
				require.ErrorContains(t, err, tt.wantErr)
				require.True(t, len(err.Error()) > len(tt.wantErr) && err.Error()[:len(tt.wantErr)] == tt.wantErr, "error %q does not start with %q", err, tt.wantErr)
			default:
				require.EqualError(t, err, tt.wantErr)
			}
			if tt.wantAs != nil {
				require.ErrorAs(t, err, tt.wantAs)
			}
		})
	}
}

func requireSameSet(t *testing.T, want, got *ca.AuthoritySet) {
	t.Helper()
	require.Equal(t, want.TrustDomain, got.TrustDomain)
	require.Equal(t, want.Sequence, got.Sequence)
	require.Len(t, got.Roots, len(want.Roots))
	for i := range want.Roots {
		require.Equal(t, want.Roots[i].Cert.Raw, got.Roots[i].Cert.Raw, "root %d", i)
		if want.Roots[i].Signer == nil {
			require.Nil(t, got.Roots[i].Signer, "root %d", i)
		} else {
			require.NotNil(t, got.Roots[i].Signer, "root %d", i)
			requireSameKey(t, want.Roots[i].Signer.Public(), got.Roots[i].Signer.Public(), "root %d key", i)
		}
	}
	require.Equal(t, want.Issuer.Cert.Raw, got.Issuer.Cert.Raw)
	require.NotNil(t, got.Issuer.Signer)
	requireSameKey(t, want.Issuer.Signer.Public(), got.Issuer.Signer.Public(), "issuer key")
	require.Len(t, got.Chain, len(want.Chain))
	for i := range want.Chain {
		require.Equal(t, want.Chain[i].Raw, got.Chain[i].Raw, "chain %d", i)
	}
}

func TestMarshalAuthoritySetRoundTrip(t *testing.T) {
	now := testNow()
	selfSigned, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: td, Clock: clocktesting.NewFakePassiveClock(now)})
	require.NoError(t, err)

	twoLevel := newIssuer(t, now).ChildCA().AuthoritySet()
	twoLevel.Sequence = 42

	rsaIssuer := newIssuer(t, now, testca.WithKey(rsaKey(t, 2048))).AuthoritySet()

	keylessRoots := newIssuer(t, now).AuthoritySet()
	keylessRoots.Roots[0].Signer = nil
	keylessRoots.Roots = append(keylessRoots.Roots, ca.Root{Authority: ca.Authority{Cert: testca.New(t, td).Cert}, State: ca.RootPrepared})

	tests := []struct {
		name string
		set  *ca.AuthoritySet
	}{
		{name: "self-signed", set: selfSigned},
		{name: "two-level chain", set: twoLevel},
		{name: "RSA issuer key", set: rsaIssuer},
		{name: "roots without keys", set: keylessRoots},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data, err := ca.MarshalAuthoritySet(tt.set)
			require.NoError(t, err)
			got, err := ca.UnmarshalAuthoritySet(data)
			require.NoError(t, err)
			requireSameSet(t, tt.set, got)
			require.NoError(t, got.Validate(now))

			// Stable: encoding again gives the same bytes.
			again, err := ca.MarshalAuthoritySet(got)
			require.NoError(t, err)
			require.Equal(t, string(data), string(again))
		})
	}
}

func TestUnmarshalAuthoritySetErrors(t *testing.T) {
	now := testNow()
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: td, Clock: clocktesting.NewFakePassiveClock(now)})
	require.NoError(t, err)
	good, err := ca.MarshalAuthoritySet(set)
	require.NoError(t, err)

	// edit replaces the first occurrence of old in the good encoding.
	edit := func(old, new string) []byte {
		i := bytes.Index(good, []byte(old))
		require.GreaterOrEqual(t, i, 0, "%q not in the encoding", old)
		return append(append(bytes.Clone(good[:i]), new...), good[i+len(old):]...)
	}

	tests := []struct {
		name    string
		data    []byte
		wantErr string
		partial bool
	}{
		{name: "garbage", data: []byte("not json"), wantErr: "ca: decoding stored authority set: invalid character 'o' in literal null (expecting 'u')"},
		{name: "empty", data: nil, wantErr: "ca: decoding stored authority set: unexpected end of JSON input"},
		{name: "truncated", data: good[:len(good)-1], wantErr: "ca: decoding stored authority set: unexpected end of JSON input"},
		{name: "JSON of the wrong shape", data: []byte(`[1, 2]`), wantErr: "ca: decoding stored authority set: ", partial: true},
		{name: "wrong version", data: edit(`"version": 1`, `"version": 2`), wantErr: "ca: stored authority set has version 2; this build reads version 1"},
		{name: "no version", data: []byte(`{"trustDomain": "example.org"}`), wantErr: "ca: stored authority set has version 0; this build reads version 1"},
		{name: "bad trust domain", data: edit(`"trustDomain": "example.org"`, `"trustDomain": "Example Org"`), wantErr: "ca: stored authority set: ", partial: true},
		{name: "bad root certificate", data: edit(`"certificate": "-----BEGIN CERTIFICATE-----`, `"certificate": "-----BEGIN CERTIFICATE-----AAAA`), wantErr: "ca: stored root 0: ", partial: true},
		{name: "root is not a certificate", data: edit(`"certificate": "-----BEGIN CERTIFICATE-----`, `"certificate": "-----BEGIN PRIVATE KEY-----`), wantErr: "ca: stored root 0: pemutil: no PEM certificate found"},
		{name: "no issuer", data: []byte(`{"version": 1, "trustDomain": "example.org"}`), wantErr: "ca: stored issuer: pemutil: no PEM certificate found"},
		{name: "bad root key", data: edit(`"privateKey": "-----BEGIN PRIVATE KEY-----\n`, `"privateKey": "-----BEGIN PRIVATE KEY-----\nAAAA`), wantErr: "ca: stored root 0: private key does not parse"},
		{name: "root key not PEM", data: edit(`"privateKey": "-----BEGIN PRIVATE KEY-----\n`, `"privateKey": "nope`), wantErr: "ca: stored root 0: no PEM private key found"},
		{name: "root key of another PEM type", data: edit(`"privateKey": "-----BEGIN PRIVATE KEY-----\n`, `"privateKey": "-----BEGIN PUBLIC KEY-----\n`), wantErr: "ca: stored root 0: no PEM private key found"},
		{name: "bad chain", data: edit(`"version": 1,`, `"version": 1, "chain": ["nope"],`), wantErr: "ca: stored chain 0: pemutil: no PEM certificate found"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got *ca.AuthoritySet
			var err error
			require.NotPanics(t, func() { got, err = ca.UnmarshalAuthoritySet(tt.data) })
			require.Nil(t, got)
			if tt.partial {
				require.ErrorContains(t, err, tt.wantErr)
				require.Equal(t, tt.wantErr, err.Error()[:len(tt.wantErr)])
			} else {
				require.EqualError(t, err, tt.wantErr)
			}
		})
	}
}

func TestUnmarshalAuthoritySetKeyNeverInError(t *testing.T) {
	set := newIssuer(t, testNow()).AuthoritySet()
	data, err := ca.MarshalAuthoritySet(set)
	require.NoError(t, err)
	// Corrupt the issuer's key, which follows the last "privateKey".
	i := bytes.LastIndex(data, []byte(`"privateKey": "-----BEGIN PRIVATE KEY-----\n`))
	require.Positive(t, i)
	start := i + len(`"privateKey": "-----BEGIN PRIVATE KEY-----\n`)
	corrupt := bytes.Clone(data)
	copy(corrupt[start:], "AAAAAAAAAAAAAAAAAAAAAAAA")

	_, err = ca.UnmarshalAuthoritySet(corrupt)
	require.EqualError(t, err, "ca: stored issuer: private key does not parse")
}
