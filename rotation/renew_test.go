package rotation_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"

	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/rotation"
	"github.com/meshca/meshca/testca"
)

// zeroRand takes no jitter off: renewals at exactly RenewFraction (half
// life), backoff waits of exactly Initial·2^(n-1) (within their caps).
func zeroRand() float64 { return 0 }

func TestRunRenewsADayInMilliseconds(t *testing.T) {
	h := newSourceHarness(t, rotation.Options{TTL: time.Hour})
	h.run(t, h.ca.serveBufconn(t))

	end := h.start.Add(24 * time.Hour)
	for {
		tm := h.clock.next(t)
		calls := h.ca.calls()
		last := calls[len(calls)-1]
		require.NotNil(t, last.issued, "Sign %d failed", len(calls))
		requireSameCert(t, last.issued, h.svid(t).Certificates[0])
		if tm.deadline.After(end) {
			break
		}
		// Walk to the renew point in steps, checking that what is served
		// is valid at every one.
		for h.clock.Now().Before(tm.deadline) {
			h.clock.SetTime(earlier(h.clock.Now().Add(5*time.Minute), tm.deadline))
			svid, err := h.src.GetX509SVID()
			require.NoError(t, err, "at %s", h.clock.Now().Sub(h.start))
			require.True(t, h.clock.Now().Before(svid.Certificates[0].NotAfter), "served an expired SVID at %s", h.clock.Now().Sub(h.start))
		}
	}

	calls := h.ca.calls()
	renewals := len(calls) - 1
	require.GreaterOrEqual(t, renewals, 43, "renewals in 24h of 1h certificates")
	require.LessOrEqual(t, renewals, 54, "renewals in 24h of 1h certificates")
	require.Equal(t, bootstrapToken, calls[0].token, "the first request authenticates with the token")
	for i, c := range calls[1:] {
		prev := calls[i].issued
		frac := float64(c.at.Sub(prev.NotBefore)) / float64(prev.NotAfter.Sub(prev.NotBefore))
		require.True(t, frac >= 0.4-1e-9 && frac <= 0.5+1e-9, "renewal %d at %.4f of the previous certificate's life", i+1, frac)
		require.Empty(t, c.token, "renewal %d sent the token", i+1)
	}
}

