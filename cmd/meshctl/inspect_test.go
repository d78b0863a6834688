package main

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/testca"
)

var (
	testTD = spiffeid.RequireTrustDomainFromString("meshca.test")
	testID = spiffeid.RequireFromPath(testTD, "/ns/default/sa/demo")
)

// runMeshctl runs meshctl with args and returns its standard output.
func runMeshctl(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	root := newRootCommand(&stdout, &stderr)
	root.SetArgs(args)
	err := root.Execute()
	return stdout.String(), err
}

func writePEM(t *testing.T, certs ...*x509.Certificate) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "certs.pem")
	require.NoError(t, os.WriteFile(path, pemutil.EncodeCertificates(certs...), 0o600))
	return path
}

// testChain returns a leaf for testID with a DNS SAN, its intermediate
// and its root, in chain order.
func testChain(t *testing.T) []*x509.Certificate {
	t.Helper()
	root := testca.New(t, testTD)
	inter := root.ChildCA()
	svid := inter.CreateX509SVID(testID, testca.WithDNSNames("demo.default.svc"))
	return append(svid.Certificates, root.Cert)
}

func TestInspectText(t *testing.T) {
	chain := testChain(t)
	out, err := runMeshctl(t, "inspect", writePEM(t, chain...))
	require.NoError(t, err)

	for _, want := range []string{
		"certificate 1 of 3: leaf",
		"certificate 2 of 3: intermediate CA",
		"certificate 3 of 3: root CA",
		"spiffe id    " + testID.String(),
		"spiffe id    spiffe://meshca.test",
		"dns names    demo.default.svc",
		"serial       " + chain[0].SerialNumber.Text(16),
		"serial       " + chain[2].SerialNumber.Text(16),
		"CA           no (leaf)",
		"CA           yes, intermediate CA",
		"CA           yes, root CA",
		"key          ECDSA P-256",
		"key usage    digitalSignature\n",
		"key usage    keyCertSign, cRLSign",
		"ext usage    serverAuth, clientAuth",
		"chain        signed by certificate 2 (the next one)",
		"chain        signed by certificate 3 (the next one)",
		"chain        self-signed",
		"(expires in ",
		"a chain of 3: each certificate is signed by the next, up to a self-signed root",
	} {
		require.Contains(t, out, want)
	}
	require.NotContains(t, out, "EXPIRED")
}

func TestInspectJSON(t *testing.T) {
	chain := testChain(t)
	out, err := runMeshctl(t, "inspect", "-o", "json", writePEM(t, chain...))
	require.NoError(t, err)

	var got []certInfo
	require.NoError(t, json.Unmarshal([]byte(out), &got))
	require.Len(t, got, 3)

	leaf, inter, root := got[0], got[1], got[2]
	require.Equal(t, testID.String(), leaf.SPIFFEID)
	require.Equal(t, "leaf", leaf.Kind)
	require.False(t, leaf.IsCA)
	require.Equal(t, chain[0].SerialNumber.Text(16), leaf.Serial)
	require.Equal(t, []string{"demo.default.svc"}, leaf.DNSNames)
	require.Equal(t, "ECDSA", leaf.KeyAlgorithm)
	require.Equal(t, 256, leaf.KeySize)
	require.Equal(t, "valid", leaf.Status)
	require.InDelta(t, time.Hour.Seconds(), leaf.RemainingSeconds, 60)
	require.Equal(t, []string{"serverAuth", "clientAuth"}, leaf.ExtKeyUsage)
	require.Equal(t, chain[0].NotAfter.UTC(), leaf.NotAfter)
	require.Equal(t, 2, *leaf.SignedBy)
	require.True(t, *leaf.SignedByNext)

	require.Equal(t, "intermediate CA", inter.Kind)
	require.True(t, inter.IsCA)
	require.Equal(t, "spiffe://meshca.test", inter.SPIFFEID)
	require.Equal(t, 3, *inter.SignedBy)

	require.Equal(t, "root CA", root.Kind)
	require.True(t, root.SelfSigned)
	require.Equal(t, 3, *root.SignedBy)
	require.Nil(t, root.SignedByNext)
}

