package server_test

import (
	"bufio"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/server"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/testca"
)

// auditRecords returns the audit lines of h's log with message msg, as
// decoded JSON.
func auditRecords(t *testing.T, h *harness, msg string) []map[string]any {
	t.Helper()
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(h.logs.String()))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		var rec map[string]any
		require.NoError(t, json.Unmarshal(sc.Bytes(), &rec), "a log line that is not JSON: %s", sc.Text())
		if rec["msg"] == msg && rec["audit"] == true {
			out = append(out, rec)
		}
	}
	return out
}

// TestSignRefusesAnInvalidTTL sends native Sign requests whose ttl is not
// a valid google.protobuf.Duration: each is refused as InvalidArgument
// with reason bad_ttl, audited with the caller it came from, and counted.
// A caller with no credential is refused for that first.
func TestSignRefusesAnInvalidTTL(t *testing.T) {
	h := start(t)
	client := meshcav1.NewCertificateServiceClient(h.conn(nil))
	csr := testca.CreateCSR(t, testca.NewKey(t), demoID.String())
	denied := map[string]string{"api": server.APINative, "code": "InvalidArgument", "reason": server.ReasonBadTTL}

	for i, tt := range []struct {
		name string
		ttl  *durationpb.Duration
		msg  string
	}{
		{
			name: "seconds and nanos of different signs",
			ttl:  &durationpb.Duration{Seconds: 1, Nanos: -1},
			msg:  "server: ttl is not a valid duration (seconds 1, nanos -1): want seconds within ±10000 years, nanos within ±999999999, both of one sign",
		},
		{
			name: "nanos out of range",
			ttl:  &durationpb.Duration{Nanos: 1e9},
			msg:  "server: ttl is not a valid duration (seconds 0, nanos 1000000000): want seconds within ±10000 years, nanos within ±999999999, both of one sign",
		},
		{
			name: "seconds out of range",
			ttl:  &durationpb.Duration{Seconds: 315576000001},
			msg:  "server: ttl is not a valid duration (seconds 315576000001, nanos 0): want seconds within ±10000 years, nanos within ±999999999, both of one sign",
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := client.Sign(withToken(demoToken), &meshcav1.SignRequest{Csr: csr, Ttl: tt.ttl})
			st := status.Convert(err)
			require.Equal(t, codes.InvalidArgument, st.Code(), st.Message())
			require.Equal(t, tt.msg, st.Message())

			require.Equal(t, float64(i+1), metricValue(t, h.reg, "meshca_requests_denied_total", denied), "counted under reason bad_ttl")
			lines := auditRecords(t, h, "certificate request denied")
			require.Len(t, lines, i+1)
			line := lines[i]
			require.Equal(t, "native", line["api"])
			require.Equal(t, "bootstrap_token", line["method"])
			require.Equal(t, demoID.String(), line["identity"], "audited with the caller")
			require.Equal(t, "InvalidArgument", line["code"])
			require.Equal(t, server.ReasonBadTTL, line["reason"])
			require.Equal(t, tt.msg, line["error"])
		})
	}

	// No credential: that is what the caller hears first.
	_, err := client.Sign(context.Background(), &meshcav1.SignRequest{Csr: csr, Ttl: &durationpb.Duration{Seconds: 1, Nanos: -1}})
	require.Equal(t, codes.Unauthenticated, status.Code(err), status.Convert(err).Message())

	require.Empty(t, auditRecords(t, h, "certificate issued"))
	require.Zero(t, metricValue(t, h.reg, "meshca_certificates_issued_total", map[string]string{"api": "native"}))
	require.NotContains(t, h.logs.String(), demoToken)
}

// TestIssuedAuditSaysTheTTL: the audit line of an issuance says the TTL
// asked for, the TTL granted, and whether the policy clamped it.
func TestIssuedAuditSaysTheTTL(t *testing.T) {
	h := start(t)
	conn := h.conn(nil)
	for _, tt := range []struct {
		name      string
		requested time.Duration
		granted   time.Duration
		clamped   bool
	}{
		{name: "default", requested: 0, granted: ca.DefaultTTL},
		{name: "within the policy", requested: 10 * time.Minute, granted: 10 * time.Minute},
		{name: "the maximum", requested: ca.MaxTTL, granted: ca.MaxTTL},
		{name: "over the maximum", requested: 1000 * time.Hour, granted: ca.MaxTTL, clamped: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			svid, _ := h.sign(withToken(demoToken), conn, demoID, tt.requested)
			serial := svid.Certificates[0].SerialNumber.Text(16)
			var line map[string]any
			for _, l := range auditRecords(t, h, "certificate issued") {
				if l["serial"] == serial {
					line = l
				}
			}
			require.NotNil(t, line, "no audit line for serial %s", serial)
			// slog's JSON handler writes durations in nanoseconds.
			require.Equal(t, float64(tt.requested), line["requested_ttl"])
			require.Equal(t, float64(tt.granted), line["ttl"])
			require.Equal(t, tt.clamped, line["ttl_clamped"])
		})
	}
}
