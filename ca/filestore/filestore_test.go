package filestore_test

import (
	"context"
	"crypto"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/filestore"
	"github.com/meshca/meshca/internal/securefile"
	"github.com/meshca/meshca/testca"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

func newStore(t *testing.T) (*filestore.Store, string, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "data")
	store, err := filestore.New(dir)
	require.NoError(t, err)
	return store, dir, filepath.Join(dir, filestore.FileName)
}

func newSet(t *testing.T) *ca.AuthoritySet {
	t.Helper()
	return testca.New(t, td).ChildCA().AuthoritySet()
}

func mode(t *testing.T, path string) fs.FileMode {
	t.Helper()
	info, err := os.Stat(path)
	require.NoError(t, err)
	return info.Mode().Perm()
}

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

func TestNew(t *testing.T) {
	t.Run("creates the directory 0700", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "a", "b")
		_, err := filestore.New(dir)
		require.NoError(t, err)
		require.Equal(t, fs.FileMode(0o700), mode(t, dir))
	})

	t.Run("existing private directory", func(t *testing.T) {
		dir := t.TempDir()
		require.NoError(t, os.Chmod(dir, 0o700))
		_, err := filestore.New(dir)
		require.NoError(t, err)
	})

	for _, perm := range []fs.FileMode{0o755, 0o750, 0o701, 0o707} {
		t.Run("refuses mode "+perm.String(), func(t *testing.T) {
			dir := t.TempDir()
			require.NoError(t, os.Chmod(dir, perm))
			store, err := filestore.New(dir)
			require.Nil(t, store)
			require.EqualError(t, err, "filestore: data directory "+dir+" has mode "+octal(perm)+"; it holds CA keys, chmod 700 it")
		})
	}

	t.Run("path is a file", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "file")
		require.NoError(t, os.WriteFile(path, nil, 0o600))
		_, err := filestore.New(path)
		require.ErrorContains(t, err, "filestore: ")
	})
}

func octal(m fs.FileMode) string {
	const digits = "01234567"
	return "0" + string([]byte{digits[m>>6&7], digits[m>>3&7], digits[m&7]})
}

func TestLoadEmpty(t *testing.T) {
	store, _, _ := newStore(t)
	set, err := store.Load(context.Background())
	require.ErrorIs(t, err, ca.ErrNotFound)
	require.Equal(t, ca.ErrNotFound, err, "ErrNotFound is returned as is")
	require.Nil(t, set)
}

func TestSaveLoad(t *testing.T) {
	ctx := context.Background()
	store, dir, path := newStore(t)

	first := newSet(t)
	require.NoError(t, store.Save(ctx, first))
	require.Equal(t, fs.FileMode(0o600), mode(t, path))
	require.Equal(t, []string{filestore.FileName}, dirNames(t, dir), "temporary files left behind")

	got, err := store.Load(ctx)
	require.NoError(t, err)
	require.Equal(t, first.TrustDomain, got.TrustDomain)
	require.Equal(t, first.Sequence, got.Sequence)
	require.Equal(t, first.Roots[0].Cert.Raw, got.Roots[0].Cert.Raw)
	require.True(t, first.Roots[0].Signer.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(got.Roots[0].Signer.Public()))
	require.Equal(t, first.Issuer.Cert.Raw, got.Issuer.Cert.Raw)
	require.True(t, first.Issuer.Signer.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(got.Issuer.Signer.Public()))

	// A second save replaces the first.
	second := newSet(t)
	second.Sequence = 7
	require.NoError(t, store.Save(ctx, second))
	require.Equal(t, fs.FileMode(0o600), mode(t, path))
	require.Equal(t, []string{filestore.FileName}, dirNames(t, dir))
	got, err = store.Load(ctx)
	require.NoError(t, err)
	require.Equal(t, uint64(7), got.Sequence)
	require.Equal(t, second.Issuer.Cert.Raw, got.Issuer.Cert.Raw)

	// A store opened anew on the directory reads the same.
	reopened, err := filestore.New(dir)
	require.NoError(t, err)
	got, err = reopened.Load(ctx)
	require.NoError(t, err)
	require.Equal(t, second.Issuer.Cert.Raw, got.Issuer.Cert.Raw)
}

