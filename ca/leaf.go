package ca

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"time"

	"golang.org/x/crypto/cryptobyte"
	cbasn1 "golang.org/x/crypto/cryptobyte/asn1"
)

// The leaf's fixed DER pieces (RFC 5280 4.1 and 4.2.1).
var (
	oidECDSAWithSHA256   = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}
	oidExtAuthorityKey   = asn1.ObjectIdentifier{2, 5, 29, 35}
	oidExtExtKeyUsage    = asn1.ObjectIdentifier{2, 5, 29, 37}
	oidExtSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidServerAuth        = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 1}
	oidClientAuth        = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 2}
)

// fastSigner reports whether the leaf tmpl can be signed by issuer on the
// fast path: a workload leaf (at most one URI SAN, DNS SANs of ASCII, at
// least one SAN, no IP SANs) under an in-memory P-256 key.
func fastSigner(tmpl *x509.Certificate, issuer Authority) (*ecdsa.PrivateKey, bool) {
	key, ok := issuer.Signer.(*ecdsa.PrivateKey)
	if !ok || key.Curve != elliptic.P256() || len(tmpl.IPAddresses) > 0 || len(tmpl.URIs) > 1 || len(tmpl.URIs)+len(tmpl.DNSNames) == 0 {
		return nil, false
	}
	// CreateCertificate refuses a name that is not an IA5String; leave
	// that refusal to it.
	for _, name := range tmpl.DNSNames {
		if !isASCII(name) {
			return nil, false
		}
	}
	if len(tmpl.URIs) == 1 && !isASCII(tmpl.URIs[0].String()) {
		return nil, false
	}
	return key, true
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

// signLeaf encodes the workload leaf tmpl and signs it with key, once.
//
// x509.CreateCertificate encodes by reflection and then verifies the
// signature it just made, to catch a faulty crypto.Signer (an HSM, a
// KMS): together a third of the CA's CPU per certificate. key here is an
// in-memory *ecdsa.PrivateKey signed with by Go's own implementation, not
// such a signer; the CA still verifies the first signature of every issuer
// (a key whose private half does not match its public half fails there),
// and the encoding is tested to be byte for byte what CreateCertificate
// makes. Anything else goes through CreateCertificate.
//
// It returns the certificate as x509.ParseCertificate would (leafOf), without
// parsing what it just encoded.
func signLeaf(tmpl *x509.Certificate, parent *x509.Certificate, exts leafExtensions, pub any, key *ecdsa.PrivateKey) (*x509.Certificate, error) {
	spki, err := subjectPublicKeyInfo(pub)
	if err != nil {
		return nil, fmt.Errorf("ca: encoding the subject key: %w", err)
	}
	// One buffer holds the TBSCertificate, and a second the certificate:
	// a leaf is well under a kilobyte, so neither grows.
	tbs := cryptobyte.NewBuilder(make([]byte, 0, leafBufferSize))
	tbs.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddBytes(tbsVersion)
		b.AddASN1BigInt(tmpl.SerialNumber)
		b.AddBytes(algorithmECDSAWithSHA256)
		b.AddBytes(parent.RawSubject)
		b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
			addTime(b, tmpl.NotBefore)
			addTime(b, tmpl.NotAfter)
		})
		b.AddBytes(emptySubject)
		b.AddBytes(spki)
		b.AddASN1(cbasn1.Tag(3).Constructed().ContextSpecific(), func(b *cryptobyte.Builder) {
			b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
				b.AddBytes(exts.forKey(pub))
				addSubjectAltName(b, tmpl)
			})
		})
	})
	tbsDER, err := tbs.Bytes()
	if err != nil {
		return nil, fmt.Errorf("ca: encoding the certificate: %w", err)
	}
	digest := sha256.Sum256(tbsDER)
	sig, err := ecdsa.SignASN1(rand.Reader, key, digest[:])
	if err != nil {
		return nil, fmt.Errorf("ca: signing: %w", err)
	}
	cert := cryptobyte.NewBuilder(make([]byte, 0, len(tbsDER)+leafSignatureRoom))
	cert.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddBytes(tbsDER)
		b.AddBytes(algorithmECDSAWithSHA256)
		b.AddASN1BitString(sig)
	})
	der, err := cert.Bytes()
	if err != nil {
		return nil, fmt.Errorf("ca: encoding the certificate: %w", err)
	}
	return leafOf(der, tmpl, parent, pub)
}

