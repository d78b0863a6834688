package workloadapi_test

import (
	"context"
	"crypto"
	"crypto/x509"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	spiffeworkloadapi "github.com/spiffe/go-spiffe/v2/workloadapi"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/agent/internal/fake"
	"github.com/meshca/meshca/agent/workloadapi"
	"github.com/meshca/meshca/testca"
)

var (
	td      = spiffeid.RequireTrustDomainFromString("example.org")
	otherTD = spiffeid.RequireTrustDomainFromString("other.org")
	webID   = spiffeid.RequireFromPath(td, "/ns/shop/sa/web")
)

// timeout bounds every wait: a hang fails the test instead of blocking it.
const timeout = 10 * time.Second

// serve serves a Workload API server for opts on a new Unix socket and
// returns its address for go-spiffe's client ("unix:///...") and the
// server.
func serve(t *testing.T, opts workloadapi.Options) (string, *workloadapi.Server) {
	t.Helper()
	if opts.TrustDomain.IsZero() {
		opts.TrustDomain = td
	}
	opts.Logger = slog.New(slog.DiscardHandler)
	api, err := workloadapi.New(opts)
	require.NoError(t, err)
	// Short: a Unix socket path has at most 107 bytes.
	dir, err := os.MkdirTemp("", "wl-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "s")
	lis, err := net.Listen("unix", path)
	require.NoError(t, err)
	g := grpc.NewServer()
	api.Register(g)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = g.Serve(lis)
	}()
	t.Cleanup(func() {
		api.Shutdown()
		g.Stop()
		<-done
	})
	return "unix://" + path, api
}

// rawClient returns a Workload API client that sends no header of its
// own.
func rawClient(t *testing.T, addr string) workload.SpiffeWorkloadAPIClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return workload.NewSpiffeWorkloadAPIClient(conn)
}

// withHeader adds the security header to ctx.
func withHeader(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, workloadapi.SecurityHeader, "true")
}

func testContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	return ctx
}

func TestGoSpiffeClientFetchesTheSVIDAndBundles(t *testing.T) {
	root := testca.New(t, td)
	other := testca.New(t, otherTD)
	svid := root.ChildCA().CreateX509SVID(webID)
	src := fake.NewSource(root.Bundle()).WithSVID(svid).WithFederated(other.Bundle())
	addr, _ := serve(t, workloadapi.Options{Source: src})
	ctx := testContext(t)

	got, err := spiffeworkloadapi.FetchX509SVID(ctx, spiffeworkloadapi.WithAddr(addr))
	require.NoError(t, err)
	require.Equal(t, webID, got.ID)
	require.Equal(t, svid.Certificates, got.Certificates, "the chain, leaf first")
	require.True(t, got.PrivateKey.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(svid.PrivateKey.Public()), "the SVID's key")

	x509ctx, err := spiffeworkloadapi.FetchX509Context(ctx, spiffeworkloadapi.WithAddr(addr))
	require.NoError(t, err)
	requireBundles(t, x509ctx.Bundles, root.Bundle(), other.Bundle())

	bundles, err := spiffeworkloadapi.FetchX509Bundles(ctx, spiffeworkloadapi.WithAddr(addr))
	require.NoError(t, err)
	requireBundles(t, bundles, root.Bundle(), other.Bundle())

	// The wire format, as SPIRE sends it: federated bundles keyed by the
	// trust domain's SPIFFE ID.
	stream, err := rawClient(t, addr).FetchX509SVID(withHeader(ctx), &workload.X509SVIDRequest{})
	require.NoError(t, err)
	resp, err := stream.Recv()
	require.NoError(t, err)
	require.Len(t, resp.Svids, 1)
	require.Equal(t, webID.String(), resp.Svids[0].SpiffeId)
	require.Equal(t, root.Cert.Raw, resp.Svids[0].Bundle)
	key, err := x509.ParsePKCS8PrivateKey(resp.Svids[0].X509SvidKey)
	require.NoError(t, err, "PKCS#8 DER")
	require.NotNil(t, key)
	require.Equal(t, map[string][]byte{"spiffe://other.org": other.Cert.Raw}, resp.FederatedBundles)
}

// watcher records what go-spiffe's client is told.
type watcher struct {
	updates chan *spiffeworkloadapi.X509Context
}

