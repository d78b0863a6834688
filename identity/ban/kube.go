package ban

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
)

// SecretKey is the key of the Secret's data that holds the bans.
const SecretKey = "bans.json"

// DefaultSecretName is the Secret's name when KubeOptions.Name is empty.
const DefaultSecretName = "meshca-bans"

// updateAttempts bounds the read-modify-write rounds of one Update, and
// updateBackoff is the wait before the second; it doubles, with jitter,
// so replicas that keep colliding fall out of step.
const (
	updateAttempts = 10
	updateBackoff  = 10 * time.Millisecond
)

// watchBackoff bounds the wait before a broken watch is tried again.
const (
	watchBackoffMin = 500 * time.Millisecond
	watchBackoffMax = 30 * time.Second
)

// KubeOptions configure a KubeStore.
type KubeOptions struct {
	// Client reaches the Secrets API. Required.
	Client corev1client.SecretsGetter

	// Namespace is the CA's namespace, where the Secret lives. Required.
	Namespace string

	// Name is the Secret's name; empty means DefaultSecretName.
	Name string

	// Logger receives what Watch skips; nil discards.
	Logger *slog.Logger
}

// KubeStore keeps the bans in a Secret shared by the replicas. Updates are
// conditional on the resourceVersion read, and are made again from the
// current Secret when another replica wrote first: no concurrent change is
// lost. Watch tells each replica of the others' changes.
type KubeStore struct {
	client    corev1client.SecretsGetter
	namespace string
	name      string
	log       *slog.Logger

	// writing makes one replica's Updates take turns, so that only
	// other replicas' writes can conflict with one: a one-slot
	// semaphore, so that a caller waiting its turn can give up.
	writing chan struct{}
}

var (
	_ Store   = (*KubeStore)(nil)
	_ Watcher = (*KubeStore)(nil)
)

