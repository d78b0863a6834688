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

// AuthoritySet is the CA's authorities: the roots of the trust bundle and
// the intermediate that signs workload certificates.
type AuthoritySet struct {
	TrustDomain spiffeid.TrustDomain

	// Sequence increases with every change of the trust bundle (Roots).
	Sequence uint64

	// Roots are the X.509 authorities of the trust bundle.
	Roots []Authority

	// Issuer signs workload certificates. Its key is always held.
	Issuer Authority

	// Chain holds the certificates between Issuer and a root, Issuer's
	// parent first; empty when a root signed Issuer.
	Chain []*x509.Certificate
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
	if s.Issuer.Cert == nil || s.Issuer.Signer == nil {
		return errors.New("ca: authority set has no issuer certificate and key")
	}
	iss := s.Issuer.Cert
	if !iss.IsCA || iss.KeyUsage&x509.KeyUsageCertSign == 0 {
		return errors.New("ca: issuer certificate is not a CA with keyCertSign")
	}
	if !publicKeysEqual(iss.PublicKey, s.Issuer.Signer.Public()) {
		return errors.New("ca: issuer key does not match the issuer certificate")
	}
	if now.Before(iss.NotBefore) || !now.Before(iss.NotAfter) {
		return fmt.Errorf("ca: issuer certificate is not valid now (valid %s to %s)", iss.NotBefore.UTC().Format(time.RFC3339), iss.NotAfter.UTC().Format(time.RFC3339))
	}
	roots := x509.NewCertPool()
	for _, r := range s.Roots {
		if !r.Cert.IsCA {
			return fmt.Errorf("ca: root %q is not a CA certificate", r.Cert.Subject)
		}
		roots.AddCert(r.Cert)
	}
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
		return fmt.Errorf("ca: issuer does not chain to a root of the bundle: %w", err)
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
	now := opts.Clock.Now()
	rootKey, err := newCAKey()
	if err != nil {
		return nil, err
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	tmpl := caTemplate(opts.TrustDomain, "meshca root "+opts.TrustDomain.Name(), serial, now.Add(-Backdate), now.Add(opts.RootTTL), false)
	rootCert, err := createCertificate(tmpl, tmpl, rootKey.Public(), rootKey)
	if err != nil {
		return nil, err
	}
	root := Authority{Cert: rootCert, Signer: rootKey}
	issuer, err := newIntermediate(opts, root)
	if err != nil {
		return nil, err
	}
	return &AuthoritySet{
		TrustDomain: opts.TrustDomain,
		Sequence:    1,
		Roots:       []Authority{root},
		Issuer:      issuer,
	}, nil
}

// newIntermediate creates an intermediate signed by parent, valid for
// IntermediateTTL or until parent expires, whichever is sooner.
func newIntermediate(opts AuthorityOptions, parent Authority) (Authority, error) {
	now := opts.Clock.Now()
	key, err := newCAKey()
	if err != nil {
		return Authority{}, err
	}
	serial, err := newSerial()
	if err != nil {
		return Authority{}, err
	}
	notAfter := now.Add(opts.IntermediateTTL)
	if parent.Cert.NotAfter.Before(notAfter) {
		notAfter = parent.Cert.NotAfter
	}
	tmpl := caTemplate(opts.TrustDomain, "meshca intermediate "+opts.TrustDomain.Name(), serial, now.Add(-Backdate), notAfter, true)
	cert, err := createCertificate(tmpl, parent.Cert, key.Public(), parent.Signer)
	if err != nil {
		return Authority{}, err
	}
	return Authority{Cert: cert, Signer: key}, nil
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
func sameCerts(a, b []Authority) bool {
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
