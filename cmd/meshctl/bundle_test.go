package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshca/meshca/internal/pemutil"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/testca"
)

// testBundle returns a bundle message of two roots, as the server makes
// it, and the roots.
func testBundle(t *testing.T, seq uint64) (*meshcav1.TrustBundle, []*x509.Certificate) {
	t.Helper()
	roots := []*x509.Certificate{testca.New(t, testTD).Cert, testca.New(t, testTD).Cert}
	sb := spiffebundle.FromX509Authorities(testTD, roots)
	sb.SetSequenceNumber(seq)
	sb.SetRefreshHint(5 * time.Minute)
	doc, err := sb.Marshal()
	require.NoError(t, err)
	return &meshcav1.TrustBundle{
		TrustDomain:     testTD.Name(),
		X509Authorities: [][]byte{roots[0].Raw, roots[1].Raw},
		Sequence:        seq,
		RefreshHint:     durationpb.New(5 * time.Minute),
		SpiffeJson:      doc,
	}, roots
}

func TestWriteBundle(t *testing.T) {
	pb, roots := testBundle(t, 7)

	t.Run("pem", func(t *testing.T) {
		var out bytes.Buffer
		require.NoError(t, writeBundle(&out, pb, "pem", "text", false))
		require.Equal(t, string(pemutil.EncodeCertificates(roots...)), out.String())
	})
	t.Run("spiffe", func(t *testing.T) {
		var out bytes.Buffer
		require.NoError(t, writeBundle(&out, pb, "spiffe", "text", false))
		require.Equal(t, string(pb.GetSpiffeJson())+"\n", out.String())
		sb, err := spiffebundle.Parse(testTD, out.Bytes())
		require.NoError(t, err)
		require.Len(t, sb.X509Authorities(), 2)
	})
	t.Run("json", func(t *testing.T) {
		var out bytes.Buffer
		require.NoError(t, writeBundle(&out, pb, "pem", "json", false))
		var got map[string]any
		require.NoError(t, json.Unmarshal(out.Bytes(), &got))
		require.Equal(t, "meshca.test", got["trustDomain"])
		require.Equal(t, float64(7), got["sequence"])
		require.Equal(t, float64(300), got["refreshHint"])
		gotRoots := got["roots"].([]any)
		require.Len(t, gotRoots, 2)
		first := gotRoots[0].(map[string]any)
		require.Equal(t, roots[0].SerialNumber.Text(16), first["serial"])
		require.Equal(t, "CN=testca root,O=testca", first["subject"])
		require.Equal(t, roots[0].NotAfter.UTC().Format(time.RFC3339), first["notAfter"])
	})
	t.Run("watch pem", func(t *testing.T) {
		var out bytes.Buffer
		require.NoError(t, writeBundle(&out, pb, "pem", "text", true))
		header, body, ok := strings.Cut(out.String(), "\n")
		require.True(t, ok)
		require.True(t, strings.HasPrefix(header, "# sequence 7, trust domain meshca.test, 2 root(s), received "), header)
		require.Equal(t, string(pemutil.EncodeCertificates(roots...)), body)
		certs, err := pemutil.ParseCertificates(out.Bytes())
		require.NoError(t, err)
		require.Len(t, certs, 2)
	})
	t.Run("watch json is one line", func(t *testing.T) {
		var out bytes.Buffer
		require.NoError(t, writeBundle(&out, pb, "pem", "json", true))
		require.Equal(t, 1, strings.Count(out.String(), "\n"))
		require.NotContains(t, out.String(), "federated")
	})
	peer := &meshcav1.TrustBundle{TrustDomain: "peer.example", Sequence: 4, X509Authorities: pb.GetX509Authorities()[:1]}
	t.Run("watch pem with federated bundles", func(t *testing.T) {
		var out bytes.Buffer
		require.NoError(t, writeBundles(&out, pb, []*meshcav1.TrustBundle{peer}, "pem", "text", true))
		header, body, ok := strings.Cut(out.String(), "\n")
		require.True(t, ok)
		require.True(t, strings.HasPrefix(header, "# sequence 7, trust domain meshca.test, 2 root(s), federated: peer.example (sequence 4, 1 root(s)), received "), header)
		require.Equal(t, string(pemutil.EncodeCertificates(roots...)), body, "only the own bundle's roots")
	})
	t.Run("watch json with federated bundles", func(t *testing.T) {
		var out bytes.Buffer
		require.NoError(t, writeBundles(&out, pb, []*meshcav1.TrustBundle{peer}, "pem", "json", true))
		var got bundleInfo
		require.NoError(t, json.Unmarshal(out.Bytes(), &got))
		require.Len(t, got.Federated, 1)
		require.Equal(t, "peer.example", got.Federated[0].TrustDomain)
		require.Equal(t, uint64(4), got.Federated[0].Sequence)
		require.Equal(t, roots[0].SerialNumber.Text(16), got.Federated[0].Roots[0].Serial)
	})
	t.Run("bad federated bundle", func(t *testing.T) {
		err := writeBundles(io.Discard, pb, []*meshcav1.TrustBundle{{TrustDomain: "peer.example"}}, "pem", "text", true)
		require.EqualError(t, err, `federated bundle of "peer.example": the server's bundle: pemutil: no certificates`)
	})
}

