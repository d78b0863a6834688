package main_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	securityv1alpha1 "istio.io/api/security/v1alpha1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshca/meshca/internal/kubetest"
	"github.com/meshca/meshca/internal/vaulttest"
	linkerdpb "github.com/meshca/meshca/proto/linkerd/identity"
	adminv1 "github.com/meshca/meshca/proto/meshca/admin/v1"
	"github.com/meshca/meshca/rotation"
	"github.com/meshca/meshca/testca"
)

// vaultCluster is one meshca-server of a cluster whose intermediates Vault
// signs, with the bootstrap tokens of its workloads.
type vaultCluster struct {
	name       string
	dataDir    string
	srv        *serverProc
	ids        []spiffeid.ID
	vaultToken string
}

func (c *vaultCluster) socket() string { return filepath.Join(c.dataDir, "admin.sock") }
func (c *vaultCluster) bundlePath() string {
	return filepath.Join(c.dataDir, "bundle.pem")
}

// token is the bootstrap token of the cluster's i-th workload.
func (c *vaultCluster) token(i int) string {
	return fmt.Sprintf("vault-e2e-%s-%02d-0123456789", c.name, i)
}

// tokenFile writes the i-th workload's token to a file for meshctl.
func (c *vaultCluster) tokenFile(t *testing.T, i int) string {
	path := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(path, []byte(c.token(i)+"\n"), 0o600))
	return path
}

// startVaultCluster starts meshca-server as cluster name of trust domain
// td, in mode vault with a Vault token file of its own. Its workloads are
// spiffe://meshca.local/cluster/<name>/ns/app/sa/wNN, and its policy
// allows only /cluster/<name>/; one more token is for another cluster's
// ID, which it must refuse.
func startVaultCluster(t *testing.T, v *sharedVault, name string, workloads int) *vaultCluster {
	t.Helper()
	dir := t.TempDir()
	c := &vaultCluster{name: name, dataDir: filepath.Join(dir, "data")}
	var tokens strings.Builder
	tokens.WriteString("tokens:\n")
	for i := range workloads + 1 {
		cluster := name
		if i == workloads {
			cluster = "elsewhere" // outside this cluster's scope
		}
		id := spiffeid.RequireFromPath(td, fmt.Sprintf("/cluster/%s/ns/app/sa/w%02d", cluster, i))
		c.ids = append(c.ids, id)
		fmt.Fprintf(&tokens, "- id: %s\n  token: %s\n", id, c.token(i))
	}
	tokenFile := filepath.Join(dir, "tokens.yaml")
	require.NoError(t, os.WriteFile(tokenFile, []byte(tokens.String()), 0o600))
	vaultTokenFile := filepath.Join(dir, "vault-token")
	c.vaultToken = v.server.CreateToken(t, []string{v.policy}, 0)
	require.NoError(t, os.WriteFile(vaultTokenFile, []byte(c.vaultToken+"\n"), 0o600))
	config := filepath.Join(dir, "config.yaml")
	require.NoError(t, os.WriteFile(config, []byte(fmt.Sprintf(vaultServerConfig, v.server.Addr, v.mount, vaultTokenFile, name, tokenFile)), 0o600))
	c.srv, _ = startServer(t, "--config", config, "--data-dir", c.dataDir)
	return c
}

// vaultServerConfig is the config of each cluster's server: the one
// docs/multicluster.md shows, with short lifetimes so that an intermediate
// is renewed within the test (leaves of 5s; intermediates of 30s, whose
// successor Vault signs with a third of the life left).
const vaultServerConfig = `
trustDomain: meshca.local
leaf:
  defaultTTL: 5s
  maxTTL: 5s
authority:
  mode: vault
  intermediateTTL: 30s
  rotationCheckInterval: 200ms
  vault:
    address: %s
    mount: %s
    timeout: 2s
    auth:
      tokenFile: %s
policy:
  allowedPathPrefixes: ["/cluster/%s/"]
bootstrapTokens: %s
`

