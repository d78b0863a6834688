package agent_test

import (
	"bufio"
	"context"
	"crypto/x509"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	spiffeworkloadapi "github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/meshca/meshca/agent"
	"github.com/meshca/meshca/agent/files"
	"github.com/meshca/meshca/internal/pemutil"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/testca"
)

// TestWorkloadsGetTheirSVIDFromTheAgent runs an agent against meshca's
// real server and fetches with go-spiffe's client, unchanged: the SVID
// chains to the CA's bundle; the bundle is served; a call without the
// security header is refused; Envoy SDS answers on the same socket.
func TestWorkloadsGetTheirSVIDFromTheAgent(t *testing.T) {
	m := startMeshca(t)
	a := startAgent(t, agentConfig(t, m, webID))
	ctx := testContext(t)

	svid, err := spiffeworkloadapi.FetchX509SVID(ctx, spiffeworkloadapi.WithAddr(a.addr))
	require.NoError(t, err)
	require.Equal(t, webID, svid.ID)
	caBundle, _ := m.ca.Bundle()
	id, _, err := x509svid.Verify(svid.Certificates, caBundle)
	require.NoError(t, err, "the chain verifies against the CA's bundle")
	require.Equal(t, webID, id)
	require.NoError(t, a.agent.Ready())

	bundles, err := spiffeworkloadapi.FetchX509Bundles(ctx, spiffeworkloadapi.WithAddr(a.addr))
	require.NoError(t, err)
	got, err := bundles.GetX509BundleForTrustDomain(td)
	require.NoError(t, err)
	require.True(t, caBundle.Equal(got))
	require.Equal(t, 1, bundles.Len())

	// A raw call without the header is refused, as SPIRE refuses it.
	conn, err := grpc.NewClient(a.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	stream, err := workload.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	require.NoError(t, err)
	_, err = stream.Recv()
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
	require.Equal(t, "security header missing from request", status.Convert(err).Message())

	// SDS shares the socket, and needs no header.
	sds, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx)
	require.NoError(t, err)
	require.NoError(t, sds.Send(&discoveryv3.DiscoveryRequest{TypeUrl: resource.SecretType, ResourceNames: []string{"default"}}))
	resp, err := sds.Recv()
	require.NoError(t, err)
	require.Len(t, resp.Resources, 1)
	var secret tlsv3.Secret
	require.NoError(t, resp.Resources[0].UnmarshalTo(&secret))
	require.Equal(t, "default", secret.Name)
	chain, err := pemutil.ParseCertificates(secret.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
	require.NoError(t, err)
	require.Equal(t, svid.Certificates, chain, "SDS serves the SVID the Workload API serves")

	// Nothing secret reached the log.
	require.False(t, a.logs.contains(tokens[webID]), "the token was logged")
	require.False(t, a.logs.contains("PRIVATE KEY"), "a key was logged")
}

// TestStreamsFollowRotationAndBundleChanges watches with go-spiffe's
// client while the agent renews short-lived SVIDs and the CA prepares a
// new root: the watcher sees a new certificate, then the grown bundle;
// the files follow.
func TestStreamsFollowRotationAndBundleChanges(t *testing.T) {
	m := startMeshca(t)
	cfg := agentConfig(t, m, webID)
	cfg.TTL = 3 * time.Second
	cfg.Files.Dir = filepath.Join(t.TempDir(), "certs")
	a := startAgent(t, cfg)

	client, err := spiffeworkloadapi.New(testContext(t), spiffeworkloadapi.WithAddr(a.addr))
	require.NoError(t, err)
	defer client.Close()
	w := &contextWatcher{updates: make(chan *spiffeworkloadapi.X509Context, 100)}
	ctx, cancel := context.WithCancel(context.Background())
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		_ = client.WatchX509Context(ctx, w)
	}()
	defer func() {
		cancel()
		<-watchDone
	}()

	first := w.next(t).DefaultSVID()
	var rotated *x509svid.SVID
	for rotated == nil {
		if c := w.next(t).DefaultSVID(); c.Certificates[0].SerialNumber.Cmp(first.Certificates[0].SerialNumber) != 0 {
			rotated = c
		}
	}
	require.Equal(t, webID, rotated.ID)
	require.True(t, rotated.Certificates[0].NotBefore.Compare(first.Certificates[0].NotBefore) >= 0)

	// The files follow the rotation.
	serial := rotated.Certificates[0].SerialNumber.Text(16)
	a.logs.waitFor(t, "certificate files written", func(r logRecord) bool { return r.attrs["serial"] == serial })

	// A root is prepared: every workload gets the grown bundle.
	m.prepareRoot(t)
	caBundle, _ := m.ca.Bundle()
	require.Len(t, caBundle.X509Authorities(), 2)
	for {
		c := w.next(t)
		if b, err := c.Bundles.GetX509BundleForTrustDomain(td); err == nil && b.Equal(caBundle) {
			break
		}
	}
	a.logs.waitFor(t, "certificate files written", func(r logRecord) bool { return r.attrs["roots"] == "2" })
	onDisk, err := x509bundle.Load(td, filepath.Join(cfg.Files.Dir, "bundle.pem"))
	require.NoError(t, err)
	require.True(t, caBundle.Equal(onDisk), "bundle.pem holds the grown bundle")
}

