package pemutil_test

import (
	"bytes"
	"encoding/pem"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/testca"
)

func TestRoundTrip(t *testing.T) {
	root := testca.New(t, spiffeid.RequireTrustDomainFromString("example.org"))
	inter := root.ChildCA()
	data := pemutil.EncodeCertificates(inter.Cert, root.Cert)

	certs, err := pemutil.ParseCertificates(data)
	require.NoError(t, err)
	require.Len(t, certs, 2)
	require.Equal(t, inter.Cert.Raw, certs[0].Raw)

	der, err := pemutil.ParseDER([][]byte{inter.Cert.Raw, root.Cert.Raw})
	require.NoError(t, err)
	require.Equal(t, certs, der)

	// A key beside the chain: refused by ParseCertificates, passed over
	// by FindCertificates.
	withKey := append(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1}}), data...)
	_, err = pemutil.ParseCertificates(withKey)
	require.EqualError(t, err, `pemutil: PEM block "PRIVATE KEY" where a CERTIFICATE was expected`)
	found, err := pemutil.FindCertificates(withKey)
	require.NoError(t, err)
	require.Len(t, found, 2)
}

func TestErrors(t *testing.T) {
	_, err := pemutil.ParseCertificates([]byte("nothing"))
	require.EqualError(t, err, "pemutil: no PEM certificate found")
	_, err = pemutil.ParseDER(nil)
	require.EqualError(t, err, "pemutil: no certificates")
	_, err = pemutil.ParseDER([][]byte{[]byte("x")})
	require.ErrorContains(t, err, "pemutil: certificate 0: x509: malformed certificate")
	bad := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("x")})
	_, err = pemutil.ParseCertificates(bad)
	require.ErrorContains(t, err, "pemutil: certificate 1: ")
}

func FuzzParseCertificates(f *testing.F) {
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n"))
	f.Add([]byte("garbage"))
	f.Fuzz(func(t *testing.T, data []byte) {
		certs, err := pemutil.FindCertificates(data)
		if err == nil {
			require.NotEmpty(t, certs)
			again, err := pemutil.ParseCertificates(pemutil.EncodeCertificates(certs...))
			require.NoError(t, err)
			require.Len(t, again, len(certs))
		}
	})
}

// TestLimits: input over MaxBytes or MaxBlocks is refused before it is
// decoded, with an error matching ErrTooLarge.
func TestLimits(t *testing.T) {
	block := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{0}})
	for _, tt := range []struct {
		name string
		fn   func() error
		err  string
	}{
		{"too many blocks", func() error {
			_, err := pemutil.ParseCertificates(bytes.Repeat(block, pemutil.MaxBlocks+1))
			return err
		}, "pemutil: 501 PEM blocks, more than the limit of 500"},
		{"too many blocks, others passed over", func() error {
			_, err := pemutil.FindCertificates(bytes.Repeat(pem.EncodeToMemory(&pem.Block{Type: "X"}), pemutil.MaxBlocks+1))
			return err
		}, "pemutil: 501 PEM blocks, more than the limit of 500"},
		{"too many bytes", func() error {
			_, err := pemutil.ParseCertificates(make([]byte, pemutil.MaxBytes+1))
			return err
		}, "pemutil: 1048577 bytes of PEM, more than the limit of 1048576"},
		{"too many DER certificates", func() error {
			_, err := pemutil.ParseDER(make([][]byte, pemutil.MaxBlocks+1))
			return err
		}, "pemutil: 501 certificates, more than the limit of 500"},
		{"too many DER bytes", func() error {
			_, err := pemutil.ParseDER([][]byte{make([]byte, pemutil.MaxBytes), {0}})
			return err
		}, "pemutil: 1048577 bytes of certificates, more than the limit of 1048576"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.fn()
			require.EqualError(t, err, tt.err)
			require.ErrorIs(t, err, pemutil.ErrTooLarge)
		})
	}
	// At the bound, blocks are decoded (and here refused as certificates).
	_, err := pemutil.ParseCertificates(bytes.Repeat(block, pemutil.MaxBlocks))
	require.NotErrorIs(t, err, pemutil.ErrTooLarge)
}