// sharedVault is the test's Vault: a server, a PKI mount holding the root,
// and the policy the meshca servers' tokens carry.
type sharedVault struct {
	server *vaulttest.Server
	mount  string
	root   *x509.Certificate
	policy string
}

// TestVaultSharedRoot: two meshca-server processes, two clusters of one
// trust domain, take their intermediates from one Vault root; their
// workloads do mTLS both ways; a Vault outage stops neither from issuing
// and shows in meshctl root status and in metrics; once Vault is back the
// next check succeeds and an intermediate is renewed from it.
func TestVaultSharedRoot(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a real Vault and two servers for about 40s; skipped with -short")
	}
	begin := time.Now()
	vs := vaulttest.Start(t)
	v := &sharedVault{server: vs, mount: vs.NewPKIMount(t, "pki-e2e-"), policy: "meshca-sign-intermediate"}
	v.root = vs.GenerateRoot(t, v.mount, "meshca e2e shared root").Cert
	// What a cluster's server may do in Vault: sign intermediates, no
	// more (Vault serves the issuers' certificates without a token).
	vs.PutPolicy(t, v.policy, fmt.Sprintf(`path "%s/root/sign-intermediate" { capabilities = ["update"] }`, v.mount))

	a := startVaultCluster(t, v, "a", 2)
	b := startVaultCluster(t, v, "b", 2)

	// Different intermediates, one root: Vault's, the only one in either
	// bundle.
	stA, stB := rootStatus(t, a.socket()), rootStatus(t, b.socket())
	require.NotEqual(t, stA.GetIssuer().GetSerial(), stB.GetIssuer().GetSerial())
	for _, c := range []*vaultCluster{a, b} {
		bundle, err := x509bundle.Load(td, c.bundlePath())
		require.NoError(t, err)
		require.Len(t, bundle.X509Authorities(), 1, c.name)
		require.True(t, bundle.X509Authorities()[0].Equal(v.root), "%s's bundle is not Vault's root", c.name)
	}
	require.Equal(t, v.root.SerialNumber.Text(16), stA.GetRoots()[0].GetSerial())
	require.Equal(t, v.root.SerialNumber.Text(16), stB.GetRoots()[0].GetSerial())

	// The upstream answers; the metric says so.
	for _, c := range []*vaultCluster{a, b} {
		waitUpstream(t, c, true)
		require.Equal(t, "1", metric(t, c.srv.metrics, "meshca_upstream_available"))
	}

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()

	// A workload of A and one of B authorise each other's ID, both ways.
	wa := startVaultWorkload(ctx, t, &wg, a, 0)
	wb := startVaultWorkload(ctx, t, &wg, b, 0)
	requireMTLS(t, wa, wb)
	requireMTLS(t, wb, wa)
	leaf, err := wa.src.GetX509SVID()
	require.NoError(t, err)
	require.NoError(t, leaf.Certificates[len(leaf.Certificates)-1].CheckSignatureFrom(v.root), "A's intermediate is not signed by Vault's root")

	// Root steps are Vault's: refused, saying how to rotate in Vault.
	_, stderr, err := meshctl(t, "root", "prepare", "--admin-socket", a.socket())
	require.Error(t, err)
	require.Contains(t, stderr, "code = FailedPrecondition")
	require.Contains(t, stderr, "roots are managed in Vault ("+vs.Addr+"): add a root with `vault write "+v.mount+"/root/rotate/internal")

	// Scope: A refuses an ID under another cluster's prefix, on the native
	// API and on Istio's, before signing anything.
	elsewhere := len(a.ids) - 1
	_, stderr, err = meshctl(t, "issue", "--server", a.srv.addr, "--ca-bundle", a.bundlePath(),
		"--server-id", "spiffe://meshca.local/meshca/server", // Vault's root carries no SPIFFE ID
		"--token-file", a.tokenFile(t, elsewhere), "--spiffe-id", a.ids[elsewhere].String(), "--out-dir", t.TempDir())
	require.Error(t, err)
	require.Contains(t, stderr, "code = PermissionDenied")
	require.Contains(t, stderr, fmt.Sprintf(`%q is outside the paths this CA issues (/cluster/a/); another cluster's CA issues it`, a.ids[elsewhere]))
	key := testca.NewKey(t)
	_, err = securityv1alpha1.NewIstioCertificateServiceClient(dialServer(t, a.srv.addr, a.bundlePath())).CreateCertificate(
		metadata.AppendToOutgoingContext(t.Context(), "authorization", "Bearer "+a.token(elsewhere)),
		&securityv1alpha1.IstioCertificateRequest{Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: testca.CreateCSR(t, key, a.ids[elsewhere].String())}))})
	require.Equal(t, codes.PermissionDenied, status.Code(err), "%v", err)
	require.Contains(t, status.Convert(err).Message(), "outside the paths this CA issues")
	require.Equal(t, "2", metric(t, a.srv.metrics, `meshca_requests_denied_total{api="istio",code="PermissionDenied",reason="outside_scope"}`, `meshca_requests_denied_total{api="native",code="PermissionDenied",reason="outside_scope"}`))

	// Vault stops. Both servers notice at their next check, and say so.
	outage := time.Now()
	vs.Stop(t)
	for _, c := range []*vaultCluster{a, b} {
		st := waitUpstream(t, c, false)
		require.Positive(t, st.GetConsecutiveFailures())
		require.NotEmpty(t, st.GetLastError())
		require.NotContains(t, st.GetLastError(), "hvs.", "a Vault token in the status")
		out, stderr, err := meshctl(t, "root", "status", "--admin-socket", c.socket())
		require.NoError(t, err, stderr)
		require.Contains(t, out, fmt.Sprintf("upstream: Vault at %s, PKI mount %q: UNAVAILABLE since the last success at ", vs.Addr, v.mount))
		require.Contains(t, out, ", retry at ")
		require.Contains(t, out, ", last error: ")
		require.Equal(t, "0", metric(t, c.srv.metrics, "meshca_upstream_available"))
	}
	// An operator's rotation needs Vault: Unavailable, not an internal
	// error.
	_, stderr, err = meshctl(t, "intermediate", "rotate", "--admin-socket", a.socket())
	require.Error(t, err)
	require.Contains(t, stderr, "code = Unavailable")
	require.Contains(t, stderr, "the upstream authority is unavailable")

	// Both servers keep issuing: new workloads get certificates, and
	// talk across the clusters.
	wa2 := startVaultWorkload(ctx, t, &wg, a, 1)
	wb2 := startVaultWorkload(ctx, t, &wg, b, 1)
	requireMTLS(t, wa2, wb2)
	requireMTLS(t, wb2, wa)
	t.Logf("Vault down for %s: both servers issued meanwhile", time.Since(outage).Round(100*time.Millisecond))

	// Vault is back: the next check succeeds, and the intermediate is
	// renewed from it, under the same root.
	vs.Restart(t)
	restarted := time.Now()
	issuerBefore := map[string]string{}
	for _, c := range []*vaultCluster{a, b} {
		issuerBefore[c.name] = rootStatus(t, c.socket()).GetIssuer().GetSerial()
		waitUpstream(t, c, true)
		require.Equal(t, "1", metric(t, c.srv.metrics, "meshca_upstream_available"))
	}
	for _, c := range []*vaultCluster{a, b} {
		require.Eventually(t, func() bool {
			return rootStatus(t, c.socket()).GetIssuer().GetSerial() != issuerBefore[c.name]
		}, 60*time.Second, 200*time.Millisecond, "%s's intermediate was never renewed from Vault", c.name)
		t.Logf("%s: intermediate renewed from Vault %s after its restart", c.name, time.Since(restarted).Round(100*time.Millisecond))
		st := rootStatus(t, c.socket())
		require.Len(t, st.GetRoots(), 1)
		require.Equal(t, v.root.SerialNumber.Text(16), st.GetRoots()[0].GetSerial())
		c.srv.logs.WaitFor(t, `"step":"activate-intermediate"`)
	}
	// Workloads renewed under the new intermediates still talk, both ways.
	wa3 := startVaultWorkload(ctx, t, &wg, a, 0)
	requireMTLS(t, wa3, wb2)
	requireMTLS(t, wb2, wa3)
	requireMTLS(t, wb, wa2)

	// Vault refuses B's token once it is revoked: an operator's rotation
	// fails with FailedPrecondition, saying so, and B goes on signing.
	vs.RevokeToken(t, b.vaultToken)
	_, stderr, err = meshctl(t, "intermediate", "rotate", "--admin-socket", b.socket())
	require.Error(t, err)
	require.Contains(t, stderr, "code = FailedPrecondition")
	require.Contains(t, stderr, "the upstream authority denied the request")
	require.NotContains(t, stderr, b.vaultToken)
	wb4 := startVaultWorkload(ctx, t, &wg, b, 0)
	requireMTLS(t, wb4, wa3)

	for _, c := range []*vaultCluster{a, b} {
		require.NotContains(t, c.srv.logs.String(), c.vaultToken, "the Vault token in the log of %s", c.name)
		require.NotContains(t, c.srv.logs.String(), "hvs.", "a Vault token in the log of %s", c.name)
		require.NotContains(t, c.srv.logs.String(), "PRIVATE KEY")
	}
	cancel()
	wg.Wait()
	a.srv.stop()
	b.srv.stop()
	t.Logf("the test took %s", time.Since(begin).Round(100*time.Millisecond))
}

