package bundlepublish_test

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshca/meshca/identity/bundlepublish"
	"github.com/meshca/meshca/internal/kubetest"
	"github.com/meshca/meshca/testca"
)

var kube kubetest.Shared

func TestMain(m *testing.M) { kube.Run(m) }

// apiWait bounds how long a change takes to reach the API server: seconds
// in practice, more on a loaded CI machine.
const apiWait = 30 * time.Second

// TestAgainstAPIServer runs a publisher against a real kube-apiserver, as
// a service account holding only the permissions publisherRules grants.
func TestAgainstAPIServer(t *testing.T) {
	c := kube.Cluster(t)
	admin := c.Client
	const cmName = "meshca-trust-bundle-it"

	existing := c.CreateNamespace(t, "bp-existing-").Name
	doomed := c.CreateNamespace(t, "bp-doomed-").Name
	optedOut := createNamespace(t, admin, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
		GenerateName: "bp-opted-out-",
		Labels:       map[string]string{bundlepublish.DefaultOptOutLabel: "false"},
	}})
	theirs := c.CreateNamespace(t, "bp-theirs-").Name
	userCM := foreignConfigMap(theirs)
	userCM.Name = cmName
	_, err := admin.CoreV1().ConfigMaps(theirs).Create(t.Context(), userCM, metav1.CreateOptions{})
	require.NoError(t, err)

	client := serviceAccountClient(t, c, cmName)
	// The rules are least privilege: other ConfigMaps stay out of reach.
	_, err = client.CoreV1().ConfigMaps("").List(t.Context(), metav1.ListOptions{})
	require.True(t, apierrors.IsForbidden(err), "listing every configmap: %v", err)
	_, err = client.CoreV1().ConfigMaps(theirs).Update(t.Context(), &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "other", Namespace: theirs},
	}, metav1.UpdateOptions{})
	require.True(t, apierrors.IsForbidden(err), "updating another configmap: %v", err)
	authority := newCA(t)
	reg := prometheus.NewRegistry()
	startPublisher(t, bundlepublish.Options{Client: client, Source: authority, ConfigMapName: cmName, Registerer: reg})

	// Every namespace, the API server's own included, gets the bundle;
	// an opted-out namespace and a user's ConfigMap of the name are left
	// alone.
	nss, err := admin.CoreV1().Namespaces().List(t.Context(), metav1.ListOptions{})
	require.NoError(t, err)
	require.GreaterOrEqual(t, len(nss.Items), 8, "default, kube-system, kube-public, kube-node-lease and the test's")
	for _, ns := range nss.Items {
		if ns.Name == optedOut || ns.Name == theirs {
			continue
		}
		cm := waitForSequenceNamed(t, admin, ns.Name, cmName, 1, apiWait)
		requireBundle(t, cm, authority, 1, bundlepublish.DefaultRefreshHint)
	}
	require.Eventually(t, func() bool { return counter(t, reg, "not_ours") >= 1 && counter(t, reg, "skipped") >= 1 }, apiWait, tick)
	_, err = admin.CoreV1().ConfigMaps(optedOut).Get(t.Context(), cmName, metav1.GetOptions{})
	require.True(t, apierrors.IsNotFound(err), "opted-out namespace has a configmap: %v", err)
	requireUntouched(t, admin, userCM)

	// A namespace created later gets it.
	later := c.CreateNamespace(t, "bp-later-").Name
	waitForSequenceNamed(t, admin, later, cmName, 1, apiWait)

	// A deleted ConfigMap comes back.
	old := waitForSequenceNamed(t, admin, existing, cmName, 1, apiWait)
	require.NoError(t, admin.CoreV1().ConfigMaps(existing).Delete(t.Context(), cmName, metav1.DeleteOptions{}))
	require.Eventually(t, func() bool {
		cm, err := admin.CoreV1().ConfigMaps(existing).Get(t.Context(), cmName, metav1.GetOptions{})
		return err == nil && cm.UID != old.UID
	}, apiWait, tick, "the deleted configmap was not recreated")

	// A namespace being deleted (it stays Terminating: no controller
	// manager runs) is skipped without errors.
	require.NoError(t, admin.CoreV1().Namespaces().Delete(t.Context(), doomed, metav1.DeleteOptions{}))

	// A new root, prepared for rotation, reaches every namespace.
	newRoot := prepareRoot(t, authority)
	for _, ns := range nss.Items {
		if ns.Name == optedOut || ns.Name == theirs || ns.Name == doomed {
			continue
		}
		cm := waitForSequenceNamed(t, admin, ns.Name, cmName, 2, apiWait)
		requireBundle(t, cm, authority, 2, bundlepublish.DefaultRefreshHint)
		b, err := x509bundle.Parse(td, []byte(cm.Data[bundlepublish.KeyPEM]))
		require.NoError(t, err)
		require.True(t, b.HasX509Authority(newRoot), "namespace %s lacks the prepared root", ns.Name)
	}
	waitForSequenceNamed(t, admin, later, cmName, 2, apiWait)
	requireUntouched(t, admin, userCM)
	require.Zero(t, counter(t, reg, "error"), "the service account's permissions were not enough, or a write failed")
}

