package identity_test

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/internal/securefile"
	"github.com/meshca/meshca/testca"
)

var (
	td      = spiffeid.RequireTrustDomainFromString("example.org")
	otherTD = spiffeid.RequireTrustDomainFromString("other.org")
	demoID  = spiffeid.RequireFromPath(td, "/ns/default/sa/demo")
)

const demoToken = "0123456789abcdef-demo-token"

func sha(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

func requireAuthReason(t *testing.T, err error, reason identity.AuthReason) {
	t.Helper()
	var ae *identity.AuthError
	require.ErrorAs(t, err, &ae)
	require.Equal(t, reason, ae.Reason)
}

func TestStaticTokens(t *testing.T) {
	otherID := spiffeid.RequireFromPath(td, "/ns/default/sa/other")
	st, err := identity.NewStaticTokens(identity.TokenFile{Tokens: []identity.TokenFileEntry{
		{ID: demoID.String(), SHA256: sha(demoToken)},
		{ID: otherID.String(), Token: "another-token-of-enough-length"},
	}}, td)
	require.NoError(t, err)

	caller, err := st.Authenticate(context.Background(), identity.Credential{Token: demoToken})
	require.NoError(t, err)
	require.Equal(t, demoID, caller.ID)
	require.Equal(t, identity.MethodBootstrapToken, caller.Method)
	require.Equal(t, "token-sha256:"+sha(demoToken)[:8], caller.Subject)
	require.NotContains(t, caller.Subject, demoToken)

	caller, err = st.Authenticate(context.Background(), identity.Credential{Token: "another-token-of-enough-length"})
	require.NoError(t, err)
	require.Equal(t, otherID, caller.ID)

	_, err = st.Authenticate(context.Background(), identity.Credential{Token: "wrong-token-wrong-token"})
	requireAuthReason(t, err, identity.ReasonUnknownToken)
	require.EqualError(t, err, "identity: bearer token is not known")

	_, err = st.Authenticate(context.Background(), identity.Credential{})
	require.ErrorIs(t, err, identity.ErrNotApplicable)
}

// TestStaticTokenExpiry: a token is accepted until its expires time and
// refused from then on, with a reason of its own that names the identity
// and the time, never the token; a token without expires never expires.
func TestStaticTokenExpiry(t *testing.T) {
	otherID := spiffeid.RequireFromPath(td, "/ns/default/sa/other")
	clk := clocktesting.NewFakePassiveClock(time.Date(2026, 11, 22, 11, 59, 59, 0, time.UTC))
	st, err := identity.NewStaticTokens(identity.TokenFile{Tokens: []identity.TokenFileEntry{
		{ID: demoID.String(), SHA256: sha(demoToken), Expires: "2026-11-22T12:00:00Z"},
		{ID: otherID.String(), Token: "another-token-of-enough-length"},
	}}, td, identity.WithTokensClock(clk))
	require.NoError(t, err)

	caller, err := st.Authenticate(context.Background(), identity.Credential{Token: demoToken})
	require.NoError(t, err, "a second before it expires")
	require.Equal(t, demoID, caller.ID)

	clk.SetTime(time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC))
	_, err = st.Authenticate(context.Background(), identity.Credential{Token: demoToken})
	requireAuthReason(t, err, identity.ReasonExpiredToken)
	require.EqualError(t, err, "identity: bootstrap token for "+demoID.String()+" expired at 2026-11-22T12:00:00Z; "+
		"renew over mTLS with the current certificate, or ask the operator for a new token")
	require.NotContains(t, err.Error(), demoToken)

	clk.SetTime(time.Date(2099, 1, 1, 0, 0, 0, 0, time.UTC))
	_, err = st.Authenticate(context.Background(), identity.Credential{Token: "another-token-of-enough-length"})
	require.NoError(t, err, "no expires: never expires")

	// An expired token is final for the token, not for the call: the
	// call's SVID still authenticates it.
	root := testca.New(t, td)
	svid := root.ChildCA().CreateX509SVID(otherID)
	authn := identity.Chain(st, identity.NewSVIDAuthenticator(td, root.Bundle(), nil))
	caller, err = authn.Authenticate(context.Background(), identity.Credential{Token: demoToken, PeerCertificates: svid.Certificates})
	require.NoError(t, err)
	require.Equal(t, otherID, caller.ID)
	require.Equal(t, identity.MethodMTLS, caller.Method)
	_, err = authn.Authenticate(context.Background(), identity.Credential{Token: demoToken})
	requireAuthReason(t, err, identity.ReasonExpiredToken)
}

