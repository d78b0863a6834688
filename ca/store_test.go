package ca_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/ca/filestore"
	"github.com/meshca/meshca/testca"
)

func newFileStore(t *testing.T) (*filestore.Store, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "data")
	store, err := filestore.New(dir)
	require.NoError(t, err)
	return store, filepath.Join(dir, filestore.FileName)
}

// memStore is a ca.Store in memory that counts saves and can fail.
type memStore struct {
	set     *ca.AuthoritySet
	loadErr error
	saveErr error
	saves   int
}

func (s *memStore) Load(context.Context) (*ca.AuthoritySet, error) {
	if s.loadErr != nil {
		return nil, s.loadErr
	}
	if s.set == nil {
		return nil, ca.ErrNotFound
	}
	return s.set, nil
}

func (s *memStore) Save(_ context.Context, set *ca.AuthoritySet) error {
	if s.saveErr != nil {
		return s.saveErr
	}
	s.saves++
	s.set = set
	return nil
}

func TestLoadOrCreate(t *testing.T) {
	ctx := context.Background()
	now := testNow()
	clk := clocktesting.NewFakePassiveClock(now)
	opts := ca.AuthorityOptions{
		TrustDomain:     td,
		RootTTL:         30 * 24 * time.Hour,
		IntermediateTTL: 3 * time.Hour,
		Clock:           clk,
	}
	store, path := newFileStore(t)

	// First call: nothing stored, a new set is created and saved.
	first, err := ca.LoadOrCreate(ctx, store, opts)
	require.NoError(t, err)
	require.Equal(t, td, first.TrustDomain)
	require.Equal(t, uint64(1), first.Sequence)
	require.Equal(t, now.Add(3*time.Hour), first.Issuer.Cert.NotAfter)
	require.Equal(t, now.Add(30*24*time.Hour), first.Roots[0].Cert.NotAfter)
	require.NoError(t, first.Validate(now))
	info, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), info.Mode().Perm())
	saved, err := store.Load(ctx)
	require.NoError(t, err)
	requireSameSet(t, first, saved)

	// Second call: the same set.
	second, err := ca.LoadOrCreate(ctx, store, opts)
	require.NoError(t, err)
	requireSameSet(t, first, second)

	// An issuer near its end is kept: rotating ahead is the rotation
	// package's job.
	clk.SetTime(now.Add(3*time.Hour - time.Second))
	kept, err := ca.LoadOrCreate(ctx, store, opts)
	require.NoError(t, err)
	requireSameSet(t, first, kept)

	// An issuer that has expired (the server was down for longer than its
	// life) is replaced by a new intermediate under the same root, and
	// saved; the bundle does not change.
	later := now.Add(3 * time.Hour)
	clk.SetTime(later)
	rotated, err := ca.LoadOrCreate(ctx, store, opts)
	require.NoError(t, err)
	require.Equal(t, first.Roots[0].Cert.Raw, rotated.Roots[0].Cert.Raw)
	requireSameKey(t, first.Roots[0].Signer.Public(), rotated.Roots[0].Signer.Public())
	require.Len(t, rotated.Roots, 1)
	require.Equal(t, first.Sequence, rotated.Sequence, "the bundle did not change, its sequence must not")
	require.NotEqual(t, first.Issuer.Cert.Raw, rotated.Issuer.Cert.Raw)
	require.NotEqual(t, first.Issuer.Cert.RawSubjectPublicKeyInfo, rotated.Issuer.Cert.RawSubjectPublicKeyInfo, "new intermediate reuses the old key")
	require.NoError(t, rotated.Issuer.Cert.CheckSignatureFrom(first.Roots[0].Cert))
	require.True(t, rotated.Issuer.Cert.IsCA)
	require.True(t, rotated.Issuer.Cert.MaxPathLenZero)
	require.Equal(t, later.Add(-ca.Backdate), rotated.Issuer.Cert.NotBefore)
	require.Equal(t, later.Add(3*time.Hour), rotated.Issuer.Cert.NotAfter)
	require.Equal(t, later, rotated.IssuerSince)
	require.Empty(t, rotated.Chain)
	require.NoError(t, rotated.Validate(later))

	// Third call returns what the rotation saved.
	third, err := ca.LoadOrCreate(ctx, store, opts)
	require.NoError(t, err)
	requireSameSet(t, rotated, third)

	// The first set was not changed in place.
	require.Equal(t, saved.Issuer.Cert.Raw, first.Issuer.Cert.Raw)
}

