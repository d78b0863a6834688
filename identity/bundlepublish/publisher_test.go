package bundlepublish_test

import (
	"context"
	"crypto/x509"
	"log/slog"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity/bundlepublish"
	"github.com/meshca/meshca/testca"
)

var td = spiffeid.RequireTrustDomainFromString("mesh.example")

var _ bundlepublish.Source = (*ca.CA)(nil)

const (
	name = bundlepublish.DefaultConfigMapName
	tick = 5 * time.Millisecond
	wait = 5 * time.Second
)

func TestPublishesInExistingNamespaces(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(namespace("a", nil), namespace("b", nil))
	c := newCA(t)
	startPublisher(t, bundlepublish.Options{
		Client: client,
		Source: c,
		Labels: map[string]string{"app.kubernetes.io/part-of": "mesh"},
	})

	for _, ns := range []string{"a", "b"} {
		cm := waitForSequence(t, client, ns, 1)
		requireBundle(t, cm, c, 1, bundlepublish.DefaultRefreshHint)
		require.Equal(t, map[string]string{
			"app.kubernetes.io/managed-by": "meshca",
			"app.kubernetes.io/part-of":    "mesh",
		}, cm.Labels)
	}
}

func TestPublishesInNewNamespace(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(namespace("a", nil))
	c := newCA(t)
	startPublisher(t, bundlepublish.Options{Client: client, Source: c})
	waitForSequence(t, client, "a", 1)

	createNamespace(t, client, namespace("later", nil))
	cm := waitForSequence(t, client, "later", 1)
	requireBundle(t, cm, c, 1, bundlepublish.DefaultRefreshHint)
}

func TestRecreatesDeletedConfigMap(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(namespace("a", nil))
	c := newCA(t)
	startPublisher(t, bundlepublish.Options{Client: client, Source: c})
	waitForSequence(t, client, "a", 1)

	require.NoError(t, client.CoreV1().ConfigMaps("a").Delete(t.Context(), name, metav1.DeleteOptions{}))
	cm := waitForSequence(t, client, "a", 1)
	requireBundle(t, cm, c, 1, bundlepublish.DefaultRefreshHint)
}

func TestRestoresEditedConfigMap(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(namespace("a", nil))
	c := newCA(t)
	startPublisher(t, bundlepublish.Options{Client: client, Source: c})
	cm := waitForSequence(t, client, "a", 1).DeepCopy()

	cm.Data[bundlepublish.KeyPEM] = "tampered"
	cm.Data["extra"] = "x"
	_, err := client.CoreV1().ConfigMaps("a").Update(t.Context(), cm, metav1.UpdateOptions{})
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		got, err := client.CoreV1().ConfigMaps("a").Get(t.Context(), name, metav1.GetOptions{})
		return err == nil && got.Data[bundlepublish.KeyPEM] != "tampered" && got.Data["extra"] == ""
	}, wait, tick)
	got, err := client.CoreV1().ConfigMaps("a").Get(t.Context(), name, metav1.GetOptions{})
	require.NoError(t, err)
	requireBundle(t, got, c, 1, bundlepublish.DefaultRefreshHint)
}

func TestFollowsBundleChange(t *testing.T) {
	t.Parallel()
	namespaces := []string{"a", "b", "c"}
	client := fake.NewClientset(namespace("a", nil), namespace("b", nil), namespace("c", nil))
	c := newCA(t)
	reg := prometheus.NewRegistry()
	startPublisher(t, bundlepublish.Options{Client: client, Source: c, RefreshHint: 90 * time.Second, Registerer: reg})
	for _, ns := range namespaces {
		waitForSequence(t, client, ns, 1)
	}
	require.Eventually(t, func() bool { return gauge(t, reg, "current") == 3 }, wait, tick)

	newRoot := prepareRoot(t, c)
	for _, ns := range namespaces {
		cm := waitForSequence(t, client, ns, 2)
		requireBundle(t, cm, c, 2, 90*time.Second)
		b, err := x509bundle.Parse(td, []byte(cm.Data[bundlepublish.KeyPEM]))
		require.NoError(t, err)
		require.True(t, b.HasX509Authority(newRoot), "the prepared root is in the bundle")
		require.Len(t, b.X509Authorities(), 2)
	}
	require.Eventually(t, func() bool { return gauge(t, reg, "current") == 3 && gauge(t, reg, "pending") == 0 }, wait, tick)
}

