package server

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"time"
	"unicode"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/meshca/meshca/identity/ban"
	adminv1 "github.com/meshca/meshca/proto/meshca/admin/v1"
)

// The steps of the ban commands, as audited.
const (
	stepBanAdd    = "ban-add"
	stepBanRemove = "ban-remove"
)

// maxRequestedByBytes bounds the requested_by of a ban request.
const maxRequestedByBytes = 256

// BanAdd takes a ban on any replica, leader or not: a ban is an
// emergency, and must not wait for, or depend on, an election. The
// replicas' writes to the shared store are conditional on its version, so
// two replicas banning at once both land.
func (a *adminService) BanAdd(ctx context.Context, req *adminv1.BanAddRequest) (*adminv1.BanAddResponse, error) {
	by := requestedBy(req.GetRequestedBy())
	caller := adminPeerOf(ctx)
	attrs := []any{slog.String("step", stepBanAdd), slog.String("target", req.GetTarget()),
		slog.String("reason", req.GetReason()), slog.String("requested_by", by), slog.String("caller", caller.String())}
	bans, err := a.bans()
	if err != nil {
		return nil, a.refuseBan(ctx, attrs, err)
	}
	target, err := ban.ParseTarget(req.GetTarget(), a.opts.CA.TrustDomain())
	if err != nil {
		return nil, a.refuseBan(ctx, attrs, banStatus(err).Err())
	}
	var ttl time.Duration
	if d := req.GetTtl(); d != nil {
		// protobuf's own message is unstable by design: say it in ours.
		if d.CheckValid() != nil {
			return nil, a.refuseBan(ctx, attrs, status.Error(codes.InvalidArgument, "ttl is not a valid duration (seconds and nanos in range, of one sign)"))
		}
		ttl = d.AsDuration()
	}
	attrs = append(attrs, slog.String("kind", string(target.Kind())), slog.Duration("ttl", ttl))
	added, replaced, err := bans.Add(ctx, ban.Ban{Target: target, Reason: req.GetReason(), By: by + " (" + caller.String() + ")"}, ttl)
	if err != nil {
		return nil, a.refuseBan(ctx, attrs, banStatus(err).Err())
	}
	result := "applied"
	if replaced {
		result = "replaced"
	}
	a.audit.WarnContext(ctx, "admin step", append(attrs, slog.String("result", result), expiresAttr(added))...)
	return &adminv1.BanAddResponse{Ban: banPB(added), Replaced: replaced}, nil
}

// BanRemove lifts a ban, on any replica as BanAdd.
func (a *adminService) BanRemove(ctx context.Context, req *adminv1.BanRemoveRequest) (*adminv1.BanRemoveResponse, error) {
	by := requestedBy(req.GetRequestedBy())
	attrs := []any{slog.String("step", stepBanRemove), slog.String("target", req.GetTarget()),
		slog.String("requested_by", by), slog.String("caller", adminPeerOf(ctx).String())}
	bans, err := a.bans()
	if err != nil {
		return nil, a.refuseBan(ctx, attrs, err)
	}
	target, err := ban.ParseTarget(req.GetTarget(), a.opts.CA.TrustDomain())
	if err != nil {
		return nil, a.refuseBan(ctx, attrs, banStatus(err).Err())
	}
	removed, err := bans.Remove(ctx, target)
	if err != nil {
		return nil, a.refuseBan(ctx, attrs, banStatus(err).Err())
	}
	a.audit.WarnContext(ctx, "admin step", append(attrs, slog.String("result", "applied"),
		slog.String("reason", removed.Reason), slog.String("banned_by", removed.By))...)
	return &adminv1.BanRemoveResponse{Ban: banPB(removed)}, nil
}

// BanList returns the bans in force.
func (a *adminService) BanList(context.Context, *adminv1.BanListRequest) (*adminv1.BanListResponse, error) {
	bans, err := a.bans()
	if err != nil {
		return nil, err
	}
	out := &adminv1.BanListResponse{}
	for _, b := range bans.List() {
		out.Bans = append(out.Bans, banPB(b))
	}
	return out, nil
}

// bans returns the Registry, or the status refusing every ban command
// when there is none.
func (a *adminService) bans() (*ban.Registry, error) {
	if a.opts.Bans == nil {
		return nil, status.Error(codes.FailedPrecondition, "bans are off on this server")
	}
	return a.opts.Bans, nil
}

// refuseBan audits a refused ban command, at warn as every ban step, and
// returns err, a status error.
func (a *adminService) refuseBan(ctx context.Context, attrs []any, err error) error {
	st := status.Convert(err)
	a.audit.WarnContext(ctx, "admin step refused", append(attrs, slog.String("result", "refused"),
		slog.String("code", st.Code().String()), slog.String("error", st.Message()))...)
	return err
}

// banStatus returns the status of an error of the ban Registry.
func banStatus(err error) *status.Status {
	switch {
	case errors.Is(err, ban.ErrInvalid):
		return status.New(codes.InvalidArgument, err.Error())
	case errors.Is(err, ban.ErrNotBanned):
		return status.New(codes.NotFound, err.Error())
	case errors.Is(err, ban.ErrTooMany):
		return status.New(codes.ResourceExhausted, err.Error())
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return status.FromContextError(err)
	}
	// The store failed: the ban is not taken, and the operator must know.
	return status.New(codes.Unavailable, "the bans could not be stored; nothing changed, try again: "+err.Error())
}

// requestedBy cleans the caller's declared name for audit lines: printable,
// bounded, "unknown" when empty.
func requestedBy(s string) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return -1
		}
		return r
	}, s)
	if len(s) > maxRequestedByBytes {
		s = s[:maxRequestedByBytes]
	}
	if s == "" {
		return "unknown"
	}
	return s
}

func expiresAttr(b ban.Ban) slog.Attr {
	if b.Expires.IsZero() {
		return slog.String("expires", "never")
	}
	return slog.Time("expires", b.Expires)
}

func banPB(b ban.Ban) *adminv1.Ban {
	out := &adminv1.Ban{
		Target:    b.Target.String(),
		Kind:      string(b.Target.Kind()),
		Reason:    b.Reason,
		CreatedBy: b.By,
		CreatedAt: timestamppb.New(b.Created),
	}
	if !b.Expires.IsZero() {
		out.ExpiresAt = timestamppb.New(b.Expires)
	}
	return out
}
