package vaultca_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/vaultca"
	"github.com/meshca/meshca/internal/securefile"
	"github.com/meshca/meshca/internal/vaulttest"
)

var (
	vault vaulttest.Shared
	td    = spiffeid.RequireTrustDomainFromString("vaultca.test")
)

func TestMain(m *testing.M) { vault.Run(m) }

// policy is the least a meshca server needs on mount, as documented.
func policy(mount string) string {
	return fmt.Sprintf(`
path "%[1]s/root/sign-intermediate"     { capabilities = ["update"] }
path "%[1]s/issuer/+/sign-intermediate" { capabilities = ["update"] }
path "%[1]s/issuers"                    { capabilities = ["list"] }
path "%[1]s/issuer/+/json"              { capabilities = ["read"] }
`, mount)
}

// pki is a PKI mount of its own with a root, and a token holding the
// documented policy for it.
type pki struct {
	s     *vaulttest.Server
	mount string
	root  vaulttest.Issuer
	token string
}

func newPKI(t *testing.T, s *vaulttest.Server) *pki {
	t.Helper()
	p := &pki{s: s, mount: s.NewPKIMount(t, "pki-")}
	p.root = s.GenerateRoot(t, p.mount, "meshca test root")
	s.PutPolicy(t, "meshca-"+p.mount, policy(p.mount))
	p.token = s.CreateToken(t, []string{"meshca-" + p.mount}, time.Hour)
	return p
}

func (p *pki) config() vaultca.Config {
	return vaultca.Config{Address: p.s.Addr, Mount: p.mount, Auth: vaultca.Auth{Token: p.token}}
}

func (p *pki) upstream(t *testing.T, edit ...func(*vaultca.Config)) *vaultca.Upstream {
	t.Helper()
	cfg := p.config()
	for _, e := range edit {
		e(&cfg)
	}
	up, err := vaultca.New(cfg)
	require.NoError(t, err)
	return up
}

func opts() ca.AuthorityOptions {
	return ca.AuthorityOptions{TrustDomain: td, IntermediateTTL: 48 * time.Hour}
}

// intermediate has up sign an intermediate, checked as the CA checks it.
func intermediate(t *testing.T, up ca.Upstream) ca.UpstreamIntermediate {
	t.Helper()
	ctx := context.Background()
	roots, err := up.Roots(ctx)
	require.NoError(t, err)
	inter, err := ca.NewUpstreamIntermediate(ctx, opts(), up, roots)
	require.NoError(t, err)
	return inter
}

func TestSignIntermediate(t *testing.T) {
	p := newPKI(t, vault.Server(t))
	inter := intermediate(t, p.upstream(t))

	c := inter.Cert
	require.Equal(t, p.root.Cert.Raw, inter.Root.Raw)
	require.NoError(t, c.CheckSignatureFrom(p.root.Cert))
	require.True(t, c.IsCA)
	require.NotZero(t, c.KeyUsage&x509.KeyUsageCertSign)
	require.True(t, c.MaxPathLenZero, "the intermediate signs leaves only")
	require.Len(t, c.URIs, 1)
	require.Equal(t, "spiffe://vaultca.test", c.URIs[0].String())
	require.True(t, strings.HasPrefix(c.Subject.CommonName, "meshca intermediate vaultca.test "), c.Subject.CommonName)
	require.InDelta(t, (48 * time.Hour).Seconds(), time.Until(c.NotAfter).Seconds(), 120, "the TTL asked for")
}

