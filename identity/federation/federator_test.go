package federation_test

import (
	"context"
	"crypto/x509"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	gofed "github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/meshca/meshca/identity/federation"
	"github.com/meshca/meshca/testca"
)

// A root prepared on the peer reaches the federating server within one
// refresh hint: the federator fetches at the hint the endpoint serves.
func TestPreparedRootReachesPeerWithinOneRefreshHint(t *testing.T) {
	t.Parallel()
	const hint = time.Minute
	east := newPeerCA(t, peerTD)
	web := newWebPKI(t)
	certFile, keyFile := writeKeyPair(t, t.TempDir(), web.serverCert(t))
	url := startEndpoint(t, federation.EndpointOptions{
		TrustDomain: peerTD, Bundles: east, RefreshHint: hint,
		Profile: federation.ProfileHTTPSWeb, CertFile: certFile, KeyFile: keyFile,
	})

	clk := clocktesting.NewFakeClock(time.Now())
	west := newFederator(t, federation.Options{Clock: clk})
	run(t, west)
	require.NoError(t, west.AddPeer(context.Background(), federation.Peer{
		TrustDomain: peerTD, URL: url, Profile: federation.ProfileHTTPSWeb, WebRoots: []*x509.Certificate{web.root.Cert},
	}))
	first := waitForBundle(t, west, peerTD, hasSequence(1))
	requireSameAuthorities(t, first, east.root.Cert)
	st, err := west.Peer(peerTD)
	require.NoError(t, err)
	require.False(t, st.NextRefresh.After(st.LastSuccess.Add(hint)), "next refresh %s is within one hint of %s", st.NextRefresh, st.LastSuccess)

	prepared := east.prepareRoot(t)
	// The refresh timer is set once the fetch is recorded; the fake clock
	// tells when it waits.
	require.Eventually(t, clk.HasWaiters, wait, time.Millisecond)
	clk.Step(hint)

	got := waitForBundle(t, west, peerTD, hasSequence(2))
	requireSameAuthorities(t, got, east.root.Cert, prepared.Cert)
	hintGot, _ := got.RefreshHint()
	require.Equal(t, hint, hintGot)
}

