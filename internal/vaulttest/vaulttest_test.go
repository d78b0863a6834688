package vaulttest_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/internal/testproc"
	"github.com/meshca/meshca/internal/vaulttest"
)

var vault vaulttest.Shared

func TestMain(m *testing.M) { vault.Run(m) }

// csrPEM is a CSR for a new P-256 key.
func csrPEM(t *testing.T, cn string) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
	require.NoError(t, err)
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

func signIntermediate(t *testing.T, s *vaulttest.Server, mount string) *x509.Certificate {
	t.Helper()
	resp := s.Write(t, mount+"/root/sign-intermediate", map[string]any{"csr": csrPEM(t, "inter"), "ttl": "24h"})
	certs, err := pemutil.ParseCertificates([]byte(resp.Data["certificate"].(string)))
	require.NoError(t, err)
	return certs[0]
}

func TestPKI(t *testing.T) {
	s := vault.Server(t)
	mount := s.NewPKIMount(t, "pki-test-")
	root := s.GenerateRoot(t, mount, "vaulttest root")
	require.True(t, root.Cert.IsCA)
	require.Equal(t, "vaulttest root", root.Cert.Subject.CommonName)
	require.Equal(t, root.Cert.NotAfter.Sub(root.Cert.NotBefore).Round(time.Hour), vaulttest.MaxLeaseTTL, "the mount is tuned")

	inter := signIntermediate(t, s, mount)
	require.True(t, inter.IsCA)
	require.NoError(t, inter.CheckSignatureFrom(root.Cert))

	// A second root signs nothing until it is the default.
	next := s.RotateRoot(t, mount, "vaulttest root 2")
	require.NotEqual(t, root.ID, next.ID)
	require.NoError(t, signIntermediate(t, s, mount).CheckSignatureFrom(root.Cert))
	s.SetDefaultIssuer(t, mount, next.ID)
	require.NoError(t, signIntermediate(t, s, mount).CheckSignatureFrom(next.Cert))

	s.CreateRole(t, mount, "leaf", map[string]any{"allow_any_name": true, "max_ttl": "1h"})
	issued := s.Write(t, mount+"/issue/leaf", map[string]any{"common_name": "leaf.test"})
	require.NotEmpty(t, issued.Data["certificate"])
}

// A token with a policy may do what it allows and nothing else.
func TestTokens(t *testing.T) {
	s := vault.Server(t)
	mount := s.NewPKIMount(t, "pki-token-")
	s.GenerateRoot(t, mount, "vaulttest root")
	s.PutPolicy(t, "sign-"+mount, fmt.Sprintf(`path "%s/root/sign-intermediate" { capabilities = ["update"] }`, mount))
	token := s.CreateToken(t, []string{"sign-" + mount}, time.Hour)

	c, err := s.Client.Clone()
	require.NoError(t, err)
	c.SetToken(token)
	sign := func() error {
		_, err := c.Logical().Write(mount+"/root/sign-intermediate", map[string]any{"csr": csrPEM(t, "inter")})
		return err
	}
	require.NoError(t, sign())
	_, err = c.Logical().Write(mount+"/root/rotate/internal", map[string]any{"common_name": "no"})
	require.ErrorContains(t, err, "permission denied")

	info := s.LookupToken(t, token)
	require.Equal(t, true, info["renewable"])
	s.RevokeToken(t, token)
	require.ErrorContains(t, sign(), "permission denied")
}

// Stop makes a real outage, and Restart brings back everything the
// server held: mounts, issuers, tokens.
func TestStopRestart(t *testing.T) {
	s := vaulttest.Start(t)
	mount := s.NewPKIMount(t, "pki-restart-")
	root := s.GenerateRoot(t, mount, "vaulttest root")
	token := s.CreateToken(t, nil, time.Hour)

	s.Stop(t)
	_, err := s.Client.Sys().Health()
	require.ErrorContains(t, err, "connection refused")

	s.Restart(t)
	require.NoError(t, signIntermediate(t, s, mount).CheckSignatureFrom(root.Cert))
	require.Equal(t, true, s.LookupToken(t, token)["renewable"])
}

func TestTLS(t *testing.T) {
	s := vaulttest.Start(t, vaulttest.WithTLS())
	require.Regexp(t, `^https://127\.0\.0\.1:\d+$`, s.Addr)
	require.FileExists(t, s.CAFile)
	health, err := s.Client.Sys().Health()
	require.NoError(t, err)
	require.False(t, health.Sealed)
}

// startWith runs vaulttest.Start and reports how it ended.
func startWith(t *testing.T) *testproc.Outcome {
	return testproc.RunTB(t, "started a server", func(tb testing.TB) { vaulttest.Start(tb) })
}

func TestStartWithoutBinary(t *testing.T) {
	dir := t.TempDir()
	t.Setenv(vaulttest.AssetsEnv, dir)

	t.Run("fails", func(t *testing.T) {
		t.Setenv(vaulttest.SkipEnv, "")
		o := startWith(t)
		require.Empty(t, o.SkipMessage)
		require.Equal(t, "vaulttest: vault not found in "+dir+" (MESHCA_VAULT_ASSETS): "+
			"run scripts/vault.sh (or make vault) to build it, "+
			"or set MESHCA_SKIP_VAULT=1 to skip the tests that need a Vault server", o.FailMessage)
	})
	t.Run("skips when told to", func(t *testing.T) {
		t.Setenv(vaulttest.SkipEnv, "1")
		o := startWith(t)
		require.Empty(t, o.FailMessage)
		require.Equal(t, "vaulttest: MESHCA_SKIP_VAULT=1: skipping a test that needs a real Vault server", o.SkipMessage)
	})
}
