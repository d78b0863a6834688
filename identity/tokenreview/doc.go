// Package tokenreview authenticates Kubernetes workloads by their
// service-account tokens: a token is sent to the API server in a
// TokenReview (authentication.k8s.io/v1) for the CA's audiences, and an
// accepted token of service account <sa> in namespace <ns> proves the
// identity spiffe://<trust-domain>/ns/<ns>/sa/<sa>.
//
// Each API of the server reviews tokens for its own audiences, set on the
// credential (identity.Credential.Audiences; Options.Audiences when it
// sets none): "meshca" for the native API, "istio-ca" for Istio's,
// "identity.l5d.io" for Linkerd's. A token made for one API is therefore
// no credential on another.
//
// Accepted reviews are cached by a SHA-256 of the token and the audiences
// it was reviewed for, never the token, for at most Options.CacheTTL and
// never past the token's own expiry, so workloads keep getting
// certificates while the API server is briefly unreachable. Refusals and failures are not cached: a refusal can be
// transient (a pod the API server has not seen yet), and a flood of bad
// tokens is of distinct ones, which no cache by token would blunt.
// Concurrent reviews of one token for the same audiences are made once. An API server that is
// slow or down yields an *identity.AuthError with reason
// identity.ReasonUnavailable within Options.Timeout, not a hang.
//
// Anyone can present a bearer token, so what a made-up one costs is
// bounded: a token whose own "exp" claim has passed is refused without a
// review; at most Options.MaxInFlight reviews are under way at once, and
// a token that would start one more is refused at once with reason
// ReasonOverloaded (callers presenting a token already under review join
// it instead); and a review is cancelled as soon as every caller waiting
// for it has left, rather than running on to the timeout.
//
// In an identity.Chain the Authenticator follows the static bootstrap
// tokens, which also read bearer tokens, and comes before the SVID
// authenticator, so that a workload whose certificate no longer verifies
// recovers with its token:
//
//	reviews, err := tokenreview.New(clientset.AuthenticationV1(), tokenreview.Options{
//		TrustDomain: td,
//		Audiences:   []string{"meshca"},
//		Logger:      log,
//		Registerer:  reg,
//	})
//	if err != nil { ... }
//	authn := identity.Chain(staticTokens, reviews, svids)
//
// The CA's service account needs "create" on tokenreviews
// (authentication.k8s.io); nothing else.
package tokenreview
