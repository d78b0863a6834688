package ban_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/identity/ban"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

func id(path string) spiffeid.ID { return spiffeid.RequireFromPath(td, path) }

func TestParseTarget(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		kind     ban.Kind
		err      string
	}{
		{name: "id", in: "spiffe://example.org/ns/shop/sa/web", kind: ban.KindID},
		{name: "id outside the mesh convention", in: "spiffe://example.org/billing", kind: ban.KindID},
		{name: "namespace", in: "shop", kind: ban.KindNamespace},
		{name: "empty", in: "", err: `ban: invalid ban: a target is required: a SPIFFE ID of trust domain "example.org" or a namespace name`},
		{name: "other trust domain", in: "spiffe://evil.example/ns/shop/sa/web", err: `ban: invalid ban: target "spiffe://evil.example/ns/shop/sa/web" is not in trust domain "example.org", the only one this CA issues for`},
		{name: "trust domain itself", in: "spiffe://example.org", err: `ban: invalid ban: target "spiffe://example.org" is the trust domain itself; ban a workload's ID or a namespace`},
		{name: "bad id", in: "spiffe://example.org/ns/../x", err: `ban: invalid ban: target "spiffe://example.org/ns/../x" is not a SPIFFE ID: path cannot contain dot segments`},
		{name: "upper-case scheme", in: "SPIFFE://example.org/a", err: `is not a SPIFFE ID`},
		{name: "garbage", in: "ns/shop; drop", err: `ban: invalid ban: target "ns/shop; drop" is neither a SPIFFE ID (spiffe://example.org/...) nor a namespace name`},
		{name: "upper-case namespace", in: "Shop", err: `is neither a SPIFFE ID`},
		{name: "too long namespace", in: strings.Repeat("a", 64), err: `must be no more than 63 characters`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ban.ParseTarget(tc.in, td)
			if tc.err != "" {
				require.ErrorIs(t, err, ban.ErrInvalid)
				require.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.kind, got.Kind())
			require.Equal(t, tc.in, got.String(), "String reads back as parsed")
		})
	}
}

// TestTargetMatches: a namespace covers its IDs by whole path segments.
func TestTargetMatches(t *testing.T) {
	shop := ban.NamespaceTarget(td, "shop")
	web := ban.IDTarget(id("/ns/shop/sa/web"))
	for _, tc := range []struct {
		target ban.Target
		id     spiffeid.ID
		want   bool
	}{
		{shop, id("/ns/shop/sa/web"), true},
		{shop, id("/ns/shop/sa/db"), true},
		{shop, id("/ns/shop"), true},
		{shop, id("/ns/shop2/sa/web"), false},
		{shop, id("/ns/sho/sa/web"), false},
		{shop, id("/shop/sa/web"), false},
		{shop, id("/x/ns/shop/sa/web"), false},
		{shop, spiffeid.RequireFromPath(spiffeid.RequireTrustDomainFromString("other.example"), "/ns/shop/sa/web"), false},
		{web, id("/ns/shop/sa/web"), true},
		{web, id("/ns/shop/sa/web/x"), false},
		{web, id("/ns/shop/sa/we"), false},
		{web, spiffeid.ID{}, false},
	} {
		require.Equal(t, tc.want, tc.target.Matches(tc.id), "%s matches %s", tc.target.Describe(), tc.id)
	}
}

// clock is a settable clock.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func newRegistry(t *testing.T, store ban.Store, now func() time.Time) (*ban.Registry, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	r, err := ban.New(context.Background(), ban.Options{Store: store, TrustDomain: td, Now: now, Registerer: reg})
	require.NoError(t, err)
	return r, reg
}

func fileStore(t *testing.T, path string) *ban.FileStore {
	t.Helper()
	s, err := ban.NewFileStore(path)
	require.NoError(t, err)
	return s
}

// TestRegistry adds, replaces, lists, expires and removes bans, stored in
// a file that a new Registry (a restarted server) reads back.
func TestRegistry(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "bans.json")
	clk := &clock{now: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	r, reg := newRegistry(t, fileStore(t, path), clk.Now)

	shop, err := ban.ParseTarget("shop", td)
	require.NoError(t, err)
	web := ban.IDTarget(id("/ns/billing/sa/web"))
	_, replaced, err := r.Add(ctx, ban.Ban{Target: shop, Reason: "INC-1", By: "alice"}, 0)
	require.NoError(t, err)
	require.False(t, replaced)
	added, _, err := r.Add(ctx, ban.Ban{Target: web, Reason: "INC-2", By: "bob"}, time.Hour)
	require.NoError(t, err)
	require.Equal(t, clk.Now().Add(time.Hour), added.Expires)

	b, banned := r.Banned(id("/ns/shop/sa/anything"))
	require.True(t, banned)
	require.Equal(t, "INC-1", b.Reason)
	require.Equal(t, "alice", b.By)
	_, banned = r.Banned(id("/ns/shop2/sa/web"))
	require.False(t, banned)
	_, banned = r.Banned(id("/ns/billing/sa/web"))
	require.True(t, banned)
	require.Equal(t, 2.0, gauge(t, reg, "meshca_bans_in_force"))

	// The file is private, versioned, and a restarted server reads it.
	info, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), info.Mode().Perm())
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Contains(t, string(data), `"version": 1`)
	restarted, _ := newRegistry(t, fileStore(t, path), clk.Now)
	require.Equal(t, r.List(), restarted.List())

	// Banning again replaces.
	_, replaced, err = r.Add(ctx, ban.Ban{Target: shop, Reason: "INC-1 widened", By: "carol"}, 0)
	require.NoError(t, err)
	require.True(t, replaced)
	require.Len(t, r.List(), 2)

	// Expiry lifts the ID ban, and the next change drops it from the file.
	clk.Add(time.Hour)
	_, banned = r.Banned(id("/ns/billing/sa/web"))
	require.False(t, banned, "expired")
	require.Len(t, r.List(), 1)
	_, err = r.Remove(ctx, web)
	require.ErrorIs(t, err, ban.ErrNotBanned)

	removed, err := r.Remove(ctx, shop)
	require.NoError(t, err)
	require.Equal(t, "INC-1 widened", removed.Reason)
	_, banned = r.Banned(id("/ns/shop/sa/web"))
	require.False(t, banned)
	bans, err := fileStore(t, path).Load(ctx)
	require.NoError(t, err)
	require.Empty(t, bans, "the expired ban was pruned by the last write")
	_, err = r.Remove(ctx, shop)
	require.EqualError(t, err, `ban: not banned: namespace "shop" has no ban in force`)
}