func TestWriteBundleErrors(t *testing.T) {
	pb, _ := testBundle(t, 1)
	tests := []struct {
		name   string
		pb     *meshcav1.TrustBundle
		format string
		want   string
	}{
		{name: "no roots", pb: &meshcav1.TrustBundle{TrustDomain: "meshca.test"}, format: "pem", want: "the server's bundle: pemutil: no certificates"},
		{name: "bad root", pb: &meshcav1.TrustBundle{X509Authorities: [][]byte{{1, 2, 3}}}, format: "pem", want: "the server's bundle: pemutil: certificate 0: x509: malformed certificate"},
		{name: "no spiffe json", pb: &meshcav1.TrustBundle{X509Authorities: pb.GetX509Authorities()}, format: "spiffe", want: "the server sent no SPIFFE bundle (spiffe_json is empty)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := writeBundle(io.Discard, tt.pb, tt.format, "text", false)
			require.EqualError(t, err, tt.want)
		})
	}
}

func TestBundleFlags(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string
	}{
		{name: "format", args: []string{"bundle", "--format", "der"}, want: `--format "der": want pem or spiffe`},
		{name: "output", args: []string{"bundle", "-o", "yaml"}, want: `--output "yaml": want text or json`},
		{name: "format and json", args: []string{"bundle", "--format", "spiffe", "-o", "json"}, want: "--format is for text output; -o json prints a summary of the bundle"},
		{name: "no bundle", args: []string{"bundle"}, want: "--ca-bundle is required to verify the server (or --insecure for a first contact)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := runMeshctl(t, tt.args...)
			require.EqualError(t, err, tt.want)
		})
	}
}

// fakeBundleClient serves WatchBundle from scripted streams: each stream
// sends its bundles, then ends with its error or, when that is nil,
// blocks until the caller cancels.
type fakeBundleClient struct {
	meshcav1.BundleServiceClient
	mu      sync.Mutex
	streams []fakeStream
}

type fakeStream struct {
	bundles []*meshcav1.BundleUpdate
	err     error
}

func (f *fakeBundleClient) WatchBundle(ctx context.Context, _ *meshcav1.WatchBundleRequest, _ ...grpc.CallOption) (grpc.ServerStreamingClient[meshcav1.BundleUpdate], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.streams) == 0 {
		return nil, status.Error(codes.Unavailable, "no more streams")
	}
	s := f.streams[0]
	f.streams = f.streams[1:]
	return &fakeWatchStream{ctx: ctx, s: s}, nil
}

type fakeWatchStream struct {
	grpc.ClientStream
	ctx context.Context
	s   fakeStream
}

