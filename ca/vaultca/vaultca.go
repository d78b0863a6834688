package vaultca

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	vault "github.com/hashicorp/vault/api"
	"k8s.io/utils/clock"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/pemutil"
)

// Defaults of Config's fields.
const (
	DefaultMount               = "pki"
	DefaultKubernetesMount     = "kubernetes"
	DefaultKubernetesTokenFile = "/var/run/secrets/kubernetes.io/serviceaccount/token"
	DefaultTimeout             = 30 * time.Second
)

const (
	maxIssuers      = 1000 // read from one mount
	maxIssuerRefLen = 128
)

// Config configures an Upstream. Address is required, and exactly one of
// Auth's methods.
type Config struct {
	// Address is Vault's URL, such as https://vault.vault.svc:8200.
	Address string

	// Mount is the path of the PKI secrets engine holding the roots;
	// empty means "pki".
	Mount string

	// Issuer names the root issuer that signs (an issuer ID or name of
	// the mount). Empty means the mount's default issuer, through
	// <mount>/root/sign-intermediate, so that making another root the
	// default in Vault moves the next intermediate under it. Set, it is
	// <mount>/issuer/<Issuer>/sign-intermediate.
	//
	// There is no role: sign-intermediate takes none (roles constrain
	// <mount>/issue and <mount>/sign, which issue leaves). What the
	// server may do is decided by its token's policy.
	Issuer string

	// Namespace is the Vault Enterprise namespace of the mount; empty
	// means none (the root namespace).
	Namespace string

	// CAFile holds the PEM certificates that Vault's serving certificate
	// must chain to; empty means the system's roots.
	CAFile string

	// TLSServerName is the name Vault's certificate must carry; empty
	// means the host of Address.
	TLSServerName string

	// Auth is how the server authenticates to Vault.
	Auth Auth

	// Timeout bounds each request to Vault; zero means DefaultTimeout.
	// Requests are not retried here: the caller retries with backoff.
	Timeout time.Duration

	// Clock tells the time for token lifetimes and certificate checks;
	// nil means the real clock.
	Clock clock.PassiveClock

	// Logger receives logins and renewals; nil discards.
	Logger *slog.Logger
}

// Auth is how the server authenticates to Vault: exactly one of Token,
// TokenFile and Kubernetes.
type Auth struct {
	// Token is a Vault token. It is renewed while Vault allows when it
	// is renewable and has a TTL.
	Token string

	// TokenFile holds a Vault token, such as the sink of a Vault Agent
	// (give the sink mode 0600). It is read at the first request, and
	// again when Vault refuses the token or it nears its expiry. A file
	// that group or others may read is refused.
	TokenFile string

	// Kubernetes logs in with the Kubernetes auth method.
	Kubernetes *KubernetesAuth
}

// KubernetesAuth configures a login with Vault's Kubernetes auth method:
// Vault reviews the pod's service-account token and returns a Vault token
// with the role's policies. The server logs in again before that token
// expires and when Vault refuses it.
type KubernetesAuth struct {
	// Role is the Vault role to log in as. Required.
	Role string

	// Mount is the path of the auth method; empty means "kubernetes".
	Mount string

	// TokenFile holds the service-account token (JWT), read at every
	// login so that a rotated projected token is picked up; empty means
	// DefaultKubernetesTokenFile.
	TokenFile string
}

// Upstream is a ca.Upstream in a Vault PKI mount. It is safe for
// concurrent use; requests to Vault are made one at a time.
type Upstream struct {
	cfg    Config
	client *vault.Client
	clock  clock.PassiveClock
	log    *slog.Logger

	mu    sync.Mutex // serialises requests and guards tok
	tok   token
	login func(ctx context.Context) (token, error) // gets a new token
}

var _ ca.Upstream = (*Upstream)(nil)

