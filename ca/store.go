package ca

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/internal/pemutil"
)

// ErrNotFound is returned by a Store that holds no authority set yet.
var ErrNotFound = errors.New("ca: no stored authority set")

// ErrConflict is wrapped by a Store's Save when the stored set changed
// after the Store last read or wrote it: another replica saved first.
// Nothing was written; the caller loads again and decides again.
var ErrConflict = errors.New("ca: the stored authority set changed since it was read; reload")

// Store keeps the authority set, keys included. Implementations write
// atomically: a crash leaves the old set or the new one.
type Store interface {
	Load(ctx context.Context) (*AuthoritySet, error)
	Save(ctx context.Context, set *AuthoritySet) error
}

// stateVersion is the version of the stored encoding.
const stateVersion = 1

type storedSet struct {
	Version         int                    `json:"version"`
	TrustDomain     string                 `json:"trustDomain"`
	Sequence        uint64                 `json:"sequence"`
	Roots           []storedRoot           `json:"roots"`
	Issuer          storedAuthority        `json:"issuer"`
	IssuerSince     time.Time              `json:"issuerSince"`
	Chain           []string               `json:"chain,omitempty"`
	NextIssuer      *storedAuthority       `json:"nextIssuer,omitempty"`
	RetiringIssuers []storedRetiringIssuer `json:"retiringIssuers,omitempty"`
}

type storedAuthority struct {
	Certificate string `json:"certificate"`
	PrivateKey  string `json:"privateKey,omitempty"`
}

type storedRoot struct {
	storedAuthority
	State          RootState `json:"state"`
	Since          time.Time `json:"since"`
	BundleSequence uint64    `json:"bundleSequence"`
}

type storedRetiringIssuer struct {
	Certificate string    `json:"certificate"`
	LeavesUntil time.Time `json:"leavesUntil"`
}

// MarshalAuthoritySet encodes set, private keys included, for a Store.
// The result is a secret.
func MarshalAuthoritySet(set *AuthoritySet) ([]byte, error) {
	st := storedSet{
		Version:     stateVersion,
		TrustDomain: set.TrustDomain.Name(),
		Sequence:    set.Sequence,
		IssuerSince: set.IssuerSince,
	}
	for _, r := range set.Roots {
		a, err := marshalAuthority(r.Authority)
		if err != nil {
			return nil, err
		}
		st.Roots = append(st.Roots, storedRoot{storedAuthority: a, State: r.State, Since: r.Since, BundleSequence: r.BundleSequence})
	}
	iss, err := marshalAuthority(set.Issuer)
	if err != nil {
		return nil, err
	}
	st.Issuer = iss
	for _, c := range set.Chain {
		st.Chain = append(st.Chain, string(certPEM(c)))
	}
	if set.NextIssuer != nil {
		next, err := marshalAuthority(*set.NextIssuer)
		if err != nil {
			return nil, err
		}
		st.NextIssuer = &next
	}
	for _, r := range set.RetiringIssuers {
		st.RetiringIssuers = append(st.RetiringIssuers, storedRetiringIssuer{Certificate: string(certPEM(r.Cert)), LeavesUntil: r.LeavesUntil})
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
	set := &AuthoritySet{TrustDomain: td, Sequence: st.Sequence, IssuerSince: st.IssuerSince}
	for i, r := range st.Roots {
		a, err := unmarshalAuthority(r.storedAuthority)
		if err != nil {
			return nil, fmt.Errorf("ca: stored root %d: %w", i, err)
		}
		root := Root{Authority: a, State: r.State, Since: r.Since, BundleSequence: r.BundleSequence}
		if root.State == "" && len(st.Roots) == 1 {
			// Written before roots had states: the one root was active.
			root.State, root.BundleSequence = RootActive, 1
		}
		set.Roots = append(set.Roots, root)
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
	if st.NextIssuer != nil {
		next, err := unmarshalAuthority(*st.NextIssuer)
		if err != nil {
			return nil, fmt.Errorf("ca: stored next issuer: %w", err)
		}
		set.NextIssuer = &next
	}
	for i, r := range st.RetiringIssuers {
		cert, err := parseCertPEM([]byte(r.Certificate))
		if err != nil {
			return nil, fmt.Errorf("ca: stored retiring issuer %d: %w", i, err)
		}
		set.RetiringIssuers = append(set.RetiringIssuers, RetiringIssuer{Cert: cert, LeavesUntil: r.LeavesUntil})
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

func certPEM(c *x509.Certificate) []byte { return pemutil.EncodeCertificates(c) }

func parseCertPEM(data []byte) (*x509.Certificate, error) {
	certs, err := pemutil.ParseCertificates(data)
	if err != nil {
		return nil, err
	}
	if len(certs) != 1 {
		return nil, fmt.Errorf("want one certificate, found %d", len(certs))
	}
	return certs[0], nil
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
// none, creates a self-signed one and saves it before returning.
//
// Rotating authorities ahead of time is the rotation package's job. One
// repair is made here, because a CA cannot start without it: an issuer
// that has expired (the server was down longer than its life) is replaced
// by a new intermediate under the active root, when that root's key is
// held and the root is valid; the new set is saved first.
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
	if root, ok := set.ActiveRoot(); ok && set.Issuer.Cert != nil && !now.Before(set.Issuer.Cert.NotAfter) &&
		root.Signer != nil && now.Before(root.Cert.NotAfter) {
		// A prepared successor still valid takes over; else a new one is
		// made. The chain (copies of the active root cross-signed by
		// retiring roots) stays: it does not depend on the issuer.
		var issuer Authority
		if set.NextIssuer != nil && set.NextIssuer.validateIssuer(now) == nil {
			issuer = *set.NextIssuer
		} else if issuer, err = NewIntermediate(opts, root.Authority); err != nil {
			return nil, err
		}
		next := set.Clone()
		next.Issuer, next.IssuerSince, next.NextIssuer = issuer, now, nil
		if err := store.Save(ctx, next); err != nil {
			return nil, err
		}
		set = next
	}
	if err := set.Validate(now); err != nil {
		return nil, err
	}
	return set, nil
}
