// Package vaultca is an upstream authority (ca.Upstream) in HashiCorp
// Vault's PKI secrets engine: the trust domain's roots live in a Vault PKI
// mount, and each cluster's meshca-server has Vault sign its intermediate.
// Two clusters of one trust domain that use one mount issue leaves that
// verify under each other's bundles.
//
// The intermediate's key is made in the server and never leaves it: Vault
// receives a CSR, carrying the trust domain's SPIFFE ID as its URI SAN, at
// <mount>/root/sign-intermediate with use_csr_values, and the result is
// checked before it is used (a CA certificate for that key and trust
// domain, signed by one of the mount's roots). The trust bundle is every
// root issuer of the mount (<mount>/issuers): a root added in Vault
// (<mount>/root/rotate/internal) joins the bundle, and once it is made the
// default issuer (<mount>/root/replace) the next intermediate chains to it.
//
// Vault authenticates the server by a token, a token file re-read when it
// changes (Vault Agent's sink), or the Kubernetes auth method with the
// pod's service-account token. Tokens are renewed, or the server logs in
// again, before they expire and after Vault refuses one. Tokens appear in
// no log and no error.
//
// Errors say what failed. Those of an unreachable, sealed or overloaded
// Vault wrap ca.ErrUpstreamUnavailable, and a refusal of the credentials
// or of their policy wraps ca.ErrUpstreamDenied, so that the caller keeps
// signing with its current intermediate and retries:
//
//	up, err := vaultca.New(vaultca.Config{
//		Address: "https://vault.vault.svc:8200",
//		CAFile:  "/etc/meshca/vault-ca.pem",
//		Auth:    vaultca.Auth{Kubernetes: &vaultca.KubernetesAuth{Role: "meshca"}},
//	})
//	if err != nil { ... }
//	set, err := ca.LoadOrCreateUpstream(ctx, store, ca.AuthorityOptions{TrustDomain: td}, up)
//	if err != nil { ... }
//	manager, err := rotation.NewManager(rotation.ManagerOptions{Upstream: up, ...})
//
// The Vault policy the server needs, for a mount at "pki" (the second line
// only with Config.Issuer; Vault serves the last two without a token too):
//
//	path "pki/root/sign-intermediate"     { capabilities = ["update"] }
//	path "pki/issuer/+/sign-intermediate" { capabilities = ["update"] }
//	path "pki/issuers"                    { capabilities = ["list"] }
//	path "pki/issuer/+/json"              { capabilities = ["read"] }
package vaultca
