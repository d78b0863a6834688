package main

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/vaultca"
	"github.com/meshca/meshca/internal/server"
)

// Config is meshca-server's configuration file (YAML). Every field is
// optional; the zero value of each is documented and is the embedded
// default that `make run` uses.
type Config struct {
	// TrustDomain issued for. Default "meshca.local".
	TrustDomain string `json:"trustDomain"`

	// ListenAddress of the gRPC API (TLS). Default "127.0.0.1:8443".
	ListenAddress string `json:"listenAddress"`

	// MetricsAddress of the Prometheus /metrics endpoint (plain HTTP).
	// Default "127.0.0.1:9402"; "off" disables it.
	MetricsAddress string `json:"metricsAddress"`

	// DataDir holds the authority set (keys included) and bundle.pem.
	// Default ".meshca".
	DataDir string `json:"dataDir"`

	// Authority says where the signing authorities come from.
	Authority AuthorityConfig `json:"authority"`

	// Leaf is the TTL policy of workload certificates.
	Leaf LeafConfig `json:"leaf"`

	// BootstrapTokens is a static token file (identity.TokenFile format).
	// Default none.
	BootstrapTokens string `json:"bootstrapTokens"`

	// Server is the server's own identity.
	Server ServerConfig `json:"server"`

	// BundleRefreshHint told to bundle consumers. Default 5m.
	BundleRefreshHint Duration `json:"bundleRefreshHint"`

	// LogLevel is debug, info, warn or error. Default info.
	LogLevel string `json:"logLevel"`

	// AdminSocket is the Unix socket of the admin API (meshctl root ...),
	// created mode 0600: whoever can open it is an operator. Default
	// <dataDir>/admin.sock; "off" disables it.
	AdminSocket string `json:"adminSocket"`

	// HealthAddress serves gRPC health in plain text, for kubelet probes
	// (which cannot speak TLS). Default off.
	HealthAddress string `json:"healthAddress"`

	// Kubernetes runs the server in a cluster: service-account tokens
	// reviewed with the API server, state in a Secret shared by replicas,
	// one leader that rotates and publishes bundles. Off by default.
	Kubernetes KubernetesConfig `json:"kubernetes"`

	// Istio serves Istio's CA API on the gRPC listener. On by default.
	Istio IstioConfig `json:"istio"`

	// Linkerd serves Linkerd's identity API on the gRPC listener. On by
	// default in Kubernetes mode, and only there.
	Linkerd LinkerdConfig `json:"linkerd"`

	// Profiling serves Go's /debug/pprof on the metrics address, for
	// finding where CPU time goes under load. Default off.
	Profiling bool `json:"profiling"`

	// Demo creates a demo bootstrap token in DataDir (demo-token, mode
	// 0600) for spiffe://<td>/ns/default/sa/demo and prints a ready-to-paste
	// meshctl command. For trying meshca out, never for production.
	Demo bool `json:"demo"`

	// Federation federates the trust domain with others (SPIFFE
	// federation): a bundle endpoint serving this trust domain's bundle to
	// them, and the peers whose bundles are fetched and sent to workloads.
	Federation FederationConfig `json:"federation"`

	// Policy narrows which identities this server issues (per-cluster
	// scoping under a shared root). Default: the whole trust domain.
	Policy PolicyConfig `json:"policy"`

	// Limits bound what one source address or one identity may ask of
	// the gRPC API. Every bound is off by default (0); docs/limits.md
	// gives recommended production values.
	Limits LimitsConfig `json:"limits"`

	// Admission bounds the signing work in flight and queues the rest,
	// first certificates ahead of renewals; what would wait too long is
	// shed with a retry hint. On by default (docs/limits.md).
	Admission AdmissionConfig `json:"admission"`
}

