package kubestore_test

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/kubestore"
)

func TestNew(t *testing.T) {
	client := fake.NewClientset().CoreV1()
	tests := []struct {
		name string
		opts kubestore.Options
		err  string
	}{
		{name: "no client", opts: kubestore.Options{Namespace: namespace}, err: "kubestore: a Secrets client is required"},
		{name: "no namespace", opts: kubestore.Options{Client: client}, err: "kubestore: a namespace is required"},
		{name: "default name", opts: kubestore.Options{Client: client, Namespace: namespace}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			store, err := kubestore.New(tt.opts)
			if tt.err != "" {
				require.EqualError(t, err, tt.err)
				require.Nil(t, store)
				return
			}
			require.NoError(t, err)
			require.NotNil(t, store)
		})
	}
}

func TestSaveAndLoad(t *testing.T) {
	ctx := context.Background()
	client := newClient(t)
	store := newStore(t, client, nil)

	_, err := store.Load(ctx)
	require.ErrorIs(t, err, ca.ErrNotFound)

	set := newSet(t)
	require.NoError(t, store.Save(ctx, set))

	secret := getSecret(t, client)
	require.Equal(t, corev1.SecretTypeOpaque, secret.Type)
	require.Equal(t, map[string]string{"app.kubernetes.io/name": "meshca"}, secret.Labels)
	require.Equal(t, []string{kubestore.DataKey}, mapKeys(secret.Data))
	require.Equal(t, string(encode(t, set)), string(secret.Data[kubestore.DataKey]))

	got, err := store.Load(ctx)
	require.NoError(t, err)
	requireSameSet(t, set, got)

	// A second save updates over the version the first one wrote.
	next := withPreparedRoot(t, set)
	require.NoError(t, store.Save(ctx, next))
	got, err = newStore(t, client, nil).Load(ctx)
	require.NoError(t, err)
	requireSameSet(t, next, got)
}

func TestLoadSecretCreatedEmpty(t *testing.T) {
	// A deployment may create the Secret empty, so that RBAC can name it;
	// it holds no authorities yet, and the first save updates it, keeping
	// what the deployment set.
	ctx := context.Background()
	client := newClient(t)
	_, err := client.CoreV1().Secrets(namespace).Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{
			Name: secretName, Namespace: namespace,
			Labels:      map[string]string{"helm.sh/chart": "meshca"},
			Annotations: map[string]string{"note": "kept"},
		},
		Type: corev1.SecretTypeOpaque,
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	store := newStore(t, client, nil)

	_, err = store.Load(ctx)
	require.ErrorIs(t, err, ca.ErrNotFound)

	set := newSet(t)
	require.NoError(t, store.Save(ctx, set))
	secret := getSecret(t, client)
	require.Equal(t, map[string]string{"helm.sh/chart": "meshca", "app.kubernetes.io/name": "meshca"}, secret.Labels)
	require.Equal(t, map[string]string{"note": "kept"}, secret.Annotations)
	require.Equal(t, string(encode(t, set)), string(secret.Data[kubestore.DataKey]))
	require.Equal(t, []string{"create", "get", "update"}, verbs(client))
}

func TestSaveConflict(t *testing.T) {
	ctx := context.Background()
	client := newClient(t)
	set := newSet(t)
	require.NoError(t, newStore(t, client, nil).Save(ctx, set))

	a, b := newStore(t, client, nil), newStore(t, client, nil)
	_, err := a.Load(ctx)
	require.NoError(t, err)
	_, err = b.Load(ctx)
	require.NoError(t, err)

	rotatedByA := withNewIssuer(t, set)
	require.NoError(t, a.Save(ctx, rotatedByA))

	// B's change was made from the set before A's: it must not land.
	err = b.Save(ctx, withPreparedRoot(t, set))
	require.ErrorIs(t, err, kubestore.ErrConflict)
	require.ErrorIs(t, err, ca.ErrConflict, "rotation.Manager knows only ca.ErrConflict")
	require.True(t, apierrors.IsConflict(err), "the API error stays reachable")
	require.EqualError(t, err, `kubestore: someone else changed the authorities; reload: `+
		`Secret meshca/authorities changed after resourceVersion 101: `+
		`Operation cannot be fulfilled on secrets "authorities": the object has been modified; please apply your changes to the latest version and try again`)
	stored, err := newStore(t, client, nil).Load(ctx)
	require.NoError(t, err)
	requireSameSet(t, rotatedByA, stored)

	// Reloaded, B sees A's change and saves over it.
	got, err := b.Load(ctx)
	require.NoError(t, err)
	requireSameSet(t, rotatedByA, got)
	next := withPreparedRoot(t, got)
	require.NoError(t, b.Save(ctx, next))

	// And now A is the stale one.
	require.ErrorIs(t, a.Save(ctx, withNewIssuer(t, rotatedByA)), kubestore.ErrConflict)
}