func TestRoots(t *testing.T) {
	p := newPKI(t, vault.Server(t))
	up := p.upstream(t)
	ctx := context.Background()

	roots, err := up.Roots(ctx)
	require.NoError(t, err)
	requireCerts(t, roots, p.root.Cert)

	// A root added in Vault is one of the roots at once; the next
	// intermediate chains to it once it is the default.
	next := p.s.RotateRoot(t, p.mount, "meshca test root 2")
	roots, err = up.Roots(ctx)
	require.NoError(t, err)
	requireCerts(t, roots, p.root.Cert, next.Cert)
	require.Equal(t, p.root.Cert.Raw, intermediate(t, up).Root.Raw)

	p.s.SetDefaultIssuer(t, p.mount, next.ID)
	require.Equal(t, next.Cert.Raw, intermediate(t, up).Root.Raw)

	// An issuer pinned in Config signs whatever the default.
	pinned := p.upstream(t, func(c *vaultca.Config) { c.Issuer = p.root.ID })
	require.Equal(t, p.root.Cert.Raw, intermediate(t, pinned).Root.Raw)

	// A deleted issuer leaves the roots.
	p.s.DeleteIssuer(t, p.mount, p.root.ID)
	roots, err = up.Roots(ctx)
	require.NoError(t, err)
	requireCerts(t, roots, next.Cert)
}

// requireCerts checks that got holds want, in any order.
func requireCerts(t *testing.T, got []*x509.Certificate, want ...*x509.Certificate) {
	t.Helper()
	require.Len(t, got, len(want))
	for _, w := range want {
		found := false
		for _, g := range got {
			found = found || bytes.Equal(g.Raw, w.Raw)
		}
		require.True(t, found, "missing %q", w.Subject)
	}
}

func TestDenied(t *testing.T) {
	s := vault.Server(t)
	p := newPKI(t, s)
	// May read the roots, not sign.
	s.PutPolicy(t, "read-"+p.mount, fmt.Sprintf(`path "%s/issuers" { capabilities = ["list"] }`, p.mount))
	readOnly := s.CreateToken(t, []string{"read-" + p.mount}, time.Hour)
	up := p.upstream(t, func(c *vaultca.Config) { c.Auth.Token = readOnly })

	roots, err := up.Roots(context.Background())
	require.NoError(t, err)
	_, err = ca.NewUpstreamIntermediate(context.Background(), opts(), up, roots)
	require.ErrorIs(t, err, ca.ErrUpstreamDenied)
	require.EqualError(t, err, fmt.Sprintf("vaultca: signing the intermediate: Vault at %s denied it (HTTP 403: permission denied); "+
		"the token's policy must allow it: ca: the upstream authority denied the request", s.Addr))
	require.NotContains(t, err.Error(), readOnly)

	// A revoked token: the same, and no token in the error either. (Vault
	// serves the roots without a token.)
	s.RevokeToken(t, p.token)
	_, err = ca.NewUpstreamIntermediate(context.Background(), opts(), p.upstream(t), roots)
	require.ErrorIs(t, err, ca.ErrUpstreamDenied)
	require.EqualError(t, err, fmt.Sprintf("vaultca: signing the intermediate: Vault at %s refused the token (HTTP 403: permission denied; invalid token): "+
		"it is unknown, revoked or expired: ca: the upstream authority denied the request", s.Addr))
	require.NotContains(t, err.Error(), p.token)
}

func TestTokenFile(t *testing.T) {
	s := vault.Server(t)
	p := newPKI(t, s)
	file := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(file, []byte(p.token+"\n"), 0o600))
	up := p.upstream(t, func(c *vaultca.Config) { c.Auth = vaultca.Auth{TokenFile: file} })
	_, err := up.Roots(context.Background())
	require.NoError(t, err)

	// Vault Agent writes a new token and the old one is revoked: the file
	// is read again when Vault refuses the old one.
	fresh := s.CreateToken(t, []string{"meshca-" + p.mount}, time.Hour)
	require.NoError(t, os.WriteFile(file, []byte(fresh), 0o600))
	s.RevokeToken(t, p.token)
	intermediate(t, up)

	t.Run("open to others", func(t *testing.T) {
		open := filepath.Join(t.TempDir(), "token")
		require.NoError(t, os.WriteFile(open, []byte(fresh), 0o644))
		up := p.upstream(t, func(c *vaultca.Config) { c.Auth = vaultca.Auth{TokenFile: open} })
		_, err := up.Roots(context.Background())
		require.ErrorIs(t, err, securefile.ErrTooOpen)
		require.ErrorContains(t, err, "vaultca: reading the Vault token file: ")
		require.NotContains(t, err.Error(), fresh)
	})
}

