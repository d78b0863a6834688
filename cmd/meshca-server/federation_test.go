package main_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/encoding/protojson"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshca/meshca/identity/bundlepublish"
	"github.com/meshca/meshca/internal/kubetest"
	"github.com/meshca/meshca/internal/pemutil"
	adminv1 "github.com/meshca/meshca/proto/meshca/admin/v1"
	"github.com/meshca/meshca/rotation"
	"github.com/meshca/meshca/testca"
)

// workloadsPerDomain is how many workloads each trust domain runs.
const workloadsPerDomain = 3

// domain is one trust domain of the federation tests: a meshca-server
// process with a bundle endpoint, and its workloads.
type domain struct {
	td        spiffeid.TrustDomain
	dir       string
	dataDir   string
	socket    string
	srv       *serverProc
	endpoint  string // the bundle endpoint's address
	serverID  spiffeid.ID
	ids       []spiffeid.ID
	workloads []*workload
}

// webPKI is the Web PKI of the https_web variant: one root, trusted by
// both domains, and a localhost certificate for each endpoint. (testca has
// no option for IP SANs, so the endpoints are reached as localhost.)
type webPKI struct {
	root   *testca.CA
	caFile string
}

func newWebPKI(t *testing.T) *webPKI {
	t.Helper()
	root := testca.New(t, spiffeid.RequireTrustDomainFromString("web.test"))
	caFile := filepath.Join(t.TempDir(), "web-ca.pem")
	require.NoError(t, os.WriteFile(caFile, pemutil.EncodeCertificates(root.Cert), 0o644))
	return &webPKI{root: root, caFile: caFile}
}

// keyPair writes a Web PKI certificate for localhost and its key in dir.
func (w *webPKI) keyPair(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	svid := w.root.CreateX509SVID(spiffeid.RequireFromString("spiffe://web.test/bundle-endpoint"), testca.WithDNSNames("localhost"))
	certFile, keyFile = filepath.Join(dir, "endpoint.crt"), filepath.Join(dir, "endpoint.key")
	require.NoError(t, os.WriteFile(certFile, pemutil.EncodeCertificates(svid.Certificates...), 0o644))
	require.NoError(t, os.WriteFile(keyFile, pemKey(t, svid.PrivateKey), 0o600))
	return certFile, keyFile
}

// startDomain starts meshca-server for td with 6s leaves, a 2s bundle
// refresh hint (served on the bundle endpoint too), bootstrap tokens for
// its workloads, and a bundle endpoint of the profile web says (https_web
// when web is not nil), plus extra config.
func startDomain(t *testing.T, name string, web *webPKI, extra string) *domain {
	t.Helper()
	d := &domain{td: spiffeid.RequireTrustDomainFromString(name), dir: t.TempDir()}
	d.dataDir = filepath.Join(d.dir, "data")
	d.socket = filepath.Join(d.dataDir, "admin.sock")
	d.serverID = spiffeid.RequireFromPath(d.td, "/meshca/server")
	var tokens strings.Builder
	tokens.WriteString("tokens:\n")
	for i := range workloadsPerDomain {
		id := spiffeid.RequireFromPath(d.td, fmt.Sprintf("/ns/e2e/sa/w%d", i))
		d.ids = append(d.ids, id)
		fmt.Fprintf(&tokens, "- id: %s\n  token: %s\n", id, d.token(i))
	}
	tokenFile := filepath.Join(d.dir, "tokens.yaml")
	require.NoError(t, os.WriteFile(tokenFile, []byte(tokens.String()), 0o600))
	endpoint := "    profile: https_spiffe\n"
	if web != nil {
		cert, key := web.keyPair(t, d.dir)
		endpoint = fmt.Sprintf("    profile: https_web\n    certFile: %s\n    keyFile: %s\n", cert, key)
	}
	config := filepath.Join(d.dir, "config.yaml")
	require.NoError(t, os.WriteFile(config, []byte(fmt.Sprintf(`trustDomain: %s
leaf:
  defaultTTL: 6s
  maxTTL: 6s
bundleRefreshHint: 2s
bootstrapTokens: %s
federation:
  minRefresh: 1s
  endpoint:
    listenAddress: 127.0.0.1:0
%s%s`, name, tokenFile, endpoint, extra)), 0o600))
	d.srv, _ = startServer(t, "--config", config, "--data-dir", d.dataDir)
	d.endpoint = readyField(t, d.srv, "federation_address")
	return d
}