// AdmissionConfig bounds the signing work of the whole server. 0 means
// the default.
type AdmissionConfig struct {
	// MaxInFlight bounds the requests checking a CSR or signing at once.
	// Default twice the CPUs the server may use; -1 turns admission off.
	MaxInFlight int `json:"maxInFlight"`

	// MaxQueue bounds the requests waiting for signing capacity. Default
	// 4096.
	MaxQueue int `json:"maxQueue"`

	// MaxWaitFirst and MaxWaitRenewal bound how long a first certificate
	// and a renewal may be expected to wait before they are shed.
	// Defaults 5s and 250ms.
	MaxWaitFirst   Duration `json:"maxWaitFirst"`
	MaxWaitRenewal Duration `json:"maxWaitRenewal"`

	// MaxHandshakes bounds the TLS handshakes in progress: at the bound,
	// no connection is accepted until one ends. Default 256; -1 turns
	// the bound off.
	MaxHandshakes int `json:"maxHandshakes"`
}

// LimitsConfig bounds callers of the gRPC API. 0 means no bound.
type LimitsConfig struct {
	// PerSource rate-limits the certificate requests of one source IP
	// (IPv6: one /64), checked before authentication. Default off.
	PerSource RateConfig `json:"perSource"`

	// PerIdentity rate-limits the certificate requests of one SPIFFE ID,
	// across the native, Istio and Linkerd APIs, checked after
	// authentication and before the CSR is verified. Default off.
	PerIdentity RateConfig `json:"perIdentity"`

	// MaxConnectionsPerSource bounds the open connections of one source
	// IP; more are closed as they are accepted. Default off.
	MaxConnectionsPerSource int `json:"maxConnectionsPerSource"`

	// MaxWatchStreamsPerSource bounds the bundle watch streams of one
	// source IP. Default off.
	MaxWatchStreamsPerSource int `json:"maxWatchStreamsPerSource"`

	// MaxTrackedKeys bounds the sources, and the identities, a rate limit
	// tracks at once. Default 100000.
	MaxTrackedKeys int `json:"maxTrackedKeys"`
}

// RateConfig is a token bucket.
type RateConfig struct {
	// Rate is the sustained number of requests a second; 0 is no limit.
	Rate float64 `json:"rate"`

	// Burst is how many requests may come at once. Default the rate,
	// rounded up.
	Burst int `json:"burst"`
}

// AuthorityConfig selects and configures the signing authorities.
type AuthorityConfig struct {
	// Mode is "selfsigned" (default: a root and intermediate created in
	// DataDir on first start and reused after), "files" (an operator's
	// CA laid out as Istio's cacerts) or "vault" (the roots in a Vault PKI
	// mount, which signs the intermediates; see Vault).
	Mode string `json:"mode"`

	// RootTTL of a created root. Default 87600h (10 years). Not in mode
	// vault, whose roots are Vault's.
	RootTTL Duration `json:"rootTTL"`

	// IntermediateTTL of a created intermediate. Default 8760h (1 year).
	// Intermediates rotate by themselves: a successor is prepared with a
	// third of the life left and takes over with a sixth left. In mode
	// vault it is the TTL asked of Vault, which caps it at the root's end
	// and the mount's max lease TTL.
	IntermediateTTL Duration `json:"intermediateTTL"`

	// RotationCheckInterval is how often the intermediate is checked.
	// Default a minute, or a twentieth of the intermediate's life if
	// shorter.
	RotationCheckInterval Duration `json:"rotationCheckInterval"`

	// Files of mode "files".
	Files FilesConfig `json:"files"`

	// Vault of mode "vault".
	Vault VaultConfig `json:"vault"`
}

