package identity

import "fmt"

// AuthReason says why a caller was not authenticated. The values are
// stable metric labels.
type AuthReason string

// The reasons a caller is not authenticated.
const (
	ReasonNoCredential   AuthReason = "no_credential"
	ReasonMalformedToken AuthReason = "malformed_token"
	ReasonUnknownToken   AuthReason = "unknown_token"
	ReasonBadCertificate AuthReason = "bad_certificate"
	ReasonUnavailable    AuthReason = "authenticator_unavailable"
	ReasonOverloaded     AuthReason = "overloaded"
)

// AuthError is a credential that is missing or refused. Its message never
// holds the credential itself.
type AuthError struct {
	Reason AuthReason
	msg    string
	err    error
}

func (e *AuthError) Error() string {
	if e.err != nil {
		return "identity: " + e.msg + ": " + e.err.Error()
	}
	return "identity: " + e.msg
}

func (e *AuthError) Unwrap() error { return e.err }

func authErrorf(reason AuthReason, err error, format string, args ...any) *AuthError {
	return &AuthError{Reason: reason, msg: fmt.Sprintf(format, args...), err: err}
}

// PermissionReason says why an authenticated caller was refused.
type PermissionReason string

// The reasons an authenticated caller is refused.
const (
	ReasonIdentityMismatch PermissionReason = "identity_mismatch"
	ReasonReservedIdentity PermissionReason = "reserved_identity"
	ReasonForeignDomain    PermissionReason = "foreign_trust_domain"
)

// PermissionError is an authenticated caller asking for what its
// credential does not allow.
type PermissionError struct {
	Reason PermissionReason
	msg    string
}

func (e *PermissionError) Error() string { return "identity: " + e.msg }