func (w watcher) OnX509ContextUpdate(c *spiffeworkloadapi.X509Context) { w.updates <- c }
func (watcher) OnX509ContextWatchError(error)                          {}

// next returns the next update.
func (w watcher) next(t *testing.T) *spiffeworkloadapi.X509Context {
	t.Helper()
	select {
	case c := <-w.updates:
		return c
	case <-time.After(timeout):
		t.Fatal("no X509 context update")
		return nil
	}
}

type bundleWatcher struct {
	updates chan *x509bundle.Set
}

func (w bundleWatcher) OnX509BundlesUpdate(s *x509bundle.Set) { w.updates <- s }
func (bundleWatcher) OnX509BundlesWatchError(error)           {}

func (w bundleWatcher) next(t *testing.T) *x509bundle.Set {
	t.Helper()
	select {
	case s := <-w.updates:
		return s
	case <-time.After(timeout):
		t.Fatal("no X509 bundles update")
		return nil
	}
}

// TestStreamsPushEveryChange watches with go-spiffe's client and checks
// that each rotation, bundle change and federated change is pushed, in
// order, and that the bundles stream is not pushed what did not change
// for it.
func TestStreamsPushEveryChange(t *testing.T) {
	root := testca.New(t, td)
	inter := root.ChildCA()
	first := inter.CreateX509SVID(webID)
	src := fake.NewSource(root.Bundle()).WithSVID(first)
	addr, _ := serve(t, workloadapi.Options{Source: src})
	client, err := spiffeworkloadapi.New(testContext(t), spiffeworkloadapi.WithAddr(addr))
	require.NoError(t, err)
	t.Cleanup(func() { client.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	svids := watcher{updates: make(chan *spiffeworkloadapi.X509Context, 10)}
	bundles := bundleWatcher{updates: make(chan *x509bundle.Set, 10)}
	done := make(chan struct{}, 2)
	go func() { _ = client.WatchX509Context(ctx, svids); done <- struct{}{} }()
	go func() { _ = client.WatchX509Bundles(ctx, bundles); done <- struct{}{} }()
	t.Cleanup(func() {
		cancel()
		<-done
		<-done
	})

	require.Equal(t, first.Certificates[0].SerialNumber, svids.next(t).DefaultSVID().Certificates[0].SerialNumber)
	requireBundles(t, bundles.next(t), root.Bundle())

	// A rotation: a new SVID on the SVID stream; nothing on the bundles
	// stream (the next it sees is the bundle change below).
	second := inter.CreateX509SVID(webID)
	src.WithSVID(second)
	require.Equal(t, second.Certificates[0].SerialNumber, svids.next(t).DefaultSVID().Certificates[0].SerialNumber)

	// A new root joins the bundle.
	newRoot := testca.New(t, td)
	grown := x509bundle.FromX509Authorities(td, []*x509.Certificate{root.Cert, newRoot.Cert})
	src.WithBundle(grown)
	requireBundles(t, svids.next(t).Bundles, grown)
	requireBundles(t, bundles.next(t), grown)

	// A federated trust domain appears.
	other := testca.New(t, otherTD)
	src.WithFederated(other.Bundle())
	requireBundles(t, svids.next(t).Bundles, grown, other.Bundle())
	requireBundles(t, bundles.next(t), grown, other.Bundle())

	// A notification with no change pushes nothing: the next update is
	// the next rotation.
	src.Notify()
	third := inter.CreateX509SVID(webID)
	src.WithSVID(third)
	require.Equal(t, third.Certificates[0].SerialNumber, svids.next(t).DefaultSVID().Certificates[0].SerialNumber)

	// Federation ends. Streams push in order, so this being the bundles
	// stream's next update shows that neither the rotations nor the empty
	// notification pushed it anything.
	src.WithFederated()
	requireBundles(t, svids.next(t).Bundles, grown)
	requireBundles(t, bundles.next(t), grown)
}

// TestFetchX509SVIDWaitsForAValidSVID checks that the SVID stream sends
// nothing while the source holds no valid SVID (none yet, or expired
// during a CA outage) and sends the next one at once, while the bundles
// stream answers from the start.
func TestFetchX509SVIDWaitsForAValidSVID(t *testing.T) {
	root := testca.New(t, td)
	inter := root.ChildCA()
	src := fake.NewSource(root.Bundle())
	addr, _ := serve(t, workloadapi.Options{Source: src})
	ctx := testContext(t)
	client := rawClient(t, addr)

	bundles, err := client.FetchX509Bundles(withHeader(ctx), &workload.X509BundlesRequest{})
	require.NoError(t, err)
	b, err := bundles.Recv()
	require.NoError(t, err)
	require.Equal(t, map[string][]byte{"spiffe://example.org": root.Cert.Raw}, b.Bundles)

	stream, err := client.FetchX509SVID(withHeader(ctx), &workload.X509SVIDRequest{})
	require.NoError(t, err)
	first := inter.CreateX509SVID(webID)
	src.WithSVID(first)
	resp, err := stream.Recv()
	require.NoError(t, err)
	requireSVID(t, first, resp)

	// The SVID expires unrenewed; then a renewal succeeds.
	src.WithSVIDError(errExpired{})
	src.Notify()
	second := inter.CreateX509SVID(webID)
	src.WithSVID(second)
	resp, err = stream.Recv()
	require.NoError(t, err)
	requireSVID(t, second, resp)
}

type errExpired struct{}

func (errExpired) Error() string { return "the X509-SVID expired" }

func TestSecurityHeaderIsRequired(t *testing.T) {
	root := testca.New(t, td)
	src := fake.NewSource(root.Bundle()).WithSVID(root.ChildCA().CreateX509SVID(webID))
	addr, _ := serve(t, workloadapi.Options{Source: src})
	client := rawClient(t, addr)

	calls := map[string]func(ctx context.Context) error{
		"FetchX509SVID": func(ctx context.Context) error {
			s, err := client.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
			if err != nil {
				return err
			}
			_, err = s.Recv()
			return err
		},
		"FetchX509Bundles": func(ctx context.Context) error {
			s, err := client.FetchX509Bundles(ctx, &workload.X509BundlesRequest{})
			if err != nil {
				return err
			}
			_, err = s.Recv()
			return err
		},
		"FetchJWTSVID": func(ctx context.Context) error {
			_, err := client.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{"a"}})
			return err
		},
		"FetchJWTBundles": func(ctx context.Context) error {
			s, err := client.FetchJWTBundles(ctx, &workload.JWTBundlesRequest{})
			if err != nil {
				return err
			}
			_, err = s.Recv()
			return err
		},
		"ValidateJWTSVID": func(ctx context.Context) error {
			_, err := client.ValidateJWTSVID(ctx, &workload.ValidateJWTSVIDRequest{Audience: "a", Svid: "x.y.z"})
			return err
		},
	}
	headers := map[string][]string{
		"missing":   nil,
		"false":     {workloadapi.SecurityHeader, "false"},
		"TRUE":      {workloadapi.SecurityHeader, "TRUE"},
		"twice":     {workloadapi.SecurityHeader, "true", workloadapi.SecurityHeader, "true"},
		"misnamed":  {"workload-spiffe-io", "true"},
		"truthiest": {workloadapi.SecurityHeader, "true1"},
	}
	for method, call := range calls {
		for name, md := range headers {
			t.Run(method+"/"+name, func(t *testing.T) {
				ctx := testContext(t)
				if md != nil {
					ctx = metadata.AppendToOutgoingContext(ctx, md...)
				}
				err := call(ctx)
				require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
				require.Equal(t, "security header missing from request", status.Convert(err).Message())
			})
		}
	}
}

