package tokenreview

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"strings"
	"time"

	"github.com/meshca/meshca/identity"
)

// maxExpiry is the latest "exp" read from a token: the end of year 9999.
// It keeps the conversion to time.Time far from overflow.
const maxExpiry = 253402300799

// parseJWT reports whether token has the shape of a signed JWT (a JWS in
// compact serialisation: three base64url segments, the first two JSON
// objects, a header naming an algorithm) and returns its "exp" claim.
//
// Nothing here is verified: the API server does that. The shape keeps
// tokens of other kinds from costing a review, and the expiry spares the
// review of a token that has expired (a token lying about it gains
// nothing: the API server would refuse it too) and bounds how long a
// review is cached, so a token can never make its cache entry outlive
// itself. ok is false for anything that is not JWT-shaped; hasExp is
// false when the payload has no usable "exp".
func parseJWT(token string) (exp time.Time, hasExp, ok bool) {
	if len(token) > identity.MaxTokenLength {
		return time.Time{}, false, false
	}
	header, rest, found := strings.Cut(token, ".")
	if !found {
		return time.Time{}, false, false
	}
	payload, sig, found := strings.Cut(rest, ".")
	if !found || header == "" || payload == "" || sig == "" || strings.Contains(sig, ".") {
		return time.Time{}, false, false
	}
	if _, err := base64.RawURLEncoding.DecodeString(sig); err != nil {
		return time.Time{}, false, false
	}
	// Maps, not structs: encoding/json matches struct fields without
	// regard to case, and a claim is named exactly.
	var h, p map[string]json.RawMessage
	if !decodeSegment(header, &h) {
		return time.Time{}, false, false
	}
	var alg string
	if json.Unmarshal(h["alg"], &alg) != nil || alg == "" || alg == "none" {
		return time.Time{}, false, false
	}
	if !decodeSegment(payload, &p) {
		return time.Time{}, false, false
	}
	exp, hasExp = numericDate(p["exp"])
	return exp, hasExp, true
}

// decodeSegment decodes a base64url segment holding a JSON object into v.
func decodeSegment(seg string, v any) bool {
	raw, err := base64.RawURLEncoding.DecodeString(seg)
	if err != nil {
		return false
	}
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] != '{' {
		return false
	}
	return json.Unmarshal(raw, v) == nil
}

// numericDate reads a JWT NumericDate (RFC 7519, section 2): seconds since
// the Unix epoch, possibly with a fraction, which is dropped so that the
// time read is never later than the one written.
func numericDate(raw json.RawMessage) (time.Time, bool) {
	if len(raw) == 0 {
		return time.Time{}, false
	}
	// A float64 holds every whole second up to maxExpiry exactly; a JSON
	// string is refused, and null leaves f at zero.
	var f float64
	if err := json.Unmarshal(raw, &f); err != nil || f <= 0 || f > maxExpiry {
		return time.Time{}, false
	}
	return time.Unix(int64(f), 0), true
}