// A bundle that must not be taken is refused with a clear reason, and the
// last good bundle stays published.
func TestRefusedBundleKeepsLastGood(t *testing.T) {
	t.Parallel()
	root := testca.New(t, peerTD)
	good := bundleOf(peerTD, 5, root)

	for _, tc := range []struct {
		name string
		// serve sets the peer's answer after the good bundle.
		serve func(t *testing.T, fp *fakePeer)
		// peer, if set, changes the peer's configuration after the good
		// fetch, as a restarted server with a new configuration.
		peer     func(t *testing.T, fp *fakePeer) federation.Peer
		reason   federation.Reason
		err      string // the full error, or with contains its run-dependent part
		contains bool
	}{
		{
			name: "wrong trust domain",
			serve: func(t *testing.T, fp *fakePeer) {
				fp.serveBundle(t, bundleOf(peerTD, 6, testca.New(t, otherTD)))
			},
			reason: federation.ReasonWrongTrustDomain,
			err: `federation: bundle of "east.test": wrong_trust_domain: X.509 authority "CN=testca root,O=testca" ` +
				`carries SPIFFE ID "spiffe://elsewhere.test", of trust domain "elsewhere.test"; want "east.test"`,
		},
		{
			name:   "garbage JSON",
			serve:  func(_ *testing.T, fp *fakePeer) { fp.serve(http.StatusOK, `{"keys": [`) },
			reason: federation.ReasonMalformed,
			err:    `federation: bundle of "east.test": malformed: spiffebundle: unable to parse JWKS: unexpected end of JSON input`,
		},
		{
			name:   "not a bundle",
			serve:  func(_ *testing.T, fp *fakePeer) { fp.serve(http.StatusOK, `{"spiffe_sequence": 9}`) },
			reason: federation.ReasonMalformed,
			err:    `federation: bundle of "east.test": malformed: spiffebundle: no authorities found`,
		},
		{
			name: "endless body",
			serve: func(_ *testing.T, fp *fakePeer) {
				fp.set(func(w http.ResponseWriter, _ *http.Request) {
					// Without Content-Length, until the client hangs up: only
					// a bounded read ends the fetch before its timeout.
					chunk := []byte(strings.Repeat(" ", 64<<10))
					for {
						if _, err := w.Write(chunk); err != nil {
							return
						}
						w.(http.Flusher).Flush()
					}
				})
			},
			reason: federation.ReasonTooLarge,
			err:    `federation: bundle of "east.test": too_large: the body is over the 1048576-byte limit`,
		},
		{
			name:   "body over the limit, announced",
			serve:  func(_ *testing.T, fp *fakePeer) { fp.serve(http.StatusOK, strings.Repeat(" ", 1<<20+1)) },
			reason: federation.ReasonTooLarge,
			err:    `federation: bundle of "east.test": too_large: the body is 1048577 bytes, over the 1048576-byte limit`,
		},
		{
			name:   "stale sequence",
			serve:  func(t *testing.T, fp *fakePeer) { fp.serveBundle(t, bundleOf(peerTD, 4, root)) },
			reason: federation.ReasonStaleSequence,
			err: `federation: bundle of "east.test": stale_sequence: spiffe_sequence 4 is lower than 5, the last good bundle's: ` +
				`a lagging endpoint, a cache or a replay`,
		},
		{
			name: "same sequence, other roots",
			serve: func(t *testing.T, fp *fakePeer) {
				fp.serveBundle(t, bundleOf(peerTD, 5, root, testca.New(t, peerTD)))
			},
			reason: federation.ReasonSequenceConflict,
			err: `federation: bundle of "east.test": sequence_conflict: spiffe_sequence 5 is the last good bundle's, but the authorities differ: ` +
				`an endpoint must raise spiffe_sequence with every change, so one of the two is not the peer's`,
		},
		{
			name: "no sequence",
			serve: func(t *testing.T, fp *fakePeer) {
				b := bundleOf(peerTD, 0, root)
				b.ClearSequenceNumber()
				fp.serveBundle(t, b)
			},
			reason: federation.ReasonMissingSequence,
			err: `federation: bundle of "east.test": missing_sequence: the bundle has no spiffe_sequence, ` +
				`the last good bundle has 5: it cannot be told newer`,
		},
		{
			name:   "no X.509 authority",
			serve:  func(_ *testing.T, fp *fakePeer) { fp.serve(http.StatusOK, `{"keys": [], "spiffe_sequence": 6}`) },
			reason: federation.ReasonNoAuthorities,
			err:    `federation: bundle of "east.test": no_x509_authorities: the bundle holds no X.509 authority (no key with "use": "x509-svid")`,
		},
		{
			name:   "HTTP 500",
			serve:  func(_ *testing.T, fp *fakePeer) { fp.serve(http.StatusInternalServerError, `{"keys": []}`) },
			reason: federation.ReasonHTTPStatus,
			err:    `federation: bundle of "east.test": http_status: the endpoint answered 500 Internal Server Error; want 200 OK`,
		},
		{
			name: "redirect",
			serve: func(_ *testing.T, fp *fakePeer) {
				fp.set(func(w http.ResponseWriter, r *http.Request) {
					http.Redirect(w, r, "http://localhost/bundle", http.StatusFound)
				})
			},
			reason: federation.ReasonHTTPStatus,
			err: `federation: bundle of "east.test": http_status: the endpoint answered 302 Found; ` +
				`redirects are not followed, configure the URL it redirects to`,
		},
		{
			name:  "certificate of an untrusted Web PKI",
			serve: func(t *testing.T, fp *fakePeer) { fp.serveBundle(t, bundleOf(peerTD, 6, root)) },
			peer: func(t *testing.T, fp *fakePeer) federation.Peer {
				p := fp.webPeer(peerTD)
				p.WebRoots = []*x509.Certificate{newWebPKI(t).root.Cert}
				return p
			},
			reason:   federation.ReasonEndpointAuth,
			err:      `tls: failed to verify certificate: x509: certificate signed by unknown authority`,
			contains: true,
		},
		{
			name:  "endpoint down",
			serve: func(t *testing.T, fp *fakePeer) { fp.serveBundle(t, bundleOf(peerTD, 6, root)) },
			peer: func(t *testing.T, fp *fakePeer) federation.Peer {
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				require.NoError(t, err)
				require.NoError(t, ln.Close())
				p := fp.webPeer(peerTD)
				p.URL = "https://" + localhost(ln.Addr()) + "/"
				return p
			},
			reason:   federation.ReasonTransport,
			err:      `connect: connection refused`,
			contains: true,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			fp := newFakePeer(t)
			fp.serveBundle(t, good)
			store := &memStore{}
			fed := newFederator(t, federation.Options{Store: store})
			require.NoError(t, fed.AddPeer(ctx, fp.webPeer(peerTD)))
			_, err := fed.Refresh(ctx, peerTD)
			require.NoError(t, err)
			if tc.peer != nil {
				// A restart with the peer's new configuration and the
				// stored last good bundle.
				store.setPeer(t, tc.peer(t, fp))
				fed = newFederator(t, federation.Options{Store: store})
			}
			tc.serve(t, fp)
			_, changed := fed.Watch()

			st, err := fed.Refresh(ctx, peerTD)
			var ferr *federation.FetchError
			require.ErrorAs(t, err, &ferr)
			require.Equal(t, tc.reason, ferr.Reason)
			require.Equal(t, peerTD, ferr.TrustDomain)
			if tc.contains {
				require.ErrorContains(t, err, tc.err)
			} else {
				require.EqualError(t, err, tc.err)
			}

			require.Same(t, ferr, st.LastError, "the status says why")
			require.Equal(t, 1, st.ConsecutiveFailures)
			require.True(t, good.Equal(st.Bundle), "the last good bundle is kept")
			bundles, _ := fed.Watch()
			require.Len(t, bundles, 1)
			require.True(t, good.Equal(bundles[0]), "the last good bundle is still published")
			select {
			case <-changed:
				t.Fatal("watchers were told of a change")
			default:
			}
		})
	}
}

