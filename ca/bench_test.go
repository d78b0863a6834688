package ca_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/testca"
)

// The sign path's parts, for `go test -bench . ./ca`. The floor is the
// crypto a certificate cannot do without: one CSR signature checked and
// one signature made; the others show how far the real path is above it.

func benchCSR(b *testing.B, td spiffeid.TrustDomain) []byte {
	b.Helper()
	return testca.CreateCSR(b, testca.NewKey(b), spiffeid.RequireFromPath(td, "/ns/default/sa/bench").String())
}

func BenchmarkCryptoFloor(b *testing.B) {
	csr, err := x509.ParseCertificateRequest(benchCSR(b, td))
	if err != nil {
		b.Fatal(err)
	}
	key := testca.NewKey(b).(*ecdsa.PrivateKey)
	digest := sha256.Sum256(csr.RawTBSCertificateRequest)
	b.ReportAllocs()
	for b.Loop() {
		if err := csr.CheckSignature(); err != nil {
			b.Fatal(err)
		}
		if _, err := ecdsa.SignASN1(rand.Reader, key, digest[:]); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkParseCSR(b *testing.B) {
	der := benchCSR(b, td)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ca.ParseCSR(der, td, ca.CSRPolicy{}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkSign(b *testing.B) {
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: td})
	if err != nil {
		b.Fatal(err)
	}
	c, err := ca.New(set, ca.Options{})
	if err != nil {
		b.Fatal(err)
	}
	req := ca.SignRequest{PublicKey: testca.NewKey(b).Public(), ID: spiffeid.RequireFromPath(td, "/ns/default/sa/bench")}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.Sign(context.Background(), req); err != nil {
			b.Fatal(err)
		}
	}
}