func (d *domain) token(i int) string { return fmt.Sprintf("token-%s-%d-0123456789", d.td.Name(), i) }

// url returns the bundle endpoint's URL: by address for https_spiffe, by
// the certificate's host name for https_web.
func (d *domain) url(web *webPKI) string {
	if web == nil {
		return "https://" + d.endpoint + "/"
	}
	_, port, _ := net.SplitHostPort(d.endpoint)
	return "https://localhost:" + port + "/"
}

func (d *domain) bundleFile() string { return filepath.Join(d.dataDir, "bundle.pem") }

func (d *domain) bundle(t *testing.T) *x509bundle.Bundle {
	t.Helper()
	b, err := x509bundle.Load(d.td, d.bundleFile())
	require.NoError(t, err)
	return b
}

// readyField returns a field of the server's ready log line.
func readyField(t *testing.T, p *serverProc, field string) string {
	t.Helper()
	sc := bufio.NewScanner(strings.NewReader(p.logs.String()))
	for sc.Scan() {
		var line map[string]any
		if json.Unmarshal(sc.Bytes(), &line) == nil && line["msg"] == "meshca-server ready" {
			v, _ := line[field].(string)
			require.NotEmpty(t, v, "ready line has no %s", field)
			return v
		}
	}
	t.Fatalf("no ready line:\n%s", p.logs.String())
	return ""
}

// federateWith runs meshctl federation add on d for peer.
func (d *domain) federateWith(t *testing.T, peer *domain, web *webPKI) {
	t.Helper()
	args := []string{"federation", "add", peer.td.Name(), "--admin-socket", d.socket, "--url", peer.url(web)}
	if web == nil {
		args = append(args, "--profile", "https_spiffe", "--endpoint-id", peer.serverID.String(), "--bundle-file", peer.bundleFile())
	} else {
		args = append(args, "--profile", "https_web", "--web-ca-file", web.caFile)
	}
	stdout, stderr, err := meshctl(t, args...)
	require.NoError(t, err, stderr)
	require.Contains(t, stdout, "trust domain        "+peer.td.Name())
}

// startWorkloads starts d's workloads: each a rotation.Source renewing
// from d's server, and an mTLS server that admits the workloads of peer
// only, by their SPIFFE IDs.
func (d *domain) startWorkloads(ctx context.Context, t *testing.T, wg *sync.WaitGroup, peer *domain) {
	t.Helper()
	initial := d.bundle(t)
	for i, id := range d.ids {
		token := d.token(i)
		src, err := rotation.NewSource(rotation.Options{
			ID:            id,
			InitialBundle: initial,
			Token:         func(context.Context) (string, error) { return token, nil },
		})
		require.NoError(t, err)
		wg.Go(func() { _ = src.Run(ctx, src.Dialer(d.srv.addr, d.serverID)) })
		readyCtx, cancel := context.WithTimeout(ctx, 20*time.Second)
		require.NoError(t, src.WaitUntilReady(readyCtx))
		cancel()
		w := &workload{id: id, src: src}
		w.lis, err = tls.Listen("tcp", "127.0.0.1:0", tlsconfig.MTLSServerConfig(src, src, tlsconfig.AuthorizeOneOf(peer.ids...)))
		require.NoError(t, err)
		wg.Go(func() { w.serve(ctx) })
		d.workloads = append(d.workloads, w)
	}
}

// waitForPeerRoots waits until every workload of d holds exactly roots as
// the bundle of trust domain peer.
func (d *domain) waitForPeerRoots(t *testing.T, peer spiffeid.TrustDomain, roots []*x509.Certificate, what string) {
	t.Helper()
	want := x509bundle.FromX509Authorities(peer, roots)
	for _, w := range d.workloads {
		require.Eventually(t, func() bool {
			b, err := w.src.GetX509BundleForTrustDomain(peer)
			return err == nil && b.Equal(want)
		}, 30*time.Second, 50*time.Millisecond, "%s never held %s", w.id, what)
	}
}

// dialDomain opens a new mTLS connection to a random workload of peers
// every 100ms, authorising exactly that workload's SPIFFE ID, until ctx is
// done.
func (w *workload) dialDomain(ctx context.Context, peers []*workload, hs *handshakes) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		peer := peers[rand.IntN(len(peers))]
		cfg := tlsconfig.MTLSClientConfig(w.src, w.src, tlsconfig.AuthorizeID(peer.id))
		d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: cfg}
		conn, err := d.DialContext(ctx, "tcp", peer.lis.Addr().String())
		if err != nil {
			if ctx.Err() == nil {
				hs.fail("%s -> %s: handshake: %v", w.id, peer.id, err)
			}
			continue
		}
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		buf := []byte{1}
		_, err = conn.Write(buf)
		if err == nil {
			_, err = conn.Read(buf)
		}
		conn.Close()
		switch {
		case err == nil:
			hs.ok[hs.phase.Load()].Add(1)
		case ctx.Err() == nil:
			hs.fail("%s -> %s: exchange: %v", w.id, peer.id, err)
		}
	}
}

