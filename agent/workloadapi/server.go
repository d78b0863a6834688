package workloadapi

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// SecurityHeader is the gRPC metadata key every Workload API call must
// carry, with the value "true".
const SecurityHeader = "workload.spiffe.io"

// DefaultMaxStreams is the default bound on open streams.
const DefaultMaxStreams = 256

// Source is what Server serves: the workload's X509-SVID, its trust
// domain's bundle, the federated bundles, and a signal when any of them
// changes. rotation.Source is one.
type Source interface {
	x509svid.Source
	x509bundle.Source

	// FederatedBundles returns the bundles of the federated trust
	// domains, sorted by trust domain, never the SVID's own.
	FederatedBundles() []*x509bundle.Bundle

	// Changed returns a channel closed at the next change of any of the
	// above. Server takes it before it reads them.
	Changed() <-chan struct{}
}

// Options configure a Server. Source and TrustDomain are required.
type Options struct {
	// Source provides what is served. Required.
	Source Source

	// TrustDomain is the trust domain of the source's SVID, whose bundle
	// FetchX509Bundles serves before any SVID is held. Required.
	TrustDomain spiffeid.TrustDomain

	// MaxStreams bounds the streams open at once, over every connection;
	// one more is refused with ResourceExhausted. Zero means
	// DefaultMaxStreams.
	MaxStreams int

	// Logger receives streams opened, refused and pushed to, at debug
	// level, and faults. Private keys are never logged. Nil discards.
	Logger *slog.Logger
}

// Server is the SpiffeWorkloadAPI service for one identity. It is safe
// for concurrent use.
type Server struct {
	workload.UnimplementedSpiffeWorkloadAPIServer

	src   Source
	td    spiffeid.TrustDomain
	log   *slog.Logger
	slots chan struct{} // one token per open stream

	stopOnce sync.Once
	stopping chan struct{} // closed by Shutdown
}

var _ workload.SpiffeWorkloadAPIServer = (*Server)(nil)

