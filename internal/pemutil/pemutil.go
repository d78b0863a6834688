// Package pemutil reads and writes certificates as PEM and DER, one way
// for the whole project: the CA's state, meshctl's files and the renewal
// loop's responses.
package pemutil

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
)

// ParseCertificates parses every block of data, which must all be
// CERTIFICATE blocks; at least one.
func ParseCertificates(data []byte) ([]*x509.Certificate, error) {
	return parse(data, false)
}

// FindCertificates parses the CERTIFICATE blocks of data and passes over
// any others (a key beside a chain); at least one.
func FindCertificates(data []byte) ([]*x509.Certificate, error) {
	return parse(data, true)
}

func parse(data []byte, skipOthers bool) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			if skipOthers {
				continue
			}
			return nil, fmt.Errorf("pemutil: PEM block %q where a CERTIFICATE was expected", block.Type)
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("pemutil: certificate %d: %w", len(certs)+1, err)
		}
		certs = append(certs, cert)
	}
	if len(certs) == 0 {
		return nil, errors.New("pemutil: no PEM certificate found")
	}
	return certs, nil
}

// ParseDER parses DER certificates, as the gRPC APIs carry them; at least
// one.
func ParseDER(ders [][]byte) ([]*x509.Certificate, error) {
	if len(ders) == 0 {
		return nil, errors.New("pemutil: no certificates")
	}
	certs := make([]*x509.Certificate, len(ders))
	for i, der := range ders {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("pemutil: certificate %d: %w", i, err)
		}
		certs[i] = c
	}
	return certs, nil
}

// EncodeCertificates returns certs as PEM CERTIFICATE blocks.
func EncodeCertificates(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}