// fetchWithGoSPIFFE reads d's bundle endpoint with go-spiffe's own
// federation.FetchBundle, authenticating it with bundle (https_spiffe) or
// the Web PKI root (https_web).
func (d *domain) fetchWithGoSPIFFE(t *testing.T, web *webPKI, bundle *x509bundle.Bundle) (uint64, []*x509.Certificate) {
	t.Helper()
	opt := federation.WithSPIFFEAuth(bundle, d.serverID)
	if web != nil {
		pool := x509.NewCertPool()
		pool.AddCert(web.root.Cert)
		opt = federation.WithWebPKIRoots(pool)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	b, err := federation.FetchBundle(ctx, d.td, d.url(web), opt)
	require.NoError(t, err)
	seq, ok := b.SequenceNumber()
	require.True(t, ok, "spiffe_sequence is set")
	hint, ok := b.RefreshHint()
	require.True(t, ok, "spiffe_refresh_hint is set")
	require.Equal(t, 2*time.Second, hint, "the endpoint serves bundleRefreshHint")
	return seq, b.X509Authorities()
}

// peerStatus returns meshctl federation show of peer on d.
func (d *domain) peerStatus(t *testing.T, peer spiffeid.TrustDomain) *adminv1.FederationPeer {
	t.Helper()
	stdout, stderr, err := meshctl(t, "federation", "show", peer.Name(), "--admin-socket", d.socket, "-o", "json")
	require.NoError(t, err, stderr)
	st := &adminv1.FederationPeer{}
	require.NoError(t, protojson.Unmarshal([]byte(stdout), st))
	return st
}

// rootCerts returns the roots of d's bundle.pem, in order.
func rootCerts(t *testing.T, d *domain) []*x509.Certificate {
	t.Helper()
	return d.bundle(t).X509Authorities()
}

// waitForRootCount waits for d's bundle.pem, which the server rewrites
// after each change, to hold n roots, and returns them.
func waitForRootCount(t *testing.T, d *domain, n int) []*x509.Certificate {
	t.Helper()
	var roots []*x509.Certificate
	require.Eventually(t, func() bool {
		b, err := x509bundle.Load(d.td, d.bundleFile())
		if err != nil {
			return false
		}
		roots = b.X509Authorities()
		return len(roots) == n
	}, 10*time.Second, 20*time.Millisecond, "%s never held %d roots", d.bundleFile(), n)
	return roots
}

// TestFederationEndToEnd: two meshca-server processes, trust domains
// a.example and b.example, federate with each other over https_spiffe (each
// bootstrapped with the other's bundle.pem and authenticating its endpoint
// by SPIFFE ID) and over https_web (Web PKI certificates); in the https_web
// variant b federates a from its config file. Their workloads
// (rotation.Source) keep doing mTLS across the two domains, each side
// authorising the other's SPIFFE IDs, while a rotates its root (prepare,
// activate, retire; b's workloads hold a's new root before it is
// activated). Not one handshake may fail. go-spiffe's unchanged
// federation.FetchBundle reads a's endpoint, before and after, and meshctl
// federation show on b reports a's bundle sequence.
func TestFederationEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("runs for about a minute; skipped with -short")
	}
	for _, profile := range []string{"https_spiffe", "https_web"} {
		t.Run(profile, func(t *testing.T) {
			var web *webPKI
			if profile == "https_web" {
				web = newWebPKI(t)
			}
			a := startDomain(t, "a.example", web, "")
			var b *domain
			if web == nil {
				b = startDomain(t, "b.example", nil, "")
				b.federateWith(t, a, nil)
			} else {
				// b federates a from its config file: a peer meshctl
				// cannot remove.
				b = startDomain(t, "b.example", web, fmt.Sprintf(`  peers:
  - trustDomain: a.example
    url: %s
    profile: https_web
    webCAFile: %s
`, a.url(web), web.caFile))
				_, stderr, err := meshctl(t, "federation", "remove", "a.example", "--admin-socket", b.socket)
				require.Error(t, err)
				require.Contains(t, stderr, `code = FailedPrecondition desc = trust domain "a.example" is a peer of the server's config file (federation.peers): change it there and restart the server`)
			}
			a.federateWith(t, b, web)

			ctx, cancel := context.WithCancel(context.Background())
			var wg sync.WaitGroup
			defer func() { cancel(); wg.Wait() }()
			a.startWorkloads(ctx, t, &wg, b)
			b.startWorkloads(ctx, t, &wg, a)
			oldRoots := rootCerts(t, a)
			a.waitForPeerRoots(t, b.td, rootCerts(t, b), "b.example's bundle")
			b.waitForPeerRoots(t, a.td, oldRoots, "a.example's bundle")

			// go-spiffe reads a's endpoint as it is.
			seq, roots := a.fetchWithGoSPIFFE(t, web, a.bundle(t))
			require.Equal(t, rootStatus(t, a.socket).GetBundleSequence(), seq)
			require.True(t, x509bundle.FromX509Authorities(a.td, roots).Equal(a.bundle(t)))

			var hs handshakes
			for _, w := range a.workloads {
				wg.Go(func() { w.dialDomain(ctx, b.workloads, &hs) })
			}
			for _, w := range b.workloads {
				wg.Go(func() { w.dialDomain(ctx, a.workloads, &hs) })
			}
			// Each phase sees handshakes both ways before the next step.
			const perPhase = 20
			handshakesIn := func(phase int32) {
				t.Helper()
				require.Eventually(t, func() bool { return hs.ok[phase].Load() >= perPhase }, 30*time.Second, 20*time.Millisecond,
					"fewer than %d handshakes while %s", perPhase, phases[phase])
			}
			handshakesIn(0)

			// a rotates its root. The prepared root reaches b's workloads
			// through b's federator (a refresh hint, 2s) and b's bundle
			// stream, and a's own workloads report it, before activate.
			step := func(cmd string) {
				t.Helper()
				var lastErr string
				require.Eventually(t, func() bool {
					_, stderr, err := meshctl(t, "root", cmd, "--admin-socket", a.socket)
					lastErr = stderr
					return err == nil
				}, 40*time.Second, 250*time.Millisecond, "meshctl root %s never succeeded: %s", cmd, lastErr)
			}
			step("prepare")
			hs.phase.Store(1)
			handshakesIn(1)
			prepared := waitForRootCount(t, a, 2)
			b.waitForPeerRoots(t, a.td, prepared, "a.example's prepared root")
			require.Eventually(t, func() bool {
				p := rootStatus(t, a.socket).GetPropagation()
				return p.GetWorkloadsSeen() == workloadsPerDomain && p.GetWorkloadsHolding() == workloadsPerDomain
			}, 30*time.Second, 200*time.Millisecond, "a's workloads never all reported the prepared root")
			step("activate")
			hs.phase.Store(2)
			handshakesIn(2)
			step("retire")
			hs.phase.Store(3)
			final := waitForRootCount(t, a, 1)
			require.True(t, final[0].Equal(prepared[1]), "the prepared root is the one left")
			b.waitForPeerRoots(t, a.td, final, "a.example's bundle after the rotation")
			handshakesIn(3) // on a's new root alone
			cancel()
			wg.Wait()

			hs.mu.Lock()
			failures := hs.failures
			hs.mu.Unlock()
			require.Empty(t, failures, "%d failed handshakes", len(failures))
			for i, name := range phases {
				require.Positive(t, hs.ok[i].Load(), "no handshake completed while %s", name)
			}
			t.Logf("%s: %d cross-domain handshakes (%d before prepare, %d prepared, %d activated, %d retired), none failed",
				profile, hs.total(), hs.ok[0].Load(), hs.ok[1].Load(), hs.ok[2].Load(), hs.ok[3].Load())
			for _, w := range a.workloads {
				svid, err := w.src.GetX509SVID()
				require.NoError(t, err)
				_, _, err = x509svid.Verify(svid.Certificates, x509bundle.FromX509Authorities(a.td, final))
				require.NoError(t, err, "a's workloads hold leaves under the new root")
			}

			// b reports a's bundle as a serves it now; go-spiffe reads it,
			// authenticating the endpoint (an SVID under the new root for
			// https_spiffe) with a's bundle after the rotation.
			finalSeq := rootStatus(t, a.socket).GetBundleSequence()
			require.Eventually(t, func() bool {
				st := b.peerStatus(t, a.td)
				return st.GetSequence() == finalSeq && st.GetLastError() == nil && !st.GetBootstrap() && len(st.GetRoots()) == 1
			}, 20*time.Second, 200*time.Millisecond, "meshctl federation show on b never reported a's sequence %d", finalSeq)
			seq, roots = a.fetchWithGoSPIFFE(t, web, x509bundle.FromX509Authorities(a.td, final))
			require.Equal(t, finalSeq, seq)
			require.Len(t, roots, 1)
			require.True(t, roots[0].Equal(final[0]))

			// Nothing secret reached either server's log.
			for _, d := range []*domain{a, b} {
				logs := d.srv.logs.String()
				require.NotContains(t, logs, "PRIVATE KEY")
				require.NotContains(t, logs, d.token(0))
			}
			a.srv.stop()
			b.srv.stop()
		})
	}
}