func TestRunBacksOffAndServesTheCurrentSVIDUntilItExpires(t *testing.T) {
	h := newSourceHarness(t, rotation.Options{TTL: time.Hour, Rand: zeroRand})
	h.run(t, h.ca.serveBufconn(t))

	tm := h.clock.next(t)
	first := h.svid(t).Certificates[0]
	require.WithinDuration(t, first.NotBefore.Add(30*time.Minute), tm.deadline, 0, "renew point at half of 1h")

	// The CA goes down at the renew point, until 3 minutes after the
	// certificate expired.
	h.ca.setDown(true)
	h.clock.fire(tm)
	var waits, expiredWaits []time.Duration
	for {
		tm = h.clock.next(t)
		now := h.clock.Now()
		if !now.Before(first.NotAfter.Add(3 * time.Minute)) {
			break
		}
		if now.Before(first.NotAfter) {
			requireSameCert(t, first, h.svid(t).Certificates[0])
			// Backoff's wait, held to a twentieth of what the SVID has
			// left, and to 100ms at least.
			n := len(waits) + 1
			want := time.Second // 1s·2^(n-1), up to Max
			for i := 1; i < n && want < time.Minute; i++ {
				want *= 2
			}
			want = min(want, time.Minute, max(first.NotAfter.Sub(now)/20, 100*time.Millisecond))
			require.Equal(t, want, tm.d, "wait %d, %s before expiry", n, first.NotAfter.Sub(now))
			waits = append(waits, tm.d)
		} else {
			_, err := h.src.GetX509SVID()
			require.EqualError(t, err, fmt.Sprintf("rotation: the X509-SVID for %q expired at %s and could not be renewed yet",
				workloadID, first.NotAfter.UTC().Format(time.RFC3339)))
			expiredWaits = append(expiredWaits, tm.d)
		}
		h.clock.fire(tm)
	}
	// Doubling from 1s while the SVID has half an hour left...
	require.Equal(t, []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second, 32 * time.Second, time.Minute}, waits[:7])
	// ...down to 100ms just before it expires...
	require.Equal(t, 100*time.Millisecond, waits[len(waits)-1])
	// ...and Backoff alone once it has: Max, as failures went on.
	require.NotEmpty(t, expiredWaits)
	for i, w := range expiredWaits {
		require.Equal(t, time.Minute, w, "wait %d after expiry", i+1)
	}
	waits = append(waits, expiredWaits...)

	// The CA recovers: the next retry gets a new SVID, and the next wait
	// is its renew point again.
	h.ca.setDown(false)
	h.clock.fire(tm)
	tm = h.clock.next(t)
	second := h.svid(t).Certificates[0]
	require.NotEqual(t, first.SerialNumber, second.SerialNumber)
	require.WithinDuration(t, second.NotBefore.Add(30*time.Minute), tm.deadline, 0)

	// While the SVID was valid the retries authenticated with it; after
	// it expired, with the token.
	calls := h.ca.calls()
	failed := 0
	for i, c := range calls[1:] {
		if c.issued == nil {
			failed++
		}
		if c.at.Before(first.NotAfter) {
			require.Empty(t, c.token, "call %d, before expiry", i+1)
		} else {
			require.Equal(t, bootstrapToken, c.token, "call %d, after expiry", i+1)
		}
	}
	require.Equal(t, len(waits)+1, failed)

	// Each failure is logged with its gRPC code; never the token.
	logged := h.logs.find("getting an X509-SVID failed")
	require.Len(t, logged, failed)
	for _, r := range logged {
		require.Equal(t, "Unavailable", r.attrs["code"])
		require.Equal(t, "rotation: Sign: rpc error: code = Unavailable desc = fake CA is down", r.attrs["error"])
	}
	require.Equal(t, slog.LevelWarn, logged[0].level, "a failure with a valid SVID left")
	require.Equal(t, slog.LevelError, logged[len(logged)-1].level, "a failure with nothing valid to serve")
	require.False(t, h.logs.contains(bootstrapToken), "the token was logged")
}

// TestRunUsesACABackBeforeExpiry takes the CA down at the renew point
// and brings it back with little of the SVID's life left: with the
// default backoff and jitter, the source retries within a twentieth of
// what its SVID has left, so it renews before the SVID expires, over mTLS,
// and never serves an expired one.
func TestRunUsesACABackBeforeExpiry(t *testing.T) {
	for _, back := range []time.Duration{5 * time.Minute, 30 * time.Second, 2 * time.Second} {
		t.Run(fmt.Sprintf("back %s before expiry", back), func(t *testing.T) {
			h := newSourceHarness(t, rotation.Options{TTL: time.Hour})
			h.run(t, h.ca.serveBufconn(t))
			tm := h.clock.next(t)
			first := h.svid(t).Certificates[0]
			backAt := first.NotAfter.Add(-back)

			h.ca.setDown(true)
			for {
				h.clock.fire(tm)
				tm = h.clock.next(t)
				now := h.clock.Now()
				if now.Before(first.NotAfter) {
					limit := max(first.NotAfter.Sub(now)/20, 100*time.Millisecond)
					require.LessOrEqual(t, tm.d, limit, "a retry %s before expiry", first.NotAfter.Sub(now))
				}
				if !tm.deadline.Before(backAt) {
					break
				}
			}
			// The CA is back before the next retry, which comes within a
			// twentieth of what the SVID had left at the last failure.
			h.ca.setDown(false)
			h.clock.fire(tm)
			h.clock.next(t)
			calls := h.ca.calls()
			last := calls[len(calls)-1]
			require.NotNil(t, last.issued, "the retry after the CA came back")
			require.True(t, last.at.Before(first.NotAfter), "renewed at %s, after the expiry at %s", last.at, first.NotAfter)
			require.LessOrEqual(t, last.at.Sub(backAt), max(back/20, 100*time.Millisecond), "renewed %s after the CA came back", last.at.Sub(backAt))
			require.Empty(t, last.token, "renewed over mTLS with the SVID still valid")
			requireSameCert(t, last.issued, h.svid(t).Certificates[0])
		})
	}
}

