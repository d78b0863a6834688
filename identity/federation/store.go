package federation

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/internal/securefile"
)

// Store keeps the federation state across restarts, so that a restarted
// server publishes its peers' last good bundles even while a peer is
// down.
type Store interface {
	// Load returns the stored state; an empty State when none was saved.
	Load(ctx context.Context) (*State, error)

	// Save replaces the stored state with s, atomically.
	Save(ctx context.Context, s *State) error
}

// State is what a Store keeps: the peers and their last good bundles. It
// encodes to JSON (json.Marshal) with each bundle as a SPIFFE bundle
// document, for any Store to write.
type State struct {
	// Peers are ordered by trust domain.
	Peers []PeerState
}

// PeerState is a peer and its last good bundle.
type PeerState struct {
	// Peer is the peer as added.
	Peer Peer

	// Bundle is the peer's last good bundle; nil when none was fetched
	// yet (the bootstrap bundle, if any, is in Peer).
	Bundle *spiffebundle.Bundle

	// LastSuccess is when Bundle was fetched.
	LastSuccess time.Time
}

// stateVersion is the version of the JSON encoding of State.
const stateVersion = 1

type stateDoc struct {
	Version int       `json:"version"`
	Peers   []peerDoc `json:"peers"`
}

type peerDoc struct {
	TrustDomain string          `json:"trust_domain"`
	URL         string          `json:"url"`
	Profile     Profile         `json:"profile"`
	EndpointID  string          `json:"endpoint_id,omitempty"`
	WebRoots    string          `json:"web_roots_pem,omitempty"`
	Bootstrap   json.RawMessage `json:"bootstrap_bundle,omitempty"`
	Bundle      json.RawMessage `json:"bundle,omitempty"`
	LastSuccess *time.Time      `json:"last_success,omitempty"`
}

// MarshalJSON encodes s with a version, each bundle as a SPIFFE bundle
// document and the Web PKI roots as PEM.
func (s State) MarshalJSON() ([]byte, error) {
	doc := stateDoc{Version: stateVersion, Peers: make([]peerDoc, 0, len(s.Peers))}
	for _, ps := range s.Peers {
		p := ps.Peer
		pd := peerDoc{
			TrustDomain: p.TrustDomain.Name(),
			URL:         p.URL,
			Profile:     p.Profile,
			WebRoots:    string(pemutil.EncodeCertificates(p.WebRoots...)),
		}
		if !p.EndpointID.IsZero() {
			pd.EndpointID = p.EndpointID.String()
		}
		var err error
		if pd.Bootstrap, err = marshalBundle(p.Bootstrap); err != nil {
			return nil, err
		}
		if pd.Bundle, err = marshalBundle(ps.Bundle); err != nil {
			return nil, err
		}
		if !ps.LastSuccess.IsZero() {
			t := ps.LastSuccess.UTC()
			pd.LastSuccess = &t
		}
		doc.Peers = append(doc.Peers, pd)
	}
	return json.Marshal(doc)
}

func marshalBundle(b *spiffebundle.Bundle) (json.RawMessage, error) {
	if b == nil {
		return nil, nil
	}
	data, err := b.Marshal()
	if err != nil {
		return nil, fmt.Errorf("federation: encoding the bundle of %q: %w", b.TrustDomain(), err)
	}
	return data, nil
}

// UnmarshalJSON decodes what MarshalJSON encodes. It does not validate the
// peers; the Federator does when it loads them.
func (s *State) UnmarshalJSON(data []byte) error {
	var doc stateDoc
	if err := json.Unmarshal(data, &doc); err != nil {
		return fmt.Errorf("federation: decoding the state: %w", err)
	}
	if doc.Version != stateVersion {
		return fmt.Errorf("federation: state version %d; this server reads version %d", doc.Version, stateVersion)
	}
	out := State{Peers: make([]PeerState, 0, len(doc.Peers))}
	for i, pd := range doc.Peers {
		td, err := spiffeid.TrustDomainFromString(pd.TrustDomain)
		if err != nil {
			return fmt.Errorf("federation: state peer %d: trust domain: %w", i, err)
		}
		ps := PeerState{Peer: Peer{TrustDomain: td, URL: pd.URL, Profile: pd.Profile}}
		if pd.EndpointID != "" {
			if ps.Peer.EndpointID, err = spiffeid.FromString(pd.EndpointID); err != nil {
				return fmt.Errorf("federation: state peer %q: endpoint ID: %w", td, err)
			}
		}
		if pd.WebRoots != "" {
			if ps.Peer.WebRoots, err = pemutil.ParseCertificates([]byte(pd.WebRoots)); err != nil {
				return fmt.Errorf("federation: state peer %q: Web PKI roots: %w", td, err)
			}
		}
		if len(pd.Bootstrap) > 0 {
			if ps.Peer.Bootstrap, err = spiffebundle.Parse(td, pd.Bootstrap); err != nil {
				return fmt.Errorf("federation: state peer %q: bootstrap bundle: %w", td, err)
			}
		}
		if len(pd.Bundle) > 0 {
			if ps.Bundle, err = spiffebundle.Parse(td, pd.Bundle); err != nil {
				return fmt.Errorf("federation: state peer %q: bundle: %w", td, err)
			}
		}
		if pd.LastSuccess != nil {
			ps.LastSuccess = *pd.LastSuccess
		}
		out.Peers = append(out.Peers, ps)
	}
	*s = out
	return nil
}

// FileStore is a Store in one JSON file, written atomically with mode
// 0600. It refuses to load a file that group or others may read or write,
// as the bundles in it are trusted.
type FileStore struct {
	path string
}

// NewFileStore returns the store in the file at path; the file need not
// exist yet, its directory must.
func NewFileStore(path string) *FileStore {
	return &FileStore{path: path}
}

// Load reads the file; a missing file is an empty state.
func (s *FileStore) Load(context.Context) (*State, error) {
	data, err := securefile.ReadPrivate(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		return &State{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("federation: reading the state: %w", err)
	}
	var st State
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, fmt.Errorf("%w (in %s)", err, s.path)
	}
	return &st, nil
}

// Save writes st to the file atomically.
func (s *FileStore) Save(_ context.Context, st *State) error {
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	if err := securefile.WriteFile(s.path, append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("federation: writing the state: %w", err)
	}
	return nil
}

var _ Store = (*FileStore)(nil)
