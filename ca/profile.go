package ca

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Backdate is how far before the moment of signing an issued certificate's
// NotBefore is set, so that a peer whose clock is a little behind accepts
// it at once. Certificates shorter-lived than ten times Backdate are
// backdated a tenth of their lifetime instead, so that backdating never
// moves their half-life renewal point into the past.
const Backdate = 30 * time.Second

// backdate returns how far to backdate a certificate living ttl.
func backdate(ttl time.Duration) time.Duration {
	return min(Backdate, ttl/10)
}

// newSerial returns a random 128-bit certificate serial number. Serials are
// never counted: a counter leaks issuance volume and invites collisions
// between replicas.
func newSerial() (*big.Int, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, fmt.Errorf("ca: generating serial: %w", err)
	}
	// A zero serial is not allowed (RFC 5280 4.1.2.2); 2^-128 odds, but free
	// to rule out.
	b[15] |= 1
	return new(big.Int).SetBytes(b[:]), nil
}

// leafTemplate returns the X509-SVID template of a workload certificate:
// one URI SAN (the SPIFFE ID; none for a DNSOnly request), CA=false,
// digitalSignature (and keyEncipherment for RSA keys, which key exchange
// by RSA encryption needs), serverAuth and clientAuth.
func leafTemplate(req SignRequest, serial *big.Int, notBefore, notAfter time.Time) *x509.Certificate {
	usage := x509.KeyUsageDigitalSignature
	if _, ok := req.PublicKey.(*rsa.PublicKey); ok {
		usage |= x509.KeyUsageKeyEncipherment
	}
	var uris []*url.URL
	if !req.DNSOnly {
		uris = []*url.URL{req.ID.URL()}
	}
	return &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		URIs:                  uris,
		DNSNames:              req.DNSNames,
		IPAddresses:           req.IPAddresses,
		KeyUsage:              usage,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
	}
}

// caTemplate returns the template of a signing certificate: CA=true,
// keyCertSign and cRLSign, carrying the trust domain's SPIFFE ID. An
// intermediate (maxPathLenZero) may sign only leaves.
func caTemplate(td spiffeid.TrustDomain, commonName string, serial *big.Int, notBefore, notAfter time.Time, maxPathLenZero bool) *x509.Certificate {
	return &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"meshca"}, CommonName: commonName},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		URIs:                  []*url.URL{td.ID().URL()},
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        maxPathLenZero,
	}
}

// SignRequest is what the CA needs to issue one certificate. Its fields
// are trusted: the caller has already validated the CSR and authorised the
// identity.
type SignRequest struct {
	// PublicKey is the subject's public key (from the CSR).
	PublicKey any

	// ID is the SPIFFE ID to put in the certificate's only URI SAN. It must
	// be in the CA's trust domain.
	ID spiffeid.ID

	// DNSNames and IPAddresses are extra SANs; workload requests carry none
	// unless their front end's policy allows them.
	DNSNames    []string
	IPAddresses []net.IP

	// DNSOnly leaves the SPIFFE ID out: the certificate's only SANs are
	// DNSNames, which must not be empty. Linkerd's identity certificates
	// are of this form; they name the workload by DNS. ID is still the
	// identity the certificate is issued to (authorised, and checked
	// against the CA's trust domain) and names it in errors.
	DNSOnly bool

	// TTL is the requested lifetime; the CA's TTLPolicy applies.
	TTL time.Duration
}
