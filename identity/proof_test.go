package identity_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"io"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/testca"
)

var proofID = spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/demo")

// TestSVIDProofRoundTrip: a proof made with each kind of SVID key verifies
// with the SVID's certificate over the same CSR.
func TestSVIDProofRoundTrip(t *testing.T) {
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	require.NoError(t, err)
	rsa2048, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	_, ed, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	root := testca.New(t, proofID.TrustDomain())
	csr := testca.CreateCSR(t, testca.NewKey(t), proofID.String())

	for _, tt := range []struct {
		name string
		key  crypto.Signer
	}{
		{name: "ECDSA P-256", key: testca.NewKey(t)},
		{name: "ECDSA P-384", key: p384},
		{name: "RSA 2048 (PSS)", key: rsa2048},
		{name: "Ed25519", key: ed},
	} {
		t.Run(tt.name, func(t *testing.T) {
			svid := root.CreateX509SVID(proofID, testca.WithKey(tt.key))
			sig, err := identity.SignSVIDProof(tt.key, csr)
			require.NoError(t, err)
			require.NoError(t, identity.VerifySVIDProof(svid.Certificates[0], csr, sig))
		})
	}
}

// TestSVIDProofRefusals: every proof that does not show possession of the
// SVID's key for this very CSR is refused with reason bad_proof, and the
// message never holds the signature.
func TestSVIDProofRefusals(t *testing.T) {
	root := testca.New(t, proofID.TrustDomain())
	key := testca.NewKey(t)
	leaf := root.CreateX509SVID(proofID, testca.WithKey(key)).Certificates[0]
	csr := testca.CreateCSR(t, testca.NewKey(t), proofID.String())
	other := testca.CreateCSR(t, testca.NewKey(t), proofID.String())

	sign := func(k crypto.Signer, c []byte) []byte {
		sig, err := identity.SignSVIDProof(k, c)
		require.NoError(t, err)
		return sig
	}
	// A signature of the CSR alone, as if made for another purpose: the
	// context prefix keeps it from being a proof.
	digest := sha256.Sum256(csr)
	bare, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
	require.NoError(t, err)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	rsaLeaf := root.CreateX509SVID(proofID, testca.WithKey(rsaKey)).Certificates[0]
	pkcs1Digest := sha256.Sum256(append([]byte("meshca svid proof v1\x00"), csr...))
	pkcs1, err := rsa.SignPKCS1v15(rand.Reader, rsaKey, crypto.SHA256, pkcs1Digest[:])
	require.NoError(t, err)

	for _, tt := range []struct {
		name string
		leaf *x509.Certificate
		csr  []byte
		sig  []byte
		msg  string
	}{
		{name: "another key", leaf: leaf, csr: csr, sig: sign(testca.NewKey(t), csr), msg: "signature does not verify with the key of the certificate"},
		{name: "another CSR", leaf: leaf, csr: csr, sig: sign(key, other), msg: "signature does not verify with the key of the certificate"},
		{name: "no context", leaf: leaf, csr: csr, sig: bare, msg: "signature does not verify with the key of the certificate"},
		{name: "RSA PKCS#1 v1.5, not PSS", leaf: rsaLeaf, csr: csr, sig: pkcs1, msg: "signature does not verify with the key of the certificate"},
		{name: "empty signature", leaf: leaf, csr: csr, msg: "identity: SVID proof has no signature; sign the CSR with the current SVID's key (identity.SignSVIDProof)"},
		{name: "oversized signature", leaf: leaf, csr: csr, sig: make([]byte, identity.MaxSVIDProofSignatureBytes+1), msg: "identity: SVID proof signature is 1025 bytes, more than the limit of 1024"},
		{name: "no certificate", csr: csr, sig: sign(key, csr), msg: "identity: SVID proof has no certificate"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			err := identity.VerifySVIDProof(tt.leaf, tt.csr, tt.sig)
			var ae *identity.AuthError
			require.ErrorAs(t, err, &ae)
			require.Equal(t, identity.ReasonBadProof, ae.Reason)
			require.Contains(t, err.Error(), tt.msg)
			if len(tt.sig) > 0 {
				require.NotContains(t, err.Error(), hex.EncodeToString(tt.sig))
			}
		})
	}
}

func TestSignSVIDProofRefusesUnsupportedKeys(t *testing.T) {
	_, err := identity.SignSVIDProof(nil, []byte("csr"))
	require.EqualError(t, err, "identity: signing an SVID proof: no key")
	_, err = identity.SignSVIDProof(otherSigner{}, []byte("csr"))
	require.EqualError(t, err, "identity: signing an SVID proof: unsupported key type string; use ECDSA, RSA or Ed25519")
}

