package server

import (
	"bytes"
	"errors"
	"fmt"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshca/meshca/identity/federation"
	"github.com/meshca/meshca/internal/pemutil"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
)

// FederatedBundles gives the bundles of the trust domains federated with
// the server's, for Sign responses and the bundle stream.
// *federation.Federator is one.
type FederatedBundles interface {
	// Watch returns the current federated bundles, sorted by trust domain,
	// and a channel closed when they next change.
	Watch() ([]*spiffebundle.Bundle, <-chan struct{})
}

var _ FederatedBundles = (*federation.Federator)(nil)

// federatedCache holds the federated bundles as messages, built once per
// change of the federated bundles rather than once per request.
type federatedCache struct {
	src FederatedBundles // nil: no federation

	mu      sync.Mutex
	changed <-chan struct{} // closed when pbs is stale; nil before the first build
	pbs     []*meshcav1.TrustBundle
}

// get returns the federated bundles as messages, and a channel closed
// when they change (nil, which never closes, when there is no federation).
// The messages are shared: callers must not modify them.
func (c *federatedCache) get() ([]*meshcav1.TrustBundle, <-chan struct{}) {
	if c.src == nil {
		return nil, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.changed != nil {
		select {
		case <-c.changed:
		default:
			return c.pbs, c.changed
		}
	}
	bundles, changed := c.src.Watch()
	pbs := make([]*meshcav1.TrustBundle, 0, len(bundles))
	for _, b := range bundles {
		pbs = append(pbs, federatedProto(b))
	}
	c.pbs, c.changed = pbs, changed
	return pbs, changed
}

// federatedProto returns a peer's bundle as a message: its roots, and its
// spiffe_sequence and spiffe_refresh_hint when it has them.
func federatedProto(b *spiffebundle.Bundle) *meshcav1.TrustBundle {
	roots := b.X509Authorities()
	pb := &meshcav1.TrustBundle{
		TrustDomain:     b.TrustDomain().Name(),
		X509Authorities: make([][]byte, len(roots)),
	}
	for i, r := range roots {
		pb.X509Authorities[i] = r.Raw
	}
	if seq, ok := b.SequenceNumber(); ok {
		pb.Sequence = seq
	}
	if hint, ok := b.RefreshHint(); ok {
		pb.RefreshHint = durationpb.New(hint)
	}
	// A bundle that parsed from a document marshals again; one that does
	// not is still served by its roots.
	if doc, err := b.Marshal(); err == nil {
		pb.SpiffeJson = doc
	}
	return pb
}

// ParsePeerBundle reads a federated trust domain's bundle obtained out of
// band: a SPIFFE bundle document (JSON, as `meshctl bundle --format
// spiffe` prints it and a bundle endpoint serves it) or PEM certificates
// (as `meshctl bundle` prints it and meshca-server writes bundle.pem).
func ParsePeerBundle(td spiffeid.TrustDomain, data []byte) (*spiffebundle.Bundle, error) {
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) == 0 {
		return nil, errors.New("the bundle is empty")
	}
	if trimmed[0] == '{' {
		b, err := spiffebundle.Parse(td, trimmed)
		if err != nil {
			return nil, fmt.Errorf("the bundle is not a SPIFFE bundle document: %w", err)
		}
		// A document of JWT authorities only, or of none ("keys": []),
		// would be a bootstrap bundle that verifies no endpoint.
		if len(b.X509Authorities()) == 0 {
			return nil, errors.New("the bundle has no X.509 authority (no key with \"use\": \"x509-svid\")")
		}
		return checkedPeerBundle(b)
	}
	certs, err := pemutil.ParseCertificates(trimmed)
	if err != nil {
		return nil, fmt.Errorf("the bundle is neither a SPIFFE bundle document (JSON) nor PEM certificates: %w", err)
	}
	return checkedPeerBundle(spiffebundle.FromX509Authorities(td, certs))
}

// checkedPeerBundle refuses a bundle with an authority of an unusable key,
// as the federator refuses one fetched.
func checkedPeerBundle(b *spiffebundle.Bundle) (*spiffebundle.Bundle, error) {
	for _, c := range b.X509Authorities() {
		if err := federation.CheckKey(c); err != nil {
			return nil, err
		}
	}
	return b, nil
}
