// Package wire reads what meshca's native API puts on the wire and every
// client of it needs alike: the trust bundle of a response, and the retry
// hint of a refusal.
package wire

import (
	"errors"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/internal/pemutil"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
)

// RetryAfter returns the delay of the google.rpc.RetryInfo detail that
// err's gRPC status carries, whatever its code, and whether there was one:
// meshca-server sends one when it sheds load or rate-limits a caller. A
// delay that is missing, invalid, zero or negative is no hint.
func RetryAfter(err error) (time.Duration, bool) {
	st, ok := status.FromError(err)
	if !ok || err == nil {
		return 0, false
	}
	for _, d := range st.Details() {
		info, ok := d.(*errdetails.RetryInfo)
		if !ok || info.GetRetryDelay() == nil || info.GetRetryDelay().CheckValid() != nil {
			continue
		}
		if delay := info.GetRetryDelay().AsDuration(); delay > 0 {
			return delay, true
		}
	}
	return 0, false
}

// ParseBundle parses a TrustBundle message: its trust domain and its X.509
// authorities, at least one. It returns the bundle and its sequence.
func ParseBundle(pb *meshcav1.TrustBundle) (*x509bundle.Bundle, uint64, error) {
	if pb == nil {
		return nil, 0, errors.New("no trust bundle")
	}
	td, err := spiffeid.TrustDomainFromString(pb.GetTrustDomain())
	if err != nil {
		return nil, 0, fmt.Errorf("bundle trust domain: %w", err)
	}
	bundle, err := Authorities(td, pb)
	if err != nil {
		return nil, 0, err
	}
	return bundle, pb.GetSequence(), nil
}

// Authorities parses pb's X.509 authorities, at least one, as the bundle
// of td (a federated bundle is named by its key, not its message).
func Authorities(td spiffeid.TrustDomain, pb *meshcav1.TrustBundle) (*x509bundle.Bundle, error) {
	if len(pb.GetX509Authorities()) == 0 {
		return nil, fmt.Errorf("the bundle of %q (sequence %d) has no X.509 authorities", td, pb.GetSequence())
	}
	roots, err := pemutil.ParseDER(pb.GetX509Authorities())
	if err != nil {
		return nil, fmt.Errorf("the bundle of %q (sequence %d): %w", td, pb.GetSequence(), err)
	}
	return x509bundle.FromX509Authorities(td, roots), nil
}