func TestLoadOrCreateRepairedIssuerEndsWithRoot(t *testing.T) {
	ctx := context.Background()
	now := testNow()
	clk := clocktesting.NewFakePassiveClock(now)
	opts := ca.AuthorityOptions{TrustDomain: td, RootTTL: 4 * time.Hour, IntermediateTTL: 3 * time.Hour, Clock: clk}
	store := &memStore{}

	first, err := ca.LoadOrCreate(ctx, store, opts)
	require.NoError(t, err)
	require.Equal(t, 1, store.saves)

	clk.SetTime(now.Add(3*time.Hour + time.Minute))
	repaired, err := ca.LoadOrCreate(ctx, store, opts)
	require.NoError(t, err)
	require.Equal(t, 2, store.saves)
	require.Equal(t, first.Roots[0].Cert.NotAfter, repaired.Issuer.Cert.NotAfter, "intermediate outlives its root")

	// The repaired issuer is valid: loading again changes nothing.
	for range 3 {
		again, err := ca.LoadOrCreate(ctx, store, opts)
		require.NoError(t, err)
		require.Equal(t, repaired.Issuer.Cert.Raw, again.Issuer.Cert.Raw)
	}
	require.Equal(t, 2, store.saves)
}

func TestLoadOrCreateErrors(t *testing.T) {
	ctx := context.Background()
	now := testNow()

	t.Run("trust domain mismatch", func(t *testing.T) {
		store, _ := newFileStore(t)
		clk := clocktesting.NewFakePassiveClock(now)
		_, err := ca.LoadOrCreate(ctx, store, ca.AuthorityOptions{TrustDomain: td, Clock: clk})
		require.NoError(t, err)

		set, err := ca.LoadOrCreate(ctx, store, ca.AuthorityOptions{TrustDomain: otherTD, Clock: clk})
		require.EqualError(t, err, `ca: stored authorities are for trust domain "example.org", configured is "other.org"; a trust domain cannot be renamed in place`)
		require.Nil(t, set)
	})

	t.Run("no trust domain", func(t *testing.T) {
		store := &memStore{}
		_, err := ca.LoadOrCreate(ctx, store, ca.AuthorityOptions{Clock: clocktesting.NewFakePassiveClock(now)})
		require.EqualError(t, err, "ca: a trust domain is required")
		require.Zero(t, store.saves)
	})

	t.Run("load fails", func(t *testing.T) {
		broken := errors.New("disk on fire")
		store := &memStore{loadErr: broken}
		set, err := ca.LoadOrCreate(ctx, store, ca.AuthorityOptions{TrustDomain: td, Clock: clocktesting.NewFakePassiveClock(now)})
		require.ErrorIs(t, err, broken)
		require.Nil(t, set)
		require.Zero(t, store.saves, "a store that failed to load was overwritten")
	})

	t.Run("save of a new set fails", func(t *testing.T) {
		broken := errors.New("disk full")
		store := &memStore{saveErr: broken}
		set, err := ca.LoadOrCreate(ctx, store, ca.AuthorityOptions{TrustDomain: td, Clock: clocktesting.NewFakePassiveClock(now)})
		require.ErrorIs(t, err, broken)
		require.Nil(t, set, "a set that was not saved was returned")
	})

	t.Run("save of a rotated issuer fails", func(t *testing.T) {
		clk := clocktesting.NewFakePassiveClock(now)
		opts := ca.AuthorityOptions{TrustDomain: td, IntermediateTTL: 3 * time.Hour, Clock: clk}
		store := &memStore{}
		_, err := ca.LoadOrCreate(ctx, store, opts)
		require.NoError(t, err)

		broken := errors.New("disk full")
		store.saveErr = broken
		clk.SetTime(now.Add(3 * time.Hour))
		set, err := ca.LoadOrCreate(ctx, store, opts)
		require.ErrorIs(t, err, broken)
		require.Nil(t, set, "an issuer that was not saved was returned")
	})

	t.Run("stored issuer expired and no root key", func(t *testing.T) {
		inter := newIssuer(t, now, testca.WithLifetime(now.Add(-time.Hour), now.Add(time.Hour)))
		set := inter.AuthoritySet()
		set.Roots[0].Signer = nil
		store := &memStore{set: set}

		clk := clocktesting.NewFakePassiveClock(now.Add(2 * time.Hour))
		got, err := ca.LoadOrCreate(ctx, store, ca.AuthorityOptions{TrustDomain: td, Clock: clk})
		require.ErrorContains(t, err, "ca: issuer certificate is not valid now")
		require.Nil(t, got)
		require.Zero(t, store.saves)
	})

	t.Run("stored issuer under an intermediate is not rotated", func(t *testing.T) {
		inter := newIssuer(t, now).ChildCA(testca.WithLifetime(now.Add(-time.Hour), now.Add(time.Hour)))
		store := &memStore{set: inter.AuthoritySet()}
		clk := clocktesting.NewFakePassiveClock(now)
		got, err := ca.LoadOrCreate(ctx, store, ca.AuthorityOptions{TrustDomain: td, Clock: clk})
		require.NoError(t, err)
		require.Zero(t, store.saves)
		require.Equal(t, inter.Cert.Raw, got.Issuer.Cert.Raw)
	})

	t.Run("corrupt store", func(t *testing.T) {
		store, path := newFileStore(t)
		require.NoError(t, os.WriteFile(path, []byte("{"), 0o600))
		set, err := ca.LoadOrCreate(ctx, store, ca.AuthorityOptions{TrustDomain: td, Clock: clocktesting.NewFakePassiveClock(now)})
		require.ErrorContains(t, err, "ca: decoding stored authority set")
		require.Nil(t, set)
		data, err := os.ReadFile(path)
		require.NoError(t, err)
		require.Equal(t, "{", string(data), "a corrupt store was overwritten")
	})
}