func (f *fakeWatchStream) Recv() (*meshcav1.BundleUpdate, error) {
	if len(f.s.bundles) > 0 {
		b := f.s.bundles[0]
		f.s.bundles = f.s.bundles[1:]
		return b, nil
	}
	if f.s.err != nil {
		return nil, f.s.err
	}
	<-f.ctx.Done()
	return nil, status.FromContextError(f.ctx.Err()).Err()
}

func TestWatchBundle(t *testing.T) {
	b1 := &meshcav1.BundleUpdate{Bundle: &meshcav1.TrustBundle{Sequence: 1}}
	b2 := &meshcav1.BundleUpdate{Bundle: &meshcav1.TrustBundle{Sequence: 2}}
	b3 := &meshcav1.BundleUpdate{Bundle: &meshcav1.TrustBundle{Sequence: 3}}
	peer := &meshcav1.TrustBundle{TrustDomain: "peer.example", Sequence: 4}
	peerRotated := &meshcav1.TrustBundle{TrustDomain: "peer.example", Sequence: 5}
	// Updates of the federated bundles alone: the own bundle stays at 3.
	f1 := &meshcav1.BundleUpdate{Bundle: b3.Bundle, FederatedBundles: []*meshcav1.TrustBundle{peer}}
	f2 := &meshcav1.BundleUpdate{Bundle: b3.Bundle, FederatedBundles: []*meshcav1.TrustBundle{peerRotated}}
	unavailable := status.Error(codes.Unavailable, "server restarting")

	tests := []struct {
		name     string
		streams  []fakeStream
		stopAt   int      // cancel once this many updates are shown
		wantSeqs []uint64 // the own bundle's sequence of each update shown
		wantErr  string
		wantLog  []string
	}{
		{
			name:     "reopens a broken stream and skips what it showed",
			streams:  []fakeStream{{bundles: []*meshcav1.BundleUpdate{b1}, err: unavailable}, {bundles: []*meshcav1.BundleUpdate{b1, b2}, err: io.EOF}, {bundles: []*meshcav1.BundleUpdate{b2, b3}}},
			stopAt:   3,
			wantSeqs: []uint64{1, 2, 3},
			wantLog: []string{
				"meshctl: watching the bundle: rpc error: code = Unavailable desc = server restarting; retrying in 1ms\n",
				"meshctl: watching the bundle again (sequence 1)\n",
				"meshctl: watching the bundle: the server ended the stream; retrying in 1ms\n",
				"meshctl: watching the bundle again (sequence 2)\n",
			},
		},
		{
			name:     "ends quietly when interrupted",
			streams:  []fakeStream{{bundles: []*meshcav1.BundleUpdate{b1}}},
			stopAt:   1,
			wantSeqs: []uint64{1},
		},
		{
			name:     "shows federated changes, once each",
			streams:  []fakeStream{{bundles: []*meshcav1.BundleUpdate{b3, f1, f1, f2, f2, b3}}},
			stopAt:   4,
			wantSeqs: []uint64{3, 3, 3, 3},
		},
		{
			name:    "fails before the first bundle",
			streams: []fakeStream{{err: unavailable}},
			wantErr: "watching the bundle: rpc error: code = Unavailable desc = server restarting",
		},
		{
			name:     "fails on a refusal",
			streams:  []fakeStream{{bundles: []*meshcav1.BundleUpdate{b1}, err: status.Error(codes.PermissionDenied, "no")}},
			wantSeqs: []uint64{1},
			wantErr:  "watching the bundle: rpc error: code = PermissionDenied desc = no",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			var seqs []uint64
			var log bytes.Buffer
			err := watchBundle(ctx, &fakeBundleClient{streams: tt.streams}, &log, time.Millisecond, func(up *meshcav1.BundleUpdate) error {
				seqs = append(seqs, up.GetBundle().GetSequence())
				if len(seqs) == tt.stopAt {
					cancel()
				}
				return nil
			})
			if tt.wantErr != "" {
				require.EqualError(t, err, tt.wantErr)
			} else {
				require.NoError(t, err)
			}
			require.Equal(t, tt.wantSeqs, seqs)
			require.Equal(t, strings.Join(tt.wantLog, ""), log.String())
		})
	}
}
