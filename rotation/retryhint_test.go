package rotation_test

import (
	"context"
	"crypto/tls"
	"log/slog"
	mathrand "math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshca/meshca/internal/server"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/rotation"
	"github.com/meshca/meshca/testca"
)

// shedder refuses Sign requests before they reach the fake CA, as
// meshca-server sheds load: with a gRPC code and, when set, a
// google.rpc.RetryInfo detail.
type shedder struct {
	mu      sync.Mutex
	left    int // Sign requests still to refuse
	code    codes.Code
	info    *errdetails.RetryInfo // nil sends none
	refused int
}

// shed refuses the next n Sign requests with code and, when info is not
// nil, info.
func (s *shedder) shed(n int, code codes.Code, info *errdetails.RetryInfo) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.left, s.code, s.info = n, code, info
}

// refusals returns how many Sign requests were refused so far.
func (s *shedder) refusals() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.refused
}

func (s *shedder) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	s.mu.Lock()
	if info.FullMethod != meshcav1.CertificateService_Sign_FullMethodName || s.left == 0 {
		s.mu.Unlock()
		return handler(ctx, req)
	}
	s.left--
	s.refused++
	st := status.New(s.code, "the CA is at capacity; retry after the hinted delay")
	if s.info != nil {
		var err error
		st, err = st.WithDetails(s.info)
		if err != nil {
			s.mu.Unlock()
			return nil, err
		}
	}
	s.mu.Unlock()
	return nil, st.Err()
}

// retryAfter is a RetryInfo detail asking for a retry after d.
func retryAfter(d time.Duration) *errdetails.RetryInfo {
	return &errdetails.RetryInfo{RetryDelay: durationpb.New(d)}
}

// serveShedding serves f over TLS on loopback, as serveTLS does, with sh
// in front of its Sign. It returns the gRPC target of the server.
func serveShedding(t *testing.T, f *fakeCA, sh *shedder) string {
	t.Helper()
	now := f.clock.Now()
	svid := f.issuer.CreateX509SVID(caServerID, testca.WithLifetime(now.Add(-time.Hour), now.Add(72*time.Hour)))
	cert := tls.Certificate{PrivateKey: svid.PrivateKey, Leaf: svid.Certificates[0]}
	for _, c := range svid.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequestClientCert,
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	f.serve(t, lis, grpc.NewServer(grpc.Creds(credentials.NewTLS(cfg)), grpc.UnaryInterceptor(sh.intercept)))
	return "passthrough:///" + lis.Addr().String()
}

// failureLogs returns the source's failure lines.
func failureLogs(h *sourceHarness) []logRecord {
	return h.logs.find("getting an X509-SVID failed")
}

// TestRunHonoursTheServerRetryHint has a real gRPC server refuse the
// first attempts, and later a renewal's, with a 3s RetryInfo: each retry
// is scheduled 3s to 4.5s later on the fake clock (the hint plus up to
// half of it), whichever the code, and logged with the hint.
func TestRunHonoursTheServerRetryHint(t *testing.T) {
	const hint = 3 * time.Second
	for _, code := range []codes.Code{codes.ResourceExhausted, codes.Unavailable} {
		t.Run(code.String(), func(t *testing.T) {
			h := newSourceHarness(t, rotation.Options{TTL: time.Hour})
			sh := &shedder{}
			sh.shed(3, code, retryAfter(hint))
			h.run(t, h.src.Dialer(serveShedding(t, h.ca, sh), caServerID))

			var waits []time.Duration
			retries := func(n int) {
				t.Helper()
				for range n {
					tm := h.clock.next(t)
					require.GreaterOrEqual(t, tm.d, hint, "retry %d", len(waits)+1)
					require.LessOrEqual(t, tm.d, hint+hint/2, "retry %d", len(waits)+1)
					waits = append(waits, tm.d)
					h.clock.fire(tm)
				}
			}
			// The first attempts, with no SVID held.
			retries(3)
			tm := h.clock.next(t)
			first := h.svid(t).Certificates[0]
			require.Equal(t, 3, sh.refusals())
			require.Len(t, h.ca.calls(), 1, "the retry after the shed attempts reached the CA")
			require.Greater(t, tm.d, 20*time.Minute, "the next wait is the renew point")

			// A renewal, with the SVID held: its retry cap (a twentieth of
			// 30m) is well above the hint.
			sh.shed(2, code, retryAfter(hint))
			h.clock.fire(tm)
			retries(2)
			h.clock.next(t)
			require.NotEqual(t, first.SerialNumber, h.svid(t).Certificates[0].SerialNumber, "renewed after the hinted retries")

			seen := map[time.Duration]bool{}
			for _, w := range waits {
				seen[w] = true
			}
			require.Greater(t, len(seen), 1, "jitter drew the same wait every time: %v", waits)

			logged := failureLogs(h)
			require.Len(t, logged, len(waits))
			for i, r := range logged {
				require.Equal(t, code.String(), r.attrs["code"], "failure %d", i+1)
				require.Equal(t, hint.String(), r.attrs["server_hint"], "failure %d", i+1)
				require.Equal(t, waits[i].String(), r.attrs["retry_in"], "failure %d", i+1)
			}
		})
	}
}

