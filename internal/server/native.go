package server

import (
	"context"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/internal/pemutil"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
)

// APINative labels the native API in metrics and audit lines.
const APINative = "native"

// ReasonBadTTL is the reason label of a native Sign request refused
// because its ttl is not a valid google.protobuf.Duration.
const ReasonBadTTL = "bad_ttl"

type certificateService struct {
	meshcav1.UnimplementedCertificateServiceServer
	s *Server
}

func (c *certificateService) Sign(ctx context.Context, req *meshcav1.SignRequest) (*meshcav1.SignResponse, error) {
	r := issueRequest{api: APINative, csr: req.GetCsr(), bundleSequence: req.GetBundleSequence()}
	r.ttl, r.refused = requestedTTL(req.GetTtl())
	issued, err := c.s.issue(ctx, r)
	if err != nil {
		return nil, err
	}
	federated, _ := c.s.fedCache.get()
	return &meshcav1.SignResponse{
		CertChain:        chainDER(issued),
		Bundle:           c.s.bundleProto(),
		FederatedBundles: federated,
		ExpiresAt:        timestamppb.New(issued.Cert.NotAfter),
		SpiffeId:         issued.Cert.URIs[0].String(),
	}, nil
}

// chainDER returns the DER of the issued chain, leaf first.
func chainDER(issued *ca.Issued) [][]byte {
	chain := make([][]byte, len(issued.Chain))
	for i, cert := range issued.Chain {
		chain[i] = cert.Raw
	}
	return chain
}

// requestedTTL reads the ttl of a native request: zero when unset. An
// invalid one is refused on the shared path, once the caller is known, so
// that it is audited and counted as every refusal is. The message is ours:
// protobuf's varies on purpose.
func requestedTTL(ttl *durationpb.Duration) (time.Duration, error) {
	if ttl == nil {
		return 0, nil
	}
	if ttl.CheckValid() != nil {
		return 0, refusef(codes.InvalidArgument, ReasonBadTTL,
			"ttl is not a valid duration (seconds %d, nanos %d): want seconds within ±10000 years, nanos within ±999999999, both of one sign",
			ttl.GetSeconds(), ttl.GetNanos())
	}
	return ttl.AsDuration(), nil
}

type bundleService struct {
	meshcav1.UnimplementedBundleServiceServer
	s *Server
}

func (b *bundleService) GetBundle(context.Context, *meshcav1.GetBundleRequest) (*meshcav1.TrustBundle, error) {
	return b.s.bundleProto(), nil
}

// WatchBundle sends the own and the federated bundles at once, then again
// whenever either changes.
func (b *bundleService) WatchBundle(_ *meshcav1.WatchBundleRequest, stream meshcav1.BundleService_WatchBundleServer) error {
	ctx := stream.Context()
	for {
		// The channels are taken before the bundles are read, so that no
		// change between the two is missed.
		_, _, changed := b.s.ca.WatchBundle()
		federated, fedChanged := b.s.fedCache.get()
		if err := stream.Send(&meshcav1.BundleUpdate{Bundle: b.s.bundleProto(), FederatedBundles: federated}); err != nil {
			return err
		}
		select {
		case <-changed:
		case <-fedChanged:
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		case <-b.s.stopping:
			return status.Error(codes.Unavailable, "server shutting down; reconnect to another replica or retry")
		}
	}
}

// bundleCache holds the bundle of the current sequence in the forms the
// front ends serve, built once per bundle change rather than once per
// request.
type bundleCache struct {
	mu  sync.Mutex
	seq uint64
	pb  *meshcav1.TrustBundle // the native API's message
	pem string                // every root in PEM, Istio's last chain element
}

// bundleProto returns the current bundle as a message. The message is
// shared: callers must not modify it.
func (s *Server) bundleProto() *meshcav1.TrustBundle {
	pb, _ := s.bundleForms()
	return pb
}

// bundlePEM returns the current bundle's roots in PEM.
func (s *Server) bundlePEM() string {
	_, pem := s.bundleForms()
	return pem
}

func (s *Server) bundleForms() (*meshcav1.TrustBundle, string) {
	bundle, seq := s.ca.Bundle()
	s.bundles.mu.Lock()
	defer s.bundles.mu.Unlock()
	if s.bundles.pb == nil || s.bundles.seq != seq {
		s.bundles.pb = s.newBundleProto(bundle, seq)
		s.bundles.pem = string(pemutil.EncodeCertificates(bundle.X509Authorities()...))
		s.bundles.seq = seq
	}
	return s.bundles.pb, s.bundles.pem
}

func (s *Server) newBundleProto(bundle *x509bundle.Bundle, seq uint64) *meshcav1.TrustBundle {
	roots := bundle.X509Authorities()
	pb := &meshcav1.TrustBundle{
		TrustDomain:     bundle.TrustDomain().Name(),
		Sequence:        seq,
		RefreshHint:     durationpb.New(s.hint),
		X509Authorities: make([][]byte, len(roots)),
	}
	for i, r := range roots {
		pb.X509Authorities[i] = r.Raw
	}
	if doc, err := ca.MarshalSPIFFEBundle(bundle, seq, s.hint); err == nil {
		pb.SpiffeJson = doc
	} else {
		s.log.Error("encoding the SPIFFE bundle", "error", err)
	}
	return pb
}
