package federation_test

import (
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/identity/federation"
	"github.com/meshca/meshca/testca"
)

// FuzzParseBundle feeds a peer's endpoint body, untrusted input, to the
// checks a fetched bundle goes through: they never panic, and a bundle
// they take has an X.509 authority, none of another trust domain, and
// survives encoding.
func FuzzParseBundle(f *testing.F) {
	good, err := bundleOf(peerTD, 4, testca.New(f, peerTD)).Marshal()
	if err != nil {
		f.Fatal(err)
	}
	foreign, err := bundleOf(peerTD, 4, testca.New(f, otherTD)).Marshal()
	if err != nil {
		f.Fatal(err)
	}
	for _, seed := range [][]byte{good, foreign, []byte(`{"keys":[]}`), []byte(`{"keys": [`), []byte(`null`), nil} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, doc []byte) {
		b, err := federation.ParseBundle(peerTD, doc)
		if err != nil {
			return
		}
		if len(b.X509Authorities()) == 0 {
			t.Fatal("took a bundle without X.509 authority")
		}
		for _, c := range b.X509Authorities() {
			for _, u := range c.URIs {
				if id, err := spiffeid.FromURI(u); err == nil && id.TrustDomain() != peerTD {
					t.Fatalf("took an authority of %q", id.TrustDomain())
				}
			}
		}
		again, err := b.Marshal()
		if err != nil {
			t.Fatalf("a taken bundle does not encode: %v", err)
		}
		if _, err := federation.ParseBundle(peerTD, again); err != nil {
			t.Fatalf("a taken bundle, encoded, is refused: %v", err)
		}
	})
}