type contextWatcher struct {
	updates chan *spiffeworkloadapi.X509Context
}

func (w *contextWatcher) OnX509ContextUpdate(c *spiffeworkloadapi.X509Context) { w.updates <- c }
func (*contextWatcher) OnX509ContextWatchError(error)                          {}

func (w *contextWatcher) next(t *testing.T) *spiffeworkloadapi.X509Context {
	t.Helper()
	select {
	case c := <-w.updates:
		return c
	case <-time.After(timeout):
		t.Fatal("no X509 context update")
		return nil
	}
}

// TestMTLSBetweenWorkloadsOfTwoAgents has two workloads, each beside its
// own agent with its own identity, talk mTLS with go-spiffe's spiffetls,
// each authorising the other's SPIFFE ID; a client that expects another
// identity refuses the server.
func TestMTLSBetweenWorkloadsOfTwoAgents(t *testing.T) {
	m := startMeshca(t)
	web := startAgent(t, agentConfig(t, m, webID))
	db := startAgent(t, agentConfig(t, m, dbID))
	ctx := testContext(t)

	dbSource, err := spiffeworkloadapi.NewX509Source(ctx, spiffeworkloadapi.WithClientOptions(spiffeworkloadapi.WithAddr(db.addr)))
	require.NoError(t, err)
	defer dbSource.Close()
	webSource, err := spiffeworkloadapi.NewX509Source(ctx, spiffeworkloadapi.WithClientOptions(spiffeworkloadapi.WithAddr(web.addr)))
	require.NoError(t, err)
	defer webSource.Close()

	// The db workload serves only web.
	lis, err := spiffetls.ListenWithMode(ctx, "tcp", "127.0.0.1:0", spiffetls.MTLSServerWithSource(tlsconfig.AuthorizeID(webID), dbSource))
	require.NoError(t, err)
	defer lis.Close()
	served := make(chan error, 4)
	go func() {
		for {
			conn, err := lis.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				line, err := bufio.NewReader(conn).ReadString('\n')
				if err != nil {
					served <- err
					return
				}
				peer, err := spiffetls.PeerIDFromConn(conn)
				if err != nil {
					served <- err
					return
				}
				_, err = fmt.Fprintf(conn, "hello %s, you said %s", peer, line)
				served <- err
			}()
		}
	}()

	conn, err := spiffetls.DialWithMode(ctx, "tcp", lis.Addr().String(), spiffetls.MTLSClientWithSource(tlsconfig.AuthorizeID(dbID), webSource))
	require.NoError(t, err)
	defer conn.Close()
	_, err = fmt.Fprintln(conn, "ping")
	require.NoError(t, err)
	reply, err := bufio.NewReader(conn).ReadString('\n')
	require.NoError(t, err)
	require.Equal(t, "hello spiffe://example.org/ns/shop/sa/web, you said ping\n", reply)
	require.NoError(t, <-served)
	peer, err := spiffetls.PeerIDFromConn(conn)
	require.NoError(t, err)
	require.Equal(t, dbID, peer)

	// A client that expects another identity refuses db's certificate.
	other := spiffeid.RequireFromPath(td, "/ns/shop/sa/cache")
	_, err = spiffetls.DialWithMode(ctx, "tcp", lis.Addr().String(), spiffetls.MTLSClientWithSource(tlsconfig.AuthorizeID(other), webSource))
	require.ErrorContains(t, err, `unexpected ID "spiffe://example.org/ns/shop/sa/db"`)
}

