package server

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/meshca/meshca/identity/federation"
	"github.com/meshca/meshca/internal/pemutil"
	adminv1 "github.com/meshca/meshca/proto/meshca/admin/v1"
)

// The steps of the federation commands, as audited.
const (
	stepFederationAdd     = "federation-add"
	stepFederationRemove  = "federation-remove"
	stepFederationRefresh = "federation-refresh"
)

func (a *adminService) FederationAdd(ctx context.Context, req *adminv1.FederationAddRequest) (*adminv1.FederationPeer, error) {
	attrs := []any{
		slog.String("step", stepFederationAdd),
		slog.String("trust_domain", req.GetTrustDomain()),
		slog.String("url", redactedURL(req.GetUrl())),
		slog.String("profile", req.GetProfile()),
		slog.String("endpoint_spiffe_id", req.GetEndpointSpiffeId()),
	}
	fed, err := a.federator()
	if err != nil {
		return nil, a.refuseFederation(attrs, err)
	}
	p, err := peerFromRequest(req)
	if err != nil {
		return nil, a.refuseFederation(attrs, err)
	}
	if err := a.checkChange(p.TrustDomain); err != nil {
		return nil, a.refuseFederation(attrs, err)
	}
	if err := fed.AddPeer(ctx, p); err != nil {
		return nil, a.refuseFederation(attrs, federationStatus(err).Err())
	}
	if p.Bootstrap != nil {
		attrs = append(attrs, slog.Any("bootstrap_roots", fingerprints(p.Bootstrap.X509Authorities())))
	}
	if len(p.WebRoots) > 0 {
		attrs = append(attrs, slog.Any("web_roots", fingerprints(p.WebRoots)))
	}
	a.audit.InfoContext(ctx, "admin step", append(attrs, slog.String("result", "applied"))...)
	return a.peer(fed, p.TrustDomain)
}

func (a *adminService) FederationRemove(ctx context.Context, req *adminv1.FederationRemoveRequest) (*adminv1.FederationRemoveResponse, error) {
	attrs := []any{slog.String("step", stepFederationRemove), slog.String("trust_domain", req.GetTrustDomain())}
	fed, err := a.federator()
	if err != nil {
		return nil, a.refuseFederation(attrs, err)
	}
	td, err := parsePeerTrustDomain(req.GetTrustDomain())
	if err != nil {
		return nil, a.refuseFederation(attrs, err)
	}
	if err := a.checkChange(td); err != nil {
		return nil, a.refuseFederation(attrs, err)
	}
	if err := fed.RemovePeer(ctx, td); err != nil {
		return nil, a.refuseFederation(attrs, federationStatus(err).Err())
	}
	a.audit.InfoContext(ctx, "admin step", append(attrs, slog.String("result", "applied"))...)
	return &adminv1.FederationRemoveResponse{}, nil
}

func (a *adminService) FederationList(context.Context, *adminv1.FederationListRequest) (*adminv1.FederationListResponse, error) {
	fed, err := a.federator()
	if err != nil {
		return nil, err
	}
	out := &adminv1.FederationListResponse{}
	for _, st := range fed.Peers() {
		out.Peers = append(out.Peers, a.peerPB(st))
	}
	return out, nil
}

func (a *adminService) FederationShow(_ context.Context, req *adminv1.FederationShowRequest) (*adminv1.FederationPeer, error) {
	fed, err := a.federator()
	if err != nil {
		return nil, err
	}
	td, err := parsePeerTrustDomain(req.GetTrustDomain())
	if err != nil {
		return nil, err
	}
	return a.peer(fed, td)
}