func TestRunSendsTheTokenOnlyWithoutAValidSVID(t *testing.T) {
	var tokenCalls atomic.Int32
	h := newSourceHarness(t, rotation.Options{
		Rand: zeroRand,
		Token: func(context.Context) (string, error) {
			if tokenCalls.Add(1) <= 2 {
				return "", errors.New("token file not mounted yet")
			}
			return bootstrapToken, nil
		},
	})
	h.run(t, h.ca.serveBufconn(t))

	// No token yet: retried with backoff, and the CA is not called.
	for _, want := range []time.Duration{time.Second, 2 * time.Second} {
		tm := h.clock.next(t)
		require.Equal(t, want, tm.d)
		require.Empty(t, h.ca.calls())
		h.clock.fire(tm)
	}
	logged := h.logs.find("getting an X509-SVID failed")
	require.Len(t, logged, 2)
	require.Equal(t, "rotation: getting the token: token file not mounted yet", logged[0].attrs["error"])
	require.NotContains(t, logged[0].attrs, "code", "not a gRPC error")

	// The token gets the first SVID; renewals present the SVID instead.
	for range 3 {
		h.clock.fire(h.clock.next(t))
	}
	h.clock.next(t)
	calls := h.ca.calls()
	require.Len(t, calls, 4)
	require.Equal(t, bootstrapToken, calls[0].token)
	for i, c := range calls[1:] {
		require.Empty(t, c.token, "renewal %d", i+1)
	}
	require.Equal(t, int32(3), tokenCalls.Load())
}

func TestRunReportsTheBundleItHolds(t *testing.T) {
	h := newSourceHarness(t, rotation.Options{Rand: zeroRand})
	h.run(t, h.ca.serveBufconn(t))
	tm := h.clock.next(t)
	h.waitFor(t, "bundle 1", func() bool { return h.src.BundleSequence() == 1 })

	// A new root arrives on the watch, and the next Sign reports it.
	root2 := testca.New(t, sourceTD, testca.WithLifetime(h.start.Add(-time.Hour), h.start.Add(72*time.Hour)))
	h.ca.setBundle(bundleMsg(2, h.ca.root, root2))
	h.waitFor(t, "bundle 2", func() bool { return h.src.BundleSequence() == 2 })
	bundle, err := h.src.GetX509BundleForTrustDomain(sourceTD)
	require.NoError(t, err)
	require.True(t, bundle.HasX509Authority(root2.Cert))
	require.True(t, bundle.HasX509Authority(h.ca.root.Cert))
	h.clock.fire(tm)
	tm = h.clock.next(t)
	require.Equal(t, uint64(2), h.ca.calls()[1].bundleSeq)

	// Older and equal sequences from the watch are ignored: only the
	// newer one after them is taken.
	h.ca.push(bundleMsg(2, root2))
	h.ca.push(bundleMsg(1, root2))
	h.ca.setBundle(bundleMsg(3, h.ca.root, root2))
	h.waitFor(t, "bundle 3", func() bool { return h.src.BundleSequence() == 3 })
	// (Stale bundles would have been logged before bundle 3 was taken.)
	for seq, n := range map[string]int{"1": 1, "2": 1} {
		updates := 0
		for _, r := range h.logs.find("trust bundle updated") {
			if r.attrs["sequence"] == seq {
				updates++
			}
		}
		require.Equal(t, n, updates, "updates to sequence %s", seq)
	}

	// A newer bundle in a Sign response is taken too, even when the watch
	// lags behind.
	h.ca.setSignBundle(bundleMsg(4, h.ca.root))
	h.clock.fire(tm)
	tm = h.clock.next(t)
	require.Equal(t, uint64(4), h.src.BundleSequence())
	bundle, err = h.src.GetX509BundleForTrustDomain(sourceTD)
	require.NoError(t, err)
	require.False(t, bundle.HasX509Authority(root2.Cert))
	h.clock.fire(tm)
	h.clock.next(t)
	calls := h.ca.calls()
	require.Equal(t, []uint64{3, 4}, []uint64{calls[2].bundleSeq, calls[3].bundleSeq})
}

