package ca

import (
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
)

// MarshalSPIFFEBundle encodes b in the SPIFFE trust bundle format (a JWK
// Set of x509-svid keys) with its sequence number and refresh hint, as the
// bundle API, the ConfigMaps and the federation endpoint serve it.
func MarshalSPIFFEBundle(b *x509bundle.Bundle, seq uint64, hint time.Duration) ([]byte, error) {
	sb := spiffebundle.FromX509Authorities(b.TrustDomain(), b.X509Authorities())
	sb.SetSequenceNumber(seq)
	sb.SetRefreshHint(hint)
	doc, err := sb.Marshal()
	if err != nil {
		return nil, fmt.Errorf("ca: encoding the SPIFFE bundle: %w", err)
	}
	return doc, nil
}
