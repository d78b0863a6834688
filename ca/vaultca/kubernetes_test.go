package vaultca_test

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/vaultca"
	"github.com/meshca/meshca/internal/kubetest"
	"github.com/meshca/meshca/internal/testlog"
)

// The server logs in with Vault's Kubernetes auth method, which reviews
// its service-account token with a real kube-apiserver; when Vault
// refuses the token it got, it logs in again.
func TestKubernetesAuth(t *testing.T) {
	s := vault.Server(t)
	p := newPKI(t, s)
	kube := kubetest.Start(t)
	ns := kube.CreateNamespace(t, "vault-").Name
	kube.CreateServiceAccount(t, ns, "meshca")
	kube.CreateServiceAccount(t, ns, "intruder")
	// Vault reviews tokens as vault-auth, which may do so.
	kube.CreateServiceAccount(t, ns, "vault-auth")
	_, err := kube.Client.RbacV1().ClusterRoleBindings().Create(t.Context(), &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "vault-auth-" + ns},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "system:auth-delegator"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: ns, Name: "vault-auth"}},
	}, metav1.CreateOptions{})
	require.NoError(t, err)

	authMount := "kubernetes-" + p.mount
	s.Write(t, "sys/auth/"+authMount, map[string]any{"type": "kubernetes"})
	s.Write(t, "auth/"+authMount+"/config", map[string]any{
		"kubernetes_host":      kube.Config.Host,
		"kubernetes_ca_cert":   string(kube.Config.CAData),
		"token_reviewer_jwt":   kube.Token(t, ns, "vault-auth", nil, time.Hour),
		"disable_local_ca_jwt": true,
	})
	s.Write(t, "auth/"+authMount+"/role/meshca", map[string]any{
		"bound_service_account_names":      []string{"meshca"},
		"bound_service_account_namespaces": []string{ns},
		"audience":                         "vault",
		"token_policies":                   []string{"meshca-" + p.mount},
		"token_ttl":                        "1h",
	})

	jwtFile := func(t *testing.T, sa string) string {
		path := filepath.Join(t.TempDir(), "token")
		require.NoError(t, os.WriteFile(path, []byte(kube.Token(t, ns, sa, []string{"vault"}, time.Hour)), 0o600))
		return path
	}
	logs := &testlog.Buffer{}
	up := p.upstream(t, func(c *vaultca.Config) {
		c.Auth = vaultca.Auth{Kubernetes: &vaultca.KubernetesAuth{Role: "meshca", Mount: authMount, TokenFile: jwtFile(t, "meshca")}}
		c.Logger = slog.New(slog.NewTextHandler(logs, nil))
	})
	intermediate(t, up)
	require.Equal(t, 1, strings.Count(logs.String(), `msg="logged in to Vault" method=kubernetes mount=`+authMount+` role=meshca token_ttl=1h0m0s`))

	// Every token of the login revoked: Vault refuses the one held, and
	// the server logs in again.
	s.Write(t, "sys/leases/revoke-prefix/auth/"+authMount+"/login", nil)
	intermediate(t, up)
	require.Equal(t, 2, strings.Count(logs.String(), `msg="logged in to Vault"`))

	t.Run("a service account the role does not bind", func(t *testing.T) {
		path := jwtFile(t, "intruder")
		jwt, err := os.ReadFile(path)
		require.NoError(t, err)
		up := p.upstream(t, func(c *vaultca.Config) {
			c.Auth = vaultca.Auth{Kubernetes: &vaultca.KubernetesAuth{Role: "meshca", Mount: authMount, TokenFile: path}}
		})
		_, err = up.Roots(context.Background())
		require.ErrorIs(t, err, ca.ErrUpstreamDenied)
		require.ErrorContains(t, err, `vaultca: logging in to Vault (auth/`+authMount+`, role "meshca"): Vault at `+s.Addr+` denied it (HTTP 403: `)
		require.NotContains(t, err.Error(), string(jwt))
	})
}
