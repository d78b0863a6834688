package securefile_test

import (
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/internal/securefile"
)

func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func perm(t *testing.T, path string) fs.FileMode {
	t.Helper()
	info, err := os.Stat(path)
	require.NoError(t, err)
	return info.Mode().Perm()
}

func TestWriteFileNew(t *testing.T) {
	for _, mode := range []fs.FileMode{0o600, 0o400, 0o640, 0o644} {
		t.Run(mode.String(), func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "state.json")
			require.NoError(t, securefile.WriteFile(path, []byte("hello"), mode))

			data, err := os.ReadFile(path)
			require.NoError(t, err)
			require.Equal(t, "hello", string(data))
			require.Equal(t, mode, perm(t, path), "mode is set exactly, whatever the umask")
			require.Equal(t, []string{"state.json"}, dirNames(t, dir), "temporary files left behind")
		})
	}
}

func TestWriteFileReplaces(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state.json")
	require.NoError(t, os.WriteFile(path, []byte("old content, longer than the new"), 0o644))
	require.NoError(t, os.Chmod(path, 0o644))

	// A reader that opened the old file keeps reading the old content: the
	// file is replaced by a rename, never rewritten in place.
	old, err := os.Open(path)
	require.NoError(t, err)
	defer old.Close()
	oldInfo, err := old.Stat()
	require.NoError(t, err)

	require.NoError(t, securefile.WriteFile(path, []byte("new"), 0o600))

	data, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Equal(t, "new", string(data))
	require.Equal(t, fs.FileMode(0o600), perm(t, path))
	require.Equal(t, []string{"state.json"}, dirNames(t, dir), "temporary files left behind")

	newInfo, err := os.Stat(path)
	require.NoError(t, err)
	require.False(t, os.SameFile(oldInfo, newInfo), "the file was rewritten in place")
	oldData := make([]byte, 64)
	n, err := old.Read(oldData)
	require.NoError(t, err)
	require.Equal(t, "old content, longer than the new", string(oldData[:n]))
}

func TestWriteFileEmpty(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "empty")
	require.NoError(t, securefile.WriteFile(path, nil, 0o600))
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Empty(t, data)
}

func TestWriteFileFailures(t *testing.T) {
	t.Run("directory does not exist", func(t *testing.T) {
		dir := t.TempDir()
		err := securefile.WriteFile(filepath.Join(dir, "missing", "state.json"), []byte("x"), 0o600)
		require.ErrorIs(t, err, fs.ErrNotExist)
		require.ErrorContains(t, err, "securefile: ")
		require.Empty(t, dirNames(t, dir))
	})

	t.Run("path is a directory", func(t *testing.T) {
		// The rename fails after the temporary file is written: it must be
		// removed.
		dir := t.TempDir()
		path := filepath.Join(dir, "state.json")
		require.NoError(t, os.Mkdir(path, 0o700))
		require.NoError(t, os.WriteFile(filepath.Join(path, "inside"), nil, 0o600))

		err := securefile.WriteFile(path, []byte("x"), 0o600)
		require.ErrorContains(t, err, "securefile: ")
		require.Equal(t, []string{"state.json"}, dirNames(t, dir), "temporary file left behind")
		require.Equal(t, []string{"inside"}, dirNames(t, path))
	})
}

func TestReadPrivate(t *testing.T) {
	tests := []struct {
		mode    fs.FileMode
		refused bool
	}{
		{mode: 0o600},
		{mode: 0o400},
		{mode: 0o700},
		{mode: 0o640, refused: true},
		{mode: 0o604, refused: true},
		{mode: 0o620, refused: true},
		{mode: 0o602, refused: true},
		{mode: 0o644, refused: true},
		{mode: 0o666, refused: true},
	}
	for _, tt := range tests {
		t.Run(tt.mode.String(), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "key.pem")
			require.NoError(t, os.WriteFile(path, []byte("secret"), 0o600))
			require.NoError(t, os.Chmod(path, tt.mode))

			data, err := securefile.ReadPrivate(path)
			if !tt.refused {
				require.NoError(t, err)
				require.Equal(t, "secret", string(data))
				return
			}
			require.Nil(t, data)
			require.ErrorIs(t, err, securefile.ErrTooOpen)
			require.EqualError(t, err, "securefile: file is accessible by group or others; chmod 600 it: "+path+" has mode "+octal(tt.mode))
			require.NotContains(t, err.Error(), "secret")
		})
	}
}

func TestReadPrivateMissing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing")
	_, err := securefile.ReadPrivate(path)
	require.ErrorIs(t, err, fs.ErrNotExist)
	require.NotErrorIs(t, err, securefile.ErrTooOpen)
	require.EqualError(t, err, "securefile: open "+path+": no such file or directory")
}

func TestWriteFileThenReadPrivate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "key.pem")
	require.NoError(t, securefile.WriteFile(path, []byte("secret"), 0o600))
	data, err := securefile.ReadPrivate(path)
	require.NoError(t, err)
	require.Equal(t, "secret", string(data))

	require.NoError(t, securefile.WriteFile(path, []byte("secret"), 0o640))
	_, err = securefile.ReadPrivate(path)
	require.ErrorIs(t, err, securefile.ErrTooOpen)
}

func octal(m fs.FileMode) string {
	const digits = "01234567"
	return "0" + string([]byte{digits[m>>6&7], digits[m>>3&7], digits[m&7]})
}

func TestRemoveTemps(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state.json")
	require.NoError(t, securefile.WriteFile(path, []byte("state"), 0o600))
	// What a writer killed before its rename leaves: a temporary file
	// named as WriteFile names them.
	var stale []string
	for range 3 {
		tmp, err := os.CreateTemp(dir, ".state.json.tmp-*")
		require.NoError(t, err)
		require.NoError(t, tmp.Close())
		stale = append(stale, tmp.Name())
	}
	kept := []string{"state.json", ".state.json.tmp-", ".state.json.tmp-12a", ".other.json.tmp-12", "state.json.tmp-12", ".state.json.tmp-12.bak"}
	for _, name := range kept[1:] {
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), nil, 0o600))
	}
	require.NoError(t, os.Mkdir(filepath.Join(dir, ".state.json.tmp-77"), 0o700))
	kept = append(kept, ".state.json.tmp-77")

	removed, err := securefile.RemoveTemps(path)
	require.NoError(t, err)
	require.ElementsMatch(t, stale, removed)
	require.ElementsMatch(t, kept, dirNames(t, dir))
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Equal(t, "state", string(data))

	// Nothing left to remove; and a directory that does not exist is an
	// error.
	removed, err = securefile.RemoveTemps(path)
	require.NoError(t, err)
	require.Empty(t, removed)
	_, err = securefile.RemoveTemps(filepath.Join(dir, "missing", "state.json"))
	require.ErrorIs(t, err, fs.ErrNotExist)
	require.ErrorContains(t, err, "securefile: ")
}