// TestFederatedBundlesReachWorkloads runs meshca's server with
// interceptors that add a federated bundle to every Sign response and
// every bundle stream update, as a federating server sends them (both
// carry the whole federated set, so both must): the bundle reaches the
// workload in FetchX509Bundles and in FetchX509SVID's federated_bundles.
func TestFederatedBundlesReachWorkloads(t *testing.T) {
	otherTD := spiffeid.RequireTrustDomainFromString("other.org")
	other := testca.New(t, otherTD)
	federated := func() []*meshcav1.TrustBundle {
		return []*meshcav1.TrustBundle{{TrustDomain: otherTD.Name(), X509Authorities: [][]byte{other.Cert.Raw}, Sequence: 1}}
	}
	federateSign := grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		resp, err := handler(ctx, req)
		if sign, ok := resp.(*meshcav1.SignResponse); ok && err == nil {
			sign.FederatedBundles = federated()
		}
		return resp, err
	})
	federateStream := grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		return handler(srv, federatingStream{ServerStream: ss, federated: federated})
	})
	m := startMeshca(t, federateSign, federateStream)
	a := startAgent(t, agentConfig(t, m, webID))
	ctx := testContext(t)

	// The bundles stream answers at once, with what the agent holds; the
	// federated bundles come with the first SVID, which FetchX509SVID
	// waits for.
	_, err := spiffeworkloadapi.FetchX509SVID(ctx, spiffeworkloadapi.WithAddr(a.addr))
	require.NoError(t, err)
	bundles, err := spiffeworkloadapi.FetchX509Bundles(ctx, spiffeworkloadapi.WithAddr(a.addr))
	require.NoError(t, err)
	require.Equal(t, 2, bundles.Len())
	got, err := bundles.GetX509BundleForTrustDomain(otherTD)
	require.NoError(t, err)
	require.Equal(t, []*x509.Certificate{other.Cert}, got.X509Authorities())

	conn, err := grpc.NewClient(a.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	stream, err := workload.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(
		metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true"), &workload.X509SVIDRequest{})
	require.NoError(t, err)
	resp, err := stream.Recv()
	require.NoError(t, err)
	require.Equal(t, map[string][]byte{"spiffe://other.org": other.Cert.Raw}, resp.FederatedBundles)
	caBundle, _ := m.ca.Bundle()
	require.Equal(t, caBundle.X509Authorities()[0].Raw, resp.Svids[0].Bundle, "the own bundle holds only its own roots")
}

// TestTheAgentServesItsLastSVIDWhileTheServerIsDown stops meshca's server
// while the agent holds a short-lived SVID: after a renewal has failed,
// the workload is still served that SVID; and an agent restarted during
// the outage serves it at once from its files.
func TestTheAgentServesItsLastSVIDWhileTheServerIsDown(t *testing.T) {
	m := startMeshca(t)
	cfg := agentConfig(t, m, webID)
	cfg.TTL = 12 * time.Second
	cfg.Files.Dir = filepath.Join(t.TempDir(), "certs")
	a := startAgent(t, cfg)
	ctx := testContext(t)

	first, err := spiffeworkloadapi.FetchX509SVID(ctx, spiffeworkloadapi.WithAddr(a.addr))
	require.NoError(t, err)
	serial := first.Certificates[0].SerialNumber.Text(16)
	a.logs.waitFor(t, "certificate files written", func(r logRecord) bool { return r.attrs["serial"] == serial })

	m.stop()
	// At the renew point (half of 12s) the renewal fails.
	failed := a.logs.waitFor(t, "getting an X509-SVID failed", nil)
	require.NotEmpty(t, failed.attrs["current_expires"], "a valid SVID is still held")
	served, err := spiffeworkloadapi.FetchX509SVID(ctx, spiffeworkloadapi.WithAddr(a.addr))
	require.NoError(t, err)
	require.Equal(t, first.Certificates, served.Certificates)
	require.NoError(t, a.agent.Ready())

	// A restart during the outage: the new agent serves the SVID from
	// its files before it can reach the server.
	a.stop(t)
	_, err = os.Lstat(cfg.SocketPath)
	require.ErrorIs(t, err, fs.ErrNotExist, "the socket is removed on shutdown")
	b := startAgent(t, cfg)
	require.NoError(t, b.agent.Ready(), "ready before reaching the server")
	served, err = spiffeworkloadapi.FetchX509SVID(ctx, spiffeworkloadapi.WithAddr(b.addr))
	require.NoError(t, err)
	require.Equal(t, first.Certificates, served.Certificates)
	b.logs.waitFor(t, "found the X509-SVID of an earlier run in the files directory", nil)
}

func TestSockets(t *testing.T) {
	m := startMeshca(t)

	t.Run("mode, separate SDS socket, removed on shutdown", func(t *testing.T) {
		cfg := agentConfig(t, m, webID)
		cfg.SocketMode = 0o660
		cfg.SDS.SocketPath = filepath.Join(filepath.Dir(cfg.SocketPath), "sds.sock")
		a := startAgent(t, cfg)
		for _, path := range []string{cfg.SocketPath, cfg.SDS.SocketPath} {
			info, err := os.Lstat(path)
			require.NoError(t, err)
			require.Equal(t, fs.ModeSocket|0o660, info.Mode(), path)
		}
		entries, err := os.ReadDir(filepath.Dir(cfg.SocketPath))
		require.NoError(t, err)
		require.Len(t, entries, 2, "no temporary directory left behind")

		// The Workload API is not served on SDS's socket.
		conn, err := grpc.NewClient("unix://"+cfg.SDS.SocketPath, grpc.WithTransportCredentials(insecure.NewCredentials()))
		require.NoError(t, err)
		defer conn.Close()
		_, err = workload.NewSpiffeWorkloadAPIClient(conn).FetchJWTSVID(
			metadata.AppendToOutgoingContext(testContext(t), "workload.spiffe.io", "true"), &workload.JWTSVIDRequest{Audience: []string{"x"}})
		require.Equal(t, codes.Unimplemented, status.Code(err))
		require.Contains(t, status.Convert(err).Message(), "unknown service")

		a.stop(t)
		for _, path := range []string{cfg.SocketPath, cfg.SDS.SocketPath} {
			_, err := os.Lstat(path)
			require.ErrorIs(t, err, fs.ErrNotExist, path)
		}
	})
	t.Run("owner only by default", func(t *testing.T) {
		cfg := agentConfig(t, m, webID)
		require.Zero(t, cfg.SocketMode)
		startAgent(t, cfg)
		info, err := os.Lstat(cfg.SocketPath)
		require.NoError(t, err)
		require.Equal(t, fs.ModeSocket|agent.DefaultSocketMode, info.Mode())
		require.Equal(t, fs.FileMode(0o600), agent.DefaultSocketMode, "whoever can connect gets the workload's key")
	})
	t.Run("a stale socket is replaced", func(t *testing.T) {
		cfg := agentConfig(t, m, webID)
		stale, err := net.Listen("unix", cfg.SocketPath)
		require.NoError(t, err)
		stale.(*net.UnixListener).SetUnlinkOnClose(false)
		require.NoError(t, stale.Close())
		a := startAgent(t, cfg)
		_, err = spiffeworkloadapi.FetchX509SVID(testContext(t), spiffeworkloadapi.WithAddr(a.addr))
		require.NoError(t, err)
	})
	t.Run("refused", func(t *testing.T) {
		live := agentConfig(t, m, webID)
		startAgent(t, live)
		notSocket := agentConfig(t, m, webID)
		require.NoError(t, os.WriteFile(notSocket.SocketPath, nil, 0o600))
		for name, tt := range map[string]struct {
			cfg  agent.Config
			want string
		}{
			"another agent serves on it": {live, "agent: another process is serving on " + live.SocketPath + "; stop it or choose another socket path"},
			"not a socket":               {notSocket, "agent: " + notSocket.SocketPath + " exists and is not a socket; remove it or choose another socket path"},
		} {
			t.Run(name, func(t *testing.T) {
				a, err := agent.New(tt.cfg)
				require.NoError(t, err)
				require.EqualError(t, a.Run(testContext(t)), tt.want)
			})
		}
	})
}

func TestNewChecksConfig(t *testing.T) {
	m := startMeshca(t)
	good := agentConfig(t, m, webID)
	for _, tt := range []struct {
		name   string
		change func(*agent.Config)
		want   string
	}{
		{"empty", func(c *agent.Config) { *c = agent.Config{} }, "agent: Config.ID is required: the workload's SPIFFE ID\n" +
			"Config.ServerAddress is required: meshca-server's gRPC address\n" +
			"Config.TrustBundle is required: the roots that verify meshca-server\n" +
			"Config.SocketPath is required: the Workload API's Unix socket"},
		{"server in another trust domain", func(c *agent.Config) { c.ServerID = spiffeid.RequireFromString("spiffe://other.org/meshca/server") },
			`agent: Config.ServerID "spiffe://other.org/meshca/server" is not in the workload's trust domain "example.org"`},
		{"the server's own ID", func(c *agent.Config) { c.ID = serverID }, `agent: Config.ID "spiffe://example.org/meshca/server" is the server's own ID`},
		{"socket mode with type bits", func(c *agent.Config) { c.SocketMode = fs.ModeSocket | 0o600 }, "agent: Config.SocketMode Srw------- has bits other than permissions"},
		{"bad file names", func(c *agent.Config) { c.Files = agent.FilesConfig{Dir: t.TempDir(), KeyName: "a/b"} }, `agent: files: Options.KeyName "a/b" must be a plain file name, not starting with ".."`},
		{"same SDS names", func(c *agent.Config) { c.SDS.CertificateName = "ROOTCA" }, "agent: sds: secret names must differ"},
		{"bundle of another trust domain", func(c *agent.Config) {
			c.TrustBundle = testca.New(t, spiffeid.RequireTrustDomainFromString("other.org")).Bundle()
		}, `agent: rotation: Options.InitialBundle is for trust domain "other.org"; want "example.org"`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := good
			tt.change(&cfg)
			a, err := agent.New(cfg)
			require.ErrorContains(t, err, tt.want)
			require.Nil(t, a)
		})
	}
}