func TestSaveAfterDelete(t *testing.T) {
	ctx := context.Background()
	client := newClient(t)
	store := newStore(t, client, nil)
	set := newSet(t)
	require.NoError(t, store.Save(ctx, set))
	require.NoError(t, client.CoreV1().Secrets(namespace).Delete(ctx, secretName, metav1.DeleteOptions{}))

	err := store.Save(ctx, withNewIssuer(t, set))
	require.ErrorIs(t, err, kubestore.ErrConflict)
	require.ErrorContains(t, err, "Secret meshca/authorities was deleted")
}

// TestRestore: Restore writes the set back when the Secret is gone or
// holds no authorities, and leaves stored authorities alone.
func TestRestore(t *testing.T) {
	ctx := context.Background()
	client := newClient(t)
	store := newStore(t, client, nil)
	set := newSet(t)
	require.NoError(t, store.Save(ctx, set))

	restored, err := store.Restore(ctx, withNewIssuer(t, set))
	require.NoError(t, err)
	require.False(t, restored, "stored authorities are never overwritten")
	got, err := newStore(t, client, nil).Load(ctx)
	require.NoError(t, err)
	requireSameSet(t, set, got)

	require.NoError(t, client.CoreV1().Secrets(namespace).Delete(ctx, secretName, metav1.DeleteOptions{}))
	restored, err = store.Restore(ctx, set)
	require.NoError(t, err)
	require.True(t, restored)
	got, err = newStore(t, client, nil).Load(ctx)
	require.NoError(t, err)
	requireSameSet(t, set, got)
	// The store knows the restored version: its next save lands.
	require.NoError(t, store.Save(ctx, withNewIssuer(t, set)))

	// Deleted again, and saved by another writer (a rotation step) before
	// the restore: the restore leaves the newer set alone.
	require.NoError(t, client.CoreV1().Secrets(namespace).Delete(ctx, secretName, metav1.DeleteOptions{}))
	newer := withNewIssuer(t, set)
	require.NoError(t, newStore(t, client, nil).Save(ctx, newer))
	restored, err = store.Restore(ctx, set)
	require.NoError(t, err)
	require.False(t, restored)
	got, err = newStore(t, client, nil).Load(ctx)
	require.NoError(t, err)
	requireSameSet(t, newer, got)

	// A Secret emptied of its authorities is written too, keeping its
	// other keys.
	secret := getSecret(t, client)
	secret.Data = map[string][]byte{"other": []byte("kept")}
	_, err = client.CoreV1().Secrets(namespace).Update(ctx, secret, metav1.UpdateOptions{})
	require.NoError(t, err)
	restored, err = store.Restore(ctx, set)
	require.NoError(t, err)
	require.True(t, restored)
	require.Equal(t, "kept", string(getSecret(t, client).Data["other"]))
	got, err = newStore(t, client, nil).Load(ctx)
	require.NoError(t, err)
	requireSameSet(t, set, got)
}

func TestCreateRace(t *testing.T) {
	// Two replicas start together and find no authorities: both make a
	// root, one creates the Secret, the other must use that root.
	ctx := context.Background()
	client := newClient(t)
	a, b := newStore(t, client, nil), newStore(t, client, nil)
	_, err := a.Load(ctx)
	require.ErrorIs(t, err, ca.ErrNotFound)
	_, err = b.Load(ctx)
	require.ErrorIs(t, err, ca.ErrNotFound)

	winner := newSet(t)
	require.NoError(t, a.Save(ctx, winner))
	err = b.Save(ctx, newSet(t))
	require.ErrorIs(t, err, kubestore.ErrConflict)
	require.True(t, apierrors.IsAlreadyExists(err))
	require.EqualError(t, err, `kubestore: someone else changed the authorities; reload: `+
		`Secret meshca/authorities was created by another writer: secrets "authorities" already exists`)

	got, err := b.Load(ctx)
	require.NoError(t, err)
	requireSameSet(t, winner, got)
}

