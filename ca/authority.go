package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/utils/clock"
)

// Lifetimes of the authorities a self-signed CA creates.
const (
	DefaultRootTTL         = 10 * 365 * 24 * time.Hour
	DefaultIntermediateTTL = 365 * 24 * time.Hour
)

// Authority is a CA certificate and, where this process holds it, its key.
type Authority struct {
	Cert *x509.Certificate

	// Signer is the certificate's private key; nil for a root whose key is
	// kept elsewhere (an operator's plugged-in root, an upstream CA).
	Signer crypto.Signer
}

// RootState is where a root is in its rotation.
type RootState string

// The states of a root. A root is prepared (in the bundle, not signing),
// active (the issuer chains to it), retiring (in the bundle, no longer
// signing, leaves under it not yet expired), and then gone from the set.
const (
	RootPrepared RootState = "prepared"
	RootActive   RootState = "active"
	RootRetiring RootState = "retiring"
)

// Root is a root of the trust bundle with its rotation state.
type Root struct {
	Authority

	// State is the root's rotation state.
	State RootState

	// Since is when the root entered State.
	Since time.Time

	// BundleSequence is the first bundle sequence that held the root: a
	// workload reporting this sequence or a later one trusts it.
	BundleSequence uint64
}

// RetiringIssuer is an intermediate that no longer signs but under which
// leaves may still be valid.
type RetiringIssuer struct {
	Cert *x509.Certificate

	// LeavesUntil is when the last leaf it signed expires.
	LeavesUntil time.Time
}

// AuthoritySet is the CA's authorities: the roots of the trust bundle, the
// intermediate that signs workload certificates, and the intermediates on
// their way in and out.
type AuthoritySet struct {
	TrustDomain spiffeid.TrustDomain

	// Sequence increases with every change of the trust bundle (Roots).
	Sequence uint64

	// Roots are the X.509 authorities of the trust bundle, in every state.
	Roots []Root

	// Issuer signs workload certificates. Its key is always held.
	Issuer Authority

	// IssuerSince is when Issuer started signing.
	IssuerSince time.Time

	// Chain is served after Issuer in every chain: the intermediates between
	// Issuer and a root, and copies of Issuer cross-signed by other roots
	// of the bundle (so that a peer trusting only an older root verifies
	// new leaves).
	Chain []*x509.Certificate

	// NextIssuer is an intermediate prepared to take over from Issuer,
	// signed by the active root; nil when none is prepared.
	NextIssuer *Authority

	// RetiringIssuers are former issuers whose leaves may still be valid.
	RetiringIssuers []RetiringIssuer
}

// ActiveRoot returns the root in state active.
func (s *AuthoritySet) ActiveRoot() (Root, bool) {
	for _, r := range s.Roots {
		if r.State == RootActive {
			return r, true
		}
	}
	return Root{}, false
}

// Clone returns a copy of s whose slices can be changed without changing
// s. Certificates and keys are shared: they are never modified.
func (s *AuthoritySet) Clone() *AuthoritySet {
	c := *s
	c.Roots = slices.Clone(s.Roots)
	c.Chain = slices.Clone(s.Chain)
	c.RetiringIssuers = slices.Clone(s.RetiringIssuers)
	return &c
}

// Bundle returns the set's trust bundle.
func (s *AuthoritySet) Bundle() *x509bundle.Bundle {
	b := x509bundle.New(s.TrustDomain)
	for _, r := range s.Roots {
		b.AddX509Authority(r.Cert)
	}
	return b
}

