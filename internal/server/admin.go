package server

import (
	"context"
	"crypto/x509"
	"errors"
	"log/slog"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity/ban"
	"github.com/meshca/meshca/identity/federation"
	adminv1 "github.com/meshca/meshca/proto/meshca/admin/v1"
	"github.com/meshca/meshca/rotation"
)

// AdminOptions configure the admin service.
type AdminOptions struct {
	// CA whose authorities are reported. Required.
	CA *ca.CA

	// Manager runs rotation steps; nil when the authorities are not ours
	// to rotate (a CA loaded from files), and every step is refused.
	Manager *rotation.Manager

	// Tracker reports root propagation; nil reports none.
	Tracker *rotation.Tracker

	// MaxLeafTTL is the longest leaf lifetime issued.
	MaxLeafTTL time.Duration

	// Logger receives audit lines of every step; nil discards.
	Logger *slog.Logger

	// Leader, when set, tells whether this replica leads, and who does
	// when it does not: only the leader runs steps, so that two replicas
	// never rotate at once. Nil means this replica always leads.
	Leader func() (leading bool, leader string)

	// Federator runs the federation commands (add, remove, list, show,
	// refresh); nil refuses them with FailedPrecondition.
	Federator *federation.Federator

	// ConfigPeers are the trust domains of the peers the server's config
	// file defines: add and remove refuse them (the file is changed
	// instead), and show marks them.
	ConfigPeers []spiffeid.TrustDomain

	// FixedPeers, when not empty, says why peers are not added or removed
	// at run time, and every add and remove is refused with it
	// (FailedPrecondition): in Kubernetes mode, peers come from the config,
	// the same on every replica.
	FixedPeers string

	// Bans takes and lifts emergency bans (BanAdd, BanRemove, BanList) on
	// any replica; nil refuses them with FailedPrecondition.
	Bans *ban.Registry
}

// maxAdminRequestBytes bounds an admin request: a federation add carries a
// bootstrap bundle and Web PKI roots, a few KiB; every other request is
// tiny.
const maxAdminRequestBytes = 256 << 10

// NewAdminServer returns a gRPC server with the admin service, to serve on
// a Unix socket whose permissions admit only operators. It has no
// transport security of its own: the socket's file mode is the access
// control.
func NewAdminServer(opts AdminOptions) *grpc.Server {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	// adminPeerCreds tell who calls (SO_PEERCRED), for the ban audit.
	g := grpc.NewServer(grpc.MaxRecvMsgSize(maxAdminRequestBytes), grpc.Creds(adminPeerCreds{}))
	adminv1.RegisterAdminServiceServer(g, &adminService{opts: opts, audit: opts.Logger.With(slog.Bool("audit", true), slog.String("api", "admin"))})
	return g
}

type adminService struct {
	adminv1.UnimplementedAdminServiceServer
	opts  AdminOptions
	audit *slog.Logger
}

func (a *adminService) RootStatus(context.Context, *adminv1.RootStatusRequest) (*adminv1.RootStatusResponse, error) {
	return a.status(), nil
}

func (a *adminService) PrepareRoot(ctx context.Context, req *adminv1.OperationRequest) (*adminv1.OperationResponse, error) {
	return a.run(ctx, rotation.StepPrepareRoot, req, (*rotation.Manager).PrepareRoot)
}

func (a *adminService) ActivateRoot(ctx context.Context, req *adminv1.OperationRequest) (*adminv1.OperationResponse, error) {
	return a.run(ctx, rotation.StepActivateRoot, req, (*rotation.Manager).ActivateRoot)
}

func (a *adminService) RetireRoot(ctx context.Context, req *adminv1.OperationRequest) (*adminv1.OperationResponse, error) {
	return a.run(ctx, rotation.StepRetireRoot, req, (*rotation.Manager).RetireRoot)
}

func (a *adminService) RotateIntermediate(ctx context.Context, req *adminv1.OperationRequest) (*adminv1.OperationResponse, error) {
	return a.run(ctx, rotation.StepActivateIntermediate, req, (*rotation.Manager).RotateIntermediate)
}

type operation func(*rotation.Manager, context.Context, rotation.OpOptions) (rotation.Result, error)

// run performs one operator step and audits it, whatever its outcome.
func (a *adminService) run(ctx context.Context, step rotation.Step, req *adminv1.OperationRequest, op operation) (*adminv1.OperationResponse, error) {
	attrs := []any{slog.String("step", string(step)), slog.Bool("force", req.GetForce()), slog.Bool("dry_run", req.GetDryRun())}
	refuse := func(err error) (*adminv1.OperationResponse, error) {
		a.audit.Info("admin step refused", append(attrs, slog.String("result", "refused"), slog.String("error", status.Convert(err).Message()))...)
		return nil, err
	}
	if a.opts.Manager == nil {
		return refuse(status.Error(codes.FailedPrecondition, "the authorities are loaded from files: rotate them by replacing the files"))
	}
	if a.opts.Leader != nil {
		if leading, leader := a.opts.Leader(); !leading {
			return refuse(status.Errorf(codes.FailedPrecondition, "this replica is not the leader; run the step on the leader, %q", leader))
		}
	}
	res, err := op(a.opts.Manager, ctx, rotation.OpOptions{Force: req.GetForce(), DryRun: req.GetDryRun()})
	if err != nil {
		st := adminStatus(err)
		a.audit.Info("admin step refused", append(attrs, slog.String("result", "refused"), slog.String("code", st.Code().String()), slog.String("error", st.Message()))...)
		return nil, st.Err()
	}
	level := slog.LevelInfo
	if res.Forced {
		level = slog.LevelWarn
	}
	a.audit.Log(ctx, level, "admin step", append(attrs, slog.String("result", resultWord(res)), slog.Bool("forced", res.Forced), slog.String("summary", res.Summary))...)
	return &adminv1.OperationResponse{Summary: res.Summary, Applied: res.Applied, Forced: res.Forced, Status: a.status()}, nil
}

