package main

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity/federation"
	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/internal/server"
	adminv1 "github.com/meshca/meshca/proto/meshca/admin/v1"
)

var (
	ownTD  = spiffeid.RequireTrustDomainFromString("own.example")
	peerTD = spiffeid.RequireTrustDomainFromString("peer.example")
)

// startFederationAdmin serves the admin API of a server of ownTD with a
// federator on a Unix socket, and a peer's bundle endpoint (https_spiffe)
// on loopback. It returns the socket, the endpoint's URL and the peer's
// bundle as a PEM file.
func startFederationAdmin(t *testing.T) (socket, url, bundleFile string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)

	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: peerTD})
	require.NoError(t, err)
	peerCA, err := ca.New(set, ca.Options{})
	require.NoError(t, err)
	serving, err := server.NewServingCert(peerCA, spiffeid.RequireFromPath(peerTD, "/meshca/server"), nil, nil, time.Hour, nil)
	require.NoError(t, err)
	ep, err := federation.NewEndpoint(federation.EndpointOptions{
		TrustDomain:    peerTD,
		Bundles:        peerCA,
		RefreshHint:    90 * time.Second,
		Profile:        federation.ProfileHTTPSSPIFFE,
		GetCertificate: serving.GetCertificate,
	})
	require.NoError(t, err)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() { _ = ep.Serve(ctx, lis) }()
	bundle, _ := peerCA.Bundle()
	bundleFile = filepath.Join(t.TempDir(), "peer-bundle.pem")
	require.NoError(t, os.WriteFile(bundleFile, pemutil.EncodeCertificates(bundle.X509Authorities()...), 0o600))

	ownSet, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: ownTD})
	require.NoError(t, err)
	own, err := ca.New(ownSet, ca.Options{})
	require.NoError(t, err)
	fed, err := federation.New(ctx, federation.Options{TrustDomain: ownTD})
	require.NoError(t, err)
	g := server.NewAdminServer(server.AdminOptions{CA: own, Federator: fed})
	socket = filepath.Join(t.TempDir(), "admin.sock")
	adminLis, err := net.Listen("unix", socket)
	require.NoError(t, err)
	go func() { _ = g.Serve(adminLis) }()
	t.Cleanup(g.Stop)
	return socket, "https://" + lis.Addr().String() + "/", bundleFile
}

// TestFederationCommands runs the federation commands against a real
// admin API and a real bundle endpoint: add, list, show, refresh, remove,
// in text and JSON.
func TestFederationCommands(t *testing.T) {
	socket, url, bundleFile := startFederationAdmin(t)
	admin := []string{"--admin-socket", socket}

	out, err := runMeshctl(t, append([]string{"federation", "list"}, admin...)...)
	require.NoError(t, err)
	require.Equal(t, "no federated trust domains\n", out)

	out, err = runMeshctl(t, append([]string{"federation", "add", "peer.example", "--url", url, "--profile", "https_spiffe",
		"--endpoint-id", "spiffe://peer.example/meshca/server", "--bundle-file", bundleFile}, admin...)...)
	require.NoError(t, err)
	require.Contains(t, out, "trust domain        peer.example\n")
	require.Contains(t, out, "endpoint SPIFFE ID  spiffe://peer.example/meshca/server\n")
	require.Contains(t, out, "bundle sequence     the bootstrap bundle (no fetch has succeeded yet)\n")
	require.Contains(t, out, "\nROOT SERIAL")

	out, err = runMeshctl(t, append([]string{"federation", "refresh", "peer.example"}, admin...)...)
	require.NoError(t, err)
	require.Contains(t, out, "bundle sequence     1\n")
	require.Contains(t, out, "refresh hint        1m30s\n")
	require.Contains(t, out, "last error          -\n")

	out, err = runMeshctl(t, append([]string{"federation", "show", "peer.example", "-o", "json"}, admin...)...)
	require.NoError(t, err)
	var peer adminv1.FederationPeer
	require.NoError(t, protojson.Unmarshal([]byte(out), &peer))
	require.Equal(t, uint64(1), peer.GetSequence())
	require.Equal(t, "https_spiffe", peer.GetProfile())
	require.Len(t, peer.GetRoots(), 1)

	// An https_web peer whose endpoint is down: refresh says why, and
	// fails.
	_, err = runMeshctl(t, append([]string{"federation", "add", "down.example", "--url", "https://127.0.0.1:1/", "--profile", "https_web"}, admin...)...)
	require.NoError(t, err)
	out, err = runMeshctl(t, append([]string{"federation", "refresh", "down.example"}, admin...)...)
	require.ErrorContains(t, err, `federation refresh: the fetch failed (transport); the last good bundle is kept: federation: bundle of "down.example": transport: `)
	require.Contains(t, out, "bundle sequence     none yet (no fetch has succeeded)\n")
	require.Contains(t, out, "failures in a row   1\n")

	out, err = runMeshctl(t, append([]string{"federation", "list"}, admin...)...)
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Len(t, lines, 3)
	require.Regexp(t, `^TRUST DOMAIN\s+PROFILE\s+SEQUENCE\s+ROOTS\s+LAST SUCCESS\s+NEXT REFRESH\s+LAST ERROR$`, lines[0])
	require.Regexp(t, `^down\.example\s+https_web\s+-\s+0\s+-\s+\S+\s+transport$`, lines[1])
	require.Regexp(t, `^peer\.example\s+https_spiffe\s+1\s+1\s+\S+\s+\S+\s+-$`, lines[2])

	out, err = runMeshctl(t, append([]string{"federation", "remove", "peer.example"}, admin...)...)
	require.NoError(t, err)
	require.Equal(t, "removed peer.example: its bundle is no longer sent to workloads\n", out)
	_, err = runMeshctl(t, append([]string{"federation", "show", "peer.example"}, admin...)...)
	require.EqualError(t, err, `federation show: rpc error: code = NotFound desc = federation: trust domain is not a peer: "peer.example"`)
	_, err = runMeshctl(t, append([]string{"federation", "add", "down.example", "--url", "https://127.0.0.1:1/", "--profile", "https_web"}, admin...)...)
	require.EqualError(t, err, `federation add: rpc error: code = AlreadyExists desc = federation: trust domain is already a peer: "down.example"; remove it first to change it`)
}