// Validate checks that the set can issue: the issuer is a CA certificate
// valid now, its key matches, and it chains through Chain to a root.
func (s *AuthoritySet) Validate(now time.Time) error {
	if s.TrustDomain.IsZero() {
		return errors.New("ca: authority set has no trust domain")
	}
	if len(s.Roots) == 0 {
		return errors.New("ca: authority set has no root")
	}
	if err := s.Issuer.validateIssuer(now); err != nil {
		return err
	}
	iss := s.Issuer.Cert
	var active []Root
	for _, r := range s.Roots {
		if !r.Cert.IsCA {
			return fmt.Errorf("ca: root %q is not a CA certificate", r.Cert.Subject)
		}
		switch r.State {
		case RootActive:
			active = append(active, r)
		case RootPrepared, RootRetiring:
		default:
			return fmt.Errorf("ca: root %q has unknown state %q", r.Cert.Subject, r.State)
		}
	}
	if len(active) != 1 {
		return fmt.Errorf("ca: authority set has %d active roots; want exactly one", len(active))
	}
	// The issuer chains to the active root itself: not to a prepared root
	// peers may not trust yet, nor to a retiring one about to leave.
	roots := x509.NewCertPool()
	roots.AddCert(active[0].Cert)
	inters := x509.NewCertPool()
	for _, c := range s.Chain {
		inters.AddCert(c)
	}
	if _, err := iss.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inters,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return fmt.Errorf("ca: issuer does not chain to the active root: %w", err)
	}
	if s.NextIssuer != nil {
		if s.NextIssuer.Signer == nil || s.NextIssuer.Cert.CheckSignatureFrom(active[0].Cert) != nil {
			return errors.New("ca: the prepared next issuer is not signed by the active root, or its key is missing")
		}
	}
	return nil
}

// validateIssuer checks that a is a CA certificate valid now whose key is
// held and matches.
func (a Authority) validateIssuer(now time.Time) error {
	if a.Cert == nil || a.Signer == nil {
		return errors.New("ca: authority set has no issuer certificate and key")
	}
	if !a.Cert.IsCA || a.Cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return errors.New("ca: issuer certificate is not a CA with keyCertSign")
	}
	if !publicKeysEqual(a.Cert.PublicKey, a.Signer.Public()) {
		return errors.New("ca: issuer key does not match the issuer certificate")
	}
	if now.Before(a.Cert.NotBefore) || !now.Before(a.Cert.NotAfter) {
		return fmt.Errorf("ca: issuer certificate is not valid now (valid %s to %s)", a.Cert.NotBefore.UTC().Format(time.RFC3339), a.Cert.NotAfter.UTC().Format(time.RFC3339))
	}
	return nil
}

// AuthorityOptions configure the authorities a CA creates for itself.
type AuthorityOptions struct {
	// TrustDomain the authorities are for. Required.
	TrustDomain spiffeid.TrustDomain

	// RootTTL is a new root's lifetime; zero means DefaultRootTTL.
	RootTTL time.Duration

	// IntermediateTTL is a new intermediate's lifetime; zero means
	// DefaultIntermediateTTL.
	IntermediateTTL time.Duration

	// Clock tells the time; nil means the real clock.
	Clock clock.PassiveClock
}

func (o AuthorityOptions) complete() AuthorityOptions {
	if o.RootTTL <= 0 {
		o.RootTTL = DefaultRootTTL
	}
	if o.IntermediateTTL <= 0 {
		o.IntermediateTTL = DefaultIntermediateTTL
	}
	if o.Clock == nil {
		o.Clock = clock.RealClock{}
	}
	return o
}

// NewSelfSigned creates a self-signed root and an intermediate under it,
// both with new P-256 keys.
func NewSelfSigned(opts AuthorityOptions) (*AuthoritySet, error) {
	opts = opts.complete()
	if opts.TrustDomain.IsZero() {
		return nil, errors.New("ca: a trust domain is required")
	}
	root, err := NewRoot(opts)
	if err != nil {
		return nil, err
	}
	issuer, err := NewIntermediate(opts, root)
	if err != nil {
		return nil, err
	}
	now := opts.Clock.Now()
	return &AuthoritySet{
		TrustDomain: opts.TrustDomain,
		Sequence:    1,
		Roots:       []Root{{Authority: root, State: RootActive, Since: now, BundleSequence: 1}},
		Issuer:      issuer,
		IssuerSince: now,
	}, nil
}

