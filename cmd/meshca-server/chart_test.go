package main

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/meshca/meshca/ca/vaultca"
	"github.com/meshca/meshca/identity/federation"
	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/internal/server"
	"github.com/meshca/meshca/testca"
)

// The chart is rendered as scripts/render-manifests.sh renders it.
const (
	chartDir         = "../../deploy/helm/meshca"
	chartRelease     = "meshca"
	chartNamespace   = "meshca-system"
	chartKubeVersion = "v1.34.0"
)

// findHelm finds helm as scripts/render-manifests.sh does: $HELM, else helm
// on PATH, else $MESHCA_TOOLS/helm (default ~/.cache/meshca/bin). Without
// it the test fails, unless MESHCA_SKIP_HELM is set.
func findHelm(t *testing.T) string {
	t.Helper()
	if h := os.Getenv("HELM"); h != "" {
		return h
	}
	if h, err := exec.LookPath("helm"); err == nil {
		return h
	}
	tools := os.Getenv("MESHCA_TOOLS")
	if tools == "" {
		if home, err := os.UserHomeDir(); err == nil {
			tools = filepath.Join(home, ".cache", "meshca", "bin")
		}
	}
	if h := filepath.Join(tools, "helm"); tools != "" {
		if _, err := os.Stat(h); err == nil {
			return h
		}
	}
	if os.Getenv("MESHCA_SKIP_HELM") != "" {
		t.Skip("helm not found and MESHCA_SKIP_HELM is set: the chart is not checked")
	}
	t.Fatal("helm not found ($HELM, PATH, $MESHCA_TOOLS/helm or ~/.cache/meshca/bin/helm): " +
		"run `make manifests`, which installs it, or set HELM; MESHCA_SKIP_HELM=1 skips the chart tests")
	return ""
}