// TestFederationConfigRefused: a bad federation section stops the server
// at start with what is wrong.
func TestFederationConfigRefused(t *testing.T) {
	dir := t.TempDir()
	peerBundle := filepath.Join(dir, "peer.pem")
	require.NoError(t, os.WriteFile(peerBundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: testca.New(t, spiffeid.RequireTrustDomainFromString("b.example")).Cert.Raw}), 0o644))
	for _, tt := range []struct {
		name   string
		config string
		want   string
	}{
		{"endpoint profile", "federation:\n  endpoint:\n    listenAddress: 127.0.0.1:0\n    profile: https\n",
			`federation.endpoint.profile "https": want https_spiffe or https_web`},
		{"web endpoint without files", "federation:\n  endpoint:\n    listenAddress: 127.0.0.1:0\n    profile: https_web\n",
			"federation.endpoint: profile https_web needs certFile and keyFile, the endpoint's Web PKI certificate and key"},
		{"spiffe endpoint with files", "federation:\n  endpoint:\n    listenAddress: 127.0.0.1:0\n    certFile: c.pem\n    keyFile: k.pem\n",
			"federation.endpoint: profile https_spiffe serves the server's own X509-SVID; certFile and keyFile are for https_web"},
		{"endpoint without address", "federation:\n  endpoint:\n    profile: https_spiffe\n",
			"federation.endpoint: profile, certFile and keyFile configure an endpoint, and listenAddress is empty (no endpoint)"},
		{"refresh bounds", "federation:\n  minRefresh: 2h\n", "federation: minRefresh 2h0m0s is above maxRefresh 1h0m0s"},
		{"own trust domain", "federation:\n  peers:\n  - trustDomain: meshca.local\n", `federation.peers[0]: trustDomain "meshca.local" is this server's own`},
		{"no URL", "federation:\n  peers:\n  - trustDomain: b.example\n    profile: https_web\n", "federation.peers[0]: b.example: url is required, the peer's bundle endpoint"},
		{"no endpoint ID", "federation:\n  peers:\n  - trustDomain: b.example\n    url: https://b/\n    profile: https_spiffe\n    bundleFile: " + peerBundle + "\n",
			"federation.peers[0]: b.example: profile https_spiffe needs endpointID, the SPIFFE ID the endpoint presents (a meshca peer's is spiffe://b.example/meshca/server)"},
		{"no bundle file", "federation:\n  peers:\n  - trustDomain: b.example\n    url: https://b/\n    profile: https_spiffe\n    endpointID: spiffe://b.example/meshca/server\n",
			"federation.peers[0]: b.example: profile https_spiffe needs bundleFile, the peer's bundle obtained out of band"},
		{"missing bundle file", "federation:\n  peers:\n  - trustDomain: b.example\n    url: https://b/\n    profile: https_spiffe\n    endpointID: spiffe://b.example/meshca/server\n    bundleFile: /nonexistent.pem\n",
			"federation.peers[0]: b.example: bundleFile: open /nonexistent.pem: no such file or directory"},
		{"twice", "federation:\n  peers:\n  - {trustDomain: b.example, url: 'https://b/', profile: https_web}\n  - {trustDomain: b.example, url: 'https://b/', profile: https_web}\n",
			`federation.peers[1]: trust domain "b.example" appears more than once`},
		{"http URL, refused by the federator", "federation:\n  peers:\n  - {trustDomain: b.example, url: 'http://b/', profile: https_web}\n",
			`federation.peers: federation: invalid peer: trust domain "b.example": bundle endpoint URL "http://b/": scheme must be https`},
		{"endpoint ID of another trust domain", "federation:\n  peers:\n  - trustDomain: b.example\n    url: https://b/\n    profile: https_spiffe\n    endpointID: spiffe://c.example/meshca/server\n    bundleFile: " + peerBundle + "\n",
			`federation.peers: federation: invalid peer: endpoint SPIFFE ID "spiffe://c.example/meshca/server" is not in trust domain "b.example"`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			config := filepath.Join(t.TempDir(), "config.yaml")
			require.NoError(t, os.WriteFile(config, []byte(tt.config), 0o600))
			cmd := exec.Command(filepath.Join(binDir, "meshca-server"), "--config", config, "--data-dir", filepath.Join(t.TempDir(), "data"),
				"--listen", "127.0.0.1:0", "--metrics-listen", "off")
			out, err := cmd.CombinedOutput()
			var exit *exec.ExitError
			require.ErrorAs(t, err, &exit, string(out))
			require.Equal(t, 1, exit.ExitCode())
			require.Contains(t, string(out), tt.want)
		})
	}
}

