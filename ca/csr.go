package ca

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// MaxCSRSize is the default largest CSR accepted, DER or PEM. A P-256 CSR
// is about 300 bytes, an RSA-4096 one under 2 KiB.
const MaxCSRSize = 16 << 10

// Key size bounds for RSA leaf keys: under the minimum is weak; over the
// maximum costs the CA too much to verify.
const (
	MinRSABits = 2048
	MaxRSABits = 8192
)

// CSRReason says what was wrong with a CSR. The values are stable: they are
// used as metric labels and in audit lines.
type CSRReason string

// The reasons a CSR is refused.
const (
	ReasonTooLarge     CSRReason = "too_large"
	ReasonMalformed    CSRReason = "malformed"
	ReasonSignature    CSRReason = "bad_signature"
	ReasonKey          CSRReason = "unsupported_key"
	ReasonURISAN       CSRReason = "bad_uri_san"
	ReasonTrustDomain  CSRReason = "wrong_trust_domain"
	ReasonForbiddenSAN CSRReason = "forbidden_san"
	ReasonCARequest    CSRReason = "ca_request"
)

// CSRError is a CSR refused for a reason that is the caller's to fix.
type CSRError struct {
	Reason CSRReason
	msg    string
	err    error
}

func (e *CSRError) Error() string {
	if e.err != nil {
		return "ca: " + e.msg + ": " + e.err.Error()
	}
	return "ca: " + e.msg
}

func (e *CSRError) Unwrap() error { return e.err }

func csrErrorf(reason CSRReason, err error, format string, args ...any) *CSRError {
	return &CSRError{Reason: reason, msg: fmt.Sprintf(format, args...), err: err}
}

// CSRPolicy bounds what ParseCSR accepts. The zero value is the default.
// Whatever the policy, a CSR carries exactly one URI SAN, its SPIFFE ID,
// and nothing else.
type CSRPolicy struct {
	// MaxSize is the largest CSR accepted; zero means MaxCSRSize.
	MaxSize int
}

// CSR is a parsed, verified certificate signing request.
type CSR struct {
	// ID is the SPIFFE ID the CSR asks for: its only URI SAN.
	ID spiffeid.ID

	// PublicKey is the requester's key, of a supported type and size.
	PublicKey any

	// Raw is the parsed request.
	Raw *x509.CertificateRequest
}

var (
	oidExtBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}
	oidExtKeyUsage         = asn1.ObjectIdentifier{2, 5, 29, 15}
)

// ParseCSR parses a PKCS#10 request (DER, or a single PEM block of type
// CERTIFICATE REQUEST), checks its signature, its key and its SANs against
// the X509-SVID profile and td, and returns it. Every refusal is a
// *CSRError.
func ParseCSR(raw []byte, td spiffeid.TrustDomain, policy CSRPolicy) (*CSR, error) {
	maxSize := policy.MaxSize
	if maxSize <= 0 {
		maxSize = MaxCSRSize
	}
	if len(raw) > maxSize {
		return nil, csrErrorf(ReasonTooLarge, nil, "CSR is %d bytes, more than the limit of %d", len(raw), maxSize)
	}
	if len(raw) == 0 {
		return nil, csrErrorf(ReasonMalformed, nil, "CSR is empty")
	}
	der, err := csrDER(raw)
	if err != nil {
		return nil, err
	}
	req, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, csrErrorf(ReasonMalformed, err, "CSR is not a PKCS#10 request")
	}
	// The key is checked before the signature, so that an oversized RSA key
	// costs nothing to refuse.
	if err := checkKey(req.PublicKey); err != nil {
		return nil, err
	}
	if err := req.CheckSignature(); err != nil {
		return nil, csrErrorf(ReasonSignature, err, "CSR signature does not verify")
	}
	if err := checkCARequest(req); err != nil {
		return nil, err
	}
	id, err := csrID(req, td)
	if err != nil {
		return nil, err
	}
	// A DNS SAN a front end needs (Linkerd's identity name) is derived from
	// the credential and checked by that front end, never copied from here.
	if len(req.DNSNames) > 0 || len(req.IPAddresses) > 0 || len(req.EmailAddresses) > 0 {
		return nil, csrErrorf(ReasonForbiddenSAN, nil, "CSR asks for DNS, IP or email SANs; an X509-SVID request carries only its SPIFFE ID")
	}
	return &CSR{ID: id, PublicKey: req.PublicKey, Raw: req}, nil
}

