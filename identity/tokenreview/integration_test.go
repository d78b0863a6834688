package tokenreview_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/tokenreview"
	"github.com/meshca/meshca/internal/kubetest"
)

// kube is a real kube-apiserver and etcd on loopback, started by the first
// test that needs it.
var kube kubetest.Shared

func TestMain(m *testing.M) { kube.Run(m) }

// refusedFor starts the message of a token the API server refused for
// meshca's audience; the rest is the API server's own words (those of the
// version scripts/kube.sh pins).
const refusedFor = errPrefix + `service-account token refused by the API server for audiences ["meshca"]: `

// TestKubernetes authenticates tokens the way workloads in a cluster
// present them, against a real API server.
func TestKubernetes(t *testing.T) {
	c := kube.Cluster(t)
	ns := c.CreateNamespace(t, "tokenreview-").Name
	sa := c.CreateServiceAccount(t, ns, "workload")
	workloadID := spiffeid.RequireFromPath(td, "/ns/"+ns+"/sa/workload")
	a, err := tokenreview.New(c.Client.AuthenticationV1(), tokenreview.Options{TrustDomain: td, Audiences: meshca})
	require.NoError(t, err)

	// claims are those of a token the API server issues for the service
	// account, valid from nbf to exp.
	claims := func(aud []string, nbf, exp time.Time) map[string]any {
		return map[string]any{
			"iss": kubetest.Issuer,
			"sub": "system:serviceaccount:" + ns + ":workload",
			"aud": aud,
			"iat": nbf.Unix(),
			"nbf": nbf.Unix(),
			"exp": exp.Unix(),
			"kubernetes.io": map[string]any{
				"namespace":      ns,
				"serviceaccount": map[string]any{"name": "workload", "uid": string(sa.UID)},
			},
		}
	}
	now := time.Now()

	accepted := []struct {
		name  string
		token string
	}{
		{"token for meshca", c.Token(t, ns, "workload", meshca, 10*time.Minute)},
		{"token for meshca among others", c.Token(t, ns, "workload", []string{"vault", "meshca"}, time.Hour)},
		// The same as the expired token below, but for its expiry: it
		// shows that signing tokens here is right, so that the refusal
		// of the expired one is for its expiry.
		{"token signed here", signToken(t, c.ServiceAccountKey, claims(meshca, now.Add(-time.Minute), now.Add(time.Hour)))},
	}
	for _, tt := range accepted {
		t.Run(tt.name, func(t *testing.T) {
			caller, err := a.Authenticate(t.Context(), identity.Credential{Token: tt.token})
			require.NoError(t, err)
			require.Equal(t, identity.Caller{ID: workloadID, Method: "kubernetes_token", Subject: subjectOf(ns, "workload", tt.token)}, caller)
		})
	}

	refused := []struct {
		name   string
		token  string
		reason identity.AuthReason
		err    string
	}{{
		name:   "token for another audience",
		token:  c.Token(t, ns, "workload", []string{"vault"}, 0),
		reason: identity.ReasonUnknownToken,
		err:    refusedFor + `[invalid bearer token, token audiences ["vault"] is invalid for the target audiences ["meshca"]]`,
	}, {
		name:   "token for the API server",
		token:  c.Token(t, ns, "workload", c.APIAudiences, 0),
		reason: identity.ReasonUnknownToken,
		err:    refusedFor + fmt.Sprintf("[invalid bearer token, token audiences %q is invalid for the target audiences [\"meshca\"]]", c.APIAudiences),
	}, {
		// Refused by its own claim, before any review.
		name:   "expired token",
		token:  signToken(t, c.ServiceAccountKey, claims(meshca, now.Add(-2*time.Hour), now.Add(-time.Hour))),
		reason: identity.ReasonUnknownToken,
		err:    errPrefix + "service-account token expired at " + time.Unix(now.Add(-time.Hour).Unix(), 0).UTC().Format(time.RFC3339) + ", by its exp claim; present a current token",
	}, {
		name:   "token signed by another key",
		token:  signToken(t, newKey(t), claims(meshca, now.Add(-time.Minute), now.Add(time.Hour))),
		reason: identity.ReasonUnknownToken,
		err:    refusedFor + "[invalid bearer token, invalid signature, no keys found]",
	}, {
		name:   "garbage",
		token:  "garbage",
		reason: identity.ReasonUnknownToken,
		err:    errPrefix + "bearer token is not a Kubernetes service-account token: it is not a JWT",
	}}
	for _, tt := range refused {
		t.Run(tt.name, func(t *testing.T) {
			_, err := a.Authenticate(t.Context(), identity.Credential{Token: tt.token})
			var ae *identity.AuthError
			require.ErrorAs(t, err, &ae)
			require.Equal(t, tt.reason, ae.Reason)
			require.EqualError(t, err, tt.err)
			requireNoToken(t, err.Error(), tt.token)
		})
	}

	t.Run("token of a deleted service account", func(t *testing.T) {
		c.CreateServiceAccount(t, ns, "deleted")
		token := c.Token(t, ns, "deleted", meshca, 0)
		c.DeleteServiceAccount(t, ns, "deleted")
		// A new Authenticator has nothing cached; the API server's
		// informer may lag behind the deletion by a moment.
		fresh, err := tokenreview.New(c.Client.AuthenticationV1(), tokenreview.Options{TrustDomain: td, Audiences: meshca, CacheTTL: -1})
		require.NoError(t, err)
		require.EventuallyWithT(t, func(collect *assert.CollectT) {
			_, err := fresh.Authenticate(t.Context(), identity.Credential{Token: token})
			var ae *identity.AuthError
			if assert.ErrorAs(collect, err, &ae) {
				assert.Equal(collect, identity.ReasonUnknownToken, ae.Reason)
				assert.ErrorContains(collect, err, refusedFor)
			}
		}, 30*time.Second, 100*time.Millisecond, "a loaded API server's informer can take seconds to see the deletion")
	})
}