func TestFederationAddFlags(t *testing.T) {
	bundle := filepath.Join(t.TempDir(), "bundle.pem")
	require.NoError(t, os.WriteFile(bundle, []byte("x"), 0o600))
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no trust domain", []string{}, "accepts 1 arg(s), received 0"},
		{"no url", []string{"peer.example", "--profile", "https_web"}, "--url is required: the peer's bundle endpoint"},
		{"no profile", []string{"peer.example", "--url", "https://p/"}, "--profile is required: https_spiffe or https_web"},
		{"bad profile", []string{"peer.example", "--url", "https://p/", "--profile", "spiffe"}, `--profile "spiffe": want https_spiffe or https_web`},
		{"spiffe without ID", []string{"peer.example", "--url", "https://p/", "--profile", "https_spiffe", "--bundle-file", bundle},
			"--profile https_spiffe needs --endpoint-id, the SPIFFE ID the endpoint presents (meshca's: spiffe://peer.example/meshca/server)"},
		{"spiffe without bundle", []string{"peer.example", "--url", "https://p/", "--profile", "https_spiffe", "--endpoint-id", "spiffe://peer.example/meshca/server"},
			"--profile https_spiffe needs --bundle-file, the peer's bundle obtained out of band"},
		{"spiffe with web CA", []string{"peer.example", "--url", "https://p/", "--profile", "https_spiffe", "--endpoint-id", "spiffe://peer.example/x", "--bundle-file", bundle, "--web-ca-file", bundle},
			"--web-ca-file is for --profile https_web"},
		{"web with bundle", []string{"peer.example", "--url", "https://p/", "--profile", "https_web", "--bundle-file", bundle},
			"--endpoint-id and --bundle-file are for --profile https_spiffe"},
		{"missing bundle file", []string{"peer.example", "--url", "https://p/", "--profile", "https_spiffe", "--endpoint-id", "spiffe://peer.example/x", "--bundle-file", "/nonexistent/b.pem"},
			"--bundle-file: open /nonexistent/b.pem: no such file or directory"},
		{"output", []string{"peer.example", "--url", "https://p/", "--profile", "https_web", "-o", "yaml"}, `--output "yaml": want text or json`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := runMeshctl(t, append([]string{"federation", "add"}, tt.args...)...)
			require.EqualError(t, err, tt.want)
		})
	}
}
