package kubestore_test

import (
	"errors"
	"log/slog"
	"strconv"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	k8stesting "k8s.io/client-go/testing"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/kubestore"
	"github.com/meshca/meshca/internal/testlog"
)

const (
	namespace  = "meshca"
	secretName = "authorities"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

// newClient returns a fake clientset that keeps resourceVersions as an API
// server does: every create and update gives the object a new one, and an
// update from another resourceVersion is a Conflict. (The fake alone
// accepts any update.)
func newClient(t *testing.T, objects ...runtime.Object) *fake.Clientset {
	t.Helper()
	client := fake.NewClientset(objects...)
	var last int64 = 100 // reactors run under the Fake's lock
	next := func() string {
		last++
		return strconv.FormatInt(last, 10)
	}
	client.PrependReactor("create", "*", func(action k8stesting.Action) (bool, runtime.Object, error) {
		obj := action.(k8stesting.CreateAction).GetObject()
		m := obj.(interface{ SetResourceVersion(string) })
		m.SetResourceVersion(next())
		return false, nil, nil
	})
	client.PrependReactor("update", "*", func(action k8stesting.Action) (bool, runtime.Object, error) {
		update := action.(k8stesting.UpdateAction)
		obj := update.GetObject().(interface {
			GetName() string
			GetResourceVersion() string
			SetResourceVersion(string)
		})
		stored, err := client.Tracker().Get(update.GetResource(), update.GetNamespace(), obj.GetName())
		if err != nil {
			return false, nil, nil // the tracker answers NotFound
		}
		if stored.(interface{ GetResourceVersion() string }).GetResourceVersion() != obj.GetResourceVersion() {
			gr := schema.GroupResource{Group: update.GetResource().Group, Resource: update.GetResource().Resource}
			return true, nil, apierrors.NewConflict(gr, obj.GetName(), errors.New("the object has been modified; please apply your changes to the latest version and try again"))
		}
		obj.SetResourceVersion(next())
		return false, nil, nil
	})
	return client
}

// noWatchList is a Secrets client that asks informers for list and watch
// rather than the streaming watch-list, which the fake does not serve.
type noWatchList struct{ corev1client.SecretsGetter }

func (noWatchList) IsWatchListSemanticsUnSupported() bool { return true }

func newStore(t *testing.T, client *fake.Clientset, logger *slog.Logger) *kubestore.Store {
	t.Helper()
	store, err := kubestore.New(kubestore.Options{
		Client:    noWatchList{client.CoreV1()},
		Namespace: namespace,
		Name:      secretName,
		Logger:    logger,
	})
	require.NoError(t, err)
	return store
}

func getSecret(t *testing.T, client *fake.Clientset) *corev1.Secret {
	t.Helper()
	obj, err := client.Tracker().Get(corev1.SchemeGroupVersion.WithResource("secrets"), namespace, secretName)
	require.NoError(t, err)
	return obj.(*corev1.Secret)
}

func newSet(t *testing.T) *ca.AuthoritySet {
	t.Helper()
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: td, RootTTL: 48 * time.Hour, IntermediateTTL: 24 * time.Hour})
	require.NoError(t, err)
	return set
}

// withNewIssuer is set after an intermediate rotation: same roots, same
// sequence, a new issuer.
func withNewIssuer(t *testing.T, set *ca.AuthoritySet) *ca.AuthoritySet {
	t.Helper()
	root, ok := set.ActiveRoot()
	require.True(t, ok)
	issuer, err := ca.NewIntermediate(ca.AuthorityOptions{TrustDomain: td, IntermediateTTL: 24 * time.Hour}, root.Authority)
	require.NoError(t, err)
	n := set.Clone()
	n.Issuer, n.IssuerSince, n.NextIssuer = issuer, time.Now(), nil
	return n
}

// withPreparedRoot is set after a root is prepared: one more root in the
// bundle, the next sequence.
func withPreparedRoot(t *testing.T, set *ca.AuthoritySet) *ca.AuthoritySet {
	t.Helper()
	root, err := ca.NewRoot(ca.AuthorityOptions{TrustDomain: td, RootTTL: 48 * time.Hour})
	require.NoError(t, err)
	n := set.Clone()
	n.Sequence++
	n.Roots = append(n.Roots, ca.Root{Authority: root, State: ca.RootPrepared, Since: time.Now(), BundleSequence: n.Sequence})
	return n
}

func encode(t *testing.T, set *ca.AuthoritySet) []byte {
	t.Helper()
	data, err := ca.MarshalAuthoritySet(set)
	require.NoError(t, err)
	return data
}

// requireSameSet fails unless want and got encode the same, keys included.
func requireSameSet(t *testing.T, want, got *ca.AuthoritySet) {
	t.Helper()
	require.NotNil(t, got)
	require.Equal(t, string(encode(t, want)), string(encode(t, got)))
}

func newLogger() (*slog.Logger, *testlog.Buffer) {
	buf := &testlog.Buffer{}
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug})), buf
}
