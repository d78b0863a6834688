package rotation

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"

	"google.golang.org/grpc/status"

	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
)

// watchBundles keeps a WatchBundle stream open until ctx is done,
// reconnecting with backoff when it breaks. The backoff starts over after
// a stream that lived at least Backoff.Max.
func (s *Source) watchBundles(ctx context.Context, dial Dialer) {
	failures := 0
	for {
		started := s.clock.Now()
		received, err := s.watchOnce(ctx, dial)
		if ctx.Err() != nil {
			return
		}
		if received && s.clock.Since(started) >= s.backoff.Max {
			// The stream worked for a while before it broke: start the
			// backoff over. One that breaks at once, again and again,
			// keeps backing off.
			failures = 0
		}
		failures++
		wait := s.backoff.delay(failures, s.random())
		attrs := []slog.Attr{slog.Int("failures", failures), slog.Duration("retry_in", wait)}
		if st, ok := status.FromError(err); ok {
			attrs = append(attrs, slog.String("code", st.Code().String()))
		}
		s.log.LogAttrs(ctx, slog.LevelWarn, "the bundle watch broke; reconnecting", append(attrs, slog.Any("error", err))...)
		if !s.sleep(ctx, wait, nil) {
			return
		}
	}
}

// watchOnce reads one WatchBundle stream until it breaks, and reports
// whether it received anything.
func (s *Source) watchOnce(ctx context.Context, dial Dialer) (bool, error) {
	conn, err := dial(ctx)
	if err != nil {
		return false, fmt.Errorf("rotation: connecting to the CA: %w", err)
	}
	defer conn.Close()
	stream, err := meshcav1.NewBundleServiceClient(conn).WatchBundle(ctx, &meshcav1.WatchBundleRequest{})
	if err != nil {
		return false, fmt.Errorf("rotation: WatchBundle: %w", err)
	}
	received := false
	for {
		pb, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return received, errors.New("rotation: WatchBundle: the server ended the stream")
		}
		if err != nil {
			return received, fmt.Errorf("rotation: WatchBundle: %w", err)
		}
		received = true
		s.receiveBundle(ctx, pb)
	}
}

// receiveBundle swaps in what an update of the watch holds: its bundle
// when it is newer than the held one, and its federated bundles, checked
// as those of a Sign response are (federatedFrom). A bad bundle of the
// source's own trust domain is ignored, and the federated bundles are
// still taken. When the current SVID no longer verifies against the new
// bundle (its root left it), swap asks for a renewal at once.
func (s *Source) receiveBundle(ctx context.Context, up *meshcav1.BundleUpdate) {
	u := update{federated: s.federatedFrom(ctx, up.GetFederatedBundles()), setFederated: true}
	if up.GetBundle() == nil {
		s.log.LogAttrs(ctx, slog.LevelWarn, "ignoring a bad bundle from the watch", slog.Any("error", errors.New("rotation: the update has no bundle")))
	} else if bundle, seq, err := s.parseBundle(up.GetBundle()); err != nil {
		s.log.LogAttrs(ctx, slog.LevelWarn, "ignoring a bad bundle from the watch", slog.Any("error", fmt.Errorf("rotation: %w", err)))
	} else {
		u.bundle, u.seq = bundle, seq
	}
	changed, err := s.swap(u)
	if changed.federated {
		s.log.LogAttrs(ctx, slog.LevelInfo, "federated bundles updated", slog.String("from", "watch"), slog.Any("trust_domains", trustDomains(u.federated)))
	}
	if !changed.bundle {
		return
	}
	s.log.LogAttrs(ctx, slog.LevelInfo, "trust bundle updated", slog.String("from", "watch"), slog.Uint64("sequence", u.seq))
	if err != nil {
		s.log.LogAttrs(ctx, slog.LevelWarn, "the X509-SVID does not verify against the new bundle; renewing now",
			slog.Uint64("sequence", u.seq), slog.Any("error", err))
	}
}