// gauge returns the value of the metric name, a gauge or counter
// without labels.
func gauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() == name {
			m := mf.GetMetric()[0]
			if m.GetCounter() != nil {
				return m.GetCounter().GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

// TestRegistryRefusals: bad bans are refused with ErrInvalid, and nothing
// is stored.
func TestRegistryRefusals(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "bans.json")
	r, _ := newRegistry(t, fileStore(t, path), nil)
	other := ban.IDTarget(spiffeid.RequireFromPath(spiffeid.RequireTrustDomainFromString("other.example"), "/a"))
	shop := ban.NamespaceTarget(td, "shop")
	for _, tc := range []struct {
		name string
		b    ban.Ban
		ttl  time.Duration
		err  string
	}{
		{"no target", ban.Ban{Reason: "x"}, 0, "ban: invalid ban: a target is required"},
		{"other trust domain", ban.Ban{Target: other, Reason: "x"}, 0, `ban: invalid ban: target "spiffe://other.example/a" is not in trust domain "example.org"`},
		{"negative ttl", ban.Ban{Target: shop, Reason: "x"}, -time.Second, "ban: invalid ban: the lifetime -1s is negative; zero means until removed"},
		{"no reason", ban.Ban{Target: shop, Reason: "  "}, 0, "ban: invalid ban: a reason is required (an incident, a ticket): it is audited and shown to the refused workloads"},
		{"long reason", ban.Ban{Target: shop, Reason: strings.Repeat("x", 513)}, 0, "ban: invalid ban: the reason is 513 bytes; at most 512"},
		{"control characters", ban.Ban{Target: shop, Reason: "a\nfake audit line"}, 0, "ban: invalid ban: the reason holds control characters"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := r.Add(ctx, tc.b, tc.ttl)
			require.ErrorIs(t, err, ban.ErrInvalid)
			require.EqualError(t, err, tc.err)
		})
	}
	_, err := os.Stat(path)
	require.ErrorIs(t, err, os.ErrNotExist, "nothing was stored")
}

func TestRegistryLimit(t *testing.T) {
	ctx := context.Background()
	r, err := ban.New(ctx, ban.Options{Store: fileStore(t, filepath.Join(t.TempDir(), "bans.json")), TrustDomain: td, MaxBans: 2})
	require.NoError(t, err)
	for _, ns := range []string{"a", "b"} {
		_, _, err := r.Add(ctx, ban.Ban{Target: ban.NamespaceTarget(td, ns), Reason: "x"}, 0)
		require.NoError(t, err)
	}
	_, _, err = r.Add(ctx, ban.Ban{Target: ban.NamespaceTarget(td, "c"), Reason: "x"}, 0)
	require.ErrorIs(t, err, ban.ErrTooMany)
	_, replaced, err := r.Add(ctx, ban.Ban{Target: ban.NamespaceTarget(td, "a"), Reason: "y"}, 0)
	require.NoError(t, err, "replacing is not adding")
	require.True(t, replaced)
}

// TestFailClosed: a store that cannot be read makes no Registry, so the
// server does not start without its bans.
func TestFailClosed(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		data string
		mode os.FileMode
		err  string
	}{
		{"garbage", "{not json", 0o600, "ban: loading the bans: ban: decoding: invalid character 'n'"},
		{"newer format", `{"version": 2, "bans": []}`, 0o600, "ban: loading the bans: ban: stored bans have format version 2; this build reads version 1"},
		{"no target", `{"version": 1, "bans": [{"reason": "x"}]}`, 0o600, "ban: loading the bans: ban: stored ban 0 names no target, or two"},
		{"readable by others", `{"version": 1, "bans": []}`, 0o644, "has mode 0644"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, tc.name+".json")
			require.NoError(t, os.WriteFile(path, []byte(tc.data), tc.mode))
			require.NoError(t, os.Chmod(path, tc.mode))
			_, err := ban.New(context.Background(), ban.Options{Store: fileStore(t, path), TrustDomain: td})
			require.ErrorContains(t, err, tc.err)
		})
	}
}

// TestMarshalRoundTrip: what Marshal writes, Unmarshal reads back.
func TestMarshalRoundTrip(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	in := []ban.Ban{
		{Target: ban.NamespaceTarget(td, "shop"), Reason: "r1", By: "a", Created: now},
		{Target: ban.IDTarget(id("/ns/x/sa/y")), Reason: "r2", By: "b", Created: now, Expires: now.Add(time.Hour)},
	}
	data, err := ban.Marshal(in)
	require.NoError(t, err)
	out, err := ban.Unmarshal(data)
	require.NoError(t, err)
	require.Equal(t, in, out)
	none, err := ban.Unmarshal(nil)
	require.NoError(t, err)
	require.Empty(t, none)
	require.False(t, errors.Is(err, ban.ErrInvalid))
}