// FederationRefresh fetches now. The fetch's outcome is in the answer's
// last_error, not in the call's status: the call worked, the peer's
// endpoint did not.
func (a *adminService) FederationRefresh(ctx context.Context, req *adminv1.FederationRefreshRequest) (*adminv1.FederationPeer, error) {
	attrs := []any{slog.String("step", stepFederationRefresh), slog.String("trust_domain", req.GetTrustDomain())}
	fed, err := a.federator()
	if err != nil {
		return nil, a.refuseFederation(attrs, err)
	}
	td, err := parsePeerTrustDomain(req.GetTrustDomain())
	if err != nil {
		return nil, a.refuseFederation(attrs, err)
	}
	before, err := fed.Peer(td)
	if err != nil {
		return nil, a.refuseFederation(attrs, federationStatus(err).Err())
	}
	after, err := fed.Refresh(ctx, td)
	var ferr *federation.FetchError
	switch {
	case errors.As(err, &ferr):
		a.audit.InfoContext(ctx, "admin step", append(attrs, slog.String("result", "fetch_failed"),
			slog.String("reason", string(ferr.Reason)), slog.String("error", ferr.Error()))...)
	case err != nil:
		// The peer was removed meanwhile, or the call ended.
		return nil, a.refuseFederation(attrs, federationStatus(err).Err())
	case after.Bundle != before.Bundle:
		a.audit.InfoContext(ctx, "admin step", append(attrs, slog.String("result", "updated"), bundleSequenceAttr(after))...)
	default:
		a.audit.InfoContext(ctx, "admin step", append(attrs, slog.String("result", "unchanged"), bundleSequenceAttr(after))...)
	}
	return a.peerPB(after), nil
}

// federator returns the Federator, or the status refusing every command
// when there is none.
func (a *adminService) federator() (*federation.Federator, error) {
	if a.opts.Federator == nil {
		return nil, status.Error(codes.FailedPrecondition, "federation is off on this server")
	}
	return a.opts.Federator, nil
}

// checkChange refuses to add or remove td when peers are fixed, or td is
// a peer of the config file.
func (a *adminService) checkChange(td spiffeid.TrustDomain) error {
	if a.opts.FixedPeers != "" {
		return status.Error(codes.FailedPrecondition, a.opts.FixedPeers)
	}
	if slices.Contains(a.opts.ConfigPeers, td) {
		return status.Errorf(codes.FailedPrecondition, "trust domain %q is a peer of the server's config file (federation.peers): change it there and restart the server", td.Name())
	}
	return nil
}

// refuseFederation audits a refused federation command and returns err, a
// status error.
func (a *adminService) refuseFederation(attrs []any, err error) error {
	st := status.Convert(err)
	a.audit.Info("admin step refused", append(attrs, slog.String("result", "refused"),
		slog.String("code", st.Code().String()), slog.String("error", st.Message()))...)
	return err
}

// peer returns the status of peer td as a message.
func (a *adminService) peer(fed *federation.Federator, td spiffeid.TrustDomain) (*adminv1.FederationPeer, error) {
	st, err := fed.Peer(td)
	if err != nil {
		return nil, federationStatus(err).Err()
	}
	return a.peerPB(st), nil
}

// federationStatus returns the status of an error of the Federator's
// registry: the caller's mistakes by their kind, a store failure as
// Internal.
func federationStatus(err error) *status.Status {
	switch {
	case errors.Is(err, federation.ErrInvalidPeer):
		return status.New(codes.InvalidArgument, err.Error())
	case errors.Is(err, federation.ErrPeerExists):
		return status.New(codes.AlreadyExists, err.Error())
	case errors.Is(err, federation.ErrUnknownPeer):
		return status.New(codes.NotFound, err.Error())
	case errors.Is(err, federation.ErrTooManyPeers):
		return status.New(codes.ResourceExhausted, err.Error())
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return status.FromContextError(err)
	}
	return status.New(codes.Internal, err.Error())
}

// peerFromRequest reads an add request into a Peer, for the Federator to
// validate. Its errors are InvalidArgument statuses.
func peerFromRequest(req *adminv1.FederationAddRequest) (federation.Peer, error) {
	td, err := parsePeerTrustDomain(req.GetTrustDomain())
	if err != nil {
		return federation.Peer{}, err
	}
	p := federation.Peer{TrustDomain: td, URL: req.GetUrl(), Profile: federation.Profile(req.GetProfile())}
	if s := req.GetEndpointSpiffeId(); s != "" {
		if p.EndpointID, err = spiffeid.FromString(s); err != nil {
			return federation.Peer{}, status.Errorf(codes.InvalidArgument, "endpoint_spiffe_id %q: %v", s, err)
		}
	}
	if len(req.GetBootstrapBundle()) > 0 {
		if p.Bootstrap, err = ParsePeerBundle(td, req.GetBootstrapBundle()); err != nil {
			return federation.Peer{}, status.Errorf(codes.InvalidArgument, "bootstrap_bundle: %v", err)
		}
	}
	if len(req.GetWebRoots()) > 0 {
		if p.WebRoots, err = pemutil.ParseCertificates(req.GetWebRoots()); err != nil {
			return federation.Peer{}, status.Errorf(codes.InvalidArgument, "web_roots: %v", err)
		}
	}
	return p, nil
}

