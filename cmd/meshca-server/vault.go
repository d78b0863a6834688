package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"regexp"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/kubestore"
	"github.com/meshca/meshca/ca/vaultca"
	"github.com/meshca/meshca/identity"
)

// VaultConfig is authority.vault, for mode "vault": the trust domain's
// roots live in a Vault PKI mount, and Vault signs this server's
// intermediates (its key is made here and never leaves the server). Two
// clusters of one trust domain that point at the same mount issue leaves
// that verify under each other's bundles.
type VaultConfig struct {
	// Address of Vault, such as https://vault.vault.svc:8200. Required.
	Address string `json:"address"`

	// Mount is the path of the PKI secrets engine. Default "pki".
	Mount string `json:"mount"`

	// Issuer pins the root issuer that signs (an issuer ID or name of the
	// mount). Default: the mount's default issuer, so that a root made
	// the default in Vault signs the next intermediate.
	Issuer string `json:"issuer"`

	// Namespace is the Vault Enterprise namespace of the mount. Default
	// none.
	Namespace string `json:"namespace"`

	// CAFile holds the PEM roots Vault's serving certificate chains to.
	// Default the system's roots.
	CAFile string `json:"caFile"`

	// TLSServerName is the name Vault's certificate must carry. Default
	// the host of Address.
	TLSServerName string `json:"tlsServerName"`

	// Timeout bounds each request to Vault. Default 30s.
	Timeout Duration `json:"timeout"`

	// Auth is how the server authenticates to Vault: exactly one method.
	Auth VaultAuthConfig `json:"auth"`
}

// VaultAuthConfig is how the server authenticates to Vault: exactly one
// of Token, TokenFile and Kubernetes.
type VaultAuthConfig struct {
	// Token is a Vault token written in the config file. Discouraged: the
	// config file is rarely kept as a secret. Prefer TokenFile.
	Token string `json:"token"`

	// TokenFile holds a Vault token, such as a Vault Agent's sink; re-read
	// when Vault refuses the token or it nears expiry. It must not be
	// readable by group or others.
	TokenFile string `json:"tokenFile"`

	// Kubernetes logs in with Vault's Kubernetes auth method, with the
	// pod's service-account token.
	Kubernetes *VaultKubernetesAuthConfig `json:"kubernetes"`
}

// VaultKubernetesAuthConfig is a login with Vault's Kubernetes auth
// method.
type VaultKubernetesAuthConfig struct {
	// Role is the Vault role to log in as. Required.
	Role string `json:"role"`

	// Mount is the path of the auth method. Default "kubernetes".
	Mount string `json:"mount"`

	// TokenFile holds the service-account token. Default
	// /var/run/secrets/kubernetes.io/serviceaccount/token.
	TokenFile string `json:"tokenFile"`
}

// PolicyConfig narrows which identities this server issues.
type PolicyConfig struct {
	// AllowedPathPrefixes scope this server to part of its trust domain,
	// matched on whole path segments, such as ["/ns/payments/",
	// "/cluster/east/"]: a request for any other ID is refused
	// (PermissionDenied, reason outside_scope) on every API. Default
	// empty: the whole trust domain. For clusters that share a root; see
	// docs/multicluster.md for what it protects and what it does not.
	AllowedPathPrefixes []string `json:"allowedPathPrefixes"`
}

// vaultPathSegment is what a mount path or a namespace is made of: Vault
// paths of letters, digits and - _ . separated by single slashes.
var vaultPathSegment = regexp.MustCompile(`^[A-Za-z0-9_.-]+$`)

// checkVaultPath checks a Vault mount path or namespace.
func checkVaultPath(key, p string) error {
	for seg := range strings.SplitSeq(strings.Trim(p, "/"), "/") {
		if !vaultPathSegment.MatchString(seg) || seg == "." || seg == ".." {
			return fmt.Errorf("%s %q is not a Vault path such as \"pki\" or \"pki/meshca\" (letters, digits, - _ . between single slashes)", key, p)
		}
	}
	return nil
}

