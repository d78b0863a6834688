package main

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"sigs.k8s.io/yaml"

	"github.com/meshca/meshca/identity"
)

// Config is meshca-agent's configuration file (YAML). Flags override it.
// The zero value of each field is documented beside it.
type Config struct {
	// ServerAddress is meshca-server's gRPC address (a gRPC target).
	// Default "127.0.0.1:8443", meshca-server's own default.
	ServerAddress string `json:"serverAddress"`

	// ServerID is the SPIFFE ID meshca-server presents. Default
	// spiffe://<trustDomain>/meshca/server.
	ServerID string `json:"serverID"`

	// TrustDomain of the workload. Default the trust domain of SpiffeID
	// when set, else "meshca.local".
	TrustDomain string `json:"trustDomain"`

	// TrustBundleFile holds the trust domain's roots (PEM) that verify the
	// server before it sends its bundle: the bundle.pem of the
	// meshca-trust-bundle ConfigMap, or of the server's data directory.
	// Required.
	TrustBundleFile string `json:"trustBundleFile"`

	// TokenFile is a projected Kubernetes service-account token, re-read
	// at every use (the kubelet rotates it). One of TokenFile and
	// BootstrapTokenFile is required.
	TokenFile string `json:"tokenFile"`

	// BootstrapTokenFile holds a static bootstrap token (mode 0600 or
	// stricter), re-read at every use.
	BootstrapTokenFile string `json:"bootstrapTokenFile"`

	// SpiffeID is the workload's identity. Default: from Namespace and
	// ServiceAccount, else from the service-account token's claims,
	// spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>.
	SpiffeID string `json:"spiffeID"`

	// Namespace and ServiceAccount name the workload's Kubernetes
	// service account, when SpiffeID is not set and the token is not a
	// service-account token.
	Namespace      string `json:"namespace"`
	ServiceAccount string `json:"serviceAccount"`

	// TTL is the certificate lifetime asked for. Default the server's.
	TTL Duration `json:"ttl"`

	// Socket is the Unix socket of the SPIFFE Workload API, and of SDS
	// unless sds.socket names another. Default /run/meshca/agent.sock.
	Socket string `json:"socket"`

	// SocketMode is the sockets' file mode, octal, quoted ("0660").
	// Default "0600": whoever can connect gets the workload's key.
	SocketMode FileMode `json:"socketMode"`

	// MaxStreams bounds the open Workload API streams. Default 256.
	MaxStreams int `json:"maxStreams"`

	// SDS configures Envoy SDS.
	SDS SDSConfig `json:"sds"`

	// Files configures the PEM files. Default off.
	Files FilesConfig `json:"files"`

	// LogLevel is debug, info, warn or error. Default info.
	LogLevel string `json:"logLevel"`

	// HealthAddress serves plain HTTP /healthz, /readyz (200 once a valid
	// SVID is held) and /metrics. Default off.
	HealthAddress string `json:"healthAddress"`
}

// SDSConfig configures Envoy SDS.
type SDSConfig struct {
	// Disabled turns SDS off. Default on.
	Disabled bool `json:"disabled"`

	// Socket is SDS's own Unix socket. Default the Workload API's socket.
	Socket string `json:"socket"`

	// CertificateName, ValidationContextName and
	// FederatedValidationContextName name the secrets. Defaults
	// "default", "ROOTCA" (Istio's names) and "ALL".
	CertificateName                string `json:"certificateName"`
	ValidationContextName          string `json:"validationContextName"`
	FederatedValidationContextName string `json:"federatedValidationContextName"`
}

// FilesConfig configures the PEM files.
type FilesConfig struct {
	// Dir holds the files; empty means none.
	Dir string `json:"dir"`

	// CertName, KeyName and BundleName name them. Defaults cert.pem,
	// key.pem and bundle.pem.
	CertName   string `json:"certName"`
	KeyName    string `json:"keyName"`
	BundleName string `json:"bundleName"`

	// Command runs after each change: a program and its arguments, no
	// shell (["nginx", "-s", "reload"]). Default none.
	Command []string `json:"command"`

	// CommandTimeout bounds one run of Command. Default 30s.
	CommandTimeout Duration `json:"commandTimeout"`
}

// Duration is a time.Duration written as a Go duration string ("90m").
type Duration time.Duration

// UnmarshalJSON reads a duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return errors.New(`duration must be a string such as "1h30m"`)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("duration %q: %w", s, err)
	}
	*d = Duration(v)
	return nil
}

// MarshalJSON writes a duration string, which UnmarshalJSON reads back.
func (d Duration) MarshalJSON() ([]byte, error) {
	return json.Marshal(time.Duration(d).String())
}

// FileMode is a file mode written as an octal string ("0660").
type FileMode fs.FileMode

// UnmarshalJSON reads an octal string, or the number YAML makes of an
// unquoted octal literal (0660 is 432).
func (m *FileMode) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		return m.Set(s)
	}
	var n uint32
	if err := json.Unmarshal(b, &n); err != nil || n > 0o777 {
		return errors.New(`file mode must be an octal string such as "0660"`)
	}
	*m = FileMode(n)
	return nil
}

