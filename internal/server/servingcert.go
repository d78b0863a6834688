package server

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/utils/clock"

	"github.com/meshca/meshca/ca"
)

// ServingCert is the server's own TLS certificate, an X509-SVID the CA
// issues to itself with a fresh key. It is renewed at half its life on the
// next handshake after that, so a long-running server never serves an
// expired certificate and never restarts to renew.
type ServingCert struct {
	ca       *ca.CA
	id       spiffeid.ID
	dnsNames []string
	ips      []net.IP
	ttl      time.Duration
	clock    clock.PassiveClock

	mu      sync.Mutex
	cert    *tls.Certificate
	renewAt time.Time
	seq     uint64 // bundle sequence when cert was issued
}

// NewServingCert returns the serving certificate of id with extra DNS and
// IP SANs (for clients that check host names), lasting ttl.
func NewServingCert(c *ca.CA, id spiffeid.ID, dnsNames []string, ips []net.IP, ttl time.Duration, clk clock.PassiveClock) (*ServingCert, error) {
	if clk == nil {
		clk = clock.RealClock{}
	}
	sc := &ServingCert{ca: c, id: id, dnsNames: dnsNames, ips: ips, ttl: ttl, clock: clk}
	if _, err := sc.GetCertificate(nil); err != nil {
		return nil, err
	}
	return sc, nil
}

// GetCertificate is a tls.Config.GetCertificate.
func (sc *ServingCert) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	// Renew at half life, and whenever the bundle changed: a root may have
	// left it, and clients with the new bundle must verify the server.
	_, seq := sc.ca.Bundle()
	if sc.cert != nil && sc.clock.Now().Before(sc.renewAt) && seq == sc.seq {
		return sc.cert, nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("server: serving key: %w", err)
	}
	issued, err := sc.ca.Sign(context.Background(), ca.SignRequest{
		PublicKey:   key.Public(),
		ID:          sc.id,
		DNSNames:    sc.dnsNames,
		IPAddresses: sc.ips,
		TTL:         sc.ttl,
	})
	if err != nil {
		if sc.cert != nil && sc.clock.Now().Before(sc.cert.Leaf.NotAfter) {
			// Keep serving the current certificate; the next handshake
			// tries again.
			return sc.cert, nil
		}
		return nil, fmt.Errorf("server: issuing the serving certificate: %w", err)
	}
	cert := &tls.Certificate{PrivateKey: key, Leaf: issued.Cert}
	for _, c := range issued.Chain {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	life := issued.Cert.NotAfter.Sub(issued.Cert.NotBefore)
	sc.cert, sc.renewAt, sc.seq = cert, issued.Cert.NotBefore.Add(life/2), issued.BundleSequence
	return cert, nil
}

// TLSConfig returns the server's TLS config: its serving certificate, TLS
// 1.2 or later, and client certificates requested but verified by the
// authenticator rather than the handshake.
func (sc *ServingCert) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: sc.GetCertificate,
		ClientAuth:     tls.RequestClientCert,
		NextProtos:     []string{"h2"},
	}
}
