package server

import (
	"context"
	"io"
	"log/slog"
	"net"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/testca"
)

// BenchmarkIssue is the shared request path of every front end, in
// process and without gRPC: reading the credential, a bootstrap token
// authenticated, the bans, admission, the CSR parsed and its signature
// checked, the policy, the signature, the metrics and the JSON audit line
// (written to io.Discard). Against ca's BenchmarkCryptoFloor, it is what
// the server adds to the crypto before gRPC and TLS.
func BenchmarkIssue(b *testing.B) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	id := spiffeid.RequireFromPath(td, "/ns/default/sa/bench")
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: td})
	if err != nil {
		b.Fatal(err)
	}
	c, err := ca.New(set, ca.Options{})
	if err != nil {
		b.Fatal(err)
	}
	const token = "bench-token-0123456789abcdef"
	tokens, err := identity.NewStaticTokens(identity.TokenFile{Tokens: []identity.TokenFileEntry{{ID: id.String(), Token: token}}}, td)
	if err != nil {
		b.Fatal(err)
	}
	s, err := New(Options{
		CA:            c,
		Authenticator: tokens,
		Logger:        slog.New(slog.NewJSONHandler(io.Discard, nil)),
	})
	if err != nil {
		b.Fatal(err)
	}
	ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer "+token))
	ctx = peer.NewContext(ctx, &peer.Peer{Addr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40000}})
	csr := testca.CreateCSR(b, testca.NewKey(b), id.String())
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.issue(ctx, issueRequest{api: APINative, csr: csr}); err != nil {
			b.Fatal(err)
		}
	}
}