// helm runs helm on the chart, release and namespace of the manifests,
// with values (written to a file) and then --set-file of setFiles
// ("key=path"). It returns stdout, and an error with stderr when helm
// fails.
func helm(t *testing.T, cmd string, values map[string]any, setFiles ...string) (string, error) {
	t.Helper()
	bin := findHelm(t)
	args := []string{cmd}
	if cmd == "template" {
		args = append(args, chartRelease)
	}
	args = append(args, chartDir, "--namespace", chartNamespace, "--kube-version", chartKubeVersion)
	if cmd == "lint" {
		args = append(args, "--strict", "--quiet")
	}
	if values != nil {
		data, err := yaml.Marshal(values)
		require.NoError(t, err)
		file := filepath.Join(t.TempDir(), "values.yaml")
		require.NoError(t, os.WriteFile(file, data, 0o600))
		args = append(args, "--values", file)
	}
	for _, f := range setFiles {
		args = append(args, "--set-file", f)
	}
	var stdout, stderr bytes.Buffer
	c := exec.Command(bin, args...)
	c.Stdout, c.Stderr = &stdout, &stderr
	if err := c.Run(); err != nil {
		return stdout.String(), errors.New(strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// renderedChart is what `helm template` made, by kind and name.
type renderedChart struct {
	configMaps      map[string]*corev1.ConfigMap
	services        map[string]*corev1.Service
	deployment      *appsv1.Deployment
	networkPolicies map[string]*networkingv1.NetworkPolicy
}

// renderChart renders the chart, failing the test if helm fails, and reads
// the objects it checks. They are read strictly: a field the API does not
// have fails the test.
func renderChart(t *testing.T, values map[string]any, setFiles ...string) *renderedChart {
	t.Helper()
	out, err := helm(t, "template", values, setFiles...)
	require.NoError(t, err)
	r := &renderedChart{
		configMaps:      map[string]*corev1.ConfigMap{},
		services:        map[string]*corev1.Service{},
		networkPolicies: map[string]*networkingv1.NetworkPolicy{},
	}
	docs := utilyaml.NewYAMLReader(bufio.NewReader(strings.NewReader(out)))
	for {
		doc, err := docs.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err)
		var meta struct{ Kind string }
		require.NoError(t, yaml.Unmarshal(doc, &meta))
		strict := func(obj any) {
			require.NoError(t, yaml.UnmarshalStrict(doc, obj), "rendered %s:\n%s", meta.Kind, doc)
		}
		switch meta.Kind {
		case "ConfigMap":
			cm := &corev1.ConfigMap{}
			strict(cm)
			r.configMaps[cm.Name] = cm
		case "Service":
			svc := &corev1.Service{}
			strict(svc)
			r.services[svc.Name] = svc
		case "Deployment":
			require.Nil(t, r.deployment, "two Deployments")
			r.deployment = &appsv1.Deployment{}
			strict(r.deployment)
		case "NetworkPolicy":
			np := &networkingv1.NetworkPolicy{}
			strict(np)
			r.networkPolicies[np.Name] = np
		}
	}
	require.NotNil(t, r.deployment, "no Deployment rendered")
	return r
}

// server returns the meshca-server container.
func (r *renderedChart) server(t *testing.T) *corev1.Container {
	t.Helper()
	for i, c := range r.deployment.Spec.Template.Spec.Containers {
		if c.Name == "meshca-server" {
			return &r.deployment.Spec.Template.Spec.Containers[i]
		}
	}
	t.Fatal("no meshca-server container")
	return nil
}

// mountConfig lays the pod's ConfigMap volumes out under a temporary root
// as the kubelet mounts them, and returns the root and the path of the
// config file the container's --config names.
func (r *renderedChart) mountConfig(t *testing.T) (root, config string) {
	t.Helper()
	root = t.TempDir()
	c := r.server(t)
	volumes := map[string]corev1.Volume{}
	for _, v := range r.deployment.Spec.Template.Spec.Volumes {
		volumes[v.Name] = v
	}
	for _, m := range c.VolumeMounts {
		v, ok := volumes[m.Name]
		require.True(t, ok, "volumeMount %s has no volume", m.Name)
		dir := filepath.Join(root, m.MountPath)
		require.NoError(t, os.MkdirAll(dir, 0o700))
		if v.ConfigMap == nil {
			continue
		}
		require.Empty(t, v.ConfigMap.Items, "volume %s: the test mounts every key", m.Name)
		cm, ok := r.configMaps[v.ConfigMap.Name]
		require.True(t, ok, "volume %s: ConfigMap %s is not rendered", m.Name, v.ConfigMap.Name)
		for key, data := range cm.Data {
			require.NoError(t, os.WriteFile(filepath.Join(dir, key), []byte(data), 0o600))
		}
	}
	i := slices.Index(c.Args, "--config")
	require.True(t, i >= 0 && i+1 < len(c.Args), "no --config in %q", c.Args)
	return root, filepath.Join(root, c.Args[i+1])
}

// loadConfig lays the pod's ConfigMap volumes out under a temporary root as
// the kubelet mounts them, loads the config file the container's --config
// names with the server's own loader, and completes it with every file it
// names read from under that root.
func (r *renderedChart) loadConfig(t *testing.T) *completeConfig {
	t.Helper()
	root, path := r.mountConfig(t)
	cfg, err := loadConfig(path)
	require.NoError(t, err)

	inPod := func(p *string) {
		if *p != "" {
			require.True(t, filepath.IsAbs(*p), "config names the relative path %q", *p)
			*p = filepath.Join(root, *p)
		}
	}
	for i := range cfg.Federation.Peers {
		inPod(&cfg.Federation.Peers[i].BundleFile)
		inPod(&cfg.Federation.Peers[i].WebCAFile)
	}
	inPod(&cfg.Federation.Endpoint.CertFile)
	inPod(&cfg.Federation.Endpoint.KeyFile)
	inPod(&cfg.BootstrapTokens)
	inPod(&cfg.Authority.Vault.CAFile)
	t.Setenv("POD_NAME", "meshca-0")
	cc, err := cfg.complete()
	require.NoError(t, err)
	return cc
}

// containerPort returns the port of the server's container named name, or
// 0.
func containerPort(c *corev1.Container, name string) int32 {
	for _, p := range c.Ports {
		if p.Name == name {
			return p.ContainerPort
		}
	}
	return 0
}

// servicePort returns the port of svc named name.
func servicePort(svc *corev1.Service, name string) (corev1.ServicePort, bool) {
	for _, p := range svc.Spec.Ports {
		if p.Name == name {
			return p, true
		}
	}
	return corev1.ServicePort{}, false
}

// TestChartConfig: the config file the chart renders, with its defaults (the
// plain manifests) and with federation on, is accepted by the server's own
// loader and checks, with every file it names present where the pod mounts
// it; and the endpoint's port is the container's, the Service's and the
// NetworkPolicy's, which lets it in from anywhere, and lets the server out
// to the peers' ports.
func TestChartConfig(t *testing.T) {
	t.Run("defaults", func(t *testing.T) {
		r := renderChart(t, map[string]any{"createNamespace": true})
		cc := r.loadConfig(t)
		require.True(t, cc.Kubernetes.Enabled)
		require.Equal(t, chartNamespace, cc.Kubernetes.Namespace)
		require.Empty(t, cc.Federation.Endpoint.ListenAddress)
		require.Empty(t, cc.fed.peers)
		require.Zero(t, containerPort(r.server(t), "https-fed"))
		_, ok := servicePort(r.services[chartRelease], "https-fed")
		require.False(t, ok)
		require.NotContains(t, r.services, chartRelease+"-federation")
		require.Equal(t, []string{"config.yaml"}, sortedKeys(r.configMaps[chartRelease+"-config"].Data))
	})

	t.Run("policy limits admission", func(t *testing.T) {
		r := renderChart(t, map[string]any{
			"policy": map[string]any{"allowedPathPrefixes": []any{"/ns/payments/"}},
			"limits": map[string]any{
				"perIdentity":             map[string]any{"rate": 2, "burst": 5},
				"maxConnectionsPerSource": 64,
			},
			"admission": map[string]any{"maxInFlight": 8, "maxWaitRenewal": "100ms", "maxHandshakes": -1},
		})
		cc := r.loadConfig(t)
		require.Equal(t, []string{"/ns/payments/"}, cc.Policy.AllowedPathPrefixes)
		require.Equal(t, server.Rate{PerSecond: 2, Burst: 5}, cc.limits.PerIdentity)
		require.Equal(t, 64, cc.limits.MaxConnectionsPerSource)
		require.Equal(t, 8, cc.admit.MaxInFlight)
		require.Equal(t, 100*time.Millisecond, cc.admit.MaxWaitRenewal)
		require.Equal(t, -1, cc.admit.MaxHandshakes)

		// A key the server does not know stops it at start, not later.
		r = renderChart(t, map[string]any{"admission": map[string]any{"maxInFlights": 8}})
		require.Contains(t, r.configMaps[chartRelease+"-config"].Data["config.yaml"], "\nadmission:\n  maxInFlights: 8\n")
		_, path := r.mountConfig(t)
		_, err := loadConfig(path)
		require.ErrorContains(t, err, `unknown field "maxInFlights"`)
	})

	t.Run("vault", func(t *testing.T) {
		vaultCA := string(pemutil.EncodeCertificates(testca.New(t, spiffeid.RequireTrustDomainFromString("vault.example")).Cert))
		vaultNS := map[string]any{"namespaceSelector": map[string]any{"matchLabels": map[string]any{"kubernetes.io/metadata.name": "vault"}}}
		values := map[string]any{
			"authority": map[string]any{"mode": "vault", "intermediateTTL": "720h", "vault": map[string]any{
				"address": "https://vault.vault.svc:8200", "mount": "pki/east", "issuer": "root-2026",
				"role": "meshca", "ca": vaultCA,
			}},
			"networkPolicy": map[string]any{"vaultTo": []any{vaultNS}},
		}
		_, err := helm(t, "lint", values)
		require.NoError(t, err)
		r := renderChart(t, values)
		cc := r.loadConfig(t)
		require.Equal(t, "vault", cc.Authority.Mode)
		require.Equal(t, 720*time.Hour, time.Duration(cc.Authority.IntermediateTTL))
		require.NotNil(t, cc.vault)
		require.Equal(t, "https://vault.vault.svc:8200", cc.vault.Address)
		require.Equal(t, "pki/east", cc.vault.Mount)
		require.Equal(t, "root-2026", cc.vault.Issuer)
		require.Equal(t, vaultca.Auth{Kubernetes: &vaultca.KubernetesAuth{Role: "meshca", Mount: "kubernetes", TokenFile: "/var/run/secrets/vault/token"}}, cc.vault.Auth)
		// That file is a token of the pod's service account for Vault's
		// audience alone, projected where the config says.
		requireVaultToken(t, r, "vault", "/var/run/secrets/vault")
		ca, err := os.ReadFile(cc.vault.CAFile)
		require.NoError(t, err)
		require.Equal(t, vaultCA, string(ca), "Vault's CA reaches the server intact")
		require.NotEmpty(t, r.deployment.Spec.Template.Annotations["checksum/config-files"], "a new Vault CA rolls the pods")

		egress := r.networkPolicies[chartRelease].Spec.Egress
		require.Len(t, egress, 3)
		require.Equal(t, "8200", egress[2].Ports[0].Port.String())
		require.Len(t, egress[2].To, 1)
		require.Equal(t, "vault", egress[2].To[0].NamespaceSelector.MatchLabels["kubernetes.io/metadata.name"])

		// Without a port, https's; without a CA, the system's roots;
		// without a token audience, the pod's own token.
		r = renderChart(t, map[string]any{"authority": map[string]any{"mode": "vault", "vault": map[string]any{
			"address": "https://vault.example.com", "role": "meshca", "tokenAudience": "",
		}}})
		cc = r.loadConfig(t)
		require.Empty(t, cc.vault.CAFile)
		require.Equal(t, vaultca.Auth{Kubernetes: &vaultca.KubernetesAuth{Role: "meshca", Mount: "kubernetes"}}, cc.vault.Auth)
		requireVaultToken(t, r, "", "")
		require.Equal(t, []string{"config.yaml"}, sortedKeys(r.configMaps[chartRelease+"-config"].Data))
		egress = r.networkPolicies[chartRelease].Spec.Egress
		require.Equal(t, "443", egress[2].Ports[0].Port.String())
		require.Empty(t, egress[2].To, "no vaultTo: any address")

		for _, tc := range []struct {
			vault map[string]any
			mode  string
			want  string
		}{
			{mode: "vault", vault: map[string]any{"address": "https://vault.example.com"},
				want: "authority.vault.role is required in mode vault: the Vault role of the Kubernetes auth method the server logs in as"},
			{mode: "vault", vault: map[string]any{"address": "vault.example.com:8200", "role": "meshca"},
				want: `authority.vault.address "vault.example.com:8200": want Vault's URL, such as https://vault.vault.svc:8200`},
			{mode: "files", want: `authority.mode "files": want selfsigned or vault`},
		} {
			v := map[string]any{"mode": tc.mode}
			if tc.vault != nil {
				v["vault"] = tc.vault
			}
			_, err := helm(t, "template", map[string]any{"authority": v})
			require.ErrorContains(t, err, tc.want)
		}
	})

	t.Run("values of the previous chart", func(t *testing.T) {
		// helm upgrade --reuse-values from a chart without these keys
		// renders with them absent (null deletes a key).
		r := renderChart(t, map[string]any{
			"authority":     map[string]any{"mode": nil, "vault": nil},
			"policy":        nil,
			"limits":        nil,
			"admission":     nil,
			"networkPolicy": map[string]any{"vaultTo": nil},
		})
		cc := r.loadConfig(t)
		require.Equal(t, "selfsigned", cc.Authority.Mode)
		require.Nil(t, cc.vault)
		requireVaultToken(t, r, "", "")
		_, err := helm(t, "template", map[string]any{"authority": map[string]any{"mode": "vault", "vault": nil}})
		require.ErrorContains(t, err, `authority.vault.address "": want Vault's URL`)
	})

	t.Run("endpoint alone", func(t *testing.T) {
		r := renderChart(t, map[string]any{"federation": map[string]any{"endpoint": map[string]any{"enabled": true}}})
		cc := r.loadConfig(t)
		require.Equal(t, "0.0.0.0:8444", cc.Federation.Endpoint.ListenAddress)
		require.Empty(t, cc.fed.peers)
		require.EqualValues(t, 8444, containerPort(r.server(t), "https-fed"))
		require.NotContains(t, r.services, chartRelease+"-federation")
		require.Len(t, r.networkPolicies[chartRelease].Spec.Egress, 2, "the API server and DNS only: no peers to reach")
	})

	t.Run("https_web peer without files", func(t *testing.T) {
		r := renderChart(t, map[string]any{"federation": map[string]any{"peers": []any{map[string]any{
			"trustDomain": "c.example", "url": "https://bundle.c.example:9443/", "profile": "https_web",
		}}}})
		cc := r.loadConfig(t)
		require.Empty(t, cc.Federation.Endpoint.ListenAddress)
		require.Len(t, cc.fed.peers, 1)
		require.Empty(t, cc.fed.peers[0].WebRoots)
		require.Zero(t, containerPort(r.server(t), "https-fed"))
		require.Equal(t, []string{"config.yaml"}, sortedKeys(r.configMaps[chartRelease+"-config"].Data))
		require.NotContains(t, r.deployment.Spec.Template.Annotations, "checksum/config-files")
		egress := r.networkPolicies[chartRelease].Spec.Egress
		require.Len(t, egress, 3)
		require.Equal(t, "9443", egress[2].Ports[0].Port.String())
		require.Empty(t, egress[2].To, "no federationTo: any address")
	})

	t.Run("federation", func(t *testing.T) {
		dir := t.TempDir()
		b := spiffeid.RequireTrustDomainFromString("b.example")
		bRoot := testca.New(t, b).Cert
		bFile := filepath.Join(dir, "b-bundle.pem")
		require.NoError(t, os.WriteFile(bFile, pemutil.EncodeCertificates(bRoot), 0o600))
		e := spiffeid.RequireTrustDomainFromString("e.example")
		eDoc := spiffebundle.FromX509Authorities(e, testca.New(t, e).Bundle().X509Authorities())
		eDoc.SetSequenceNumber(7)
		eJSON, err := eDoc.Marshal()
		require.NoError(t, err)
		c := spiffeid.RequireTrustDomainFromString("c.example")
		cCA := testca.New(t, c).Cert

		values := map[string]any{
			"federation": map[string]any{
				"endpoint": map[string]any{
					"enabled": true,
					"port":    18444,
					"service": map[string]any{"enabled": true},
				},
				"minRefresh": "1m",
				"peers": []any{
					map[string]any{"trustDomain": "b.example", "url": "https://bundle.b.example:8444/",
						"profile": "https_spiffe", "endpointID": "spiffe://b.example/meshca/server"},
					map[string]any{"trustDomain": "e.example", "url": "https://bundle.e.example/",
						"profile": "https_spiffe", "endpointID": "spiffe://e.example/spire/server", "bundle": string(eJSON)},
					map[string]any{"trustDomain": "c.example", "url": "https://bundle.c.example/",
						"profile": "https_web", "webCA": string(pemutil.EncodeCertificates(cCA))},
					map[string]any{"trustDomain": "d.example", "url": "https://[2001:db8::1]:9443/bundle", "profile": "https_web"},
				},
			},
			"networkPolicy": map[string]any{
				"federationTo": []any{map[string]any{"ipBlock": map[string]any{"cidr": "192.0.2.0/24"}}},
			},
		}
		// The README's way of giving a bootstrap bundle.
		setFile := "federation.peers[0].bundle=" + bFile
		_, err = helm(t, "lint", values, setFile)
		require.NoError(t, err)
		r := renderChart(t, values, setFile)
		cc := r.loadConfig(t)

		require.Equal(t, "0.0.0.0:18444", cc.Federation.Endpoint.ListenAddress)
		require.Equal(t, federation.ProfileHTTPSSPIFFE, cc.fed.endpointProfile)
		require.Equal(t, 5*time.Minute, cc.fed.defaultRefresh)
		require.Equal(t, time.Minute, cc.fed.minRefresh)
		require.Equal(t, time.Hour, cc.fed.maxRefresh)
		require.Len(t, cc.fed.peers, 4)
		peerB, peerE, peerC, peerD := cc.fed.peers[0], cc.fed.peers[1], cc.fed.peers[2], cc.fed.peers[3]
		require.Equal(t, b, peerB.TrustDomain)
		require.Equal(t, "https://bundle.b.example:8444/", peerB.URL)
		require.Equal(t, federation.ProfileHTTPSSPIFFE, peerB.Profile)
		require.Equal(t, "spiffe://b.example/meshca/server", peerB.EndpointID.String())
		require.Len(t, peerB.Bootstrap.X509Authorities(), 1)
		require.True(t, peerB.Bootstrap.X509Authorities()[0].Equal(bRoot))
		require.Equal(t, e, peerE.TrustDomain)
		require.True(t, peerE.Bootstrap.Equal(eDoc), "the SPIFFE JSON bundle, sequence included, reaches the server intact")
		require.Equal(t, c, peerC.TrustDomain)
		require.Equal(t, federation.ProfileHTTPSWeb, peerC.Profile)
		require.Len(t, peerC.WebRoots, 1)
		require.True(t, peerC.WebRoots[0].Equal(cCA))
		require.Equal(t, "d.example", peerD.TrustDomain.Name())
		require.Empty(t, peerD.WebRoots, "no webCA: the system's roots")

		// The endpoint's port, from the config to the outside.
		require.EqualValues(t, 18444, containerPort(r.server(t), "https-fed"))
		for _, name := range []string{chartRelease, chartRelease + "-federation"} {
			svc, ok := r.services[name]
			require.True(t, ok, "Service %s", name)
			p, ok := servicePort(svc, "https-fed")
			require.True(t, ok, "Service %s has no port https-fed", name)
			require.EqualValues(t, 18444, p.Port)
			require.Equal(t, intstr.FromString("https-fed"), p.TargetPort)
		}
		fedSvc := r.services[chartRelease+"-federation"]
		require.Equal(t, corev1.ServiceTypeLoadBalancer, fedSvc.Spec.Type)
		require.Len(t, fedSvc.Spec.Ports, 1, "the federation Service exposes the endpoint alone")

		np := r.networkPolicies[chartRelease]
		require.NotNil(t, np)
		var ingress *networkingv1.NetworkPolicyIngressRule
		for i, rule := range np.Spec.Ingress {
			if len(rule.Ports) == 1 && *rule.Ports[0].Port == intstr.FromString("https-fed") {
				ingress = &np.Spec.Ingress[i]
			}
		}
		require.NotNil(t, ingress, "no ingress rule for https-fed")
		require.Empty(t, ingress.From, "peers are other clusters: from anywhere")
		peersOut := np.Spec.Egress[len(np.Spec.Egress)-1]
		var ports []string
		for _, p := range peersOut.Ports {
			ports = append(ports, p.Port.String())
		}
		require.Equal(t, []string{"8444", "443", "9443"}, ports)
		require.Equal(t, []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "192.0.2.0/24"}}}, peersOut.To)
	})
}

