package identity

import (
	"fmt"
	"slices"
	"strings"

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

// ReasonOutsideScope: the identity is in the trust domain but outside
// the path prefixes this CA may issue (Policy.AllowedPathPrefixes).
const ReasonOutsideScope PermissionReason = "outside_scope"

// Policy decides which identity an authenticated caller may be issued.
type Policy struct {
	// TrustDomain is the only trust domain issued for.
	TrustDomain spiffeid.TrustDomain

	// Reserved are IDs no caller is ever issued through a workload API,
	// such as the server's own.
	Reserved []spiffeid.ID

	// AllowedPathPrefixes, when not empty, scope this CA to part of the
	// trust domain: an ID is issued only when its path is one of the
	// prefixes or lies under one, matched on whole segments ("/ns/payments"
	// and "/ns/payments/" both allow /ns/payments/sa/api, neither allows
	// /ns/payments-v2/sa/api). Empty allows the whole trust domain.
	//
	// It is how clusters that share a root keep to their own identities:
	// a workload's stolen token, or a token review that names the wrong
	// namespace, cannot get another cluster's ID from this CA. It does
	// not bound what this CA's intermediate key can sign (X.509 URI name
	// constraints constrain only the host, the trust domain: RFC 5280
	// section 4.2.1.10). Check each prefix with ValidatePathPrefix.
	AllowedPathPrefixes []string
}

// ValidatePathPrefix checks a prefix of Policy.AllowedPathPrefixes: a
// SPIFFE ID path such as "/ns/payments" or "/cluster/east/" (a trailing
// slash is allowed), and not "/" (which would scope nothing).
func ValidatePathPrefix(prefix string) error {
	trimmed := strings.TrimSuffix(prefix, "/")
	if trimmed == "" {
		return fmt.Errorf("identity: path prefix %q would allow the whole trust domain; leave the prefixes empty for that", prefix)
	}
	if err := spiffeid.ValidatePath(trimmed); err != nil {
		return fmt.Errorf("identity: path prefix %q is not a SPIFFE ID path such as \"/ns/payments/\": %w", prefix, err)
	}
	return nil
}

// Authorize allows requested only when it is exactly the caller's own ID,
// in the policy's trust domain, not reserved, and within the allowed path
// prefixes if there are any.
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
	if !p.inScope(requested.Path()) {
		return &PermissionError{Reason: ReasonOutsideScope, msg: fmt.Sprintf("%q is outside the paths this CA issues (%s); another cluster's CA issues it", requested, strings.Join(p.AllowedPathPrefixes, ", "))}
	}
	return nil
}

// inScope reports whether path is one of the allowed prefixes or under
// one, on whole segments. A prefix that is not a valid path matches
// nothing, so a policy built without ValidatePathPrefix fails closed.
func (p Policy) inScope(path string) bool {
	if len(p.AllowedPathPrefixes) == 0 {
		return true
	}
	return slices.ContainsFunc(p.AllowedPathPrefixes, func(prefix string) bool {
		if ValidatePathPrefix(prefix) != nil {
			return false
		}
		prefix = strings.TrimSuffix(prefix, "/")
		return path == prefix || strings.HasPrefix(path, prefix+"/")
	})
}