func TestOptOut(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(namespace("out", map[string]string{bundlepublish.DefaultOptOutLabel: "false"}))
	reg := prometheus.NewRegistry()
	startPublisher(t, bundlepublish.Options{Client: client, Source: newCA(t), Registerer: reg})

	require.Eventually(t, func() bool { return counter(t, reg, "skipped") >= 1 }, wait, tick)
	require.False(t, exists(t, client, "out"))
	require.Equal(t, 1.0, gauge(t, reg, "opted_out"))

	// Opting in publishes.
	ns, err := client.CoreV1().Namespaces().Get(t.Context(), "out", metav1.GetOptions{})
	require.NoError(t, err)
	ns = ns.DeepCopy()
	ns.Labels[bundlepublish.DefaultOptOutLabel] = "true"
	_, err = client.CoreV1().Namespaces().Update(t.Context(), ns, metav1.UpdateOptions{})
	require.NoError(t, err)
	waitForSequence(t, client, "out", 1)

	// Opting out again removes it.
	ns.Labels[bundlepublish.DefaultOptOutLabel] = "false"
	_, err = client.CoreV1().Namespaces().Update(t.Context(), ns, metav1.UpdateOptions{})
	require.NoError(t, err)
	require.Eventually(t, func() bool { return !exists(t, client, "out") }, wait, tick)
}

func TestOptOutRemovesPublished(t *testing.T) {
	t.Parallel()
	optOut := map[string]string{bundlepublish.DefaultOptOutLabel: "false"}
	client := fake.NewClientset(namespace("had", optOut), publishedConfigMap("had", 1))
	reg := prometheus.NewRegistry()
	startPublisher(t, bundlepublish.Options{Client: client, Source: newCA(t), Registerer: reg})

	require.Eventually(t, func() bool { return !exists(t, client, "had") }, wait, tick)
	require.Eventually(t, func() bool { return counter(t, reg, "deleted") == 1 }, wait, tick)
}

func TestOptOutLeavesOthersConfigMap(t *testing.T) {
	t.Parallel()
	theirs := foreignConfigMap("out")
	client := fake.NewClientset(namespace("out", map[string]string{"example.com/no-bundle": "false"}), theirs)
	reg := prometheus.NewRegistry()
	startPublisher(t, bundlepublish.Options{Client: client, Source: newCA(t), Registerer: reg, OptOutLabel: "example.com/no-bundle"})

	require.Eventually(t, func() bool { return counter(t, reg, "skipped") >= 1 }, wait, tick)
	got, err := client.CoreV1().ConfigMaps("out").Get(t.Context(), name, metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, theirs.Data, got.Data)
}

func TestLeavesOthersConfigMap(t *testing.T) {
	t.Parallel()
	theirs := foreignConfigMap("a")
	client := fake.NewClientset(namespace("a", nil), namespace("b", nil), theirs)
	c := newCA(t)
	reg := prometheus.NewRegistry()
	startPublisher(t, bundlepublish.Options{Client: client, Source: c, Registerer: reg})

	waitForSequence(t, client, "b", 1)
	require.Eventually(t, func() bool { return counter(t, reg, "not_ours") >= 1 }, wait, tick)
	prepareRoot(t, c)
	waitForSequence(t, client, "b", 2)
	require.Eventually(t, func() bool { return counter(t, reg, "not_ours") >= 2 }, wait, tick)

	got, err := client.CoreV1().ConfigMaps("a").Get(t.Context(), name, metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, theirs.Data, got.Data)
	require.Equal(t, theirs.Labels, got.Labels)
	require.Eventually(t, func() bool { return gauge(t, reg, "pending") == 1 }, wait, tick)
}

func TestSkipsTerminatingNamespace(t *testing.T) {
	t.Parallel()
	ns := namespace("going", nil)
	ns.Status.Phase = corev1.NamespaceTerminating
	client := fake.NewClientset(ns)
	reg := prometheus.NewRegistry()
	startPublisher(t, bundlepublish.Options{Client: client, Source: newCA(t), Registerer: reg})

	require.Eventually(t, func() bool { return counter(t, reg, "skipped") >= 1 }, wait, tick)
	require.False(t, exists(t, client, "going"))
}

func TestDoesNotRollBack(t *testing.T) {
	t.Parallel()
	later := publishedConfigMap("a", 7)
	client := fake.NewClientset(namespace("a", nil), later)
	reg := prometheus.NewRegistry()
	startPublisher(t, bundlepublish.Options{Client: client, Source: newCA(t), Registerer: reg})

	require.Eventually(t, func() bool { return counter(t, reg, "newer_sequence") >= 1 }, wait, tick)
	got, err := client.CoreV1().ConfigMaps("a").Get(t.Context(), name, metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, later.Data, got.Data)
}