// waitUpstream waits until meshctl root status -o json reports the
// upstream available (or not), and returns that status.
func waitUpstream(t *testing.T, c *vaultCluster, available bool) *adminv1.UpstreamStatus {
	t.Helper()
	var last *adminv1.UpstreamStatus
	require.Eventually(t, func() bool {
		last = rootStatus(t, c.socket()).GetUpstream()
		return last != nil && last.GetAvailable() == available
	}, 30*time.Second, 100*time.Millisecond, "%s: the upstream never became available=%v", c.name, available)
	return last
}

// startVaultWorkload starts the i-th workload of cluster c: a
// rotation.Source renewing from c's server, and a TLS server accepting
// any workload of the trust domain.
func startVaultWorkload(ctx context.Context, t *testing.T, wg *sync.WaitGroup, c *vaultCluster, i int) *workload {
	t.Helper()
	initial, err := x509bundle.Load(td, c.bundlePath())
	require.NoError(t, err)
	token := c.token(i)
	src, err := rotation.NewSource(rotation.Options{
		ID:            c.ids[i],
		InitialBundle: initial,
		Token:         func(context.Context) (string, error) { return token, nil },
	})
	require.NoError(t, err)
	wg.Go(func() { _ = src.Run(ctx, src.Dialer(c.srv.addr, spiffeid.RequireFromPath(td, "/meshca/server"))) })
	readyCtx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	require.NoError(t, src.WaitUntilReady(readyCtx), "workload %s", c.ids[i])
	w := &workload{id: c.ids[i], src: src}
	w.lis, err = tls.Listen("tcp", "127.0.0.1:0", tlsconfig.MTLSServerConfig(src, src, tlsconfig.AuthorizeMemberOf(td)))
	require.NoError(t, err)
	wg.Go(func() { w.serve(ctx) })
	return w
}

