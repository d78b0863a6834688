package bundlepublish

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
)

// Defaults for the zero values of Options.
const (
	DefaultConfigMapName = "meshca-trust-bundle"
	DefaultOptOutLabel   = "meshca.io/inject-bundle"
	DefaultRefreshHint   = 5 * time.Minute
	DefaultResync        = 10 * time.Minute
	DefaultWorkers       = 4
)

// OptOutValue is the value of the opt-out label (Options.OptOutLabel) that
// keeps a namespace without the bundle.
const OptOutValue = "false"

// ManagedByLabel, set to ManagedByValue, marks the ConfigMaps a Publisher
// owns. A ConfigMap with the publisher's name but without it belongs to
// someone else and is never changed or deleted.
const (
	ManagedByLabel = "app.kubernetes.io/managed-by"
	ManagedByValue = "meshca"
)

// The keys of a published ConfigMap's data.
const (
	// KeyPEM holds the bundle's X.509 authorities as PEM CERTIFICATE blocks.
	KeyPEM = "bundle.pem"

	// KeySPIFFE holds the bundle as a SPIFFE bundle document (a JWK Set
	// with spiffe_sequence and spiffe_refresh_hint); it parses with
	// spiffebundle.Parse and the trust domain of KeyTrustDomain.
	KeySPIFFE = "bundle.spiffe.json"

	// KeySequence holds the bundle's sequence number, in decimal.
	KeySequence = "sequence"

	// KeyTrustDomain holds the bundle's trust domain name.
	KeyTrustDomain = "trust-domain"

	// FederatedKeyPrefix begins the keys of the federated trust domains'
	// bundles (FederatedPEMKey, FederatedSPIFFEKey).
	FederatedKeyPrefix = "federated."
)

// FederatedPEMKey returns the key holding federated trust domain td's
// bundle as PEM CERTIFICATE blocks: "federated.<td>.pem".
func FederatedPEMKey(td spiffeid.TrustDomain) string {
	return FederatedKeyPrefix + td.Name() + ".pem"
}

// FederatedSPIFFEKey returns the key holding federated trust domain td's
// bundle as the SPIFFE bundle document its bundle endpoint served (with
// the peer's spiffe_sequence and spiffe_refresh_hint):
// "federated.<td>.spiffe.json".
func FederatedSPIFFEKey(td spiffeid.TrustDomain) string {
	return FederatedKeyPrefix + td.Name() + ".spiffe.json"
}

// Source gives the trust bundle to publish. *ca.CA is a Source.
type Source interface {
	// WatchBundle returns the current bundle, its sequence, and a channel
	// closed when the bundle next changes.
	WatchBundle() (*x509bundle.Bundle, uint64, <-chan struct{})
}

// FederatedSource gives the bundles of the trust domains federated with
// the Source's. *federation.Federator is one.
type FederatedSource interface {
	// Watch returns the current federated bundles and a channel closed
	// when they next change.
	Watch() ([]*spiffebundle.Bundle, <-chan struct{})
}

// Options configure a Publisher.
type Options struct {
	// Client reaches the Kubernetes API: it lists and watches Namespaces
	// and ConfigMaps, and creates, updates and deletes ConfigMaps in every
	// namespace. Required. (A whole clientset, because client-go's
	// informer factories take one.)
	Client kubernetes.Interface

	// Source gives the bundle to publish. Required.
	Source Source

	// Federated, when set, gives the federated trust domains' bundles,
	// published beside the Source's under FederatedPEMKey and
	// FederatedSPIFFEKey, and removed with their trust domain. Nil
	// publishes none.
	Federated FederatedSource

	// ConfigMapName names the ConfigMap in every namespace; empty means
	// DefaultConfigMapName.
	ConfigMapName string

	// RefreshHint is the bundle document's spiffe_refresh_hint, rounded to
	// seconds; zero means DefaultRefreshHint.
	RefreshHint time.Duration

	// OptOutLabel is the Namespace label that, set to OptOutValue, keeps
	// the namespace without the bundle: the Publisher creates nothing there
	// and deletes the ConfigMap it published before. Empty means
	// DefaultOptOutLabel.
	OptOutLabel string

	// Labels are added to every ConfigMap the Publisher writes, beside
	// ManagedByLabel=ManagedByValue, which is always set; nil adds none.
	Labels map[string]string

	// Resync is how often every namespace is checked even when nothing
	// changed, at least once a second; zero means DefaultResync, and a
	// negative value turns the periodic check off.
	Resync time.Duration

	// Workers is how many namespaces are written at once; zero means
	// DefaultWorkers.
	Workers int

	// Logger receives operational logs; nil discards them.
	Logger *slog.Logger

	// Registerer receives the publisher's metrics; nil registers nowhere.
	Registerer prometheus.Registerer
}