// TestTheFilesOfAnotherIdentityAreNotServed checks that an SVID found in
// the files directory that is not of Config.ID is ignored: the agent gets
// its own.
func TestTheFilesOfAnotherIdentityAreNotServed(t *testing.T) {
	m := startMeshca(t)
	dir := filepath.Join(t.TempDir(), "certs")
	dbCfg := agentConfig(t, m, dbID)
	dbCfg.Files.Dir = dir
	db := startAgent(t, dbCfg)
	db.logs.waitFor(t, "certificate files written", nil)
	db.stop(t)

	cfg := agentConfig(t, m, webID)
	cfg.Files.Dir = dir
	a := startAgent(t, cfg)
	r := a.logs.waitFor(t, "ignoring the X509-SVID in the files directory: it is of another identity", nil)
	require.Equal(t, dbID.String(), r.attrs["found"])
	svid, err := spiffeworkloadapi.FetchX509SVID(testContext(t), spiffeworkloadapi.WithAddr(a.addr))
	require.NoError(t, err)
	require.Equal(t, webID, svid.ID)
	a.logs.waitFor(t, "certificate files written", nil)
	w, err := files.New(files.Options{Dir: dir, TrustDomain: td})
	require.NoError(t, err)
	onDisk, err := w.Load()
	require.NoError(t, err)
	require.Equal(t, webID, onDisk.ID)
}

// federatingStream adds the federated bundles to every bundle stream
// update the server sends.
type federatingStream struct {
	grpc.ServerStream
	federated func() []*meshcav1.TrustBundle
}

func (f federatingStream) SendMsg(m any) error {
	if u, ok := m.(*meshcav1.BundleUpdate); ok {
		u = proto.CloneOf(u)
		u.FederatedBundles = f.federated()
		m = u
	}
	return f.ServerStream.SendMsg(m)
}