func TestLoadOrCreateRace(t *testing.T) {
	ctx := context.Background()
	client := newClient(t)
	const replicas = 8
	sets := make([]*ca.AuthoritySet, replicas)
	var wg sync.WaitGroup
	for i := range replicas {
		wg.Go(func() {
			set, err := kubestore.LoadOrCreate(ctx, newStore(t, client, nil), ca.AuthorityOptions{TrustDomain: td})
			if err != nil {
				t.Errorf("replica %d: %v", i, err)
				return
			}
			sets[i] = set
		})
	}
	wg.Wait()
	stored, err := newStore(t, client, nil).Load(ctx)
	require.NoError(t, err)
	for i, set := range sets {
		require.NotNil(t, set, "replica %d", i)
		requireSameSet(t, stored, set)
	}
	require.Zero(t, count(client, "update"), "the first root stored was never overwritten")
}

func TestLoadOrCreateGivesUp(t *testing.T) {
	// A store that always conflicts: LoadOrCreate stops after a few tries.
	client := newClient(t)
	client.PrependReactor("create", "secrets", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewAlreadyExists(schema.GroupResource{Resource: "secrets"}, secretName)
	})
	_, err := kubestore.LoadOrCreate(context.Background(), newStore(t, client, nil), ca.AuthorityOptions{TrustDomain: td})
	require.ErrorIs(t, err, kubestore.ErrConflict)
	require.ErrorContains(t, err, "kubestore: authorities changed by another writer at each of 3 attempts: ")
	require.Equal(t, 3, count(client, "create"))
}

func TestLoadErrors(t *testing.T) {
	badKey := withIssuerKey(t, newSet(t), "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSECRETSECRET\n-----END PRIVATE KEY-----\n")
	tests := []struct {
		name    string
		data    []byte
		react   error
		err     string
		errorIs func(error) bool
	}{
		{
			name: "not JSON",
			data: []byte("SECRETSECRET"),
			err:  "kubestore: Secret meshca/authorities key authorities.json: ca: decoding stored authority set: invalid character 'S' looking for beginning of value",
		},
		{
			name: "bad key",
			data: badKey,
			err:  "kubestore: Secret meshca/authorities key authorities.json: ca: stored issuer: private key does not parse",
		},
		{
			name: "other version",
			data: []byte(`{"version":2}`),
			err:  "kubestore: Secret meshca/authorities key authorities.json: ca: stored authority set has version 2; this build reads version 1",
		},
		{
			name:    "API error",
			react:   apierrors.NewForbidden(schema.GroupResource{Resource: "secrets"}, secretName, errors.New("no RBAC")),
			err:     `kubestore: reading Secret meshca/authorities: secrets "authorities" is forbidden: no RBAC`,
			errorIs: apierrors.IsForbidden,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			client := newClient(t, &corev1.Secret{
				ObjectMeta: metav1.ObjectMeta{Name: secretName, Namespace: namespace},
				Data:       map[string][]byte{kubestore.DataKey: tt.data},
			})
			if tt.react != nil {
				client.PrependReactor("get", "secrets", func(k8stesting.Action) (bool, runtime.Object, error) {
					return true, nil, tt.react
				})
			}
			store := newStore(t, client, nil)
			_, err := store.Load(context.Background())
			require.EqualError(t, err, tt.err)
			require.NotContains(t, err.Error(), "SECRET")
			if tt.errorIs != nil {
				require.True(t, tt.errorIs(err))
			}
			// What could not be read is never overwritten.
			require.ErrorIs(t, store.Save(context.Background(), newSet(t)), kubestore.ErrConflict)
		})
	}
}

func mapKeys[V any](m map[string]V) []string {
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	return keys
}

func verbs(client *fake.Clientset) []string {
	var out []string
	for _, a := range client.Actions() {
		if a.GetResource().Resource == "secrets" {
			out = append(out, a.GetVerb())
		}
	}
	return out
}

func count(client *fake.Clientset, verb string) int {
	n := 0
	for _, v := range verbs(client) {
		if v == verb {
			n++
		}
	}
	return n
}

// withIssuerKey is set's encoding with keyPEM as the issuer's key.
func withIssuerKey(t *testing.T, set *ca.AuthoritySet, keyPEM string) []byte {
	t.Helper()
	var st map[string]any
	require.NoError(t, json.Unmarshal(encode(t, set), &st))
	st["issuer"].(map[string]any)["privateKey"] = keyPEM
	data, err := json.Marshal(st)
	require.NoError(t, err)
	return data
}
