package testca

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// RequireOpenSSLVerifies checks chain (leaf first, then intermediates) with
// `openssl verify` as a TLS client certificate at time at, trusting roots:
// a verifier that builds chains its own way, unlike Go's. openssl must be
// installed (scripts/tools.sh does); the test fails otherwise.
func RequireOpenSSLVerifies(tb testing.TB, at time.Time, roots, chain []*x509.Certificate) {
	tb.Helper()
	openssl, err := exec.LookPath("openssl")
	if err != nil {
		tb.Fatalf("openssl is needed as an independent verifier (scripts/tools.sh installs it): %v", err)
	}
	dir := tb.TempDir()
	write := func(name string, certs []*x509.Certificate) string {
		var buf bytes.Buffer
		for _, c := range certs {
			if err := pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}); err != nil {
				tb.Fatal(err)
			}
		}
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, buf.Bytes(), 0o600); err != nil {
			tb.Fatal(err)
		}
		return path
	}
	out, err := exec.Command(openssl, "verify", "-purpose", "sslclient", "-attime", strconv.FormatInt(at.Unix(), 10),
		"-CAfile", write("roots.pem", roots), "-untrusted", write("chain.pem", chain[1:]),
		write("leaf.pem", chain[:1])).CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte(": OK")) {
		tb.Fatalf("openssl verify: %v\n%s", err, out)
	}
}
