package bundlepublish_test

import (
	"context"
	"crypto/x509"
	"strconv"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/meshca/meshca/identity/bundlepublish"
	"github.com/meshca/meshca/identity/federation"
	"github.com/meshca/meshca/testca"
)

var (
	peerTD  = spiffeid.RequireTrustDomainFromString("peer.example")
	otherTD = spiffeid.RequireTrustDomainFromString("other-peer.example")

	_ bundlepublish.FederatedSource = (*federation.Federator)(nil)
)

// newFederator returns a federator of td that does not run: peers added
// to it are published with their bootstrap bundles, with no fetch.
func newFederator(t *testing.T) *federation.Federator {
	t.Helper()
	f, err := federation.New(context.Background(), federation.Options{TrustDomain: td})
	require.NoError(t, err)
	return f
}

// addPeer federates fed with peer, bootstrapped with a bundle of root at
// sequence seq, and returns that bundle.
func addPeer(t *testing.T, fed *federation.Federator, peer spiffeid.TrustDomain, root *x509.Certificate, seq uint64) *spiffebundle.Bundle {
	t.Helper()
	b := spiffebundle.FromX509Authorities(peer, []*x509.Certificate{root})
	b.SetSequenceNumber(seq)
	require.NoError(t, fed.AddPeer(context.Background(), federation.Peer{
		TrustDomain: peer,
		URL:         "https://bundle." + peer.Name() + "/",
		Profile:     federation.ProfileHTTPSSPIFFE,
		EndpointID:  spiffeid.RequireFromPath(peer, "/meshca/server"),
		Bootstrap:   b,
	}))
	return b
}

func TestFederatedKeys(t *testing.T) {
	require.Equal(t, "federated.peer.example.pem", bundlepublish.FederatedPEMKey(peerTD))
	require.Equal(t, "federated.peer.example.spiffe.json", bundlepublish.FederatedSPIFFEKey(peerTD))
	// Every character of a trust domain name is one of a ConfigMap key.
	odd := spiffeid.RequireTrustDomainFromString("a-b_c.0-9")
	require.Empty(t, validation.IsConfigMapKey(bundlepublish.FederatedSPIFFEKey(odd)))
}

// TestPublishesFederatedBundles: the federated bundles are published
// beside the own bundle, follow the federation's changes, and leave with
// their peer; a trust domain too long for a ConfigMap key is left out, and
// the others are published.
func TestPublishesFederatedBundles(t *testing.T) {
	t.Parallel()
	client := fake.NewClientset(namespace("a", nil), namespace("b", nil))
	c := newCA(t)
	fed := newFederator(t)
	peerRoot := testca.New(t, peerTD).Cert
	peerBundle := addPeer(t, fed, peerTD, peerRoot, 3)
	long := spiffeid.RequireTrustDomainFromString(strings.Repeat("x", 240) + ".example")
	addPeer(t, fed, long, testca.New(t, long).Cert, 1)
	startPublisher(t, bundlepublish.Options{Client: client, Source: c, Federated: fed})

	for _, ns := range []string{"a", "b"} {
		cm := waitForKey(t, client, ns, bundlepublish.FederatedPEMKey(peerTD), true)
		requireFederated(t, cm, peerBundle)
		require.Len(t, cm.Data, 6, "the own bundle's 4 keys and the peer's 2; not the long trust domain's")
		requireBundleKeys(t, cm, c)
		require.NotContains(t, strings.Join(keys(cm), " "), long.Name())
	}

	// A second peer joins.
	otherBundle := addPeer(t, fed, otherTD, testca.New(t, otherTD).Cert, 1)
	cm := waitForKey(t, client, "a", bundlepublish.FederatedPEMKey(otherTD), true)
	requireFederated(t, cm, otherBundle)
	requireFederated(t, cm, peerBundle)

	// The peer leaves: its keys go, the rest stays.
	require.NoError(t, fed.RemovePeer(context.Background(), peerTD))
	for _, ns := range []string{"a", "b"} {
		cm := waitForKey(t, client, ns, bundlepublish.FederatedPEMKey(peerTD), false)
		require.NotContains(t, cm.Data, bundlepublish.FederatedSPIFFEKey(peerTD))
		requireFederated(t, waitForKey(t, client, ns, bundlepublish.FederatedPEMKey(otherTD), true), otherBundle)
	}
	requireBundleKeys(t, waitForKey(t, client, "b", bundlepublish.FederatedPEMKey(peerTD), false), c)
}

// requireBundleKeys checks that cm holds c's own bundle, whatever the
// federated keys.
func requireBundleKeys(t *testing.T, cm *corev1.ConfigMap, c interface {
	Bundle() (*x509bundle.Bundle, uint64)
}) {
	t.Helper()
	want, seq := c.Bundle()
	require.Equal(t, td.Name(), cm.Data[bundlepublish.KeyTrustDomain])
	require.Equal(t, strconv.FormatUint(seq, 10), cm.Data[bundlepublish.KeySequence])
	got, err := x509bundle.Parse(td, []byte(cm.Data[bundlepublish.KeyPEM]))
	require.NoError(t, err)
	require.True(t, want.Equal(got))
}

// waitForKey waits for the ConfigMap in ns to hold key (present) or not,
// and returns it.
func waitForKey(t *testing.T, client kubernetes.Interface, ns, key string, present bool) *corev1.ConfigMap {
	t.Helper()
	return waitForKeyNamed(t, client, ns, name, key, present)
}

// waitForKeyNamed is waitForKey for the ConfigMap ns/cmName, waiting as
// long as a real API server may take.
func waitForKeyNamed(t *testing.T, client kubernetes.Interface, ns, cmName, key string, present bool) *corev1.ConfigMap {
	t.Helper()
	var cm *corev1.ConfigMap
	require.Eventually(t, func() bool {
		got, err := client.CoreV1().ConfigMaps(ns).Get(t.Context(), cmName, metav1.GetOptions{})
		if err != nil {
			return false
		}
		cm = got
		_, ok := got.Data[key]
		return ok == present
	}, apiWait, tick, "configmap %s/%s: key %s present=%v", ns, cmName, key, present)
	return cm
}

// requireFederated checks that cm holds want, a federated bundle, in both
// encodings, as go-spiffe reads them.
func requireFederated(t *testing.T, cm *corev1.ConfigMap, want *spiffebundle.Bundle) {
	t.Helper()
	peer := want.TrustDomain()
	pemBundle, err := x509bundle.Parse(peer, []byte(cm.Data[bundlepublish.FederatedPEMKey(peer)]))
	require.NoError(t, err)
	require.True(t, want.X509Bundle().Equal(pemBundle), "PEM bundle of %s", peer)
	doc, err := spiffebundle.Parse(peer, []byte(cm.Data[bundlepublish.FederatedSPIFFEKey(peer)]))
	require.NoError(t, err)
	require.True(t, want.Equal(doc), "SPIFFE bundle of %s", peer)
}

func keys(cm *corev1.ConfigMap) []string {
	out := make([]string, 0, len(cm.Data))
	for k := range cm.Data {
		out = append(out, k)
	}
	return out
}
