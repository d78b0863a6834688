package sds_test

import (
	"os"
	"slices"
	"strings"
	"testing"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/encoding/protojson"
	"sigs.k8s.io/yaml"

	"github.com/meshca/meshca/agent/sds"

	// The typed configs the snippet uses, for protojson to resolve.
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
)

const docsPath = "../../docs/proxies.md"

// TestDocsEnvoyBootstrap checks the Envoy bootstrap in docs/proxies.md: it
// is a valid Envoy v3 bootstrap, its SDS configs point at a cluster over
// the agent's Unix socket, and every secret it names is served.
func TestDocsEnvoyBootstrap(t *testing.T) {
	doc, err := os.ReadFile(docsPath)
	require.NoError(t, err)
	snippet := yamlBlock(t, string(doc), "## Envoy (SDS)")
	js, err := yaml.YAMLToJSON([]byte(snippet))
	require.NoError(t, err)
	var boot bootstrapv3.Bootstrap
	require.NoError(t, protojson.Unmarshal(js, &boot))
	require.NoError(t, boot.ValidateAll())

	// The cluster the SDS configs name is HTTP/2 over a pipe address.
	clusters := map[string]bool{}
	for _, c := range boot.GetStaticResources().GetClusters() {
		for _, ep := range c.GetLoadAssignment().GetEndpoints() {
			for _, lb := range ep.GetLbEndpoints() {
				if lb.GetEndpoint().GetAddress().GetPipe().GetPath() != "" {
					clusters[c.GetName()] = c.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"] != nil
				}
			}
		}
	}
	var contexts []*tlsv3.CommonTlsContext
	for _, l := range boot.GetStaticResources().GetListeners() {
		for _, fc := range l.GetFilterChains() {
			var down tlsv3.DownstreamTlsContext
			require.NoError(t, fc.GetTransportSocket().GetTypedConfig().UnmarshalTo(&down))
			require.True(t, down.GetRequireClientCertificate().GetValue(), "mTLS: the listener asks for the peer's certificate")
			contexts = append(contexts, down.GetCommonTlsContext())
		}
	}
	for _, c := range boot.GetStaticResources().GetClusters() {
		if ts := c.GetTransportSocket(); ts != nil {
			var up tlsv3.UpstreamTlsContext
			require.NoError(t, ts.GetTypedConfig().UnmarshalTo(&up))
			contexts = append(contexts, up.GetCommonTlsContext())
		}
	}
	require.NotEmpty(t, contexts)
	var refs []string
	requireAgent := func(cfg *corev3.ConfigSource) {
		t.Helper()
		services := cfg.GetApiConfigSource().GetGrpcServices()
		require.Len(t, services, 1)
		cluster := services[0].GetEnvoyGrpc().GetClusterName()
		require.True(t, clusters[cluster], "SDS cluster %q must be HTTP/2 over a pipe address", cluster)
	}
	for _, ctx := range contexts {
		certs := ctx.GetTlsCertificateSdsSecretConfigs()
		require.Len(t, certs, 1)
		requireAgent(certs[0].GetSdsConfig())
		cvc := ctx.GetCombinedValidationContext()
		requireAgent(cvc.GetValidationContextSdsSecretConfig().GetSdsConfig())
		sans := cvc.GetDefaultValidationContext().GetMatchTypedSubjectAltNames()
		require.Len(t, sans, 1)
		require.Equal(t, tlsv3.SubjectAltNameMatcher_URI, sans[0].GetSanType())
		require.True(t, strings.HasPrefix(sans[0].GetMatcher().GetExact(), "spiffe://"))
		refs = append(refs, certs[0].GetName(), cvc.GetValidationContextSdsSecretConfig().GetName())
	}
	slices.Sort(refs)
	refs = slices.Compact(refs)
	require.Equal(t, []string{sds.DefaultFederatedValidationContextName, sds.DefaultValidationContextName, sds.DefaultCertificateName}, refs)

	e := start(t, sds.Options{}, true)
	e.logs.waitFor(t, logServing, 1)
	resp, err := secretv3.NewSecretDiscoveryServiceClient(e.conn).FetchSecrets(testContext(t), &discoveryv3.DiscoveryRequest{ResourceNames: refs})
	require.NoError(t, err)
	require.Equal(t, refs, names(secrets(t, resp.GetResources())), "every secret the snippet names is served")
}

// yamlBlock returns the first ```yaml block of the section of doc headed
// heading.
func yamlBlock(t *testing.T, doc, heading string) string {
	t.Helper()
	_, section, ok := strings.Cut(doc, "\n"+heading+"\n")
	require.True(t, ok, "%s has no %q section", docsPath, heading)
	if i := strings.Index(section, "\n## "); i >= 0 {
		section = section[:i]
	}
	_, block, ok := strings.Cut(section, "```yaml\n")
	require.True(t, ok, "the %q section has no yaml block", heading)
	block, _, ok = strings.Cut(block, "\n```")
	require.True(t, ok)
	return block
}