func csrDER(raw []byte) ([]byte, error) {
	if !bytes.HasPrefix(bytes.TrimSpace(raw), []byte("-----BEGIN")) {
		return raw, nil
	}
	block, rest := pem.Decode(raw)
	if block == nil {
		return nil, csrErrorf(ReasonMalformed, nil, "CSR is not valid PEM")
	}
	if block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
		return nil, csrErrorf(ReasonMalformed, nil, "PEM block is %q, want \"CERTIFICATE REQUEST\"", block.Type)
	}
	if len(bytes.TrimSpace(rest)) > 0 {
		return nil, csrErrorf(ReasonMalformed, nil, "CSR PEM has data after the first block")
	}
	return block.Bytes, nil
}

// checkKey accepts ECDSA P-256 and P-384, and RSA of MinRSABits to
// MaxRSABits.
func checkKey(pub any) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256(), elliptic.P384():
			return nil
		}
		return csrErrorf(ReasonKey, nil, "ECDSA curve %s is not supported; use P-256 or P-384", k.Curve.Params().Name)
	case *rsa.PublicKey:
		if bits := k.N.BitLen(); bits < MinRSABits || bits > MaxRSABits {
			return csrErrorf(ReasonKey, nil, "RSA key of %d bits is not supported; use %d to %d bits", bits, MinRSABits, MaxRSABits)
		}
		return nil
	case nil:
		return csrErrorf(ReasonKey, nil, "CSR key algorithm is unknown; use ECDSA P-256, P-384 or RSA")
	}
	return csrErrorf(ReasonKey, nil, "CSR key type %T is not supported; use ECDSA P-256, P-384 or RSA", pub)
}

// checkCARequest refuses a request whose extensions ask to be a CA: we
// would never copy them, but a workload asking for them is either broken or
// hostile, and saying so is better than issuing something else.
func checkCARequest(req *x509.CertificateRequest) error {
	for _, ext := range req.Extensions {
		switch {
		case ext.Id.Equal(oidExtBasicConstraints):
			var bc struct {
				IsCA       bool `asn1:"optional"`
				MaxPathLen int  `asn1:"optional,default:-1"`
			}
			rest, err := asn1.Unmarshal(ext.Value, &bc)
			if err != nil || len(rest) > 0 {
				return csrErrorf(ReasonMalformed, err, "CSR has a malformed basicConstraints extension")
			}
			if bc.IsCA {
				return csrErrorf(ReasonCARequest, nil, "CSR asks for CA=true; workload certificates are never CAs")
			}
		case ext.Id.Equal(oidExtKeyUsage):
			var bits asn1.BitString
			rest, err := asn1.Unmarshal(ext.Value, &bits)
			if err != nil || len(rest) > 0 {
				return csrErrorf(ReasonMalformed, err, "CSR has a malformed keyUsage extension")
			}
			// keyCertSign is bit 5, cRLSign bit 6 (RFC 5280 4.2.1.3).
			if bits.At(5) == 1 || bits.At(6) == 1 {
				return csrErrorf(ReasonCARequest, nil, "CSR asks for keyCertSign or cRLSign; workload certificates never sign certificates")
			}
		}
	}
	return nil
}

func csrID(req *x509.CertificateRequest, td spiffeid.TrustDomain) (spiffeid.ID, error) {
	switch n := len(req.URIs); {
	case n == 0:
		return spiffeid.ID{}, csrErrorf(ReasonURISAN, nil, "CSR has no URI SAN; put the SPIFFE ID in exactly one")
	case n > 1:
		return spiffeid.ID{}, csrErrorf(ReasonURISAN, nil, "CSR has %d URI SANs; an X509-SVID has exactly one", n)
	}
	id, err := spiffeid.FromURI(req.URIs[0])
	if err != nil {
		return spiffeid.ID{}, csrErrorf(ReasonURISAN, err, "CSR URI SAN is not a SPIFFE ID")
	}
	if id.Path() == "" {
		return spiffeid.ID{}, csrErrorf(ReasonURISAN, nil, "CSR asks for %q, the trust domain itself; a workload ID has a path", id)
	}
	if id.TrustDomain() != td {
		return spiffeid.ID{}, csrErrorf(ReasonTrustDomain, nil, "CSR asks for an ID in trust domain %q; this CA issues for %q", id.TrustDomain(), td)
	}
	return id, nil
}