func resultWord(r rotation.Result) string {
	if r.Applied {
		return "applied"
	}
	return "dry_run"
}

func adminStatus(err error) *status.Status {
	var refused *rotation.RefusedError
	switch {
	case errors.As(err, &refused) && refused.Overridable:
		return status.New(codes.FailedPrecondition, refused.Error()+" (--force overrides)")
	case errors.As(err, &refused):
		return status.New(codes.FailedPrecondition, refused.Error())
	case errors.Is(err, rotation.ErrNotApplicable):
		return status.New(codes.FailedPrecondition, err.Error())
	// The upstream's errors name the upstream and what failed, never a
	// credential (ca.Upstream's contract).
	case errors.Is(err, ca.ErrUpstreamUnavailable):
		return status.New(codes.Unavailable, err.Error()+" (the CA goes on signing with its current intermediate; retry when the upstream is back)")
	case errors.Is(err, ca.ErrUpstreamDenied):
		return status.New(codes.FailedPrecondition, err.Error()+" (check the server's credentials and their policy in the upstream)")
	}
	return status.New(codes.Internal, err.Error())
}

func (a *adminService) status() *adminv1.RootStatusResponse {
	set := a.opts.CA.Authorities()
	out := &adminv1.RootStatusResponse{
		TrustDomain:       set.TrustDomain.Name(),
		BundleSequence:    set.Sequence,
		Issuer:            authorityPB("active", set.Issuer.Cert, set.IssuerSince, set.Issuer.Signer != nil),
		MaxLeafTtlSeconds: int64(a.opts.MaxLeafTTL / time.Second),
	}
	for _, r := range set.Roots {
		out.Roots = append(out.Roots, authorityPB(string(r.State), r.Cert, r.Since, r.Signer != nil))
		switch r.State {
		case ca.RootPrepared:
			p := &adminv1.Propagation{
				BundleSequence:    r.BundleSequence,
				PreparedAt:        timestamppb.New(r.Since),
				ActivateAllowedAt: timestamppb.New(r.Since.Add(a.opts.MaxLeafTTL)),
			}
			if a.opts.Tracker != nil {
				seen, holding := a.opts.Tracker.Count(r.BundleSequence)
				p.WorkloadsSeen, p.WorkloadsHolding = int64(seen), int64(holding)
			}
			out.Propagation = p
		}
	}
	if a.opts.Manager != nil {
		if until, ok := a.opts.Manager.RetireAllowedAt(); ok {
			out.RetireAllowedAt = timestamppb.New(until)
		}
	}
	for _, c := range set.Chain {
		out.Chain = append(out.Chain, authorityPB("chain", c, time.Time{}, false))
	}
	if set.NextIssuer != nil {
		out.NextIssuer = authorityPB("next", set.NextIssuer.Cert, time.Time{}, true)
	}
	for _, r := range set.RetiringIssuers {
		out.RetiringIssuers = append(out.RetiringIssuers, authorityPB("retiring", r.Cert, r.LeavesUntil, false))
	}
	if a.opts.Manager != nil {
		if up, ok := a.opts.Manager.UpstreamStatus(); ok {
			out.Upstream = upstreamPB(up)
		}
	}
	return out
}

// upstreamPB is the admin API's form of the upstream's status; unset
// times stay unset.
func upstreamPB(up rotation.UpstreamStatus) *adminv1.UpstreamStatus {
	ts := func(t time.Time) *timestamppb.Timestamp {
		if t.IsZero() {
			return nil
		}
		return timestamppb.New(t)
	}
	return &adminv1.UpstreamStatus{
		Name:                up.Upstream,
		Available:           up.Available,
		LastSuccess:         ts(up.LastSuccess),
		LastFailure:         ts(up.LastFailure),
		LastError:           up.LastError,
		ConsecutiveFailures: int64(up.ConsecutiveFailures),
		NextAttempt:         ts(up.NextAttempt),
	}
}

func authorityPB(state string, c *x509.Certificate, since time.Time, keyHeld bool) *adminv1.Authority {
	a := &adminv1.Authority{
		State:     state,
		Subject:   c.Subject.String(),
		Serial:    c.SerialNumber.Text(16),
		Issuer:    c.Issuer.String(),
		NotBefore: timestamppb.New(c.NotBefore),
		NotAfter:  timestamppb.New(c.NotAfter),
		KeyHeld:   keyHeld,
	}
	if !since.IsZero() {
		a.Since = timestamppb.New(since)
	}
	return a
}
