package tokenreview_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/identity/tokenreview"
)

var b64 = base64.RawURLEncoding.EncodeToString

// jwtOf returns a token with payload, under an RS256 header.
func jwtOf(payload string) string {
	return b64([]byte(`{"alg":"RS256","kid":"k"}`)) + "." + b64([]byte(payload)) + "." + b64([]byte("signature"))
}

func TestParseJWT(t *testing.T) {
	tests := []struct {
		name  string
		token string
		ok    bool
		exp   time.Time // zero: no usable exp
	}{
		{"exp", jwtOf(`{"exp":1772366400}`), true, time.Unix(1772366400, 0)},
		{"fractional exp", jwtOf(`{"exp":1772366400.999}`), true, time.Unix(1772366400, 0)},
		{"exponent", jwtOf(`{"exp":1.7723664e9}`), true, time.Unix(1772366400, 0)},
		{"last exp", jwtOf(`{"exp":1,"exp":1772366400}`), true, time.Unix(1772366400, 0)},
		{"latest exp", jwtOf(`{"exp":253402300799}`), true, time.Unix(253402300799, 0)},
		{"exp after year 9999", jwtOf(`{"exp":253402300800}`), true, time.Time{}},
		{"huge exp", jwtOf(`{"exp":1e300}`), true, time.Time{}},
		{"zero exp", jwtOf(`{"exp":0}`), true, time.Time{}},
		{"negative exp", jwtOf(`{"exp":-1}`), true, time.Time{}},
		{"string exp", jwtOf(`{"exp":"1772366400"}`), true, time.Time{}},
		{"null exp", jwtOf(`{"exp":null}`), true, time.Time{}},
		{"exp in capitals", jwtOf(`{"EXP":1772366400}`), true, time.Time{}},
		{"no exp", jwtOf(`{"sub":"system:serviceaccount:default:demo"}`), true, time.Time{}},
		{"payload not an object", jwtOf(`[1772366400]`), false, time.Time{}},
		{"payload null", jwtOf(`null`), false, time.Time{}},
		{"payload not JSON", jwtOf(`{"exp":1772366400`), false, time.Time{}},
		{"payload with trailing data", jwtOf(`{"exp":1772366400}{}`), false, time.Time{}},
		{"padded payload", b64([]byte(`{"alg":"RS256"}`)) + "." + base64.URLEncoding.EncodeToString([]byte(`{"exp":12}`)) + ".c2ln", false, time.Time{}},
		{"standard base64", b64([]byte(`{"alg":"RS256"}`)) + "." + base64.RawStdEncoding.EncodeToString([]byte(`{"exp":1772366400,"x":"??>"}`)) + ".c2ln", false, time.Time{}},
		{"no alg", b64([]byte(`{"typ":"JWT"}`)) + "." + b64([]byte(`{}`)) + ".c2ln", false, time.Time{}},
		{"alg none", b64([]byte(`{"alg":"none"}`)) + "." + b64([]byte(`{}`)) + ".c2ln", false, time.Time{}},
		{"alg not a string", b64([]byte(`{"alg":1}`)) + "." + b64([]byte(`{}`)) + ".c2ln", false, time.Time{}},
		{"empty signature", strings.TrimSuffix(jwtOf(`{}`), b64([]byte("signature"))), false, time.Time{}},
		{"four segments", jwtOf(`{}`) + ".c2ln", false, time.Time{}},
		{"two segments", b64([]byte(`{"alg":"RS256"}`)) + "." + b64([]byte(`{}`)), false, time.Time{}},
		{"empty", "", false, time.Time{}},
		{"dots", "..", false, time.Time{}},
		{"too long", jwtOf(`{"x":"` + strings.Repeat("a", identity.MaxTokenLength) + `"}`), false, time.Time{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			exp, hasExp, ok := tokenreview.ParseJWT(tt.token)
			require.Equal(t, tt.ok, ok)
			require.Equal(t, !tt.exp.IsZero(), hasExp)
			if hasExp {
				require.True(t, tt.exp.Equal(exp), "exp %v, want %v", exp, tt.exp)
			}
		})
	}
}

// FuzzParseJWT checks the parser of untrusted tokens: it never panics,
// refuses what is not JWT-shaped, and reads "exp" as an independent
// decoding of the payload does, never later than written.
func FuzzParseJWT(f *testing.F) {
	for _, p := range []string{
		`{"exp":1772366400}`, `{"exp":1772366400.5}`, `{"exp":1e300}`, `{"exp":-1}`, `{"exp":"1"}`,
		`{"exp":null}`, `{"EXP":1}`, `{"exp":1,"exp":2}`, `{}`, `[]`, `null`, `{"exp":253402300800}`, "\xff",
	} {
		f.Add([]byte(p), "")
	}
	f.Add([]byte(nil), "a.b.c")
	f.Add([]byte(nil), "eyJhbGciOiJSUzI1NiJ9.e30.c2ln")
	f.Fuzz(func(t *testing.T, payload []byte, raw string) {
		token := raw
		if token == "" {
			token = b64([]byte(`{"alg":"RS256"}`)) + "." + b64(payload) + ".c2ln"
		}
		exp, hasExp, ok := tokenreview.ParseJWT(token)
		if !ok {
			require.False(t, hasExp)
			return
		}
		segs := strings.Split(token, ".")
		require.Len(t, segs, 3)
		decoded, err := base64.RawURLEncoding.DecodeString(segs[1])
		require.NoError(t, err)

		var claims map[string]any
		dec := json.NewDecoder(bytes.NewReader(decoded))
		dec.UseNumber()
		require.NoError(t, dec.Decode(&claims), "accepted a payload that is not a JSON object: %q", decoded)
		require.NotNil(t, claims)

		n, isNumber := claims["exp"].(json.Number)
		var want float64
		if isNumber {
			want, err = n.Float64()
			isNumber = err == nil && want > 0 && want <= 253402300799
		}
		require.Equal(t, isNumber, hasExp, "exp claim %v", claims["exp"])
		if hasExp {
			require.Equal(t, int64(want), exp.Unix())
			require.LessOrEqual(t, float64(exp.Unix()), want)
		}
	})
}
