package rotation_test

import (
	"context"
	"crypto/x509"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/rotation"
	"github.com/meshca/meshca/testca"
)

func TestNewSourceChecksOptions(t *testing.T) {
	root := testca.New(t, sourceTD)
	inter := root.ChildCA()
	bundle := root.Bundle()
	otherSVID := inter.CreateX509SVID(spiffeid.RequireFromPath(sourceTD, "/ns/shop/sa/db"))
	wrongKey := inter.CreateX509SVID(workloadID)
	wrongKey.PrivateKey = testca.NewKey(t)

	tests := []struct {
		name string
		opts rotation.Options
		want string
	}{
		{
			name: "no ID",
			opts: rotation.Options{InitialBundle: bundle},
			want: "rotation: Options.ID is required: the SPIFFE ID to ask for",
		},
		{
			name: "no bundle",
			opts: rotation.Options{ID: workloadID},
			want: "rotation: Options.InitialBundle is required: the roots that verify the server",
		},
		{
			name: "bundle of another trust domain",
			opts: rotation.Options{ID: workloadID, InitialBundle: testca.New(t, spiffeid.RequireTrustDomainFromString("other.org")).Bundle()},
			want: `rotation: Options.InitialBundle is for trust domain "other.org"; want "example.org", the trust domain of "spiffe://example.org/ns/shop/sa/web"`,
		},
		{
			name: "empty bundle",
			opts: rotation.Options{ID: workloadID, InitialBundle: x509bundle.New(sourceTD)},
			want: "rotation: Options.InitialBundle has no X.509 authorities",
		},
		{
			name: "negative TTL",
			opts: rotation.Options{ID: workloadID, InitialBundle: bundle, TTL: -time.Hour},
			want: "rotation: Options.TTL is -1h0m0s; want zero (the server's default) or more",
		},
		{
			name: "renew window before the life",
			opts: rotation.Options{ID: workloadID, InitialBundle: bundle, RenewFraction: 0.25, RenewJitter: 0.5},
			want: "rotation: Options.RenewFraction 0.25 and RenewJitter 0.5 put renew points in [-0.25, 0.25] of the life; want them within (0, 1)",
		},
		{
			name: "renew point at the end of the life",
			opts: rotation.Options{ID: workloadID, InitialBundle: bundle, RenewFraction: 1},
			want: "rotation: Options.RenewFraction 1 and RenewJitter 0.1 put renew points in [0.9, 1] of the life; want them within (0, 1)",
		},
		{
			name: "backoff initial over its max",
			opts: rotation.Options{ID: workloadID, InitialBundle: bundle, Backoff: rotation.Backoff{Initial: 2 * time.Minute}},
			want: "rotation: Options.Backoff: Initial 2m0s and Max 1m0s: want 0 < Initial <= Max",
		},
		{
			name: "backoff that shrinks",
			opts: rotation.Options{ID: workloadID, InitialBundle: bundle, Backoff: rotation.Backoff{Factor: 0.5}},
			want: "rotation: Options.Backoff.Factor is 0.5; want 1 or more",
		},
		{
			name: "backoff jitter over 1",
			opts: rotation.Options{ID: workloadID, InitialBundle: bundle, Backoff: rotation.Backoff{Jitter: 1.5}},
			want: "rotation: Options.Backoff.Jitter is 1.5; want at most 1",
		},
		{
			name: "negative request timeout",
			opts: rotation.Options{ID: workloadID, InitialBundle: bundle, RequestTimeout: -time.Second},
			want: "rotation: Options.RequestTimeout is -1s; want zero (30s) or more",
		},
		{
			name: "initial SVID of another ID",
			opts: rotation.Options{ID: workloadID, InitialBundle: bundle, InitialSVID: otherSVID},
			want: `rotation: Options.InitialSVID is for "spiffe://example.org/ns/shop/sa/db"; want "spiffe://example.org/ns/shop/sa/web", Options.ID`,
		},
		{
			name: "initial SVID with another key",
			opts: rotation.Options{ID: workloadID, InitialBundle: bundle, InitialSVID: wrongKey},
			want: "rotation: Options.InitialSVID's private key is not the key of its certificate",
		},
		{
			name: "initial SVID without certificates",
			opts: rotation.Options{ID: workloadID, InitialBundle: bundle, InitialSVID: &x509svid.SVID{ID: workloadID}},
			want: "rotation: Options.InitialSVID needs its certificates and private key",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src, err := rotation.NewSource(tt.opts)
			require.EqualError(t, err, tt.want)
			require.Nil(t, src)
		})
	}
}

func TestSourceBeforeTheFirstSVID(t *testing.T) {
	h := newSourceHarness(t, rotation.Options{})

	_, err := h.src.GetX509SVID()
	require.EqualError(t, err, `rotation: no X509-SVID for "spiffe://example.org/ns/shop/sa/web" yet`)

	bundle, err := h.src.GetX509BundleForTrustDomain(sourceTD)
	require.NoError(t, err)
	require.Equal(t, []*x509.Certificate{h.ca.root.Cert}, bundle.X509Authorities())
	require.Zero(t, h.src.BundleSequence())
	_, err = h.src.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("other.org"))
	require.EqualError(t, err, `rotation: no bundle for trust domain "other.org"; this source holds "example.org" and no federated bundle for it`)

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	require.EqualError(t, h.src.WaitUntilReady(ctx), `rotation: waiting for the first X509-SVID for "spiffe://example.org/ns/shop/sa/web": context canceled`)
	require.EqualError(t, h.src.Run(ctx, nil), "rotation: Run needs a Dialer")
}

func TestSourceRunsOnceAtATime(t *testing.T) {
	h := newSourceHarness(t, rotation.Options{})
	dial := h.ca.serveBufconn(t)
	h.run(t, dial)
	h.clock.next(t)
	require.EqualError(t, h.src.Run(context.Background(), dial), "rotation: Run is already running on this source")
}

func TestChangedFiresOnEveryChange(t *testing.T) {
	h := newSourceHarness(t, rotation.Options{})
	changed := h.src.Changed()
	h.run(t, h.ca.serveBufconn(t))
	ctx, cancel := context.WithTimeout(context.Background(), realTimeout)
	defer cancel()
	require.NoError(t, h.src.WaitUntilReady(ctx))
	requireClosed(t, changed, "the first SVID")

	changed = h.src.Changed()
	tm := h.clock.next(t)
	h.clock.fire(tm)
	requireClosed(t, changed, "a renewal")

	changed = h.src.Changed()
	h.ca.setBundle(bundleMsg(7, h.ca.root))
	requireClosed(t, changed, "a new bundle")
	require.Equal(t, uint64(7), h.src.BundleSequence())
}

func requireClosed(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(realTimeout):
		t.Fatalf("no change notified for %s", what)
	}
}