// KubernetesConfig configures the server in a Kubernetes cluster.
type KubernetesConfig struct {
	// Enabled turns Kubernetes mode on.
	Enabled bool `json:"enabled"`

	// Kubeconfig is a kubeconfig file; empty means the in-cluster config.
	Kubeconfig string `json:"kubeconfig"`

	// Namespace the server runs in, holding its Secret and Lease. Default
	// $POD_NAMESPACE.
	Namespace string `json:"namespace"`

	// PodName identifies this replica in leader election. Default
	// $POD_NAME, else the host name.
	PodName string `json:"podName"`

	// TokenAudiences a service-account token must be valid for. Default
	// ["meshca"].
	TokenAudiences []string `json:"tokenAudiences"`

	// StateSecret holds the authority set (modes selfsigned and vault). Default
	// "meshca-state".
	StateSecret string `json:"stateSecret"`

	// BanSecret holds the emergency bans (meshctl ban), written by any
	// replica and watched by all. Default "meshca-bans".
	BanSecret string `json:"banSecret"`

	// LeaseName is the coordination Lease of leader election. Default
	// "meshca-leader".
	LeaseName string `json:"leaseName"`

	// BundleConfigMap is the name of the ConfigMap holding the trust
	// bundle in every namespace; "off" disables publishing. Default
	// "meshca-trust-bundle".
	BundleConfigMap string `json:"bundleConfigMap"`

	// LeaseDuration, RenewDeadline and RetryPeriod tune leader election.
	// Defaults 15s, 10s and 2s: a leader that dies is replaced within
	// about 17s; signing never waits for it.
	LeaseDuration Duration `json:"leaseDuration"`
	RenewDeadline Duration `json:"renewDeadline"`
	RetryPeriod   Duration `json:"retryPeriod"`
}

// IstioConfig configures Istio's CA API,
// istio.v1.auth.IstioCertificateService/CreateCertificate: Istio's proxies
// (pilot-agent) point CA_ADDR at meshca. Callers authenticate as on the
// native API: a bearer token (a static bootstrap token, or in Kubernetes
// mode a service-account token for one of Audiences) or their current
// certificate over mTLS.
type IstioConfig struct {
	// Enabled serves the API. Default true.
	Enabled *bool `json:"enabled"`

	// Audiences a service-account token must be valid for on this API,
	// one of them (Kubernetes mode). Default ["istio-ca"], Istio's own.
	// Bootstrap tokens are bound to no audience and are accepted here too.
	Audiences []string `json:"audiences"`
}

// LinkerdConfig configures Linkerd's identity API,
// io.linkerd.proxy.identity.Identity/Certify: Linkerd's proxies point
// their identity address at meshca. A proxy proves its identity,
// <sa>.<ns>.serviceaccount.identity.<controlPlaneNamespace>.<clusterDomain>,
// with its service-account token only: bootstrap tokens and client
// certificates are refused, so the API needs Kubernetes mode.
type LinkerdConfig struct {
	// Enabled serves the API. Default: true in Kubernetes mode, false
	// otherwise (where it cannot be turned on).
	Enabled *bool `json:"enabled"`

	// Audiences a service-account token must be valid for on this API,
	// one of them. Default ["identity.l5d.io"], Linkerd's own.
	Audiences []string `json:"audiences"`

	// ControlPlaneNamespace is Linkerd's namespace, part of every
	// identity name. Default "linkerd".
	ControlPlaneNamespace string `json:"controlPlaneNamespace"`

	// ClusterDomain ends every identity name (Linkerd's identity trust
	// domain). Default "cluster.local".
	ClusterDomain string `json:"clusterDomain"`
}

// FederationConfig configures SPIFFE federation. The server always keeps
// the peers added at run time (meshctl federation add) with their last
// good bundles in <dataDir>/federation.json, except in Kubernetes mode,
// where the peers are those of Peers only and the file is each replica's
// cache of their bundles.
type FederationConfig struct {
	// Endpoint serves this trust domain's bundle to peers. Off unless its
	// listenAddress is set.
	Endpoint FederationEndpointConfig `json:"endpoint"`

	// RefreshHint is how often a peer's bundle is fetched when the bundle
	// carries no spiffe_refresh_hint. Default 5m. (The endpoint serves
	// bundleRefreshHint as its own spiffe_refresh_hint.)
	RefreshHint Duration `json:"refreshHint"`

	// MinRefresh and MaxRefresh bound the refresh hint a peer's bundle
	// asks for. Defaults 30s and 1h.
	MinRefresh Duration `json:"minRefresh"`
	MaxRefresh Duration `json:"maxRefresh"`

	// Peers are trust domains federated with from the start. They are
	// changed here, not with meshctl. Default none.
	Peers []FederationPeerConfig `json:"peers"`
}