// New returns an Upstream for cfg. It does not contact Vault: the first
// request logs in.
func New(cfg Config) (*Upstream, error) {
	if cfg.Address == "" {
		return nil, errors.New("vaultca: Address is required")
	}
	u, err := url.Parse(cfg.Address)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return nil, fmt.Errorf("vaultca: Address %q is not an http(s) URL such as https://vault:8200", cfg.Address)
	}
	cfg.Mount = strings.Trim(cfg.Mount, "/")
	if cfg.Mount == "" {
		cfg.Mount = DefaultMount
	}
	if strings.Contains(cfg.Issuer, "/") || len(cfg.Issuer) > maxIssuerRefLen {
		return nil, fmt.Errorf("vaultca: Issuer %q is not an issuer ID or name", cfg.Issuer)
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	up := &Upstream{cfg: cfg, clock: cfg.Clock, log: cfg.Logger}
	if up.login, err = up.authMethod(); err != nil {
		return nil, err
	}
	tlsConfig := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: cfg.TLSServerName}
	if cfg.CAFile != "" {
		data, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("vaultca: reading CAFile: %w", err)
		}
		certs, err := pemutil.FindCertificates(data)
		if err != nil {
			return nil, fmt.Errorf("vaultca: CAFile %s: %w", cfg.CAFile, err)
		}
		tlsConfig.RootCAs = x509.NewCertPool()
		for _, c := range certs {
			tlsConfig.RootCAs.AddCert(c)
		}
	}
	// A client of our own: vault.DefaultConfig would read VAULT_ADDR,
	// VAULT_CACERT, VAULT_SKIP_VERIFY and the like from the environment,
	// and configuration is bound in cmd/ only.
	transport := &http.Transport{
		Proxy:               http.ProxyFromEnvironment,
		TLSClientConfig:     tlsConfig,
		TLSHandshakeTimeout: 10 * time.Second,
		ForceAttemptHTTP2:   true,
		MaxIdleConns:        4,
		IdleConnTimeout:     90 * time.Second,
	}
	client, err := vault.NewClient(&vault.Config{
		Address: cfg.Address,
		HttpClient: &http.Client{
			Transport: transport,
			// The vault client follows Vault's redirects itself.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		Timeout:    cfg.Timeout,
		MaxRetries: 0,
	})
	if err != nil {
		return nil, fmt.Errorf("vaultca: creating the Vault client: %w", err)
	}
	// NewClient takes VAULT_TOKEN and VAULT_NAMESPACE from the
	// environment; only Config counts.
	client.ClearToken()
	client.ClearNamespace()
	if cfg.Namespace != "" {
		client.SetNamespace(cfg.Namespace)
	}
	up.client = client
	return up, nil
}

// String names the upstream for logs and status: Vault's address and the
// mount.
func (u *Upstream) String() string {
	return fmt.Sprintf("Vault at %s, PKI mount %q", u.cfg.Address, u.cfg.Mount)
}

// RootRotation says how the trust domain's roots are rotated in Vault; the
// server says it when an operator asks it to rotate a root itself.
func (u *Upstream) RootRotation() string {
	m := u.cfg.Mount
	return fmt.Sprintf("roots are managed in Vault (%s): add a root with `vault write %s/root/rotate/internal common_name=...` "+
		"(it joins the trust bundle at the next check), make it the default issuer with `vault write %s/root/replace default=<issuer>` "+
		"once every workload holds it (the next intermediate chains to it; `meshctl intermediate rotate` takes one now), "+
		"and delete the old issuer with `vault delete %s/issuer/<ref>` (it leaves the bundle once no live leaf needs it)",
		u.cfg.Address, m, m, m)
}

