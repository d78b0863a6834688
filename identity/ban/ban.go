package ban

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"
)

// Kind is what a ban's target names.
type Kind string

// The kinds of target.
const (
	// KindID bans one SPIFFE ID, exactly.
	KindID Kind = "spiffe_id"
	// KindNamespace bans every ID spiffe://<td>/ns/<namespace>/...: the
	// mesh convention's identities of a Kubernetes namespace.
	KindNamespace Kind = "namespace"
)

// Errors of the Registry, for callers to tell apart with errors.Is.
var (
	// ErrInvalid is wrapped by the errors of a malformed target, reason
	// or lifetime: the caller's mistake.
	ErrInvalid = errors.New("ban: invalid ban")
	// ErrNotBanned is wrapped by Remove when the target has no ban in
	// force.
	ErrNotBanned = errors.New("ban: not banned")
	// ErrTooMany is wrapped by Add when the store holds MaxBans already.
	ErrTooMany = errors.New("ban: too many bans")
)

// MaxReasonBytes bounds a ban's reason.
const MaxReasonBytes = 512

// Target is what a ban applies to: a SPIFFE ID or a namespace of a trust
// domain. The zero value is no target.
type Target struct {
	id        spiffeid.ID
	td        spiffeid.TrustDomain
	namespace string
}

// IDTarget returns the target of exactly id.
func IDTarget(id spiffeid.ID) Target { return Target{id: id, td: id.TrustDomain()} }

// NamespaceTarget returns the target of every ID of namespace ns in td.
// ns is not checked; ParseTarget checks it.
func NamespaceTarget(td spiffeid.TrustDomain, ns string) Target {
	return Target{td: td, namespace: ns}
}

// ParseTarget reads a target as an operator writes it: a SPIFFE ID of td
// ("spiffe://<td>/ns/shop/sa/web") bans exactly that ID; a namespace name
// ("shop") bans every ID under spiffe://<td>/ns/shop/. Its errors wrap
// ErrInvalid.
func ParseTarget(s string, td spiffeid.TrustDomain) (Target, error) {
	switch {
	case s == "":
		return Target{}, fmt.Errorf("%w: a target is required: a SPIFFE ID of trust domain %q or a namespace name", ErrInvalid, td.Name())
	case strings.HasPrefix(strings.ToLower(s), "spiffe:"):
		id, err := spiffeid.FromString(s)
		if err != nil {
			return Target{}, fmt.Errorf("%w: target %q is not a SPIFFE ID: %w", ErrInvalid, s, err)
		}
		if id.TrustDomain() != td {
			return Target{}, fmt.Errorf("%w: target %q is not in trust domain %q, the only one this CA issues for", ErrInvalid, s, td.Name())
		}
		if id.Path() == "" {
			return Target{}, fmt.Errorf("%w: target %q is the trust domain itself; ban a workload's ID or a namespace", ErrInvalid, s)
		}
		return IDTarget(id), nil
	}
	if problems := validation.IsDNS1123Label(s); len(problems) > 0 {
		return Target{}, fmt.Errorf("%w: target %q is neither a SPIFFE ID (spiffe://%s/...) nor a namespace name: %s", ErrInvalid, s, td.Name(), strings.Join(problems, "; "))
	}
	return NamespaceTarget(td, s), nil
}

// IsZero reports whether t is no target.
func (t Target) IsZero() bool { return t.td.IsZero() }

// Kind says what t names.
func (t Target) Kind() Kind {
	if t.namespace != "" {
		return KindNamespace
	}
	return KindID
}

// ID is the banned ID of a KindID target; zero otherwise.
func (t Target) ID() spiffeid.ID { return t.id }

// Namespace is the banned namespace of a KindNamespace target; empty
// otherwise.
func (t Target) Namespace() string { return t.namespace }

// TrustDomain is the trust domain of t.
func (t Target) TrustDomain() spiffeid.TrustDomain { return t.td }

// String returns t as ParseTarget reads it: the SPIFFE ID, or the
// namespace name.
func (t Target) String() string {
	if t.namespace != "" {
		return t.namespace
	}
	if t.id.IsZero() {
		return ""
	}
	return t.id.String()
}

// Describe returns t for a message: `SPIFFE ID "..."` or `namespace "..."`.
func (t Target) Describe() string {
	if t.namespace != "" {
		return fmt.Sprintf("namespace %q", t.namespace)
	}
	return fmt.Sprintf("SPIFFE ID %q", t.String())
}

// Matches reports whether id is banned by t: the same ID, or for a
// namespace an ID of its trust domain whose path starts with the whole
// segments /ns/<namespace>/ (namespace shop covers /ns/shop/sa/web, not
// /ns/shop2/sa/web).
func (t Target) Matches(id spiffeid.ID) bool {
	if t.IsZero() || id.IsZero() {
		return false
	}
	if t.namespace == "" {
		return id == t.id
	}
	if id.TrustDomain() != t.td {
		return false
	}
	rest, ok := strings.CutPrefix(id.Path(), "/ns/"+t.namespace)
	return ok && (rest == "" || strings.HasPrefix(rest, "/"))
}