func TestRunRefusesBadResponses(t *testing.T) {
	otherRoot := testca.New(t, sourceTD)
	tests := []struct {
		name   string
		tamper func(*leafRequest)
		want   string
	}{
		{
			name: "wrong SPIFFE ID",
			tamper: func(r *leafRequest) {
				r.uri = spiffeid.RequireFromPath(sourceTD, "/ns/shop/sa/admin").URL()
			},
			want: `rotation: the CA issued a certificate for "spiffe://example.org/ns/shop/sa/admin"; asked for "spiffe://example.org/ns/shop/sa/web"`,
		},
		{
			name:   "another key",
			tamper: func(r *leafRequest) { r.publicKey = testca.NewKey(t).Public() },
			want:   "rotation: the CA issued a certificate for another public key than the CSR's",
		},
		{
			name:   "chain under a root not in the bundle",
			tamper: func(r *leafRequest) { r.issuer = otherRoot.ChildCA() },
			want:   "rotation: the CA's certificate chain does not verify against the trust bundle (sequence 1): x509svid: could not verify leaf certificate: x509: certificate signed by unknown authority",
		},
		{
			name: "newer bundle without the chain's root",
			tamper: func(r *leafRequest) {
				r.bundle = bundleMsg(2, otherRoot)
			},
			want: "rotation: the CA's certificate chain does not verify against the trust bundle (sequence 2): x509svid: could not verify leaf certificate: x509: certificate signed by unknown authority",
		},
		{
			name: "bundle of another trust domain",
			tamper: func(r *leafRequest) {
				r.bundle = &meshcav1.TrustBundle{TrustDomain: "evil.example", Sequence: 9, X509Authorities: [][]byte{otherRoot.Cert.Raw}}
			},
			want: `rotation: the CA's response: bundle is for trust domain "evil.example"; want "example.org"`,
		},
		{
			name: "malformed bundle",
			tamper: func(r *leafRequest) {
				r.bundle = &meshcav1.TrustBundle{TrustDomain: sourceTD.Name(), Sequence: 9, X509Authorities: [][]byte{[]byte("not DER")}}
			},
			want: "rotation: the CA's response: the bundle of \"example.org\" (sequence 9): pemutil: certificate 0: x509: malformed certificate",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newSourceHarness(t, rotation.Options{Rand: zeroRand})
			h.run(t, h.ca.serveBufconn(t))
			tm := h.clock.next(t)
			first := h.svid(t).Certificates[0]

			h.ca.setTamper(tt.tamper)
			h.clock.fire(tm)
			tm = h.clock.next(t)
			require.Equal(t, time.Second, tm.d, "a bad response is retried")
			requireSameCert(t, first, h.svid(t).Certificates[0])
			require.Equal(t, uint64(1), h.src.BundleSequence(), "a bad response's bundle is not taken")
			logged := h.logs.find("getting an X509-SVID failed")
			require.Len(t, logged, 1)
			// The full text, up to crypto/x509's explanations.
			require.True(t, strings.HasPrefix(logged[0].attrs["error"], tt.want), "error %q, want %q", logged[0].attrs["error"], tt.want)

			h.ca.setTamper(nil)
			h.clock.fire(tm)
			h.clock.next(t)
			calls := h.ca.calls()
			requireSameCert(t, calls[len(calls)-1].issued, h.svid(t).Certificates[0])
		})
	}
}

