package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// serverFlags are the flags of every command that talks to a server.
type serverFlags struct {
	address  string
	bundle   string
	serverID string
	insecure bool
	timeout  time.Duration

	warnInsecure sync.Once

	// sendsCredential is set by commands that send a token or present a
	// certificate: those never talk to an unverified server.
	sendsCredential bool
}

func (f *serverFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.address, "server", "127.0.0.1:8443", "meshca-server gRPC address")
	fl.StringVar(&f.bundle, "ca-bundle", "", "PEM trust bundle to verify the server with (the server writes one to <data-dir>/bundle.pem)")
	fl.StringVar(&f.serverID, "server-id", "", "SPIFFE ID the server must present (default spiffe://<bundle's trust domain>/meshca/server)")
	fl.BoolVar(&f.insecure, "insecure", false, "do not verify the server's certificate (first contact, and never with a credential: anyone on the path can impersonate the server)")
	fl.DurationVar(&f.timeout, "timeout", 10*time.Second, "deadline of each request")
}

// dial connects to the server over TLS, verifying that it presents an
// X509-SVID of the expected ID under the bundle. svid, when not nil, is
// presented as the client certificate.
func (f *serverFlags) dial(svid x509svid.Source) (*grpc.ClientConn, error) {
	cfg, err := f.tlsConfig(svid)
	if err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient(f.address, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", f.address, err)
	}
	return conn, nil
}

func (f *serverFlags) tlsConfig(svid x509svid.Source) (*tls.Config, error) {
	if f.insecure && f.sendsCredential {
		return nil, errors.New("--insecure would send the credential to a server nobody verified; use --ca-bundle")
	}
	if f.insecure {
		f.warnInsecure.Do(func() {
			fmt.Fprintln(os.Stderr, "meshctl: warning: --insecure: the server's identity is not verified")
		})
		cfg := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12} //nolint:gosec // asked for with --insecure
		if svid != nil {
			cfg.GetClientCertificate = tlsconfig.GetClientCertificate(svid)
		}
		return cfg, nil
	}
	if f.bundle == "" {
		if f.sendsCredential {
			return nil, errors.New("--ca-bundle is required to verify the server")
		}
		return nil, errors.New("--ca-bundle is required to verify the server (or --insecure for a first contact)")
	}
	var serverID spiffeid.ID
	var td spiffeid.TrustDomain
	if f.serverID != "" {
		id, err := spiffeid.FromString(f.serverID)
		if err != nil {
			return nil, fmt.Errorf("--server-id: %w", err)
		}
		serverID, td = id, id.TrustDomain()
	}
	bundle, err := loadBundle(f.bundle, td)
	if err != nil {
		return nil, err
	}
	if serverID.IsZero() {
		serverID = spiffeid.RequireFromPath(bundle.TrustDomain(), "/meshca/server")
	}
	if svid != nil {
		return tlsconfig.MTLSClientConfig(svid, bundle, tlsconfig.AuthorizeID(serverID)), nil
	}
	return tlsconfig.TLSClientConfig(bundle, tlsconfig.AuthorizeID(serverID)), nil
}

// loadBundle reads a PEM bundle of trust domain td or, when td is zero, of
// the trust domain named by its roots' SPIFFE ID (meshca roots carry one).
func loadBundle(path string, td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	certs, err := readCertificates(path)
	if err != nil {
		return nil, err
	}
	for _, c := range certs {
		if !td.IsZero() {
			break
		}
		if id, err := x509svid.IDFromCert(c); err == nil {
			td = id.TrustDomain()
		}
	}
	if td.IsZero() {
		return nil, fmt.Errorf("%s: no root carries a SPIFFE ID; pass --server-id to name the trust domain", path)
	}
	return x509bundle.FromX509Authorities(td, certs), nil
}

func (f *serverFlags) context(parent context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(parent, f.timeout)
}