// TestRunSpreadsSourcesTheServerShedTogether has one server shed the first
// attempt of many sources with the same hint: each comes back within
// [3s, 4.5s], and no two at the same moment.
func TestRunSpreadsSourcesTheServerShedTogether(t *testing.T) {
	const (
		n    = 8
		hint = 3 * time.Second
	)
	f := newSourceFixture(t)
	sh := &shedder{}
	sh.shed(n, codes.ResourceExhausted, retryAfter(hint))
	target := serveShedding(t, f.ca, sh)
	waits := map[time.Duration]int{}
	for i := range n {
		// Each source has its own fake clock, started together, and its
		// own random source.
		h := &sourceHarness{clock: newTimerClock(f.start), ca: f.ca, logs: &logRecorder{}, start: f.start}
		h.newSource(t, rotation.Options{TTL: time.Hour, Rand: mathrand.New(mathrand.NewPCG(uint64(i), 7)).Float64})
		h.run(t, h.src.Dialer(target, caServerID))
		tm := h.clock.next(t)
		require.GreaterOrEqual(t, tm.d, hint, "source %d", i)
		require.LessOrEqual(t, tm.d, hint+hint/2, "source %d", i)
		waits[tm.d]++
	}
	require.Equal(t, n, sh.refusals())
	require.Len(t, waits, n, "sources shed together come back together: %v", waits)
}

// TestRunHoldsTheServerRetryHintToTheCap sends hints longer than a source
// may wait: they are held to the SVID's retry cap (a twentieth of the time
// it has left), and to Backoff.Max.
func TestRunHoldsTheServerRetryHintToTheCap(t *testing.T) {
	for _, tc := range []struct {
		name      string
		opts      rotation.Options
		hint      time.Duration
		atRenewal bool // shed the renewal, not the first attempts
		want      func(left time.Duration) time.Duration
	}{
		{
			name:      "the SVID's retry cap",
			opts:      rotation.Options{TTL: time.Hour, Backoff: rotation.Backoff{Max: 2 * time.Hour}},
			hint:      10 * time.Minute,
			atRenewal: true,
			want:      func(left time.Duration) time.Duration { return left / 20 },
		},
		{
			name:      "Backoff.Max below the SVID's retry cap",
			opts:      rotation.Options{TTL: 24 * time.Hour},
			hint:      time.Hour,
			atRenewal: true,
			want:      func(time.Duration) time.Duration { return time.Minute },
		},
		{
			name: "Backoff.Max without an SVID",
			opts: rotation.Options{TTL: time.Hour},
			hint: 24 * time.Hour,
			want: func(time.Duration) time.Duration { return time.Minute },
		},
		{
			name: "a hint of years",
			opts: rotation.Options{TTL: time.Hour, Backoff: rotation.Backoff{Max: 5 * time.Minute}},
			hint: 100 * 365 * 24 * time.Hour,
			want: func(time.Duration) time.Duration { return 5 * time.Minute },
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.opts.Rand = zeroRand
			h := newSourceHarness(t, tc.opts)
			sh := &shedder{}
			if !tc.atRenewal {
				sh.shed(2, codes.ResourceExhausted, retryAfter(tc.hint))
			}
			h.run(t, h.src.Dialer(serveShedding(t, h.ca, sh), caServerID))
			var notAfter time.Time
			if tc.atRenewal {
				tm := h.clock.next(t)
				notAfter = h.svid(t).Certificates[0].NotAfter
				sh.shed(2, codes.ResourceExhausted, retryAfter(tc.hint))
				h.clock.fire(tm)
			}
			for i := range 2 {
				tm := h.clock.next(t)
				require.Equal(t, tc.want(notAfter.Sub(h.clock.Now())), tm.d, "retry %d", i+1)
				h.clock.fire(tm)
			}
			require.Equal(t, 2, sh.refusals())
			for _, r := range failureLogs(h) {
				require.Equal(t, tc.hint.String(), r.attrs["server_hint"], "the hint is logged as the server sent it")
			}
		})
	}
}