// https_spiffe: the federator authenticates the endpoint with the
// bootstrap bundle first, then with the bundle it last fetched, so it
// follows the peer through a root rotation that the bootstrap bundle
// alone would not survive.
func TestSPIFFEProfileFollowsRootRotation(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	east := newPeerCA(t, peerTD)
	url := startEndpoint(t, federation.EndpointOptions{
		TrustDomain: peerTD, Bundles: east, Profile: federation.ProfileHTTPSSPIFFE,
		GetCertificate: newServingCert(east.CA, serverID).GetCertificate,
	})
	bootstrap := spiffebundle.FromX509Authorities(peerTD, []*x509.Certificate{east.root.Cert})
	fed := newFederator(t, federation.Options{})
	require.NoError(t, fed.AddPeer(ctx, federation.Peer{
		TrustDomain: peerTD, URL: url, Profile: federation.ProfileHTTPSSPIFFE, EndpointID: serverID, Bootstrap: bootstrap,
	}))
	b, err := fed.GetBundleForTrustDomain(peerTD)
	require.NoError(t, err)
	require.True(t, bootstrap.Equal(b), "the bootstrap bundle is published before the first fetch")

	refresh := func(seq uint64, roots ...*x509.Certificate) {
		t.Helper()
		st, err := fed.Refresh(ctx, peerTD)
		require.NoError(t, err)
		got, _ := st.Bundle.SequenceNumber()
		require.Equal(t, seq, got)
		requireSameAuthorities(t, st.Bundle, roots...)
	}
	refresh(1, east.root.Cert)

	next := east.prepareRoot(t)
	refresh(2, east.root.Cert, next.Cert)

	east.activateRoot(t, next) // the endpoint's SVID now chains to the new root
	refresh(3, east.root.Cert, next.Cert)

	east.retireRoots(t) // the bootstrap root leaves the bundle
	refresh(4, next.Cert)
	refresh(4, next.Cert) // and the endpoint still verifies with the new root alone

	// The bootstrap bundle alone no longer verifies the endpoint.
	_, err = gofed.FetchBundle(ctx, peerTD, url, gofed.WithSPIFFEAuth(bootstrap, serverID))
	require.ErrorContains(t, err, "x509svid: could not verify leaf certificate: x509: certificate signed by unknown authority")
}

// An https_spiffe endpoint presenting an X509-SVID of another ID is
// refused before any bundle is read.
func TestSPIFFEEndpointOfWrongIDRefused(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	east := newPeerCA(t, peerTD)
	impostor := spiffeid.RequireFromPath(peerTD, "/ns/default/sa/web")
	url := startEndpoint(t, federation.EndpointOptions{
		TrustDomain: peerTD, Bundles: east, Profile: federation.ProfileHTTPSSPIFFE,
		GetCertificate: newServingCert(east.CA, impostor).GetCertificate,
	})
	bootstrap := spiffebundle.FromX509Authorities(peerTD, []*x509.Certificate{east.root.Cert})
	bootstrap.SetSequenceNumber(1)
	fed := newFederator(t, federation.Options{})
	require.NoError(t, fed.AddPeer(ctx, federation.Peer{
		TrustDomain: peerTD, URL: url, Profile: federation.ProfileHTTPSSPIFFE, EndpointID: serverID, Bootstrap: bootstrap,
	}))
	east.prepareRoot(t) // what the endpoint would give: sequence 2

	st, err := fed.Refresh(ctx, peerTD)
	var ferr *federation.FetchError
	require.ErrorAs(t, err, &ferr)
	require.Equal(t, federation.ReasonEndpointAuth, ferr.Reason)
	require.ErrorContains(t, err, `the endpoint's X509-SVID was refused: unexpected ID "spiffe://east.test/ns/default/sa/web"`)
	require.True(t, bootstrap.Equal(st.Bundle), "the bootstrap bundle is kept")
	require.True(t, st.LastSuccess.IsZero())
}