func TestRunReconnectsTheBundleWatch(t *testing.T) {
	h := newSourceHarness(t, rotation.Options{Rand: zeroRand})
	h.run(t, h.ca.serveBufconn(t))
	h.clock.next(t) // the renewal, half an hour away
	require.Eventually(t, func() bool { return h.ca.openWatches() == 1 }, realTimeout, time.Millisecond)

	// The watch breaks, the next two attempts are refused, and the bundle
	// changes meanwhile.
	root2 := testca.New(t, sourceTD, testca.WithLifetime(h.start.Add(-time.Hour), h.start.Add(72*time.Hour)))
	h.ca.breakWatches(2)
	h.ca.setSignBundle(bundleMsg(2, h.ca.root, root2))
	for _, want := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second} {
		tm := h.clock.next(t)
		require.Equal(t, want, tm.d)
		h.clock.fire(tm)
	}
	h.waitFor(t, "bundle 2", func() bool { return h.src.BundleSequence() == 2 })
	require.Equal(t, 4, h.ca.watchCount())
	logged := h.logs.find("the bundle watch broke; reconnecting")
	require.Len(t, logged, 3)
	require.Equal(t, "rotation: WatchBundle: rpc error: code = Unavailable desc = fake CA broke the watch", logged[0].attrs["error"])
	require.Equal(t, "rotation: WatchBundle: rpc error: code = Unavailable desc = fake CA refuses watches", logged[1].attrs["error"])
	for _, r := range logged {
		require.Equal(t, "Unavailable", r.attrs["code"])
	}

	// The new watch delivers later bundles too.
	h.ca.setBundle(bundleMsg(3, h.ca.root, root2))
	h.waitFor(t, "bundle 3", func() bool { return h.src.BundleSequence() == 3 })

	// A watch that breaks at once keeps backing off; one that lived at
	// least Backoff.Max starts the backoff over.
	h.ca.breakWatches(0)
	tm := h.clock.next(t)
	require.Equal(t, 8*time.Second, tm.d)
	h.clock.fire(tm)
	require.Eventually(t, func() bool { return h.ca.watching(5) }, realTimeout, time.Millisecond)
	h.clock.Step(time.Minute)
	h.ca.breakWatches(0)
	require.Equal(t, time.Second, h.clock.next(t).d)
}

func TestRunRenewsAtOnceWhenTheRootLeavesTheBundle(t *testing.T) {
	h := newSourceHarness(t, rotation.Options{Rand: zeroRand})
	h.run(t, h.ca.serveBufconn(t))
	h.clock.next(t)
	first := h.svid(t).Certificates[0]

	// The root is retired early: the bundle holds only a new root, and the
	// CA signs under it.
	life := testca.WithLifetime(h.start.Add(-time.Hour), h.start.Add(72*time.Hour))
	root2 := testca.New(t, sourceTD, life)
	h.ca.setIssuer(root2.ChildCA(life))
	h.ca.setBundle(bundleMsg(2, root2))

	h.clock.next(t) // the renewal's next renew point
	calls := h.ca.calls()
	require.Len(t, calls, 2)
	require.Equal(t, h.start, calls[1].at, "renewed without waiting for the renew point")
	require.Equal(t, uint64(2), calls[1].bundleSeq)
	// The SVID under the retired root no longer verifies against the held
	// bundle: the server would refuse it, so the token is sent instead.
	require.Equal(t, bootstrapToken, calls[1].token)
	svid := h.svid(t)
	require.NotEqual(t, first.SerialNumber, svid.Certificates[0].SerialNumber)
	_, _, err := x509svid.Verify(svid.Certificates, h.src, x509svid.WithTime(h.clock.Now()))
	require.NoError(t, err)
}