// FederationEndpointConfig is the SPIFFE bundle endpoint: this trust
// domain's bundle at "/" over HTTPS, with spiffe_sequence and
// spiffe_refresh_hint (bundleRefreshHint).
type FederationEndpointConfig struct {
	// ListenAddress of the endpoint, such as "0.0.0.0:8444". Empty means
	// no endpoint.
	ListenAddress string `json:"listenAddress"`

	// Profile is "https_spiffe" (default: the endpoint presents the
	// server's own X509-SVID, spiffe://<trustDomain>/meshca/server unless
	// server.id says otherwise) or "https_web" (a Web PKI certificate from
	// CertFile and KeyFile).
	Profile string `json:"profile"`

	// CertFile and KeyFile are the Web PKI certificate chain and key (PEM)
	// of profile https_web, read again when they change. The key file must
	// not be readable by group or others.
	CertFile string `json:"certFile"`
	KeyFile  string `json:"keyFile"`
}

// FederationPeerConfig is a federated trust domain: where its bundle
// endpoint is and how it authenticates.
type FederationPeerConfig struct {
	// TrustDomain of the peer. Required; not this server's.
	TrustDomain string `json:"trustDomain"`

	// URL of the peer's bundle endpoint, https. Required.
	URL string `json:"url"`

	// Profile of the endpoint: "https_spiffe" or "https_web". Required.
	Profile string `json:"profile"`

	// EndpointID is the SPIFFE ID the endpoint presents, for https_spiffe
	// (a meshca peer's is spiffe://<trustDomain>/meshca/server).
	EndpointID string `json:"endpointID"`

	// BundleFile holds the peer's bundle obtained out of band, PEM or
	// SPIFFE JSON, for https_spiffe: it authenticates the endpoint until
	// the first fetch, and is published until then.
	BundleFile string `json:"bundleFile"`

	// WebCAFile holds the PEM roots that verify the endpoint, for
	// https_web; empty means the system's roots.
	WebCAFile string `json:"webCAFile"`
}

// FilesConfig names a plugged-in CA's files.
type FilesConfig struct {
	RootCert  string `json:"rootCert"`
	CACert    string `json:"caCert"`
	CAKey     string `json:"caKey"`
	CertChain string `json:"certChain"`
}

// LeafConfig is the TTL policy of issued certificates.
type LeafConfig struct {
	// DefaultTTL when a request asks for none. Default 1h.
	DefaultTTL Duration `json:"defaultTTL"`

	// MaxTTL issued; longer requests are clamped. Default 24h.
	MaxTTL Duration `json:"maxTTL"`
}

// ServerConfig is the server's own serving certificate.
type ServerConfig struct {
	// ID is the server's SPIFFE ID, never issued to a workload. Default
	// spiffe://<trustDomain>/meshca/server.
	ID string `json:"id"`

	// DNSNames and IPAddresses are added to the serving certificate for
	// clients that check host names. Default localhost, 127.0.0.1, ::1.
	DNSNames    []string `json:"dnsNames"`
	IPAddresses []string `json:"ipAddresses"`
}

// Duration is a time.Duration written as a Go duration string ("90m").
type Duration time.Duration

// UnmarshalJSON reads a duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration must be a string such as \"1h30m\"")
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("duration %q: %w", s, err)
	}
	*d = Duration(v)
	return nil
}

// MarshalJSON writes a duration string.
func (d Duration) MarshalJSON() ([]byte, error) {
	return json.Marshal(time.Duration(d).String())
}

// loadConfig reads a YAML config file, refusing unknown fields.
func loadConfig(path string) (Config, error) {
	var cfg Config
	data, err := os.ReadFile(path)
	if err != nil {
		return cfg, fmt.Errorf("config: %w", err)
	}
	if err := yaml.UnmarshalStrict(data, &cfg); err != nil {
		return cfg, fmt.Errorf("config: %s: %w", path, err)
	}
	return cfg, nil
}

// offIfFalse turns "false", what YAML makes of an unquoted off, into
// "off".
func offIfFalse(s string) string {
	if s == "false" {
		return "off"
	}
	return s
}