// A renewable token is renewed once a third of its TTL is left.
func TestTokenRenewal(t *testing.T) {
	s := vault.Server(t)
	p := newPKI(t, s)
	clk := clocktesting.NewFakePassiveClock(time.Now())
	up := p.upstream(t, func(c *vaultca.Config) { c.Clock = clk })
	ctx := context.Background()
	_, err := up.Roots(ctx)
	require.NoError(t, err)
	require.Nil(t, s.LookupToken(t, p.token)["last_renewal_time"], "not renewed yet")

	clk.SetTime(clk.Now().Add(30 * time.Minute))
	_, err = up.Roots(ctx)
	require.NoError(t, err)
	require.Nil(t, s.LookupToken(t, p.token)["last_renewal_time"], "half its TTL left: not renewed")

	clk.SetTime(clk.Now().Add(11 * time.Minute))
	_, err = up.Roots(ctx)
	require.NoError(t, err)
	require.NotNil(t, s.LookupToken(t, p.token)["last_renewal_time"], "renewed")
}

// Vault stopped: every call fails as unavailable, and the token is not
// in the error; restarted, calls succeed again.
func TestUnavailable(t *testing.T) {
	s := vaulttest.Start(t)
	p := newPKI(t, s)
	up := p.upstream(t)
	ctx := context.Background()
	_, err := up.Roots(ctx)
	require.NoError(t, err)

	s.Stop(t)
	_, err = up.Roots(ctx)
	require.ErrorIs(t, err, ca.ErrUpstreamUnavailable)
	require.ErrorContains(t, err, "vaultca: listing the issuers: Vault at "+s.Addr+" cannot be reached: ca: the upstream authority is unavailable: ")
	require.ErrorContains(t, err, "connection refused")
	require.NotContains(t, err.Error(), p.token)

	s.Restart(t)
	intermediate(t, up)
}

func TestTLS(t *testing.T) {
	s := vaulttest.Start(t, vaulttest.WithTLS())
	p := newPKI(t, s)

	t.Run("with the CA file", func(t *testing.T) {
		intermediate(t, p.upstream(t, func(c *vaultca.Config) { c.CAFile = s.CAFile }))
	})
	t.Run("without", func(t *testing.T) {
		_, err := p.upstream(t).Roots(context.Background())
		require.ErrorIs(t, err, ca.ErrUpstreamUnavailable)
		require.ErrorContains(t, err, "certificate signed by unknown authority")
	})
}

func TestNewConfig(t *testing.T) {
	tests := []struct {
		name string
		cfg  vaultca.Config
		want string
	}{
		{"no address", vaultca.Config{Auth: vaultca.Auth{Token: "t"}}, "vaultca: Address is required"},
		{"not a URL", vaultca.Config{Address: "vault:8200", Auth: vaultca.Auth{Token: "t"}}, `vaultca: Address "vault:8200" is not an http(s) URL such as https://vault:8200`},
		{"no auth", vaultca.Config{Address: "https://vault:8200"}, "vaultca: set exactly one of Auth.Token, Auth.TokenFile and Auth.Kubernetes"},
		{"two auths", vaultca.Config{Address: "https://vault:8200", Auth: vaultca.Auth{Token: "t", TokenFile: "f"}}, "vaultca: set exactly one of Auth.Token, Auth.TokenFile and Auth.Kubernetes"},
		{"kubernetes without a role", vaultca.Config{Address: "https://vault:8200", Auth: vaultca.Auth{Kubernetes: &vaultca.KubernetesAuth{}}}, "vaultca: Auth.Kubernetes.Role is required"},
		{"issuer path", vaultca.Config{Address: "https://vault:8200", Issuer: "a/b", Auth: vaultca.Auth{Token: "t"}}, `vaultca: Issuer "a/b" is not an issuer ID or name`},
		{"missing CA file", vaultca.Config{Address: "https://vault:8200", CAFile: "/nonexistent/ca.pem", Auth: vaultca.Auth{Token: "t"}}, "vaultca: reading CAFile: open /nonexistent/ca.pem: no such file or directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := vaultca.New(tt.cfg)
			require.EqualError(t, err, tt.want)
		})
	}
}