func TestSaveTightensMode(t *testing.T) {
	ctx := context.Background()
	store, _, path := newStore(t)
	require.NoError(t, os.WriteFile(path, []byte("old"), 0o644))
	require.NoError(t, os.Chmod(path, 0o644))

	require.NoError(t, store.Save(ctx, newSet(t)))
	require.Equal(t, fs.FileMode(0o600), mode(t, path))
	_, err := store.Load(ctx)
	require.NoError(t, err)
}

func TestLoadRefusesOpenFile(t *testing.T) {
	ctx := context.Background()
	store, _, path := newStore(t)
	require.NoError(t, store.Save(ctx, newSet(t)))
	require.NoError(t, os.Chmod(path, 0o644))

	set, err := store.Load(ctx)
	require.Nil(t, set)
	require.ErrorIs(t, err, securefile.ErrTooOpen)
	require.EqualError(t, err, "filestore: securefile: file is accessible by group or others; chmod 600 it: "+path+" has mode 0644")
}

func TestLoadCorrupt(t *testing.T) {
	ctx := context.Background()
	store, _, path := newStore(t)
	require.NoError(t, store.Save(ctx, newSet(t)))
	good, err := os.ReadFile(path)
	require.NoError(t, err)

	tests := []struct {
		name    string
		data    []byte
		wantErr string
	}{
		{name: "empty", data: nil, wantErr: "ca: decoding stored authority set: unexpected end of JSON input"},
		{name: "truncated", data: good[:len(good)-1], wantErr: "ca: decoding stored authority set: unexpected end of JSON input"},
		{name: "garbage", data: []byte("\x00\x01\x02"), wantErr: "ca: decoding stored authority set: invalid character '\\x00' looking for beginning of value"},
		{name: "null", data: []byte("null"), wantErr: "ca: stored authority set has version 0; this build reads version 1"},
		{name: "empty object", data: []byte("{}"), wantErr: "ca: stored authority set has version 0; this build reads version 1"},
		{name: "future version", data: []byte(`{"version": 2}`), wantErr: "ca: stored authority set has version 2; this build reads version 1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.NoError(t, os.WriteFile(path, tt.data, 0o600))
			var set *ca.AuthoritySet
			require.NotPanics(t, func() { set, err = store.Load(ctx) })
			require.Nil(t, set)
			require.EqualError(t, err, "filestore: "+path+": "+tt.wantErr)
			require.NotErrorIs(t, err, ca.ErrNotFound)
		})
	}
}

func TestSaveIntoRemovedDirectory(t *testing.T) {
	store, dir, _ := newStore(t)
	require.NoError(t, os.RemoveAll(dir))
	err := store.Save(context.Background(), newSet(t))
	require.ErrorIs(t, err, fs.ErrNotExist)
	require.ErrorContains(t, err, "filestore: securefile: ")
}

// TestNewRemovesStaleTempFiles: a server killed during a save leaves the
// temporary file securefile.WriteFile was writing. The next New removes
// such files, and only those: the state, and look-alikes of other
// names, stay.
func TestNewRemovesStaleTempFiles(t *testing.T) {
	ctx := context.Background()
	store, dir, _ := newStore(t)
	set := newSet(t)
	require.NoError(t, store.Save(ctx, set))

	// Two saves killed half-way, made as WriteFile makes its temporary
	// files.
	for range 2 {
		tmp, err := os.CreateTemp(dir, "."+filestore.FileName+".tmp-*")
		require.NoError(t, err)
		_, err = tmp.WriteString(`{"roots":[`)
		require.NoError(t, err)
		require.NoError(t, tmp.Close())
	}
	kept := []string{
		".authorities.json.tmp-notdigits",
		".authorities.json.tmp-",
		"authorities.json.tmp-123",
		".bans.json.tmp-123",
		"notes.txt",
	}
	for _, name := range kept {
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte("x"), 0o600))
	}
	require.NoError(t, os.Mkdir(filepath.Join(dir, ".authorities.json.tmp-42"), 0o700))
	kept = append(kept, ".authorities.json.tmp-42", filestore.FileName)

	store, err := filestore.New(dir)
	require.NoError(t, err)
	require.ElementsMatch(t, kept, dirNames(t, dir))
	loaded, err := store.Load(ctx)
	require.NoError(t, err)
	require.Equal(t, set.Issuer.Cert.Raw, loaded.Issuer.Cert.Raw)
}