// completeConfig is a Config with defaults applied and values parsed,
// validated once.
type completeConfig struct {
	Config
	td       spiffeid.TrustDomain
	serverID spiffeid.ID
	ips      []net.IP
	ttl      ca.TTLPolicy
	istio    server.IstioOptions
	linkerd  server.LinkerdOptions
	fed      federationSettings
	limits   server.Limits
	admit    server.Admission
	vault    *vaultca.Config // mode vault
}

// complete applies the defaults and checks every value.
func (c Config) complete() (*completeConfig, error) {
	if c.TrustDomain == "" {
		c.TrustDomain = "meshca.local"
	}
	if c.ListenAddress == "" {
		c.ListenAddress = "127.0.0.1:8443"
	}
	if c.MetricsAddress == "" {
		c.MetricsAddress = "127.0.0.1:9402"
	}
	if c.DataDir == "" {
		c.DataDir = ".meshca"
	}
	if c.Authority.Mode == "" {
		c.Authority.Mode = "selfsigned"
	}
	if c.Server.DNSNames == nil {
		c.Server.DNSNames = []string{"localhost"}
	}
	if c.Server.IPAddresses == nil {
		c.Server.IPAddresses = []string{"127.0.0.1", "::1"}
	}
	// YAML reads an unquoted off as false.
	c.MetricsAddress = offIfFalse(c.MetricsAddress)
	c.AdminSocket = offIfFalse(c.AdminSocket)
	if c.AdminSocket == "" {
		c.AdminSocket = filepath.Join(c.DataDir, "admin.sock")
	}
	if c.LogLevel == "" {
		c.LogLevel = "info"
	}
	if k := &c.Kubernetes; k.Enabled {
		k.Namespace = cmp.Or(k.Namespace, os.Getenv("POD_NAMESPACE"))
		if k.PodName == "" {
			host, _ := os.Hostname()
			k.PodName = cmp.Or(os.Getenv("POD_NAME"), host)
		}
		if len(k.TokenAudiences) == 0 {
			k.TokenAudiences = []string{"meshca"}
		}
		k.StateSecret = cmp.Or(k.StateSecret, "meshca-state")
		k.BanSecret = cmp.Or(k.BanSecret, "meshca-bans")
		k.LeaseName = cmp.Or(k.LeaseName, "meshca-leader")
		k.BundleConfigMap = cmp.Or(k.BundleConfigMap, "meshca-trust-bundle")
	}
	cc := &completeConfig{Config: c}
	var errs []error
	td, err := spiffeid.TrustDomainFromString(c.TrustDomain)
	if err != nil {
		errs = append(errs, fmt.Errorf("trustDomain: %w", err))
	}
	cc.td = td
	if c.Server.ID == "" && err == nil {
		cc.serverID = spiffeid.RequireFromPath(td, "/meshca/server")
	} else if c.Server.ID != "" {
		id, err := spiffeid.FromString(c.Server.ID)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("server.id: %w", err))
		case id.TrustDomain() != td:
			errs = append(errs, fmt.Errorf("server.id %q is not in trust domain %q", id, td))
		}
		cc.serverID = id
	}
	for _, s := range c.Server.IPAddresses {
		ip := net.ParseIP(s)
		if ip == nil {
			errs = append(errs, fmt.Errorf("server.ipAddresses: %q is not an IP address", s))
		}
		cc.ips = append(cc.ips, ip)
	}
	switch c.Authority.Mode {
	case "selfsigned":
	case "files":
		f := c.Authority.Files
		if f.RootCert == "" || f.CACert == "" || f.CAKey == "" {
			errs = append(errs, errors.New("authority.files: rootCert, caCert and caKey are required in mode \"files\""))
		}
	case "vault":
	default:
		errs = append(errs, fmt.Errorf("authority.mode %q: want \"selfsigned\", \"files\" or \"vault\"", c.Authority.Mode))
	}
	if err := cc.completeVault(); err != nil {
		errs = append(errs, err)
	}
	if err := cc.completePolicy(); err != nil {
		errs = append(errs, err)
	}
	cc.ttl = ca.TTLPolicy{Default: time.Duration(c.Leaf.DefaultTTL), Max: time.Duration(c.Leaf.MaxTTL)}
	if cc.ttl.Default < 0 || cc.ttl.Max < 0 {
		errs = append(errs, errors.New("leaf: TTLs must not be negative"))
	}
	if inter := time.Duration(c.Authority.IntermediateTTL); inter > 0 && inter < 2*cc.ttl.Longest() {
		errs = append(errs, fmt.Errorf("authority.intermediateTTL %s is shorter than twice the longest leaf (%s): intermediates would rotate at every check", inter, cc.ttl.Longest()))
	}
	if maxTTL := cc.ttl.Longest(); cc.ttl.Default > maxTTL {
		errs = append(errs, fmt.Errorf("leaf.defaultTTL %s is longer than the maximum %s", cc.ttl.Default, maxTTL))
	}
	if c.Kubernetes.Enabled {
		if c.Kubernetes.Namespace == "" {
			errs = append(errs, errors.New("kubernetes.namespace: set it, or POD_NAMESPACE (the downward API)"))
		}
		if c.Kubernetes.PodName == "" {
			errs = append(errs, errors.New("kubernetes.podName: set it, or POD_NAME (the downward API)"))
		}
	}
	if err := cc.completeFrontEnds(); err != nil {
		errs = append(errs, err)
	}
	if err := cc.completeFederation(); err != nil {
		errs = append(errs, err)
	}
	if err := cc.completeLimits(); err != nil {
		errs = append(errs, err)
	}
	if c.Profiling && c.MetricsAddress == "off" {
		errs = append(errs, errors.New("profiling is served on the metrics address, which is off"))
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("logLevel %q: want debug, info, warn or error", c.LogLevel))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return cc, nil
}

