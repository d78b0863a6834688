package kubestore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"sync"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/resourceversion"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"

	"github.com/meshca/meshca/ca"
)

// DataKey is the key of the Secret's data that holds the authority set.
const DataKey = "authorities.json"

// DefaultSecretName is the Secret's name when Options.Name is empty.
const DefaultSecretName = "meshca-authorities"

// labels are set on the Secret at every save.
var labels = map[string]string{"app.kubernetes.io/name": "meshca"}

// ErrConflict is wrapped by Save when the Secret changed after this Store
// last read or wrote it: another replica saved first. The caller must
// Load the current set and decide again; Save never overwrites a change
// it has not seen.
// errors.Is(err, ca.ErrConflict) holds for it too, so that callers that
// know only ca.Store, such as rotation.Manager, tell it apart.
var ErrConflict error = conflictError{}

type conflictError struct{}

func (conflictError) Error() string        { return "kubestore: someone else changed the authorities; reload" }
func (conflictError) Is(target error) bool { return target == ca.ErrConflict }

// Options configure a Store.
type Options struct {
	// Client reaches the Secrets API. Required.
	Client corev1client.SecretsGetter

	// Namespace is the CA's namespace, where the Secret lives. Required.
	Namespace string

	// Name is the Secret's name; empty means DefaultSecretName.
	Name string

	// Logger receives what Watch skips; nil discards.
	Logger *slog.Logger
}

// Store is a ca.Store in a Kubernetes Secret. Writes are conditional on
// the resourceVersion last read or written, so that replicas sharing the
// Secret never overwrite each other. It is safe for concurrent use.
type Store struct {
	client    corev1client.SecretsGetter
	namespace string
	name      string
	log       *slog.Logger

	mu sync.Mutex
	// base is the Secret as last read or written; nil when it was absent.
	// Save writes over base.ResourceVersion and nothing newer.
	base *corev1.Secret
	// latest is the highest resourceVersion this Store has read or
	// written; Watch does not report versions at or below it.
	latest string

	// deleted receives a value (without blocking, at most one waits)
	// when Watch sees the Secret deleted.
	deleted chan struct{}
}

var _ ca.Store = (*Store)(nil)