// TestStaticTokensReplace: Replace swaps the whole list; a list with a
// bad entry changes nothing.
func TestStaticTokensReplace(t *testing.T) {
	const other = "another-token-of-enough-length"
	st, err := identity.NewStaticTokens(identity.TokenFile{Tokens: []identity.TokenFileEntry{{ID: demoID.String(), Token: demoToken}}}, td)
	require.NoError(t, err)
	require.Equal(t, 1, st.Len())

	err = st.Replace(identity.TokenFile{Tokens: []identity.TokenFileEntry{{ID: demoID.String(), Token: other}, {ID: demoID.String(), Token: "short"}}})
	require.EqualError(t, err, "identity: token entry 1: token is shorter than 16 characters")
	_, err = st.Authenticate(context.Background(), identity.Credential{Token: demoToken})
	require.NoError(t, err, "a refused list leaves the old one")
	_, err = st.Authenticate(context.Background(), identity.Credential{Token: other})
	requireAuthReason(t, err, identity.ReasonUnknownToken)

	require.NoError(t, st.Replace(identity.TokenFile{Tokens: []identity.TokenFileEntry{{ID: demoID.String(), Token: other}}}))
	_, err = st.Authenticate(context.Background(), identity.Credential{Token: other})
	require.NoError(t, err)
	_, err = st.Authenticate(context.Background(), identity.Credential{Token: demoToken})
	requireAuthReason(t, err, identity.ReasonUnknownToken)

	require.NoError(t, st.Replace(identity.TokenFile{}))
	require.Zero(t, st.Len())
}

func TestNewStaticTokensRefusesBadEntries(t *testing.T) {
	for _, tt := range []struct {
		name  string
		entry identity.TokenFileEntry
		err   string
	}{
		{"bad id", identity.TokenFileEntry{ID: "not-an-id", SHA256: sha(demoToken)}, "identity: token entry 0: id: scheme is missing or invalid"},
		{"other trust domain", identity.TokenFileEntry{ID: "spiffe://other.org/x", SHA256: sha(demoToken)}, `identity: token entry 0: id "spiffe://other.org/x" is not in trust domain "example.org"`},
		{"both", identity.TokenFileEntry{ID: demoID.String(), SHA256: sha(demoToken), Token: demoToken}, "identity: token entry 0: give sha256 or token, not both"},
		{"short token", identity.TokenFileEntry{ID: demoID.String(), Token: "short"}, "identity: token entry 0: token is shorter than 16 characters"},
		{"bad hash", identity.TokenFileEntry{ID: demoID.String(), SHA256: "abcd"}, "identity: token entry 0: sha256 is not 64 hex digits"},
		{"neither", identity.TokenFileEntry{ID: demoID.String()}, "identity: token entry 0: has neither sha256 nor token"},
		{"bad expires", identity.TokenFileEntry{ID: demoID.String(), SHA256: sha(demoToken), Expires: "2026-12-31"},
			`identity: token entry 0: expires "2026-12-31" is not an RFC 3339 time such as 2026-12-31T00:00:00Z`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := identity.NewStaticTokens(identity.TokenFile{Tokens: []identity.TokenFileEntry{tt.entry}}, td)
			require.EqualError(t, err, tt.err)
			require.NotContains(t, err.Error(), demoToken)
		})
	}
}

