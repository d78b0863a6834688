package ca_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/pem"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/securefile"
	"github.com/meshca/meshca/testca"
)

func certsPEM(certs ...*x509.Certificate) []byte {
	var buf bytes.Buffer
	for _, c := range certs {
		_ = pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return buf.Bytes()
}

func pkcs8PEM(t *testing.T, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	require.NoError(t, err)
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

func writeFile(t *testing.T, path string, data []byte, mode os.FileMode) {
	t.Helper()
	require.NoError(t, os.WriteFile(path, data, mode))
	require.NoError(t, os.Chmod(path, mode)) // whatever the umask
}

// cacertsDir writes an Istio cacerts directory for issuer, whose chain up
// to its root is given, and returns its Files.
func cacertsDir(t *testing.T, root *x509.Certificate, issuer *testca.CA, chain ...*x509.Certificate) ca.Files {
	t.Helper()
	dir := t.TempDir()
	f := ca.Files{
		RootCert:  filepath.Join(dir, "root-cert.pem"),
		CACert:    filepath.Join(dir, "ca-cert.pem"),
		CAKey:     filepath.Join(dir, "ca-key.pem"),
		CertChain: filepath.Join(dir, "cert-chain.pem"),
	}
	writeFile(t, f.RootCert, certsPEM(root), 0o644)
	writeFile(t, f.CACert, certsPEM(issuer.Cert), 0o644)
	writeFile(t, f.CAKey, pkcs8PEM(t, issuer.Key), 0o600)
	writeFile(t, f.CertChain, certsPEM(append(append([]*x509.Certificate{issuer.Cert}, chain...), root)...), 0o644)
	return f
}

func TestLoadFiles(t *testing.T) {
	now := testNow()
	inter := newIssuer(t, now)
	root := inter.Root()
	f := cacertsDir(t, root.Cert, inter)

	set, err := ca.LoadFiles(td, f, now)
	require.NoError(t, err)
	require.Equal(t, td, set.TrustDomain)
	require.Equal(t, uint64(1), set.Sequence)
	require.Len(t, set.Roots, 1)
	require.Equal(t, root.Cert.Raw, set.Roots[0].Cert.Raw)
	require.Nil(t, set.Roots[0].Signer, "a plugged-in root comes without its key")
	require.Equal(t, inter.Cert.Raw, set.Issuer.Cert.Raw)
	requireSameKey(t, inter.Key.Public(), set.Issuer.Signer.Public())
	require.Empty(t, set.Chain, "the issuer and the root are not part of Chain")
	require.NoError(t, set.Validate(now))

	// The loaded set issues certificates that verify with the root.
	c := newCA(t, set, fakeClock(now), ca.TTLPolicy{})
	issued := sign(t, c, ca.SignRequest{PublicKey: testca.NewKey(t).Public(), ID: workloadID})
	require.Len(t, issued.Chain, 2)
}

func TestLoadFilesLayouts(t *testing.T) {
	now := testNow()

	t.Run("no cert-chain.pem", func(t *testing.T) {
		inter := newIssuer(t, now)
		f := cacertsDir(t, inter.Root().Cert, inter)
		f.CertChain = ""
		set, err := ca.LoadFiles(td, f, now)
		require.NoError(t, err)
		require.Empty(t, set.Chain)
	})

	t.Run("cert-chain.pem without the root", func(t *testing.T) {
		inter := newIssuer(t, now)
		f := cacertsDir(t, inter.Root().Cert, inter)
		writeFile(t, f.CertChain, certsPEM(inter.Cert), 0o644)
		set, err := ca.LoadFiles(td, f, now)
		require.NoError(t, err)
		require.Empty(t, set.Chain)
	})

	t.Run("two-level chain", func(t *testing.T) {
		inter1 := newIssuer(t, now)
		inter2 := inter1.ChildCA(testca.WithLifetime(now.Add(-time.Hour), now.Add(24*time.Hour)))
		f := cacertsDir(t, inter1.Root().Cert, inter2, inter1.Cert)

		set, err := ca.LoadFiles(td, f, now)
		require.NoError(t, err)
		require.Equal(t, inter2.Cert.Raw, set.Issuer.Cert.Raw)
		require.Len(t, set.Chain, 1)
		require.Equal(t, inter1.Cert.Raw, set.Chain[0].Raw)

		c := newCA(t, set, fakeClock(now), ca.TTLPolicy{})
		issued := sign(t, c, ca.SignRequest{PublicKey: testca.NewKey(t).Public(), ID: workloadID})
		require.Len(t, issued.Chain, 3)
		require.Equal(t, inter2.Cert.Raw, issued.Chain[1].Raw)
		require.Equal(t, inter1.Cert.Raw, issued.Chain[2].Raw)
	})

	t.Run("two-level chain without cert-chain.pem", func(t *testing.T) {
		inter1 := newIssuer(t, now)
		inter2 := inter1.ChildCA(testca.WithLifetime(now.Add(-time.Hour), now.Add(24*time.Hour)))
		f := cacertsDir(t, inter1.Root().Cert, inter2, inter1.Cert)
		f.CertChain = ""
		_, err := ca.LoadFiles(td, f, now)
		require.ErrorContains(t, err, "ca: issuer does not chain to a root of the bundle: ")
		require.ErrorAs(t, err, &x509.UnknownAuthorityError{})
	})

	t.Run("two roots in root-cert.pem", func(t *testing.T) {
		inter := newIssuer(t, now)
		other := testca.New(t, td)
		f := cacertsDir(t, inter.Root().Cert, inter)
		writeFile(t, f.RootCert, certsPEM(other.Cert, inter.Root().Cert), 0o644)
		set, err := ca.LoadFiles(td, f, now)
		require.NoError(t, err)
		require.Len(t, set.Roots, 2)
		require.Equal(t, other.Cert.Raw, set.Roots[0].Cert.Raw)
		require.Empty(t, set.Chain)
	})

	t.Run("SEC 1 EC key", func(t *testing.T) {
		inter := newIssuer(t, now)
		f := cacertsDir(t, inter.Root().Cert, inter)
		der, err := x509.MarshalECPrivateKey(inter.Key.(*ecdsa.PrivateKey))
		require.NoError(t, err)
		writeFile(t, f.CAKey, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600)
		set, err := ca.LoadFiles(td, f, now)
		require.NoError(t, err)
		requireSameKey(t, inter.Key.Public(), set.Issuer.Signer.Public())
	})

	t.Run("PKCS#1 RSA key", func(t *testing.T) {
		key := rsaKey(t, 2048)
		inter := newIssuer(t, now, testca.WithKey(key))
		f := cacertsDir(t, inter.Root().Cert, inter)
		writeFile(t, f.CAKey, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}), 0o600)
		set, err := ca.LoadFiles(td, f, now)
		require.NoError(t, err)
		requireSameKey(t, key.Public(), set.Issuer.Signer.Public())
	})

	t.Run("key file mode 0400", func(t *testing.T) {
		inter := newIssuer(t, now)
		f := cacertsDir(t, inter.Root().Cert, inter)
		require.NoError(t, os.Chmod(f.CAKey, 0o400))
		_, err := ca.LoadFiles(td, f, now)
		require.NoError(t, err)
	})
}

