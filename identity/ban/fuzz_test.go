package ban_test

import (
	"strings"
	"testing"

	"github.com/meshca/meshca/identity/ban"
)

// FuzzParseTarget: any input parses into a target of the trust domain
// that reads back as itself, or is refused with ErrInvalid; never a
// panic.
func FuzzParseTarget(f *testing.F) {
	for _, s := range []string{"", "shop", "spiffe://example.org/ns/shop/sa/web", "spiffe://example.org", "spiffe://other.example/a", "SPIFFE://example.org/a", "ns/shop", "a-b-c", strings.Repeat("a", 64)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		target, err := ban.ParseTarget(s, td)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "ban: invalid ban: ") {
				t.Fatalf("error without ErrInvalid: %v", err)
			}
			return
		}
		if target.TrustDomain() != td || target.String() != s {
			t.Fatalf("%q parsed as %q of %q", s, target.String(), target.TrustDomain())
		}
		again, err := ban.ParseTarget(target.String(), td)
		if err != nil || again != target {
			t.Fatalf("%q does not parse back: %v", s, err)
		}
	})
}

// FuzzUnmarshal: stored bans from a Secret anyone with write access may
// have changed decode or are refused; what decodes encodes and decodes
// back the same.
func FuzzUnmarshal(f *testing.F) {
	f.Add([]byte(`{"version":1,"bans":[{"namespace":"shop","trust_domain":"example.org","reason":"x","created":"2026-01-01T00:00:00Z"}]}`))
	f.Add([]byte(`{"version":1,"bans":[{"spiffe_id":"spiffe://example.org/a","reason":"x","created":"2026-01-01T00:00:00Z","expires":"2026-01-02T00:00:00Z"}]}`))
	f.Add([]byte(`{"version":2}`))
	f.Add([]byte(`{"version":1,"bans":[{}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		bans, err := ban.Unmarshal(data)
		if err != nil {
			return
		}
		out, err := ban.Marshal(bans)
		if err != nil {
			t.Fatalf("decoded bans do not encode: %v", err)
		}
		again, err := ban.Unmarshal(out)
		if err != nil || len(again) != len(bans) {
			t.Fatalf("round trip: %d bans, then %d: %v", len(bans), len(again), err)
		}
		for i := range bans {
			if again[i].Target != bans[i].Target || again[i].Reason != bans[i].Reason {
				t.Fatalf("ban %d changed in a round trip", i)
			}
		}
	})
}
