// Package vaulttest starts a real Vault server on loopback for meshca's
// integration tests: the PKI secrets engine, tokens, policies and auth
// methods behave exactly as in production, which no fake gives.
//
// The binary comes from scripts/vault.sh (run by `make vault` and
// `make test`), which puts vault in $MESHCA_VAULT_ASSETS (default
// ~/.cache/meshca/vault). When it is missing a test fails and says how to
// get it; a developer without it can set MESHCA_SKIP_VAULT=1 to skip such
// tests instead (CI never does).
//
// The server runs in dev mode (`vault server -dev`, unsealed, a root token
// of the test's own, on 127.0.0.1 at a free port) with its storage in
// files, so that Stop and Restart make a real outage: the process ends,
// the port refuses connections, and a restarted server, unsealed again
// with the key of its first start, holds every mount, root and token it
// held before.
//
// A server starts in about a second, but a package's tests share one
// through a Shared, started lazily and stopped when the tests end; tests
// keep apart by working in PKI mounts of their own (NewPKIMount):
//
//	var vault vaulttest.Shared
//
//	func TestMain(m *testing.M) { vault.Run(m) }
//
//	func TestSign(t *testing.T) {
//		s := vault.Server(t)
//		mount := s.NewPKIMount(t, "pki-sign-")
//		root := s.GenerateRoot(t, mount, "test root")
//		// ... s.Client, or a client of Addr with s.CreateToken(...) ...
//	}
//
// Start gives a test a server of its own, stopped when the test ends: the
// one way to test an outage (Stop, Restart) without disturbing others.
package vaulttest
