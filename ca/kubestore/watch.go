package kubestore

import (
	"context"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"

	"github.com/meshca/meshca/ca"
)

// Watch calls fn with the stored authority set each time the Secret
// changes, until ctx is done; it then returns nil. A version of the
// Secret that this Store has read or written already (or an older one)
// is not reported, so that a replica hears of other writers' changes
// only. Data that does not decode is logged and skipped. A deleted Secret
// is logged and signalled on Deleted: the authorities in memory stay in
// use, and the leader restores the Secret from them.
//
// fn is called from one goroutine, in the order of the changes, and must
// not modify the set.
func (s *Store) Watch(ctx context.Context, fn func(*ca.AuthoritySet)) error {
	selector := fields.OneTermEqualSelector("metadata.name", s.name).String()
	secrets := s.client.Secrets(s.namespace)
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			opts.FieldSelector = selector
			return secrets.List(ctx, opts)
		},
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			opts.FieldSelector = selector
			return secrets.Watch(ctx, opts)
		},
	}
	w := &watcher{store: s, fn: fn}
	logger := logr.FromSlogHandler(s.log.Handler())
	_, informer := cache.NewInformerWithOptions(cache.InformerOptions{
		Logger:        &logger,
		ListerWatcher: cache.ToListWatcherWithWatchListSemantics(lw, s.client),
		ObjectType:    &corev1.Secret{},
		Handler: cache.ResourceEventHandlerFuncs{
			AddFunc:    w.changed,
			UpdateFunc: func(_, obj any) { w.changed(obj) },
			DeleteFunc: w.deleted,
		},
	})
	informer.RunWithContext(klog.NewContext(ctx, logger))
	return nil
}

// watcher turns the informer's events into authority sets.
type watcher struct {
	store *Store
	fn    func(*ca.AuthoritySet)
	last  string // resourceVersion last reported
}

func (w *watcher) changed(obj any) {
	secret, ok := obj.(*corev1.Secret)
	if !ok || secret.Namespace != w.store.namespace || secret.Name != w.store.name {
		return
	}
	log := w.store.log.With("resource_version", secret.ResourceVersion)
	if rv := secret.ResourceVersion; rv != "" {
		if !newer(rv, w.last) || !w.store.isNew(rv) {
			log.Debug("authorities Secret already known")
			return
		}
		w.last = rv
	}
	data := secret.Data[DataKey]
	if len(data) == 0 {
		log.Debug("authorities Secret holds no authorities yet", "key", DataKey)
		return
	}
	set, err := ca.UnmarshalAuthoritySet(data)
	if err != nil {
		log.Error("skipping stored authorities that do not decode", "key", DataKey, "error", err)
		return
	}
	w.fn(set)
}

func (w *watcher) deleted(obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	if secret, ok := obj.(*corev1.Secret); ok && (secret.Namespace != w.store.namespace || secret.Name != w.store.name) {
		return
	}
	w.store.log.Warn("authorities Secret was deleted; the authorities in memory stay in use, and the leader writes them back")
	select {
	case w.store.deleted <- struct{}{}:
	default: // one is waiting already
	}
}