// New returns a Server for opts.
func New(opts Options) (*Server, error) {
	if opts.Source == nil {
		return nil, errors.New("workloadapi: Options.Source is required")
	}
	if opts.TrustDomain.IsZero() {
		return nil, errors.New("workloadapi: Options.TrustDomain is required: the trust domain of the served SVID")
	}
	if opts.MaxStreams < 0 {
		return nil, fmt.Errorf("workloadapi: Options.MaxStreams is %d; want zero (%d) or more", opts.MaxStreams, DefaultMaxStreams)
	}
	if opts.MaxStreams == 0 {
		opts.MaxStreams = DefaultMaxStreams
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Server{
		src:      opts.Source,
		td:       opts.TrustDomain,
		log:      opts.Logger,
		slots:    make(chan struct{}, opts.MaxStreams),
		stopping: make(chan struct{}),
	}, nil
}

// Register registers the SpiffeWorkloadAPI service on g. Other services
// may share g: the security header is checked by this service's methods,
// not by an interceptor.
func (s *Server) Register(g *grpc.Server) {
	workload.RegisterSpiffeWorkloadAPIServer(g, s)
}

// Shutdown ends every open stream, and every stream opened after, with
// Unavailable, so that a grpc.Server's GracefulStop need not wait for
// clients that would watch forever.
func (s *Server) Shutdown() {
	s.stopOnce.Do(func() { close(s.stopping) })
}

// FetchX509SVID streams the X509-SVID, its bundle and the federated
// bundles: at once when an SVID is held, else when one first is, then at
// every change.
func (s *Server) FetchX509SVID(_ *workload.X509SVIDRequest, stream grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	return s.serve(stream.Context(), "FetchX509SVID", func() (proto.Message, error) {
		resp, err := s.x509SVIDResponse()
		if resp == nil {
			return nil, err // not a typed nil: nothing to send
		}
		return resp, err
	}, func(m proto.Message) error {
		return stream.Send(m.(*workload.X509SVIDResponse))
	})
}

// FetchX509Bundles streams the bundle of the SVID's trust domain and the
// federated bundles: at once, then at every change of them.
func (s *Server) FetchX509Bundles(_ *workload.X509BundlesRequest, stream grpc.ServerStreamingServer[workload.X509BundlesResponse]) error {
	return s.serve(stream.Context(), "FetchX509Bundles", func() (proto.Message, error) {
		return s.x509BundlesResponse()
	}, func(m proto.Message) error {
		return stream.Send(m.(*workload.X509BundlesResponse))
	})
}

// jwtUnsupported is the error of every JWT-SVID method.
var jwtUnsupported = status.Error(codes.Unimplemented,
	"JWT-SVIDs are not supported: meshca issues X509-SVIDs only (the CA has no JWT signing key); use FetchX509SVID and mTLS")

// witUnsupported is the error of every WIT-SVID method.
var witUnsupported = status.Error(codes.Unimplemented,
	"WIT-SVIDs are not supported: meshca issues X509-SVIDs only; use FetchX509SVID and mTLS")

// FetchJWTSVID is not supported: it returns Unimplemented.
func (s *Server) FetchJWTSVID(ctx context.Context, _ *workload.JWTSVIDRequest) (*workload.JWTSVIDResponse, error) {
	if err := checkHeader(ctx); err != nil {
		return nil, err
	}
	return nil, jwtUnsupported
}

// FetchJWTBundles is not supported: it returns Unimplemented.
func (s *Server) FetchJWTBundles(_ *workload.JWTBundlesRequest, stream grpc.ServerStreamingServer[workload.JWTBundlesResponse]) error {
	if err := checkHeader(stream.Context()); err != nil {
		return err
	}
	return jwtUnsupported
}

// ValidateJWTSVID is not supported: it returns Unimplemented.
func (s *Server) ValidateJWTSVID(ctx context.Context, _ *workload.ValidateJWTSVIDRequest) (*workload.ValidateJWTSVIDResponse, error) {
	if err := checkHeader(ctx); err != nil {
		return nil, err
	}
	return nil, jwtUnsupported
}

// FetchWITSVID is not supported: it returns Unimplemented.
func (s *Server) FetchWITSVID(_ *workload.WITSVIDRequest, stream grpc.ServerStreamingServer[workload.WITSVIDResponse]) error {
	if err := checkHeader(stream.Context()); err != nil {
		return err
	}
	return witUnsupported
}

// FetchWITBundles is not supported: it returns Unimplemented.
func (s *Server) FetchWITBundles(_ *workload.WITBundlesRequest, stream grpc.ServerStreamingServer[workload.WITBundlesResponse]) error {
	if err := checkHeader(stream.Context()); err != nil {
		return err
	}
	return witUnsupported
}

// checkHeader refuses a call without "workload.spiffe.io: true", with
// SPIRE's code and message.
func checkHeader(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get(SecurityHeader); len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	return nil
}

// serve runs a stream: it sends what build returns (nil: nothing to send
// yet) whenever it differs from what was sent last, and waits for the
// source's next change, until the caller leaves or the server shuts down.
func (s *Server) serve(ctx context.Context, method string, build func() (proto.Message, error), send func(proto.Message) error) error {
	if err := checkHeader(ctx); err != nil {
		return err
	}
	select {
	case s.slots <- struct{}{}:
	default:
		s.log.LogAttrs(ctx, slog.LevelWarn, "Workload API stream refused: too many open", slog.String("method", method), slog.Int("max_streams", cap(s.slots)))
		return status.Errorf(codes.ResourceExhausted, "too many Workload API streams open (at most %d); close the ones not in use", cap(s.slots))
	}
	defer func() { <-s.slots }()
	s.log.LogAttrs(ctx, slog.LevelDebug, "Workload API stream opened", slog.String("method", method))

	var last proto.Message
	for {
		changed := s.src.Changed()
		msg, err := build()
		if err != nil {
			return err
		}
		if msg != nil && (last == nil || !proto.Equal(msg, last)) {
			if err := send(msg); err != nil {
				return err
			}
			last = msg
			s.log.LogAttrs(ctx, slog.LevelDebug, "Workload API stream pushed", slog.String("method", method))
		}
		select {
		case <-changed:
		case <-ctx.Done():
			s.log.LogAttrs(ctx, slog.LevelDebug, "Workload API stream closed", slog.String("method", method))
			return status.FromContextError(ctx.Err()).Err()
		case <-s.stopping:
			return status.Error(codes.Unavailable, "meshca-agent is shutting down; reconnect")
		}
	}
}

// x509SVIDResponse returns the response of FetchX509SVID, or nil while
// the source holds no valid SVID.
func (s *Server) x509SVIDResponse() (*workload.X509SVIDResponse, error) {
	svid, err := s.src.GetX509SVID()
	if err != nil {
		// None now (not yet, or expired): send nothing, and wait for one.
		return nil, nil
	}
	bundle, err := s.src.GetX509BundleForTrustDomain(s.td)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "no bundle of trust domain %q: %v", s.td.Name(), err)
	}
	key, err := x509.MarshalPKCS8PrivateKey(svid.PrivateKey)
	if err != nil {
		// The error names the key's type, never its content.
		return nil, status.Errorf(codes.Internal, "encoding the X509-SVID's private key as PKCS#8: %v", err)
	}
	var chain []byte
	for _, c := range svid.Certificates {
		chain = append(chain, c.Raw...)
	}
	return &workload.X509SVIDResponse{
		Svids: []*workload.X509SVID{{
			SpiffeId:    svid.ID.String(),
			X509Svid:    chain,
			X509SvidKey: key,
			Bundle:      concatRoots(bundle),
		}},
		FederatedBundles: s.federated(),
	}, nil
}

// x509BundlesResponse returns the response of FetchX509Bundles.
func (s *Server) x509BundlesResponse() (*workload.X509BundlesResponse, error) {
	bundle, err := s.src.GetX509BundleForTrustDomain(s.td)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "no bundle of trust domain %q: %v", s.td.Name(), err)
	}
	bundles := s.federated()
	if bundles == nil {
		bundles = make(map[string][]byte, 1)
	}
	bundles[s.td.IDString()] = concatRoots(bundle)
	return &workload.X509BundlesResponse{Bundles: bundles}, nil
}

// federated returns the federated bundles keyed by trust domain SPIFFE ID,
// as SPIRE keys them; nil when there are none. The own trust domain is
// never among them, even should the source name it.
func (s *Server) federated() map[string][]byte {
	fed := s.src.FederatedBundles()
	if len(fed) == 0 {
		return nil
	}
	out := make(map[string][]byte, len(fed))
	for _, b := range fed {
		if b.TrustDomain() == s.td {
			continue
		}
		out[b.TrustDomain().IDString()] = concatRoots(b)
	}
	return out
}

// concatRoots returns the bundle's X.509 roots as concatenated DER.
func concatRoots(b *x509bundle.Bundle) []byte {
	var out []byte
	for _, c := range b.X509Authorities() {
		out = append(out, c.Raw...)
	}
	return out
}
