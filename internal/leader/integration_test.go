package leader_test

import (
	"context"
	"errors"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshca/meshca/internal/kubetest"
	"github.com/meshca/meshca/internal/leader"
)

// The tests named TestAPIServer* run against a real kube-apiserver.

var kube kubetest.Shared

func TestMain(m *testing.M) { kube.Run(m) }

// term is one candidate's leadership: when it started and its work's ctx.
type term struct {
	identity string
	ctx      context.Context
}

// runCandidate runs a candidate in ns until ctx is done or the test ends,
// sending a term each time it starts leading.
func runCandidate(t *testing.T, ctx context.Context, opts leader.Options, terms chan<- term) {
	t.Helper()
	opts.OnStartedLeading = func(ctx context.Context) {
		terms <- term{identity: opts.Identity, ctx: ctx}
		<-ctx.Done()
	}
	e, err := leader.New(opts)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan error)
	go func() { done <- e.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(wait):
			t.Errorf("%s: Run did not return after its ctx was done", opts.Identity)
		}
	})
}

func nextTerm(t *testing.T, terms <-chan term) term {
	t.Helper()
	select {
	case tm := <-terms:
		return tm
	case <-time.After(wait):
		t.Fatal("no candidate started leading")
		return term{}
	}
}

func TestAPIServerHandOver(t *testing.T) {
	// Two candidates, one leads; the leader stops gracefully and the other
	// takes the Lease at once (it was released), not after LeaseDuration.
	c := kube.Cluster(t)
	ns := c.CreateNamespace(t, "leader-").Name
	terms := make(chan term, 4)
	ctxs := map[string]context.CancelFunc{}
	for _, id := range []string{"pod-a", "pod-b"} {
		ctx, cancel := context.WithCancel(t.Context())
		ctxs[id] = cancel
		opts := fast(c.Client.CoordinationV1(), id)
		opts.Namespace = ns
		runCandidate(t, ctx, opts, terms)
	}

	first := nextTerm(t, terms)
	require.Equal(t, first.identity, holderIn(t, c, ns))
	select {
	case tm := <-terms:
		t.Fatalf("%s leads too while %s holds the Lease", tm.identity, first.identity)
	case <-time.After(3 * time.Second): // longer than LeaseDuration
	}

	ctxs[first.identity]()
	second := nextTerm(t, terms)
	require.NotEqual(t, first.identity, second.identity)
	require.Error(t, first.ctx.Err(), "the first leader's work stopped before the second's started")
	require.Equal(t, second.identity, holderIn(t, c, ns))
}

func TestAPIServerLeaderDies(t *testing.T) {
	// The leader is cut off from the API server without releasing the
	// Lease: it stops its work when it cannot renew, and the other takes
	// over once the Lease has expired, never while the first still works.
	c := kube.Cluster(t)
	ns := c.CreateNamespace(t, "leader-").Name
	terms := make(chan term, 4)
	cut := map[string]*atomic.Bool{}
	for _, id := range []string{"pod-a", "pod-b"} {
		cut[id] = &atomic.Bool{}
		opts := fast(cuttable(t, c.Config, cut[id]).CoordinationV1(), id)
		opts.Namespace = ns
		opts.LeaseDuration = 3 * time.Second // a margin over RenewDeadline for a loaded machine
		runCandidate(t, t.Context(), opts, terms)
	}

	first := nextTerm(t, terms)
	cut[first.identity].Store(true)
	second := nextTerm(t, terms)
	require.NotEqual(t, first.identity, second.identity)
	require.Error(t, first.ctx.Err(), "the cut-off leader's work stopped before the other's started")
	require.Equal(t, second.identity, holderIn(t, c, ns))
}

func holderIn(t *testing.T, c *kubetest.Cluster, ns string) string {
	t.Helper()
	return holder(t, c.Client.CoordinationV1(), ns)
}

// cuttable is a clientset for config whose requests fail once cut is set.
func cuttable(t *testing.T, config *rest.Config, cut *atomic.Bool) kubernetes.Interface {
	t.Helper()
	config = rest.CopyConfig(config)
	config.Wrap(func(rt http.RoundTripper) http.RoundTripper {
		return roundTripFunc(func(req *http.Request) (*http.Response, error) {
			if cut.Load() {
				return nil, errors.New("cut off from the API server")
			}
			return rt.RoundTrip(req)
		})
	})
	client, err := kubernetes.NewForConfig(config)
	require.NoError(t, err)
	return client
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(req *http.Request) (*http.Response, error) { return f(req) }