func TestLoadStaticTokens(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		path := filepath.Join(dir, name)
		require.NoError(t, securefile.WriteFile(path, []byte(content), mode))
		return path
	}
	good := write("good.yaml", "tokens:\n- id: "+demoID.String()+"\n  token: "+demoToken+"\n  expires: \"2099-01-01T00:00:00Z\"\n", 0o600)
	st, err := identity.LoadStaticTokens(good, td)
	require.NoError(t, err)
	caller, err := st.Authenticate(context.Background(), identity.Credential{Token: demoToken})
	require.NoError(t, err)
	require.Equal(t, demoID, caller.ID)

	open := write("open.yaml", "tokens: []\n", 0o644)
	_, err = identity.LoadStaticTokens(open, td)
	require.ErrorIs(t, err, securefile.ErrTooOpen)

	// A broken file must not have its content (tokens) echoed.
	broken := write("broken.yaml", "tokens:\n- id: x\n  token: "+demoToken+"\n  surprise: "+demoToken+"\n", 0o600)
	_, err = identity.LoadStaticTokens(broken, td)
	require.EqualError(t, err, "identity: token file "+broken+" is not valid YAML of the documented shape")
}

func TestParseBearer(t *testing.T) {
	for _, tt := range []struct {
		name, header, token, err string
	}{
		{name: "ok", header: "Bearer abc.def", token: "abc.def"},
		{name: "scheme case-insensitive", header: "bearer abc", token: "abc"},
		{name: "basic", header: "Basic dXNlcjpwYXNz", err: `identity: authorization header is not "Bearer <token>"`},
		{name: "no token", header: "Bearer", err: `identity: authorization header is not "Bearer <token>"`},
		{name: "empty token", header: "Bearer   ", err: "identity: authorization header has an empty bearer token"},
		{name: "control character", header: "Bearer ab\x01c", err: "identity: bearer token has a character outside printable ASCII at offset 2"},
		{name: "longest", header: "Bearer " + strings.Repeat("a", identity.MaxTokenLength), token: strings.Repeat("a", identity.MaxTokenLength)},
		{name: "too long", header: "Bearer " + strings.Repeat("a", identity.MaxTokenLength+1), err: "identity: bearer token is 8193 bytes, more than the limit of 8192"},
		{name: "too long, not even parsed", header: strings.Repeat("\x00", identity.MaxTokenLength+8), err: "identity: bearer token is 8193 bytes, more than the limit of 8192"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			token, err := identity.ParseBearer(tt.header)
			if tt.err != "" {
				require.EqualError(t, err, tt.err)
				requireAuthReason(t, err, identity.ReasonMalformedToken)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tt.token, token)
		})
	}
	_, err := identity.TokenFromHeaders([]string{"Bearer a", "Bearer b"})
	require.EqualError(t, err, "identity: request has 2 authorization headers; send one")
	token, err := identity.TokenFromHeaders(nil)
	require.NoError(t, err)
	require.Empty(t, token)
}