// FuzzUnmarshalAuthoritySet: a corrupted state file is refused with an
// error, never a panic, and what decodes encodes again.
func FuzzUnmarshalAuthoritySet(f *testing.F) {
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: td})
	if err != nil {
		f.Fatal(err)
	}
	good, err := ca.MarshalAuthoritySet(set)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte(`{"version":1,"trustDomain":"example.org","roots":[{"certificate":"x"}]}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		got, err := ca.UnmarshalAuthoritySet(data)
		if err != nil {
			return
		}
		_, err = ca.MarshalAuthoritySet(got)
		require.NoError(t, err)
	})
}

// A state file written before roots had states loads, its one root active.
func TestUnmarshalAuthoritySetWithoutRootStates(t *testing.T) {
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: td})
	require.NoError(t, err)
	data, err := ca.MarshalAuthoritySet(set)
	require.NoError(t, err)
	legacy := strings.Replace(string(data), `"state": "active"`, `"state": ""`, 1)
	require.NotEqual(t, string(data), legacy)

	got, err := ca.UnmarshalAuthoritySet([]byte(legacy))
	require.NoError(t, err)
	require.Equal(t, ca.RootActive, got.Roots[0].State)
	require.NoError(t, got.Validate(time.Now()))
}

// An expired issuer with a valid prepared successor: the successor takes
// over at start, rather than a new intermediate.
func TestLoadOrCreatePrefersThePreparedSuccessor(t *testing.T) {
	ctx := context.Background()
	now := testNow()
	clk := clocktesting.NewFakePassiveClock(now)
	opts := ca.AuthorityOptions{TrustDomain: td, IntermediateTTL: 3 * time.Hour, Clock: clk}
	store := &memStore{}
	set, err := ca.LoadOrCreate(ctx, store, opts)
	require.NoError(t, err)

	clk.SetTime(now.Add(2 * time.Hour))
	next, err := ca.NewIntermediate(opts, set.Roots[0].Authority)
	require.NoError(t, err)
	prepared := set.Clone()
	prepared.NextIssuer = &next
	require.NoError(t, store.Save(ctx, prepared))

	clk.SetTime(now.Add(3 * time.Hour))
	got, err := ca.LoadOrCreate(ctx, store, opts)
	require.NoError(t, err)
	require.Equal(t, next.Cert.Raw, got.Issuer.Cert.Raw)
	require.Nil(t, got.NextIssuer)
}
