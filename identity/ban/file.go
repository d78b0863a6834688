package ban

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"sync"

	"github.com/meshca/meshca/internal/securefile"
)

// FileStore keeps the bans in one file (<dataDir>/bans.json), written
// atomically with mode 0600, for a single server. It is safe for
// concurrent use within one process.
type FileStore struct {
	path string
	mu   sync.Mutex
}

var _ Store = (*FileStore)(nil)

// NewFileStore returns a store of the bans in the file at path. It reads
// nothing yet.
func NewFileStore(path string) (*FileStore, error) {
	if path == "" {
		return nil, errors.New("ban: a file path is required")
	}
	return &FileStore{path: path}, nil
}

// Load reads the bans; none when the file does not exist. A file others
// may read or write, or one that does not decode, is an error.
func (s *FileStore) Load(context.Context) ([]Ban, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.load()
}

func (s *FileStore) load() ([]Ban, error) {
	data, err := securefile.ReadPrivate(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("ban: %w", err)
	}
	bans, err := Unmarshal(data)
	if err != nil {
		return nil, fmt.Errorf("%w (file %s)", err, s.path)
	}
	return bans, nil
}

// Update writes what fn makes of the stored bans, atomically.
func (s *FileStore) Update(_ context.Context, fn func([]Ban) ([]Ban, error)) ([]Ban, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	bans, err := s.load()
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
	if err := securefile.WriteFile(s.path, data, 0o600); err != nil {
		return nil, fmt.Errorf("ban: %w", err)
	}
	return next, nil
}