// Ban is one emergency ban.
type Ban struct {
	// Target is what is banned.
	Target Target

	// Reason says why, for the operators and in the refusals workloads
	// get; it must not hold a secret.
	Reason string

	// By is who took the ban, as the admin caller says.
	By string

	// Created is when the ban was taken.
	Created time.Time

	// Expires is when the ban lifts by itself; zero means never.
	Expires time.Time
}

// InForce reports whether b applies at now.
func (b Ban) InForce(now time.Time) bool {
	return !b.Target.IsZero() && (b.Expires.IsZero() || now.Before(b.Expires))
}

// checkReason refuses a reason that is empty, too long or holds control
// characters (it reaches logs and error messages).
func checkReason(reason string) error {
	switch {
	case strings.TrimSpace(reason) == "":
		return fmt.Errorf("%w: a reason is required (an incident, a ticket): it is audited and shown to the refused workloads", ErrInvalid)
	case len(reason) > MaxReasonBytes:
		return fmt.Errorf("%w: the reason is %d bytes; at most %d", ErrInvalid, len(reason), MaxReasonBytes)
	case strings.ContainsFunc(reason, unicode.IsControl):
		return fmt.Errorf("%w: the reason holds control characters", ErrInvalid)
	}
	return nil
}

// formatVersion is the version of the stored document.
const formatVersion = 1

// document is the stored form of the bans: a JSON object with a version,
// so that a newer format is refused rather than misread.
type document struct {
	Version int       `json:"version"`
	Bans    []banJSON `json:"bans"`
}

type banJSON struct {
	SPIFFEID    string     `json:"spiffe_id,omitempty"`
	TrustDomain string     `json:"trust_domain,omitempty"`
	Namespace   string     `json:"namespace,omitempty"`
	Reason      string     `json:"reason"`
	By          string     `json:"by,omitempty"`
	Created     time.Time  `json:"created"`
	Expires     *time.Time `json:"expires,omitempty"`
}

// Marshal encodes bans in the stored format.
func Marshal(bans []Ban) ([]byte, error) {
	doc := document{Version: formatVersion, Bans: make([]banJSON, 0, len(bans))}
	for _, b := range bans {
		j := banJSON{Reason: b.Reason, By: b.By, Created: b.Created.UTC()}
		if b.Target.Kind() == KindNamespace {
			j.TrustDomain, j.Namespace = b.Target.td.Name(), b.Target.namespace
		} else {
			j.SPIFFEID = b.Target.id.String()
		}
		if !b.Expires.IsZero() {
			e := b.Expires.UTC()
			j.Expires = &e
		}
		doc.Bans = append(doc.Bans, j)
	}
	out, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("ban: encoding: %w", err)
	}
	return append(out, '\n'), nil
}

// Unmarshal decodes bans in the stored format. Empty data holds no bans.
// Data of another version, or a ban whose target does not parse, is an
// error: bans that cannot be read are never silently dropped.
func Unmarshal(data []byte) ([]Ban, error) {
	if len(data) == 0 {
		return nil, nil
	}
	var doc document
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("ban: decoding: %w", err)
	}
	if doc.Version != formatVersion {
		return nil, fmt.Errorf("ban: stored bans have format version %d; this build reads version %d", doc.Version, formatVersion)
	}
	bans := make([]Ban, 0, len(doc.Bans))
	for i, j := range doc.Bans {
		b := Ban{Reason: j.Reason, By: j.By, Created: j.Created}
		if j.Expires != nil {
			b.Expires = *j.Expires
		}
		switch {
		case j.SPIFFEID != "" && j.Namespace == "":
			id, err := spiffeid.FromString(j.SPIFFEID)
			if err != nil {
				return nil, fmt.Errorf("ban: stored ban %d: %w", i, err)
			}
			b.Target = IDTarget(id)
		case j.SPIFFEID == "" && j.Namespace != "":
			td, err := spiffeid.TrustDomainFromString(j.TrustDomain)
			if err != nil {
				return nil, fmt.Errorf("ban: stored ban %d: %w", i, err)
			}
			if problems := validation.IsDNS1123Label(j.Namespace); len(problems) > 0 {
				return nil, fmt.Errorf("ban: stored ban %d: namespace %q: %s", i, j.Namespace, strings.Join(problems, "; "))
			}
			b.Target = NamespaceTarget(td, j.Namespace)
		default:
			return nil, fmt.Errorf("ban: stored ban %d names no target, or two", i)
		}
		bans = append(bans, b)
	}
	return bans, nil
}

// sortBans orders bans by target, IDs and namespaces alike.
func sortBans(bans []Ban) {
	slices.SortFunc(bans, func(a, b Ban) int { return strings.Compare(a.Target.String(), b.Target.String()) })
}
