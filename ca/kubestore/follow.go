package kubestore

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"

	"github.com/meshca/meshca/ca"
)

// Follow applies to c every change of the stored authority set, until ctx
// is done: a replica that does not rotate takes up the leader's rotations.
// A set that would take c's bundle sequence back, or that c refuses, is
// logged and skipped. logger nil discards.
func Follow(ctx context.Context, store *Store, c *ca.CA, logger *slog.Logger) error {
	if logger == nil {
		logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	logger = logger.With("secret", store.namespace+"/"+store.name)
	return store.Watch(ctx, func(set *ca.AuthoritySet) {
		applied, err := apply(c, set)
		switch {
		case err != nil:
			logger.Error("stored authorities not applied", "stored_sequence", set.Sequence, "error", err)
		case !applied:
			logger.Debug("stored authorities are the CA's already", "bundle_sequence", set.Sequence)
		default:
			logger.Info("authorities updated from the store", "bundle_sequence", set.Sequence,
				"issuer_serial", set.Issuer.Cert.SerialNumber.Text(16))
		}
	})
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

// apply makes set c's and reports whether anything changed.
func apply(c *ca.CA, set *ca.AuthoritySet) (bool, error) {
	cur := c.Authorities()
	if set.Sequence < cur.Sequence {
		return false, fmt.Errorf("stored bundle sequence %d is below the CA's %d; the store holds older authorities than this replica", set.Sequence, cur.Sequence)
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
