package batch_test

import (
	"context"
	"crypto"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/internal/server"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/rotation/batch"
	"github.com/meshca/meshca/testca"
)

var (
	td       = spiffeid.RequireTrustDomainFromString("example.org")
	serverID = spiffeid.RequireFromPath(td, "/meshca/server")
)

// meshca is a real meshca-server on loopback with a bootstrap token for
// each of its identities.
type meshca struct {
	ids    []spiffeid.ID
	tokens []string
	bundle *x509bundle.Bundle
	client *countingClient
}

func startServer(t *testing.T, n int, limits server.Limits) *meshca {
	t.Helper()
	m := &meshca{}
	var file identity.TokenFile
	for i := range n {
		id := spiffeid.RequireFromPath(td, fmt.Sprintf("/ns/node-a/sa/w%03d", i))
		token := fmt.Sprintf("token-%03d-0123456789abcdef", i)
		m.ids, m.tokens = append(m.ids, id), append(m.tokens, token)
		file.Tokens = append(file.Tokens, identity.TokenFileEntry{ID: id.String(), Token: token})
	}
	tokens, err := identity.NewStaticTokens(file, td)
	require.NoError(t, err)
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: td})
	require.NoError(t, err)
	c, err := ca.New(set, ca.Options{})
	require.NoError(t, err)
	srv, err := server.New(server.Options{
		CA:            c,
		Authenticator: identity.Chain(tokens, identity.NewSVIDAuthenticator(td, c, nil)),
		Limits:        limits,
	})
	require.NoError(t, err)
	serving, err := server.NewServingCert(c, serverID, nil, nil, time.Hour, nil)
	require.NoError(t, err)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	g := srv.GRPCServer(serving.TLSConfig())
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)

	m.bundle, _ = c.Bundle()
	// No client certificate and no token: the entries carry their own.
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(
		tlsconfig.TLSClientConfig(m.bundle, tlsconfig.AuthorizeID(serverID)))))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	m.client = &countingClient{CertificateServiceClient: meshcav1.NewCertificateServiceClient(conn)}
	return m
}

// countingClient records the size and entry count of every SignBatch call.
type countingClient struct {
	meshcav1.CertificateServiceClient
	mu      sync.Mutex
	sizes   []int
	entries []int
}

func (c *countingClient) SignBatch(ctx context.Context, req *meshcav1.SignBatchRequest, opts ...grpc.CallOption) (*meshcav1.SignBatchResponse, error) {
	c.mu.Lock()
	c.sizes = append(c.sizes, proto.Size(req))
	c.entries = append(c.entries, len(req.Entries))
	c.mu.Unlock()
	return c.CertificateServiceClient.SignBatch(ctx, req, opts...)
}

func (c *countingClient) calls() ([]int, []int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	sizes, entries := c.sizes, c.entries
	c.sizes, c.entries = nil, nil
	return sizes, entries
}

// requireValid checks r against entry: an SVID for its ID and key,
// verifying against the server's bundle.
func requireValid(t *testing.T, m *meshca, e batch.Entry, r batch.Result) {
	t.Helper()
	require.NoError(t, r.Err)
	require.Equal(t, e.ID, r.SVID.ID)
	require.Equal(t, uint64(1), r.BundleSequence)
	require.Equal(t, m.bundle.X509Authorities(), r.Bundle.X509Authorities())
	id, _, err := x509svid.Verify(r.SVID.Certificates, m.bundle)
	require.NoError(t, err)
	require.Equal(t, e.ID, id)
	pub := r.SVID.PrivateKey.Public().(interface{ Equal(crypto.PublicKey) bool })
	require.True(t, pub.Equal(r.SVID.Certificates[0].PublicKey), "the SVID's key is the new key")
	if e.Key != nil {
		require.True(t, pub.Equal(e.Key.Public()), "the entry's key")
	}
}

// TestRenewManyIdentities: an agent gets first certificates for 100
// identities with their tokens in 2 calls (64 and 36), then renews all of
// them with their current SVIDs, in as many calls as the transport limit
// needs. Every result verifies, is for its identity and for a key of its
// own.
func TestRenewManyIdentities(t *testing.T) {
	m := startServer(t, 100, server.Limits{})
	ctx := context.Background()

	entries := make([]batch.Entry, len(m.ids))
	for i, id := range m.ids {
		entries[i] = batch.Entry{ID: id, Token: m.tokens[i], TTL: 30 * time.Minute}
		if i%2 == 0 {
			entries[i].Key = testca.NewKey(t) // the others get a new P-256 key
		}
	}
	first, err := batch.Renew(ctx, m.client, entries)
	require.NoError(t, err)
	require.Len(t, first, 100)
	_, counts := m.client.calls()
	require.Equal(t, []int{64, 36}, counts)
	keys := map[string]bool{}
	for i, r := range first {
		requireValid(t, m, entries[i], r)
		leaf := r.SVID.Certificates[0]
		require.InDelta(t, (30 * time.Minute).Seconds(), leaf.NotAfter.Sub(leaf.NotBefore).Seconds()-ca.Backdate.Seconds(), 5)
		keys[string(leaf.RawSubjectPublicKeyInfo)] = true
	}
	require.Len(t, keys, 100, "a new key each")

	// Renewal: proven by the current SVIDs, the tokens gone.
	for i := range entries {
		entries[i] = batch.Entry{ID: m.ids[i], Current: first[i].SVID}
	}
	renewed, err := batch.Renew(ctx, m.client, entries, batch.WithBundleSequence(first[0].BundleSequence))
	require.NoError(t, err)
	sizes, counts := m.client.calls()
	// A proof entry carries a chain of two certificates: they are too
	// large for 64 to a call, and are packed by size.
	require.Greater(t, len(counts), 2)
	total := 0
	for i, n := range counts {
		require.LessOrEqual(t, sizes[i], batch.DefaultMaxRequestBytes)
		require.LessOrEqual(t, n, batch.MaxEntries)
		total += n
	}
	require.Equal(t, 100, total)
	for i, r := range renewed {
		requireValid(t, m, entries[i], r)
		require.NotEqual(t, first[i].SVID.Certificates[0].SerialNumber, r.SVID.Certificates[0].SerialNumber)
		require.NotEqual(t, first[i].SVID.Certificates[0].RawSubjectPublicKeyInfo, r.SVID.Certificates[0].RawSubjectPublicKeyInfo)
	}
	t.Logf("100 renewals by SVID proof in %d calls of %v entries", len(counts), counts)
}

