package identity

import "strings"

// MaxTokenLength is the longest bearer token accepted. Kubernetes
// service-account tokens are 1 to 2 KiB.
const MaxTokenLength = 8 << 10

// ParseBearer returns the token of an "authorization" header value
// "Bearer <token>". The scheme is case-insensitive, as RFC 7235 says. The
// error never holds the header's content.
func ParseBearer(header string) (string, error) {
	if len(header) > MaxTokenLength+len("Bearer ") {
		return "", authErrorf(ReasonMalformedToken, nil, "authorization header is %d bytes, more than the limit of %d", len(header), MaxTokenLength+len("Bearer "))
	}
	scheme, token, ok := strings.Cut(header, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", authErrorf(ReasonMalformedToken, nil, "authorization header is not \"Bearer <token>\"")
	}
	token = strings.TrimSpace(token)
	if token == "" {
		return "", authErrorf(ReasonMalformedToken, nil, "authorization header has an empty bearer token")
	}
	for i := 0; i < len(token); i++ {
		if c := token[i]; c <= ' ' || c >= 0x7f {
			return "", authErrorf(ReasonMalformedToken, nil, "bearer token has a character outside printable ASCII at offset %d", i)
		}
	}
	return token, nil
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
