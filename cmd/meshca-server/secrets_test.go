package main_test

import (
	"crypto/ecdsa"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	securityv1alpha1 "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/testca"
)

// TestKeyMaterialNeverLeaks drives a server through issuance (token,
// mTLS renewal, the Istio API), refusals (another identity, a bad CSR, a
// rotation step refused without --force) and every rotation step (root
// prepare, activate, retire; intermediate rotate), with debug logs on.
// Every CA key the server held at any point is then looked for, in every
// encoding a careless log line or error would use, in the server's logs
// and stdout, its /metrics output, every answer meshctl printed and every
// gRPC error a caller got. The same search finds each key in the state
// file, so a search that finds nothing in the outputs means something.
func TestKeyMaterialNeverLeaks(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "data")
	out := t.TempDir()
	srv, _ := startServer(t, "--data-dir", dataDir, "--demo", "--log-level", "debug")
	socket := filepath.Join(dataDir, "admin.sock")
	bundle := filepath.Join(dataDir, "bundle.pem")
	token := filepath.Join(dataDir, "demo-token")
	demo := "spiffe://meshca.local/ns/default/sa/demo"

	keys := &keyNeedles{}
	var answers []string // what meshctl printed and what gRPC callers got
	meshctlOK := func(args ...string) {
		t.Helper()
		stdout, stderr, err := meshctl(t, args...)
		answers = append(answers, stdout, stderr)
		require.NoError(t, err, stderr)
	}
	meshctlRefused := func(args ...string) {
		t.Helper()
		stdout, stderr, err := meshctl(t, args...)
		answers = append(answers, stdout, stderr)
		require.Error(t, err, stdout)
	}
	issue := func() {
		t.Helper()
		meshctlOK("issue", "--server", srv.addr, "--ca-bundle", bundle,
			"--token-file", token, "--spiffe-id", demo, "--out-dir", out)
		meshctlOK("issue", "--server", srv.addr, "--ca-bundle", bundle,
			"--cert", filepath.Join(out, "svid.pem"), "--key", filepath.Join(out, "svid-key.pem"), "--out-dir", out)
		keys.collect(t, storedSet(t, dataDir))
	}

	issue()
	meshctlRefused("issue", "--server", srv.addr, "--ca-bundle", bundle,
		"--token-file", token, "--spiffe-id", "spiffe://meshca.local/ns/kube-system/sa/admin", "--out-dir", t.TempDir())

	// The Istio API: one good request, one that is not a CSR at all.
	conn := dialServer(t, srv.addr, bundle)
	ctx := metadata.AppendToOutgoingContext(t.Context(), "authorization", "Bearer "+strings.TrimSpace(string(mustRead(t, token))))
	istio := securityv1alpha1.NewIstioCertificateServiceClient(conn)
	csr := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: testca.CreateCSR(t, testca.NewKey(t), demo)})
	_, err := istio.CreateCertificate(ctx, &securityv1alpha1.IstioCertificateRequest{Csr: string(csr)})
	require.NoError(t, err)
	_, err = istio.CreateCertificate(ctx, &securityv1alpha1.IstioCertificateRequest{Csr: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"})
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
	answers = append(answers, err.Error())

	// Every rotation step, each followed by issuance under the new set.
	meshctlOK("root", "prepare", "--admin-socket", socket)
	issue()
	meshctlRefused("root", "activate", "--admin-socket", socket) // refused: the new root has not propagated
	meshctlOK("root", "activate", "--admin-socket", socket, "--force")
	issue()
	meshctlOK("intermediate", "rotate", "--admin-socket", socket)
	issue()
	meshctlRefused("root", "retire", "--admin-socket", socket) // refused: leaves under the old root are valid
	meshctlOK("root", "retire", "--admin-socket", socket, "--force")
	issue()
	meshctlOK("root", "status", "--admin-socket", socket, "-o", "json")
	// Five distinct keys: the first root and intermediate, the second root,
	// its first intermediate and the rotated one.
	require.Len(t, keys.keys, 5)

	metrics := scrape(t, "http://"+srv.metrics+"/metrics")
	require.Contains(t, metrics, "meshca_", "the scrape reached meshca's metrics")
	srv.stop()

	// The search finds every key where it is: in the state file.
	state := string(mustRead(t, filepath.Join(dataDir, "authorities.json")))
	require.Contains(t, state, "PRIVATE KEY")
	current := &keyNeedles{}
	current.collect(t, storedSet(t, dataDir))
	for _, k := range current.keys {
		require.NotEmpty(t, k.find(state), "the search finds key %s in the state file", k.name)
	}

	for name, haystack := range map[string]string{
		"server log":    srv.logs.String(),
		"server stdout": srv.stdout.String(),
		"/metrics":      metrics,
		"answers":       strings.Join(answers, "\n"),
	} {
		t.Run(name, func(t *testing.T) {
			require.NotEmpty(t, haystack)
			require.NotContains(t, haystack, "PRIVATE KEY")
			for _, k := range keys.keys {
				require.Empty(t, k.find(haystack), "key %s found in the %s", k.name, name)
			}
		})
	}
}

// keyNeedles is the set of CA keys seen during a test.
type keyNeedles struct {
	keys []keyNeedle
	seen map[string]bool
}

// keyNeedle is one private key and the strings that would give it away.
type keyNeedle struct {
	name    string
	needles []string
}

// collect adds every key held in set.
func (n *keyNeedles) collect(t *testing.T, set *ca.AuthoritySet) {
	t.Helper()
	add := func(name string, a ca.Authority) {
		if a.Signer == nil {
			return
		}
		key, ok := a.Signer.(*ecdsa.PrivateKey)
		require.True(t, ok, "%s: a %T, not an ECDSA key", name, a.Signer)
		scalar, err := key.Bytes()
		require.NoError(t, err)
		if n.seen == nil {
			n.seen = map[string]bool{}
		}
		if n.seen[string(scalar)] {
			return
		}
		n.seen[string(scalar)] = true
		n.keys = append(n.keys, keyNeedle{
			name:    fmt.Sprintf("%s %s", name, a.Cert.SerialNumber.Text(16)),
			needles: secretEncodings(scalar),
		})
	}
	for i, r := range set.Roots {
		add(fmt.Sprintf("root %d", i), r.Authority)
	}
	add("issuer", set.Issuer)
	if set.NextIssuer != nil {
		add("next issuer", *set.NextIssuer)
	}
}

// secretEncodings returns the ways the private scalar shows in text: hex,
// and base64 (standard, as in PEM and DER dumps; URL-safe, as in a JWK's
// "d"). Any base64 text of bytes that contain the scalar, at any offset,
// contains the encoding of 24 of its bytes starting at one of its first
// three, so the three windows cover PKCS#8, SEC1 and bare encodings alike;
// the needles hold secret bytes only, never the public key that
// certificates carry.
func secretEncodings(scalar []byte) []string {
	needles := []string{hex.EncodeToString(scalar), strings.ToUpper(hex.EncodeToString(scalar))}
	for k := range 3 {
		window := scalar[k : k+24]
		needles = append(needles,
			base64.StdEncoding.EncodeToString(window),
			base64.RawURLEncoding.EncodeToString(window))
	}
	return needles
}

// find returns the needles of k found in haystack, after removing the line
// breaks (real, and escaped as in JSON) that PEM puts into base64.
func (k keyNeedle) find(haystack string) []string {
	flat := strings.NewReplacer("\n", "", "\r", "", `\n`, "", `\r`, "").Replace(haystack)
	var found []string
	for _, s := range k.needles {
		if strings.Contains(flat, s) {
			found = append(found, s)
		}
	}
	return found
}

// scrape returns the body of a GET of url.
func scrape(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return string(body)
}