// Publisher keeps a ConfigMap with the trust bundle in every namespace.
// Create one with New and call Run on the leader replica only.
type Publisher struct {
	client  kubernetes.Interface
	src     Source
	fed     FederatedSource // nil: none
	name    string
	hint    time.Duration
	optOut  string
	labels  map[string]string
	resync  time.Duration
	workers int
	log     *slog.Logger
	metrics *metrics

	running atomic.Bool

	mu      sync.Mutex
	cur     *run     // the caches of the current Run; nil when not running
	content *content // the last bundle encoded
}

// run is what one call of Run works with.
type run struct {
	queue      workqueue.TypedRateLimitingInterface[string]
	namespaces corelisters.NamespaceLister
	configMaps corelisters.ConfigMapLister
}

// New returns a Publisher. It checks opts; it does not reach the API
// server.
func New(opts Options) (*Publisher, error) {
	if opts.Client == nil || opts.Source == nil {
		return nil, errors.New("bundlepublish: a Client and a Source are required")
	}
	if opts.ConfigMapName == "" {
		opts.ConfigMapName = DefaultConfigMapName
	}
	if errs := validation.IsDNS1123Subdomain(opts.ConfigMapName); len(errs) > 0 {
		return nil, fmt.Errorf("bundlepublish: ConfigMapName %q is not a valid object name: %s", opts.ConfigMapName, errs[0])
	}
	if opts.RefreshHint < 0 {
		return nil, fmt.Errorf("bundlepublish: RefreshHint %s is negative", opts.RefreshHint)
	}
	if opts.RefreshHint == 0 {
		opts.RefreshHint = DefaultRefreshHint
	}
	if opts.OptOutLabel == "" {
		opts.OptOutLabel = DefaultOptOutLabel
	}
	if errs := validation.IsQualifiedName(opts.OptOutLabel); len(errs) > 0 {
		return nil, fmt.Errorf("bundlepublish: OptOutLabel %q is not a valid label key: %s", opts.OptOutLabel, errs[0])
	}
	lbls := map[string]string{ManagedByLabel: ManagedByValue}
	for k, v := range opts.Labels {
		if errs := validation.IsQualifiedName(k); len(errs) > 0 {
			return nil, fmt.Errorf("bundlepublish: label key %q is not valid: %s", k, errs[0])
		}
		if errs := validation.IsValidLabelValue(v); len(errs) > 0 {
			return nil, fmt.Errorf("bundlepublish: label %s=%q has an invalid value: %s", k, v, errs[0])
		}
		if k == ManagedByLabel && v != ManagedByValue {
			return nil, fmt.Errorf("bundlepublish: label %s must be %q: it marks the ConfigMaps the publisher owns", ManagedByLabel, ManagedByValue)
		}
		lbls[k] = v
	}
	switch {
	case opts.Resync == 0:
		opts.Resync = DefaultResync
	case opts.Resync < 0:
		opts.Resync = 0 // informers: no periodic resync
	}
	if opts.Workers < 0 {
		return nil, fmt.Errorf("bundlepublish: Workers %d is negative", opts.Workers)
	}
	if opts.Workers == 0 {
		opts.Workers = DefaultWorkers
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Registerer == nil {
		opts.Registerer = prometheus.NewRegistry()
	}
	p := &Publisher{
		client:  opts.Client,
		src:     opts.Source,
		fed:     opts.Federated,
		name:    opts.ConfigMapName,
		hint:    opts.RefreshHint,
		optOut:  opts.OptOutLabel,
		labels:  lbls,
		resync:  opts.Resync,
		workers: opts.Workers,
		log:     opts.Logger.With(slog.String("configmap", opts.ConfigMapName)),
	}
	m, err := newMetrics(opts.Registerer, p)
	if err != nil {
		return nil, fmt.Errorf("bundlepublish: registering metrics: %w", err)
	}
	p.metrics = m
	return p, nil
}

// Run publishes until ctx is done, then returns nil once everything it
// started has stopped. Run it on the leader replica only, with a context
// cancelled when leadership is lost. A Publisher runs once at a time, and
// can be run again after Run returns (on leadership regained).
func (p *Publisher) Run(ctx context.Context) error {
	if !p.running.CompareAndSwap(false, true) {
		return errors.New("bundlepublish: Run called while already running")
	}
	defer p.running.Store(false)

	// Namespaces, resynced periodically so that every namespace is checked
	// even when no event arrives; ConfigMaps of our name only.
	nsFactory := informers.NewSharedInformerFactory(p.client, p.resync)
	cmFactory := informers.NewSharedInformerFactoryWithOptions(p.client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", p.name).String()
		}))
	defer nsFactory.Shutdown()
	defer cmFactory.Shutdown()
	nsInformer := nsFactory.Core().V1().Namespaces()
	cmInformer := cmFactory.Core().V1().ConfigMaps()

	r := &run{
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.DefaultTypedControllerRateLimiter[string](),
			workqueue.TypedRateLimitingQueueConfig[string]{}),
		namespaces: nsInformer.Lister(),
		configMaps: cmInformer.Lister(),
	}
	defer r.queue.ShutDown()

	if _, err := nsInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { r.enqueueNamespace(obj) },
		UpdateFunc: func(_, obj any) { r.enqueueNamespace(obj) },
	}); err != nil {
		return fmt.Errorf("bundlepublish: watching namespaces: %w", err)
	}
	if _, err := cmInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { r.enqueueConfigMap(obj, p.name) },
		UpdateFunc: func(_, obj any) { r.enqueueConfigMap(obj, p.name) },
		DeleteFunc: func(obj any) { r.enqueueConfigMap(obj, p.name) },
	}); err != nil {
		return fmt.Errorf("bundlepublish: watching configmaps: %w", err)
	}

	// Watch the bundles from before the caches fill, so that no change is
	// missed between the initial listing and the watch.
	_, seq, changed := p.src.WatchBundle()
	fedChanged := p.watchFederated()
	nsFactory.Start(ctx.Done())
	cmFactory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), nsInformer.Informer().HasSynced, cmInformer.Informer().HasSynced) {
		return nil // ctx is done before the caches filled
	}
	p.mu.Lock()
	p.cur = r
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		p.cur = nil
		p.mu.Unlock()
	}()
	p.log.Info("publishing the trust bundle in every namespace", slog.Uint64("sequence", seq))

	var wg sync.WaitGroup
	for range p.workers {
		wg.Go(func() {
			for p.processNext(ctx, r) {
			}
		})
	}
	wg.Go(func() { p.watchBundle(ctx, r, changed, fedChanged) })

	<-ctx.Done()
	r.queue.ShutDown()
	wg.Wait()
	p.log.Info("stopped publishing the trust bundle")
	return nil
}

