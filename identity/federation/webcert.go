package federation

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
	"sync"

	"github.com/meshca/meshca/internal/securefile"
)

// keyPairReloader serves a certificate and key from files, read again on
// the first handshake after either changes. While a new pair does not
// load (the certificate written, the key not yet), the last good pair is
// served and the load is tried again on the next handshake.
type keyPairReloader struct {
	certFile, keyFile string
	log               *slog.Logger

	mu       sync.Mutex
	cert     *tls.Certificate
	certInfo os.FileInfo
	keyInfo  os.FileInfo
}

func newKeyPairReloader(certFile, keyFile string, log *slog.Logger) (*keyPairReloader, error) {
	r := &keyPairReloader{certFile: certFile, keyFile: keyFile, log: log}
	if err := r.reload(); err != nil {
		return nil, err
	}
	return r, nil
}

// GetCertificate is a tls.Config.GetCertificate.
func (r *keyPairReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.changed() {
		if err := r.reload(); err != nil {
			r.log.Warn("federation: the endpoint's new certificate or key does not load; serving the previous one", "error", err)
		}
	}
	return r.cert, nil
}

// changed reports whether either file differs from the loaded one: a new
// file (renamed over it, or a Kubernetes volume's symlink swap), or the
// same file with another size or modification time.
func (r *keyPairReloader) changed() bool {
	return fileChanged(r.certFile, r.certInfo) || fileChanged(r.keyFile, r.keyInfo)
}

func fileChanged(path string, old os.FileInfo) bool {
	fi, err := os.Stat(path)
	if err != nil {
		return false // keep serving what was loaded
	}
	return !os.SameFile(fi, old) || fi.Size() != old.Size() || !fi.ModTime().Equal(old.ModTime())
}

// reload reads both files; r.mu is held, or r is not shared yet.
func (r *keyPairReloader) reload() error {
	certInfo, err := os.Stat(r.certFile)
	if err != nil {
		return fmt.Errorf("federation: endpoint certificate: %w", err)
	}
	keyInfo, err := os.Stat(r.keyFile)
	if err != nil {
		return fmt.Errorf("federation: endpoint key: %w", err)
	}
	certPEM, err := os.ReadFile(r.certFile)
	if err != nil {
		return fmt.Errorf("federation: endpoint certificate: %w", err)
	}
	keyPEM, err := securefile.ReadPrivate(r.keyFile)
	if err != nil {
		return fmt.Errorf("federation: endpoint key: %w", err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return fmt.Errorf("federation: endpoint certificate %s and key %s do not make a key pair: %w", r.certFile, r.keyFile, err)
	}
	if cert.Leaf == nil {
		if cert.Leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return fmt.Errorf("federation: endpoint certificate %s: %w", r.certFile, err)
		}
	}
	r.cert, r.certInfo, r.keyInfo = &cert, certInfo, keyInfo
	return nil
}