const (
	// leafBufferSize is the TBSCertificate buffer: an X509-SVID with a
	// few SANs is 400 to 600 bytes.
	leafBufferSize = 1024
	// leafSignatureRoom is what the certificate adds to its
	// TBSCertificate: its SEQUENCE header, the algorithm and a P-256
	// signature in a BIT STRING.
	leafSignatureRoom = 96
)

// leafOf returns the x509.Certificate of der, a leaf signLeaf encoded
// from tmpl under parent for pub, as x509.ParseCertificate would return
// it (a test holds the two equal, field for field). It walks der only to
// find the raw pieces the struct points into; every decoded field is the
// template's, which der encodes. Parsing the whole certificate again cost
// about 5 % of the CA's CPU per certificate.
func leafOf(der []byte, tmpl, parent *x509.Certificate, pub any) (*x509.Certificate, error) {
	c := &x509.Certificate{
		Raw:                   der,
		SignatureAlgorithm:    x509.ECDSAWithSHA256,
		PublicKey:             pub,
		Version:               3,
		SerialNumber:          tmpl.SerialNumber,
		Issuer:                cloneName(parent.Subject),
		NotBefore:             tmpl.NotBefore.UTC().Truncate(time.Second),
		NotAfter:              tmpl.NotAfter.UTC().Truncate(time.Second),
		KeyUsage:              tmpl.KeyUsage,
		ExtKeyUsage:           tmpl.ExtKeyUsage,
		BasicConstraintsValid: true,
		MaxPathLen:            -1,
		AuthorityKeyId:        slices.Clone(parent.SubjectKeyId),
		DNSNames:              slices.Clone(tmpl.DNSNames),
		URIs:                  cloneURLs(tmpl.URIs),
	}
	switch pub.(type) {
	case *ecdsa.PublicKey:
		c.PublicKeyAlgorithm = x509.ECDSA
	case *rsa.PublicKey:
		c.PublicKeyAlgorithm = x509.RSA
	case ed25519.PublicKey:
		c.PublicKeyAlgorithm = x509.Ed25519
	}
	if len(c.AuthorityKeyId) == 0 {
		c.AuthorityKeyId = nil
	}
	input := cryptobyte.String(der)
	var certificate, tbs, sigAlg, extensions cryptobyte.String
	var version, serial, validity cryptobyte.String
	var sig asn1.BitString
	ok := input.ReadASN1(&certificate, cbasn1.SEQUENCE) &&
		certificate.ReadASN1Element(&tbs, cbasn1.SEQUENCE) &&
		certificate.ReadASN1(&sigAlg, cbasn1.SEQUENCE) &&
		certificate.ReadASN1BitString(&sig)
	c.RawTBSCertificate = tbs
	c.Signature = sig.RightAlign()
	var raw cryptobyte.String
	ok = ok && tbs.ReadASN1(&raw, cbasn1.SEQUENCE) &&
		raw.ReadASN1(&version, cbasn1.Tag(0).Constructed().ContextSpecific()) &&
		raw.ReadASN1Element(&serial, cbasn1.INTEGER) &&
		raw.ReadASN1(&sigAlg, cbasn1.SEQUENCE) &&
		raw.ReadASN1Element((*cryptobyte.String)(&c.RawIssuer), cbasn1.SEQUENCE) &&
		raw.ReadASN1(&validity, cbasn1.SEQUENCE) &&
		raw.ReadASN1Element((*cryptobyte.String)(&c.RawSubject), cbasn1.SEQUENCE) &&
		raw.ReadASN1Element((*cryptobyte.String)(&c.RawSubjectPublicKeyInfo), cbasn1.SEQUENCE) &&
		raw.ReadASN1(&extensions, cbasn1.Tag(3).Constructed().ContextSpecific()) &&
		extensions.ReadASN1(&extensions, cbasn1.SEQUENCE)
	for ok && !extensions.Empty() {
		var ext, id cryptobyte.String
		var e pkix.Extension
		ok = extensions.ReadASN1(&ext, cbasn1.SEQUENCE) &&
			ext.ReadASN1(&id, cbasn1.OBJECT_IDENTIFIER) &&
			(!ext.PeekASN1Tag(cbasn1.BOOLEAN) || ext.ReadASN1Boolean(&e.Critical)) &&
			ext.ReadASN1((*cryptobyte.String)(&e.Value), cbasn1.OCTET_STRING)
		if ok {
			e.Id, ok = oidOf(id)
			c.Extensions = append(c.Extensions, e)
		}
	}
	if !ok {
		return nil, errors.New("ca: the certificate just encoded does not read back")
	}
	return c, nil
}

