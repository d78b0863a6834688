package server_test

import (
	"context"
	"crypto"
	"io"
	"net"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshca/meshca/internal/server"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
)

// gatedSigner signs only when the test lets it: each signature takes one
// value from pass, so that requests can be held in the middle of signing,
// holding their admission slot.
type gatedSigner struct {
	crypto.Signer
	pass chan struct{}
}

func (g *gatedSigner) Sign(rand io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	<-g.pass
	return g.Signer.Sign(rand, digest, opts)
}

// startGated starts a harness with admission a whose issuer signs only
// when the returned channel is sent to.
func startGated(t *testing.T, a server.Admission) (*harness, chan struct{}) {
	t.Helper()
	pass := make(chan struct{})
	h := startServer(t, harnessOptions{
		configure: func(o *server.Options) { o.Admission = a },
		issuer:    func(s crypto.Signer) crypto.Signer { return &gatedSigner{Signer: s, pass: pass} },
	})
	return h, pass
}

// signAsync sends a Sign for demoID on its own connection, with the
// token or, when svid is set, over mTLS with it; the result arrives on
// the channel.
func (h *harness) signAsync(svid *x509svid.SVID) <-chan error {
	ctx := withToken(demoToken)
	var src x509svid.Source
	if svid != nil {
		ctx, src = context.Background(), svid
	}
	client := meshcav1.NewCertificateServiceClient(h.conn(src))
	req := signCSR(h.t, demoID)
	done := make(chan error, 1)
	go func() {
		_, err := client.Sign(ctx, req)
		done <- err
	}()
	return done
}

func (h *harness) waitGauge(name string, labels map[string]string, want float64) {
	h.t.Helper()
	require.Eventually(h.t, func() bool { return metricValue(h.t, h.reg, name, labels) == want },
		10*time.Second, 5*time.Millisecond, "%s%v never reached %v", name, labels, want)
}

var (
	first   = map[string]string{"class": "first"}
	renewal = map[string]string{"class": "renewal"}
)

// requireShed checks a shed request: ResourceExhausted, saying the CA is
// at capacity, with a positive RetryInfo hint.
func requireShed(t *testing.T, err error) time.Duration {
	t.Helper()
	st, ok := status.FromError(err)
	require.True(t, ok, "not a gRPC status: %v", err)
	require.Equal(t, codes.ResourceExhausted, st.Code(), st.Message())
	require.Contains(t, st.Message(), "the CA is at capacity")
	for _, d := range st.Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			delay := ri.GetRetryDelay().AsDuration()
			require.Positive(t, delay)
			return delay
		}
	}
	require.Failf(t, "no RetryInfo", "details: %v", st.Details())
	return 0
}

// TestAdmissionShedsBeyondTheQueue: with every slot busy and the queue
// full, a request is refused at once with ResourceExhausted and a retry
// hint; it is counted and audited as overloaded, and the requests
// admitted are all served once signing resumes.
func TestAdmissionShedsBeyondTheQueue(t *testing.T) {
	h, pass := startGated(t, server.Admission{MaxInFlight: 1, MaxQueue: 1})
	require.Equal(t, 1.0, metricValue(t, h.reg, "meshca_signing_capacity", nil))

	inSigning := h.signAsync(nil)
	h.waitGauge("meshca_signing_in_flight", nil, 1)
	queued := h.signAsync(nil)
	h.waitGauge("meshca_signing_queue_depth", first, 1)

	requireShed(t, <-h.signAsync(nil))
	require.Equal(t, 1.0, metricValue(t, h.reg, "meshca_signing_shed_total", first))
	require.Equal(t, 1.0, metricValue(t, h.reg, "meshca_requests_denied_total",
		map[string]string{"api": server.APINative, "code": "ResourceExhausted", "reason": server.ReasonOverloaded}))
	require.Contains(t, h.logs.String(), `"reason":"overloaded"`)

	pass <- struct{}{}
	pass <- struct{}{}
	require.NoError(t, <-inSigning)
	require.NoError(t, <-queued)
	h.waitGauge("meshca_signing_in_flight", nil, 0)
	require.Equal(t, 0.0, metricValue(t, h.reg, "meshca_signing_queue_depth", first))
}

// TestAdmissionServesFirstCertificatesFirst: a first certificate (token)
// queued after a renewal (mTLS) gets the next free slot; the renewal is
// served after it.
func TestAdmissionServesFirstCertificatesFirst(t *testing.T) {
	h, pass := startGated(t, server.Admission{MaxInFlight: 1, MaxWaitRenewal: time.Minute})
	go func() { pass <- struct{}{} }()
	current, _ := h.sign(withToken(demoToken), h.conn(nil), demoID, 0)

	inSigning := h.signAsync(nil)
	h.waitGauge("meshca_signing_in_flight", nil, 1)
	renewed := h.signAsync(current)
	h.waitGauge("meshca_signing_queue_depth", renewal, 1)
	newcomer := h.signAsync(nil)
	h.waitGauge("meshca_signing_queue_depth", first, 1)

	pass <- struct{}{}
	require.NoError(t, <-inSigning)
	// The slot went to the newcomer, queued last: the renewal still waits.
	h.waitGauge("meshca_signing_queue_depth", first, 0)
	require.Equal(t, 1.0, metricValue(t, h.reg, "meshca_signing_queue_depth", renewal))
	pass <- struct{}{}
	require.NoError(t, <-newcomer)
	pass <- struct{}{}
	require.NoError(t, <-renewed)
}