// watchFederated returns the channel closed when the federated bundles
// next change; nil, which never closes, when there are none.
func (p *Publisher) watchFederated() <-chan struct{} {
	if p.fed == nil {
		return nil
	}
	_, changed := p.fed.Watch()
	return changed
}

// watchBundle enqueues every namespace on every change of the bundle or
// the federated bundles.
func (p *Publisher) watchBundle(ctx context.Context, r *run, changed, fedChanged <-chan struct{}) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-fedChanged:
		}
		var seq uint64
		_, seq, changed = p.src.WatchBundle()
		fedChanged = p.watchFederated()
		nss, err := r.namespaces.List(labels.Everything())
		if err != nil { // a cache lister does not fail
			p.log.Error("listing namespaces from the cache", slog.Any("error", err))
			continue
		}
		p.log.Info("trust bundles changed; updating every namespace",
			slog.Uint64("sequence", seq), slog.Int("namespaces", len(nss)))
		for _, ns := range nss {
			r.queue.Add(ns.Name)
		}
	}
}

func (r *run) enqueueNamespace(obj any) {
	if ns, ok := obj.(*corev1.Namespace); ok {
		r.queue.Add(ns.Name)
	}
}

func (r *run) enqueueConfigMap(obj any, name string) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	// The field selector already filters by name; a client that ignores
	// it (a fake) must not make other ConfigMaps count.
	if cm, ok := obj.(*corev1.ConfigMap); ok && cm.Name == name {
		r.queue.Add(cm.Namespace)
	}
}

// processNext syncs the next namespace of the queue; false means the queue
// is shut down.
func (p *Publisher) processNext(ctx context.Context, r *run) bool {
	ns, shutdown := r.queue.Get()
	if shutdown {
		return false
	}
	defer r.queue.Done(ns)
	result, err := p.sync(ctx, r, ns)
	p.metrics.syncs.WithLabelValues(string(result)).Inc()
	switch {
	case err == nil:
		r.queue.Forget(ns)
	case ctx.Err() != nil:
		// Stopping: the next leader takes over.
	case result == resultConflict:
		p.log.Debug("configmap changed meanwhile; retrying", slog.String("namespace", ns), slog.Any("error", err))
		r.queue.AddRateLimited(ns)
	default:
		p.log.Error("publishing the trust bundle", slog.String("namespace", ns), slog.Any("error", err))
		r.queue.AddRateLimited(ns)
	}
	return true
}

// terminating reports whether ns is being deleted; nothing can be created
// in it any more.
func terminating(ns *corev1.Namespace) bool {
	return ns.DeletionTimestamp != nil || ns.Status.Phase == corev1.NamespaceTerminating
}

func (p *Publisher) optedOut(ns *corev1.Namespace) bool {
	return ns.Labels[p.optOut] == OptOutValue
}

// ours reports whether cm was written by a Publisher.
func ours(cm *corev1.ConfigMap) bool {
	return cm.Labels[ManagedByLabel] == ManagedByValue
}

// hasLabels reports whether cm carries all of p's labels.
func (p *Publisher) hasLabels(cm *corev1.ConfigMap) bool {
	for k, v := range p.labels {
		if got, ok := cm.Labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// newConfigMap returns the ConfigMap to create in namespace.
func (p *Publisher) newConfigMap(namespace string, c *content) *corev1.ConfigMap {
	return &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{
			Name:      p.name,
			Namespace: namespace,
			Labels:    maps.Clone(p.labels),
		},
		Data: maps.Clone(c.data),
	}
}
