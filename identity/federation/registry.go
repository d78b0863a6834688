package federation

import (
	"context"
	"fmt"
	"slices"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// AddPeer starts federating with p: it is validated, saved to the store,
// published with its bootstrap bundle if it has one, and fetched at once
// if the federator runs. Errors wrap ErrInvalidPeer, ErrPeerExists or
// ErrTooManyPeers for the caller's mistakes; others are the store's.
func (f *Federator) AddPeer(ctx context.Context, p Peer) error {
	if err := p.validate(f.opts.TrustDomain); err != nil {
		return err
	}
	f.regMu.Lock()
	defer f.regMu.Unlock()
	f.mu.Lock()
	_, exists := f.peers[p.TrustDomain]
	n := len(f.peers)
	f.mu.Unlock()
	switch {
	case exists:
		return fmt.Errorf("%w: %q; remove it first to change it", ErrPeerExists, p.TrustDomain)
	case n >= f.opts.MaxPeers:
		return fmt.Errorf("%w: the limit is %d", ErrTooManyPeers, f.opts.MaxPeers)
	}
	np := f.newPeer(p)
	if f.opts.Store != nil {
		if err := f.opts.Store.Save(ctx, f.state(np, spiffeid.TrustDomain{})); err != nil {
			return fmt.Errorf("federation: saving peer %q: %w", p.TrustDomain, err)
		}
	}
	f.mu.Lock()
	f.peers[p.TrustDomain] = np
	if np.bundle != nil {
		f.notifyLocked()
	}
	f.startLocked(np)
	f.mu.Unlock()
	f.log.Info("federation: peer added", "trust_domain", p.TrustDomain.Name(), "url", p.URL, "profile", string(p.Profile))
	return nil
}

// RemovePeer stops federating with td: its bundle is no longer published
// and its state is removed from the store. The error wraps ErrUnknownPeer
// when td is not a peer.
func (f *Federator) RemovePeer(ctx context.Context, td spiffeid.TrustDomain) error {
	f.regMu.Lock()
	defer f.regMu.Unlock()
	f.mu.Lock()
	_, ok := f.peers[td]
	f.mu.Unlock()
	if !ok {
		return fmt.Errorf("%w: %q", ErrUnknownPeer, td)
	}
	if f.opts.Store != nil {
		if err := f.opts.Store.Save(ctx, f.state(nil, td)); err != nil {
			return fmt.Errorf("federation: saving the removal of peer %q: %w", td, err)
		}
	}
	f.mu.Lock()
	p := f.peers[td]
	delete(f.peers, td)
	p.removed = true
	if p.stop != nil {
		p.stop()
	}
	if p.bundle != nil {
		f.notifyLocked()
	}
	f.metrics.forget(td)
	f.mu.Unlock()
	p.fetcher.close()
	f.log.Info("federation: peer removed", "trust_domain", td.Name())
	return nil
}

// Peers returns the status of every peer, ordered by trust domain.
func (f *Federator) Peers() []PeerStatus {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]PeerStatus, 0, len(f.peers))
	for _, p := range f.peers {
		out = append(out, p.statusLocked())
	}
	slices.SortFunc(out, func(a, b PeerStatus) int { return compareTD(a.Peer.TrustDomain, b.Peer.TrustDomain) })
	return out
}

// Peer returns the status of peer td; the error wraps ErrUnknownPeer when
// td is not a peer.
func (f *Federator) Peer(td spiffeid.TrustDomain) (PeerStatus, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p, ok := f.peers[td]
	if !ok {
		return PeerStatus{}, fmt.Errorf("%w: %q", ErrUnknownPeer, td)
	}
	return p.statusLocked(), nil
}

func (p *peer) statusLocked() PeerStatus {
	return PeerStatus{
		Peer:                p.cfg.clone(),
		Bundle:              p.bundle,
		LastAttempt:         p.lastAttempt,
		LastSuccess:         p.lastSuccess,
		LastError:           p.lastErr,
		ConsecutiveFailures: p.failures,
		NextRefresh:         p.next,
	}
}
