package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/kubestore"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/ban"
	"github.com/meshca/meshca/identity/bundlepublish"
	"github.com/meshca/meshca/identity/tokenreview"
	"github.com/meshca/meshca/internal/leader"
	"github.com/meshca/meshca/internal/server"
	"github.com/meshca/meshca/rotation"
)

// kubeEnv is the server's view of its cluster in Kubernetes mode.
type kubeEnv struct {
	cfg    KubernetesConfig
	client kubernetes.Interface
	// reviews has a rate limit of its own, so that a flood of token
	// reviews never delays Lease renewals or Secret writes.
	reviews kubernetes.Interface
	log     *slog.Logger

	// federated gives the federated bundles the leader publishes beside
	// the own bundle; nil publishes none.
	federated bundlepublish.FederatedSource
}

func newKubeEnv(cfg KubernetesConfig, log *slog.Logger) (*kubeEnv, error) {
	var rc *rest.Config
	var err error
	if cfg.Kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes: client config: %w", err)
	}
	// Two clients, each with its own rate limit, so that a flood of token
	// reviews never delays Lease renewals, Secret writes or ConfigMaps.
	// client-go's default of 5 requests/s is too slow for either: a
	// restart storm brings a review per new workload, and a bundle change
	// a ConfigMap update per namespace.
	rc.QPS, rc.Burst = 50, 100
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes: client: %w", err)
	}
	rrc := rest.CopyConfig(rc)
	rrc.QPS, rrc.Burst = 100, 200
	reviews, err := kubernetes.NewForConfig(rrc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes: client: %w", err)
	}
	return &kubeEnv{cfg: cfg, client: client, reviews: reviews, log: log}, nil
}

// store returns the Secret store of the authority set.
func (k *kubeEnv) store() (*kubestore.Store, error) {
	return kubestore.New(kubestore.Options{
		Client:    k.client.CoreV1(),
		Namespace: k.cfg.Namespace,
		Name:      k.cfg.StateSecret,
		Logger:    k.log,
	})
}

// awaitStoredAuthorities holds a starting replica that finds no stored
// authorities while another replica runs: the Secret was deleted under
// running replicas, and their leader writes it back from memory
// (leaderWork.restore). Making a new root now would have the replicas sign
// under two roots. It returns nil once the Secret holds authorities, or
// when no other replica runs, so that the caller may create them: there
// is no leader Lease (a first start), or it stays unchanged for a lease
// duration and three retry periods (every replica stopped: a deliberate
// new CA). It fails when that is not settled within maxWait.
func (k *kubeEnv) awaitStoredAuthorities(ctx context.Context, store ca.Store, maxWait, poll time.Duration) error {
	obs := &leader.LeaseObserver{
		Client:        k.client.CoordinationV1(),
		Namespace:     k.cfg.Namespace,
		Name:          k.cfg.LeaseName,
		Self:          k.cfg.PodName,
		LeaseDuration: k.leaseDuration(),
		RetryPeriod:   k.retryPeriod(),
	}
	deadline := time.Now().Add(maxWait)
	warned := false
	for {
		if _, err := store.Load(ctx); !errors.Is(err, ca.ErrNotFound) {
			return nil // stored, or an error that loading will report
		}
		state, holder, err := obs.Observe(ctx, time.Now())
		switch {
		case err != nil:
			return fmt.Errorf("kubernetes: no stored authorities, and whether another replica runs is unknown: %w", err)
		case state == leader.LeaseAbsent || state == leader.LeaseIdle:
			return nil
		case time.Now().After(deadline) && state == leader.LeaseHeld:
			return fmt.Errorf("kubernetes: Secret %s/%s holds no authorities while replica %s runs (Lease %s): it was deleted under running replicas, "+
				"and the leader has not written it back within %s. Not making a second root. Restart the leader so that it restores the Secret; "+
				"to make a new CA instead, scale every replica to 0, delete the Secret, and scale up",
				k.cfg.Namespace, k.cfg.StateSecret, holder, k.cfg.LeaseName, maxWait)
		case time.Now().After(deadline):
			return fmt.Errorf("kubernetes: Secret %s/%s holds no authorities, and whether another replica runs was not settled within %s "+
				"(Lease %s, holder %q). Not making a second root; the next start tries again", k.cfg.Namespace, k.cfg.StateSecret, maxWait, k.cfg.LeaseName, holder)
		case !warned:
			k.log.Warn("no stored authorities: waiting to learn whether another replica runs, whose leader restores them, rather than make a second root",
				"lease", k.cfg.LeaseName, "holder", holder, "wait_up_to", maxWait.String())
			warned = true
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(poll):
		}
	}
}

// leaseDuration is the leader Lease's duration.
func (k *kubeEnv) leaseDuration() time.Duration {
	return cmp.Or(time.Duration(k.cfg.LeaseDuration), leader.DefaultLeaseDuration)
}

// retryPeriod is how often candidates try to take or renew the Lease.
func (k *kubeEnv) retryPeriod() time.Duration {
	return cmp.Or(time.Duration(k.cfg.RetryPeriod), leader.DefaultRetryPeriod)
}

// storeWait bounds awaitStoredAuthorities: time for the Lease to settle
// (a lease duration and three retry periods unchanged) twice over.
func (k *kubeEnv) storeWait() time.Duration {
	return 2 * (k.leaseDuration() + 3*k.retryPeriod())
}