// completeFrontEnds sets the options of Istio's and Linkerd's APIs, with
// their defaults, and checks that no token audience is shared by two APIs:
// a token made for one API must not be a credential on another.
func (cc *completeConfig) completeFrontEnds() error {
	var errs []error
	cc.istio = server.IstioOptions{
		Enabled:   cc.Istio.Enabled == nil || *cc.Istio.Enabled,
		Audiences: orDefault(cc.Istio.Audiences, server.IstioAudience),
	}
	l := cc.Linkerd
	cc.linkerd = server.LinkerdOptions{
		Enabled:               cc.Kubernetes.Enabled,
		Audiences:             orDefault(l.Audiences, server.LinkerdAudience),
		ControlPlaneNamespace: cmp.Or(l.ControlPlaneNamespace, server.DefaultLinkerdControlPlaneNamespace),
		ClusterDomain:         cmp.Or(l.ClusterDomain, server.DefaultClusterDomain),
	}
	if l.Enabled != nil {
		cc.linkerd.Enabled = *l.Enabled
	}
	if cc.linkerd.Enabled && !cc.Kubernetes.Enabled {
		errs = append(errs, errors.New("linkerd.enabled needs kubernetes.enabled: Linkerd's proxies prove their identity with service-account tokens only"))
	}
	if problems := validation.IsDNS1123Label(cc.linkerd.ControlPlaneNamespace); len(problems) > 0 {
		errs = append(errs, fmt.Errorf("linkerd.controlPlaneNamespace %q is not a namespace name: %s", cc.linkerd.ControlPlaneNamespace, strings.Join(problems, "; ")))
	}
	if problems := validation.IsDNS1123Subdomain(cc.linkerd.ClusterDomain); len(problems) > 0 {
		errs = append(errs, fmt.Errorf("linkerd.clusterDomain %q is not a DNS domain: %s", cc.linkerd.ClusterDomain, strings.Join(problems, "; ")))
	}
	// Each API's audiences, by the config key that sets them.
	apis := []struct {
		key       string
		on        bool
		audiences []string
	}{
		{"kubernetes.tokenAudiences", cc.Kubernetes.Enabled, cc.Kubernetes.TokenAudiences},
		{"istio.audiences", cc.istio.Enabled, cc.istio.Audiences},
		{"linkerd.audiences", cc.linkerd.Enabled, cc.linkerd.Audiences},
	}
	for i, a := range apis {
		if slices.Contains(a.audiences, "") {
			errs = append(errs, fmt.Errorf("%s has an empty audience", a.key))
		}
		for _, b := range apis[i+1:] {
			if !a.on || !b.on || !cc.Kubernetes.Enabled {
				continue
			}
			for _, aud := range a.audiences {
				if slices.Contains(b.audiences, aud) {
					errs = append(errs, fmt.Errorf("%s and %s share the audience %q: a token for one API would be a credential on the other; give each its own", a.key, b.key, aud))
				}
			}
		}
	}
	return errors.Join(errs...)
}

