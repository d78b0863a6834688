package identity

import "strings"

// MaxTokenLength is the longest bearer token accepted. Kubernetes
// service-account tokens are 1 to 2 KiB.
const MaxTokenLength = 8 << 10

// ParseBearer returns the token of an "authorization" header value
// "Bearer <token>". The scheme is case-insensitive, as RFC 7235 says. A
// token over MaxTokenLength is refused before anything is parsed. The
// error never holds the header's content.
func ParseBearer(header string) (string, error) {
	const prefix = len("Bearer ")
	if len(header) > MaxTokenLength+prefix {
		// Counted as if the header were "Bearer <token>": what follows
		// the scheme and its space.
		return "", authErrorf(ReasonMalformedToken, nil, "bearer token is %d bytes, more than the limit of %d", len(header)-prefix, MaxTokenLength)
	}
	scheme, token, ok := strings.Cut(header, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", authErrorf(ReasonMalformedToken, nil, "authorization header is not \"Bearer <token>\"")
	}
	token = strings.TrimSpace(token)
	if token == "" {
		return "", authErrorf(ReasonMalformedToken, nil, "authorization header has an empty bearer token")
	}
	if err := checkPrintable(token, "bearer token"); err != nil {
		return "", err
	}
	return token, nil
}

// ParseToken returns a bearer token carried in a request's body rather
// than in an "authorization" header (Linkerd's Certify has a token field),
// field naming it in errors. Surrounding white space (a token file's
// final newline) is removed, and the bounds of ParseBearer apply: at most
// MaxTokenLength bytes of printable ASCII. An empty token is an *AuthError
// of reason ReasonNoCredential, any other refusal one of reason
// ReasonMalformedToken. The error never holds the token.
func ParseToken(raw []byte, field string) (string, error) {
	if len(raw) > MaxTokenLength {
		return "", authErrorf(ReasonMalformedToken, nil, "%s is %d bytes, more than the limit of %d", field, len(raw), MaxTokenLength)
	}
	token := strings.TrimSpace(string(raw))
	if token == "" {
		return "", authErrorf(ReasonNoCredential, nil, "no credential: %s is empty; send the workload's service-account token", field)
	}
	if err := checkPrintable(token, field); err != nil {
		return "", err
	}
	return token, nil
}

// checkPrintable refuses a token with a byte outside printable ASCII:
// tokens are base64url JWTs or hex, and anything else is a mistake (a
// pasted file with a BOM) or an attack on a log line.
func checkPrintable(token, field string) error {
	for i := 0; i < len(token); i++ {
		if c := token[i]; c <= ' ' || c >= 0x7f {
			return authErrorf(ReasonMalformedToken, nil, "%s has a character outside printable ASCII at offset %d", field, i)
		}
	}
	return nil
}

// TokenFromHeaders returns the bearer token of a request's "authorization"
// header values: "" when there is none, an error when there are several or
// the one is malformed.
func TokenFromHeaders(values []string) (string, error) {
	switch len(values) {
	case 0:
		return "", nil
	case 1:
		return ParseBearer(values[0])
	}
	return "", authErrorf(ReasonMalformedToken, nil, "request has %d authorization headers; send one", len(values))
}