// NewKubeStore returns a store of the bans in the Secret opts names. It
// makes no API call.
func NewKubeStore(opts KubeOptions) (*KubeStore, error) {
	if opts.Client == nil || opts.Namespace == "" {
		return nil, errors.New("ban: a Secrets client and a namespace are required")
	}
	if opts.Name == "" {
		opts.Name = DefaultSecretName
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &KubeStore{client: opts.Client, namespace: opts.Namespace, name: opts.Name,
		log: opts.Logger.With("secret", opts.Namespace+"/"+opts.Name), writing: make(chan struct{}, 1)}, nil
}

// Load reads the bans; none when the Secret is absent or empty.
func (s *KubeStore) Load(ctx context.Context) ([]Ban, error) {
	_, bans, err := s.get(ctx)
	return bans, err
}

// get returns the Secret (nil when absent) and its bans.
func (s *KubeStore) get(ctx context.Context) (*corev1.Secret, []Ban, error) {
	secret, err := s.client.Secrets(s.namespace).Get(ctx, s.name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return nil, nil, nil
	case err != nil:
		return nil, nil, fmt.Errorf("ban: reading Secret %s/%s: %w", s.namespace, s.name, err)
	}
	bans, err := Unmarshal(secret.Data[SecretKey])
	if err != nil {
		return nil, nil, fmt.Errorf("%w (Secret %s/%s key %s)", err, s.namespace, s.name, SecretKey)
	}
	return secret, bans, nil
}

// Update applies fn to the Secret's bans and writes the result over the
// version read; when another writer got there first, it reads again and
// applies fn again after a jittered backoff, up to updateAttempts times.
// A Secret whose bans do not decode is never overwritten.
func (s *KubeStore) Update(ctx context.Context, fn func([]Ban) ([]Ban, error)) ([]Ban, error) {
	select {
	case s.writing <- struct{}{}:
		defer func() { <-s.writing }()
	case <-ctx.Done():
		return nil, fmt.Errorf("ban: waiting to write Secret %s/%s: %w", s.namespace, s.name, ctx.Err())
	}
	secrets := s.client.Secrets(s.namespace)
	var lastErr error
	backoff := updateBackoff
	for attempt := range updateAttempts {
		if attempt > 0 {
			wait := backoff/2 + rand.N(backoff)
			backoff *= 2
			select {
			case <-ctx.Done():
				return nil, fmt.Errorf("ban: writing Secret %s/%s: %w (last conflict: %w)", s.namespace, s.name, ctx.Err(), lastErr)
			case <-time.After(wait):
			}
		}
		secret, bans, err := s.get(ctx)
		if err != nil {
			return nil, err
		}
		next, err := fn(bans)
		if err != nil {
			return nil, err
		}
		data, err := Marshal(next)
		if err != nil {
			return nil, err
		}
		if secret == nil {
			secret = &corev1.Secret{
				ObjectMeta: metav1.ObjectMeta{Name: s.name, Namespace: s.namespace,
					Labels: map[string]string{"app.kubernetes.io/name": "meshca"}},
				Type: corev1.SecretTypeOpaque,
				Data: map[string][]byte{SecretKey: data},
			}
			_, err = secrets.Create(ctx, secret, metav1.CreateOptions{})
		} else {
			secret = secret.DeepCopy()
			if secret.Data == nil {
				secret.Data = map[string][]byte{}
			}
			secret.Data[SecretKey] = data
			_, err = secrets.Update(ctx, secret, metav1.UpdateOptions{})
		}
		switch {
		case err == nil:
			return next, nil
		case apierrors.IsConflict(err), apierrors.IsAlreadyExists(err), apierrors.IsNotFound(err):
			// Another replica wrote first: decide again on what it wrote.
			lastErr = err
			continue
		default:
			return nil, fmt.Errorf("ban: writing Secret %s/%s: %w", s.namespace, s.name, err)
		}
	}
	return nil, fmt.Errorf("ban: Secret %s/%s changed by other writers at each of %d attempts: %w", s.namespace, s.name, updateAttempts, lastErr)
}

// Watch calls changed with the Secret's bans on every change, starting
// with the current ones, until ctx is done. A broken watch, or a Secret
// that does not decode, is reported to failed and the watch starts again
// after a backoff; changed is not called meanwhile, so the caller keeps
// the bans it last heard. A deleted Secret is logged and not reported:
// bans are lifted with Remove, never by losing the Secret.
func (s *KubeStore) Watch(ctx context.Context, changed func([]Ban), failed func(error)) error {
	backoff := watchBackoffMin
	for {
		err := s.watchOnce(ctx, changed, failed)
		if ctx.Err() != nil {
			return nil
		}
		if err == nil {
			// The server ended the watch, as it does every few minutes.
			backoff = watchBackoffMin
			continue
		}
		failed(err)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		backoff = min(2*backoff, watchBackoffMax)
	}
}

// watchOnce lists the Secret, reports its bans, and watches it from the
// version listed until the watch ends. Its error says why the watch
// broke; nil when the server ended it.
func (s *KubeStore) watchOnce(ctx context.Context, changed func([]Ban), failed func(error)) error {
	selector := fields.OneTermEqualSelector("metadata.name", s.name).String()
	secrets := s.client.Secrets(s.namespace)
	list, err := secrets.List(ctx, metav1.ListOptions{FieldSelector: selector})
	if err != nil {
		return fmt.Errorf("ban: listing Secret %s/%s: %w", s.namespace, s.name, err)
	}
	for i := range list.Items {
		s.report(&list.Items[i], changed, failed)
	}
	w, err := secrets.Watch(ctx, metav1.ListOptions{FieldSelector: selector, ResourceVersion: list.ResourceVersion, AllowWatchBookmarks: true})
	if err != nil {
		return fmt.Errorf("ban: watching Secret %s/%s: %w", s.namespace, s.name, err)
	}
	defer w.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.ResultChan():
			if !ok {
				return nil
			}
			switch ev.Type {
			case watch.Added, watch.Modified:
				if secret, ok := ev.Object.(*corev1.Secret); ok {
					s.report(secret, changed, failed)
				}
			case watch.Deleted:
				s.log.Warn("bans Secret was deleted; the bans in memory stay in force until it is written again")
			case watch.Error:
				return fmt.Errorf("ban: watching Secret %s/%s: %w", s.namespace, s.name, apierrors.FromObject(ev.Object))
			}
		}
	}
}

// report decodes secret's bans and passes them to changed, or the error
// to failed.
func (s *KubeStore) report(secret *corev1.Secret, changed func([]Ban), failed func(error)) {
	if secret.Name != s.name || secret.Namespace != s.namespace {
		return
	}
	bans, err := Unmarshal(secret.Data[SecretKey])
	if err != nil {
		failed(fmt.Errorf("%w (Secret %s/%s resourceVersion %s)", err, s.namespace, s.name, secret.ResourceVersion))
		return
	}
	changed(bans)
}