// parsePeerTrustDomain parses a trust domain name of a request.
func parsePeerTrustDomain(name string) (spiffeid.TrustDomain, error) {
	if name == "" {
		return spiffeid.TrustDomain{}, status.Error(codes.InvalidArgument, "trust_domain is required")
	}
	td, err := spiffeid.TrustDomainFromString(name)
	if err != nil {
		return spiffeid.TrustDomain{}, status.Errorf(codes.InvalidArgument, "trust_domain %q: %v", name, err)
	}
	return td, nil
}

// peerPB returns a peer's status as a message.
func (a *adminService) peerPB(st federation.PeerStatus) *adminv1.FederationPeer {
	p := st.Peer
	out := &adminv1.FederationPeer{
		TrustDomain:         p.TrustDomain.Name(),
		Url:                 p.URL,
		Profile:             string(p.Profile),
		FromConfig:          slices.Contains(a.opts.ConfigPeers, p.TrustDomain),
		ConsecutiveFailures: int64(st.ConsecutiveFailures),
		LastAttempt:         optionalTime(st.LastAttempt),
		LastSuccess:         optionalTime(st.LastSuccess),
		NextRefresh:         optionalTime(st.NextRefresh),
		WebRoots:            rootsPB(p.WebRoots),
	}
	if !p.EndpointID.IsZero() {
		out.EndpointSpiffeId = p.EndpointID.String()
	}
	if b := st.Bundle; b != nil {
		out.Roots = rootsPB(b.X509Authorities())
		out.Bootstrap = st.LastSuccess.IsZero()
		if seq, ok := b.SequenceNumber(); ok {
			out.Sequence = &seq
		}
		if hint, ok := b.RefreshHint(); ok {
			out.RefreshHint = durationpb.New(hint)
		}
	}
	if e := st.LastError; e != nil {
		out.LastError = &adminv1.FederationError{Reason: string(e.Reason), Message: e.Error()}
	}
	return out
}

func rootsPB(certs []*x509.Certificate) []*adminv1.FederatedRoot {
	out := make([]*adminv1.FederatedRoot, 0, len(certs))
	for _, c := range certs {
		sum := sha256.Sum256(c.Raw)
		out = append(out, &adminv1.FederatedRoot{
			Subject:   c.Subject.String(),
			Serial:    c.SerialNumber.Text(16),
			Sha256:    hex.EncodeToString(sum[:]),
			NotBefore: timestamppb.New(c.NotBefore),
			NotAfter:  timestamppb.New(c.NotAfter),
		})
	}
	return out
}

// fingerprints returns the SHA-256 fingerprints of certs, for audit lines.
func fingerprints(certs []*x509.Certificate) []string {
	out := make([]string, len(certs))
	for i, c := range certs {
		sum := sha256.Sum256(c.Raw)
		out[i] = hex.EncodeToString(sum[:])
	}
	return out
}

func bundleSequenceAttr(st federation.PeerStatus) slog.Attr {
	if st.Bundle != nil {
		if seq, ok := st.Bundle.SequenceNumber(); ok {
			return slog.Uint64("sequence", seq)
		}
	}
	return slog.String("sequence", "none")
}

// optionalTime returns t as a message; nil when t is zero.
func optionalTime(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

// redactedURL returns raw for an audit line, without the password of any
// user information (which the Federator refuses anyway).
func redactedURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return fmt.Sprintf("(%d bytes that do not parse as a URL)", len(raw))
	}
	if u.User != nil {
		u.User = url.User("REDACTED")
	}
	return u.String()
}
