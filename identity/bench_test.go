package identity_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/testca"
)

// Caller authentication, for `go test -bench . ./identity`: what the
// server does with a credential before it looks at the CSR. The Kubernetes
// token path is in identity/tokenreview.

// BenchmarkAuthenticateMTLS authenticates a renewal: a leaf and its
// intermediate, as a workload presents them in the TLS handshake, verified
// against a bundle of one root. It is one chain verification (two
// signature checks) and the SVID checks around it.
func BenchmarkAuthenticateMTLS(b *testing.B) {
	root := testca.New(b, td)
	svid := root.ChildCA().CreateX509SVID(demoID)
	if len(svid.Certificates) != 2 {
		b.Fatalf("chain of %d certificates; want the leaf and its intermediate", len(svid.Certificates))
	}
	authn := identity.NewSVIDAuthenticator(td, root.Bundle(), nil)
	cred := identity.Credential{PeerCertificates: svid.Certificates}
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		caller, err := authn.Authenticate(ctx, cred)
		if err != nil {
			b.Fatal(err)
		}
		if caller.ID != demoID {
			b.Fatalf("authenticated %s; want %s", caller.ID, demoID)
		}
	}
}

// BenchmarkAuthenticateBootstrapToken authenticates a static bootstrap
// token. The token is hashed once and compared, in constant time, with
// every entry of the file, so the cost grows with the number of entries.
func BenchmarkAuthenticateBootstrapToken(b *testing.B) {
	for _, n := range []int{1, 100, 10_000} {
		b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
			f := identity.TokenFile{Tokens: make([]identity.TokenFileEntry, n)}
			for i := range f.Tokens {
				f.Tokens[i] = identity.TokenFileEntry{
					ID:    spiffeid.RequireFromPathf(td, "/ns/default/sa/bench-%d", i).String(),
					Token: rand.Text(),
				}
			}
			// The caller's token is the first entry's: every entry is
			// compared whichever matches.
			f.Tokens[0] = identity.TokenFileEntry{ID: demoID.String(), Token: demoToken}
			st, err := identity.NewStaticTokens(f, td)
			if err != nil {
				b.Fatal(err)
			}
			cred := identity.Credential{Token: demoToken}
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				caller, err := st.Authenticate(ctx, cred)
				if err != nil {
					b.Fatal(err)
				}
				if caller.ID != demoID {
					b.Fatalf("authenticated %s; want %s", caller.ID, demoID)
				}
			}
		})
	}
}

// BenchmarkParseBearer parses an "authorization" header holding a token
// the size of a Kubernetes service-account JWT (about 1 KiB).
func BenchmarkParseBearer(b *testing.B) {
	token := strings.Repeat("eyJhbGciOiJSUzI1NiJ9", 50) // 1000 bytes of base64url
	header := "Bearer " + token
	b.ReportAllocs()
	for b.Loop() {
		got, err := identity.ParseBearer(header)
		if err != nil {
			b.Fatal(err)
		}
		if len(got) != len(token) {
			b.Fatalf("parsed %d bytes; want %d", len(got), len(token))
		}
	}
}