func TestJWTSVIDsAreUnimplemented(t *testing.T) {
	root := testca.New(t, td)
	src := fake.NewSource(root.Bundle()).WithSVID(root.ChildCA().CreateX509SVID(webID))
	addr, _ := serve(t, workloadapi.Options{Source: src})
	ctx := testContext(t)
	client, err := spiffeworkloadapi.New(ctx, spiffeworkloadapi.WithAddr(addr))
	require.NoError(t, err)
	defer client.Close()

	const msg = "JWT-SVIDs are not supported: meshca issues X509-SVIDs only (the CA has no JWT signing key); use FetchX509SVID and mTLS"
	_, err = client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "db"})
	requireStatus(t, err, codes.Unimplemented, msg)
	_, err = client.FetchJWTBundles(ctx)
	requireStatus(t, err, codes.Unimplemented, msg)
	_, err = client.ValidateJWTSVID(ctx, "a.b.c", "db")
	requireStatus(t, err, codes.Unimplemented, msg)
	_, err = client.FetchWITSVID(ctx, "")
	requireStatus(t, err, codes.Unimplemented, "WIT-SVIDs are not supported: meshca issues X509-SVIDs only; use FetchX509SVID and mTLS")
}

func TestStreamsAreBounded(t *testing.T) {
	root := testca.New(t, td)
	src := fake.NewSource(root.Bundle()).WithSVID(root.ChildCA().CreateX509SVID(webID))
	addr, _ := serve(t, workloadapi.Options{Source: src, MaxStreams: 2})
	client := rawClient(t, addr)
	ctx := testContext(t)

	open := func(ctx context.Context) error {
		s, err := client.FetchX509Bundles(withHeader(ctx), &workload.X509BundlesRequest{})
		if err != nil {
			return err
		}
		_, err = s.Recv()
		return err
	}
	ctx1, cancel1 := context.WithCancel(ctx)
	require.NoError(t, open(ctx1))
	require.NoError(t, open(ctx))
	err := open(ctx)
	requireStatus(t, err, codes.ResourceExhausted, "too many Workload API streams open (at most 2); close the ones not in use")

	// A stream closed frees its slot. Its handler returns shortly after
	// the cancel reaches it: the test waits on that, not on time.
	cancel1()
	require.Eventually(t, func() bool { return open(ctx) == nil }, timeout, 10*time.Millisecond)
}