// The next fetch is at the bundle's refresh hint within the configured
// bounds, a little earlier at random; after failures it is sooner, backing
// off up to the refresh interval.
func TestRefreshSchedule(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	root := testca.New(t, peerTD)
	withHint := func(seq uint64, hint time.Duration) *spiffebundle.Bundle {
		b := bundleOf(peerTD, seq, root)
		if hint > 0 {
			b.SetRefreshHint(hint)
		}
		return b
	}
	opts := federation.Options{
		DefaultRefresh: 10 * time.Minute,
		MinRefresh:     time.Minute,
		MaxRefresh:     time.Hour,
		RetryInterval:  5 * time.Second,
	}
	within := func(t *testing.T, st federation.PeerStatus, want time.Duration) {
		t.Helper()
		got := st.NextRefresh.Sub(st.LastAttempt)
		require.LessOrEqual(t, got, want)
		require.GreaterOrEqual(t, got, want-want/10)
	}

	for _, tc := range []struct {
		name string
		hint time.Duration
		want time.Duration
	}{
		{"hint", 7 * time.Minute, 7 * time.Minute},
		{"no hint", 0, 10 * time.Minute},
		{"hint below the minimum", time.Second, time.Minute},
		{"hint above the maximum", 48 * time.Hour, time.Hour},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			fp := newFakePeer(t)
			fp.serveBundle(t, withHint(1, tc.hint))
			clk := clocktesting.NewFakeClock(time.Now())
			o := opts
			o.Clock = clk
			fed := newFederator(t, o)
			require.NoError(t, fed.AddPeer(ctx, fp.webPeer(peerTD)))
			st, err := fed.Refresh(ctx, peerTD)
			require.NoError(t, err)
			within(t, st, tc.want)
		})
	}

	t.Run("backoff", func(t *testing.T) {
		t.Parallel()
		fp := newFakePeer(t)
		fp.serveBundle(t, withHint(1, 30*time.Second+time.Minute))
		clk := clocktesting.NewFakeClock(time.Now())
		o := opts
		o.Clock = clk
		fed := newFederator(t, o)
		require.NoError(t, fed.AddPeer(ctx, fp.webPeer(peerTD)))
		_, err := fed.Refresh(ctx, peerTD)
		require.NoError(t, err)

		fp.serve(http.StatusServiceUnavailable, "")
		for i, want := range []time.Duration{5 * time.Second, 10 * time.Second, 20 * time.Second, 40 * time.Second, 80 * time.Second, 90 * time.Second, 90 * time.Second} {
			st, err := fed.Refresh(ctx, peerTD)
			require.Error(t, err)
			require.Equal(t, i+1, st.ConsecutiveFailures)
			within(t, st, want)
		}
		fp.serveBundle(t, withHint(2, 90*time.Second))
		st, err := fed.Refresh(ctx, peerTD)
		require.NoError(t, err)
		require.Zero(t, st.ConsecutiveFailures)
		require.Nil(t, st.LastError)
		within(t, st, 90*time.Second)
	})
}

// Run fetches at the scheduled time and retries a failed fetch without
// being asked.
func TestRunRetriesAfterFailure(t *testing.T) {
	t.Parallel()
	fp := newFakePeer(t)
	fp.serve(http.StatusServiceUnavailable, "")
	clk := clocktesting.NewFakeClock(time.Now())
	fed := newFederator(t, federation.Options{Clock: clk, RetryInterval: time.Second})
	require.NoError(t, fed.AddPeer(context.Background(), fp.webPeer(peerTD)))
	run(t, fed)

	// The first fetch fails and sets the retry timer.
	require.Eventually(t, clk.HasWaiters, wait, time.Millisecond)
	st, err := fed.Peer(peerTD)
	require.NoError(t, err)
	require.Equal(t, federation.ReasonHTTPStatus, st.LastError.Reason)

	root := testca.New(t, peerTD)
	fp.serveBundle(t, bundleOf(peerTD, 1, root))
	clk.Step(time.Second)
	got := waitForBundle(t, fed, peerTD, hasSequence(1))
	requireSameAuthorities(t, got, root.Cert)
}
