package main_test

import (
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/testca"
)

// TestLimitsConfig: the limits block of the config file reaches the
// server: an identity over its rate is refused with ResourceExhausted and
// a retry hint, audited and counted on /metrics.
func TestLimitsConfig(t *testing.T) {
	dir := t.TempDir()
	dataDir := filepath.Join(dir, "data")
	config := filepath.Join(dir, "config.yaml")
	require.NoError(t, os.WriteFile(config, []byte(`
limits:
  perIdentity: {rate: 0.001, burst: 2}
  perSource: {rate: 1000, burst: 1000}
  maxConnectionsPerSource: 16
  maxWatchStreamsPerSource: 4
`), 0o600))
	srv, _ := startServer(t, "--config", config, "--data-dir", dataDir, "--demo")
	token, err := os.ReadFile(filepath.Join(dataDir, "demo-token"))
	require.NoError(t, err)
	ctx := metadata.AppendToOutgoingContext(t.Context(), "authorization", "Bearer "+strings.TrimSpace(string(token)))
	client := meshcav1.NewCertificateServiceClient(dialServer(t, srv.addr, filepath.Join(dataDir, "bundle.pem")))
	demo := spiffeid.RequireFromPath(td, "/ns/default/sa/demo")
	sign := func() error {
		_, err := client.Sign(ctx, &meshcav1.SignRequest{Csr: testca.CreateCSR(t, testca.NewKey(t), demo.String())})
		return err
	}
	require.NoError(t, sign())
	require.NoError(t, sign())
	err = sign()
	st := status.Convert(err)
	require.Equal(t, codes.ResourceExhausted, st.Code(), st.Message())
	require.Contains(t, st.Message(), "rate limited: identity spiffe://meshca.local/ns/default/sa/demo asked for more than 0.001 certificates a second (burst 2) across all APIs; retry in ")
	require.Len(t, st.Details(), 1)
	require.IsType(t, &errdetails.RetryInfo{}, st.Details()[0])

	srv.logs.WaitFor(t, `"reason":"rate_limited"`)
	resp, err := http.Get("http://" + srv.metrics + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Contains(t, string(body), `meshca_rate_limited_requests_total{limit="identity"} 1`)
	require.Contains(t, string(body), `meshca_connections_open 1`)
	srv.stop()
}