func TestSVIDAuthenticator(t *testing.T) {
	root := testca.New(t, td)
	inter := root.ChildCA()
	authn := identity.NewSVIDAuthenticator(td, root.Bundle(), nil)

	svid := inter.CreateX509SVID(demoID)
	caller, err := authn.Authenticate(context.Background(), identity.Credential{PeerCertificates: svid.Certificates})
	require.NoError(t, err)
	require.Equal(t, demoID, caller.ID)
	require.Equal(t, identity.MethodMTLS, caller.Method)
	require.Equal(t, "serial:"+svid.Certificates[0].SerialNumber.Text(16), caller.Subject)

	_, err = authn.Authenticate(context.Background(), identity.Credential{})
	require.ErrorIs(t, err, identity.ErrNotApplicable)

	now := time.Now()
	expired := inter.CreateX509SVID(demoID, testca.WithLifetime(now.Add(-2*time.Hour), now.Add(-time.Hour)))
	foreignRoot := testca.New(t, td)
	foreign := foreignRoot.ChildCA().CreateX509SVID(demoID)
	otherDomain := testca.New(t, otherTD).ChildCA().CreateX509SVID(spiffeid.RequireFromPath(otherTD, "/w"))
	noID := inter.CreateX509SVID(demoID)
	noID.Certificates[0].URIs = nil

	for _, tt := range []struct {
		name  string
		chain []*x509.Certificate
		err   string
	}{
		{"expired", expired.Certificates, "identity: client certificate does not verify against the trust bundle: x509svid: could not verify leaf certificate: x509: certificate has expired or is not yet valid"},
		{"foreign root", foreign.Certificates, "identity: client certificate does not verify against the trust bundle: x509svid: could not verify leaf certificate: x509: certificate signed by unknown authority"},
		{"other trust domain", otherDomain.Certificates, `identity: client certificate is for trust domain "other.org"; this CA renews only "example.org"`},
		{"no SPIFFE ID", noID.Certificates, "identity: client certificate is not an X509-SVID: certificate contains no URI SAN"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := authn.Authenticate(context.Background(), identity.Credential{PeerCertificates: tt.chain})
			requireAuthReason(t, err, identity.ReasonBadCertificate)
			require.ErrorContains(t, err, tt.err)
		})
	}
}

func TestChain(t *testing.T) {
	st, err := identity.NewStaticTokens(identity.TokenFile{Tokens: []identity.TokenFileEntry{{ID: demoID.String(), Token: demoToken}}}, td)
	require.NoError(t, err)
	root := testca.New(t, td)
	svid := root.ChildCA().CreateX509SVID(spiffeid.RequireFromPath(td, "/renewing"))
	authn := identity.Chain(st, identity.NewSVIDAuthenticator(td, root.Bundle(), nil))

	caller, err := authn.Authenticate(context.Background(), identity.Credential{Token: demoToken})
	require.NoError(t, err)
	require.Equal(t, demoID, caller.ID)

	caller, err = authn.Authenticate(context.Background(), identity.Credential{PeerCertificates: svid.Certificates})
	require.NoError(t, err)
	require.Equal(t, svid.ID, caller.ID)

	_, err = authn.Authenticate(context.Background(), identity.Credential{})
	requireAuthReason(t, err, identity.ReasonNoCredential)

	// A token no authenticator knows passes on: a valid SVID on the same
	// call still authenticates the caller, as the SVID's identity.
	caller, err = authn.Authenticate(context.Background(), identity.Credential{Token: "unknown-unknown-unknown", PeerCertificates: svid.Certificates})
	require.NoError(t, err)
	require.Equal(t, svid.ID, caller.ID)
	_, err = authn.Authenticate(context.Background(), identity.Credential{Token: "unknown-unknown-unknown"})
	requireAuthReason(t, err, identity.ReasonUnknownToken)

	// A final refusal stops the chain.
	refusing := authenticatorFunc(func(context.Context, identity.Credential) (identity.Caller, error) {
		return identity.Caller{}, errors.New("backend down")
	})
	_, err = identity.Chain(refusing, st).Authenticate(context.Background(), identity.Credential{Token: demoToken})
	require.EqualError(t, err, "backend down")
}

type authenticatorFunc func(context.Context, identity.Credential) (identity.Caller, error)

func (f authenticatorFunc) Authenticate(ctx context.Context, c identity.Credential) (identity.Caller, error) {
	return f(ctx, c)
}

