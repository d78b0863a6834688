package server

import (
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"

	"github.com/meshca/meshca/identity/ban"
)

// ReasonBanned is the reason label, in audit lines and the denial metric,
// of a request refused because its identity is banned.
const ReasonBanned = "banned"

// BanList tells whether an identity is banned (*ban.Registry).
type BanList interface {
	Banned(id spiffeid.ID) (ban.Ban, bool)
}

var _ BanList = (*ban.Registry)(nil)

// checkBans refuses, with PermissionDenied and reason "banned", when any
// of ids is banned: the authenticated caller's ID, and the ID that would
// be issued. It is one check for every front end, Linkerd's DNS
// identities included, since they reach the shared path as SPIFFE IDs.
func (s *Server) checkBans(ids ...spiffeid.ID) error {
	if s.bans == nil {
		return nil
	}
	for _, id := range ids {
		if id.IsZero() {
			continue
		}
		if b, banned := s.bans.Banned(id); banned {
			return bannedRefusal(id, b)
		}
	}
	return nil
}

// bannedRefusal names the ban on id: its target, since when, until when,
// and the operator's reason. It holds no credential.
func bannedRefusal(id spiffeid.ID, b ban.Ban) *refusal {
	until := "until removed"
	if !b.Expires.IsZero() {
		until = "until " + b.Expires.UTC().Format(time.RFC3339)
	}
	on := ""
	if b.Target.Kind() == ban.KindNamespace {
		on = fmt.Sprintf(" by the ban on %s", b.Target.Describe())
	}
	return refusef(codes.PermissionDenied, ReasonBanned,
		"identity %q is banned%s since %s, %s (reason: %q); no certificate is issued for it",
		id, on, b.Created.UTC().Format(time.RFC3339), until, b.Reason)
}