// otherSigner is a signer of a key type no X509-SVID has.
type otherSigner struct{}

func (otherSigner) Public() crypto.PublicKey                                        { return "not a key" }
func (otherSigner) Sign(_ io.Reader, _ []byte, _ crypto.SignerOpts) ([]byte, error) { return nil, nil }

func TestParseSVIDProofChain(t *testing.T) {
	root := testca.New(t, proofID.TrustDomain())
	svid := root.ChildCA().CreateX509SVID(proofID)
	ders := [][]byte{svid.Certificates[0].Raw, svid.Certificates[1].Raw}

	chain, err := identity.ParseSVIDProofChain(ders)
	require.NoError(t, err)
	require.Equal(t, svid.Certificates, chain)

	for _, tt := range []struct {
		name   string
		ders   [][]byte
		reason identity.AuthReason
		msg    string
	}{
		{name: "empty", reason: identity.ReasonBadCertificate, msg: "identity: SVID proof has no certificate chain; send the current SVID, leaf first, and its intermediates"},
		{name: "too many", ders: make([][]byte, identity.MaxClientChainLength+1), reason: identity.ReasonChainTooLarge, msg: "identity: SVID proof chain has 9 certificates, more than the limit of 8; send your SVID and its intermediates only"},
		{name: "too large", ders: [][]byte{make([]byte, identity.MaxClientChainBytes+1)}, reason: identity.ReasonChainTooLarge, msg: "identity: SVID proof chain is 32769 bytes, more than the limit of 32768; send your SVID and its intermediates only"},
		{name: "not DER", ders: [][]byte{ders[0], []byte("garbage")}, reason: identity.ReasonBadCertificate, msg: "identity: SVID proof chain: certificate 1 does not parse: x509: malformed certificate"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := identity.ParseSVIDProofChain(tt.ders)
			var ae *identity.AuthError
			require.ErrorAs(t, err, &ae)
			require.Equal(t, tt.reason, ae.Reason)
			require.EqualError(t, err, tt.msg)
		})
	}
}

// FuzzVerifySVIDProof: whatever chain, CSR and signature a caller sends,
// parsing and verifying the proof never panics, a refusal never echoes the
// signature, and a proof taken is a signature by the leaf's key over the
// documented message ("meshca svid proof v1", a zero byte, the CSR), as
// the standard library checks it on its own. (The seeds' keys are made
// anew in every fuzzing process, so the inputs are not compared with
// them.)
func FuzzVerifySVIDProof(f *testing.F) {
	root := testca.New(f, proofID.TrustDomain())
	key := testca.NewKey(f)
	leaf := root.CreateX509SVID(proofID, testca.WithKey(key)).Certificates[0]
	csr := testca.CreateCSR(f, testca.NewKey(f), proofID.String())
	sig, err := identity.SignSVIDProof(key, csr)
	require.NoError(f, err)
	f.Add(leaf.Raw, csr, sig)
	f.Add(leaf.Raw, csr, []byte{})
	f.Add([]byte("garbage"), csr, sig)
	f.Fuzz(func(t *testing.T, der, c, s []byte) {
		chain, err := identity.ParseSVIDProofChain([][]byte{der})
		if err != nil {
			return
		}
		err = identity.VerifySVIDProof(chain[0], c, s)
		if err == nil {
			require.True(t, verifiesAsDocumented(chain[0].PublicKey, c, s), "a proof was taken that is not the leaf key's signature over the CSR")
			return
		}
		var ae *identity.AuthError
		require.ErrorAs(t, err, &ae)
		require.Equal(t, identity.ReasonBadProof, ae.Reason)
		if len(s) >= 16 {
			require.NotContains(t, err.Error(), hex.EncodeToString(s))
		}
	})
}

// verifiesAsDocumented checks sig as docs/batching.md describes an SVID
// proof, with the standard library alone.
func verifiesAsDocumented(pub any, csr, sig []byte) bool {
	msg := append([]byte("meshca svid proof v1\x00"), csr...)
	digest := sha256.Sum256(msg)
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		return ecdsa.VerifyASN1(k, digest[:], sig)
	case *rsa.PublicKey:
		return rsa.VerifyPSS(k, crypto.SHA256, digest[:], sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash}) == nil
	case ed25519.PublicKey:
		return ed25519.Verify(k, msg, sig)
	}
	return false
}
