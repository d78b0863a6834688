package federation

import (
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ParseBundle exposes the checks of a fetched body to the fuzz test.
func ParseBundle(td spiffeid.TrustDomain, doc []byte) (*spiffebundle.Bundle, error) {
	b, ferr := parseBundle(td, doc)
	if ferr != nil {
		return nil, ferr
	}
	return b, nil
}
