package main

import (
	"crypto/x509"
	"fmt"
	"io"
	"os"

	"github.com/meshca/meshca/internal/pemutil"
)

// readCertificates reads every CERTIFICATE block of a PEM file ("-" for
// standard input).
func readCertificates(path string) ([]*x509.Certificate, error) {
	var data []byte
	var err error
	if path == "-" {
		data, err = io.ReadAll(os.Stdin)
	} else {
		data, err = os.ReadFile(path)
	}
	if err != nil {
		return nil, err
	}
	certs, err := pemutil.FindCertificates(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return certs, nil
}
