package sds

import (
	"context"
	"log/slog"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/delta/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/rest/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/sotw/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// xdsServer serves go-control-plane's state-of-the-world, delta and fetch
// handlers as the SecretDiscoveryService and the
// AggregatedDiscoveryService. (go-control-plane's pkg/server/v3 bundles
// the same handlers with every other xDS service, and with them a module
// meshca does not otherwise need.)
type xdsServer struct {
	secretv3.UnimplementedSecretDiscoveryServiceServer
	discoveryv3.UnimplementedAggregatedDiscoveryServiceServer

	s     *Server
	sotw  sotw.Server
	delta delta.Server
	rest  rest.Server
}

var (
	_ secretv3.SecretDiscoveryServiceServer        = (*xdsServer)(nil)
	_ discoveryv3.AggregatedDiscoveryServiceServer = (*xdsServer)(nil)
)

// newXDSServer returns the handlers of s's cache. Streams end when ctx is
// done.
func newXDSServer(ctx context.Context, s *Server) *xdsServer {
	cb := callbacks{log: s.log}
	opt := sotw.WithLogger(adaptLogger(s.log)) // sets the logger of both
	return &xdsServer{
		s:     s,
		sotw:  sotw.NewServer(ctx, s.cache, cb, opt),
		delta: delta.NewServer(ctx, s.cache, cb, opt),
		rest:  rest.NewServer(s.cache, nil),
	}
}

// StreamSecrets serves a state-of-the-world SDS stream.
func (x *xdsServer) StreamSecrets(stream grpc.BidiStreamingServer[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]) error {
	return x.sotw.StreamHandler(stream, resource.SecretType)
}

// DeltaSecrets serves a delta SDS stream.
func (x *xdsServer) DeltaSecrets(stream grpc.BidiStreamingServer[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]) error {
	return x.delta.DeltaStreamHandler(stream, resource.SecretType)
}

// StreamAggregatedResources serves a state-of-the-world ADS stream. Only
// secrets are served; watches of other types are held unanswered.
func (x *xdsServer) StreamAggregatedResources(stream grpc.BidiStreamingServer[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]) error {
	return x.sotw.StreamHandler(stream, resource.AnyType)
}

// DeltaAggregatedResources serves a delta ADS stream. Only secrets are
// served.
func (x *xdsServer) DeltaAggregatedResources(stream grpc.BidiStreamingServer[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]) error {
	return x.delta.DeltaStreamHandler(stream, resource.AnyType)
}

// FetchSecrets returns the current secrets of the names asked for, or all
// of them when none is named; names that are not served are left out. The
// request's version_info is not compared: the answer is always the current
// state. Before the first SVID it fails with Unavailable.
func (x *xdsServer) FetchSecrets(ctx context.Context, req *discoveryv3.DiscoveryRequest) (*discoveryv3.DiscoveryResponse, error) {
	if !x.s.ready() {
		return nil, status.Error(codes.Unavailable, "sds: no secrets yet: the agent has no X509-SVID yet; retry later")
	}
	req = proto.CloneOf(req)
	req.TypeUrl = resource.SecretType
	req.VersionInfo = ""
	resp, err := x.rest.Fetch(ctx, req)
	if err != nil {
		x.s.log.LogAttrs(ctx, slog.LevelError, "FetchSecrets failed", slog.Any("error", err))
		return nil, status.Error(codes.Internal, "sds: cannot build the response; see the agent's log")
	}
	return resp, nil
}

// callbacks log streams opening and closing; the cache logs requests.
type callbacks struct {
	log *slog.Logger
}

var (
	_ sotw.Callbacks  = callbacks{}
	_ delta.Callbacks = callbacks{}
)

func (c callbacks) OnStreamOpen(ctx context.Context, id int64, typeURL string) error {
	c.log.LogAttrs(ctx, slog.LevelDebug, "stream opened", slog.Int64("stream", id), slog.String("type", typeURL))
	return nil
}

func (c callbacks) OnStreamClosed(id int64, node *corev3.Node) {
	c.log.LogAttrs(context.Background(), slog.LevelDebug, "stream closed", slog.Int64("stream", id), slog.String("node", node.GetId()))
}

func (c callbacks) OnDeltaStreamOpen(ctx context.Context, id int64, typeURL string) error {
	c.log.LogAttrs(ctx, slog.LevelDebug, "delta stream opened", slog.Int64("stream", id), slog.String("type", typeURL))
	return nil
}

func (c callbacks) OnDeltaStreamClosed(id int64, node *corev3.Node) {
	c.log.LogAttrs(context.Background(), slog.LevelDebug, "delta stream closed", slog.Int64("stream", id), slog.String("node", node.GetId()))
}

func (callbacks) OnStreamRequest(int64, *discoveryv3.DiscoveryRequest) error { return nil }

func (callbacks) OnStreamResponse(context.Context, int64, *discoveryv3.DiscoveryRequest, *discoveryv3.DiscoveryResponse) {
}

func (callbacks) OnStreamDeltaRequest(int64, *discoveryv3.DeltaDiscoveryRequest) error { return nil }

func (callbacks) OnStreamDeltaResponse(int64, *discoveryv3.DeltaDiscoveryRequest, *discoveryv3.DeltaDiscoveryResponse) {
}
