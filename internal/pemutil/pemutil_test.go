package pemutil_test

import (
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