// orDefault returns list, or a list of def when list is empty.
func orDefault(list []string, def string) []string {
	if len(list) == 0 {
		return []string{def}
	}
	return list
}

// completeLimits checks the limits and admission blocks and sets the
// server's Limits and Admission.
func (cc *completeConfig) completeLimits() error {
	l := cc.Limits
	var errs []error
	for _, r := range []struct {
		key string
		r   RateConfig
	}{{"limits.perSource", l.PerSource}, {"limits.perIdentity", l.PerIdentity}} {
		switch {
		case r.r.Rate < 0 || math.IsNaN(r.r.Rate) || math.IsInf(r.r.Rate, 0):
			errs = append(errs, fmt.Errorf("%s.rate %v: want requests a second, 0 for no limit", r.key, r.r.Rate))
		case r.r.Burst < 0:
			errs = append(errs, fmt.Errorf("%s.burst %d must not be negative", r.key, r.r.Burst))
		case r.r.Rate == 0 && r.r.Burst != 0:
			errs = append(errs, fmt.Errorf("%s.burst is set but rate is 0 (no limit): set a rate too", r.key))
		}
	}
	for _, n := range []struct {
		key string
		v   int
	}{{"limits.maxConnectionsPerSource", l.MaxConnectionsPerSource}, {"limits.maxWatchStreamsPerSource", l.MaxWatchStreamsPerSource}, {"limits.maxTrackedKeys", l.MaxTrackedKeys}} {
		if n.v < 0 {
			errs = append(errs, fmt.Errorf("%s %d must not be negative (0 is the default)", n.key, n.v))
		}
	}
	a := cc.Admission
	switch {
	case a.MaxInFlight < -1:
		errs = append(errs, fmt.Errorf("admission.maxInFlight %d: want a number of requests, 0 for the default or -1 for no bound", a.MaxInFlight))
	case a.MaxQueue < 0:
		errs = append(errs, fmt.Errorf("admission.maxQueue %d must not be negative (0 is the default)", a.MaxQueue))
	case a.MaxWaitFirst < 0 || a.MaxWaitRenewal < 0:
		errs = append(errs, errors.New("admission.maxWaitFirst and admission.maxWaitRenewal must not be negative (0 is the default)"))
	case a.MaxHandshakes < -1:
		errs = append(errs, fmt.Errorf("admission.maxHandshakes %d: want a number of handshakes, 0 for the default or -1 for no bound", a.MaxHandshakes))
	}
	cc.admit = server.Admission{
		MaxInFlight:    a.MaxInFlight,
		MaxQueue:       a.MaxQueue,
		MaxWaitFirst:   time.Duration(a.MaxWaitFirst),
		MaxWaitRenewal: time.Duration(a.MaxWaitRenewal),
		MaxHandshakes:  a.MaxHandshakes,
	}
	cc.limits = server.Limits{
		PerSource:                server.Rate{PerSecond: l.PerSource.Rate, Burst: l.PerSource.Burst},
		PerIdentity:              server.Rate{PerSecond: l.PerIdentity.Rate, Burst: l.PerIdentity.Burst},
		MaxConnectionsPerSource:  l.MaxConnectionsPerSource,
		MaxWatchStreamsPerSource: l.MaxWatchStreamsPerSource,
		MaxTrackedKeys:           l.MaxTrackedKeys,
	}
	return errors.Join(errs...)
}