// requireMTLS has from open an mTLS connection to to, authorising exactly
// to's ID, and exchange a byte (with TLS 1.3 the server's verdict on the
// client's certificate arrives with the first read).
func requireMTLS(t *testing.T, from, to *workload) {
	t.Helper()
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: tlsconfig.MTLSClientConfig(from.src, from.src, tlsconfig.AuthorizeID(to.id))}
	conn, err := d.DialContext(t.Context(), "tcp", to.lis.Addr().String())
	require.NoError(t, err, "%s -> %s", from.id, to.id)
	defer conn.Close()
	require.NoError(t, conn.SetDeadline(time.Now().Add(5*time.Second)))
	_, err = conn.Write([]byte{1})
	require.NoError(t, err)
	buf := make([]byte, 1)
	_, err = conn.Read(buf)
	require.NoError(t, err, "%s -> %s: the peer refused the client certificate", from.id, to.id)
}

// metric returns the value of the samples named (the sum when several
// are), as Prometheus writes it, from the metrics endpoint at addr.
func metric(t *testing.T, addr string, samples ...string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	var sum float64
	found := 0
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		for _, s := range samples {
			if v, ok := strings.CutPrefix(sc.Text(), s+" "); ok {
				var f float64
				_, err := fmt.Sscan(v, &f)
				require.NoError(t, err)
				sum += f
				found++
			}
		}
	}
	require.NoError(t, sc.Err())
	require.Equal(t, len(samples), found, "metrics %q not all found", samples)
	return fmt.Sprint(sum)
}

