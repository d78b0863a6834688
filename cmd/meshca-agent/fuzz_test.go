package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"sigs.k8s.io/yaml"
)

// FuzzLoadConfig reads an agent config file and completes it, with a
// fuzzed service-account token in the file its tokenFile names: neither
// panics, no error holds the token (a credential), and a config that
// completes, written back as YAML with its defaults, completes again to
// the same config and identity.
func FuzzLoadConfig(f *testing.F) {
	sa := jwt(`{"kubernetes.io":{"namespace":"shop","serviceaccount":{"name":"web"}}}`)
	for _, seed := range [][2]string{
		{"trustBundleFile: bundle.pem\ntokenFile: t\n", sa},
		{"trustBundleFile: bundle.pem\ntokenFile: t\ntrustDomain: example.org\nttl: 30m\n", sa + "\n"},
		{"trustBundleFile: bundle.pem\ntokenFile: t\nspiffeID: spiffe://example.org/ns/a/sa/b\n", "opaque-token"},
		{"trustBundleFile: bundle.pem\nbootstrapTokenFile: b\nnamespace: a\nserviceAccount: b\nsocketMode: 0660\n", ""},
		{"trustBundleFile: bundle.pem\ntokenFile: t\nsocketMode: \"0660\"\nfiles:\n  dir: /tmp/x\n  command: [true]\n  commandTimeout: 5s\n", sa},
		{"trustBundleFile: bundle.pem\ntokenFile: t\nserverID: spiffe://other.org/meshca/server\n", sa},
		{"tokenFile: t\nlogLevel: trace\nmaxStreams: -1\n", "zq-not-a-jwt-0123456789"},
		{"trustBundleFile: bundle.pem\ntokenFile: t\n", jwt(`{"kubernetes.io":{"namespace":"Shop!","serviceaccount":{"name":"zq-0123456789"}}}`)},
		{"healthAddress: off\n", ""}, {"", ""}, {"ttl: 1\n", ""}, {"socketMode: 0999\n", ""},
	} {
		f.Add([]byte(seed[0]), seed[1])
	}
	dir := f.TempDir()
	path := filepath.Join(dir, "agent.yaml")
	tokenPath := filepath.Join(dir, "token")
	f.Fuzz(func(t *testing.T, doc []byte, token string) {
		require.NoError(t, os.WriteFile(path, doc, 0o600))
		require.NoError(t, os.WriteFile(tokenPath, []byte(token), 0o600))
		cfg, err := loadConfig(path)
		if err != nil {
			require.True(t, strings.HasPrefix(err.Error(), "config: "), "error %q does not name the config", err)
			return
		}
		if cfg.TokenFile != "" {
			cfg.TokenFile = tokenPath
		}
		cc, err := cfg.complete()
		if err != nil {
			if secret := strings.TrimSpace(token); len(secret) >= 8 && !strings.Contains(string(doc), secret) {
				require.NotContains(t, err.Error(), secret, "the error echoes the token")
			}
			require.Nil(t, cc)
			return
		}
		require.False(t, cc.id.IsZero())
		require.Equal(t, cc.td, cc.id.TrustDomain())
		require.Equal(t, cc.td, cc.serverID.TrustDomain())

		again, err := yaml.Marshal(cc.Config)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(path, again, 0o600))
		cfg2, err := loadConfig(path)
		require.NoError(t, err, "a completed config, written back, does not load:\n%s", again)
		cc2, err := cfg2.complete()
		require.NoError(t, err, "a completed config, written back, is refused:\n%s", again)
		require.Equal(t, cc.Config, cc2.Config)
		require.Equal(t, cc.id, cc2.id)
		require.Equal(t, cc.serverID, cc2.serverID)
	})
}