// TestFederationKubernetes: in Kubernetes mode, against a real
// kube-apiserver, the peers come from the config only: the leader
// publishes the peer's bundle, fetched from its real endpoint, in the
// ConfigMap of every namespace beside the own bundle, and meshctl cannot
// add or remove peers.
func TestFederationKubernetes(t *testing.T) {
	c := kubetest.Start(t)
	dir := t.TempDir()
	const caNS = "meshca-system"
	c.CreateNamespace(t, caNS)
	app := c.CreateNamespace(t, "app-").Name
	kubeconfig := filepath.Join(dir, "kubeconfig")
	writeKubeconfig(t, c, kubeconfig)
	b := startDomain(t, "b.example", nil, "")
	config := filepath.Join(dir, "config.yaml")
	require.NoError(t, os.WriteFile(config, []byte(fmt.Sprintf(`
kubernetes:
  enabled: true
  kubeconfig: %s
  namespace: %s
federation:
  peers:
  - trustDomain: b.example
    url: %s
    profile: https_spiffe
    endpointID: %s
    bundleFile: %s
`, kubeconfig, caNS, b.url(nil), b.serverID, b.bundleFile())), 0o600))
	data := filepath.Join(dir, "data")
	srv, _ := startServerEnv(t, []string{"POD_NAME=meshca-0"}, "--config", config, "--data-dir", data)
	socket := filepath.Join(data, "admin.sock")

	// The fetched bundle (with b's spiffe_sequence, which the bootstrap PEM
	// has not) reaches the ConfigMaps.
	peer := spiffeid.RequireTrustDomainFromString("b.example")
	var cm *corev1.ConfigMap
	require.Eventually(t, func() bool {
		got, err := c.Client.CoreV1().ConfigMaps(app).Get(t.Context(), "meshca-trust-bundle", metav1.GetOptions{})
		if err != nil {
			return false
		}
		doc, err := spiffebundle.Parse(peer, []byte(got.Data[bundlepublish.FederatedSPIFFEKey(peer)]))
		if err != nil {
			return false
		}
		_, fetched := doc.SequenceNumber()
		cm = got
		return fetched
	}, 60*time.Second, 100*time.Millisecond, "b.example's fetched bundle never reached namespace %s", app)
	pemBundle, err := x509bundle.Parse(peer, []byte(cm.Data[bundlepublish.FederatedPEMKey(peer)]))
	require.NoError(t, err)
	require.True(t, pemBundle.Equal(b.bundle(t)))
	require.Equal(t, "meshca.local", cm.Data[bundlepublish.KeyTrustDomain])

	st := &adminv1.FederationPeer{}
	stdout, stderr, err := meshctl(t, "federation", "show", "b.example", "--admin-socket", socket, "-o", "json")
	require.NoError(t, err, stderr)
	require.NoError(t, protojson.Unmarshal([]byte(stdout), st))
	require.True(t, st.GetFromConfig())
	require.Equal(t, rootStatus(t, b.socket).GetBundleSequence(), st.GetSequence())

	for _, args := range [][]string{
		{"federation", "add", "c.example", "--url", "https://c.example/", "--profile", "https_web"},
		{"federation", "remove", "b.example"},
	} {
		_, stderr, err := meshctl(t, append(args, "--admin-socket", socket)...)
		require.Error(t, err)
		require.Contains(t, stderr, "code = FailedPrecondition desc = in Kubernetes mode the federation peers come from the config (federation.peers), "+
			"the same on every replica: change the config and roll the Deployment out")
	}
	srv.stop()
	b.srv.stop()
}
