// Package testca makes certificates for meshca's tests: roots,
// intermediates, SVIDs and CSRs, in one call each. Every function takes a
// testing.TB and fails the test on error, so a test reads as what it
// needs:
//
//	root := testca.New(t, td)
//	inter := root.ChildCA()
//	svid := inter.CreateX509SVID(spiffeid.RequireFromPath(td, "/ns/a/sa/b"))
//	_, _, err := x509svid.Verify(svid.Certificates, root.Bundle())
//
// Keys are P-256 unless a test asks otherwise. testca is for tests only.
package testca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshca/meshca/ca"
)

// CA is a test certificate authority: a root, or an intermediate with its
// parents.
type CA struct {
	tb     testing.TB
	td     spiffeid.TrustDomain
	parent *CA
	Cert   *x509.Certificate
	Key    crypto.Signer
}

// Option changes a certificate testca creates.
type Option func(*x509.Certificate, *options)

type options struct {
	key crypto.Signer
}

// WithLifetime sets the certificate's validity.
func WithLifetime(notBefore, notAfter time.Time) Option {
	return func(c *x509.Certificate, _ *options) {
		c.NotBefore, c.NotAfter = notBefore, notAfter
	}
}

// WithKey makes the certificate for key instead of a new P-256 key.
func WithKey(key crypto.Signer) Option {
	return func(_ *x509.Certificate, o *options) { o.key = key }
}

// WithDNSNames adds DNS SANs.
func WithDNSNames(names ...string) Option {
	return func(c *x509.Certificate, _ *options) { c.DNSNames = names }
}

// New returns a self-signed root CA for td, valid from an hour ago for a
// day unless WithLifetime says otherwise.
func New(tb testing.TB, td spiffeid.TrustDomain, opts ...Option) *CA {
	tb.Helper()
	tmpl := caTemplate(td, "testca root")
	key := apply(tb, tmpl, opts)
	return &CA{tb: tb, td: td, Cert: create(tb, tmpl, tmpl, key.Public(), key), Key: key}
}

// ChildCA returns an intermediate CA signed by c.
func (c *CA) ChildCA(opts ...Option) *CA {
	c.tb.Helper()
	tmpl := caTemplate(c.td, fmt.Sprintf("testca intermediate %d", len(c.chain())+1))
	key := apply(c.tb, tmpl, opts)
	return &CA{tb: c.tb, td: c.td, parent: c, Cert: create(c.tb, tmpl, c.Cert, key.Public(), c.Key), Key: key}
}

// CreateX509SVID returns an X509-SVID for id signed by c. Its chain holds
// the leaf and c's intermediates up to (not including) the root.
func (c *CA) CreateX509SVID(id spiffeid.ID, opts ...Option) *x509svid.SVID {
	c.tb.Helper()
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(c.tb),
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(time.Hour),
		URIs:                  []*url.URL{id.URL()},
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	key := apply(c.tb, tmpl, opts)
	leaf := create(c.tb, tmpl, c.Cert, key.Public(), c.Key)
	return &x509svid.SVID{ID: id, Certificates: append([]*x509.Certificate{leaf}, c.chain()...), PrivateKey: key}
}

// chain returns c and its parents, excluding the root.
func (c *CA) chain() []*x509.Certificate {
	var out []*x509.Certificate
	for ca := c; ca.parent != nil; ca = ca.parent {
		out = append(out, ca.Cert)
	}
	return out
}

// Root returns the root at the top of c.
func (c *CA) Root() *CA {
	r := c
	for r.parent != nil {
		r = r.parent
	}
	return r
}

// Bundle returns the trust bundle holding c's root.
func (c *CA) Bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(c.td, []*x509.Certificate{c.Root().Cert})
}

// AuthoritySet returns a meshca authority set that signs with c and trusts
// c's root. c must not be a root.
func (c *CA) AuthoritySet() *ca.AuthoritySet {
	c.tb.Helper()
	if c.parent == nil {
		c.tb.Fatal("testca: AuthoritySet needs an intermediate; call ChildCA first")
	}
	root := c.Root()
	chain := c.chain()
	return &ca.AuthoritySet{
		TrustDomain: c.td,
		Sequence:    1,
		Roots:       []ca.Root{{Authority: ca.Authority{Cert: root.Cert, Signer: root.Key}, State: ca.RootActive}},
		Issuer:      ca.Authority{Cert: c.Cert, Signer: c.Key},
		Chain:       chain[1:],
	}
}

// NewKey returns a new P-256 key.
func NewKey(tb testing.TB) crypto.Signer {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	return key
}

// CreateCSR returns a DER CSR signed by key whose URI SANs are uris.
func CreateCSR(tb testing.TB, key crypto.Signer, uris ...string) []byte {
	tb.Helper()
	tmpl := &x509.CertificateRequest{}
	for _, u := range uris {
		parsed, err := url.Parse(u)
		if err != nil {
			tb.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, parsed)
	}
	return SignCSR(tb, tmpl, key)
}

// SignCSR returns tmpl signed by key, DER.
func SignCSR(tb testing.TB, tmpl *x509.CertificateRequest, key crypto.Signer) []byte {
	tb.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		tb.Fatal(err)
	}
	return der
}

// caTemplate returns a CA template; every CA gets its own subject, as
// verifiers such as openssl tell a self-signed certificate by its subject.
func caTemplate(td spiffeid.TrustDomain, name string) *x509.Certificate {
	now := time.Now()
	return &x509.Certificate{
		Subject:               pkix.Name{Organization: []string{"testca"}, CommonName: name},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		URIs:                  []*url.URL{td.ID().URL()},
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
}

func apply(tb testing.TB, tmpl *x509.Certificate, opts []Option) crypto.Signer {
	tb.Helper()
	tmpl.SerialNumber = serial(tb)
	var o options
	for _, opt := range opts {
		opt(tmpl, &o)
	}
	if o.key == nil {
		o.key = NewKey(tb)
	}
	return o.key
}

func create(tb testing.TB, tmpl, parent *x509.Certificate, pub any, signer crypto.Signer) *x509.Certificate {
	tb.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		tb.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	return cert
}

func serial(tb testing.TB) *big.Int {
	tb.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		tb.Fatal(err)
	}
	return n.Add(n, big.NewInt(1))
}