// cloneName copies n's slices, so that the leaf shares nothing with its
// issuer's certificate, as a parsed one would not.
func cloneName(n pkix.Name) pkix.Name {
	for _, f := range []*[]string{&n.Country, &n.Organization, &n.OrganizationalUnit, &n.Locality, &n.Province, &n.StreetAddress, &n.PostalCode} {
		*f = slices.Clone(*f)
	}
	n.Names = slices.Clone(n.Names)
	n.ExtraNames = slices.Clone(n.ExtraNames)
	return n
}

func cloneURLs(urls []*url.URL) []*url.URL {
	if urls == nil {
		return nil
	}
	out := make([]*url.URL, len(urls))
	for i, u := range urls {
		c := *u
		out[i] = &c
	}
	return out
}

// leafExtensionIDs are the leaf's extension OIDs by their DER contents.
var leafExtensionIDs = func() map[string]asn1.ObjectIdentifier {
	ids := map[string]asn1.ObjectIdentifier{}
	for _, id := range []asn1.ObjectIdentifier{oidExtKeyUsage, oidExtExtKeyUsage, oidExtBasicConstraints, oidExtAuthorityKey, oidExtSubjectAltName} {
		var b cryptobyte.Builder
		b.AddASN1ObjectIdentifier(id)
		der := b.BytesOrPanic()
		ids[string(der[2:])] = id
	}
	return ids
}()

// oidOf returns the OID whose DER contents are contents: one of the
// leaf's own extensions. Each certificate gets its own copy, as a parse
// would give it.
func oidOf(contents cryptobyte.String) (asn1.ObjectIdentifier, bool) {
	id, ok := leafExtensionIDs[string(contents)]
	return slices.Clone(id), ok
}

// The leaf's constant DER pieces.
var (
	// tbsVersion is [0] EXPLICIT INTEGER 2: v3.
	tbsVersion = mustDER(func(b *cryptobyte.Builder) {
		b.AddASN1(cbasn1.Tag(0).Constructed().ContextSpecific(), func(b *cryptobyte.Builder) { b.AddASN1Int64(2) })
	})
	algorithmECDSAWithSHA256 = mustDER(func(b *cryptobyte.Builder) {
		b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) { b.AddASN1ObjectIdentifier(oidECDSAWithSHA256) })
	})
	emptySubject = mustDER(func(b *cryptobyte.Builder) { b.AddASN1(cbasn1.SEQUENCE, func(*cryptobyte.Builder) {}) })

	// p256SPKIPrefix is a P-256 SubjectPublicKeyInfo up to the point:
	// the algorithm (id-ecPublicKey, prime256v1) and the BIT STRING's
	// header and unused-bits byte. The 65-byte uncompressed point follows.
	p256SPKIPrefix = []byte{
		0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
		0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
	}
)

func mustDER(add func(*cryptobyte.Builder)) []byte {
	var b cryptobyte.Builder
	add(&b)
	return b.BytesOrPanic()
}

// subjectPublicKeyInfo encodes pub as x509.MarshalPKIXPublicKey does,
// without its reflection for a P-256 key, the common case.
func subjectPublicKeyInfo(pub any) ([]byte, error) {
	if k, ok := pub.(*ecdsa.PublicKey); ok && k.Curve == elliptic.P256() {
		point, err := k.Bytes()
		if err != nil {
			return nil, err
		}
		return append(append(make([]byte, 0, len(p256SPKIPrefix)+len(point)), p256SPKIPrefix...), point...), nil
	}
	return x509.MarshalPKIXPublicKey(pub)
}

