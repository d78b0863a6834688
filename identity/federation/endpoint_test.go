package federation_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	meshfed "github.com/meshca/meshca/identity/federation"
	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/internal/securefile"
)

// go-spiffe's own client, unchanged, reads the endpoint in both profiles,
// with the CA's sequence and the configured refresh hint.
func TestFetchBundleReadsEndpoint(t *testing.T) {
	t.Parallel()
	c := newPeerCA(t, peerTD)
	prepared := c.prepareRoot(t) // sequence 2, two roots

	t.Run("https_web", func(t *testing.T) {
		t.Parallel()
		web := newWebPKI(t)
		certFile, keyFile := writeKeyPair(t, t.TempDir(), web.serverCert(t))
		url := startEndpoint(t, meshfed.EndpointOptions{
			TrustDomain: peerTD,
			Bundles:     c,
			RefreshHint: 42 * time.Second,
			Profile:     meshfed.ProfileHTTPSWeb,
			CertFile:    certFile,
			KeyFile:     keyFile,
		})
		pool := x509.NewCertPool()
		pool.AddCert(web.root.Cert)

		b, err := federation.FetchBundle(context.Background(), peerTD, url, federation.WithWebPKIRoots(pool))
		require.NoError(t, err)
		requireServed(t, b, 2, 42*time.Second, c.root.Cert, prepared.Cert)
	})

	t.Run("https_spiffe", func(t *testing.T) {
		t.Parallel()
		url := startEndpoint(t, meshfed.EndpointOptions{
			TrustDomain:    peerTD,
			Bundles:        c,
			RefreshHint:    1500 * time.Millisecond, // served rounded up
			Profile:        meshfed.ProfileHTTPSSPIFFE,
			GetCertificate: newServingCert(c.CA, serverID).GetCertificate,
		})
		bootstrap := spiffebundle.FromX509Authorities(peerTD, []*x509.Certificate{c.root.Cert})

		b, err := federation.FetchBundle(context.Background(), peerTD, url, federation.WithSPIFFEAuth(bootstrap, serverID))
		require.NoError(t, err)
		requireServed(t, b, 2, 2*time.Second, c.root.Cert, prepared.Cert)

		// And go-spiffe refuses the endpoint for another ID.
		other := spiffeid.RequireFromPath(peerTD, "/other")
		_, err = federation.FetchBundle(context.Background(), peerTD, url, federation.WithSPIFFEAuth(bootstrap, other))
		require.ErrorContains(t, err, `unexpected ID "spiffe://east.test/meshca/server"`)
	})
}

func requireServed(t *testing.T, b *spiffebundle.Bundle, seq uint64, hint time.Duration, roots ...*x509.Certificate) {
	t.Helper()
	gotSeq, ok := b.SequenceNumber()
	require.True(t, ok, "spiffe_sequence is set")
	require.Equal(t, seq, gotSeq)
	gotHint, ok := b.RefreshHint()
	require.True(t, ok, "spiffe_refresh_hint is set")
	require.Equal(t, hint, gotHint)
	requireSameAuthorities(t, b, roots...)
}

// The endpoint serves GET at "/" and nothing else, and tells caches not to
// keep the bundle.
func TestEndpointServesGETAtRootOnly(t *testing.T) {
	t.Parallel()
	c := newPeerCA(t, peerTD)
	web := newWebPKI(t)
	certFile, keyFile := writeKeyPair(t, t.TempDir(), web.serverCert(t))
	url := startEndpoint(t, meshfed.EndpointOptions{
		TrustDomain: peerTD, Bundles: c, Profile: meshfed.ProfileHTTPSWeb, CertFile: certFile, KeyFile: keyFile,
	})
	pool := x509.NewCertPool()
	pool.AddCert(web.root.Cert)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	t.Cleanup(client.CloseIdleConnections)

	for _, tc := range []struct {
		name, method, path string
		status             int
	}{
		{"get", http.MethodGet, "", http.StatusOK},
		{"post", http.MethodPost, "", http.StatusMethodNotAllowed},
		{"other path", http.MethodGet, "bundle", http.StatusNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, err := http.NewRequest(tc.method, url+tc.path, http.NoBody)
			require.NoError(t, err)
			resp, err := client.Do(req)
			require.NoError(t, err)
			resp.Body.Close()
			require.Equal(t, tc.status, resp.StatusCode)
			if tc.status == http.StatusOK {
				require.Equal(t, "no-store", resp.Header.Get("Cache-Control"))
				require.Equal(t, "application/json", resp.Header.Get("Content-Type"))
			}
		})
	}
}

