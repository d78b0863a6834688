package bundlepublish

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/meshca/meshca/ca"
)

// result is what syncing one namespace did, as counted in metrics.
type result string

const (
	resultCreated   result = "created"
	resultUpdated   result = "updated"
	resultDeleted   result = "deleted"
	resultUnchanged result = "unchanged"
	// resultSkipped: the namespace is gone, terminating, or opted out.
	resultSkipped result = "skipped"
	// resultNotOurs: a ConfigMap of the name exists without our label.
	resultNotOurs result = "not_ours"
	// resultNewer: the ConfigMap holds a later sequence than the Source.
	resultNewer result = "newer_sequence"
	// resultConflict: the ConfigMap changed since the cache saw it.
	resultConflict result = "conflict"
	resultError    result = "error"
)

// sync makes namespace's ConfigMap hold the current bundle, or removes it
// where the namespace opted out. An error means retry later.
func (p *Publisher) sync(ctx context.Context, r *run, namespace string) (result, error) {
	ns, err := r.namespaces.Get(namespace)
	if apierrors.IsNotFound(err) {
		return resultSkipped, nil // deleted, and its ConfigMaps with it
	}
	if err != nil {
		return resultError, fmt.Errorf("bundlepublish: reading namespace %q from the cache: %w", namespace, err)
	}
	if terminating(ns) {
		return resultSkipped, nil
	}
	cm, err := r.configMaps.ConfigMaps(namespace).Get(p.name)
	switch {
	case apierrors.IsNotFound(err):
		cm = nil
	case err != nil:
		return resultError, fmt.Errorf("bundlepublish: reading configmap %s/%s from the cache: %w", namespace, p.name, err)
	}

	if p.optedOut(ns) {
		if cm == nil || !ours(cm) {
			return resultSkipped, nil
		}
		return p.delete(ctx, cm)
	}
	want, err := p.desired()
	if err != nil {
		return resultError, err
	}
	if cm == nil {
		return p.create(ctx, namespace, want)
	}
	if !ours(cm) {
		p.log.Error("a configmap of the trust bundle's name exists and is not meshca's; leaving it alone",
			slog.String("namespace", namespace),
			slog.String("fix", fmt.Sprintf("delete it, or label it %s=%s to let meshca manage it", ManagedByLabel, ManagedByValue)))
		return resultNotOurs, nil
	}
	if seq, ok := heldSequence(cm, want.td); ok && seq > want.seq {
		// A replica whose CA lags behind the shared state would roll the
		// bundle back (and drop a root already trusted); the leader with
		// the current state, or the next bundle change, will write it.
		p.log.Warn("configmap holds a later bundle sequence than this replica; not rolling it back",
			slog.String("namespace", namespace), slog.Uint64("held", seq), slog.Uint64("sequence", want.seq))
		return resultNewer, nil
	}
	if cm.Immutable != nil && *cm.Immutable {
		// An immutable ConfigMap cannot be updated: replace it. The delete
		// event brings the namespace back to the queue.
		return p.delete(ctx, cm)
	}
	if maps.Equal(cm.Data, want.data) && len(cm.BinaryData) == 0 && p.hasLabels(cm) {
		return resultUnchanged, nil
	}
	return p.update(ctx, cm, want)
}

func (p *Publisher) create(ctx context.Context, namespace string, want *content) (result, error) {
	_, err := p.client.CoreV1().ConfigMaps(namespace).Create(ctx, p.newConfigMap(namespace, want), metav1.CreateOptions{})
	switch {
	case err == nil:
		p.log.Debug("created configmap", slog.String("namespace", namespace), slog.Uint64("sequence", want.seq))
		return resultCreated, nil
	case apierrors.HasStatusCause(err, corev1.NamespaceTerminatingCause), apierrors.IsNotFound(err):
		return resultSkipped, nil // the namespace is going or gone
	case apierrors.IsAlreadyExists(err):
		return resultConflict, fmt.Errorf("bundlepublish: creating configmap %s/%s: %w", namespace, p.name, err)
	}
	return resultError, fmt.Errorf("bundlepublish: creating configmap %s/%s: %w", namespace, p.name, err)
}

func (p *Publisher) update(ctx context.Context, cm *corev1.ConfigMap, want *content) (result, error) {
	cm = cm.DeepCopy() // keeps the cached resourceVersion: a conflict, not a lost write
	cm.Data = maps.Clone(want.data)
	cm.BinaryData = nil
	if cm.Labels == nil {
		cm.Labels = make(map[string]string, len(p.labels))
	}
	maps.Copy(cm.Labels, p.labels)
	_, err := p.client.CoreV1().ConfigMaps(cm.Namespace).Update(ctx, cm, metav1.UpdateOptions{})
	switch {
	case err == nil:
		p.log.Debug("updated configmap", slog.String("namespace", cm.Namespace), slog.Uint64("sequence", want.seq))
		return resultUpdated, nil
	case apierrors.IsConflict(err):
		return resultConflict, fmt.Errorf("bundlepublish: updating configmap %s/%s: %w", cm.Namespace, cm.Name, err)
	case apierrors.IsNotFound(err):
		// Deleted meanwhile; its delete event brings it back to the queue.
		return resultConflict, fmt.Errorf("bundlepublish: updating configmap %s/%s: %w", cm.Namespace, cm.Name, err)
	}
	return resultError, fmt.Errorf("bundlepublish: updating configmap %s/%s: %w", cm.Namespace, cm.Name, err)
}