func TestShutdownEndsStreams(t *testing.T) {
	root := testca.New(t, td)
	src := fake.NewSource(root.Bundle()).WithSVID(root.ChildCA().CreateX509SVID(webID))
	addr, api := serve(t, workloadapi.Options{Source: src})
	ctx := testContext(t)
	stream, err := rawClient(t, addr).FetchX509SVID(withHeader(ctx), &workload.X509SVIDRequest{})
	require.NoError(t, err)
	_, err = stream.Recv()
	require.NoError(t, err)

	api.Shutdown()
	_, err = stream.Recv()
	requireStatus(t, err, codes.Unavailable, "meshca-agent is shutting down; reconnect")
}

func TestNewChecksOptions(t *testing.T) {
	src := fake.NewSource(testca.New(t, td).Bundle())
	for _, tt := range []struct {
		name string
		opts workloadapi.Options
		want string
	}{
		{"no source", workloadapi.Options{TrustDomain: td}, "workloadapi: Options.Source is required"},
		{"no trust domain", workloadapi.Options{Source: src}, "workloadapi: Options.TrustDomain is required: the trust domain of the served SVID"},
		{"negative max streams", workloadapi.Options{Source: src, TrustDomain: td, MaxStreams: -1}, "workloadapi: Options.MaxStreams is -1; want zero (256) or more"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			api, err := workloadapi.New(tt.opts)
			require.EqualError(t, err, tt.want)
			require.Nil(t, api)
		})
	}
}

func requireStatus(t *testing.T, err error, code codes.Code, msg string) {
	t.Helper()
	require.Error(t, err)
	st, ok := status.FromError(err)
	require.True(t, ok, "not a gRPC status: %v", err)
	require.Equal(t, code, st.Code(), "%v", err)
	require.Equal(t, msg, st.Message())
}

func requireSVID(t *testing.T, want *x509svid.SVID, resp *workload.X509SVIDResponse) {
	t.Helper()
	require.Len(t, resp.Svids, 1)
	got, err := x509svid.ParseRaw(resp.Svids[0].X509Svid, resp.Svids[0].X509SvidKey)
	require.NoError(t, err)
	require.Equal(t, want.Certificates, got.Certificates)
}

// requireBundles checks that set holds exactly want.
func requireBundles(t *testing.T, set *x509bundle.Set, want ...*x509bundle.Bundle) {
	t.Helper()
	require.Equal(t, len(want), set.Len(), "bundles: %v", set.Bundles())
	for _, w := range want {
		got, ok := set.Get(w.TrustDomain())
		require.True(t, ok, "no bundle of %s", w.TrustDomain())
		require.True(t, w.Equal(got), "bundle of %s", w.TrustDomain())
	}
}