// A renewed https_web certificate, written over the files, is served on
// the next handshake; a pair that does not match is not, and the last
// good one is served meanwhile.
func TestEndpointReloadsWebCertificate(t *testing.T) {
	t.Parallel()
	c := newPeerCA(t, peerTD)
	web := newWebPKI(t)
	dir := t.TempDir()
	first := web.serverCert(t)
	certFile, keyFile := writeKeyPair(t, dir, first)
	url := startEndpoint(t, meshfed.EndpointOptions{
		TrustDomain: peerTD, Bundles: c, Profile: meshfed.ProfileHTTPSWeb, CertFile: certFile, KeyFile: keyFile,
	})
	addr := strings.TrimSuffix(strings.TrimPrefix(url, "https://"), "/")
	served := func() *x509.Certificate {
		t.Helper()
		pool := x509.NewCertPool()
		pool.AddCert(web.root.Cert)
		conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool})
		require.NoError(t, err)
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0]
	}
	require.True(t, first.Certificates[0].Equal(served()))

	renewed := web.serverCert(t)
	writeKeyPair(t, dir, renewed)
	require.True(t, renewed.Certificates[0].Equal(served()), "the renewed certificate is served")

	// A certificate whose key is not (yet) beside it.
	mismatched := web.serverCert(t)
	require.NoError(t, securefile.WriteFile(certFile, pemutil.EncodeCertificates(mismatched.Certificates...), 0o600))
	require.True(t, renewed.Certificates[0].Equal(served()), "the last good certificate is served")
}

func TestNewEndpointRefusesBadOptions(t *testing.T) {
	t.Parallel()
	c := newPeerCA(t, peerTD)
	web := newWebPKI(t)
	dir := t.TempDir()
	certFile, keyFile := writeKeyPair(t, dir, web.serverCert(t))
	openKey := filepath.Join(dir, "open.key")
	data, err := os.ReadFile(keyFile)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(openKey, data, 0o644))
	getCert := func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return nil, nil }

	for _, tc := range []struct {
		name string
		opts meshfed.EndpointOptions
		err  string
	}{
		{"no trust domain", meshfed.EndpointOptions{Bundles: c, Profile: meshfed.ProfileHTTPSSPIFFE, GetCertificate: getCert},
			"federation: EndpointOptions.TrustDomain is required"},
		{"no bundles", meshfed.EndpointOptions{TrustDomain: peerTD, Profile: meshfed.ProfileHTTPSSPIFFE, GetCertificate: getCert},
			"federation: EndpointOptions.Bundles is required"},
		{"no profile", meshfed.EndpointOptions{TrustDomain: peerTD, Bundles: c},
			`federation: unknown endpoint profile ""; want "https_web" or "https_spiffe"`},
		{"web without files", meshfed.EndpointOptions{TrustDomain: peerTD, Bundles: c, Profile: meshfed.ProfileHTTPSWeb},
			"federation: profile https_web needs CertFile and KeyFile"},
		{"web with GetCertificate", meshfed.EndpointOptions{TrustDomain: peerTD, Bundles: c, Profile: meshfed.ProfileHTTPSWeb,
			CertFile: certFile, KeyFile: keyFile, GetCertificate: getCert},
			"federation: profile https_web serves CertFile and KeyFile, not GetCertificate"},
		{"spiffe without GetCertificate", meshfed.EndpointOptions{TrustDomain: peerTD, Bundles: c, Profile: meshfed.ProfileHTTPSSPIFFE},
			"federation: profile https_spiffe needs GetCertificate, the server's X509-SVID"},
		{"key readable by others", meshfed.EndpointOptions{TrustDomain: peerTD, Bundles: c, Profile: meshfed.ProfileHTTPSWeb,
			CertFile: certFile, KeyFile: openKey},
			"federation: endpoint key: securefile: file is accessible by group or others; chmod 600 it: " + openKey + " has mode 0644"},
		{"key of another certificate", meshfed.EndpointOptions{TrustDomain: peerTD, Bundles: c, Profile: meshfed.ProfileHTTPSWeb,
			CertFile: writeCertOnly(t, dir, web), KeyFile: keyFile},
			"federation: endpoint certificate " + filepath.Join(dir, "other.crt") + " and key " + keyFile +
				" do not make a key pair: tls: private key does not match public key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := meshfed.NewEndpoint(tc.opts)
			require.EqualError(t, err, tc.err)
		})
	}
}

func writeCertOnly(t *testing.T, dir string, web *webPKI) string {
	t.Helper()
	path := filepath.Join(dir, "other.crt")
	require.NoError(t, os.WriteFile(path, pemutil.EncodeCertificates(web.serverCert(t).Certificates...), 0o600))
	return path
}