// TestChartPeerFilesRollPods: the server reads the peers' files at start
// only, so a changed bootstrap bundle must change the pod template (and so
// roll the pods), though config.yaml itself is the same.
func TestChartPeerFilesRollPods(t *testing.T) {
	values := func(root []byte) map[string]any {
		return map[string]any{"federation": map[string]any{"peers": []any{map[string]any{
			"trustDomain": "b.example", "url": "https://bundle.b.example/", "profile": "https_spiffe",
			"endpointID": "spiffe://b.example/meshca/server", "bundle": string(root),
		}}}}
	}
	b := spiffeid.RequireTrustDomainFromString("b.example")
	one := renderChart(t, values(pemutil.EncodeCertificates(testca.New(t, b).Cert)))
	two := renderChart(t, values(pemutil.EncodeCertificates(testca.New(t, b).Cert)))
	a1, a2 := one.deployment.Spec.Template.Annotations, two.deployment.Spec.Template.Annotations
	require.Equal(t, a1["checksum/config"], a2["checksum/config"])
	require.NotEmpty(t, a1["checksum/config-files"])
	require.NotEqual(t, a1["checksum/config-files"], a2["checksum/config-files"])
}

// TestChartRefusesFederationValues: values the server would refuse, or
// that the chart cannot deploy, fail `helm template` with what is wrong.
func TestChartRefusesFederationValues(t *testing.T) {
	spiffePeer := func(kv ...any) map[string]any {
		p := map[string]any{"trustDomain": "b.example", "url": "https://bundle.b.example/", "profile": "https_spiffe",
			"endpointID": "spiffe://b.example/meshca/server", "bundle": "-----BEGIN CERTIFICATE-----\n"}
		for i := 0; i < len(kv); i += 2 {
			if kv[i+1] == nil {
				delete(p, kv[i].(string))
			} else {
				p[kv[i].(string)] = kv[i+1]
			}
		}
		return p
	}
	peers := func(p ...any) map[string]any { return map[string]any{"federation": map[string]any{"peers": p}} }
	for _, tc := range []struct {
		name   string
		values map[string]any
		want   string
	}{
		{
			name:   "endpoint https_web",
			values: map[string]any{"federation": map[string]any{"endpoint": map[string]any{"enabled": true, "profile": "https_web"}}},
			want: "federation.endpoint.profile https_web is not offered by the chart: meshca-server refuses a key file that group or others can read, " +
				"and the kubelet makes Secret-mounted files group-readable (0440) under the pod's fsGroup (without it, user 65532 cannot read them at all). " +
				"Use https_spiffe, or put a TLS-terminating proxy with a Web PKI certificate in front of the endpoint (deploy/helm/meshca/README.md)",
		},
		{
			name:   "endpoint profile unknown",
			values: map[string]any{"federation": map[string]any{"endpoint": map[string]any{"enabled": true, "profile": "http"}}},
			want:   `federation.endpoint.profile "http": want https_spiffe`,
		},
		{
			name:   "endpoint port taken",
			values: map[string]any{"federation": map[string]any{"endpoint": map[string]any{"enabled": true, "port": 8443}}},
			want:   "federation.endpoint.port 8443 is already one of the server's other ports",
		},
		{
			name:   "no trust domain",
			values: peers(spiffePeer("trustDomain", nil)),
			want:   "federation.peers[0]: trustDomain is required",
		},
		{
			name:   "bad trust domain",
			values: peers(spiffePeer("trustDomain", "B.example")),
			want:   `federation.peers[0]: trustDomain "B.example": want a trust domain name (lowercase letters, digits, ".", "-" and "_")`,
		},
		{
			name:   "own trust domain",
			values: peers(spiffePeer("trustDomain", "meshca.local")),
			want:   `federation.peers[0]: trustDomain "meshca.local" is this server's own`,
		},
		{
			name:   "twice",
			values: peers(spiffePeer(), spiffePeer()),
			want:   `federation.peers[1]: trust domain "b.example" appears more than once`,
		},
		{
			name:   "http url",
			values: peers(spiffePeer("url", "http://bundle.b.example/")),
			want:   `federation.peers[0]: b.example: url "http://bundle.b.example/": want the https URL of the peer's bundle endpoint`,
		},
		{
			name:   "https_spiffe without endpointID",
			values: peers(spiffePeer("endpointID", nil)),
			want:   "federation.peers[0]: b.example: profile https_spiffe needs endpointID, the SPIFFE ID the endpoint presents (a meshca peer's is spiffe://b.example/meshca/server)",
		},
		{
			name:   "https_spiffe without bundle",
			values: peers(spiffePeer("bundle", nil)),
			want:   "federation.peers[0]: b.example: profile https_spiffe needs bundle, the peer's bundle obtained out of band, PEM or SPIFFE JSON (--set-file federation.peers[0].bundle=<file>)",
		},
		{
			name:   "https_spiffe with webCA",
			values: peers(spiffePeer("webCA", "x")),
			want:   "federation.peers[0]: b.example: webCA is for profile https_web",
		},
		{
			name:   "https_web with a bundle",
			values: peers(spiffePeer("profile", "https_web", "endpointID", nil)),
			want:   "federation.peers[0]: b.example: endpointID and bundle are for profile https_spiffe",
		},
		{
			name:   "no profile",
			values: peers(spiffePeer("profile", nil)),
			want:   `federation.peers[0]: b.example: profile "": want https_spiffe or https_web`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := helm(t, "template", tc.values)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

// sortedKeys returns the keys of m, sorted.
func sortedKeys(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// requireVaultToken checks the projected service-account token for Vault:
// for audience, mounted read-only at dir; none when audience is empty.
func requireVaultToken(t *testing.T, r *renderedChart, audience, dir string) {
	t.Helper()
	var volume *corev1.Volume
	for i, v := range r.deployment.Spec.Template.Spec.Volumes {
		if v.Name == "vault-token" {
			volume = &r.deployment.Spec.Template.Spec.Volumes[i]
		}
	}
	var mount *corev1.VolumeMount
	for i, m := range r.server(t).VolumeMounts {
		if m.Name == "vault-token" {
			mount = &r.server(t).VolumeMounts[i]
		}
	}
	if audience == "" {
		require.Nil(t, volume)
		require.Nil(t, mount)
		return
	}
	require.NotNil(t, volume)
	require.NotNil(t, volume.Projected)
	require.Len(t, volume.Projected.Sources, 1)
	sat := volume.Projected.Sources[0].ServiceAccountToken
	require.NotNil(t, sat)
	require.Equal(t, audience, sat.Audience)
	require.Equal(t, "token", sat.Path)
	require.NotNil(t, mount)
	require.Equal(t, dir, mount.MountPath)
	require.True(t, mount.ReadOnly)
}
