package ca

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ErrNotFound is returned by a Store that holds no authority set yet.
var ErrNotFound = errors.New("ca: no stored authority set")

// Store keeps the authority set, keys included. Implementations write
// atomically: a crash leaves the old set or the new one.
type Store interface {
	Load(ctx context.Context) (*AuthoritySet, error)
	Save(ctx context.Context, set *AuthoritySet) error
}

// stateVersion is the version of the stored encoding.
const stateVersion = 1

type storedSet struct {
	Version     int               `json:"version"`
	TrustDomain string            `json:"trustDomain"`
	Sequence    uint64            `json:"sequence"`
	Roots       []storedAuthority `json:"roots"`
	Issuer      storedAuthority   `json:"issuer"`
	Chain       []string          `json:"chain,omitempty"`
}

type storedAuthority struct {
	Certificate string `json:"certificate"`
	PrivateKey  string `json:"privateKey,omitempty"`
}

// MarshalAuthoritySet encodes set, private keys included, for a Store.
// The result is a secret.
func MarshalAuthoritySet(set *AuthoritySet) ([]byte, error) {
	st := storedSet{
		Version:     stateVersion,
		TrustDomain: set.TrustDomain.Name(),
		Sequence:    set.Sequence,
	}
	for _, r := range set.Roots {
		a, err := marshalAuthority(r)
		if err != nil {
			return nil, err
		}
		st.Roots = append(st.Roots, a)
	}
	iss, err := marshalAuthority(set.Issuer)
	if err != nil {
		return nil, err
	}
	st.Issuer = iss
	for _, c := range set.Chain {
		st.Chain = append(st.Chain, string(certPEM(c)))
	}
	return json.MarshalIndent(st, "", "  ")
}

// UnmarshalAuthoritySet decodes what MarshalAuthoritySet encoded.
func UnmarshalAuthoritySet(data []byte) (*AuthoritySet, error) {
	var st storedSet
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, fmt.Errorf("ca: decoding stored authority set: %w", err)
	}
	if st.Version != stateVersion {
		return nil, fmt.Errorf("ca: stored authority set has version %d; this build reads version %d", st.Version, stateVersion)
	}
	td, err := spiffeid.TrustDomainFromString(st.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("ca: stored authority set: %w", err)
	}
	set := &AuthoritySet{TrustDomain: td, Sequence: st.Sequence}
	for i, r := range st.Roots {
		a, err := unmarshalAuthority(r)
		if err != nil {
			return nil, fmt.Errorf("ca: stored root %d: %w", i, err)
		}
		set.Roots = append(set.Roots, a)
	}
	if set.Issuer, err = unmarshalAuthority(st.Issuer); err != nil {
		return nil, fmt.Errorf("ca: stored issuer: %w", err)
	}
	for i, c := range st.Chain {
		cert, err := parseCertPEM([]byte(c))
		if err != nil {
			return nil, fmt.Errorf("ca: stored chain %d: %w", i, err)
		}
		set.Chain = append(set.Chain, cert)
	}
	return set, nil
}

func marshalAuthority(a Authority) (storedAuthority, error) {
	out := storedAuthority{Certificate: string(certPEM(a.Cert))}
	if a.Signer != nil {
		der, err := x509.MarshalPKCS8PrivateKey(a.Signer)
		if err != nil {
			return storedAuthority{}, fmt.Errorf("ca: encoding key of %q: %w", a.Cert.Subject, err)
		}
		out.PrivateKey = string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
	}
	return out, nil
}

func unmarshalAuthority(s storedAuthority) (Authority, error) {
	cert, err := parseCertPEM([]byte(s.Certificate))
	if err != nil {
		return Authority{}, err
	}
	a := Authority{Cert: cert}
	if s.PrivateKey != "" {
		if a.Signer, err = parseKeyPEM([]byte(s.PrivateKey)); err != nil {
			return Authority{}, err
		}
	}
	return a, nil
}

func certPEM(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

func parseCertPEM(data []byte) (*x509.Certificate, error) {
	certs, err := parseCertsPEM(data)
	if err != nil {
		return nil, err
	}
	if len(certs) != 1 {
		return nil, fmt.Errorf("want one certificate, found %d", len(certs))
	}
	return certs[0], nil
}

// parseCertsPEM parses every CERTIFICATE block of data and refuses any
// other content.
func parseCertsPEM(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("PEM block %q where a CERTIFICATE was expected", block.Type)
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		certs = append(certs, cert)
	}
	if len(certs) == 0 {
		return nil, errors.New("no PEM certificate found")
	}
	return certs, nil
}

// parseKeyPEM parses one private key: PKCS#8, SEC 1 (EC) or PKCS#1 (RSA).
// Errors never include the key's bytes.
func parseKeyPEM(data []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM private key found")
	}
	var key any
	var err error
	switch block.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("PEM block %q is not a private key", block.Type)
	}
	if err != nil {
		return nil, errors.New("private key does not parse")
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("private key of type %T cannot sign", key)
	}
	return signer, nil
}

// LoadOrCreate loads the authority set from store, or, when the store has
// none, creates a self-signed one and saves it before returning. When the
// stored issuer nears its end (less than a third of IntermediateTTL left)
// and the root's key is held, it is replaced by a new intermediate under
// the same root, saved first; the bundle does not change. A root near its
// own end is not renewed here: that is a root rotation.
func LoadOrCreate(ctx context.Context, store Store, opts AuthorityOptions) (*AuthoritySet, error) {
	opts = opts.complete()
	set, err := store.Load(ctx)
	switch {
	case errors.Is(err, ErrNotFound):
		set, err = NewSelfSigned(opts)
		if err != nil {
			return nil, err
		}
		if err := store.Save(ctx, set); err != nil {
			return nil, err
		}
		return set, nil
	case err != nil:
		return nil, err
	}
	if set.TrustDomain != opts.TrustDomain {
		return nil, fmt.Errorf("ca: stored authorities are for trust domain %q, configured is %q; a trust domain cannot be renamed in place", set.TrustDomain, opts.TrustDomain)
	}
	now := opts.Clock.Now()
	if set.Issuer.Cert != nil && set.Issuer.Cert.NotAfter.Sub(now) < opts.IntermediateTTL/3 {
		root, ok := set.issuerRoot()
		// A new intermediate ends with its root at the latest: when the
		// root itself is ending, another one would gain nothing.
		if ok && root.Signer != nil && root.Cert.NotAfter.After(set.Issuer.Cert.NotAfter) {
			issuer, err := newIntermediate(opts, root)
			if err != nil {
				return nil, err
			}
			next := *set
			next.Issuer, next.Chain = issuer, nil
			if err := store.Save(ctx, &next); err != nil {
				return nil, err
			}
			set = &next
		}
	}
	if err := set.Validate(now); err != nil {
		return nil, err
	}
	return set, nil
}

// issuerRoot returns the root that signed the issuer directly.
func (s *AuthoritySet) issuerRoot() (Authority, bool) {
	if len(s.Chain) > 0 {
		return Authority{}, false
	}
	for _, r := range s.Roots {
		if s.Issuer.Cert.CheckSignatureFrom(r.Cert) == nil {
			return r, true
		}
	}
	return Authority{}, false
}
