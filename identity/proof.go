package identity

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
)

// An SVID proof proves, in a request body, what an mTLS client certificate
// proves in a handshake: the caller holds the private key of an X509-SVID.
// It is a signature by that key over one CSR, so that it is good for that
// CSR only. A batch renewal (meshca.v1.CertificateService/SignBatch)
// carries one per identity, where a connection could present only one
// client certificate.
//
// The signed message is svidProofContext followed by the CSR's bytes, as
// sent. The context keeps the signature from being taken for one made by
// the same key for any other purpose (a TLS handshake signs a different,
// also context-prefixed, message).
const svidProofContext = "meshca svid proof v1\x00"

// MaxSVIDProofSignatureBytes bounds an SVID proof's signature, checked
// before any verification: an RSA-8192 signature is 1 KiB.
const MaxSVIDProofSignatureBytes = 1 << 10

// ReasonBadProof refuses an SVID proof whose signature is missing, does
// not verify with the SVID's key, or was made over another CSR.
const ReasonBadProof AuthReason = "bad_proof"

// SignSVIDProof returns the proof, by key, the private key of the caller's
// current X509-SVID, that the caller holds that SVID and asks for csr: a
// signature over the SHA-256 digest of "meshca svid proof v1", a zero
// byte and csr, byte for byte as it will be sent.
//
// ECDSA keys sign the digest (ASN.1 DER signature); RSA keys sign it with
// RSA-PSS, salt length equal to the hash; Ed25519 keys sign the whole
// message, as Ed25519 signs messages, not digests. Other keys are refused.
func SignSVIDProof(key crypto.Signer, csr []byte) ([]byte, error) {
	if key == nil {
		return nil, errors.New("identity: signing an SVID proof: no key")
	}
	msg := svidProofMessage(csr)
	var (
		sig []byte
		err error
	)
	switch key.Public().(type) {
	case *ecdsa.PublicKey:
		digest := sha256.Sum256(msg)
		sig, err = key.Sign(rand.Reader, digest[:], crypto.SHA256)
	case *rsa.PublicKey:
		digest := sha256.Sum256(msg)
		sig, err = key.Sign(rand.Reader, digest[:], &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256})
	case ed25519.PublicKey:
		sig, err = key.Sign(rand.Reader, msg, crypto.Hash(0))
	default:
		return nil, fmt.Errorf("identity: signing an SVID proof: unsupported key type %T; use ECDSA, RSA or Ed25519", key.Public())
	}
	if err != nil {
		return nil, fmt.Errorf("identity: signing an SVID proof: %w", err)
	}
	return sig, nil
}

// VerifySVIDProof checks that sig is SignSVIDProof's signature over csr by
// the private key of leaf. It does not verify leaf: the caller still
// authenticates the chain, as the Authenticator does a TLS client
// certificate (Credential.PeerCertificates). Its error is an *AuthError of
// reason ReasonBadProof, and never holds the signature.
func VerifySVIDProof(leaf *x509.Certificate, csr, sig []byte) error {
	if leaf == nil {
		return authErrorf(ReasonBadProof, nil, "SVID proof has no certificate")
	}
	if len(sig) == 0 {
		return authErrorf(ReasonBadProof, nil, "SVID proof has no signature; sign the CSR with the current SVID's key (identity.SignSVIDProof)")
	}
	if len(sig) > MaxSVIDProofSignatureBytes {
		return authErrorf(ReasonBadProof, nil, "SVID proof signature is %d bytes, more than the limit of %d", len(sig), MaxSVIDProofSignatureBytes)
	}
	msg := svidProofMessage(csr)
	ok := false
	switch pub := leaf.PublicKey.(type) {
	case *ecdsa.PublicKey:
		digest := sha256.Sum256(msg)
		ok = ecdsa.VerifyASN1(pub, digest[:], sig)
	case *rsa.PublicKey:
		digest := sha256.Sum256(msg)
		ok = rsa.VerifyPSS(pub, crypto.SHA256, digest[:], sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash}) == nil
	case ed25519.PublicKey:
		ok = ed25519.Verify(pub, msg, sig)
	default:
		return authErrorf(ReasonBadProof, nil, "SVID proof certificate has an unsupported key type %T; use ECDSA, RSA or Ed25519", leaf.PublicKey)
	}
	if !ok {
		return authErrorf(ReasonBadProof, nil, "SVID proof signature does not verify with the key of the certificate (serial %x) over this entry's CSR; sign exactly the CSR sent, with the current SVID's key", leaf.SerialNumber)
	}
	return nil
}

// ParseSVIDProofChain parses the DER certificate chain of an SVID proof,
// leaf first. A chain over MaxClientChainLength certificates or
// MaxClientChainBytes is refused, with ReasonChainTooLarge, before
// anything is parsed; an empty or unparsable one with ReasonBadCertificate.
// The chain is not verified: authenticate it as
// Credential.PeerCertificates.
func ParseSVIDProofChain(ders [][]byte) ([]*x509.Certificate, error) {
	if len(ders) == 0 {
		return nil, authErrorf(ReasonBadCertificate, nil, "SVID proof has no certificate chain; send the current SVID, leaf first, and its intermediates")
	}
	if n := len(ders); n > MaxClientChainLength {
		return nil, authErrorf(ReasonChainTooLarge, nil, "SVID proof chain has %d certificates, more than the limit of %d; send your SVID and its intermediates only", n, MaxClientChainLength)
	}
	size := 0
	for _, der := range ders {
		size += len(der)
	}
	if size > MaxClientChainBytes {
		return nil, authErrorf(ReasonChainTooLarge, nil, "SVID proof chain is %d bytes, more than the limit of %d; send your SVID and its intermediates only", size, MaxClientChainBytes)
	}
	chain := make([]*x509.Certificate, len(ders))
	for i, der := range ders {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, authErrorf(ReasonBadCertificate, err, "SVID proof chain: certificate %d does not parse", i)
		}
		chain[i] = cert
	}
	return chain, nil
}

func svidProofMessage(csr []byte) []byte {
	msg := make([]byte, 0, len(svidProofContext)+len(csr))
	return append(append(msg, svidProofContext...), csr...)
}