// banStore returns the Secret store of the emergency bans, shared by the
// replicas and watched by each.
func (k *kubeEnv) banStore() (*ban.KubeStore, error) {
	return ban.NewKubeStore(ban.KubeOptions{
		Client:    k.client.CoreV1(),
		Namespace: k.cfg.Namespace,
		Name:      k.cfg.BanSecret,
		Logger:    k.log,
	})
}

// authenticator reviews service-account tokens with the API server.
func (k *kubeEnv) authenticator(cfg *completeConfig, reg prometheus.Registerer) (identity.Authenticator, error) {
	return tokenreview.New(k.reviews.AuthenticationV1(), tokenreview.Options{
		TrustDomain: cfg.td,
		Audiences:   k.cfg.TokenAudiences,
		Logger:      k.log,
		Registerer:  reg,
	})
}

// startKubernetes starts what Kubernetes mode adds to every replica
// (following the leader's changes to the shared authorities) and the
// leader election, whose winner rotates and publishes bundles. done is
// closed when the election has stopped, after ctx is done, its Lease
// released.
func startKubernetes(ctx context.Context, k *kubeEnv, cfg *completeConfig, c *ca.CA, store ca.Store, manager *rotation.Manager, reg prometheus.Registerer, done chan<- struct{}) (*leader.Elector, error) {
	work := leaderWork{ca: c, manager: manager, log: k.log}
	if ks, ok := store.(*kubestore.Store); ok {
		work.store = ks
		go func() {
			if err := kubestore.Follow(ctx, ks, c, k.log, 0); err != nil {
				k.log.Error("following the shared authorities stopped", "error", err)
			}
		}()
	}
	pub, err := k.publisher(c, cmp.Or(time.Duration(cfg.BundleRefreshHint), server.DefaultRefreshHint), reg)
	if err != nil {
		return nil, err
	}
	work.publisher = pub
	elector, err := k.elector(work)
	if err != nil {
		return nil, err
	}
	go func() {
		defer close(done)
		if err := elector.Run(ctx); err != nil {
			k.log.Error("leader election stopped", "error", err)
		}
	}()
	return elector, nil
}

// leaderWork is what only the leader does: rotate the authorities and
// publish the bundle in every namespace.
type leaderWork struct {
	ca        *ca.CA
	store     *kubestore.Store // nil in mode files
	manager   *rotation.Manager
	publisher *bundlepublish.Publisher // nil when publishing is off
	log       *slog.Logger
}

func (w leaderWork) run(ctx context.Context) {
	var wg sync.WaitGroup
	// Start from what is stored: a follower's view may lag, and the store
	// must know the Secret's current version for the first save to land.
	if w.store != nil {
		switch err := kubestore.Reload(ctx, w.store, w.ca); {
		case errors.Is(err, ca.ErrNotFound):
			w.restore(ctx)
		case err != nil:
			w.log.Error("reloading the authorities on taking the lead", "error", err)
		}
		wg.Go(func() {
			for {
				select {
				case <-ctx.Done():
					return
				case <-w.store.Deleted():
					w.restore(ctx)
				}
			}
		})
	}
	if w.manager != nil {
		wg.Go(func() { _ = w.manager.Run(ctx) })
	}
	if w.publisher != nil {
		wg.Go(func() { _ = w.publisher.Run(ctx) })
	}
	wg.Wait()
}

// restore writes the authorities in memory back to the store when the
// Secret is gone: deleted while the replicas ran. Otherwise a replica
// starting meanwhile waits, and gives up after a while. It tries again,
// backing off from a second to 30 s, until it succeeds or the lead ends.
func (w leaderWork) restore(ctx context.Context) {
	backoff := time.Second
	for {
		set := w.ca.Authorities()
		restored, err := w.store.Restore(ctx, set)
		switch {
		case err == nil && restored:
			w.log.Warn("the authorities Secret was deleted while the CA ran; restored it from memory (to destroy the CA, scale every replica to 0 first)",
				"bundle_sequence", set.Sequence)
			return
		case err == nil:
			return
		case ctx.Err() != nil:
			return
		}
		w.log.Error("the authorities Secret is gone and could not be restored; trying again", "error", err, "retry_in", backoff.String())
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

// publisher returns the bundle publisher, or nil when it is off.
func (k *kubeEnv) publisher(c *ca.CA, hint time.Duration, reg prometheus.Registerer) (*bundlepublish.Publisher, error) {
	if k.cfg.BundleConfigMap == "off" || k.cfg.BundleConfigMap == "false" {
		return nil, nil
	}
	return bundlepublish.New(bundlepublish.Options{
		Client:        k.client,
		Source:        c,
		Federated:     k.federated,
		ConfigMapName: k.cfg.BundleConfigMap,
		RefreshHint:   hint,
		Logger:        k.log,
		Registerer:    reg,
	})
}

// elector returns the leader election, doing work while leading. Every
// replica signs; only the leader rotates and publishes.
func (k *kubeEnv) elector(work leaderWork) (*leader.Elector, error) {
	return leader.New(leader.Options{
		Client:           k.client.CoordinationV1(),
		Namespace:        k.cfg.Namespace,
		Name:             k.cfg.LeaseName,
		Identity:         k.cfg.PodName,
		LeaseDuration:    k.leaseDuration(),
		RenewDeadline:    time.Duration(k.cfg.RenewDeadline),
		RetryPeriod:      k.retryPeriod(),
		Logger:           k.log,
		OnStartedLeading: work.run,
	})
}