// New returns a Store for the Secret opts names. It makes no API call.
func New(opts Options) (*Store, error) {
	if opts.Client == nil {
		return nil, errors.New("kubestore: a Secrets client is required")
	}
	if opts.Namespace == "" {
		return nil, errors.New("kubestore: a namespace is required")
	}
	if opts.Name == "" {
		opts.Name = DefaultSecretName
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Store{
		client:    opts.Client,
		namespace: opts.Namespace,
		name:      opts.Name,
		log:       opts.Logger.With("secret", opts.Namespace+"/"+opts.Name),
		deleted:   make(chan struct{}, 1),
	}, nil
}

// Deleted receives a value when Watch has seen the Secret deleted since
// the last receive. It is for the replica that keeps the store (the
// leader), which then calls Restore.
func (s *Store) Deleted() <-chan struct{} { return s.deleted }

// Restore saves set when the Secret is gone or holds no authorities, and
// reports whether it did; a Secret that holds authorities is left as it
// is. It puts back a Secret deleted while the servers ran, from the
// authorities they hold in memory: otherwise the next replica to start
// would find none and make a new root, and the replicas would sign under
// two roots. The read and the write are one step under the Store's lock,
// and the write is made over the version read (a create when there was
// none): a Save in between, by this Store or another writer, makes it
// fail with ErrConflict rather than be overwritten.
func (s *Store) Restore(ctx context.Context, set *ca.AuthoritySet) (bool, error) {
	data, err := ca.MarshalAuthoritySet(set)
	if err != nil {
		return false, fmt.Errorf("kubestore: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	secrets := s.client.Secrets(s.namespace)
	current, err := secrets.Get(ctx, s.name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		current = nil
	case err != nil:
		return false, fmt.Errorf("kubestore: reading Secret %s/%s: %w", s.namespace, s.name, err)
	case len(current.Data[DataKey]) > 0:
		return false, nil
	}
	s.base = current
	if err := s.saveLocked(ctx, data); err != nil {
		return false, err
	}
	return true, nil
}

// Load reads the authority set; ca.ErrNotFound when the Secret is absent
// or holds no DataKey (a Secret created empty by the deployment, so that
// RBAC can name it). The version read becomes the one the next Save
// writes over, unless it does not decode: the Store then keeps the
// previous one, and saves conflict until a Load succeeds.
func (s *Store) Load(ctx context.Context) (*ca.AuthoritySet, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	secret, err := s.client.Secrets(s.namespace).Get(ctx, s.name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		s.base = nil
		return nil, ca.ErrNotFound
	case err != nil:
		return nil, fmt.Errorf("kubestore: reading Secret %s/%s: %w", s.namespace, s.name, err)
	}
	data := secret.Data[DataKey]
	if len(data) == 0 {
		s.remember(secret)
		return nil, ca.ErrNotFound
	}
	set, err := ca.UnmarshalAuthoritySet(data)
	if err != nil {
		// Saves stay based on the last version understood: what cannot be
		// read (say, a newer build's format during an upgrade) is never
		// overwritten.
		return nil, fmt.Errorf("kubestore: Secret %s/%s key %s: %w", s.namespace, s.name, DataKey, err)
	}
	s.remember(secret)
	return set, nil
}

// Save writes set if the Secret is as this Store last read or wrote it:
// it creates the Secret when Load found none (or was never called), and
// otherwise updates it with the resourceVersion Load or the previous Save
// saw, keeping the Secret's other keys, labels and annotations. When
// another writer got there first, Save changes nothing and returns an
// error wrapping ErrConflict.
func (s *Store) Save(ctx context.Context, set *ca.AuthoritySet) error {
	data, err := ca.MarshalAuthoritySet(set)
	if err != nil {
		return fmt.Errorf("kubestore: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.saveLocked(ctx, data)
}

// saveLocked is Save under s.mu.
func (s *Store) saveLocked(ctx context.Context, data []byte) error {
	secrets := s.client.Secrets(s.namespace)
	if s.base == nil {
		secret := &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: s.name, Namespace: s.namespace, Labels: maps.Clone(labels)},
			Type:       corev1.SecretTypeOpaque,
			Data:       map[string][]byte{DataKey: data},
		}
		created, err := secrets.Create(ctx, secret, metav1.CreateOptions{})
		switch {
		case apierrors.IsAlreadyExists(err):
			return fmt.Errorf("%w: Secret %s/%s was created by another writer: %w", ErrConflict, s.namespace, s.name, err)
		case err != nil:
			return fmt.Errorf("kubestore: creating Secret %s/%s: %w", s.namespace, s.name, err)
		}
		s.remember(created)
		return nil
	}
	secret := s.base.DeepCopy()
	if secret.Data == nil {
		secret.Data = map[string][]byte{}
	}
	secret.Data[DataKey] = data
	if secret.Labels == nil {
		secret.Labels = map[string]string{}
	}
	maps.Copy(secret.Labels, labels)
	updated, err := secrets.Update(ctx, secret, metav1.UpdateOptions{})
	switch {
	case apierrors.IsConflict(err):
		return fmt.Errorf("%w: Secret %s/%s changed after resourceVersion %s: %w", ErrConflict, s.namespace, s.name, s.base.ResourceVersion, err)
	case apierrors.IsNotFound(err):
		return fmt.Errorf("%w: Secret %s/%s was deleted: %w", ErrConflict, s.namespace, s.name, err)
	case err != nil:
		return fmt.Errorf("kubestore: updating Secret %s/%s: %w", s.namespace, s.name, err)
	}
	s.remember(updated)
	return nil
}

// remember makes secret the base of the next Save. s.mu must be held.
func (s *Store) remember(secret *corev1.Secret) {
	s.base = secret.DeepCopy()
	if secret.ResourceVersion != "" && newer(secret.ResourceVersion, s.latest) {
		s.latest = secret.ResourceVersion
	}
}

// isNew reports whether a Secret at resourceVersion rv is newer than
// anything this Store has read or written.
func (s *Store) isNew(rv string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return newer(rv, s.latest)
}

// newer reports whether resourceVersion a is after b. Resource versions
// compare as integers (Kubernetes 1.35 made that a guarantee); when one
// does not parse, any difference counts as newer.
func newer(a, b string) bool {
	if b == "" {
		return a != ""
	}
	c, err := resourceversion.CompareResourceVersion(a, b)
	if err != nil {
		return a != b
	}
	return c > 0
}

// LoadOrCreate is ca.LoadOrCreate for a store shared by replicas: when
// another replica saves first (two replicas starting together, both
// finding no authorities), it loads and uses what that replica saved
// instead of failing, and never overwrites it.
func LoadOrCreate(ctx context.Context, store ca.Store, opts ca.AuthorityOptions) (*ca.AuthoritySet, error) {
	const attempts = 3
	var err error
	for range attempts {
		var set *ca.AuthoritySet
		set, err = ca.LoadOrCreate(ctx, store, opts)
		if !errors.Is(err, ErrConflict) {
			return set, err
		}
	}
	return nil, fmt.Errorf("kubestore: authorities changed by another writer at each of %d attempts: %w", attempts, err)
}
