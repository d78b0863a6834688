package kubestore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/meshca/meshca/ca"
)

// DefaultFollowRetry is how often Follow tries again a stored set the CA
// refused.
const DefaultFollowRetry = 10 * time.Second

// Follow applies to c every change of the stored authority set, until ctx
// is done: a replica that does not rotate takes up the leader's rotations.
// A set c refuses (say, an intermediate not yet valid on this replica's
// clock) is logged and tried again every retry (zero means
// DefaultFollowRetry) until it applies or a newer one replaces it, so that
// a replica never stays behind for want of a new write. logger nil
// discards.
func Follow(ctx context.Context, store *Store, c *ca.CA, logger *slog.Logger, retry time.Duration) error {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if retry <= 0 {
		retry = DefaultFollowRetry
	}
	logger = logger.With("secret", store.namespace+"/"+store.name)
	var (
		mu      sync.Mutex
		pending *ca.AuthoritySet // the latest stored set not yet applied
	)
	try := func(set *ca.AuthoritySet, first bool) {
		applied, err := apply(c, set)
		mu.Lock()
		defer mu.Unlock()
		switch {
		case errors.As(err, new(olderError)):
			// Never applies: the CA is ahead of it.
			logger.Error("stored authorities not applied", "stored_sequence", set.Sequence, "error", err)
			if pending == set {
				pending = nil
			}
			return
		case err != nil:
			if first {
				logger.Error("stored authorities not applied", "stored_sequence", set.Sequence, "error", err, "retry_every", retry.String())
				pending = set
			}
			return
		case !applied:
			logger.Debug("stored authorities are the CA's already", "bundle_sequence", set.Sequence)
		default:
			logger.Info("authorities updated from the store", "bundle_sequence", set.Sequence,
				"issuer_serial", set.Issuer.Cert.SerialNumber.Text(16))
		}
		if pending == set || first {
			pending = nil
		}
	}
	go func() {
		t := time.NewTicker(retry)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			mu.Lock()
			set := pending
			mu.Unlock()
			if set != nil {
				try(set, false)
			}
		}
	}()
	return store.Watch(ctx, func(set *ca.AuthoritySet) { try(set, true) })
}

// Reload loads the stored authority set and makes it c's, unless c has it
// already. A replica calls it when it becomes leader and after a Save
// fails with ErrConflict, so that its next change is made to the stored
// set and saved over the version it was made from.
func Reload(ctx context.Context, store ca.Store, c *ca.CA) error {
	set, err := store.Load(ctx)
	if err != nil {
		return err
	}
	if _, err := apply(c, set); err != nil {
		return fmt.Errorf("kubestore: reloading authorities: %w", err)
	}
	return nil
}

// olderError is a stored set older than the CA's: it never applies.
type olderError struct{ stored, current uint64 }

func (e olderError) Error() string {
	return fmt.Sprintf("stored bundle sequence %d is below the CA's %d; the store holds older authorities than this replica", e.stored, e.current)
}

// apply makes set c's and reports whether anything changed.
func apply(c *ca.CA, set *ca.AuthoritySet) (bool, error) {
	cur := c.Authorities()
	if set.Sequence < cur.Sequence {
		return false, olderError{stored: set.Sequence, current: cur.Sequence}
	}
	if same(cur, set) {
		return false, nil
	}
	if err := c.SetAuthorities(set); err != nil {
		return false, err
	}
	return true, nil
}

// same reports whether a and b encode the same.
func same(a, b *ca.AuthoritySet) bool {
	ea, err := ca.MarshalAuthoritySet(a)
	if err != nil {
		return false
	}
	eb, err := ca.MarshalAuthoritySet(b)
	if err != nil {
		return false
	}
	return bytes.Equal(ea, eb)
}