// publisherRules are the least permissions the publisher needs, to be
// granted cluster-wide: list and watch namespaces; create ConfigMaps (a
// create cannot be limited by name); and list, watch, update and delete
// ConfigMaps of its name only (list and watch carry a metadata.name field
// selector, which RBAC checks against resourceNames).
func publisherRules(cmName string) []rbacv1.PolicyRule {
	return []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"namespaces"}, Verbs: []string{"list", "watch"}},
		{APIGroups: []string{""}, Resources: []string{"configmaps"}, Verbs: []string{"create"}},
		{APIGroups: []string{""}, Resources: []string{"configmaps"}, ResourceNames: []string{cmName}, Verbs: []string{"list", "watch", "update", "delete"}},
	}
}

// serviceAccountClient returns a client authenticated as a new service
// account bound to publisherRules only.
func serviceAccountClient(t *testing.T, c *kubetest.Cluster, cmName string) kubernetes.Interface {
	t.Helper()
	ctx := t.Context()
	ns := c.CreateNamespace(t, "meshca-system-").Name
	c.CreateServiceAccount(t, ns, "meshca")
	role, err := c.Client.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "meshca-bundle-publisher-"},
		Rules:      publisherRules(cmName),
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = c.Client.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: role.Name},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role.Name},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: ns, Name: "meshca"}},
	}, metav1.CreateOptions{})
	require.NoError(t, err)

	cfg := rest.AnonymousClientConfig(c.Config)
	cfg.BearerToken = c.Token(t, ns, "meshca", c.APIAudiences, time.Hour)
	client, err := kubernetes.NewForConfig(cfg)
	require.NoError(t, err)
	return client
}

// requireUntouched checks that the user's ConfigMap want is as created.
func requireUntouched(t *testing.T, client kubernetes.Interface, want *corev1.ConfigMap) {
	t.Helper()
	got, err := client.CoreV1().ConfigMaps(want.Namespace).Get(t.Context(), want.Name, metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, want.Data, got.Data)
	require.Equal(t, want.Labels, got.Labels)
}

// TestFederatedAgainstAPIServer: against a real kube-apiserver, a peer's
// bundle appears in the ConfigMaps when the trust domain is federated with,
// and leaves them with its peer, as the publisher's service account with
// publisherRules only.
func TestFederatedAgainstAPIServer(t *testing.T) {
	c := kube.Cluster(t)
	admin := c.Client
	const cmName = "meshca-trust-bundle-fed"
	nsA := c.CreateNamespace(t, "bp-fed-a-").Name
	nsB := c.CreateNamespace(t, "bp-fed-b-").Name
	client := serviceAccountClient(t, c, cmName)
	authority := newCA(t)
	fed := newFederator(t)
	reg := prometheus.NewRegistry()
	startPublisher(t, bundlepublish.Options{Client: client, Source: authority, Federated: fed, ConfigMapName: cmName, Registerer: reg})
	for _, ns := range []string{nsA, nsB} {
		cm := waitForSequenceNamed(t, admin, ns, cmName, 1, apiWait)
		require.Len(t, cm.Data, 4, "no federated bundle yet")
	}

	peerBundle := addPeer(t, fed, peerTD, testca.New(t, peerTD).Cert, 5)
	for _, ns := range []string{nsA, nsB} {
		cm := waitForKeyNamed(t, admin, ns, cmName, bundlepublish.FederatedSPIFFEKey(peerTD), true)
		requireFederated(t, cm, peerBundle)
		requireBundleKeys(t, cm, authority)
	}

	require.NoError(t, fed.RemovePeer(t.Context(), peerTD))
	for _, ns := range []string{nsA, nsB} {
		cm := waitForKeyNamed(t, admin, ns, cmName, bundlepublish.FederatedSPIFFEKey(peerTD), false)
		require.Len(t, cm.Data, 4, "only the own bundle is left")
		requireBundleKeys(t, cm, authority)
	}
	require.Zero(t, counter(t, reg, "error"), "the service account's permissions were not enough, or a write failed")
}
