package ca

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// MaxCSRSize is the default largest CSR accepted, DER or PEM. A P-256 CSR
// is about 300 bytes, an RSA-4096 one under 2 KiB.
const MaxCSRSize = 16 << 10

// Bounds on what a CSR may carry, checked before its signature. A
// workload's CSR has one SAN and at most a handful of extensions (SAN, key
// usage, extended key usage, basic constraints).
const (
	// MaxCSRExtensions is the most extensions a CSR may request.
	MaxCSRExtensions = 16

	// MaxCSRSANs is the most SANs (URI, DNS, IP and email together) a CSR
	// may hold; every form accepts exactly one.
	MaxCSRSANs = 8
)

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
	ReasonDNSSAN       CSRReason = "bad_dns_san"
	ReasonTooMany      CSRReason = "too_many_extensions"
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

// CSRPolicy bounds what ParseCSR and ParseDNSCSR accept. The zero value
// is the default. Whatever the policy, a CSR carries exactly one SAN of its
// form (ParseCSR: a URI SAN, its SPIFFE ID; ParseDNSCSR: a DNS SAN) and
// nothing else.
type CSRPolicy struct {
	// MaxSize is the largest CSR accepted; zero means MaxCSRSize.
	MaxSize int

	// RequirePEM refuses a DER request: for APIs whose CSR is a PEM string
	// (Istio's), where DER can only be a client's mistake.
	RequirePEM bool
}

// CSR is a parsed, verified certificate signing request.
type CSR struct {
	// ID is the SPIFFE ID the CSR asks for: its only URI SAN. It is zero
	// for a request of the DNS form (ParseDNSCSR).
	ID spiffeid.ID

	// DNSName is the CSR's only DNS SAN, for a request of the DNS form
	// (ParseDNSCSR); empty otherwise.
	DNSName string

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
	req, err := parseRequest(raw, policy, checkKey)
	if err != nil {
		return nil, err
	}
	id, err := csrID(req, td)
	if err != nil {
		return nil, err
	}
	// A DNS SAN a front end needs (Linkerd's identity name) comes from a
	// request of the DNS form, ParseDNSCSR, never from an X509-SVID one.
	if len(req.DNSNames) > 0 || len(req.IPAddresses) > 0 || len(req.EmailAddresses) > 0 {
		return nil, csrErrorf(ReasonForbiddenSAN, nil, "CSR asks for DNS, IP or email SANs; an X509-SVID request carries only its SPIFFE ID")
	}
	return &CSR{ID: id, PublicKey: req.PublicKey, Raw: req}, nil
}

// ParseDNSCSR parses a PKCS#10 request of the DNS form, the one Linkerd's
// proxies send: an ECDSA P-256 key, exactly one DNS SAN, a lowercase DNS
// name, and no URI, IP or email SAN. The signature, the size and the CA
// extensions are checked as ParseCSR checks them, and the subject is
// ignored as ParseCSR ignores it. What the DNS name may be is the caller's
// to decide. Every refusal is a *CSRError.
func ParseDNSCSR(raw []byte, policy CSRPolicy) (*CSR, error) {
	req, err := parseRequest(raw, policy, checkP256Key)
	if err != nil {
		return nil, err
	}
	if len(req.URIs) > 0 || len(req.IPAddresses) > 0 || len(req.EmailAddresses) > 0 {
		return nil, csrErrorf(ReasonForbiddenSAN, nil, "CSR asks for URI, IP or email SANs; a request of the DNS form carries only its DNS name")
	}
	switch n := len(req.DNSNames); {
	case n == 0:
		return nil, csrErrorf(ReasonDNSSAN, nil, "CSR has no DNS SAN; put the identity name in exactly one")
	case n > 1:
		return nil, csrErrorf(ReasonDNSSAN, nil, "CSR has %d DNS SANs; put the identity name in exactly one", n)
	}
	name := req.DNSNames[0]
	if err := checkDNSName(name); err != nil {
		return nil, csrErrorf(ReasonDNSSAN, err, "CSR DNS SAN %.253q is not a lowercase DNS name", name)
	}
	return &CSR{DNSName: name, PublicKey: req.PublicKey, Raw: req}, nil
}

// parseRequest runs the checks every form shares: size, encoding, PKCS#10
// parse, key (by checkKey), signature and CA extensions.
func parseRequest(raw []byte, policy CSRPolicy, checkKey func(any) error) (*x509.CertificateRequest, error) {
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
	if policy.RequirePEM && !isPEM(raw) {
		return nil, csrErrorf(ReasonMalformed, nil, "CSR is not PEM; send a PEM block of type \"CERTIFICATE REQUEST\"")
	}
	der, err := csrDER(raw)
	if err != nil {
		return nil, err
	}
	req, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, csrErrorf(ReasonMalformed, err, "CSR is not a PKCS#10 request")
	}
	if n := len(req.Extensions); n > MaxCSRExtensions {
		return nil, csrErrorf(ReasonTooMany, nil, "CSR has %d extensions, more than the limit of %d; a workload CSR needs its SAN only", n, MaxCSRExtensions)
	}
	if n := len(req.URIs) + len(req.DNSNames) + len(req.IPAddresses) + len(req.EmailAddresses); n > MaxCSRSANs {
		return nil, csrErrorf(ReasonTooMany, nil, "CSR has %d SANs, more than the limit of %d; a workload CSR has exactly one", n, MaxCSRSANs)
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
	return req, nil
}

func isPEM(raw []byte) bool {
	return bytes.HasPrefix(bytes.TrimSpace(raw), []byte("-----BEGIN"))
}

func csrDER(raw []byte) ([]byte, error) {
	if !isPEM(raw) {
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

// checkP256Key accepts ECDSA P-256 only, the one key of the DNS form.
func checkP256Key(pub any) error {
	if k, ok := pub.(*ecdsa.PublicKey); ok {
		if k.Curve == elliptic.P256() {
			return nil
		}
		return csrErrorf(ReasonKey, nil, "ECDSA curve %s is not supported for this request; use P-256", k.Curve.Params().Name)
	}
	if pub == nil {
		return csrErrorf(ReasonKey, nil, "CSR key algorithm is unknown; use ECDSA P-256")
	}
	return csrErrorf(ReasonKey, nil, "CSR key type %T is not supported for this request; use ECDSA P-256", pub)
}

// checkDNSName accepts a fully qualified DNS name without a trailing dot:
// at most 253 bytes, of labels of 1 to 63 lowercase letters, digits and
// hyphens, neither starting nor ending with a hyphen. Wildcards and
// upper case are refused: an identity name has one spelling.
func checkDNSName(name string) error {
	if len(name) > 253 {
		return fmt.Errorf("it is %d bytes, more than 253", len(name))
	}
	for label := range strings.SplitSeq(name, ".") {
		if len(label) == 0 || len(label) > 63 {
			return errors.New("a label is empty or longer than 63 bytes")
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return errors.New("a label starts or ends with a hyphen")
		}
		for i := 0; i < len(label); i++ {
			if c := label[i]; (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' {
				return errors.New("it has a character other than a-z, 0-9, '-' and '.'")
			}
		}
	}
	return nil
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