// TestVaultConfigRefused: meshca-server refuses a bad authority.vault or
// policy block at start, saying which key is wrong and what would be
// right, before contacting anything.
func TestVaultConfigRefused(t *testing.T) {
	dir := t.TempDir()
	vault := func(body string) string { return "authority:\n  mode: vault\n" + body }
	for _, tt := range []struct {
		name, config, want string
	}{
		{"missing address", vault("  vault:\n    auth: {tokenFile: /t}\n"),
			`authority.vault.address is required in mode "vault", such as https://vault.vault.svc:8200`},
		{"address not a URL", vault("  vault:\n    address: vault:8200\n    auth: {tokenFile: /t}\n"),
			`authority.vault.address "vault:8200" is not a Vault address such as https://vault.vault.svc:8200`},
		{"address with a path", vault("  vault:\n    address: https://vault:8200/v1/pki\n    auth: {tokenFile: /t}\n"),
			`authority.vault.address "https://vault:8200/v1/pki" is not a Vault address`},
		{"no auth", vault("  vault:\n    address: https://vault:8200\n"),
			"authority.vault.auth: set one of tokenFile (a file holding a Vault token, such as a Vault Agent sink), kubernetes (Vault's Kubernetes auth method) or token"},
		{"two auth methods", vault("  vault:\n    address: https://vault:8200\n    auth:\n      tokenFile: /t\n      kubernetes: {role: meshca}\n"),
			"authority.vault.auth: set one method, not tokenFile and kubernetes"},
		{"kubernetes without a role", vault("  vault:\n    address: https://vault:8200\n    auth:\n      kubernetes: {mount: kubernetes}\n"),
			"authority.vault.auth.kubernetes.role is required: the Vault role the server logs in as"},
		{"bad mount", vault("  vault:\n    address: https://vault:8200\n    mount: pki/../sys\n    auth: {tokenFile: /t}\n"),
			`authority.vault.mount "pki/../sys" is not a Vault path such as "pki" or "pki/meshca"`},
		{"mount with a space", vault("  vault:\n    address: https://vault:8200\n    mount: my pki\n    auth: {tokenFile: /t}\n"),
			`authority.vault.mount "my pki" is not a Vault path`},
		{"bad issuer", vault("  vault:\n    address: https://vault:8200\n    issuer: a/b\n    auth: {tokenFile: /t}\n"),
			`authority.vault.issuer "a/b" is not an issuer ID or name of the mount`},
		{"CA file over plain http", vault("  vault:\n    address: http://vault:8200\n    caFile: /ca.pem\n    auth: {tokenFile: /t}\n"),
			`authority.vault.address "http://vault:8200" is plain http but caFile or tlsServerName is set: use https`},
		{"negative timeout", vault("  vault:\n    address: https://vault:8200\n    timeout: -1s\n    auth: {tokenFile: /t}\n"),
			"authority.vault.timeout -1s must not be negative"},
		{"root TTL in mode vault", "authority:\n  mode: vault\n  rootTTL: 1000h\n  vault:\n    address: https://vault:8200\n    auth: {tokenFile: /t}\n",
			`authority.rootTTL has no effect in mode "vault": the roots are Vault's; remove it`},
		{"vault block in another mode", "authority:\n  vault:\n    address: https://vault:8200\n",
			`authority.vault is set but authority.mode is "selfsigned": set mode "vault" to use it`},
		{"unknown vault key", vault("  vault:\n    address: https://vault:8200\n    role: meshca\n"), `unknown field "role"`},
		{"path prefix of the whole domain", "policy:\n  allowedPathPrefixes: [\"/\"]\n",
			`policy.allowedPathPrefixes: identity: path prefix "/" would allow the whole trust domain; leave the prefixes empty for that`},
		{"path prefix not a path", "policy:\n  allowedPathPrefixes: [\"ns/payments\"]\n",
			`policy.allowedPathPrefixes: identity: path prefix "ns/payments" is not a SPIFFE ID path such as "/ns/payments/": path must have a leading slash`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			config := filepath.Join(dir, strings.ReplaceAll(tt.name, " ", "-")+".yaml")
			require.NoError(t, os.WriteFile(config, []byte(tt.config), 0o600))
			cmd := exec.Command(filepath.Join(binDir, "meshca-server"), "--config", config, "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--data-dir", filepath.Join(dir, "data"))
			out, err := cmd.CombinedOutput()
			var exit *exec.ExitError
			require.ErrorAs(t, err, &exit, string(out))
			require.Equal(t, 1, exit.ExitCode())
			require.Contains(t, string(out), tt.want)
		})
	}
}