func TestRunWithAnInitialSVID(t *testing.T) {
	t.Run("valid: served and renewed over mTLS", func(t *testing.T) {
		h := newSourceFixture(t)
		initial := h.ca.issuer.CreateX509SVID(workloadID, testca.WithLifetime(h.start.Add(-10*time.Minute), h.start.Add(50*time.Minute)))
		h.newSource(t, rotation.Options{Rand: zeroRand, InitialSVID: initial})
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		require.NoError(t, h.src.WaitUntilReady(ctx), "ready before Run")
		requireSameCert(t, initial.Certificates[0], h.svid(t).Certificates[0])

		h.run(t, h.ca.serveBufconn(t))
		tm := h.clock.next(t)
		require.Equal(t, h.start.Add(20*time.Minute), tm.deadline, "half of the initial SVID's hour")
		require.Empty(t, h.ca.calls())
		h.clock.fire(tm)
		h.clock.next(t)
		calls := h.ca.calls()
		require.Len(t, calls, 1)
		require.Empty(t, calls[0].token)
	})
	t.Run("past its renew point: renewed at once", func(t *testing.T) {
		h := newSourceFixture(t)
		initial := h.ca.issuer.CreateX509SVID(workloadID, testca.WithLifetime(h.start.Add(-50*time.Minute), h.start.Add(10*time.Minute)))
		h.newSource(t, rotation.Options{InitialSVID: initial})
		h.run(t, h.ca.serveBufconn(t))
		h.clock.next(t)
		calls := h.ca.calls()
		require.Len(t, calls, 1)
		require.Equal(t, h.start, calls[0].at)
		require.Empty(t, calls[0].token)
	})
	t.Run("under a root not in the initial bundle: ignored", func(t *testing.T) {
		h := newSourceFixture(t)
		life := testca.WithLifetime(h.start.Add(-time.Hour), h.start.Add(72*time.Hour))
		oldRoot := testca.New(t, sourceTD, life)
		initial := oldRoot.ChildCA(life).CreateX509SVID(workloadID, testca.WithLifetime(h.start.Add(-10*time.Minute), h.start.Add(50*time.Minute)))
		h.newSource(t, rotation.Options{InitialSVID: initial})
		_, err := h.src.GetX509SVID()
		require.EqualError(t, err, `rotation: no X509-SVID for "spiffe://example.org/ns/shop/sa/web" yet`)
		logged := h.logs.find("ignoring the initial X509-SVID: it does not verify against the initial bundle")
		require.Len(t, logged, 1)
		require.Equal(t, slog.LevelWarn, logged[0].level)
		require.Equal(t, initial.Certificates[0].SerialNumber.Text(16), logged[0].attrs["serial"])
		require.Contains(t, logged[0].attrs["error"], "certificate signed by unknown authority")

		h.run(t, h.ca.serveBufconn(t))
		h.clock.next(t)
		calls := h.ca.calls()
		require.Len(t, calls, 1)
		require.Equal(t, h.start, calls[0].at)
		require.Equal(t, bootstrapToken, calls[0].token)
	})
	t.Run("expired: ignored", func(t *testing.T) {
		h := newSourceFixture(t)
		initial := h.ca.issuer.CreateX509SVID(workloadID, testca.WithLifetime(h.start.Add(-2*time.Hour), h.start.Add(-time.Hour)))
		h.newSource(t, rotation.Options{InitialSVID: initial})
		_, err := h.src.GetX509SVID()
		require.EqualError(t, err, `rotation: no X509-SVID for "spiffe://example.org/ns/shop/sa/web" yet`)
		h.run(t, h.ca.serveBufconn(t))
		h.clock.next(t)
		calls := h.ca.calls()
		require.Len(t, calls, 1)
		require.Equal(t, bootstrapToken, calls[0].token)
	})
}

func earlier(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

// TestRunSendsTheTokenAfterTheServerRefusesTheSVID runs the source over
// TLS against a CA that refuses its SVID as Unauthenticated, as
// meshca-server does once the SVID's root left its bundle, before the
// watch has told the source: the next attempt presents no client
// certificate and sends the token. One attempt only: when that fails too,
// the next tries the SVID again.
func TestRunSendsTheTokenAfterTheServerRefusesTheSVID(t *testing.T) {
	h := newSourceFixture(t)
	addr := h.ca.serveTLS(t)
	var tokenFails atomic.Bool
	h.newSource(t, rotation.Options{
		Rand: zeroRand,
		Token: func(context.Context) (string, error) {
			if tokenFails.Load() {
				return "", errors.New("token file not mounted")
			}
			return bootstrapToken, nil
		},
	})
	h.run(t, h.src.Dialer("passthrough:///"+addr, caServerID))
	tm := h.clock.next(t)
	first := h.svid(t).Certificates[0]

	// Refused over mTLS; then the token fails; then refused over mTLS
	// again; then the token works.
	h.ca.setRefuseCerts(true)
	tokenFails.Store(true)
	for i, want := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second} {
		h.clock.fire(tm)
		tm = h.clock.next(t)
		require.Equal(t, want, tm.d, "retry %d", i+1)
		if i == 1 {
			tokenFails.Store(false)
		}
	}
	h.clock.fire(tm)
	tm = h.clock.next(t)
	second := h.svid(t).Certificates[0]
	require.NotEqual(t, first.SerialNumber, second.SerialNumber)
	require.WithinDuration(t, second.NotBefore.Add(30*time.Minute), tm.deadline, 0)

	calls := h.ca.calls()
	require.Len(t, calls, 4, "the first SVID, two refusals and the renewal: the token that failed was never sent")
	for i, c := range calls[1:3] {
		require.Nil(t, c.issued, "call %d", i+1)
		require.Empty(t, c.token, "call %d", i+1)
		require.NotEmpty(t, c.peerCerts, "call %d", i+1)
		requireSameCert(t, first, c.peerCerts[0])
	}
	require.Equal(t, bootstrapToken, calls[3].token)
	require.Empty(t, calls[3].peerCerts, "the certificate the server refused is not presented with the token")
	requireSameCert(t, second, calls[3].issued)

	logged := h.logs.find("getting an X509-SVID failed")
	require.Len(t, logged, 3)
	require.Equal(t, "Unauthenticated", logged[0].attrs["code"])
	require.Equal(t, "rotation: getting the token: token file not mounted", logged[1].attrs["error"])
	require.Equal(t, "Unauthenticated", logged[2].attrs["code"])
	issued := h.logs.find("X509-SVID issued")
	require.Equal(t, "token", issued[len(issued)-1].attrs["method"])

	// The next renewal presents the new SVID, which the CA takes again.
	h.ca.setRefuseCerts(false)
	h.clock.fire(tm)
	h.clock.next(t)
	calls = h.ca.calls()
	require.Len(t, calls, 5)
	require.Empty(t, calls[4].token)
	require.NotEmpty(t, calls[4].peerCerts)
	requireSameCert(t, second, calls[4].peerCerts[0])
}

