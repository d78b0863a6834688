package identity_test

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/identity"
)

func TestCallerRequireMethod(t *testing.T) {
	k8s := identity.Caller{ID: demoID, Method: identity.MethodKubernetesToken}
	require.NoError(t, k8s.RequireMethod(identity.MethodKubernetesToken))
	require.NoError(t, k8s.RequireMethod(identity.MethodMTLS, identity.MethodKubernetesToken))

	bootstrap := identity.Caller{ID: demoID, Method: identity.MethodBootstrapToken}
	err := bootstrap.RequireMethod(identity.MethodKubernetesToken)
	requireAuthReason(t, err, identity.ReasonMethodNotAccepted)
	require.EqualError(t, err, "identity: a credential of method bootstrap_token is not accepted by this API; present one of method kubernetes_token")

	err = bootstrap.RequireMethod(identity.MethodKubernetesToken, identity.MethodMTLS)
	require.EqualError(t, err, "identity: a credential of method bootstrap_token is not accepted by this API; present one of method kubernetes_token or mtls")
}

func TestParseToken(t *testing.T) {
	token, err := identity.ParseToken([]byte("eyJhbGciOi.x.y\n"), "token")
	require.NoError(t, err)
	require.Equal(t, "eyJhbGciOi.x.y", token, "a token file's final newline is removed")

	for _, tt := range []struct {
		name   string
		raw    []byte
		reason identity.AuthReason
		err    string
	}{
		{name: "nil", raw: nil, reason: identity.ReasonNoCredential, err: "identity: no credential: token is empty; send the workload's service-account token"},
		{name: "white space", raw: []byte(" \n"), reason: identity.ReasonNoCredential, err: "identity: no credential: token is empty; send the workload's service-account token"},
		{name: "too long", raw: []byte(strings.Repeat("x", identity.MaxTokenLength+1)), reason: identity.ReasonMalformedToken, err: "identity: token is 8193 bytes, more than the limit of 8192"},
		{name: "inner space", raw: []byte("secret-part other-part"), reason: identity.ReasonMalformedToken, err: "identity: token has a character outside printable ASCII at offset 11"},
		{name: "not ASCII", raw: []byte("secret-\xff"), reason: identity.ReasonMalformedToken, err: "identity: token has a character outside printable ASCII at offset 7"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := identity.ParseToken(tt.raw, "token")
			requireAuthReason(t, err, tt.reason)
			require.EqualError(t, err, tt.err)
			require.NotContains(t, err.Error(), "secret")
		})
	}
}
