package vaulttest

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"

	"github.com/meshca/meshca/internal/pemutil"
)

// MaxLeaseTTL is the longest lifetime a mount of NewPKIMount signs for,
// longer than Vault's default of 32 days so that intermediates of a year
// are not cut short.
const MaxLeaseTTL = 10 * 365 * 24 * time.Hour

// Issuer is an issuer of a PKI mount.
type Issuer struct {
	// ID is the issuer's ID in its mount.
	ID string

	// Cert is its certificate.
	Cert *x509.Certificate
}

func (s *Server) ctx(t testing.TB) (context.Context, context.CancelFunc) {
	return context.WithTimeout(t.Context(), callTimeout)
}

// Write writes data at path with the root token and returns the response,
// failing the test on error.
func (s *Server) Write(t testing.TB, path string, data map[string]any) *vault.Secret {
	t.Helper()
	ctx, cancel := s.ctx(t)
	defer cancel()
	secret, err := s.Client.Logical().WriteWithContext(ctx, path, data)
	if err != nil {
		t.Fatalf("vaulttest: writing %s: %v", path, err)
	}
	return secret
}

// NewPKIMount enables a PKI secrets engine at a new path starting with
// prefix (a random suffix keeps tests sharing a server apart), tuned to
// sign for up to MaxLeaseTTL, and returns the path.
func (s *Server) NewPKIMount(t testing.TB, prefix string) string {
	t.Helper()
	raw := make([]byte, 4)
	if _, err := rand.Read(raw); err != nil {
		t.Fatalf("vaulttest: %v", err)
	}
	path := prefix + hex.EncodeToString(raw)
	s.EnablePKI(t, path)
	return path
}

// EnablePKI enables a PKI secrets engine at path, tuned to sign for up to
// MaxLeaseTTL.
func (s *Server) EnablePKI(t testing.TB, path string) {
	t.Helper()
	ctx, cancel := s.ctx(t)
	defer cancel()
	err := s.Client.Sys().MountWithContext(ctx, path, &vault.MountInput{
		Type:   "pki",
		Config: vault.MountConfigInput{MaxLeaseTTL: MaxLeaseTTL.String()},
	})
	if err != nil {
		t.Fatalf("vaulttest: enabling PKI at %s: %v", path, err)
	}
}

// GenerateRoot generates a root with an internal P-256 key in mount
// (<mount>/root/generate/internal), valid for MaxLeaseTTL. The mount's
// first issuer becomes its default.
func (s *Server) GenerateRoot(t testing.TB, mount, commonName string) Issuer {
	t.Helper()
	return s.issuerOf(t, mount+"/root/generate/internal", s.Write(t, mount+"/root/generate/internal", rootParams(commonName)))
}

// RotateRoot adds a root with a new internal P-256 key to mount
// (<mount>/root/rotate/internal). It is not the default issuer: see
// SetDefaultIssuer.
func (s *Server) RotateRoot(t testing.TB, mount, commonName string) Issuer {
	t.Helper()
	return s.issuerOf(t, mount+"/root/rotate/internal", s.Write(t, mount+"/root/rotate/internal", rootParams(commonName)))
}

func rootParams(commonName string) map[string]any {
	return map[string]any{
		"common_name": commonName,
		"ttl":         fmt.Sprintf("%ds", int64(MaxLeaseTTL/time.Second)),
		"key_type":    "ec",
		"key_bits":    256,
	}
}

func (s *Server) issuerOf(t testing.TB, path string, secret *vault.Secret) Issuer {
	t.Helper()
	if secret == nil || secret.Data == nil {
		t.Fatalf("vaulttest: %s returned nothing", path)
	}
	pemCert, _ := secret.Data["certificate"].(string)
	certs, err := pemutil.ParseCertificates([]byte(pemCert))
	if err != nil || len(certs) != 1 {
		t.Fatalf("vaulttest: %s returned no certificate: %v", path, err)
	}
	id, _ := secret.Data["issuer_id"].(string)
	if id == "" {
		t.Fatalf("vaulttest: %s returned no issuer_id", path)
	}
	return Issuer{ID: id, Cert: certs[0]}
}

// SetDefaultIssuer makes the issuer ref (an ID or name) the default of
// mount (<mount>/root/replace): the one <mount>/root/sign-intermediate
// signs with.
func (s *Server) SetDefaultIssuer(t testing.TB, mount, ref string) {
	t.Helper()
	s.Write(t, mount+"/root/replace", map[string]any{"default": ref})
}

// DeleteIssuer deletes the issuer ref of mount, key kept.
func (s *Server) DeleteIssuer(t testing.TB, mount, ref string) {
	t.Helper()
	ctx, cancel := s.ctx(t)
	defer cancel()
	if _, err := s.Client.Logical().DeleteWithContext(ctx, mount+"/issuer/"+ref); err != nil {
		t.Fatalf("vaulttest: deleting issuer %s of %s: %v", ref, mount, err)
	}
}

// CreateRole creates (or replaces) the role name of the PKI mount with
// data, such as {"allowed_uri_sans": "spiffe://*", "max_ttl": "1h"}.
func (s *Server) CreateRole(t testing.TB, mount, name string, data map[string]any) {
	t.Helper()
	s.Write(t, mount+"/roles/"+name, data)
}

// PutPolicy creates (or replaces) the ACL policy name.
func (s *Server) PutPolicy(t testing.TB, name, policy string) {
	t.Helper()
	ctx, cancel := s.ctx(t)
	defer cancel()
	if err := s.Client.Sys().PutPolicyWithContext(ctx, name, policy); err != nil {
		t.Fatalf("vaulttest: writing policy %s: %v", name, err)
	}
}

// CreateToken creates a renewable token with policies (and Vault's
// "default" policy) and returns it. It lives ttl, renewable up to ten
// times that; zero means Vault's defaults (32 days).
func (s *Server) CreateToken(t testing.TB, policies []string, ttl time.Duration) string {
	t.Helper()
	ctx, cancel := s.ctx(t)
	defer cancel()
	req := &vault.TokenCreateRequest{Policies: policies}
	if ttl > 0 {
		req.TTL = ttl.String()
		req.ExplicitMaxTTL = (10 * ttl).String()
	}
	secret, err := s.Client.Auth().Token().CreateWithContext(ctx, req)
	if err != nil {
		t.Fatalf("vaulttest: creating a token with policies %q: %v", policies, err)
	}
	return secret.Auth.ClientToken
}

// RevokeToken revokes token: Vault refuses it from now on.
func (s *Server) RevokeToken(t testing.TB, token string) {
	t.Helper()
	ctx, cancel := s.ctx(t)
	defer cancel()
	if err := s.Client.Auth().Token().RevokeTreeWithContext(ctx, token); err != nil {
		t.Fatalf("vaulttest: revoking a token: %v", err)
	}
}

// LookupToken returns what Vault knows of token (auth/token/lookup).
func (s *Server) LookupToken(t testing.TB, token string) map[string]any {
	t.Helper()
	ctx, cancel := s.ctx(t)
	defer cancel()
	secret, err := s.Client.Auth().Token().LookupWithContext(ctx, token)
	if err != nil {
		t.Fatalf("vaulttest: looking up a token: %v", err)
	}
	return secret.Data
}