func TestReplacesImmutableConfigMap(t *testing.T) {
	t.Parallel()
	frozen := publishedConfigMap("a", 0)
	frozen.Immutable = new(true)
	client := fake.NewClientset(namespace("a", nil), frozen)
	c := newCA(t)
	startPublisher(t, bundlepublish.Options{Client: client, Source: c})

	cm := waitForSequence(t, client, "a", 1)
	require.Nil(t, cm.Immutable)
	requireBundle(t, cm, c, 1, bundlepublish.DefaultRefreshHint)
}

func TestResync(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(namespace("a", nil))
	reg := prometheus.NewRegistry()
	// Informers resync at most once a second.
	startPublisher(t, bundlepublish.Options{Client: client, Source: newCA(t), Registerer: reg, Resync: time.Second})

	waitForSequence(t, client, "a", 1)
	// The ConfigMap's add event makes one check; the next is a resync.
	require.Eventually(t, func() bool { return counter(t, reg, "unchanged") >= 2 }, wait, tick,
		"namespaces are not checked again with no event")
}

func TestRetriesConflict(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(namespace("a", nil))
	var conflicts atomic.Int32
	client.PrependReactor("update", "configmaps", func(k8stesting.Action) (bool, k8sruntime.Object, error) {
		if conflicts.Add(1) <= 2 {
			return true, nil, apierrors.NewConflict(schema.GroupResource{Resource: "configmaps"}, name, nil)
		}
		return false, nil, nil
	})
	c := newCA(t)
	reg := prometheus.NewRegistry()
	startPublisher(t, bundlepublish.Options{Client: client, Source: c, Registerer: reg})
	waitForSequence(t, client, "a", 1)

	prepareRoot(t, c)
	cm := waitForSequence(t, client, "a", 2)
	requireBundle(t, cm, c, 2, bundlepublish.DefaultRefreshHint)
	// Two conflicts forced, and maybe one more: a create the cache had
	// not seen yet.
	require.GreaterOrEqual(t, counter(t, reg, "conflict"), 2.0)
	require.Zero(t, counter(t, reg, "error"))
}

func TestRetriesErrors(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(namespace("a", nil))
	var failures atomic.Int32
	client.PrependReactor("create", "configmaps", func(k8stesting.Action) (bool, k8sruntime.Object, error) {
		if failures.Add(1) <= 2 {
			return true, nil, apierrors.NewServiceUnavailable("etcd is away")
		}
		return false, nil, nil
	})
	reg := prometheus.NewRegistry()
	startPublisher(t, bundlepublish.Options{Client: client, Source: newCA(t), Registerer: reg})

	waitForSequence(t, client, "a", 1)
	require.Eventually(t, func() bool { return counter(t, reg, "created") == 1 }, wait, tick)
	require.Equal(t, 2.0, counter(t, reg, "error"))
}

func TestStopsWhenContextCancelled(t *testing.T) {
	// Not parallel: it counts goroutines.
	client := fake.NewClientset(namespace("a", nil))
	c := newCA(t)
	reg := prometheus.NewRegistry()
	pub, err := bundlepublish.New(bundlepublish.Options{Client: client, Source: c, Registerer: reg})
	require.NoError(t, err)
	before := runtime.NumGoroutine()

	for i := range 2 { // a lost leadership, then leadership again
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- pub.Run(ctx) }()
		waitForSequence(t, client, "a", uint64(1+i))
		require.Eventually(t, func() bool { return gauge(t, reg, "current") == 1 }, wait, tick)
		require.EqualError(t, pub.Run(ctx), "bundlepublish: Run called while already running")

		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(wait):
			t.Fatal("Run did not return after its context was cancelled")
		}
		requireGoroutinesExit(t, before)

		// A stopped publisher reports nothing: another replica publishes.
		require.Equal(t, -1.0, gauge(t, reg, "current"))
		prepareRoot(t, c)
	}
}

func TestStopsBeforeCachesSync(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset()
	client.PrependReactor("list", "namespaces", func(k8stesting.Action) (bool, k8sruntime.Object, error) {
		return true, nil, apierrors.NewServiceUnavailable("not yet")
	})
	pub, err := bundlepublish.New(bundlepublish.Options{Client: client, Source: newCA(t)})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	require.NoError(t, pub.Run(ctx))
}

