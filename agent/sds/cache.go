package sds

import (
	"context"
	"fmt"
	"log/slog"
	"slices"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/log"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// nodeKey is the one key of the snapshot cache: an agent serves one
// identity, so every proxy that connects is served the same snapshot.
const nodeKey = "meshca-agent"

// oneNode maps every node to nodeKey.
type oneNode struct{}

func (oneNode) ID(*corev3.Node) string { return nodeKey }

// secretCache is go-control-plane's snapshot cache with two changes to
// state-of-the-world watches of secrets, for Envoy's sake:
//
//   - A watch that names only secrets that are not served is held and never
//     answered. The snapshot cache would answer it with no resources, which
//     Envoy rejects ("Missing SDS resources"), and its retry would be
//     answered the same way at once, in a loop.
//   - A watch that rejects (NACKs) a response waits for the next snapshot
//     instead of being answered at once with the same secrets it rejected,
//     again in a loop.
//
// Delta watches and Fetch are the snapshot cache's own: delta already
// answers only with changes, and Fetch is one request.
type secretCache struct {
	cachev3.SnapshotCache
	log    *slog.Logger
	served []string
}

func newSecretCache(log *slog.Logger, served ...string) *secretCache {
	return &secretCache{
		SnapshotCache: cachev3.NewSnapshotCache(false, oneNode{}, adaptLogger(log)),
		log:           log,
		served:        served,
	}
}

// CreateWatch implements cachev3.ConfigWatcher.
func (c *secretCache) CreateWatch(req *cachev3.Request, sub cachev3.Subscription, out chan cachev3.Response) (func(), error) {
	if req.GetTypeUrl() != resource.SecretType {
		return c.SnapshotCache.CreateWatch(req, sub, out)
	}
	ctx := context.Background()
	asked := req.GetResourceNames()
	if !sub.IsWildcard() && !c.servesAny(sub.SubscribedResources()) {
		c.log.LogAttrs(ctx, slog.LevelWarn, "a proxy asked only for secrets that are not served; not answering",
			slog.String("node", req.GetNode().GetId()), slog.Any("names", asked), slog.Any("served", c.served))
		return func() {}, nil
	}
	nack := req.GetErrorDetail() != nil
	if nack {
		if version, ok := returnedVersion(sub); ok {
			// Envoy sends the version it last accepted; ask for the one it
			// rejected, so that only a new snapshot answers.
			req = proto.CloneOf(req)
			req.VersionInfo = version
		}
	}
	cancel, err := c.SnapshotCache.CreateWatch(req, sub, out)
	if err != nil {
		return nil, watchError(err)
	}
	if nack {
		c.log.LogAttrs(ctx, slog.LevelWarn, "a proxy rejected secrets; holding them until the next change",
			slog.String("node", req.GetNode().GetId()), slog.Any("names", asked),
			slog.String("rejected_version", req.GetVersionInfo()), slog.String("error", req.GetErrorDetail().GetMessage()))
	} else {
		c.log.LogAttrs(ctx, slog.LevelDebug, "watching secrets",
			slog.String("node", req.GetNode().GetId()), slog.Any("names", asked), slog.String("version", req.GetVersionInfo()))
	}
	return cancel, nil
}

// CreateDeltaWatch implements cachev3.ConfigWatcher.
func (c *secretCache) CreateDeltaWatch(req *cachev3.DeltaRequest, sub cachev3.Subscription, out chan cachev3.DeltaResponse) (func(), error) {
	cancel, err := c.SnapshotCache.CreateDeltaWatch(req, sub, out)
	if err != nil {
		return nil, watchError(err)
	}
	if req.GetTypeUrl() == resource.SecretType {
		level, msg := slog.LevelDebug, "watching secrets (delta)"
		if req.GetErrorDetail() != nil {
			level, msg = slog.LevelWarn, "a proxy rejected secrets (delta); holding them until the next change"
		}
		c.log.LogAttrs(context.Background(), level, msg,
			slog.String("node", req.GetNode().GetId()), slog.Any("subscribe", req.GetResourceNamesSubscribe()),
			slog.Any("unsubscribe", req.GetResourceNamesUnsubscribe()), slog.String("error", req.GetErrorDetail().GetMessage()))
	}
	return cancel, nil
}

// watchError is the status that ends a stream whose watch the cache
// refused: a fault of the agent's, never of the request.
func watchError(err error) error {
	return status.Errorf(codes.Internal, "sds: cannot watch secrets: %v", err)
}

func (c *secretCache) servesAny(names map[string]struct{}) bool {
	return slices.ContainsFunc(c.served, func(n string) bool {
		_, ok := names[n]
		return ok
	})
}

// returnedVersion returns the version of the last response the
// subscription was sent: the snapshot cache gives every resource of a
// response the response's version.
func returnedVersion(sub cachev3.Subscription) (string, bool) {
	for _, v := range sub.ReturnedResources() {
		return v, true
	}
	return "", false
}

// adaptLogger sends go-control-plane's own logs to l: its debug and info
// lines (watches opened and answered, by resource name) at debug level.
func adaptLogger(l *slog.Logger) log.Logger {
	logf := func(level slog.Level) func(string, ...any) {
		return func(format string, args ...any) {
			ctx := context.Background()
			if l.Enabled(ctx, level) {
				l.LogAttrs(ctx, level, fmt.Sprintf(format, args...), slog.String("from", "go-control-plane"))
			}
		}
	}
	return log.LoggerFuncs{
		DebugFunc: logf(slog.LevelDebug),
		InfoFunc:  logf(slog.LevelDebug),
		WarnFunc:  logf(slog.LevelWarn),
		ErrorFunc: logf(slog.LevelError),
	}
}
