package ca

import (
	"bytes"
	"crypto/x509"
	"fmt"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/internal/securefile"
)

// Files names an operator's CA plugged in as files, laid out as Istio's
// cacerts secret so an existing one can be reused unchanged.
type Files struct {
	// RootCert holds the trust bundle's roots (root-cert.pem).
	RootCert string

	// CACert is the issuing intermediate (ca-cert.pem).
	CACert string

	// CAKey is CACert's private key (ca-key.pem). It must be mode 0600 or
	// stricter.
	CAKey string

	// CertChain is CACert and the intermediates above it, optionally ending
	// with the root (cert-chain.pem). Empty means the root signed CACert.
	CertChain string
}

// LoadFiles reads and validates a plugged-in CA. Roots are kept without
// their keys: this process only ever signs with the intermediate. The
// set's Sequence is 1; a caller that reloads changed files into a running
// CA sets a higher one.
func LoadFiles(td spiffeid.TrustDomain, f Files, now time.Time) (*AuthoritySet, error) {
	rootsPEM, err := os.ReadFile(f.RootCert)
	if err != nil {
		return nil, fmt.Errorf("ca: reading root certificate: %w", err)
	}
	roots, err := pemutil.ParseCertificates(rootsPEM)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", f.RootCert, err)
	}
	issuerPEM, err := os.ReadFile(f.CACert)
	if err != nil {
		return nil, fmt.Errorf("ca: reading CA certificate: %w", err)
	}
	issuer, err := parseCertPEM(issuerPEM)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", f.CACert, err)
	}
	keyPEM, err := securefile.ReadPrivate(f.CAKey)
	if err != nil {
		return nil, fmt.Errorf("ca: reading CA key: %w", err)
	}
	key, err := parseKeyPEM(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", f.CAKey, err)
	}
	set := &AuthoritySet{
		TrustDomain: td,
		Sequence:    1,
		Issuer:      Authority{Cert: issuer, Signer: key},
		IssuerSince: now,
	}
	for _, r := range roots {
		set.Roots = append(set.Roots, Root{Authority: Authority{Cert: r}, State: RootRetiring, Since: now, BundleSequence: 1})
	}
	if f.CertChain != "" {
		chainPEM, err := os.ReadFile(f.CertChain)
		if err != nil {
			return nil, fmt.Errorf("ca: reading certificate chain: %w", err)
		}
		chain, err := pemutil.ParseCertificates(chainPEM)
		if err != nil {
			return nil, fmt.Errorf("ca: %s: %w", f.CertChain, err)
		}
		for _, c := range chain {
			if bytes.Equal(c.Raw, issuer.Raw) || isRoot(c, roots) {
				continue
			}
			set.Chain = append(set.Chain, c)
		}
	}
	// The root the issuer chains to is active; any other root of the file
	// stays in the bundle as retiring (one on its way out, or in).
	inters := x509.NewCertPool()
	for _, c := range set.Chain {
		inters.AddCert(c)
	}
	var verifyErr error
	for i, r := range set.Roots {
		pool := x509.NewCertPool()
		pool.AddCert(r.Cert)
		if _, verifyErr = issuer.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inters, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); verifyErr == nil {
			set.Roots[i].State = RootActive
			break
		}
	}
	if verifyErr != nil {
		// Say why precisely when the issuer itself is wrong (not valid now,
		// a key that does not match); else the chain is.
		if err := set.Issuer.validateIssuer(now); err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("ca: issuer does not chain to a root of the bundle: %w", verifyErr)
	}
	if err := set.Validate(now); err != nil {
		return nil, err
	}
	return set, nil
}

func isRoot(c *x509.Certificate, roots []*x509.Certificate) bool {
	for _, r := range roots {
		if bytes.Equal(c.Raw, r.Raw) {
			return true
		}
	}
	return false
}
