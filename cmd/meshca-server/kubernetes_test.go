package main_test

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/metadata"
	securityv1alpha1 "istio.io/api/security/v1alpha1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/meshca/meshca/internal/kubetest"
	linkerdpb "github.com/meshca/meshca/proto/linkerd/identity"
	"github.com/meshca/meshca/testca"
)

// writeKubeconfig writes an admin kubeconfig for the test cluster.
func writeKubeconfig(t *testing.T, c *kubetest.Cluster, path string) {
	t.Helper()
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["test"] = &clientcmdapi.Cluster{Server: c.Config.Host, CertificateAuthorityData: c.Config.CAData}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{Token: c.Config.BearerToken}
	cfg.Contexts["test"] = &clientcmdapi.Context{Cluster: "test", AuthInfo: "admin"}
	cfg.CurrentContext = "test"
	require.NoError(t, clientcmd.WriteToFile(*cfg, path))
}

// TestKubernetes runs two meshca-server replicas against a real
// kube-apiserver: service-account tokens are reviewed, both replicas sign
// from one Secret, the leader publishes the bundle in every namespace and
// rotates; when it dies, the other takes the Lease and the rotation goes
// on.
func TestKubernetes(t *testing.T) {
	c := kubetest.Start(t)
	ctx := t.Context()
	dir := t.TempDir()
	config := kubeModeConfig(t, c, dir, "")

	// Two replicas, each with its own data directory (bundle.pem, socket).
	type replica struct {
		name   string
		proc   *serverProc
		socket string
		bundle string
	}
	replicas := map[string]*replica{}
	for _, name := range []string{"a", "b"} {
		data := filepath.Join(dir, name)
		proc, _ := startServerEnv(t, []string{"POD_NAME=meshca-" + name}, "--config", config, "--data-dir", data)
		replicas["meshca-"+name] = &replica{name: name, proc: proc, socket: filepath.Join(data, "admin.sock"), bundle: filepath.Join(data, "bundle.pem")}
	}
	a, b := replicas["meshca-a"], replicas["meshca-b"]

	// One root for both: whoever created the Secret first, the other
	// loaded it.
	ba, err := os.ReadFile(a.bundle)
	require.NoError(t, err)
	bb, err := os.ReadFile(b.bundle)
	require.NoError(t, err)
	require.Equal(t, string(ba), string(bb))

	// A workload's service-account token for audience meshca gets its
	// identity from both replicas.
	app := c.CreateNamespace(t, "app-").Name
	c.CreateServiceAccount(t, app, "web")
	webID := fmt.Sprintf("spiffe://meshca.local/ns/%s/sa/web", app)
	tokenFile := filepath.Join(dir, "token")
	require.NoError(t, os.WriteFile(tokenFile, []byte(c.Token(t, app, "web", []string{"meshca"}, time.Hour)), 0o600))
	for _, r := range []*replica{a, b} {
		out, stderr, err := meshctl(t, "issue", "--server", r.proc.addr, "--ca-bundle", r.bundle,
			"--token-file", tokenFile, "--spiffe-id", webID, "--out-dir", filepath.Join(dir, "svid-"+r.name))
		require.NoError(t, err, stderr)
		require.Contains(t, out, "issued "+webID)
	}
	require.Eventually(t, func() bool {
		return strings.Contains(a.proc.logs.String()+b.proc.logs.String(), `"method":"kubernetes_token"`)
	}, 10*time.Second, 5*time.Millisecond, "no replica audited a kubernetes_token caller")

	// The identity is the token's, whatever the CSR asks.
	_, stderr, err := meshctl(t, "issue", "--server", a.proc.addr, "--ca-bundle", a.bundle,
		"--token-file", tokenFile, "--spiffe-id", fmt.Sprintf("spiffe://meshca.local/ns/%s/sa/admin", app), "--out-dir", t.TempDir())
	require.Error(t, err)
	require.Contains(t, stderr, "code = PermissionDenied")
	require.Contains(t, stderr, "but the credential is for \""+webID+"\"")

	// A token for another audience is not a credential for meshca.
	otherAud := filepath.Join(dir, "other-token")
	require.NoError(t, os.WriteFile(otherAud, []byte(c.Token(t, app, "web", []string{"vault"}, time.Hour)), 0o600))
	_, stderr, err = meshctl(t, "issue", "--server", a.proc.addr, "--ca-bundle", a.bundle,
		"--token-file", otherAud, "--spiffe-id", webID, "--out-dir", t.TempDir())
	require.Error(t, err)
	require.Contains(t, stderr, "code = Unauthenticated")

	// Linkerd's API is on in Kubernetes mode: a proxy's token for
	// identity.l5d.io gets a DNS leaf of its identity, chaining to the
	// bundle; the same token is no credential on the native API.
	l5dToken := c.Token(t, app, "web", []string{"identity.l5d.io"}, time.Hour)
	name := "web." + app + ".serviceaccount.identity.linkerd.cluster.local"
	conn := dialServer(t, a.proc.addr, a.bundle)
	l5dKey := testca.NewKey(t)
	certified, err := linkerdpb.NewIdentityClient(conn).Certify(ctx, &linkerdpb.CertifyRequest{
		Identity:                  name,
		Token:                     []byte(l5dToken),
		CertificateSigningRequest: testca.SignCSR(t, &x509.CertificateRequest{DNSNames: []string{name}}, l5dKey),
	})
	require.NoError(t, err)
	leaf, err := x509.ParseCertificate(certified.LeafCertificate)
	require.NoError(t, err)
	require.Equal(t, []string{name}, leaf.DNSNames)
	require.Empty(t, leaf.URIs)
	require.Equal(t, leaf.NotAfter, certified.ValidUntil.AsTime())
	anchors, err := x509bundle.Load(td, a.bundle)
	require.NoError(t, err)
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range anchors.X509Authorities() {
		roots.AddCert(r)
	}
	for _, der := range certified.IntermediateCertificates {
		cert, err := x509.ParseCertificate(der)
		require.NoError(t, err)
		inters.AddCert(cert)
	}
	_, err = leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: roots, Intermediates: inters})
	require.NoError(t, err)
	l5dFile := filepath.Join(dir, "l5d-token")
	require.NoError(t, os.WriteFile(l5dFile, []byte(l5dToken), 0o600))
	_, stderr, err = meshctl(t, "issue", "--server", a.proc.addr, "--ca-bundle", a.bundle,
		"--token-file", l5dFile, "--spiffe-id", webID, "--out-dir", t.TempDir())
	require.Error(t, err)
	require.Contains(t, stderr, "code = Unauthenticated")

	// Istio's API takes a token for istio-ca, as Istio's proxies send.
	istioKey := testca.NewKey(t)
	istioResp, err := securityv1alpha1.NewIstioCertificateServiceClient(conn).CreateCertificate(
		metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.Token(t, app, "web", []string{"istio-ca"}, time.Hour)),
		&securityv1alpha1.IstioCertificateRequest{Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: testca.CreateCSR(t, istioKey, webID)}))})
	require.NoError(t, err)
	istioSVID, err := x509svid.Parse([]byte(strings.Join(istioResp.CertChain[:len(istioResp.CertChain)-1], "")), pemKey(t, istioKey))
	require.NoError(t, err)
	require.Equal(t, webID, istioSVID.ID.String())
	a.proc.logs.WaitFor(t, `"api":"linkerd"`)
	a.proc.logs.WaitFor(t, `"istio_api":true,"linkerd_api":true`)

	// One of them leads, and has published the bundle in every namespace.
	leaderName := func() string {
		lease, err := c.Client.CoordinationV1().Leases(caNamespace).Get(ctx, "meshca-leader", metav1.GetOptions{})
		if err != nil || lease.Spec.HolderIdentity == nil {
			return ""
		}
		return *lease.Spec.HolderIdentity
	}
	require.Eventually(t, func() bool { return leaderName() != "" }, 20*time.Second, 100*time.Millisecond)
	lead := replicas[leaderName()]
	follower := a
	if lead == a {
		follower = b
	}
	cmSequence := func(ns string) string {
		cm, err := c.Client.CoreV1().ConfigMaps(ns).Get(ctx, "meshca-trust-bundle", metav1.GetOptions{})
		if err != nil {
			return ""
		}
		return cm.Data["sequence"]
	}
	require.Eventually(t, func() bool { return cmSequence(app) == "1" && cmSequence("default") == "1" }, 20*time.Second, 100*time.Millisecond)
	later := c.CreateNamespace(t, "later-").Name
	require.Eventually(t, func() bool { return cmSequence(later) == "1" }, 20*time.Second, 100*time.Millisecond, "a namespace created later gets the bundle")

	// Only the leader rotates.
	_, stderr, err = meshctl(t, "root", "prepare", "--admin-socket", follower.socket)
	require.Error(t, err)
	require.Contains(t, stderr, "this replica is not the leader")
	_, stderr, err = meshctl(t, "root", "prepare", "--admin-socket", lead.socket)
	require.NoError(t, err, stderr)
	require.Eventually(t, func() bool { return cmSequence(app) == "2" }, 20*time.Second, 100*time.Millisecond, "the prepared root reaches the ConfigMaps")
	require.Eventually(t, func() bool { return len(rootStatus(t, follower.socket).Roots) == 2 }, 20*time.Second, 100*time.Millisecond, "the follower follows the Secret")

	// The leader dies. The other takes the Lease and the rotation goes on.
	require.NoError(t, lead.proc.cmd.Process.Signal(syscall.SIGKILL))
	require.Eventually(t, func() bool { return leaderName() == "meshca-"+follower.name }, 30*time.Second, 100*time.Millisecond, "the follower never took the Lease")
	for _, step := range []string{"activate", "retire"} {
		require.Eventually(t, func() bool {
			_, _, err := meshctl(t, "root", step, "--admin-socket", follower.socket, "--force")
			return err == nil
		}, 20*time.Second, 250*time.Millisecond, "root %s on the new leader", step)
	}
	require.Eventually(t, func() bool { return cmSequence(app) == "3" && cmSequence(later) == "3" }, 20*time.Second, 100*time.Millisecond)

	// Workloads keep getting certificates, under the new root alone.
	cm, err := c.Client.CoreV1().ConfigMaps(app).Get(ctx, "meshca-trust-bundle", metav1.GetOptions{})
	require.NoError(t, err)
	newBundle := filepath.Join(dir, "new-bundle.pem")
	require.NoError(t, os.WriteFile(newBundle, []byte(cm.Data["bundle.pem"]), 0o600))
	out := filepath.Join(dir, "svid-after")
	_, stderr, err = meshctl(t, "issue", "--server", follower.proc.addr, "--ca-bundle", newBundle,
		"--token-file", tokenFile, "--spiffe-id", webID, "--out-dir", out)
	require.NoError(t, err, stderr)
	trusted, err := x509bundle.Load(td, newBundle)
	require.NoError(t, err)
	require.Len(t, trusted.X509Authorities(), 1)
	osslOut, err := opensslVerify(filepath.Join(out, "svid.pem"), newBundle)
	require.NoError(t, err, osslOut)

	// The state Secret holds the keys, and nothing else holds them.
	secret, err := c.Client.CoreV1().Secrets(caNamespace).Get(ctx, "meshca-state", metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, corev1.SecretTypeOpaque, secret.Type)
	require.NotContains(t, follower.proc.logs.String(), "PRIVATE KEY")
	require.False(t, strings.Contains(follower.proc.logs.String(), string(mustRead(t, tokenFile))), "a token reached the log")
	follower.proc.stop()
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return b
}