// TestAdmissionShedsRenewalsFirst: while signing is busy, a renewal that
// would wait longer than renewals may is shed with a hint, and a first
// certificate in the same state waits its turn and is served.
func TestAdmissionShedsRenewalsFirst(t *testing.T) {
	h, pass := startGated(t, server.Admission{MaxInFlight: 1, MaxWaitRenewal: time.Nanosecond})
	go func() { pass <- struct{}{} }()
	current, _ := h.sign(withToken(demoToken), h.conn(nil), demoID, 0)

	inSigning := h.signAsync(nil)
	h.waitGauge("meshca_signing_in_flight", nil, 1)
	requireShed(t, <-h.signAsync(current))
	require.Equal(t, 1.0, metricValue(t, h.reg, "meshca_signing_shed_total", renewal))

	newcomer := h.signAsync(nil)
	h.waitGauge("meshca_signing_queue_depth", first, 1)
	pass <- struct{}{}
	pass <- struct{}{}
	require.NoError(t, <-inSigning)
	require.NoError(t, <-newcomer)
	require.Equal(t, 0.0, metricValue(t, h.reg, "meshca_signing_shed_total", first))
}

// TestAdmissionBoundsTheWait: a queued request that has waited as long as
// its class may is shed, and leaves the queue.
func TestAdmissionBoundsTheWait(t *testing.T) {
	h, pass := startGated(t, server.Admission{MaxInFlight: 1, MaxWaitFirst: 200 * time.Millisecond})
	inSigning := h.signAsync(nil)
	h.waitGauge("meshca_signing_in_flight", nil, 1)
	hint := requireShed(t, <-h.signAsync(nil))
	require.LessOrEqual(t, hint, time.Second, "one request queued drains in about one hold time")
	require.Equal(t, 0.0, metricValue(t, h.reg, "meshca_signing_queue_depth", first))
	pass <- struct{}{}
	require.NoError(t, <-inSigning)
}

// TestAdmissionOff: a negative MaxInFlight turns admission off: no
// capacity metric, and requests are not queued.
func TestAdmissionOff(t *testing.T) {
	h := startServer(t, harnessOptions{configure: func(o *server.Options) { o.Admission.MaxInFlight = -1 }})
	h.sign(withToken(demoToken), h.conn(nil), demoID, 0)
	families, err := h.reg.Gather()
	require.NoError(t, err)
	for _, f := range families {
		require.NotEqual(t, "meshca_signing_capacity", f.GetName())
	}
}

// TestHandshakeGate: with every handshake slot held by a connection that
// sent the first byte of a ClientHello and stalled, the listener accepts no
// more connections: a client's call cannot complete. Once the stalled
// connection closes, the client is served. The gauge shows the slot taken
// and given back.
func TestHandshakeGate(t *testing.T) {
	h := startServer(t, harnessOptions{
		configure:     func(o *server.Options) { o.Admission.MaxHandshakes = 1 },
		limitListener: true,
	})
	require.Equal(t, 1.0, metricValue(t, h.reg, "meshca_tls_handshake_capacity", nil))
	stalled, err := net.Dial("tcp", h.addr)
	require.NoError(t, err)
	_, err = stalled.Write([]byte{0x16}) // a TLS handshake record begins
	require.NoError(t, err)
	h.waitGauge("meshca_tls_handshakes_in_progress", nil, 1)

	// Had the gate let it through, the call would take milliseconds.
	ctx, cancel := context.WithTimeout(withToken(demoToken), 2*time.Second)
	defer cancel()
	_, err = meshcav1.NewCertificateServiceClient(h.conn(nil)).Sign(ctx, signCSR(t, demoID))
	require.Equal(t, codes.DeadlineExceeded, status.Code(err), "no connection is accepted while the slot is held: %v", err)

	require.NoError(t, stalled.Close())
	h.sign(withToken(demoToken), h.conn(nil), demoID, 0)
	h.waitGauge("meshca_tls_handshakes_in_progress", nil, 0)
}

// TestHandshakeGateIdleConnection: a connection that sends nothing gives
// its handshake slot back after a second, without being closed, and the
// next client is served.
func TestHandshakeGateIdleConnection(t *testing.T) {
	h := startServer(t, harnessOptions{
		configure:     func(o *server.Options) { o.Admission.MaxHandshakes = 1 },
		limitListener: true,
	})
	idle, err := net.Dial("tcp", h.addr)
	require.NoError(t, err)
	defer idle.Close()
	h.waitGauge("meshca_tls_handshakes_in_progress", nil, 1)
	h.waitGauge("meshca_tls_handshakes_in_progress", nil, 0)
	h.sign(withToken(demoToken), h.conn(nil), demoID, 0)
}
