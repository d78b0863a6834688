package main

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// jwt returns an unsigned token shaped like a JWT with payload as its
// claims.
func jwt(payload string) string {
	enc := base64.RawURLEncoding.EncodeToString
	return enc([]byte(`{"alg":"RS256"}`)) + "." + enc([]byte(payload)) + "." + enc([]byte("signature"))
}

func TestServiceAccountFromToken(t *testing.T) {
	for _, tt := range []struct {
		name, token, ns, sa, err string
	}{
		{
			name:  "bound token",
			token: jwt(`{"aud":["meshca"],"kubernetes.io":{"namespace":"shop","pod":{"name":"web-1"},"serviceaccount":{"name":"web","uid":"u"}},"sub":"system:serviceaccount:shop:web"}`),
			ns:    "shop", sa: "web",
		},
		{
			name:  "legacy token",
			token: jwt(`{"kubernetes.io/serviceaccount/namespace":"shop","kubernetes.io/serviceaccount/service-account.name":"db"}`),
			ns:    "shop", sa: "db",
		},
		{name: "not a JWT", token: "s3cret-bootstrap-token", err: "the token is not a JWT"},
		{name: "payload not base64", token: "a.!!!.c", err: "the token's payload is not base64url"},
		{name: "payload not an object", token: jwt(`[1]`), err: "the token's payload is not a JSON object"},
		{name: "no Kubernetes claims", token: jwt(`{"sub":"someone"}`), err: "the token names no Kubernetes namespace and service account"},
		{name: "no service account", token: jwt(`{"kubernetes.io":{"namespace":"shop"}}`), err: "the token names no Kubernetes namespace and service account"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ns, sa, err := serviceAccountFromToken(tt.token)
			if tt.err != "" {
				require.EqualError(t, err, tt.err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tt.ns, ns)
			require.Equal(t, tt.sa, sa)
		})
	}
}

func FuzzServiceAccountFromToken(f *testing.F) {
	f.Add(jwt(`{"kubernetes.io":{"namespace":"shop","serviceaccount":{"name":"web"}}}`))
	f.Add(jwt(`{"kubernetes.io/serviceaccount/namespace":"a","kubernetes.io/serviceaccount/service-account.name":"b"}`))
	f.Add("a.b.c")
	f.Fuzz(func(t *testing.T, token string) {
		ns, sa, err := serviceAccountFromToken(token)
		if err == nil && (ns == "" || sa == "") {
			t.Fatalf("no error but namespace %q and service account %q", ns, sa)
		}
	})
}

func TestCompleteConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		path := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(path, []byte(content), 0o600))
		return path
	}
	saToken := write("sa-token", jwt(`{"kubernetes.io":{"namespace":"shop","serviceaccount":{"name":"web"}}}`)+"\n")
	opaque := write("opaque", "not-a-jwt\n")
	base := Config{TrustBundleFile: "bundle.pem", TokenFile: saToken}

	t.Run("the ID from the token, and the defaults", func(t *testing.T) {
		cc, err := base.complete()
		require.NoError(t, err)
		require.Equal(t, "spiffe://meshca.local/ns/shop/sa/web", cc.id.String())
		require.Equal(t, "the service-account token", cc.idFrom)
		require.Equal(t, "spiffe://meshca.local/meshca/server", cc.serverID.String())
		require.Equal(t, "127.0.0.1:8443", cc.ServerAddress)
		require.Equal(t, "/run/meshca/agent.sock", cc.Socket)
	})
	t.Run("the trust domain from the SPIFFE ID", func(t *testing.T) {
		cfg := base
		cfg.SpiffeID = "spiffe://example.org/ns/shop/sa/db"
		cc, err := cfg.complete()
		require.NoError(t, err)
		require.Equal(t, "example.org", cc.td.Name())
		require.Equal(t, "spiffe://example.org/meshca/server", cc.serverID.String())
	})
	t.Run("namespace and service account", func(t *testing.T) {
		cfg := base
		cfg.TrustDomain, cfg.Namespace, cfg.ServiceAccount = "example.org", "shop", "cart"
		cc, err := cfg.complete()
		require.NoError(t, err)
		require.Equal(t, "spiffe://example.org/ns/shop/sa/cart", cc.id.String())
	})

	for _, tt := range []struct {
		name   string
		change func(*Config)
		want   string
	}{
		{"nothing", func(c *Config) { *c = Config{} }, "config: tokenFile (a projected service-account token) or bootstrapTokenFile is required\n" +
			"trustBundleFile is required: the trust domain's roots, PEM (the meshca-trust-bundle ConfigMap's bundle.pem)\n" +
			"spiffeID, or namespace and serviceAccount, is required unless tokenFile holds a service-account token"},
		{"both tokens", func(c *Config) { c.BootstrapTokenFile = opaque }, "config: tokenFile and bootstrapTokenFile are both set; set one"},
		{"bootstrap token without an ID", func(c *Config) { c.TokenFile, c.BootstrapTokenFile = "", opaque }, "config: spiffeID, or namespace and serviceAccount, is required unless tokenFile holds a service-account token"},
		{"token that names no one", func(c *Config) { c.TokenFile = opaque }, "config: tokenFile " + opaque + ": the token is not a JWT; set spiffeID, or namespace and serviceAccount"},
		{"missing token file", func(c *Config) { c.TokenFile = filepath.Join(dir, "none") }, "config: tokenFile: open " + filepath.Join(dir, "none") + ": no such file or directory"},
		{"bad SPIFFE ID", func(c *Config) { c.SpiffeID = "https://example.org/x" }, "config: spiffeID: scheme is missing or invalid"},
		{"ID outside the trust domain", func(c *Config) { c.TrustDomain, c.SpiffeID = "a.example", "spiffe://b.example/x" }, `config: spiffeID "spiffe://b.example/x" is not in trustDomain "a.example"`},
		{"namespace alone", func(c *Config) { c.Namespace = "shop" }, "config: namespace and serviceAccount: identity: namespace and service account are required"},
		{"server ID elsewhere", func(c *Config) { c.ServerID = "spiffe://other.org/meshca/server" }, `config: serverID "spiffe://other.org/meshca/server" is not in trustDomain "meshca.local"`},
		{"bad trust domain", func(c *Config) { c.TrustDomain = "Not A Domain" }, "config: trustDomain: trust domain characters are limited"},
		{"command without files", func(c *Config) { c.Files.Command = []string{"true"} }, "config: files.command is set but files.dir is not: there are no files to follow"},
		{"negative TTL", func(c *Config) { c.TTL = -1 }, "config: ttl must not be negative"},
		{"bad log level", func(c *Config) { c.LogLevel = "loud" }, `config: logLevel "loud": want debug, info, warn or error`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := base
			tt.change(&cfg)
			cc, err := cfg.complete()
			require.ErrorContains(t, err, tt.want)
			require.Nil(t, cc)
		})
	}
}

func TestFileMode(t *testing.T) {
	var m FileMode
	require.NoError(t, m.UnmarshalJSON([]byte(`"0660"`)))
	require.Equal(t, FileMode(0o660), m)
	require.NoError(t, m.UnmarshalJSON([]byte(`432`)), "what YAML makes of an unquoted 0660")
	require.Equal(t, FileMode(0o660), m)
	require.EqualError(t, m.UnmarshalJSON([]byte(`"rw-rw----"`)), `file mode "rw-rw----": want octal permissions such as "0660"`)
	require.EqualError(t, m.UnmarshalJSON([]byte(`660`)), `file mode must be an octal string such as "0660"`)
	m = 0o640
	require.Equal(t, "0640", m.String())
}
