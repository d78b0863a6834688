package server

import (
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// fakeNow is a clock the test moves by hand.
type fakeNow struct{ t time.Time }

func (f *fakeNow) now() time.Time { return f.t }

// TestKeyedLimiter: each key has its own bucket; a refusal says how long
// until a token; a bucket idle long enough to be full is dropped; past the
// bound the least recently used key is dropped and counted.
func TestKeyedLimiter(t *testing.T) {
	clk := &fakeNow{t: time.Unix(1_000_000, 0)}
	k := newKeyedLimiter(Rate{PerSecond: 2, Burst: 2}, 3, clk.now)

	require.Zero(t, k.take("a"))
	require.Zero(t, k.take("a"))
	require.Equal(t, 500*time.Millisecond, k.take("a"), "one token every 500ms")
	require.Equal(t, 500*time.Millisecond, k.take("a"), "a refusal takes no token")
	require.Zero(t, k.take("b"), "another key has its own bucket")

	clk.t = clk.t.Add(500 * time.Millisecond)
	require.Zero(t, k.take("a"))
	require.Equal(t, 2, k.len())

	// A second after its last use a bucket is full again, and dropped.
	clk.t = clk.t.Add(time.Second)
	require.Zero(t, k.take("c"))
	require.Equal(t, 1, k.len(), "a and b were idle for a full refill")

	// The bound: three keys; a fourth drops the least recently used.
	require.Zero(t, k.take("d"))
	require.Zero(t, k.take("e"))
	require.Zero(t, k.take("c"), "c's last token")
	require.Zero(t, k.take("f"))
	require.Equal(t, 3, k.len())
	_, tracked := k.keys["d"]
	require.False(t, tracked, "d, the least recently used, was dropped")
	require.NotZero(t, k.take("c"), "c, the most recently used, kept its empty bucket")
}

func TestSourceOf(t *testing.T) {
	for _, tt := range []struct {
		addr net.Addr
		want string
	}{
		{&net.TCPAddr{IP: net.ParseIP("10.1.2.3"), Port: 5}, "10.1.2.3"},
		{&net.TCPAddr{IP: net.ParseIP("::ffff:10.1.2.3"), Port: 5}, "10.1.2.3"},
		{&net.TCPAddr{IP: net.ParseIP("2001:db8:1:2:3:4:5:6"), Port: 5}, "2001:db8:1:2::/64"},
		{&net.UnixAddr{Name: "@", Net: "unix"}, "@"},
		{nil, "unknown"},
	} {
		require.Equal(t, tt.want, sourceOf(tt.addr))
	}
}

func TestLimitsValidation(t *testing.T) {
	_, err := Limits{PerSource: Rate{PerSecond: -1}, PerIdentity: Rate{PerSecond: 1, Burst: -1}, MaxConnectionsPerSource: -1}.complete()
	require.EqualError(t, err, "server: Limits.PerSource.PerSecond -1: want a number of requests a second, 0 for no limit\n"+
		"server: Limits.PerIdentity.Burst -1 must not be negative\n"+
		"server: Limits: MaxConnectionsPerSource, MaxWatchStreamsPerSource and MaxTrackedKeys must not be negative")
	l, err := Limits{PerIdentity: Rate{PerSecond: 2.5}}.complete()
	require.NoError(t, err)
	require.Equal(t, 3, l.PerIdentity.Burst, "the burst defaults to the rate, rounded up")
	require.Equal(t, DefaultMaxTrackedKeys, l.MaxTrackedKeys)
}
