package identity

import (
	"context"
	"crypto/x509"
	"errors"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Credential is what a caller presented. The server edge fills it from the
// request; authenticators look at the part they understand.
type Credential struct {
	// Token is a bearer token, without the "Bearer " prefix.
	Token string

	// PeerCertificates is the TLS client certificate chain, leaf first, as
	// presented and not yet verified.
	PeerCertificates []*x509.Certificate
}

// Method names how a caller was authenticated, for audit lines.
type Method string

// The authentication methods.
const (
	MethodBootstrapToken  Method = "bootstrap_token"
	MethodKubernetesToken Method = "kubernetes_token"
	MethodMTLS            Method = "mtls"
)

// Caller is an authenticated caller.
type Caller struct {
	// ID is the identity the credential proves.
	ID spiffeid.ID

	// Method says which authenticator accepted the credential.
	Method Method

	// Subject names the credential in audit lines without revealing it: a
	// token hash prefix, a certificate serial.
	Subject string
}

// Authenticator turns a credential into a caller.
//
// An authenticator returns an error wrapping ErrNotApplicable when the
// credential holds nothing it understands, and an *AuthError with
// ReasonUnknownToken when it does not know a token another authenticator
// may know.
type Authenticator interface {
	Authenticate(ctx context.Context, cred Credential) (Caller, error)
}

// ErrNotApplicable is wrapped by an Authenticator's error when the
// credential is not of its kind.
var ErrNotApplicable = errors.New("identity: credential not of this authenticator's kind")

// Chain returns an Authenticator that tries each of authns in order.
//
// The first success wins. An authenticator that does not apply, does not
// know the token, or cannot check it now (unavailable, overloaded) passes
// to the next; any other refusal is final. When none accepts, the caller
// gets the first "cannot check now" refusal (retrying may work), else the
// last "unknown" one, else one saying no credential was presented.
func Chain(authns ...Authenticator) Authenticator {
	return chain(authns)
}

type chain []Authenticator

func (c chain) Authenticate(ctx context.Context, cred Credential) (Caller, error) {
	var unknown, unavailable error
	for _, a := range c {
		caller, err := a.Authenticate(ctx, cred)
		if err == nil {
			return caller, nil
		}
		var ae *AuthError
		switch {
		case errors.Is(err, ErrNotApplicable):
			continue
		case errors.As(err, &ae) && ae.Reason == ReasonUnknownToken:
			unknown = err
			continue
		case errors.As(err, &ae) && (ae.Reason == ReasonUnavailable || ae.Reason == ReasonOverloaded):
			// The token could not be checked now; another credential of
			// the same call (a valid SVID) may still do.
			if unavailable == nil {
				unavailable = err
			}
			continue
		}
		return Caller{}, err
	}
	if unavailable != nil {
		return Caller{}, unavailable
	}
	if unknown != nil {
		return Caller{}, unknown
	}
	return Caller{}, authErrorf(ReasonNoCredential, nil, "no credential: send \"authorization: Bearer <token>\" metadata, or present your current SVID as the TLS client certificate")
}
