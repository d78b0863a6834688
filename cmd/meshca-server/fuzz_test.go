package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"sigs.k8s.io/yaml"

	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/testca"
)

// FuzzLoadConfig reads a config file and completes it: neither panics,
// an error names the config, and a config that completes, written back
// as YAML with its defaults, loads and completes again to the same
// config (it passes its own validation, and completing is idempotent).
// The config file holds no secrets (keys and tokens are named by path
// only), so no error can echo one.
func FuzzLoadConfig(f *testing.F) {
	dir := f.TempDir()
	// Files a config names are read by complete: every bundleFile and
	// webCAFile of the fuzzed config is pointed at this real bundle, so
	// that the fuzzer never reads the machine's files (or /dev/zero).
	bundleFile := filepath.Join(dir, "peer-bundle.pem")
	peer := testca.New(f, spiffeid.RequireTrustDomainFromString("peer.example"))
	if err := os.WriteFile(bundleFile, pemutil.EncodeCertificates(peer.Cert), 0o600); err != nil {
		f.Fatal(err)
	}
	for _, seed := range []string{
		"", "{}", "trustDomain: example.org\n", "trustDomain: Example.ORG\n", "metricsAddress: off\nprofiling: true\n",
		"leaf:\n  defaultTTL: 2h\n  maxTTL: 1h\n", "leaf:\n  defaultTTL: 1\n", "leaf:\n  defaultTTL: -1h\n",
		"authority:\n  mode: files\n", "authority:\n  intermediateTTL: 1h\n", "server:\n  id: spiffe://other.org/x\n",
		"server:\n  ipAddresses: [\"::1\", \"10.0.0.300\"]\n", "logLevel: trace\n", "linkerd:\n  enabled: true\n",
		"kubernetes:\n  enabled: true\n  namespace: ns\n  podName: p\n  tokenAudiences: [istio-ca]\n",
		"federation:\n  peers:\n  - trustDomain: peer.example\n    url: https://peer.example/bundle\n    profile: https_spiffe\n    endpointID: spiffe://peer.example/meshca/server\n    bundleFile: x\n",
		"federation:\n  endpoint:\n    listenAddress: 127.0.0.1:8444\n    profile: https_web\n",
		"unknownField: 1\n", "trustDomain: [1]\n", "\t", "a: &a [*a]\n",
	} {
		f.Add([]byte(seed))
	}
	path := filepath.Join(dir, "config.yaml")
	f.Fuzz(func(t *testing.T, doc []byte) {
		require.NoError(t, os.WriteFile(path, doc, 0o600))
		cfg, err := loadConfig(path)
		if err != nil {
			require.True(t, strings.HasPrefix(err.Error(), "config: "), "error %q does not name the config", err)
			return
		}
		for i := range cfg.Federation.Peers {
			p := &cfg.Federation.Peers[i]
			if p.BundleFile != "" {
				p.BundleFile = bundleFile
			}
			if p.WebCAFile != "" {
				p.WebCAFile = bundleFile
			}
		}
		cc, err := cfg.complete()
		if err != nil {
			require.True(t, strings.HasPrefix(err.Error(), "config: "), "error %q does not name the config", err)
			require.Nil(t, cc)
			return
		}
		require.False(t, cc.td.IsZero())
		require.Equal(t, cc.td, cc.serverID.TrustDomain())
		require.LessOrEqual(t, cc.ttl.Default, cc.ttl.Longest())

		again, err := yaml.Marshal(cc.Config)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(path, again, 0o600))
		cfg2, err := loadConfig(path)
		require.NoError(t, err, "a completed config, written back, does not load:\n%s", again)
		cc2, err := cfg2.complete()
		require.NoError(t, err, "a completed config, written back, is refused:\n%s", again)
		require.Equal(t, cc.Config, cc2.Config)
		require.Equal(t, cc.td, cc2.td)
		require.Equal(t, cc.serverID, cc2.serverID)
		require.Equal(t, cc.ttl, cc2.ttl)
	})
}