// completeVault checks authority.vault for mode vault (and that it is
// unset in the other modes), and sets cc.vault.
func (cc *completeConfig) completeVault() error {
	a := cc.Authority
	v := a.Vault
	if a.Mode != "vault" {
		if v != (VaultConfig{}) {
			return fmt.Errorf("authority.vault is set but authority.mode is %q: set mode \"vault\" to use it", a.Mode)
		}
		return nil
	}
	var errs []error
	if a.RootTTL != 0 {
		errs = append(errs, errors.New("authority.rootTTL has no effect in mode \"vault\": the roots are Vault's; remove it"))
	}
	if a.Files != (FilesConfig{}) {
		errs = append(errs, errors.New("authority.files is set but authority.mode is \"vault\""))
	}
	u, err := url.Parse(v.Address)
	switch {
	case v.Address == "":
		errs = append(errs, errors.New("authority.vault.address is required in mode \"vault\", such as https://vault.vault.svc:8200"))
	case err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || (u.Path != "" && u.Path != "/") || u.User != nil || u.RawQuery != "":
		errs = append(errs, fmt.Errorf("authority.vault.address %q is not a Vault address such as https://vault.vault.svc:8200", v.Address))
	case u.Scheme == "http" && (v.CAFile != "" || v.TLSServerName != ""):
		errs = append(errs, fmt.Errorf("authority.vault.address %q is plain http but caFile or tlsServerName is set: use https", v.Address))
	}
	mount := v.Mount
	if mount == "" {
		mount = vaultca.DefaultMount
	}
	if err := checkVaultPath("authority.vault.mount", mount); err != nil {
		errs = append(errs, err)
	}
	if v.Namespace != "" {
		if err := checkVaultPath("authority.vault.namespace", v.Namespace); err != nil {
			errs = append(errs, err)
		}
	}
	if v.Issuer != "" && !vaultPathSegment.MatchString(v.Issuer) {
		errs = append(errs, fmt.Errorf("authority.vault.issuer %q is not an issuer ID or name of the mount", v.Issuer))
	}
	if v.Timeout < 0 {
		errs = append(errs, fmt.Errorf("authority.vault.timeout %s must not be negative", time.Duration(v.Timeout)))
	}
	var methods []string
	if v.Auth.Token != "" {
		methods = append(methods, "token")
	}
	if v.Auth.TokenFile != "" {
		methods = append(methods, "tokenFile")
	}
	if k := v.Auth.Kubernetes; k != nil {
		methods = append(methods, "kubernetes")
		if k.Role == "" {
			errs = append(errs, errors.New("authority.vault.auth.kubernetes.role is required: the Vault role the server logs in as"))
		}
		if k.Mount != "" {
			if err := checkVaultPath("authority.vault.auth.kubernetes.mount", k.Mount); err != nil {
				errs = append(errs, err)
			}
		}
	}
	switch len(methods) {
	case 0:
		errs = append(errs, errors.New("authority.vault.auth: set one of tokenFile (a file holding a Vault token, such as a Vault Agent sink), kubernetes (Vault's Kubernetes auth method) or token"))
	case 1:
	default:
		errs = append(errs, fmt.Errorf("authority.vault.auth: set one method, not %s", strings.Join(methods, " and ")))
	}
	cfg := &vaultca.Config{
		Address:       v.Address,
		Mount:         mount,
		Issuer:        v.Issuer,
		Namespace:     v.Namespace,
		CAFile:        v.CAFile,
		TLSServerName: v.TLSServerName,
		Timeout:       time.Duration(v.Timeout),
		Auth:          vaultca.Auth{Token: v.Auth.Token, TokenFile: v.Auth.TokenFile},
	}
	if k := v.Auth.Kubernetes; k != nil {
		cfg.Auth.Kubernetes = &vaultca.KubernetesAuth{Role: k.Role, Mount: k.Mount, TokenFile: k.TokenFile}
	}
	cc.vault = cfg
	return errors.Join(errs...)
}

// completePolicy checks policy.allowedPathPrefixes.
func (cc *completeConfig) completePolicy() error {
	var errs []error
	for _, p := range cc.Policy.AllowedPathPrefixes {
		if err := identity.ValidatePathPrefix(p); err != nil {
			errs = append(errs, fmt.Errorf("policy.allowedPathPrefixes: %w", err))
		}
	}
	return errors.Join(errs...)
}

// identityPolicy is the policy of every front end: this trust domain,
// never the server's own ID, and only the allowed path prefixes if any.
func (cc *completeConfig) identityPolicy() identity.Policy {
	return identity.Policy{
		TrustDomain:         cc.td,
		Reserved:            []spiffeid.ID{cc.serverID},
		AllowedPathPrefixes: cc.Policy.AllowedPathPrefixes,
	}
}

// newVaultUpstream returns the Vault upstream of mode vault; it does not
// contact Vault.
func newVaultUpstream(cfg *completeConfig, log *slog.Logger) (*vaultca.Upstream, error) {
	vc := *cfg.vault
	vc.Logger = log.With("upstream", "vault")
	if vc.Auth.Token != "" {
		log.Warn("authority.vault.auth.token is set in the config file; prefer tokenFile (a Vault Agent sink) or kubernetes, and keep the file private")
	}
	return vaultca.New(vc)
}

// loadUpstreamAuthorities loads the authority set from store, or has Vault
// sign a first intermediate when there is none (ca.LoadOrCreateUpstream).
// With a Kubernetes Secret store, replicas starting together race to save
// the first set: the losers see kubestore.ErrConflict and load the
// winner's, as kubestore.LoadOrCreate does.
func loadUpstreamAuthorities(ctx context.Context, store ca.Store, opts ca.AuthorityOptions, up ca.Upstream) (*ca.AuthoritySet, error) {
	const attempts = 3
	var err error
	for range attempts {
		var set *ca.AuthoritySet
		set, err = ca.LoadOrCreateUpstream(ctx, store, opts, up)
		switch {
		case errors.Is(err, ca.ErrUpstreamUnavailable):
			return nil, fmt.Errorf("authority mode vault: %w (with no saved intermediate the server cannot start until Vault answers)", err)
		case !errors.Is(err, kubestore.ErrConflict):
			return set, err
		}
	}
	return nil, fmt.Errorf("authority mode vault: authorities changed by another writer at each of %d attempts: %w", attempts, err)
}
