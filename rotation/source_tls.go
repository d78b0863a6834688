package rotation

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// ClientTLSConfig returns a TLS config for dialing meshca-server. The
// server must present an X509-SVID of serverID that verifies against the
// live bundle. The client presents the current SVID when it holds one that
// has not expired and verifies against the live bundle, and no
// certificate otherwise (the server then wants a token). Both are read at
// each handshake, so a config made once serves across rotations:
//
//	creds := credentials.NewTLS(src.ClientTLSConfig(serverID))
func (s *Source) ClientTLSConfig(serverID spiffeid.ID) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		// The server's SVID is verified by VerifyPeerCertificate, as a
		// SPIFFE ID rather than a host name.
		InsecureSkipVerify:    true, //nolint:gosec // see above
		VerifyPeerCertificate: s.verifyServer(serverID),
		GetClientCertificate:  s.getClientCertificate,
	}
}

// Dialer returns a Dialer for meshca-server at target (a gRPC target, such
// as "dns:///meshca.meshca-system.svc:8443"), over TLS with
// ClientTLSConfig(serverID). opts are added to the dial options.
func (s *Source) Dialer(target string, serverID spiffeid.ID, opts ...grpc.DialOption) Dialer {
	creds := credentials.NewTLS(s.ClientTLSConfig(serverID))
	return func(context.Context) (*grpc.ClientConn, error) {
		conn, err := grpc.NewClient(target, append([]grpc.DialOption{grpc.WithTransportCredentials(creds)}, opts...)...)
		if err != nil {
			return nil, fmt.Errorf("rotation: connecting to %s: %w", target, err)
		}
		return conn, nil
	}
}

func (s *Source) verifyServer(serverID spiffeid.ID) func([][]byte, [][]*x509.Certificate) error {
	return func(raw [][]byte, _ [][]*x509.Certificate) error {
		id, _, err := x509svid.ParseAndVerify(raw, s, x509svid.WithTime(s.clock.Now()))
		if err != nil {
			return fmt.Errorf("rotation: verifying the server's certificate: %w", err)
		}
		if id != serverID {
			return fmt.Errorf("rotation: the server presented %q; want %q", id, serverID)
		}
		return nil
	}
}

// getClientCertificate is a tls.Config.GetClientCertificate: the current
// SVID when it can authenticate a renewal (usableCert), and none (an empty
// certificate) otherwise, or while the renewal after one the server
// refused runs.
func (s *Source) getClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	if s.certRefused.Load() {
		return &tls.Certificate{}, nil
	}
	if cert := s.usableCert(); cert != nil {
		return cert, nil
	}
	return &tls.Certificate{}, nil
}