// delete removes cm, only if it is still the object the cache saw.
func (p *Publisher) delete(ctx context.Context, cm *corev1.ConfigMap) (result, error) {
	var pre metav1.Preconditions
	if cm.UID != "" {
		pre.UID = &cm.UID
	}
	if cm.ResourceVersion != "" {
		pre.ResourceVersion = &cm.ResourceVersion
	}
	err := p.client.CoreV1().ConfigMaps(cm.Namespace).Delete(ctx, cm.Name, metav1.DeleteOptions{Preconditions: &pre})
	switch {
	case err == nil:
		p.log.Debug("deleted configmap", slog.String("namespace", cm.Namespace))
		return resultDeleted, nil
	case apierrors.IsNotFound(err):
		return resultDeleted, nil
	case apierrors.IsConflict(err):
		return resultConflict, fmt.Errorf("bundlepublish: deleting configmap %s/%s: %w", cm.Namespace, cm.Name, err)
	}
	return resultError, fmt.Errorf("bundlepublish: deleting configmap %s/%s: %w", cm.Namespace, cm.Name, err)
}

// heldSequence returns the bundle sequence cm holds for trust domain td.
func heldSequence(cm *corev1.ConfigMap, td string) (uint64, bool) {
	if cm.Data[KeyTrustDomain] != td {
		return 0, false
	}
	seq, err := strconv.ParseUint(cm.Data[KeySequence], 10, 64)
	return seq, err == nil
}

// content is a bundle, and the federated bundles, encoded as a
// ConfigMap's data.
type content struct {
	bundle    *x509bundle.Bundle
	seq       uint64
	federated []*spiffebundle.Bundle
	td        string
	data      map[string]string // shared: never modified
}

// desired returns the Source's current bundle and the federated bundles
// encoded, reusing the last encoding while none has changed.
func (p *Publisher) desired() (*content, error) {
	b, seq, _ := p.src.WatchBundle()
	var federated []*spiffebundle.Bundle
	if p.fed != nil {
		federated, _ = p.fed.Watch()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if c := p.content; c != nil && c.bundle == b && c.seq == seq && slices.Equal(c.federated, federated) {
		return c, nil
	}
	data, err := encode(b, seq, p.hint)
	if err != nil {
		return nil, err
	}
	for _, fb := range federated {
		if err := encodeFederated(data, fb); err != nil {
			// One trust domain's bundle cannot be published; the others,
			// and the own bundle, still are.
			p.log.Error("not publishing a federated bundle", slog.String("trust_domain", fb.TrustDomain().Name()), slog.Any("error", err))
		}
	}
	p.content = &content{bundle: b, seq: seq, federated: federated, td: b.TrustDomain().Name(), data: data}
	return p.content, nil
}

// encodeFederated adds federated bundle b to data, under
// FederatedPEMKey and FederatedSPIFFEKey.
func encodeFederated(data map[string]string, b *spiffebundle.Bundle) error {
	td := b.TrustDomain()
	pemKey, docKey := FederatedPEMKey(td), FederatedSPIFFEKey(td)
	for _, k := range []string{pemKey, docKey} {
		if errs := validation.IsConfigMapKey(k); len(errs) > 0 {
			return fmt.Errorf("bundlepublish: trust domain %q makes the configmap key %q, which is not valid: %s", td.Name(), k, strings.Join(errs, "; "))
		}
	}
	if len(b.X509Authorities()) == 0 {
		return fmt.Errorf("bundlepublish: the federated bundle of %q has no X.509 authorities", td.Name())
	}
	pem, err := b.X509Bundle().Marshal()
	if err != nil {
		return fmt.Errorf("bundlepublish: encoding the federated bundle of %q as PEM: %w", td.Name(), err)
	}
	doc, err := b.Marshal()
	if err != nil {
		return fmt.Errorf("bundlepublish: encoding the federated bundle of %q: %w", td.Name(), err)
	}
	data[pemKey], data[docKey] = string(pem), string(doc)
	return nil
}

// encode returns the ConfigMap data for bundle b at sequence seq.
func encode(b *x509bundle.Bundle, seq uint64, hint time.Duration) (map[string]string, error) {
	if b == nil || b.Empty() {
		// Publishing an empty bundle would make every reader trust nothing.
		return nil, errors.New("bundlepublish: the source's bundle has no X.509 authorities; not publishing it")
	}
	pem, err := b.Marshal()
	if err != nil {
		return nil, fmt.Errorf("bundlepublish: encoding the bundle as PEM: %w", err)
	}
	doc, err := ca.MarshalSPIFFEBundle(b, seq, hint)
	if err != nil {
		return nil, fmt.Errorf("bundlepublish: %w", err)
	}
	return map[string]string{
		KeyPEM:         string(pem),
		KeySPIFFE:      string(doc),
		KeySequence:    strconv.FormatUint(seq, 10),
		KeyTrustDomain: b.TrustDomain().Name(),
	}, nil
}