// TestRunWithoutAServerRetryHintBacksOff refuses attempts with no usable
// RetryInfo: the source backs off as before, 1s, 2s, 4s, and logs no hint.
func TestRunWithoutAServerRetryHintBacksOff(t *testing.T) {
	for _, tc := range []struct {
		name string
		code codes.Code
		info *errdetails.RetryInfo
	}{
		{"ResourceExhausted without RetryInfo", codes.ResourceExhausted, nil},
		{"Unavailable without RetryInfo", codes.Unavailable, nil},
		{"a RetryInfo of zero", codes.ResourceExhausted, retryAfter(0)},
		{"a negative RetryInfo", codes.ResourceExhausted, retryAfter(-time.Second)},
		{"a RetryInfo with no delay", codes.ResourceExhausted, &errdetails.RetryInfo{}},
		{"an invalid RetryInfo", codes.ResourceExhausted, &errdetails.RetryInfo{RetryDelay: &durationpb.Duration{Seconds: 1, Nanos: -1}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newSourceHarness(t, rotation.Options{TTL: time.Hour, Rand: zeroRand})
			sh := &shedder{}
			sh.shed(3, tc.code, tc.info)
			h.run(t, h.src.Dialer(serveShedding(t, h.ca, sh), caServerID))
			var waits []time.Duration
			for range 3 {
				tm := h.clock.next(t)
				waits = append(waits, tm.d)
				h.clock.fire(tm)
			}
			require.Equal(t, []time.Duration{time.Second, 2 * time.Second, 4 * time.Second}, waits)
			h.clock.next(t)
			h.svid(t)
			for i, r := range failureLogs(h) {
				require.NotContains(t, r.attrs, "server_hint", "failure %d", i+1)
				require.Equal(t, tc.code.String(), r.attrs["code"], "failure %d", i+1)
			}
		})
	}
}

// TestRunHonoursTheRateLimitHintOfMeshcaServer renews against meshca's
// own server with a per-identity rate limit of one request every 3s: the
// renewal right after the first certificate is refused with
// ResourceExhausted and the limiter's RetryInfo, and the source waits that
// hint plus up to half of it.
func TestRunHonoursTheRateLimitHintOfMeshcaServer(t *testing.T) {
	h := &sourceHarness{logs: &logRecorder{}, start: time.Now().Truncate(time.Second)}
	h.clock = newTimerClock(h.start)
	addr, c := meshcaServerWithLimits(t, h.clock, server.Limits{PerIdentity: server.Rate{PerSecond: 1.0 / 3, Burst: 1}})
	bundle, _ := c.Bundle()
	src, err := rotation.NewSource(rotation.Options{
		ID:            workloadID,
		InitialBundle: bundle,
		Token:         func(context.Context) (string, error) { return bootstrapToken, nil },
		TTL:           time.Hour,
		Clock:         h.clock,
		Rand:          mathrand.New(mathrand.NewPCG(3, 4)).Float64,
		Logger:        slog.New(h.logs.handler()),
	})
	require.NoError(t, err)
	h.src = src
	h.run(t, src.Dialer("passthrough:///"+addr, caServerID))

	h.clock.fire(h.clock.next(t)) // the renew point, on the fake clock: at once in real time
	tm := h.clock.next(t)
	logged := failureLogs(h)
	require.Len(t, logged, 1)
	require.Equal(t, codes.ResourceExhausted.String(), logged[0].attrs["code"])
	require.Contains(t, logged[0].attrs["error"], "rate limited: identity "+workloadID.String())
	hint, err := time.ParseDuration(logged[0].attrs["server_hint"])
	require.NoError(t, err, "the server's hint is logged")
	require.Positive(t, hint)
	require.LessOrEqual(t, hint, 3*time.Second)
	require.Greater(t, tm.d, hint, "the hint plus jitter")
	require.LessOrEqual(t, tm.d, hint+hint/2)
	require.Equal(t, tm.d.String(), logged[0].attrs["retry_in"])
}

// TestRunNeverRetriesBeforeTheServerHint: a hint just inside the retry cap,
// with the largest jitter, waits at least the hint and at most the cap: the
// jitter is cut at the cap, never the hint (which would send the source back
// to an overloaded server before it asked).
func TestRunNeverRetriesBeforeTheServerHint(t *testing.T) {
	const u = 0.99
	h := newSourceHarness(t, rotation.Options{TTL: time.Hour, Backoff: rotation.Backoff{Max: 2 * time.Hour}, Rand: func() float64 { return u }})
	sh := &shedder{}
	h.run(t, h.src.Dialer(serveShedding(t, h.ca, sh), caServerID))
	tm := h.clock.next(t)
	notAfter := h.svid(t).Certificates[0].NotAfter
	h.clock.fire(tm)

	// At the renew point (about 35 minutes left) the cap is a twentieth
	// of that, about 105s: a hint of 100s is inside it, and the hint's
	// jitter (up to 150s) is not.
	const hint = 100 * time.Second
	limit := notAfter.Sub(h.clock.Now()) / 20
	require.Greater(t, limit, hint, "the test needs a hint inside the cap")
	sh.shed(1, codes.ResourceExhausted, retryAfter(hint))
	tm = h.clock.next(t)
	require.GreaterOrEqual(t, tm.d, hint, "the retry comes before the server's hint")
	require.LessOrEqual(t, tm.d, limit)
	require.Equal(t, hint+time.Duration(float64(limit-hint)*u), tm.d)
}
