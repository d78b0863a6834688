package wire_test

import (
	"errors"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshca/meshca/internal/wire"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/testca"
)

func withHint(t *testing.T, code codes.Code, d *durationpb.Duration) error {
	st, err := status.New(code, "later").WithDetails(&errdetails.RetryInfo{RetryDelay: d})
	require.NoError(t, err)
	return st.Err()
}

func TestRetryAfter(t *testing.T) {
	for _, tt := range []struct {
		name string
		err  error
		want time.Duration
		ok   bool
	}{
		{"shed", withHint(t, codes.ResourceExhausted, durationpb.New(1500*time.Millisecond)), 1500 * time.Millisecond, true},
		{"any code", withHint(t, codes.Unavailable, durationpb.New(time.Second)), time.Second, true},
		{"zero is no hint", withHint(t, codes.ResourceExhausted, durationpb.New(0)), 0, false},
		{"negative is no hint", withHint(t, codes.ResourceExhausted, durationpb.New(-time.Second)), 0, false},
		{"invalid is no hint", withHint(t, codes.ResourceExhausted, &durationpb.Duration{Seconds: 1, Nanos: -1}), 0, false},
		{"no detail", status.Error(codes.ResourceExhausted, "full"), 0, false},
		{"not a status", errors.New("boom"), 0, false},
		{"nil", nil, 0, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := wire.RetryAfter(tt.err)
			require.Equal(t, tt.ok, ok)
			require.Equal(t, tt.want, got)
		})
	}
}

func TestParseBundle(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	root := testca.New(t, td).Cert
	bundle, seq, err := wire.ParseBundle(&meshcav1.TrustBundle{TrustDomain: "example.org", X509Authorities: [][]byte{root.Raw}, Sequence: 7})
	require.NoError(t, err)
	require.Equal(t, uint64(7), seq)
	require.Equal(t, td, bundle.TrustDomain())
	require.True(t, bundle.HasX509Authority(root))

	for _, tt := range []struct {
		name string
		pb   *meshcav1.TrustBundle
		want string
	}{
		{"none", nil, "no trust bundle"},
		{"bad trust domain", &meshcav1.TrustBundle{TrustDomain: "Not A Domain", X509Authorities: [][]byte{root.Raw}}, "bundle trust domain: "},
		{"no authorities", &meshcav1.TrustBundle{TrustDomain: "example.org", Sequence: 3}, `the bundle of "example.org" (sequence 3) has no X.509 authorities`},
		{"garbage", &meshcav1.TrustBundle{TrustDomain: "example.org", X509Authorities: [][]byte{[]byte("x")}}, `the bundle of "example.org" (sequence 0): `},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := wire.ParseBundle(tt.pb)
			require.ErrorContains(t, err, tt.want)
		})
	}
}