func TestInspectRelations(t *testing.T) {
	rootA := testca.New(t, testTD)
	rootB := testca.New(t, testTD)
	interA := rootA.ChildCA()
	leafA := interA.CreateX509SVID(testID).Certificates[0]
	expired := rootA.CreateX509SVID(testID, testca.WithLifetime(time.Now().Add(-3*time.Hour), time.Now().Add(-2*time.Hour))).Certificates[0]
	future := rootA.CreateX509SVID(testID, testca.WithLifetime(time.Now().Add(time.Hour), time.Now().Add(2*time.Hour))).Certificates[0]

	tests := []struct {
		name  string
		certs []*x509.Certificate
		want  []string
	}{
		{
			name:  "bundle of roots",
			certs: []*x509.Certificate{rootA.Cert, rootB.Cert},
			want:  []string{"a bundle of 2 self-signed roots", "chain        self-signed"},
		},
		{
			name:  "chain without its root",
			certs: []*x509.Certificate{leafA, interA.Cert},
			want:  []string{"a chain of 2: each certificate is signed by the next; the last one's issuer (CN=testca root,O=testca) is not in the file", "chain        issuer not in the file"},
		},
		{
			name:  "out of order",
			certs: []*x509.Certificate{leafA, rootA.Cert, interA.Cert},
			want: []string{
				"signed by certificate 3, out of chain order",
				"3 certificates, not one chain in order: 1 is not signed by 2",
			},
		},
		{
			name:  "unrelated",
			certs: []*x509.Certificate{leafA, rootB.Cert},
			want:  []string{"NOT signed by the next certificate (2), nor by any other in the file", "not one chain in order: 1 is not signed by 2"},
		},
		{
			name:  "expired",
			certs: []*x509.Certificate{expired},
			want:  []string{"(EXPIRED 2h0m", "chain        issuer not in the file"},
		},
		{
			name:  "not yet valid",
			certs: []*x509.Certificate{future},
			want:  []string{"(NOT YET VALID, starts in 59m5"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := runMeshctl(t, "inspect", writePEM(t, tt.certs...))
			require.NoError(t, err)
			for _, want := range tt.want {
				require.Contains(t, out, want)
			}
		})
	}
}

func TestInspectStdin(t *testing.T) {
	chain := testChain(t)
	r, w, err := os.Pipe()
	require.NoError(t, err)
	_, err = w.Write(pemutil.EncodeCertificates(chain...))
	require.NoError(t, err)
	require.NoError(t, w.Close())
	stdin := os.Stdin
	os.Stdin = r
	t.Cleanup(func() { os.Stdin = stdin; r.Close() })

	out, err := runMeshctl(t, "inspect", "-")
	require.NoError(t, err)
	require.Contains(t, out, "spiffe id    "+testID.String())
}

func TestInspectErrors(t *testing.T) {
	dir := t.TempDir()
	noCerts := filepath.Join(dir, "key.pem")
	require.NoError(t, os.WriteFile(noCerts, []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), 0o600))
	empty := filepath.Join(dir, "empty.pem")
	require.NoError(t, os.WriteFile(empty, nil, 0o600))

	tests := []struct {
		name string
		args []string
		want string
	}{
		{name: "no certificate", args: []string{"inspect", noCerts}, want: noCerts + ": pemutil: no PEM certificate found"},
		{name: "empty file", args: []string{"inspect", empty}, want: empty + ": pemutil: no PEM certificate found"},
		{name: "missing file", args: []string{"inspect", filepath.Join(dir, "nope.pem")}, want: "open " + filepath.Join(dir, "nope.pem") + ": no such file or directory"},
		{name: "bad output", args: []string{"inspect", "-o", "yaml", empty}, want: `--output "yaml": want text or json`},
		{name: "two files", args: []string{"inspect", empty, empty}, want: "accepts at most 1 arg(s), received 2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := runMeshctl(t, tt.args...)
			require.EqualError(t, err, tt.want)
		})
	}
}

func TestHumanDuration(t *testing.T) {
	tests := []struct {
		d    time.Duration
		want string
	}{
		{d: 90 * time.Second, want: "1m30s"},
		{d: 47*time.Hour + 1500*time.Millisecond, want: "47h0m2s"},
		{d: 3*24*time.Hour + 5*time.Hour + time.Minute, want: "3d5h"},
		{d: -2 * time.Hour, want: "2h0m0s"},
	}
	for _, tt := range tests {
		t.Run(tt.want, func(t *testing.T) {
			require.Equal(t, tt.want, humanDuration(tt.d))
		})
	}
}
