package identity_test

import (
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/identity"
)

func TestPolicyAllowedPathPrefixes(t *testing.T) {
	policy := identity.Policy{TrustDomain: td, AllowedPathPrefixes: []string{"/ns/payments/", "/cluster/east"}}
	for _, tt := range []struct {
		path string
		ok   bool
	}{
		{"/ns/payments/sa/api", true},
		{"/ns/payments", true},
		{"/cluster/east/ns/a/sa/b", true},
		{"/cluster/east", true},
		// Whole segments: a longer name that starts alike is another
		// namespace.
		{"/ns/payments-v2/sa/api", false},
		{"/cluster/eastern/ns/a/sa/b", false},
		{"/ns/default/sa/demo", false},
		{"/cluster/west/ns/payments/sa/api", false},
		{"/ns", false},
	} {
		t.Run(tt.path, func(t *testing.T) {
			id := spiffeid.RequireFromPath(td, tt.path)
			err := policy.Authorize(identity.Caller{ID: id}, id)
			if tt.ok {
				require.NoError(t, err)
				return
			}
			var pe *identity.PermissionError
			require.ErrorAs(t, err, &pe)
			require.Equal(t, identity.ReasonOutsideScope, pe.Reason)
			require.EqualError(t, err, `identity: "spiffe://example.org`+tt.path+`" is outside the paths this CA issues (/ns/payments/, /cluster/east); another cluster's CA issues it`)
		})
	}

	t.Run("no prefixes allow the whole trust domain", func(t *testing.T) {
		require.NoError(t, identity.Policy{TrustDomain: td}.Authorize(identity.Caller{ID: demoID}, demoID))
	})

	t.Run("a bad prefix matches nothing", func(t *testing.T) {
		p := identity.Policy{TrustDomain: td, AllowedPathPrefixes: []string{"/ns//x", "/", "ns/default"}}
		var pe *identity.PermissionError
		require.ErrorAs(t, p.Authorize(identity.Caller{ID: demoID}, demoID), &pe)
		require.Equal(t, identity.ReasonOutsideScope, pe.Reason)
	})

	t.Run("the other checks come first", func(t *testing.T) {
		other := spiffeid.RequireFromPath(td, "/ns/payments/sa/api")
		var pe *identity.PermissionError
		require.ErrorAs(t, policy.Authorize(identity.Caller{ID: demoID}, other), &pe)
		require.Equal(t, identity.ReasonIdentityMismatch, pe.Reason)
	})
}

func TestValidatePathPrefix(t *testing.T) {
	for _, ok := range []string{"/ns/payments/", "/ns/payments", "/cluster/east/"} {
		require.NoError(t, identity.ValidatePathPrefix(ok), ok)
	}
	for _, tt := range []struct{ prefix, err string }{
		{"/", `identity: path prefix "/" would allow the whole trust domain; leave the prefixes empty for that`},
		{"", `identity: path prefix "" would allow the whole trust domain; leave the prefixes empty for that`},
		{"ns/payments", `identity: path prefix "ns/payments" is not a SPIFFE ID path such as "/ns/payments/": path must have a leading slash`},
		{"/ns//payments", `identity: path prefix "/ns//payments" is not a SPIFFE ID path such as "/ns/payments/": path cannot contain empty segments`},
		{"/ns/../x", `identity: path prefix "/ns/../x" is not a SPIFFE ID path such as "/ns/payments/": path cannot contain dot segments`},
	} {
		t.Run(tt.prefix, func(t *testing.T) {
			require.EqualError(t, identity.ValidatePathPrefix(tt.prefix), tt.err)
		})
	}
}