// NewRoot creates a self-signed root with a new P-256 key, valid for
// RootTTL. Its subject names its serial, so that two roots of one trust
// domain are told apart by every verifier.
func NewRoot(opts AuthorityOptions) (Authority, error) {
	opts = opts.complete()
	if opts.TrustDomain.IsZero() {
		return Authority{}, errors.New("ca: a trust domain is required")
	}
	now := opts.Clock.Now()
	return newCA(opts, "root", now, now.Add(opts.RootTTL), nil)
}

// NewIntermediate creates an intermediate with a new P-256 key signed by
// parent, valid for IntermediateTTL or until parent expires, whichever is
// sooner.
func NewIntermediate(opts AuthorityOptions, parent Authority) (Authority, error) {
	opts = opts.complete()
	if parent.Signer == nil {
		return Authority{}, fmt.Errorf("ca: the key of %q is not held here; it cannot sign an intermediate", parent.Cert.Subject)
	}
	now := opts.Clock.Now()
	notAfter := now.Add(opts.IntermediateTTL)
	if parent.Cert.NotAfter.Before(notAfter) {
		notAfter = parent.Cert.NotAfter
	}
	return newCA(opts, "intermediate", now, notAfter, &parent)
}

// newCA creates a CA certificate with a new P-256 key, valid from now
// (backdated) until notAfter, signed by parent or, when parent is nil,
// self-signed. Its subject names its kind and serial, so that two CAs of
// one trust domain are told apart by every verifier. An intermediate may
// sign only leaves.
func newCA(opts AuthorityOptions, kind string, now, notAfter time.Time, parent *Authority) (Authority, error) {
	key, err := newCAKey()
	if err != nil {
		return Authority{}, err
	}
	serial, err := newSerial()
	if err != nil {
		return Authority{}, err
	}
	name := fmt.Sprintf("meshca %s %s %x", kind, opts.TrustDomain.Name(), serial.Bytes()[:4])
	tmpl := caTemplate(opts.TrustDomain, name, serial, now.Add(-backdate(notAfter.Sub(now))), notAfter, parent != nil)
	issuerCert, signer := tmpl, crypto.Signer(key)
	if parent != nil {
		issuerCert, signer = parent.Cert, parent.Signer
	}
	cert, err := createCertificate(tmpl, issuerCert, key.Public(), signer)
	if err != nil {
		return Authority{}, err
	}
	return Authority{Cert: cert, Signer: key}, nil
}

// CrossSign returns a copy of the CA certificate cert (same subject, key
// and key ID) signed by parent instead, valid no longer than parent. A
// leaf under cert then verifies under either parent's root.
func CrossSign(cert *x509.Certificate, parent Authority) (*x509.Certificate, error) {
	if parent.Signer == nil {
		return nil, fmt.Errorf("ca: the key of %q is not held here; it cannot cross-sign", parent.Cert.Subject)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               cert.Subject,
		NotBefore:             cert.NotBefore,
		NotAfter:              cert.NotAfter,
		URIs:                  cert.URIs,
		KeyUsage:              cert.KeyUsage,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            cert.MaxPathLen,
		MaxPathLenZero:        cert.MaxPathLenZero,
		SubjectKeyId:          cert.SubjectKeyId,
	}
	if parent.Cert.NotAfter.Before(tmpl.NotAfter) {
		tmpl.NotAfter = parent.Cert.NotAfter
	}
	return createCertificate(tmpl, parent.Cert, cert.PublicKey, parent.Signer)
}

func newCAKey() (*ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ca: generating key: %w", err)
	}
	return key, nil
}

func createCertificate(tmpl, parent *x509.Certificate, pub any, signer crypto.Signer) (*x509.Certificate, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		return nil, fmt.Errorf("ca: signing certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("ca: parsing the certificate just signed: %w", err)
	}
	return cert, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	ak, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ak.Equal(b)
}

// sameCerts reports whether a and b hold the same certificates in order.
func sameCerts(a, b []Root) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !bytes.Equal(a[i].Cert.Raw, b[i].Cert.Raw) {
			return false
		}
	}
	return true
}