// suspendClock is the fake clock of a machine that can be suspended: its
// wall time (Now) jumps ahead while its timers, which run on the monotonic
// clock, stand still.
type suspendClock struct {
	*timerClock

	mu    sync.Mutex
	slept time.Duration
}

func (c *suspendClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.timerClock.Now().Add(c.slept)
}

func (c *suspendClock) Since(t time.Time) time.Duration { return c.Now().Sub(t) }

// suspend moves the wall time d ahead, firing no timer.
func (c *suspendClock) suspend(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.slept += d
}

// TestRunRenewsAfterASuspend suspends the machine past the renew point:
// timers stand still meanwhile, but the source reads the wall clock every
// minute, so it renews within a minute of the resume rather than when its
// timer, 30 minutes long, fires.
func TestRunRenewsAfterASuspend(t *testing.T) {
	h := newSourceFixture(t)
	clk := &suspendClock{timerClock: h.clock}
	h.ca.clock = clk
	h.newSource(t, rotation.Options{TTL: time.Hour, Rand: zeroRand, Clock: clk})
	h.run(t, h.ca.serveBufconn(t))
	tm := h.clock.next(t)
	first := h.svid(t).Certificates[0]
	require.WithinDuration(t, first.NotBefore.Add(30*time.Minute), tm.deadline, 0)

	// Suspended for 40 minutes: past the renew point, not the expiry.
	clk.suspend(40 * time.Minute)
	require.Len(t, h.ca.calls(), 1)
	h.clock.Step(time.Minute)
	h.clock.next(t) // the renewal's renew point
	calls := h.ca.calls()
	require.Len(t, calls, 2)
	require.WithinDuration(t, h.start.Add(41*time.Minute), calls[1].at, 0, "renewed a minute after the resume")
	require.Empty(t, calls[1].token, "renewed with the SVID, still valid")
	requireSameCert(t, calls[1].issued, h.svid(t).Certificates[0])
}

// TestRunWallClockChecksDoNotEndWaitsEarly steps the clock a minute at a
// time through a renew point: the source renews at the renew point, not
// at any of the minute checks before it.
func TestRunWallClockChecksDoNotEndWaitsEarly(t *testing.T) {
	h := newSourceHarness(t, rotation.Options{TTL: time.Hour, Rand: zeroRand})
	h.run(t, h.ca.serveBufconn(t))
	tm := h.clock.next(t)
	for h.clock.Now().Add(59 * time.Second).Before(tm.deadline) {
		h.clock.Step(59 * time.Second)
		// Let the source act on the step, were it to.
		time.Sleep(time.Millisecond)
		require.Len(t, h.ca.calls(), 1, "renewed at %s, before the renew point", h.clock.Now().Sub(h.start))
	}
	h.clock.fire(tm)
	h.clock.next(t)
	calls := h.ca.calls()
	require.Len(t, calls, 2)
	require.WithinDuration(t, tm.deadline, calls[1].at, 0)
}
