package kubestore_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/kubestore"
)

// wait bounds every wait for an event, so that a broken watch fails the
// test instead of hanging it.
const wait = 10 * time.Second

// watch runs store.Watch until the test ends, sending each set it reports.
func watch(t *testing.T, store *kubestore.Store) <-chan *ca.AuthoritySet {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	sets := make(chan *ca.AuthoritySet, 16)
	done := make(chan error)
	go func() { done <- store.Watch(ctx, func(set *ca.AuthoritySet) { sets <- set }) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(wait):
			t.Error("Watch did not return after its ctx was done")
		}
	})
	return sets
}

func next(t *testing.T, sets <-chan *ca.AuthoritySet) *ca.AuthoritySet {
	t.Helper()
	select {
	case set := <-sets:
		return set
	case <-time.After(wait):
		t.Fatal("Watch reported no change")
		return nil
	}
}

// writeData replaces the Secret's data as a third party would.
func writeData(t *testing.T, client *fake.Clientset, data []byte) {
	t.Helper()
	secret := getSecret(t, client).DeepCopy()
	secret.Data[kubestore.DataKey] = data
	_, err := client.CoreV1().Secrets(namespace).Update(context.Background(), secret, metav1.UpdateOptions{})
	require.NoError(t, err)
}

func TestWatch(t *testing.T) {
	ctx := context.Background()
	client := newClient(t)
	logger, logs := newLogger()
	writer := newStore(t, client, nil)
	set1 := newSet(t)
	require.NoError(t, writer.Save(ctx, set1))

	watcher := newStore(t, client, logger)
	_, err := watcher.Load(ctx)
	require.NoError(t, err)
	sets := watch(t, watcher)

	// Another writer's change is reported; the version the watcher loaded
	// is not.
	set2 := withNewIssuer(t, set1)
	require.NoError(t, writer.Save(ctx, set2))
	requireSameSet(t, set2, next(t, sets))

	// Data that does not decode is logged and skipped.
	writeData(t, client, []byte(`{"version":1,"trustDomain":"example.org","issuer":{"privateKey":"SECRET"}}`))
	set3 := withPreparedRoot(t, set2)
	writeData(t, client, encode(t, set3))
	requireSameSet(t, set3, next(t, sets))
	require.Contains(t, logs.String(), `level=ERROR msg="skipping stored authorities that do not decode" secret=meshca/authorities`)
	require.Contains(t, logs.String(), `error="ca: stored issuer: pemutil: no PEM certificate found"`)
	require.NotContains(t, logs.String(), "SECRET")

	// The watcher's own save is not reported back to it.
	_, err = watcher.Load(ctx)
	require.NoError(t, err)
	require.NoError(t, watcher.Save(ctx, withNewIssuer(t, set3)))
	got, err := writer.Load(ctx)
	require.NoError(t, err)
	set5 := withPreparedRoot(t, got)
	require.NoError(t, writer.Save(ctx, set5))
	requireSameSet(t, set5, next(t, sets))

	// A deleted Secret is logged and signalled on Deleted; no set is
	// reported.
	select {
	case <-watcher.Deleted():
		t.Fatal("Deleted signalled before any deletion")
	default:
	}
	require.NoError(t, client.CoreV1().Secrets(namespace).Delete(ctx, secretName, metav1.DeleteOptions{}))
	requireLogged(t, logs, `level=WARN msg="authorities Secret was deleted; the authorities in memory stay in use, and the leader writes them back"`)
	select {
	case <-watcher.Deleted():
	case <-time.After(10 * time.Second):
		t.Fatal("the deletion was not signalled on Deleted")
	}
	select {
	case set := <-sets:
		t.Fatalf("a set was reported after the delete: sequence %d", set.Sequence)
	default:
	}
}

func TestWatchReportsStoredSetFirst(t *testing.T) {
	// A Store that has loaded nothing hears of the stored set at once.
	client := newClient(t)
	set := newSet(t)
	require.NoError(t, newStore(t, client, nil).Save(context.Background(), set))
	requireSameSet(t, set, next(t, watch(t, newStore(t, client, nil))))
}

func TestWatchIgnoresOtherSecrets(t *testing.T) {
	// The fake ignores field selectors; the watcher must not.
	ctx := context.Background()
	client := newClient(t)
	other := newSet(t)
	otherStore, err := kubestore.New(kubestore.Options{Client: noWatchList{client.CoreV1()}, Namespace: namespace, Name: "other"})
	require.NoError(t, err)
	require.NoError(t, otherStore.Save(ctx, other))

	sets := watch(t, newStore(t, client, nil))
	set := newSet(t)
	require.NoError(t, newStore(t, client, nil).Save(ctx, set))
	requireSameSet(t, set, next(t, sets))
}
