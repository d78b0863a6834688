// Package identity decides who a caller is and what identity it may be
// issued: SPIFFE ID naming policy, authentication of callers (static
// bootstrap tokens, mTLS with a current SVID) and the authorisation that
// ties a credential to the one identity its CSR may ask for.
//
// Every front end of the server (the native API, and the Istio and
// Linkerd compatible ones) uses the same Authenticator and Policy, so
// there is one copy of the rules:
//
//	caller, err := authn.Authenticate(ctx, identity.Credential{Token: token})
//	if err != nil { ... } // *AuthError: Unauthenticated
//	if err := policy.Authorize(caller, csr.ID); err != nil { ... } // *PermissionError
//
// What differs between front ends is carried by the credential, not by a
// second copy of the rules: Credential.Audiences names the audiences a
// token must be valid for on this API (a token minted for Linkerd is no
// credential on the native API), and Caller.RequireMethod lets an API
// accept only some methods (Linkerd: service-account tokens only, since
// its identity is the service account's).
package identity