// TestVaultKubernetes: two replicas in Kubernetes mode, mode vault, share
// one intermediate from Vault through the state Secret (the second loads
// what the first saved); only the leader calls Vault. The path-prefix
// policy refuses another namespace's service-account tokens on all three
// front ends: native, Istio and Linkerd.
func TestVaultKubernetes(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a real Vault and kube-apiserver; skipped with -short")
	}
	c := kubetest.Start(t)
	vs := vaulttest.Start(t)
	mount := vs.NewPKIMount(t, "pki-kube-")
	root := vs.GenerateRoot(t, mount, "meshca kube root").Cert
	vs.PutPolicy(t, "meshca", fmt.Sprintf(`path "%s/root/sign-intermediate" { capabilities = ["update"] }`, mount))
	ctx := t.Context()
	dir := t.TempDir()
	app := c.CreateNamespace(t, "app-").Name
	other := c.CreateNamespace(t, "other-").Name
	c.CreateServiceAccount(t, app, "web")
	c.CreateServiceAccount(t, other, "web")
	vaultToken := filepath.Join(dir, "vault-token")
	require.NoError(t, os.WriteFile(vaultToken, []byte(vs.CreateToken(t, []string{"meshca"}, 0)), 0o600))
	config := kubeModeConfig(t, c, dir, fmt.Sprintf(`authority:
  mode: vault
  rotationCheckInterval: 500ms
  vault:
    address: %s
    mount: %s
    auth:
      tokenFile: %s
policy:
  allowedPathPrefixes: ["/ns/%s/"]
`, vs.Addr, mount, vaultToken, app))

	type replica struct {
		name, socket, bundle string
		proc                 *serverProc
	}
	var replicas []*replica
	for _, name := range []string{"a", "b"} {
		data := filepath.Join(dir, name)
		proc, _ := startServerEnv(t, []string{"POD_NAME=meshca-" + name}, "--config", config, "--data-dir", data)
		replicas = append(replicas, &replica{name: "meshca-" + name, socket: filepath.Join(data, "admin.sock"), bundle: filepath.Join(data, "bundle.pem"), proc: proc})
	}
	// One intermediate, Vault's root alone in the bundle.
	stA, stB := rootStatus(t, replicas[0].socket), rootStatus(t, replicas[1].socket)
	require.Equal(t, stA.GetIssuer().GetSerial(), stB.GetIssuer().GetSerial())
	for _, r := range replicas {
		bundle, err := x509bundle.Load(td, r.bundle)
		require.NoError(t, err)
		require.Len(t, bundle.X509Authorities(), 1)
		require.True(t, bundle.X509Authorities()[0].Equal(root))
	}

	// The leader calls Vault; the other replica does not, and says so.
	var leader, follower *replica
	require.Eventually(t, func() bool {
		lease, err := c.Client.CoordinationV1().Leases(caNamespace).Get(ctx, "meshca-leader", metav1.GetOptions{})
		if err != nil || lease.Spec.HolderIdentity == nil {
			return false
		}
		for i, r := range replicas {
			if r.name == *lease.Spec.HolderIdentity {
				leader, follower = r, replicas[1-i]
			}
		}
		return leader != nil
	}, 20*time.Second, 100*time.Millisecond)
	require.Eventually(t, func() bool { return rootStatus(t, leader.socket).GetUpstream().GetAvailable() }, 20*time.Second, 100*time.Millisecond)
	up := rootStatus(t, follower.socket).GetUpstream()
	require.False(t, up.GetAvailable())
	require.Nil(t, up.GetLastFailure())
	out, stderr, err := meshctl(t, "root", "status", "--admin-socket", follower.socket)
	require.NoError(t, err, stderr)
	require.Contains(t, out, fmt.Sprintf("upstream: Vault at %s, PKI mount %q: not called yet (only the replica that leads calls it)", vs.Addr, mount))

	// In scope: the app namespace's token gets its identity.
	serverID := "spiffe://meshca.local/meshca/server"
	inScope := filepath.Join(dir, "app-token")
	require.NoError(t, os.WriteFile(inScope, []byte(c.Token(t, app, "web", []string{"meshca"}, time.Hour)), 0o600))
	_, stderr, err = meshctl(t, "issue", "--server", follower.proc.addr, "--ca-bundle", follower.bundle, "--server-id", serverID,
		"--token-file", inScope, "--spiffe-id", "spiffe://meshca.local/ns/"+app+"/sa/web", "--out-dir", t.TempDir())
	require.NoError(t, err, stderr)

	// Out of scope, on every front end: PermissionDenied, outside_scope.
	otherID := "spiffe://meshca.local/ns/" + other + "/sa/web"
	want := fmt.Sprintf(`%q is outside the paths this CA issues (/ns/%s/); another cluster's CA issues it`, otherID, app)
	outOfScope := filepath.Join(dir, "other-token")
	require.NoError(t, os.WriteFile(outOfScope, []byte(c.Token(t, other, "web", []string{"meshca"}, time.Hour)), 0o600))
	_, stderr, err = meshctl(t, "issue", "--server", follower.proc.addr, "--ca-bundle", follower.bundle, "--server-id", serverID,
		"--token-file", outOfScope, "--spiffe-id", otherID, "--out-dir", t.TempDir())
	require.Error(t, err)
	require.Contains(t, stderr, "code = PermissionDenied")
	require.Contains(t, stderr, want)

	conn := dialServer(t, follower.proc.addr, follower.bundle)
	key := testca.NewKey(t)
	_, err = securityv1alpha1.NewIstioCertificateServiceClient(conn).CreateCertificate(
		metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.Token(t, other, "web", []string{"istio-ca"}, time.Hour)),
		&securityv1alpha1.IstioCertificateRequest{Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: testca.CreateCSR(t, key, otherID)}))})
	require.Equal(t, codes.PermissionDenied, status.Code(err), "%v", err)
	require.Contains(t, status.Convert(err).Message(), want)

	name := "web." + other + ".serviceaccount.identity.linkerd.cluster.local"
	_, err = linkerdpb.NewIdentityClient(conn).Certify(ctx, &linkerdpb.CertifyRequest{
		Identity:                  name,
		Token:                     []byte(c.Token(t, other, "web", []string{"identity.l5d.io"}, time.Hour)),
		CertificateSigningRequest: testca.SignCSR(t, &x509.CertificateRequest{DNSNames: []string{name}}, key),
	})
	require.Equal(t, codes.PermissionDenied, status.Code(err), "%v", err)
	require.Contains(t, status.Convert(err).Message(), want)

	require.Equal(t, "3", metric(t, follower.proc.metrics,
		`meshca_requests_denied_total{api="native",code="PermissionDenied",reason="outside_scope"}`,
		`meshca_requests_denied_total{api="istio",code="PermissionDenied",reason="outside_scope"}`,
		`meshca_requests_denied_total{api="linkerd",code="PermissionDenied",reason="outside_scope"}`))
	for _, r := range replicas {
		r.proc.stop()
	}
}