// Set parses an octal mode, for flags and the file.
func (m *FileMode) Set(s string) error {
	n, err := strconv.ParseUint(s, 8, 32)
	if err != nil || n > 0o777 {
		return fmt.Errorf("file mode %q: want octal permissions such as \"0660\"", s)
	}
	*m = FileMode(n)
	return nil
}

// String returns the mode in octal.
func (m *FileMode) String() string { return fmt.Sprintf("%#o", uint32(*m)) }

// Type names the flag's value.
func (*FileMode) Type() string { return "mode" }

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

// completeConfig is a Config with defaults applied and values parsed,
// validated once.
type completeConfig struct {
	Config
	td       spiffeid.TrustDomain
	id       spiffeid.ID
	serverID spiffeid.ID
	// idFrom says where the ID came from, for the log.
	idFrom string
}

// The defaults.
const (
	defaultServerAddress = "127.0.0.1:8443"
	defaultTrustDomain   = "meshca.local"
	defaultSocket        = "/run/meshca/agent.sock"
)

// complete applies the defaults and checks every value. It reads the
// token file when the ID is to be taken from the token's claims.
func (c Config) complete() (*completeConfig, error) {
	c.ServerAddress = cmp.Or(c.ServerAddress, defaultServerAddress)
	c.Socket = cmp.Or(c.Socket, defaultSocket)
	c.LogLevel = cmp.Or(c.LogLevel, "info")
	if c.HealthAddress == "false" || c.HealthAddress == "off" {
		c.HealthAddress = "" // YAML reads an unquoted off as false
	}
	cc := &completeConfig{Config: c}
	var errs []error

	var specified spiffeid.ID
	if c.SpiffeID != "" {
		id, err := spiffeid.FromString(c.SpiffeID)
		if err != nil {
			errs = append(errs, fmt.Errorf("spiffeID: %w", err))
		}
		specified = id
	}
	tdName := c.TrustDomain
	if tdName == "" {
		tdName = defaultTrustDomain
		if !specified.IsZero() {
			tdName = specified.TrustDomain().Name()
		}
	}
	td, err := spiffeid.TrustDomainFromString(tdName)
	if err != nil {
		errs = append(errs, fmt.Errorf("trustDomain: %w", err))
	}
	cc.td = td

	switch {
	case c.TokenFile != "" && c.BootstrapTokenFile != "":
		errs = append(errs, errors.New("tokenFile and bootstrapTokenFile are both set; set one"))
	case c.TokenFile == "" && c.BootstrapTokenFile == "":
		errs = append(errs, errors.New("tokenFile (a projected service-account token) or bootstrapTokenFile is required"))
	}
	if c.TrustBundleFile == "" {
		errs = append(errs, errors.New("trustBundleFile is required: the trust domain's roots, PEM (the meshca-trust-bundle ConfigMap's bundle.pem)"))
	}

	if err == nil {
		switch {
		case !specified.IsZero():
			if specified.TrustDomain() != td {
				errs = append(errs, fmt.Errorf("spiffeID %q is not in trustDomain %q", specified, td))
			}
			cc.id, cc.idFrom = specified, "spiffeID"
		case c.Namespace != "" || c.ServiceAccount != "":
			id, err := identity.WorkloadID(td, c.Namespace, c.ServiceAccount)
			if err != nil {
				errs = append(errs, fmt.Errorf("namespace and serviceAccount: %w", err))
			}
			cc.id, cc.idFrom = id, "namespace and serviceAccount"
		case c.TokenFile != "":
			id, err := idFromTokenFile(td, c.TokenFile)
			if err != nil {
				errs = append(errs, err)
			}
			cc.id, cc.idFrom = id, "the service-account token"
		default:
			errs = append(errs, errors.New("spiffeID, or namespace and serviceAccount, is required unless tokenFile holds a service-account token"))
		}
		if c.ServerID == "" {
			cc.serverID = spiffeid.RequireFromPath(td, "/meshca/server")
		} else {
			id, err := spiffeid.FromString(c.ServerID)
			switch {
			case err != nil:
				errs = append(errs, fmt.Errorf("serverID: %w", err))
			case id.TrustDomain() != td:
				errs = append(errs, fmt.Errorf("serverID %q is not in trustDomain %q", id, td))
			}
			cc.serverID = id
		}
	}
	if c.TTL < 0 {
		errs = append(errs, errors.New("ttl must not be negative"))
	}
	if c.Files.CommandTimeout < 0 {
		errs = append(errs, errors.New("files.commandTimeout must not be negative"))
	}
	if len(c.Files.Command) > 0 && c.Files.Dir == "" {
		errs = append(errs, errors.New("files.command is set but files.dir is not: there are no files to follow"))
	}
	if c.MaxStreams < 0 {
		errs = append(errs, errors.New("maxStreams must not be negative"))
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

// idFromTokenFile reads the service-account token in path and returns
// the mesh convention's ID of its namespace and service account.
func idFromTokenFile(td spiffeid.TrustDomain, path string) (spiffeid.ID, error) {
	token, err := os.ReadFile(path)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("tokenFile: %w", err)
	}
	ns, sa, err := serviceAccountFromToken(strings.TrimSpace(string(token)))
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("tokenFile %s: %w; set spiffeID, or namespace and serviceAccount", path, err)
	}
	id, err := identity.WorkloadID(td, ns, sa)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("tokenFile %s: %w", path, err)
	}
	return id, nil
}