func TestNew(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset()
	src := newCA(t)
	tests := []struct {
		name string
		opts bundlepublish.Options
		err  string
	}{
		{
			name: "no client",
			opts: bundlepublish.Options{Source: src},
			err:  "bundlepublish: a Client and a Source are required",
		},
		{
			name: "no source",
			opts: bundlepublish.Options{Client: client},
			err:  "bundlepublish: a Client and a Source are required",
		},
		{
			name: "bad name",
			opts: bundlepublish.Options{Client: client, Source: src, ConfigMapName: "Trust_Bundle"},
			err:  `bundlepublish: ConfigMapName "Trust_Bundle" is not a valid object name: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')`,
		},
		{
			name: "bad opt-out label",
			opts: bundlepublish.Options{Client: client, Source: src, OptOutLabel: "no bundle"},
			err:  `bundlepublish: OptOutLabel "no bundle" is not a valid label key: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')`,
		},
		{
			name: "managed-by taken",
			opts: bundlepublish.Options{Client: client, Source: src, Labels: map[string]string{"app.kubernetes.io/managed-by": "helm"}},
			err:  `bundlepublish: label app.kubernetes.io/managed-by must be "meshca": it marks the ConfigMaps the publisher owns`,
		},
		{
			name: "bad label value",
			opts: bundlepublish.Options{Client: client, Source: src, Labels: map[string]string{"team": "a b"}},
			err:  `bundlepublish: label team="a b" has an invalid value: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')`,
		},
		{
			name: "negative refresh hint",
			opts: bundlepublish.Options{Client: client, Source: src, RefreshHint: -time.Second},
			err:  "bundlepublish: RefreshHint -1s is negative",
		},
		{
			name: "negative workers",
			opts: bundlepublish.Options{Client: client, Source: src, Workers: -1},
			err:  "bundlepublish: Workers -1 is negative",
		},
		{
			name: "metrics registered twice",
			opts: bundlepublish.Options{Client: client, Source: src, Registerer: registered(t, client, src)},
			err:  `bundlepublish: registering metrics: duplicate metrics collector registration attempted`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := bundlepublish.New(tt.opts)
			require.EqualError(t, err, tt.err)
		})
	}
}

// registered returns a registry that already holds a publisher's metrics.
func registered(t *testing.T, client kubernetes.Interface, src bundlepublish.Source) prometheus.Registerer {
	reg := prometheus.NewRegistry()
	_, err := bundlepublish.New(bundlepublish.Options{Client: client, Source: src, Registerer: reg})
	require.NoError(t, err)
	return reg
}

// startPublisher runs a publisher until the test ends, and checks that it
// then stops.
func startPublisher(t *testing.T, opts bundlepublish.Options) {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	pub, err := bundlepublish.New(opts)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- pub.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(wait):
			t.Error("Run did not return after its context was cancelled")
		}
	})
}

func newCA(t *testing.T) *ca.CA {
	t.Helper()
	c, err := ca.New(testca.New(t, td).ChildCA().AuthoritySet(), ca.Options{})
	require.NoError(t, err)
	return c
}

// prepareRoot adds a new root to c's bundle in state prepared, as `meshctl
// root prepare` does, and returns it.
func prepareRoot(t *testing.T, c *ca.CA) *x509.Certificate {
	t.Helper()
	root := testca.New(t, td)
	set := c.Authorities().Clone()
	set.Sequence++
	set.Roots = append(set.Roots, ca.Root{
		Authority:      ca.Authority{Cert: root.Cert, Signer: root.Key},
		State:          ca.RootPrepared,
		Since:          time.Now(),
		BundleSequence: set.Sequence,
	})
	require.NoError(t, c.SetAuthorities(set))
	return root.Cert
}

func namespace(name string, labels map[string]string) *corev1.Namespace {
	if labels == nil {
		labels = map[string]string{}
	}
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
}

// createNamespace creates ns and returns its name.
func createNamespace(t *testing.T, client kubernetes.Interface, ns *corev1.Namespace) string {
	t.Helper()
	created, err := client.CoreV1().Namespaces().Create(t.Context(), ns, metav1.CreateOptions{})
	require.NoError(t, err)
	return created.Name
}

// publishedConfigMap is a ConfigMap as a publisher would have written it
// at sequence seq, with a placeholder bundle.
func publishedConfigMap(ns string, seq uint64) *corev1.ConfigMap {
	return &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{
			Name:      name,
			Namespace: ns,
			Labels:    map[string]string{bundlepublish.ManagedByLabel: bundlepublish.ManagedByValue},
		},
		Data: map[string]string{
			bundlepublish.KeyPEM:         "placeholder",
			bundlepublish.KeySequence:    strconv.FormatUint(seq, 10),
			bundlepublish.KeyTrustDomain: td.Name(),
		},
	}
}

