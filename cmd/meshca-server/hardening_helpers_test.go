package main_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshca/meshca/internal/kubetest"
)

// bootstrapToken is the static token of workload i in the hardening tests.
func bootstrapToken(i int) string { return fmt.Sprintf("hardening-token-%02d-0123456789", i) }

// writeBootstrapTokens writes a token file in dir giving workload i of ids
// the token bootstrapToken(i), and returns its path.
func writeBootstrapTokens(t *testing.T, dir string, ids []spiffeid.ID) string {
	t.Helper()
	var b strings.Builder
	b.WriteString("tokens:\n")
	for i, id := range ids {
		fmt.Fprintf(&b, "- id: %s\n  token: %s\n", id, bootstrapToken(i))
	}
	path := filepath.Join(dir, "tokens.yaml")
	require.NoError(t, os.WriteFile(path, []byte(b.String()), 0o600))
	return path
}

// workloadIDs returns n workload IDs of namespace ns in td.
func workloadIDs(td spiffeid.TrustDomain, ns string, n int) []spiffeid.ID {
	ids := make([]spiffeid.ID, n)
	for i := range ids {
		ids[i] = spiffeid.RequireFromPath(td, fmt.Sprintf("/ns/%s/sa/w%02d", ns, i))
	}
	return ids
}

// logLine is one JSON line of a server's log.
type logLine map[string]any

func (l logLine) str(key string) string {
	s, _ := l[key].(string)
	return s
}

// logLines returns the JSON lines of logs whose msg is msg.
func logLines(logs, msg string) []logLine {
	var out []logLine
	sc := bufio.NewScanner(strings.NewReader(logs))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		var l logLine
		if json.Unmarshal(sc.Bytes(), &l) == nil && l.str("msg") == msg {
			out = append(out, l)
		}
	}
	return out
}

// auditLines returns the audit lines of logs with msg whose fields include
// every key and value of match.
func auditLines(logs, msg string, match map[string]string) []logLine {
	var out []logLine
lines:
	for _, l := range logLines(logs, msg) {
		if l["audit"] != true {
			continue
		}
		for k, v := range match {
			if l.str(k) != v {
				continue lines
			}
		}
		out = append(out, l)
	}
	return out
}

// kubeServer is a meshca-server in Kubernetes mode against a real
// kube-apiserver, serving every front end (native, Istio, Linkerd), with a
// health port and a federation endpoint (https_spiffe), and a namespace of
// the test's own holding the service accounts web and other.
type kubeServer struct {
	c       *kubetest.Cluster
	srv     *serverProc
	ready   readyLine
	dataDir string
	socket  string
	bundle  string
	fedAddr string
	ns      string
}

// startKubeServer starts a cluster and a server on it with extra config
// appended.
func startKubeServer(t *testing.T, extra string) *kubeServer {
	t.Helper()
	c := kubetest.Start(t)
	dir := t.TempDir()
	config := kubeModeConfig(t, c, dir, `federation:
  endpoint:
    listenAddress: 127.0.0.1:0
`+extra)
	k := &kubeServer{c: c, dataDir: filepath.Join(dir, "data")}
	k.srv, k.ready = startServerEnv(t, []string{"POD_NAME=meshca-0"}, "--config", config, "--data-dir", k.dataDir, "--health-listen", "127.0.0.1:0")
	k.socket = filepath.Join(k.dataDir, "admin.sock")
	k.bundle = filepath.Join(k.dataDir, "bundle.pem")
	k.fedAddr = readyField(t, k.srv, "federation_address")
	k.ns = c.CreateNamespace(t, "hostile-").Name
	c.CreateServiceAccount(t, k.ns, "web")
	c.CreateServiceAccount(t, k.ns, "other")
	return k
}

// token returns a service-account token of sa in the server's test
// namespace for audiences.
func (k *kubeServer) token(t *testing.T, sa string, audiences ...string) string {
	t.Helper()
	return k.c.Token(t, k.ns, sa, audiences, time.Hour)
}

// id returns the SPIFFE ID of service account sa of the test namespace.
func (k *kubeServer) id(sa string) spiffeid.ID {
	return spiffeid.RequireFromPath(td, "/ns/"+k.ns+"/sa/"+sa)
}

// linkerdName returns the Linkerd identity of sa in the test namespace.
func (k *kubeServer) linkerdName(sa string) string {
	return sa + "." + k.ns + ".serviceaccount.identity.linkerd.cluster.local"
}

// dialServerWithSVID is dialServer presenting svid as the client
// certificate.
func dialServerWithSVID(t *testing.T, addr, bundlePath string, svid x509svid.Source) *grpc.ClientConn {
	t.Helper()
	bundle, err := x509bundle.Load(td, bundlePath)
	require.NoError(t, err)
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(
		tlsconfig.MTLSClientConfig(svid, bundle, tlsconfig.AuthorizeID(spiffeid.RequireFromPath(td, "/meshca/server"))))))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return conn
}

// waitLeader waits until the server holds the leader Lease.
func (k *kubeServer) waitLeader(t *testing.T) {
	t.Helper()
	require.Eventually(t, func() bool {
		lease, err := k.c.Client.CoordinationV1().Leases("meshca-system").Get(t.Context(), "meshca-leader", metav1.GetOptions{})
		return err == nil && lease.Spec.HolderIdentity != nil && *lease.Spec.HolderIdentity == "meshca-0"
	}, 30*time.Second, 50*time.Millisecond, "the server never took the leader Lease")
}

// caNamespace is the namespace the tests run meshca in, in Kubernetes mode.
const caNamespace = "meshca-system"

// kubeModeConfig creates the CA's namespace in c and writes, in dir, a
// kubeconfig for c and a config file for Kubernetes mode on it with quick
// Lease timings, extra appended. It returns the config file's path.
func kubeModeConfig(t *testing.T, c *kubetest.Cluster, dir, extra string) string {
	t.Helper()
	c.CreateNamespace(t, caNamespace)
	kubeconfig := filepath.Join(dir, "kubeconfig")
	writeKubeconfig(t, c, kubeconfig)
	config := filepath.Join(dir, "config.yaml")
	require.NoError(t, os.WriteFile(config, []byte(`
kubernetes:
  enabled: true
  kubeconfig: `+kubeconfig+`
  namespace: `+caNamespace+`
  leaseDuration: 3s
  renewDeadline: 2s
  retryPeriod: 250ms
`+extra), 0o600))
	return config
}