func TestLoadFilesRefusals(t *testing.T) {
	now := testNow()

	tests := []struct {
		name string
		// modify changes a valid layout; it returns the error expected.
		modify  func(t *testing.T, f *ca.Files, inter *testca.CA) string
		partial bool
		wantIs  error
		wantAs  any
	}{
		{
			name: "key readable by others",
			modify: func(t *testing.T, f *ca.Files, _ *testca.CA) string {
				require.NoError(t, os.Chmod(f.CAKey, 0o644))
				return "ca: reading CA key: securefile: file is accessible by group or others; chmod 600 it: " + f.CAKey + " has mode 0644"
			},
			wantIs: securefile.ErrTooOpen,
		},
		{
			name: "key readable by the group",
			modify: func(t *testing.T, f *ca.Files, _ *testca.CA) string {
				require.NoError(t, os.Chmod(f.CAKey, 0o640))
				return "ca: reading CA key: securefile: file is accessible by group or others; chmod 600 it: " + f.CAKey + " has mode 0640"
			},
			wantIs: securefile.ErrTooOpen,
		},
		{
			name: "key that does not match the certificate",
			modify: func(t *testing.T, f *ca.Files, _ *testca.CA) string {
				writeFile(t, f.CAKey, pkcs8PEM(t, testca.NewKey(t)), 0o600)
				return "ca: issuer key does not match the issuer certificate"
			},
		},
		{
			name: "CA certificate that does not chain to the root",
			modify: func(t *testing.T, f *ca.Files, _ *testca.CA) string {
				stranger := newIssuer(t, now)
				writeFile(t, f.CACert, certsPEM(stranger.Cert), 0o644)
				writeFile(t, f.CAKey, pkcs8PEM(t, stranger.Key), 0o600)
				writeFile(t, f.CertChain, certsPEM(stranger.Cert), 0o644)
				return "ca: issuer does not chain to a root of the bundle: "
			},
			partial: true,
			wantAs:  &x509.UnknownAuthorityError{},
		},
		{
			name: "CA certificate is a leaf",
			modify: func(t *testing.T, f *ca.Files, inter *testca.CA) string {
				svid := inter.CreateX509SVID(workloadID)
				writeFile(t, f.CACert, certsPEM(svid.Certificates[0]), 0o644)
				writeFile(t, f.CAKey, pkcs8PEM(t, svid.PrivateKey), 0o600)
				return "ca: issuer certificate is not a CA with keyCertSign"
			},
		},
		{
			name: "expired CA certificate",
			modify: func(t *testing.T, f *ca.Files, inter *testca.CA) string {
				old := inter.Root().ChildCA(testca.WithLifetime(now.Add(-2*time.Hour), now.Add(-time.Hour)))
				writeFile(t, f.CACert, certsPEM(old.Cert), 0o644)
				writeFile(t, f.CAKey, pkcs8PEM(t, old.Key), 0o600)
				return "ca: issuer certificate is not valid now (valid " + now.Add(-2*time.Hour).Format(time.RFC3339) + " to " + now.Add(-time.Hour).Format(time.RFC3339) + ")"
			},
		},
		{
			name: "no root file",
			modify: func(t *testing.T, f *ca.Files, _ *testca.CA) string {
				require.NoError(t, os.Remove(f.RootCert))
				return "ca: reading root certificate: open " + f.RootCert + ": no such file or directory"
			},
			wantIs: fs.ErrNotExist,
		},
		{
			name: "no CA certificate file",
			modify: func(t *testing.T, f *ca.Files, _ *testca.CA) string {
				require.NoError(t, os.Remove(f.CACert))
				return "ca: reading CA certificate: open " + f.CACert + ": no such file or directory"
			},
			wantIs: fs.ErrNotExist,
		},
		{
			name: "no key file",
			modify: func(t *testing.T, f *ca.Files, _ *testca.CA) string {
				require.NoError(t, os.Remove(f.CAKey))
				return "ca: reading CA key: securefile: open " + f.CAKey + ": no such file or directory"
			},
			wantIs: fs.ErrNotExist,
		},
		{
			name: "no chain file",
			modify: func(t *testing.T, f *ca.Files, _ *testca.CA) string {
				require.NoError(t, os.Remove(f.CertChain))
				return "ca: reading certificate chain: open " + f.CertChain + ": no such file or directory"
			},
			wantIs: fs.ErrNotExist,
		},
		{
			name: "root file is not PEM",
			modify: func(t *testing.T, f *ca.Files, _ *testca.CA) string {
				writeFile(t, f.RootCert, []byte("not PEM"), 0o644)
				return "ca: " + f.RootCert + ": pemutil: no PEM certificate found"
			},
		},
		{
			name: "root file holds a key",
			modify: func(t *testing.T, f *ca.Files, _ *testca.CA) string {
				writeFile(t, f.RootCert, pkcs8PEM(t, testca.NewKey(t)), 0o644)
				return "ca: " + f.RootCert + `: pemutil: PEM block "PRIVATE KEY" where a CERTIFICATE was expected`
			},
		},
		{
			name: "two CA certificates",
			modify: func(t *testing.T, f *ca.Files, inter *testca.CA) string {
				writeFile(t, f.CACert, certsPEM(inter.Cert, inter.Root().Cert), 0o644)
				return "ca: " + f.CACert + ": want one certificate, found 2"
			},
		},
		{
			name: "key file holds a certificate",
			modify: func(t *testing.T, f *ca.Files, inter *testca.CA) string {
				writeFile(t, f.CAKey, certsPEM(inter.Cert), 0o600)
				return "ca: " + f.CAKey + `: PEM block "CERTIFICATE" is not a private key`
			},
		},
		{
			name: "key file is garbage",
			modify: func(t *testing.T, f *ca.Files, _ *testca.CA) string {
				writeFile(t, f.CAKey, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte("secret garbage")}), 0o600)
				return "ca: " + f.CAKey + ": private key does not parse"
			},
		},
		{
			name: "chain file is not PEM",
			modify: func(t *testing.T, f *ca.Files, _ *testca.CA) string {
				writeFile(t, f.CertChain, []byte("garbage"), 0o644)
				return "ca: " + f.CertChain + ": pemutil: no PEM certificate found"
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			inter := newIssuer(t, now)
			f := cacertsDir(t, inter.Root().Cert, inter)
			want := tt.modify(t, &f, inter)

			set, err := ca.LoadFiles(td, f, now)
			require.Nil(t, set)
			if tt.partial {
				require.ErrorContains(t, err, want)
				require.Equal(t, want, err.Error()[:len(want)])
			} else {
				require.EqualError(t, err, want)
			}
			if tt.wantIs != nil {
				require.ErrorIs(t, err, tt.wantIs)
			}
			if tt.wantAs != nil {
				require.ErrorAs(t, err, tt.wantAs)
			}
		})
	}
}