// TestRenewReportsEachEntry: a refused entry's error is the server's gRPC
// status, with its retry hint readable by RetryAfter; the other entries
// are issued.
func TestRenewReportsEachEntry(t *testing.T) {
	m := startServer(t, 4, server.Limits{PerIdentity: server.Rate{PerSecond: 0.01, Burst: 1}})
	entries := []batch.Entry{
		{ID: m.ids[0], Token: m.tokens[0]},
		// Another identity's token, of an identity no other entry uses:
		// the entries run at once, and each identity has one request.
		{ID: m.ids[1], Token: m.tokens[3]},
		{ID: m.ids[2], Token: m.tokens[2]},
	}
	results, err := batch.Renew(context.Background(), m.client, entries)
	require.NoError(t, err)
	requireValid(t, m, entries[0], results[0])
	require.Nil(t, results[1].SVID)
	require.Equal(t, codes.PermissionDenied, status.Code(results[1].Err))
	require.Contains(t, status.Convert(results[1].Err).Message(), `but the credential is for "spiffe://example.org/ns/node-a/sa/w003"`)
	_, ok := batch.RetryAfter(results[1].Err)
	require.False(t, ok)

	// ids[2]'s one request a hundred seconds is spent.
	results, err = batch.Renew(context.Background(), m.client, entries[2:])
	require.NoError(t, err)
	require.Equal(t, codes.ResourceExhausted, status.Code(results[0].Err))
	wait, ok := batch.RetryAfter(results[0].Err)
	require.True(t, ok)
	require.Greater(t, wait, 90*time.Second)
}

// TestRenewRefusesAnOlderBundle: a caller that holds a newer bundle than
// the CA's answer (a replica behind on the roots) gets Unavailable for
// every entry, not certificates checked against roots it has moved past.
func TestRenewRefusesAnOlderBundle(t *testing.T) {
	m := startServer(t, 2, server.Limits{})
	entries := []batch.Entry{{ID: m.ids[0], Token: m.tokens[0]}, {ID: m.ids[1], Token: m.tokens[1]}}
	current, err := batch.Renew(context.Background(), m.client, entries)
	require.NoError(t, err)
	seq := current[0].BundleSequence

	results, err := batch.Renew(context.Background(), m.client, entries, batch.WithBundleSequence(seq+1))
	require.NoError(t, err)
	for _, r := range results {
		require.Nil(t, r.SVID)
		require.Equal(t, codes.Unavailable, status.Code(r.Err))
		require.Contains(t, status.Convert(r.Err).Message(), fmt.Sprintf("the CA's trust bundle (sequence %d) is older than the caller's (%d)", seq, seq+1))
	}
	results, err = batch.Renew(context.Background(), m.client, entries, batch.WithBundleSequence(seq))
	require.NoError(t, err)
	for i, r := range results {
		requireValid(t, m, entries[i], r)
	}
}

// TestRenewRefusesEntriesItCannotSend: nothing is sent for a batch with an
// entry that has no ID, no credential, or a current SVID of another ID.
func TestRenewRefusesEntriesItCannotSend(t *testing.T) {
	m := startServer(t, 1, server.Limits{})
	other := testca.New(t, td).CreateX509SVID(spiffeid.RequireFromPath(td, "/other"))
	for _, tt := range []struct {
		name  string
		entry batch.Entry
		msg   string
	}{
		{name: "no ID", entry: batch.Entry{Token: "x"}, msg: "batch: entry 1 (): no ID"},
		{name: "no credential", entry: batch.Entry{ID: m.ids[0]}, msg: "batch: entry 1 (spiffe://example.org/ns/node-a/sa/w000): no credential: set Current or Token"},
		{name: "current SVID of another ID", entry: batch.Entry{ID: m.ids[0], Current: other}, msg: `batch: entry 1 (spiffe://example.org/ns/node-a/sa/w000): the current SVID is for "spiffe://example.org/other"`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := batch.Renew(context.Background(), m.client, []batch.Entry{{ID: m.ids[0], Token: m.tokens[0]}, tt.entry})
			require.EqualError(t, err, tt.msg)
			sizes, _ := m.client.calls()
			require.Empty(t, sizes, "nothing sent")
		})
	}
}

// TestMaxEntriesIsTheServers: the client packs no more than the server
// takes.
func TestMaxEntriesIsTheServers(t *testing.T) {
	require.Equal(t, server.MaxBatchEntries, batch.MaxEntries)
	require.Equal(t, server.MaxRequestBytes, batch.DefaultMaxRequestBytes)
}