func TestPolicyAuthorize(t *testing.T) {
	serverID := spiffeid.RequireFromPath(td, "/meshca/server")
	policy := identity.Policy{TrustDomain: td, Reserved: []spiffeid.ID{serverID}}
	caller := identity.Caller{ID: demoID}

	require.NoError(t, policy.Authorize(caller, demoID))

	for _, tt := range []struct {
		name      string
		caller    spiffeid.ID
		requested spiffeid.ID
		reason    identity.PermissionReason
		err       string
	}{
		{"another ID", demoID, spiffeid.RequireFromPath(td, "/ns/kube-system/sa/admin"), identity.ReasonIdentityMismatch,
			`identity: CSR asks for "spiffe://example.org/ns/kube-system/sa/admin" but the credential is for "spiffe://example.org/ns/default/sa/demo"; ask for the credential's ID`},
		{"reserved", serverID, serverID, identity.ReasonReservedIdentity, `identity: "spiffe://example.org/meshca/server" is reserved and never issued to a workload`},
		{"foreign caller", spiffeid.RequireFromPath(otherTD, "/x"), spiffeid.RequireFromPath(otherTD, "/x"), identity.ReasonForeignDomain,
			`identity: credential is for trust domain "other.org"; this CA issues for "example.org"`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			err := policy.Authorize(identity.Caller{ID: tt.caller}, tt.requested)
			var pe *identity.PermissionError
			require.ErrorAs(t, err, &pe)
			require.Equal(t, tt.reason, pe.Reason)
			require.EqualError(t, err, tt.err)
		})
	}
}

func TestWorkloadID(t *testing.T) {
	id, err := identity.WorkloadID(td, "payments", "api")
	require.NoError(t, err)
	require.Equal(t, "spiffe://example.org/ns/payments/sa/api", id.String())
	_, err = identity.WorkloadID(td, "", "api")
	require.Error(t, err)
	_, err = identity.WorkloadID(td, "a/b", "api")
	require.Error(t, err)
}

// FuzzParseBearer: any header either yields a token that is printable
// ASCII, non-empty and within the limit, or a malformed-token error that
// does not echo what followed the scheme.
func FuzzParseBearer(f *testing.F) {
	for _, seed := range [][2]string{{"Bearer", "abc"}, {"bearer", "x.y.z"}, {"Basic", "Zm9v"}, {"Bearer", ""}, {"Bearer", "   "}, {"Bearer", "a\x00b"}} {
		f.Add(seed[0], seed[1])
	}
	f.Fuzz(func(t *testing.T, scheme, rest string) {
		// "zq" never occurs in an error message of ours: if the message
		// holds "zq"+rest, it echoed the credential.
		header := scheme + " zq" + rest
		token, err := identity.ParseBearer(header)
		if err != nil {
			requireAuthReason(t, err, identity.ReasonMalformedToken)
			require.NotContains(t, err.Error(), "zq"+rest)
			return
		}
		require.NotEmpty(t, token)
		require.LessOrEqual(t, len(token), identity.MaxTokenLength)
		for i := 0; i < len(token); i++ {
			require.True(t, token[i] > ' ' && token[i] < 0x7f)
		}
	})
}

// A token that cannot be checked now (API server down, reviews
// overloaded) does not stop a valid SVID on the same call; without one,
// the caller learns that retrying may work.
func TestChainPassesOverUnavailable(t *testing.T) {
	root := testca.New(t, td)
	svid := root.ChildCA().CreateX509SVID(demoID)
	down := authenticatorFunc(func(_ context.Context, cred identity.Credential) (identity.Caller, error) {
		if cred.Token == "" {
			return identity.Caller{}, identity.ErrNotApplicable
		}
		return identity.Caller{}, &identity.AuthError{Reason: identity.ReasonUnavailable}
	})
	authn := identity.Chain(down, identity.NewSVIDAuthenticator(td, root.Bundle(), nil))

	caller, err := authn.Authenticate(context.Background(), identity.Credential{Token: "a.b.c", PeerCertificates: svid.Certificates})
	require.NoError(t, err)
	require.Equal(t, demoID, caller.ID)

	_, err = authn.Authenticate(context.Background(), identity.Credential{Token: "a.b.c"})
	requireAuthReason(t, err, identity.ReasonUnavailable)
}