// TestKubernetesRBAC checks that reviewing tokens needs exactly "create"
// on tokenreviews, and that a CA without it says so, as Unavailable.
func TestKubernetesRBAC(t *testing.T) {
	c := kube.Cluster(t)
	ns := c.CreateNamespace(t, "tokenreview-rbac-").Name
	c.CreateServiceAccount(t, ns, "workload")
	c.CreateServiceAccount(t, ns, "meshca")
	workload := c.Token(t, ns, "workload", meshca, 0)

	// The CA's own client: the token kubelet mounts for its service
	// account, for the API server's audiences.
	cfg := rest.AnonymousClientConfig(c.Config)
	cfg.BearerToken = c.Token(t, ns, "meshca", c.APIAudiences, 0)
	client, err := kubernetes.NewForConfig(cfg)
	require.NoError(t, err)
	a, err := tokenreview.New(client.AuthenticationV1(), tokenreview.Options{TrustDomain: td, Audiences: meshca})
	require.NoError(t, err)

	_, err = a.Authenticate(t.Context(), identity.Credential{Token: workload})
	var ae *identity.AuthError
	require.ErrorAs(t, err, &ae)
	require.Equal(t, identity.ReasonUnavailable, ae.Reason)
	require.EqualError(t, err, errPrefix+`the Kubernetes API server does not let meshca review tokens (its service account needs create on tokenreviews.authentication.k8s.io): `+
		`tokenreviews.authentication.k8s.io is forbidden: User "system:serviceaccount:`+ns+`:meshca" cannot create resource "tokenreviews" in API group "authentication.k8s.io" at the cluster scope`)

	name := ns + "-tokenreview"
	_, err = c.Client.RbacV1().ClusterRoles().Create(t.Context(), &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Rules:      []rbacv1.PolicyRule{{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}}},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = c.Client.RbacV1().ClusterRoleBindings().Create(t.Context(), &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: name},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: ns, Name: "meshca"}},
	}, metav1.CreateOptions{})
	require.NoError(t, err)

	// The authorizer's informers see the binding a moment later.
	require.EventuallyWithT(t, func(collect *assert.CollectT) {
		caller, err := a.Authenticate(t.Context(), identity.Credential{Token: workload})
		if assert.NoError(collect, err) {
			assert.Equal(collect, spiffeid.RequireFromPath(td, "/ns/"+ns+"/sa/workload"), caller.ID)
		}
	}, 10*time.Second, 50*time.Millisecond)
}

// signToken signs claims as the API server signs service-account tokens
// (ES256, its key ID), with key.
func signToken(t *testing.T, key *ecdsa.PrivateKey, claims map[string]any) string {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(key.Public())
	require.NoError(t, err)
	kid := sha256.Sum256(der)
	header, err := json.Marshal(map[string]string{"alg": "ES256", "kid": b64(kid[:])})
	require.NoError(t, err)
	payload, err := json.Marshal(claims)
	require.NoError(t, err)
	signing := b64(header) + "." + b64(payload)
	digest := sha256.Sum256([]byte(signing))
	r, s, err := ecdsa.Sign(rand.Reader, key, digest[:])
	require.NoError(t, err)
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return signing + "." + b64(sig)
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	return key
}

// TestKubernetesCredentialAudiences: against a real API server, a token
// is reviewed for the audiences of the credential, so a token minted for
// Linkerd's API is refused by the native one and the other way round.
func TestKubernetesCredentialAudiences(t *testing.T) {
	c := kube.Cluster(t)
	ns := c.CreateNamespace(t, "audiences-").Name
	c.CreateServiceAccount(t, ns, "web")
	a, err := tokenreview.New(c.Client.AuthenticationV1(), tokenreview.Options{TrustDomain: td, Audiences: meshca})
	require.NoError(t, err)
	linkerd := []string{"identity.l5d.io"}
	webID := spiffeid.RequireFromPath(td, "/ns/"+ns+"/sa/web")

	l5d := c.Token(t, ns, "web", linkerd, 10*time.Minute)
	caller, err := a.Authenticate(t.Context(), identity.Credential{Token: l5d, Audiences: linkerd})
	require.NoError(t, err)
	require.Equal(t, webID, caller.ID)
	_, err = a.Authenticate(t.Context(), identity.Credential{Token: l5d})
	require.EqualError(t, err, refusedFor+`[invalid bearer token, token audiences ["identity.l5d.io"] is invalid for the target audiences ["meshca"]]`)

	native := c.Token(t, ns, "web", meshca, 10*time.Minute)
	_, err = a.Authenticate(t.Context(), identity.Credential{Token: native})
	require.NoError(t, err)
	_, err = a.Authenticate(t.Context(), identity.Credential{Token: native, Audiences: linkerd})
	var ae *identity.AuthError
	require.ErrorAs(t, err, &ae)
	require.Equal(t, identity.ReasonUnknownToken, ae.Reason)
	require.EqualError(t, err, errPrefix+`service-account token refused by the API server for audiences ["identity.l5d.io"]: [invalid bearer token, token audiences ["meshca"] is invalid for the target audiences ["identity.l5d.io"]]`)
}
