// Package securefile writes files atomically and reads private files only
// when no one else can read them. meshca's state, keys and the files the
// agent hands to workloads all go through it, so that a crash never leaves
// a half-written file and a key is never accepted from a file others can
// read.
package securefile

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// ErrTooOpen is returned by ReadPrivate for a file that users other than
// its owner may read or write.
var ErrTooOpen = errors.New("securefile: file is accessible by group or others; chmod 600 it")

// WriteFile writes data to path atomically: a reader sees the old content
// or the new, never a mix. It writes a temporary file in the same
// directory, syncs it, renames it over path and syncs the directory.
func WriteFile(path string, data []byte, perm fs.FileMode) (err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, tempPattern(path))
	if err != nil {
		return fmt.Errorf("securefile: %w", err)
	}
	defer func() {
		if err != nil {
			_ = tmp.Close()
			_ = os.Remove(tmp.Name())
		}
	}()
	if err := tmp.Chmod(perm); err != nil {
		return fmt.Errorf("securefile: %w", err)
	}
	if _, err := tmp.Write(data); err != nil {
		return fmt.Errorf("securefile: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("securefile: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("securefile: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("securefile: %w", err)
	}
	return syncDir(dir)
}

// tempPattern returns the pattern of WriteFile's temporary files for
// path, for os.CreateTemp: a dot file beside path, named after it.
func tempPattern(path string) string { return "." + filepath.Base(path) + ".tmp-*" }

// RemoveTemps removes the temporary files that WriteFile calls for path
// left behind: a process killed during a write leaves one, which nothing
// reads. Only files of WriteFile's own naming for path are removed
// ("."+name+".tmp-" and os.CreateTemp's digits); run it when no write to
// path can be under way, such as at start. It returns the names of the
// files it removed.
func RemoveTemps(path string) ([]string, error) {
	dir := filepath.Dir(path)
	prefix, _, _ := strings.Cut(tempPattern(path), "*")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("securefile: %w", err)
	}
	var removed []string
	for _, e := range entries {
		suffix, ok := strings.CutPrefix(e.Name(), prefix)
		if !ok || !e.Type().IsRegular() || !allDigits(suffix) {
			continue
		}
		name := filepath.Join(dir, e.Name())
		if err := os.Remove(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return removed, fmt.Errorf("securefile: removing a stale temporary file: %w", err)
		}
		removed = append(removed, name)
	}
	return removed, nil
}

// allDigits reports whether s is a non-empty string of ASCII digits, as
// the random part of os.CreateTemp's names is.
func allDigits(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("securefile: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("securefile: syncing %s: %w", dir, err)
	}
	return nil
}

// ReadPrivate reads a file that holds a secret. It refuses, with an error
// wrapping ErrTooOpen, a file whose mode lets group or others in.
func ReadPrivate(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("securefile: %w", err)
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("securefile: %w", err)
	}
	if mode := info.Mode().Perm(); mode&0o077 != 0 {
		return nil, fmt.Errorf("%w: %s has mode %#o", ErrTooOpen, path, mode)
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("securefile: %w", err)
	}
	return data, nil
}
