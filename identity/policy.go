package identity

import (
	"fmt"
	"slices"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// WorkloadID returns the mesh convention's ID of a Kubernetes workload:
// spiffe://<td>/ns/<namespace>/sa/<service-account>.
func WorkloadID(td spiffeid.TrustDomain, namespace, serviceAccount string) (spiffeid.ID, error) {
	if namespace == "" || serviceAccount == "" {
		return spiffeid.ID{}, fmt.Errorf("identity: namespace and service account are required")
	}
	id, err := spiffeid.FromSegments(td, "ns", namespace, "sa", serviceAccount)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("identity: %w", err)
	}
	return id, nil
}

// Policy decides which identity an authenticated caller may be issued.
type Policy struct {
	// TrustDomain is the only trust domain issued for.
	TrustDomain spiffeid.TrustDomain

	// Reserved are IDs no caller is ever issued through a workload API,
	// such as the server's own.
	Reserved []spiffeid.ID
}

// Authorize allows requested only when it is exactly the caller's own ID,
// in the policy's trust domain, and not reserved.
func (p Policy) Authorize(caller Caller, requested spiffeid.ID) error {
	if caller.ID.TrustDomain() != p.TrustDomain {
		return &PermissionError{Reason: ReasonForeignDomain, msg: fmt.Sprintf("credential is for trust domain %q; this CA issues for %q", caller.ID.TrustDomain(), p.TrustDomain)}
	}
	if requested != caller.ID {
		return &PermissionError{Reason: ReasonIdentityMismatch, msg: fmt.Sprintf("CSR asks for %q but the credential is for %q; ask for the credential's ID", requested, caller.ID)}
	}
	if slices.Contains(p.Reserved, requested) {
		return &PermissionError{Reason: ReasonReservedIdentity, msg: fmt.Sprintf("%q is reserved and never issued to a workload", requested)}
	}
	return nil
}
