// Package filestore keeps meshca's authority set in a data directory: one
// JSON file, mode 0600, replaced atomically on every save. It is the
// embedded default store, for a single server outside Kubernetes.
//
//	store, err := filestore.New("/var/lib/meshca")
//	set, err := ca.LoadOrCreate(ctx, store, ca.AuthorityOptions{TrustDomain: td})
package filestore

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/securefile"
)

// FileName is the state file's name in the data directory.
const FileName = "authorities.json"

// Store is a ca.Store in a directory.
type Store struct {
	path string
}

var _ ca.Store = (*Store)(nil)

// New returns a store in dir, creating dir (mode 0700) if needed. It
// refuses a dir that group or others can enter. It removes the temporary
// files a server killed while saving left in dir (securefile.RemoveTemps):
// a store is the only writer of its file, and no save runs before New
// returns.
func New(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("filestore: %w", err)
	}
	info, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("filestore: %w", err)
	}
	if perm := info.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("filestore: data directory %s has mode %#o; it holds CA keys, chmod 700 it", dir, perm)
	}
	path := filepath.Join(dir, FileName)
	if _, err := securefile.RemoveTemps(path); err != nil {
		return nil, fmt.Errorf("filestore: %w", err)
	}
	return &Store{path: path}, nil
}

// Load reads the authority set; ca.ErrNotFound when there is none yet.
func (s *Store) Load(context.Context) (*ca.AuthoritySet, error) {
	data, err := securefile.ReadPrivate(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, ca.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("filestore: %w", err)
	}
	set, err := ca.UnmarshalAuthoritySet(data)
	if err != nil {
		return nil, fmt.Errorf("filestore: %s: %w", s.path, err)
	}
	return set, nil
}

// Save replaces the stored set atomically.
func (s *Store) Save(_ context.Context, set *ca.AuthoritySet) error {
	data, err := ca.MarshalAuthoritySet(set)
	if err != nil {
		return fmt.Errorf("filestore: %w", err)
	}
	if err := securefile.WriteFile(s.path, data, 0o600); err != nil {
		return fmt.Errorf("filestore: %w", err)
	}
	return nil
}