// addTime encodes t as encoding/asn1 does: UTCTime from 1950 to 2049,
// GeneralizedTime otherwise, in whole seconds.
func addTime(b *cryptobyte.Builder, t time.Time) {
	t = t.UTC().Truncate(time.Second)
	if y := t.Year(); y >= 1950 && y < 2050 {
		b.AddASN1UTCTime(t)
		return
	}
	b.AddASN1GeneralizedTime(t)
}

// leafExtensions are an issuer's leaf extensions but the SAN, encoded
// once: for keys that only sign, and for RSA keys (keyEncipherment too).
type leafExtensions struct {
	sign, rsa []byte
}

func (e leafExtensions) forKey(pub any) []byte {
	if _, ok := pub.(*rsa.PublicKey); ok {
		return e.rsa
	}
	return e.sign
}

// leafExtensionsOf encodes the constant X509-SVID extensions of leaves
// under parent, in the order x509.CreateCertificate writes them:
// keyUsage, extKeyUsage, basicConstraints, authorityKeyIdentifier. The
// subjectAltName (addSubjectAltName) comes last.
func leafExtensionsOf(parent *x509.Certificate) leafExtensions {
	encode := func(usage x509.KeyUsage) []byte {
		return mustDER(func(b *cryptobyte.Builder) {
			addExtension(b, oidExtKeyUsage, true, func(b *cryptobyte.Builder) {
				// A BIT STRING of the usages, first bit first, trailing
				// zero bits cut: digitalSignature (bit 0),
				// keyEncipherment (bit 2).
				bits, unused := byte(0x80), byte(7)
				if usage&x509.KeyUsageKeyEncipherment != 0 {
					bits, unused = 0xa0, 5
				}
				b.AddASN1(cbasn1.BIT_STRING, func(b *cryptobyte.Builder) {
					b.AddUint8(unused)
					b.AddUint8(bits)
				})
			})
			addExtension(b, oidExtExtKeyUsage, false, func(b *cryptobyte.Builder) {
				b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
					b.AddASN1ObjectIdentifier(oidServerAuth)
					b.AddASN1ObjectIdentifier(oidClientAuth)
				})
			})
			addExtension(b, oidExtBasicConstraints, true, func(b *cryptobyte.Builder) {
				b.AddASN1(cbasn1.SEQUENCE, func(*cryptobyte.Builder) {}) // CA=false
			})
			if len(parent.SubjectKeyId) > 0 {
				addExtension(b, oidExtAuthorityKey, false, func(b *cryptobyte.Builder) {
					b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
						b.AddASN1(cbasn1.Tag(0).ContextSpecific(), func(b *cryptobyte.Builder) {
							b.AddBytes(parent.SubjectKeyId)
						})
					})
				})
			}
		})
	}
	return leafExtensions{
		sign: encode(x509.KeyUsageDigitalSignature),
		rsa:  encode(x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment),
	}
}

// addSubjectAltName adds the leaf's SAN extension. Critical: the subject
// is empty (RFC 5280 4.2.1.6). DNS names come first (dNSName, tag 2), then
// the URI (uniformResourceIdentifier, tag 6), as CreateCertificate orders
// them.
func addSubjectAltName(b *cryptobyte.Builder, tmpl *x509.Certificate) {
	addExtension(b, oidExtSubjectAltName, true, func(b *cryptobyte.Builder) {
		b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
			for _, name := range tmpl.DNSNames {
				b.AddASN1(cbasn1.Tag(2).ContextSpecific(), func(b *cryptobyte.Builder) {
					b.AddBytes([]byte(name))
				})
			}
			for _, uri := range tmpl.URIs {
				b.AddASN1(cbasn1.Tag(6).ContextSpecific(), func(b *cryptobyte.Builder) {
					b.AddBytes([]byte(uri.String()))
				})
			}
		})
	})
}

func addExtension(b *cryptobyte.Builder, id asn1.ObjectIdentifier, critical bool, value func(*cryptobyte.Builder)) {
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddASN1ObjectIdentifier(id)
		if critical {
			b.AddASN1Boolean(true)
		}
		b.AddASN1(cbasn1.OCTET_STRING, value)
	})
}

// errSignature is a signature of the fast path that does not verify: the
// issuer's private key does not match its certificate.
var errSignature = errors.New("ca: the issuer's key made a signature its certificate does not verify")
