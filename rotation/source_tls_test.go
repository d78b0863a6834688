package rotation_test

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/rotation"
	"github.com/meshca/meshca/testca"
)

// handshake runs a TLS handshake between a client with cfg and a server on
// loopback presenting server and requesting a client certificate. It
// returns the client certificates the server got, or the client's error.
func handshake(t *testing.T, cfg *tls.Config, server *x509svid.SVID) ([]*x509.Certificate, error) {
	t.Helper()
	cert := tls.Certificate{PrivateKey: server.PrivateKey, Leaf: server.Certificates[0]}
	for _, c := range server.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer lis.Close()
	type result struct {
		peers []*x509.Certificate
		err   error
	}
	done := make(chan result, 1)
	go func() {
		conn, err := lis.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer conn.Close()
		srv := tls.Server(conn, &tls.Config{
			MinVersion:   tls.VersionTLS12,
			Certificates: []tls.Certificate{cert},
			ClientAuth:   tls.RequestClientCert,
		})
		err = srv.Handshake()
		done <- result{peers: srv.ConnectionState().PeerCertificates, err: err}
	}()
	conn, err := tls.Dial("tcp", lis.Addr().String(), cfg)
	if err != nil {
		<-done
		return nil, err
	}
	// Read the server's close: in TLS 1.3 the server finishes after the
	// client does.
	res := <-done
	conn.Close()
	require.NoError(t, res.err)
	return res.peers, nil
}

func TestClientTLSConfig(t *testing.T) {
	h := newSourceHarness(t, rotation.Options{Rand: zeroRand})
	server := h.ca.issuer.CreateX509SVID(caServerID, testca.WithLifetime(h.start.Add(-time.Hour), h.start.Add(72*time.Hour)))
	cfg := h.src.ClientTLSConfig(caServerID)

	// Before the first SVID: the server is verified, no certificate is
	// presented.
	peers, err := handshake(t, cfg, server)
	require.NoError(t, err)
	require.Empty(t, peers)

	// The same config presents the first SVID, then each renewal's.
	h.run(t, h.ca.serveBufconn(t))
	tm := h.clock.next(t)
	first := h.svid(t)
	peers, err = handshake(t, cfg, server)
	require.NoError(t, err)
	require.Len(t, peers, 2, "the leaf and its intermediate")
	requireSameCert(t, first.Certificates[0], peers[0])

	h.clock.fire(tm)
	h.clock.next(t) // the second SVID's renew point
	second := h.svid(t)
	require.NotEqual(t, first.Certificates[0].SerialNumber, second.Certificates[0].SerialNumber)
	peers, err = handshake(t, cfg, server)
	require.NoError(t, err)
	requireSameCert(t, second.Certificates[0], peers[0])

	// Once renewals have failed until the SVID expired, none is presented.
	h.ca.setDown(true)
	h.clock.SetTime(second.Certificates[0].NotAfter.Add(time.Second))
	h.clock.next(t) // the retry after the renewal that failed once it expired
	require.Len(t, h.logs.find("getting an X509-SVID failed"), 1)
	peers, err = handshake(t, cfg, server)
	require.NoError(t, err)
	require.Empty(t, peers)
}

// TestClientTLSConfigPresentsOnlyAnSVIDThatVerifies retires the root of
// the source's SVID: the SVID is still valid, and still served to peers,
// but the server would refuse it, so the client presents none.
func TestClientTLSConfigPresentsOnlyAnSVIDThatVerifies(t *testing.T) {
	h := newSourceHarness(t, rotation.Options{Rand: zeroRand})
	cfg := h.src.ClientTLSConfig(caServerID)
	h.run(t, h.ca.serveBufconn(t))
	h.clock.next(t)
	first := h.svid(t)

	// The bundle now holds only root2; the CA still signs under the old
	// root, so no renewal succeeds and the source keeps its SVID.
	life := testca.WithLifetime(h.start.Add(-time.Hour), h.start.Add(72*time.Hour))
	root2 := testca.New(t, sourceTD, life)
	h.ca.setBundle(bundleMsg(2, root2))
	h.waitFor(t, "bundle 2", func() bool { return h.src.BundleSequence() == 2 })
	h.clock.next(t) // the retry of the refused renewal
	requireSameCert(t, first.Certificates[0], h.svid(t).Certificates[0])

	peers, err := handshake(t, cfg, root2.ChildCA(life).CreateX509SVID(caServerID))
	require.NoError(t, err)
	require.Empty(t, peers)
}

