// Package pemutil reads and writes certificates as PEM and DER, one way
// for the whole project: the CA's state, meshctl's files and the renewal
// loop's responses.
package pemutil

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
)

// Bounds on the input of every function of the package, checked before
// anything is decoded. A trust bundle is a few roots; a Web PKI root file
// (Debian's ca-certificates.crt) is about 150 certificates and 220 KiB.
const (
	// MaxBytes is the largest input, PEM or the sum of DER certificates.
	MaxBytes = 1 << 20

	// MaxBlocks is the most PEM blocks, or DER certificates, of one
	// input.
	MaxBlocks = 500
)

// ErrTooLarge is matched (errors.Is) by the error for an input over
// MaxBytes or MaxBlocks.
var ErrTooLarge = errors.New("pemutil: input over the limit")

// limitError is an input over a bound; errors.Is(err, ErrTooLarge).
type limitError struct{ msg string }

func (e *limitError) Error() string        { return "pemutil: " + e.msg }
func (e *limitError) Is(target error) bool { return target == ErrTooLarge }

func tooLarge(format string, args ...any) error {
	return &limitError{msg: fmt.Sprintf(format, args...)}
}

// checkPEM bounds data before it is decoded: its size, and the number of
// blocks it may hold, counted by their BEGIN lines.
func checkPEM(data []byte) error {
	if len(data) > MaxBytes {
		return tooLarge("%d bytes of PEM, more than the limit of %d", len(data), MaxBytes)
	}
	if n := bytes.Count(data, []byte("-----BEGIN ")); n > MaxBlocks {
		return tooLarge("%d PEM blocks, more than the limit of %d", n, MaxBlocks)
	}
	return nil
}

// ParseCertificates parses every block of data, which must all be
// CERTIFICATE blocks; at least one. Data over MaxBytes or MaxBlocks is
// refused (ErrTooLarge) before it is decoded, as by every function of the
// package.
func ParseCertificates(data []byte) ([]*x509.Certificate, error) {
	return parse(data, false)
}

// FindCertificates parses the CERTIFICATE blocks of data and passes over
// any others (a key beside a chain); at least one.
func FindCertificates(data []byte) ([]*x509.Certificate, error) {
	return parse(data, true)
}

func parse(data []byte, skipOthers bool) ([]*x509.Certificate, error) {
	if err := checkPEM(data); err != nil {
		return nil, err
	}
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
	if len(ders) > MaxBlocks {
		return nil, tooLarge("%d certificates, more than the limit of %d", len(ders), MaxBlocks)
	}
	size := 0
	for _, der := range ders {
		size += len(der)
	}
	if size > MaxBytes {
		return nil, tooLarge("%d bytes of certificates, more than the limit of %d", size, MaxBytes)
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