// SignIntermediate has Vault sign csr as an intermediate valid for ttl
// (Vault caps it at the root's end and at the mount's max lease TTL), and
// returns it with the root that signed it.
func (u *Upstream) SignIntermediate(ctx context.Context, csr []byte, ttl time.Duration) ([]*x509.Certificate, error) {
	path := u.cfg.Mount + "/root/sign-intermediate"
	if u.cfg.Issuer != "" {
		path = u.cfg.Mount + "/issuer/" + url.PathEscape(u.cfg.Issuer) + "/sign-intermediate"
	}
	data := map[string]any{
		"csr":            string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr})),
		"use_csr_values": true,
		"format":         "pem",
		// The intermediate signs leaves only.
		"max_path_length": 0,
		// Sign with the issuer's own lifetime cap rather than fail when
		// the root ends first.
		"enforce_leaf_not_after_behavior": false,
	}
	if ttl > 0 {
		data["ttl"] = fmt.Sprintf("%ds", int64(ttl/time.Second))
	}
	secret, err := u.do(ctx, "signing the intermediate", func(ctx context.Context, c *vault.Client) (*vault.Secret, error) {
		return c.Logical().WriteWithContext(ctx, path, data)
	})
	if err != nil {
		return nil, err
	}
	if secret == nil || secret.Data == nil {
		return nil, fmt.Errorf("vaultca: %s/sign-intermediate returned no certificate", u.cfg.Mount)
	}
	cert, err := parseOne(secret.Data["certificate"])
	if err != nil {
		return nil, fmt.Errorf("vaultca: the certificate Vault signed: %w", err)
	}
	chain := []*x509.Certificate{cert}
	// ca_chain is the signing issuer's chain, up to its root; older
	// Vaults give issuing_ca alone.
	caChain, err := parseList(secret.Data["ca_chain"])
	if err != nil {
		return nil, fmt.Errorf("vaultca: the chain Vault returned: %w", err)
	}
	if len(caChain) == 0 {
		issuing, err := parseOne(secret.Data["issuing_ca"])
		if err != nil {
			return nil, fmt.Errorf("vaultca: the issuing CA Vault returned: %w", err)
		}
		caChain = []*x509.Certificate{issuing}
	}
	for _, c := range caChain {
		if !bytes.Equal(c.Raw, cert.Raw) {
			chain = append(chain, c)
		}
	}
	return chain, nil
}

// Roots returns the root issuers of the mount: every issuer whose
// certificate is self-signed. Intermediate issuers of the mount, if any,
// are left out.
func (u *Upstream) Roots(ctx context.Context) ([]*x509.Certificate, error) {
	list, err := u.do(ctx, "listing the issuers", func(ctx context.Context, c *vault.Client) (*vault.Secret, error) {
		return c.Logical().ListWithContext(ctx, u.cfg.Mount+"/issuers")
	})
	if err != nil {
		return nil, err
	}
	var ids []string
	if list != nil && list.Data != nil {
		keys, _ := list.Data["keys"].([]any)
		for _, k := range keys {
			if id, ok := k.(string); ok && id != "" && !strings.Contains(id, "/") {
				ids = append(ids, id)
			}
		}
	}
	if len(ids) == 0 {
		return nil, fmt.Errorf("vaultca: PKI mount %q has no issuers: generate a root there (vault write %s/root/generate/internal common_name=...)", u.cfg.Mount, u.cfg.Mount)
	}
	if len(ids) > maxIssuers {
		return nil, fmt.Errorf("vaultca: PKI mount %q lists %d issuers; at most %d are read", u.cfg.Mount, len(ids), maxIssuers)
	}
	sort.Strings(ids) // a stable order, whatever Vault's
	var roots []*x509.Certificate
	for _, id := range ids {
		issuer, err := u.do(ctx, "reading issuer "+id, func(ctx context.Context, c *vault.Client) (*vault.Secret, error) {
			return c.Logical().ReadWithContext(ctx, u.cfg.Mount+"/issuer/"+url.PathEscape(id)+"/json")
		})
		if err != nil {
			return nil, err
		}
		if issuer == nil || issuer.Data == nil {
			continue // deleted since the list
		}
		cert, err := parseOne(issuer.Data["certificate"])
		if err != nil {
			return nil, fmt.Errorf("vaultca: issuer %s: %w", id, err)
		}
		if cert.IsCA && bytes.Equal(cert.RawSubject, cert.RawIssuer) && cert.CheckSignatureFrom(cert) == nil {
			roots = append(roots, cert)
		}
	}
	if len(roots) == 0 {
		return nil, fmt.Errorf("vaultca: PKI mount %q has %d issuers and no root among them; meshca's intermediates are signed by a root", u.cfg.Mount, len(ids))
	}
	return roots, nil
}

func parseOne(v any) (*x509.Certificate, error) {
	s, _ := v.(string)
	if s == "" {
		return nil, errors.New("no certificate")
	}
	certs, err := pemutil.ParseCertificates([]byte(s))
	if err != nil {
		return nil, err
	}
	if len(certs) != 1 {
		return nil, fmt.Errorf("want one certificate, found %d", len(certs))
	}
	return certs[0], nil
}

func parseList(v any) ([]*x509.Certificate, error) {
	items, _ := v.([]any)
	var out []*x509.Certificate
	for _, item := range items {
		c, err := parseOne(item)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}
