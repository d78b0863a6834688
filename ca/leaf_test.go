package ca_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/testca"
)

// TestSignMatchesCreateCertificate: the CA encodes workload leaves itself
// (to sign once); what it encodes is, byte for byte, the TBSCertificate
// that x509.CreateCertificate makes of the same certificate.
func TestSignMatchesCreateCertificate(t *testing.T) {
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	require.NoError(t, err)
	rsa2048, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	for _, tt := range []struct {
		name string
		now  time.Time
		ttl  time.Duration
		key  crypto.Signer
		dns  []string
		only bool // DNSOnly
		// noSKI drops the issuer's SubjectKeyId (an operator's
		// intermediate may have none): the leaf then has no
		// AuthorityKeyId, as crypto/x509 makes it.
		noSKI bool
	}{
		{name: "P-256 leaf", now: testNow(), key: testca.NewKey(t)},
		{name: "DNS-only leaf (Linkerd)", now: testNow(), key: testca.NewKey(t), dns: []string{"web.default.serviceaccount.identity.linkerd.cluster.local"}, only: true},
		{name: "URI and DNS SANs", now: testNow(), key: testca.NewKey(t), dns: []string{"web.example.org", "web"}},
		{name: "P-384 leaf", now: testNow(), key: p384},
		{name: "RSA leaf (keyEncipherment)", now: testNow(), key: rsa2048},
		{name: "NotAfter in 2050 (GeneralizedTime)", now: time.Date(2049, 12, 31, 23, 0, 0, 0, time.UTC), ttl: 2 * time.Hour, key: testca.NewKey(t)},
		{name: "short-lived", now: testNow(), ttl: 10 * time.Second, key: testca.NewKey(t)},
		{name: "issuer without SubjectKeyId", now: testNow(), key: testca.NewKey(t), noSKI: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			inter := testca.New(t, td, testca.WithLifetime(tt.now.Add(-time.Hour), tt.now.Add(24*time.Hour))).
				ChildCA(testca.WithLifetime(tt.now.Add(-time.Hour), tt.now.Add(24*time.Hour)))
			if tt.noSKI {
				inter.Cert.SubjectKeyId = nil
			}
			c, err := ca.New(inter.AuthoritySet(), ca.Options{Clock: clocktesting.NewFakePassiveClock(tt.now)})
			require.NoError(t, err)
			issued, err := c.Sign(context.Background(), ca.SignRequest{PublicKey: tt.key.Public(), ID: workloadID, TTL: tt.ttl, DNSNames: tt.dns, DNSOnly: tt.only})
			require.NoError(t, err)
			got := issued.Cert
			// The certificate returned is, field for field, what parsing
			// the DER gives (the CA does not parse it again).
			parsed, err := x509.ParseCertificate(got.Raw)
			require.NoError(t, err)
			require.Equal(t, parsed, got)
			require.NoError(t, got.CheckSignatureFrom(inter.Cert))
			if tt.noSKI {
				require.Nil(t, got.AuthorityKeyId)
			} else {
				require.Equal(t, inter.Cert.SubjectKeyId, got.AuthorityKeyId)
			}
			require.Equal(t, tt.dns, got.DNSNames)
			if tt.only {
				require.Empty(t, got.URIs)
			} else {
				require.Equal(t, workloadID.String(), got.URIs[0].String())
			}

			// The same certificate, made by crypto/x509.
			tmpl := &x509.Certificate{
				SerialNumber:          got.SerialNumber,
				NotBefore:             got.NotBefore,
				NotAfter:              got.NotAfter,
				URIs:                  got.URIs,
				DNSNames:              got.DNSNames,
				KeyUsage:              got.KeyUsage,
				ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
				BasicConstraintsValid: true,
			}
			der, err := x509.CreateCertificate(rand.Reader, tmpl, inter.Cert, tt.key.Public(), inter.Key)
			require.NoError(t, err)
			want, err := x509.ParseCertificate(der)
			require.NoError(t, err)
			require.Equal(t, want.RawTBSCertificate, got.RawTBSCertificate)
			require.Equal(t, want.SignatureAlgorithm, got.SignatureAlgorithm)

			// And the CA's own template, made by crypto/x509: whatever the
			// template holds, the fast path encodes.
			own := ca.LeafTemplate(ca.SignRequest{PublicKey: tt.key.Public(), ID: workloadID, DNSNames: tt.dns, DNSOnly: tt.only},
				got.SerialNumber, got.NotBefore, got.NotAfter)
			der, err = x509.CreateCertificate(rand.Reader, own, inter.Cert, tt.key.Public(), inter.Key)
			require.NoError(t, err)
			want, err = x509.ParseCertificate(der)
			require.NoError(t, err)
			require.Equal(t, want.RawTBSCertificate, got.RawTBSCertificate)
		})
	}
}

// An issuer whose private key does not match its certificate is caught
// by the first signature, not served.
func TestSignCatchesAMismatchedKey(t *testing.T) {
	inter := testca.New(t, td).ChildCA()
	set := inter.AuthoritySet()
	good := set.Issuer.Signer.(*ecdsa.PrivateKey)
	other := testca.NewKey(t).(*ecdsa.PrivateKey)
	// The public half is right (Validate passes), the private half is not.
	bad := *other
	bad.PublicKey = good.PublicKey
	set.Issuer.Signer = &bad
	c, err := ca.New(set, ca.Options{})
	require.NoError(t, err)
	_, err = c.Sign(context.Background(), ca.SignRequest{PublicKey: testca.NewKey(t).Public(), ID: workloadID})
	require.ErrorContains(t, err, "ca: the issuer's key made a signature its certificate does not verify")
}

// A DNSOnly request without a DNS name would make a certificate with no
// SAN and an empty subject: a programming error, refused.
func TestSignRefusesDNSOnlyWithoutNames(t *testing.T) {
	c, err := ca.New(testca.New(t, td).ChildCA().AuthoritySet(), ca.Options{})
	require.NoError(t, err)
	_, err = c.Sign(context.Background(), ca.SignRequest{PublicKey: testca.NewKey(t).Public(), ID: workloadID, DNSOnly: true})
	require.EqualError(t, err, `ca: cannot sign "spiffe://example.org/ns/default/sa/web": a DNSOnly request needs DNSNames`)
}