func TestClientTLSConfigVerifiesTheServer(t *testing.T) {
	h := newSourceHarness(t, rotation.Options{})
	cfg := h.src.ClientTLSConfig(caServerID)
	tests := []struct {
		name   string
		server *x509svid.SVID
		want   string
	}{
		{
			name:   "another SPIFFE ID",
			server: h.ca.issuer.CreateX509SVID(spiffeid.RequireFromPath(sourceTD, "/ns/shop/sa/web")),
			want:   `rotation: the server presented "spiffe://example.org/ns/shop/sa/web"; want "spiffe://example.org/meshca/server"`,
		},
		{
			name:   "under a root not in the bundle",
			server: testca.New(t, sourceTD).ChildCA().CreateX509SVID(caServerID),
			want:   "rotation: verifying the server's certificate: x509svid: could not verify leaf certificate: x509: certificate signed by unknown authority",
		},
		{
			name:   "expired by the source's clock",
			server: h.ca.issuer.CreateX509SVID(caServerID, testca.WithLifetime(h.start.Add(-2*time.Hour), h.start.Add(-time.Hour))),
			want:   "rotation: verifying the server's certificate: x509svid: could not verify leaf certificate: x509: certificate has expired or is not yet valid",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := handshake(t, cfg, tt.server)
			require.ErrorContains(t, err, tt.want)
		})
	}
}

// TestRunOverTLS runs the source against the fake CA over TLS, as against
// meshca-server: the first Sign authenticates with the token and no client
// certificate, each renewal with the current SVID and no token.
func TestRunOverTLS(t *testing.T) {
	h := newSourceFixture(t)
	addr := h.ca.serveTLS(t)
	h.newSource(t, rotation.Options{Rand: zeroRand})
	h.run(t, h.src.Dialer("passthrough:///"+addr, caServerID))

	tm := h.clock.next(t)
	h.clock.fire(tm)
	tm = h.clock.next(t)
	h.clock.fire(tm)
	h.clock.next(t)

	calls := h.ca.calls()
	require.Len(t, calls, 3)
	require.Equal(t, bootstrapToken, calls[0].token)
	require.Empty(t, calls[0].peerCerts)
	for i, c := range calls[1:] {
		require.Empty(t, c.token, "renewal %d", i+1)
		require.NotEmpty(t, c.peerCerts, "renewal %d", i+1)
		requireSameCert(t, calls[i].issued, c.peerCerts[0])
	}
	require.Eventually(t, func() bool { return h.ca.openWatches() == 1 }, realTimeout, time.Millisecond, "the bundle watch runs over TLS too")
}

// TestGoSpiffeTLSConfigFollowsRotation serves the source's SVID with
// go-spiffe's tlsconfig: a connection made before a rotation keeps working
// after it, and the next connection gets the new SVID. go-spiffe verifies
// on the real clock, so the fake clock starts 40 minutes in the past, for
// both SVIDs to be valid now.
func TestGoSpiffeTLSConfigFollowsRotation(t *testing.T) {
	h := newSourceFixtureAt(t, time.Now().Add(-40*time.Minute).Truncate(time.Second))
	h.newSource(t, rotation.Options{Rand: zeroRand})
	h.run(t, h.ca.serveBufconn(t))
	tm := h.clock.next(t)
	first := h.svid(t).Certificates[0]

	lis, err := tls.Listen("tcp", "127.0.0.1:0", tlsconfig.MTLSServerConfig(h.src, h.src, tlsconfig.AuthorizeAny()))
	require.NoError(t, err)
	defer lis.Close()
	go func() {
		for {
			conn, err := lis.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				_, _ = io.Copy(conn, conn)
			}()
		}
	}()
	client := h.ca.issuer.CreateX509SVID(spiffeid.RequireFromPath(sourceTD, "/ns/shop/sa/client"))
	clientCfg := tlsconfig.MTLSClientConfig(client, h.ca.root.Bundle(), tlsconfig.AuthorizeID(workloadID))
	dial := func() *tls.Conn {
		conn, err := tls.Dial("tcp", lis.Addr().String(), clientCfg)
		require.NoError(t, err)
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	echo := func(conn *tls.Conn) {
		_, err := conn.Write([]byte("ping"))
		require.NoError(t, err)
		buf := make([]byte, 4)
		_, err = io.ReadFull(conn, buf)
		require.NoError(t, err)
		require.Equal(t, "ping", string(buf))
	}

	before := dial()
	echo(before)
	requireSameCert(t, first, before.ConnectionState().PeerCertificates[0])

	h.clock.fire(tm)
	h.clock.next(t)
	second := h.svid(t).Certificates[0]
	require.NotEqual(t, first.SerialNumber, second.SerialNumber)

	echo(before)
	after := dial()
	echo(after)
	requireSameCert(t, second, after.ConnectionState().PeerCertificates[0])
}