// foreignConfigMap is a user's ConfigMap with the publisher's name.
func foreignConfigMap(ns string) *corev1.ConfigMap {
	return &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"owner": "someone"}},
		Data:       map[string]string{"bundle.pem": "theirs"},
	}
}

func exists(t *testing.T, client kubernetes.Interface, ns string) bool {
	t.Helper()
	_, err := client.CoreV1().ConfigMaps(ns).Get(t.Context(), name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return false
	}
	require.NoError(t, err)
	return true
}

// waitForSequence waits for the ConfigMap in ns to hold bundle sequence
// seq, and returns it.
func waitForSequence(t *testing.T, client kubernetes.Interface, ns string, seq uint64) *corev1.ConfigMap {
	t.Helper()
	return waitForSequenceNamed(t, client, ns, name, seq, wait)
}

// waitForSequenceNamed waits up to timeout for the ConfigMap ns/name to
// hold bundle sequence seq, and returns it.
func waitForSequenceNamed(t *testing.T, client kubernetes.Interface, ns, name string, seq uint64, timeout time.Duration) *corev1.ConfigMap {
	t.Helper()
	var cm *corev1.ConfigMap
	require.Eventually(t, func() bool {
		got, err := client.CoreV1().ConfigMaps(ns).Get(t.Context(), name, metav1.GetOptions{})
		if err != nil {
			return false
		}
		cm = got
		return got.Data[bundlepublish.KeySequence] == strconv.FormatUint(seq, 10)
	}, timeout, tick, "configmap %s/%s does not hold sequence %d", ns, name, seq)
	return cm
}

// requireBundle checks that cm holds c's bundle at sequence seq, in both
// encodings, as go-spiffe reads them.
func requireBundle(t *testing.T, cm *corev1.ConfigMap, c *ca.CA, seq uint64, hint time.Duration) {
	t.Helper()
	want, wantSeq := c.Bundle()
	require.Equal(t, seq, wantSeq)
	require.Equal(t, bundlepublish.ManagedByValue, cm.Labels[bundlepublish.ManagedByLabel])
	require.Equal(t, td.Name(), cm.Data[bundlepublish.KeyTrustDomain])
	require.Equal(t, strconv.FormatUint(seq, 10), cm.Data[bundlepublish.KeySequence])

	pemBundle, err := x509bundle.Parse(td, []byte(cm.Data[bundlepublish.KeyPEM]))
	require.NoError(t, err)
	require.True(t, want.Equal(pemBundle), "PEM bundle differs from the CA's")

	doc, err := spiffebundle.Parse(td, []byte(cm.Data[bundlepublish.KeySPIFFE]))
	require.NoError(t, err)
	require.True(t, want.Equal(doc.X509Bundle()), "SPIFFE bundle differs from the CA's")
	gotSeq, ok := doc.SequenceNumber()
	require.True(t, ok, "SPIFFE bundle has no sequence")
	require.Equal(t, seq, gotSeq)
	gotHint, ok := doc.RefreshHint()
	require.True(t, ok, "SPIFFE bundle has no refresh hint")
	require.Equal(t, hint, gotHint)
	require.Len(t, cm.Data, 4)
}

// counter returns meshca_bundle_configmap_syncs_total{result}.
func counter(t *testing.T, reg *prometheus.Registry, result string) float64 {
	t.Helper()
	return metric(t, reg, "meshca_bundle_configmap_syncs_total", "result", result)
}

// gauge returns meshca_bundle_configmap_namespaces{state}, or -1 when it
// is not reported.
func gauge(t *testing.T, reg *prometheus.Registry, state string) float64 {
	t.Helper()
	return metric(t, reg, "meshca_bundle_configmap_namespaces", "state", state)
}

// metric returns the value of the series of name with label=value: 0 for
// a counter not yet counted, -1 for a gauge not reported.
func metric(t *testing.T, reg *prometheus.Registry, name, label, value string) float64 {
	t.Helper()
	families, err := reg.Gather()
	require.NoError(t, err)
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					if m.Counter != nil {
						return m.GetCounter().GetValue()
					}
					return m.GetGauge().GetValue()
				}
			}
		}
	}
	if name == "meshca_bundle_configmap_namespaces" {
		return -1
	}
	return 0
}

// requireGoroutinesExit waits for the number of goroutines to fall back to
// before, and otherwise fails with every goroutine's stack.
func requireGoroutinesExit(t *testing.T, before int) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("%d goroutines running after Run returned, %d before:\n%s", runtime.NumGoroutine(), before, buf)
		}
		time.Sleep(tick)
	}
}
