package identity_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/meshca/meshca/identity"
)

// FuzzParseToken: a token in a request's body (Linkerd's token field) is
// either refused with a reason and a message that does not echo it, or
// returned trimmed, printable and within the limit, as ParseBearer would
// return it from a header.
func FuzzParseToken(f *testing.F) {
	for _, seed := range [][2]string{
		{"", "eyJhbGciOiJSUzI1NiJ9.e30.c2ln"}, {"", "token\n"}, {" \t", ""}, {"", ""}, {"\xef\xbb\xbf", "abc"},
		{"", "a b"}, {"", strings.Repeat("a", identity.MaxTokenLength)}, {"", "a\x7f"},
	} {
		f.Add(seed[0], seed[1])
	}
	f.Fuzz(func(t *testing.T, pre, rest string) {
		// "zq" never occurs in an error message of ours: if the message
		// holds "zq"+rest, it echoed the token.
		raw := pre + "zq" + rest
		token, err := identity.ParseToken([]byte(raw), "the request's token")
		if err != nil {
			var ae *identity.AuthError
			require.ErrorAs(t, err, &ae)
			require.Equal(t, identity.ReasonMalformedToken, ae.Reason, "a token holding zq is not empty")
			require.NotContains(t, err.Error(), "zq"+rest)
			require.Empty(t, token)
			return
		}
		require.Equal(t, strings.TrimSpace(raw), token)
		require.LessOrEqual(t, len(token), identity.MaxTokenLength)
		fromHeader, err := identity.ParseBearer("Bearer " + token)
		require.NoError(t, err, "a body token is refused in a header")
		require.Equal(t, token, fromHeader)
	})
}

// FuzzTokenFromHeaders: no header is no token, one is read by
// ParseBearer, several are refused, whatever they hold.
func FuzzTokenFromHeaders(f *testing.F) {
	f.Add(uint8(0), "", "")
	f.Add(uint8(1), "Bearer abc", "")
	f.Add(uint8(2), "Bearer abc", "Bearer abc")
	f.Add(uint8(1), "Bearer ", "")
	f.Add(uint8(3), "bearer x", "Basic y")
	f.Fuzz(func(t *testing.T, n uint8, a, b string) {
		values := make([]string, int(n%4))
		for i := range values {
			values[i] = a
			if i%2 == 1 {
				values[i] = b
			}
		}
		token, err := identity.TokenFromHeaders(values)
		switch len(values) {
		case 0:
			require.NoError(t, err)
			require.Empty(t, token)
		case 1:
			want, wantErr := identity.ParseBearer(a)
			require.Equal(t, want, token)
			require.Equal(t, wantErr, err)
		default:
			requireAuthReason(t, err, identity.ReasonMalformedToken)
			require.Empty(t, token)
			if len(a) >= 8 {
				require.NotContains(t, err.Error(), a)
			}
		}
	})
}

// FuzzTokenFile reads a static token file (YAML) and builds the
// authenticator from it: neither error ever holds a token of the file,
// every accepted entry is of the trust domain, and every token the file
// lists authenticates as the last entry of that token.
func FuzzTokenFile(f *testing.F) {
	for _, seed := range []string{
		"tokens:\n- id: spiffe://example.org/ns/default/sa/demo\n  sha256: " + sha("a-token-of-at-least-16") + "\n",
		"tokens:\n- id: spiffe://example.org/ns/default/sa/demo\n  token: a-token-of-at-least-16-characters\n- id: spiffe://example.org/ns/default/sa/other\n  token: a-token-of-at-least-16-characters\n",
		"tokens:\n- id: spiffe://other.org/x\n  token: zq-secret-token-0123456789\n",
		"tokens:\n- id: spiffe://example.org/x\n  token: zq-short\n",
		"tokens:\n- id: spiffe://example.org/x\n  token: zq-secret-token-0123456789\n  sha256: 00\n",
		"tokens:\n- id: spiffe://example.org/x\n  tokn: zq-secret-token-0123456789\n",
		"tokens: [{id: 'spiffe://example.org/x', token: 1234567890123456789}]",
		"tokens:\n- id: not an id zq-secret-token-0123456789\n",
		"tokens:\n- id: spiffe://example.org/x\n  token: zq-secret-token-0123456789\n  expires: \"2020-01-01T00:00:00Z\"\n",
		"tokens:\n- id: spiffe://example.org/x\n  token: zq-secret-token-0123456789\n  expires: \"2099-01-01T00:00:00+02:00\"\n",
		"tokens:\n- id: spiffe://example.org/x\n  token: zq-secret-token-0123456789\n  expires: tomorrow\n",
		"{}", "tokens: null", "- a\n- b", "\t",
	} {
		f.Add([]byte(seed))
	}
	path := filepath.Join(f.TempDir(), "tokens.yaml")
	now := time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
	clk := clocktesting.NewFakePassiveClock(now)
	f.Fuzz(func(t *testing.T, doc []byte) {
		require.NoError(t, os.WriteFile(path, doc, 0o600))
		file, err := identity.ReadTokenFile(path)
		if err != nil {
			require.EqualError(t, err, "identity: token file "+path+" is not valid YAML of the documented shape")
			return
		}
		st, err := identity.NewStaticTokens(file, td, identity.WithTokensClock(clk))
		if err != nil {
			// "zq" is in none of our messages, nor in an ID or expiry
			// time they may quote: a message holding a token with "zq"
			// echoed it.
			quoted := func(o identity.TokenFileEntry, token string) bool {
				return strings.Contains(o.ID, token) || strings.Contains(o.Expires, token)
			}
			for _, e := range file.Tokens {
				if strings.Contains(e.Token, "zq") && !slices.ContainsFunc(file.Tokens, func(o identity.TokenFileEntry) bool { return quoted(o, e.Token) }) {
					require.NotContains(t, err.Error(), e.Token, "the error echoes a token")
				}
			}
			return
		}
		for _, e := range file.Tokens {
			if e.Token == "" {
				continue
			}
			// The token is the last entry that lists it.
			var want identity.TokenFileEntry
			h := sha256.Sum256([]byte(e.Token))
			for _, other := range file.Tokens {
				if other.Token == e.Token || strings.EqualFold(other.SHA256, hex.EncodeToString(h[:])) {
					want = other
				}
			}
			caller, err := st.Authenticate(context.Background(), identity.Credential{Token: e.Token})
			if want.Expires != "" {
				if exp, perr := time.Parse(time.RFC3339, want.Expires); perr == nil && !now.Before(exp) {
					var ae *identity.AuthError
					require.ErrorAs(t, err, &ae)
					require.Equal(t, identity.ReasonExpiredToken, ae.Reason)
					require.NotContains(t, err.Error(), e.Token)
					continue
				}
			}
			require.NoError(t, err)
			require.Equal(t, identity.MethodBootstrapToken, caller.Method)
			require.NotContains(t, caller.Subject, e.Token)
			require.Equal(t, want.ID, caller.ID.String())
			require.Equal(t, td, caller.ID.TrustDomain())
		}
	})
}
