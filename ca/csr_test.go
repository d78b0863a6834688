package ca_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/testca"
)

var (
	td      = spiffeid.RequireTrustDomainFromString("example.org")
	otherTD = spiffeid.RequireTrustDomainFromString("other.org")

	workloadID = spiffeid.RequireFromPath(td, "/ns/default/sa/web")
)

var (
	oidBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}
	oidKeyUsage         = asn1.ObjectIdentifier{2, 5, 29, 15}
)

// RSA keys are slow to make; the tests share one of each size.
var (
	rsaKeysMu sync.Mutex
	rsaKeys   = map[int]*rsa.PrivateKey{}
)

func rsaKey(t testing.TB, bits int) *rsa.PrivateKey {
	t.Helper()
	rsaKeysMu.Lock()
	defer rsaKeysMu.Unlock()
	if k, ok := rsaKeys[bits]; ok {
		return k
	}
	k, err := rsa.GenerateKey(rand.Reader, bits)
	require.NoError(t, err)
	rsaKeys[bits] = k
	return k
}

func ecKey(t testing.TB, curve elliptic.Curve) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(curve, rand.Reader)
	require.NoError(t, err)
	return k
}

func csrPEM(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

// basicConstraintsExt encodes a basicConstraints extension as RFC 5280
// 4.2.1.9 does.
func basicConstraintsExt(t testing.TB, isCA bool) pkix.Extension {
	t.Helper()
	value, err := asn1.Marshal(struct {
		IsCA       bool `asn1:"optional"`
		MaxPathLen int  `asn1:"optional,default:-1"`
	}{IsCA: isCA, MaxPathLen: -1})
	require.NoError(t, err)
	return pkix.Extension{Id: oidBasicConstraints, Critical: true, Value: value}
}

// keyUsageExt encodes a keyUsage extension with the given RFC 5280 bits
// (digitalSignature is 0, keyCertSign 5, cRLSign 6) set.
func keyUsageExt(t testing.TB, bits ...int) pkix.Extension {
	t.Helper()
	bs := asn1.BitString{Bytes: make([]byte, 1)}
	for _, b := range bits {
		bs.Bytes[0] |= 0x80 >> b
		bs.BitLength = max(bs.BitLength, b+1)
	}
	value, err := asn1.Marshal(bs)
	require.NoError(t, err)
	return pkix.Extension{Id: oidKeyUsage, Critical: true, Value: value}
}

// tamperSignature returns der with the last byte of its signature flipped.
func tamperSignature(t testing.TB, der []byte) []byte {
	t.Helper()
	req, err := x509.ParseCertificateRequest(der)
	require.NoError(t, err)
	i := bytes.LastIndex(der, req.Signature)
	require.Positive(t, i, "signature not found in the DER")
	out := bytes.Clone(der)
	out[i+len(req.Signature)-1] ^= 0xff
	return out
}

// Structures of a PKCS#10 request, to build requests that
// x509.CreateCertificateRequest cannot.
type rawCSR struct {
	Raw                asn1.RawContent
	TBS                rawTBSCSR
	SignatureAlgorithm pkix.AlgorithmIdentifier
	SignatureValue     asn1.BitString
}

type rawTBSCSR struct {
	Raw        asn1.RawContent
	Version    int
	Subject    asn1.RawValue
	PublicKey  asn1.RawValue
	Attributes []asn1.RawValue `asn1:"tag:0"`
}

// withPublicKey returns der with its public key replaced by pub. The
// signature is left as it was, so it no longer verifies.
func withPublicKey(t testing.TB, der []byte, pub any) []byte {
	t.Helper()
	var csr rawCSR
	rest, err := asn1.Unmarshal(der, &csr)
	require.NoError(t, err)
	require.Empty(t, rest)
	spki, err := x509.MarshalPKIXPublicKey(pub)
	require.NoError(t, err)
	csr.Raw, csr.TBS.Raw = nil, nil
	csr.TBS.PublicKey = asn1.RawValue{FullBytes: spki}
	out, err := asn1.Marshal(csr)
	require.NoError(t, err)
	return out
}

func TestParseCSR(t *testing.T) {
	p256 := testca.NewKey(t)
	validDER := testca.CreateCSR(t, p256, workloadID.String())
	validPEM := csrPEM(validDER)

	rsa2048 := rsaKey(t, 2048)
	p384 := ecKey(t, elliptic.P384())

	tests := []struct {
		name      string
		raw       []byte
		policy    ca.CSRPolicy
		wantKey   crypto.PublicKey
		wantDNS   []string
		wantNoDNS bool
	}{
		{
			name:    "P-256 DER",
			raw:     validDER,
			wantKey: p256.Public(),
		},
		{
			name:    "P-256 PEM",
			raw:     validPEM,
			wantKey: p256.Public(),
		},
		{
			name:    "PEM with surrounding whitespace",
			raw:     append(append([]byte("\n  \n"), validPEM...), "\n\n"...),
			wantKey: p256.Public(),
		},
		{
			name:    "PEM of type NEW CERTIFICATE REQUEST",
			raw:     pem.EncodeToMemory(&pem.Block{Type: "NEW CERTIFICATE REQUEST", Bytes: validDER}),
			wantKey: p256.Public(),
		},
		{
			name:    "P-384",
			raw:     testca.CreateCSR(t, p384, workloadID.String()),
			wantKey: p384.Public(),
		},
		{
			name:    "RSA 2048",
			raw:     testca.CreateCSR(t, rsa2048, workloadID.String()),
			wantKey: rsa2048.Public(),
		},
		{
			name:    "exactly the custom size limit",
			raw:     validDER,
			policy:  ca.CSRPolicy{MaxSize: len(validDER)},
			wantKey: p256.Public(),
		},
		{
			name: "basicConstraints CA=false",
			raw: testca.SignCSR(t, &x509.CertificateRequest{
				URIs:            []*url.URL{workloadID.URL()},
				ExtraExtensions: []pkix.Extension{basicConstraintsExt(t, false)},
			}, p256),
			wantKey: p256.Public(),
		},
		{
			name: "keyUsage digitalSignature",
			raw: testca.SignCSR(t, &x509.CertificateRequest{
				URIs:            []*url.URL{workloadID.URL()},
				ExtraExtensions: []pkix.Extension{keyUsageExt(t, 0)},
			}, p256),
			wantKey: p256.Public(),
		},
		{
			name: "subject is ignored",
			raw: testca.SignCSR(t, &x509.CertificateRequest{
				Subject: pkix.Name{CommonName: "web", Organization: []string{"acme"}},
				URIs:    []*url.URL{workloadID.URL()},
			}, p256),
			wantKey: p256.Public(),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			csr, err := ca.ParseCSR(tt.raw, td, tt.policy)
			require.NoError(t, err)
			require.Equal(t, workloadID, csr.ID)
			require.True(t, tt.wantKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(csr.PublicKey), "public key differs")
			require.NotNil(t, csr.Raw)
			require.NoError(t, csr.Raw.CheckSignature())
		})
	}
}

func TestParseCSRRefusals(t *testing.T) {
	key := testca.NewKey(t)
	validDER := testca.CreateCSR(t, key, workloadID.String())
	validPEM := csrPEM(validDER)

	root := testca.New(t, td)

	csrWith := func(tmpl *x509.CertificateRequest) []byte {
		if tmpl.URIs == nil {
			tmpl.URIs = []*url.URL{workloadID.URL()}
		}
		return testca.SignCSR(t, tmpl, key)
	}

	oversized := make([]byte, ca.MaxCSRSize+1)
	copy(oversized, validDER)

	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)

	// An RSA key just over the maximum: the CSR carries it with a signature
	// made by another key, which the key check must refuse before it costs
	// a verification.
	hugeN, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), ca.MaxRSABits+8))
	require.NoError(t, err)
	hugeN.SetBit(hugeN, ca.MaxRSABits+7, 1).SetBit(hugeN, 0, 1)
	hugeRSA := withPublicKey(t, validDER, &rsa.PublicKey{N: hugeN, E: 65537})

	tests := []struct {
		name    string
		raw     []byte
		policy  ca.CSRPolicy
		reason  ca.CSRReason
		wantErr string // the full text, when set
		errPart string // a prefix of the text, when the rest is the standard library's
		wrapped bool   // the CSRError wraps a cause
	}{
		{
			name:    "empty",
			raw:     nil,
			reason:  ca.ReasonMalformed,
			wantErr: "ca: CSR is empty",
		},
		{
			name:    "empty slice",
			raw:     []byte{},
			reason:  ca.ReasonMalformed,
			wantErr: "ca: CSR is empty",
		},
		{
			name:    "over the default size limit",
			raw:     oversized,
			reason:  ca.ReasonTooLarge,
			wantErr: "ca: CSR is 16385 bytes, more than the limit of 16384",
		},
		{
			name:    "over a custom size limit",
			raw:     validDER,
			policy:  ca.CSRPolicy{MaxSize: len(validDER) - 1},
			reason:  ca.ReasonTooLarge,
			wantErr: "ca: CSR is " + strconv.Itoa(len(validDER)) + " bytes, more than the limit of " + strconv.Itoa(len(validDER)-1),
		},
		{
			name:    "PEM over a custom size limit that fits the DER",
			raw:     validPEM,
			policy:  ca.CSRPolicy{MaxSize: len(validDER)},
			reason:  ca.ReasonTooLarge,
			wantErr: "ca: CSR is " + strconv.Itoa(len(validPEM)) + " bytes, more than the limit of " + strconv.Itoa(len(validDER)),
		},
		{
			name:    "not a CSR",
			raw:     []byte("hello, I am not a certificate request"),
			reason:  ca.ReasonMalformed,
			errPart: "ca: CSR is not a PKCS#10 request: ",
			wrapped: true,
		},
		{
			name:    "a certificate, not a CSR",
			raw:     root.Cert.Raw,
			reason:  ca.ReasonMalformed,
			errPart: "ca: CSR is not a PKCS#10 request: ",
			wrapped: true,
		},
		{
			name:    "truncated DER",
			raw:     validDER[:len(validDER)/2],
			reason:  ca.ReasonMalformed,
			errPart: "ca: CSR is not a PKCS#10 request: ",
			wrapped: true,
		},
		{
			name:    "DER with trailing data",
			raw:     append(bytes.Clone(validDER), 0x00),
			reason:  ca.ReasonMalformed,
			errPart: "ca: CSR is not a PKCS#10 request: ",
			wrapped: true,
		},
		{
			name:    "garbage PEM",
			raw:     []byte("-----BEGIN CERTIFICATE REQUEST-----\n!!! not base64 !!!\n-----END CERTIFICATE REQUEST-----\n"),
			reason:  ca.ReasonMalformed,
			wantErr: "ca: CSR is not valid PEM",
		},
		{
			name:    "PEM without an end line",
			raw:     validPEM[:bytes.Index(validPEM, []byte("-----END"))],
			reason:  ca.ReasonMalformed,
			wantErr: "ca: CSR is not valid PEM",
		},
		{
			name:    "PEM of garbage DER",
			raw:     csrPEM([]byte("not DER")),
			reason:  ca.ReasonMalformed,
			errPart: "ca: CSR is not a PKCS#10 request: ",
			wrapped: true,
		},
		{
			name:    "wrong PEM type",
			raw:     pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: validDER}),
			reason:  ca.ReasonMalformed,
			wantErr: `ca: PEM block is "CERTIFICATE", want "CERTIFICATE REQUEST"`,
		},
		{
			name:    "PEM with trailing data",
			raw:     append(bytes.Clone(validPEM), "trailing"...),
			reason:  ca.ReasonMalformed,
			wantErr: "ca: CSR PEM has data after the first block",
		},
		{
			name:    "PEM with two requests",
			raw:     append(bytes.Clone(validPEM), validPEM...),
			reason:  ca.ReasonMalformed,
			wantErr: "ca: CSR PEM has data after the first block",
		},
		{
			name:    "tampered signature",
			raw:     tamperSignature(t, validDER),
			reason:  ca.ReasonSignature,
			errPart: "ca: CSR signature does not verify: ",
			wrapped: true,
		},
		{
			name:    "tampered signature in PEM",
			raw:     csrPEM(tamperSignature(t, validDER)),
			reason:  ca.ReasonSignature,
			errPart: "ca: CSR signature does not verify: ",
			wrapped: true,
		},
		{
			name:    "public key swapped after signing",
			raw:     withPublicKey(t, validDER, testca.NewKey(t).Public()),
			reason:  ca.ReasonSignature,
			errPart: "ca: CSR signature does not verify: ",
			wrapped: true,
		},
		{
			name:    "no URI SAN",
			raw:     testca.CreateCSR(t, key),
			reason:  ca.ReasonURISAN,
			wantErr: "ca: CSR has no URI SAN; put the SPIFFE ID in exactly one",
		},
		{
			name:    "two URI SANs",
			raw:     testca.CreateCSR(t, key, workloadID.String(), "spiffe://example.org/other"),
			reason:  ca.ReasonURISAN,
			wantErr: "ca: CSR has 2 URI SANs; an X509-SVID has exactly one",
		},
		{
			name:    "non-spiffe URI",
			raw:     testca.CreateCSR(t, key, "https://example.org/ns/default/sa/web"),
			reason:  ca.ReasonURISAN,
			wantErr: "ca: CSR URI SAN is not a SPIFFE ID: scheme is missing or invalid",
			wrapped: true,
		},
		{
			name:    "spiffe URI with a query",
			raw:     testca.CreateCSR(t, key, "spiffe://example.org/web?x=1"),
			reason:  ca.ReasonURISAN,
			errPart: "ca: CSR URI SAN is not a SPIFFE ID: ",
			wrapped: true,
		},
		{
			name:    "trust domain ID with no path",
			raw:     testca.CreateCSR(t, key, "spiffe://example.org"),
			reason:  ca.ReasonURISAN,
			wantErr: `ca: CSR asks for "spiffe://example.org", the trust domain itself; a workload ID has a path`,
		},
		{
			name:    "another trust domain",
			raw:     testca.CreateCSR(t, key, "spiffe://other.org/ns/default/sa/web"),
			reason:  ca.ReasonTrustDomain,
			wantErr: `ca: CSR asks for an ID in trust domain "other.org"; this CA issues for "example.org"`,
		},
		{
			name:    "a trust domain that only ends like ours",
			raw:     testca.CreateCSR(t, key, "spiffe://evil-example.org/ns/default/sa/web"),
			reason:  ca.ReasonTrustDomain,
			wantErr: `ca: CSR asks for an ID in trust domain "evil-example.org"; this CA issues for "example.org"`,
		},
		{
			name:    "DNS SAN",
			raw:     csrWith(&x509.CertificateRequest{DNSNames: []string{"web.default.svc"}}),
			reason:  ca.ReasonForbiddenSAN,
			wantErr: "ca: CSR asks for DNS, IP or email SANs; an X509-SVID request carries only its SPIFFE ID",
		},
		{
			name:    "IP SAN",
			raw:     csrWith(&x509.CertificateRequest{IPAddresses: []net.IP{net.IPv4(10, 0, 0, 1)}}),
			reason:  ca.ReasonForbiddenSAN,
			wantErr: "ca: CSR asks for DNS, IP or email SANs; an X509-SVID request carries only its SPIFFE ID",
		},
		{
			name:    "email SAN",
			raw:     csrWith(&x509.CertificateRequest{EmailAddresses: []string{"web@example.org"}}),
			reason:  ca.ReasonForbiddenSAN,
			wantErr: "ca: CSR asks for DNS, IP or email SANs; an X509-SVID request carries only its SPIFFE ID",
		},
		{
			name:    "basicConstraints CA=true",
			raw:     csrWith(&x509.CertificateRequest{ExtraExtensions: []pkix.Extension{basicConstraintsExt(t, true)}}),
			reason:  ca.ReasonCARequest,
			wantErr: "ca: CSR asks for CA=true; workload certificates are never CAs",
		},
		{
			name: "basicConstraints CA=true, not critical",
			raw: csrWith(&x509.CertificateRequest{ExtraExtensions: []pkix.Extension{func() pkix.Extension {
				e := basicConstraintsExt(t, true)
				e.Critical = false
				return e
			}()}}),
			reason:  ca.ReasonCARequest,
			wantErr: "ca: CSR asks for CA=true; workload certificates are never CAs",
		},
		{
			name: "malformed basicConstraints",
			raw: csrWith(&x509.CertificateRequest{ExtraExtensions: []pkix.Extension{
				{Id: oidBasicConstraints, Value: []byte{0x01, 0x01, 0xff}},
			}}),
			reason:  ca.ReasonMalformed,
			errPart: "ca: CSR has a malformed basicConstraints extension: ",
			wrapped: true,
		},
		{
			name:    "keyUsage keyCertSign",
			raw:     csrWith(&x509.CertificateRequest{ExtraExtensions: []pkix.Extension{keyUsageExt(t, 0, 5)}}),
			reason:  ca.ReasonCARequest,
			wantErr: "ca: CSR asks for keyCertSign or cRLSign; workload certificates never sign certificates",
		},
		{
			name:    "keyUsage cRLSign",
			raw:     csrWith(&x509.CertificateRequest{ExtraExtensions: []pkix.Extension{keyUsageExt(t, 6)}}),
			reason:  ca.ReasonCARequest,
			wantErr: "ca: CSR asks for keyCertSign or cRLSign; workload certificates never sign certificates",
		},
		{
			name: "malformed keyUsage",
			raw: csrWith(&x509.CertificateRequest{ExtraExtensions: []pkix.Extension{
				{Id: oidKeyUsage, Value: []byte{0x04, 0x00}},
			}}),
			reason:  ca.ReasonMalformed,
			errPart: "ca: CSR has a malformed keyUsage extension: ",
			wrapped: true,
		},
		{
			name:    "RSA 1024",
			raw:     testca.CreateCSR(t, rsaKey(t, 1024), workloadID.String()),
			reason:  ca.ReasonKey,
			wantErr: "ca: RSA key of 1024 bits is not supported; use 2048 to 8192 bits",
		},
		{
			name:    "RSA over the maximum, refused before its signature is checked",
			raw:     hugeRSA,
			reason:  ca.ReasonKey,
			wantErr: "ca: RSA key of 8200 bits is not supported; use 2048 to 8192 bits",
		},
		{
			name:    "P-224",
			raw:     testca.CreateCSR(t, ecKey(t, elliptic.P224()), workloadID.String()),
			reason:  ca.ReasonKey,
			wantErr: "ca: ECDSA curve P-224 is not supported; use P-256 or P-384",
		},
		{
			name:    "P-521",
			raw:     testca.CreateCSR(t, ecKey(t, elliptic.P521()), workloadID.String()),
			reason:  ca.ReasonKey,
			wantErr: "ca: ECDSA curve P-521 is not supported; use P-256 or P-384",
		},
		{
			name:    "ed25519",
			raw:     testca.CreateCSR(t, edKey, workloadID.String()),
			reason:  ca.ReasonKey,
			wantErr: "ca: CSR key type ed25519.PublicKey is not supported; use ECDSA P-256, P-384 or RSA",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			csr, err := ca.ParseCSR(tt.raw, td, tt.policy)
			require.Error(t, err)
			require.Nil(t, csr)

			var csrErr *ca.CSRError
			require.ErrorAs(t, err, &csrErr)
			require.Equal(t, tt.reason, csrErr.Reason)
			switch {
			case tt.wantErr != "":
				require.EqualError(t, err, tt.wantErr)
			case tt.errPart != "":
				require.True(t, strings.HasPrefix(err.Error(), tt.errPart), "error %q does not start with %q", err, tt.errPart)
				require.Greater(t, len(err.Error()), len(tt.errPart), "error %q has no cause", err)
			default:
				t.Fatal("test case asserts no error text")
			}
			if tt.wrapped {
				require.Error(t, errors.Unwrap(err), "the CSRError should wrap its cause")
			} else {
				require.NoError(t, errors.Unwrap(err))
			}
		})
	}
}

func FuzzParseCSR(f *testing.F) {
	key := testca.NewKey(f)
	der := testca.CreateCSR(f, key, workloadID.String())
	f.Add(der)
	f.Add(csrPEM(der))
	f.Add(testca.CreateCSR(f, key, "spiffe://other.org/x"))
	f.Add(testca.CreateCSR(f, key))
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n"))
	f.Add([]byte{0x30, 0x00})
	f.Fuzz(func(t *testing.T, raw []byte) {
		csr, err := ca.ParseCSR(raw, td, ca.CSRPolicy{})
		if err != nil {
			var csrErr *ca.CSRError
			require.ErrorAs(t, err, &csrErr)
			require.NotEmpty(t, csrErr.Reason)
			require.Nil(t, csr)
			return
		}
		require.Equal(t, td, csr.ID.TrustDomain())
		require.NotEmpty(t, csr.ID.Path())
		require.Empty(t, csr.Raw.DNSNames)
		require.Empty(t, csr.Raw.IPAddresses)
		require.Empty(t, csr.Raw.EmailAddresses)
		require.Len(t, csr.Raw.URIs, 1)
		require.NoError(t, csr.Raw.CheckSignature())
		switch k := csr.PublicKey.(type) {
		case *ecdsa.PublicKey:
			require.Contains(t, []string{"P-256", "P-384"}, k.Curve.Params().Name)
		case *rsa.PublicKey:
			require.GreaterOrEqual(t, k.N.BitLen(), ca.MinRSABits)
			require.LessOrEqual(t, k.N.BitLen(), ca.MaxRSABits)
		default:
			t.Fatalf("accepted a key of type %T", k)
		}
	})
}

const linkerdName = "web.default.serviceaccount.identity.linkerd.cluster.local"

func dnsCSR(t testing.TB, key crypto.Signer, tmpl *x509.CertificateRequest) []byte {
	t.Helper()
	if tmpl.DNSNames == nil {
		tmpl.DNSNames = []string{linkerdName}
	}
	return testca.SignCSR(t, tmpl, key)
}

func TestParseDNSCSR(t *testing.T) {
	key := testca.NewKey(t)
	der := dnsCSR(t, key, &x509.CertificateRequest{})
	for _, tt := range []struct {
		name string
		raw  []byte
	}{
		{name: "DER", raw: der},
		{name: "PEM", raw: csrPEM(der)},
		// Linkerd's own identity service allows the name as the common
		// name; the subject is never copied, so any is ignored.
		{name: "common name of the identity", raw: dnsCSR(t, key, &x509.CertificateRequest{Subject: pkix.Name{CommonName: linkerdName}})},
		{name: "another subject", raw: dnsCSR(t, key, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "x", Organization: []string{"acme"}}})},
		{name: "single label", raw: dnsCSR(t, key, &x509.CertificateRequest{DNSNames: []string{"web"}})},
	} {
		t.Run(tt.name, func(t *testing.T) {
			csr, err := ca.ParseDNSCSR(tt.raw, ca.CSRPolicy{})
			require.NoError(t, err)
			require.True(t, key.Public().(*ecdsa.PublicKey).Equal(csr.PublicKey))
			require.Equal(t, csr.Raw.DNSNames[0], csr.DNSName)
			require.True(t, csr.ID.IsZero())
		})
	}
}

func TestParseDNSCSRRefusals(t *testing.T) {
	key := testca.NewKey(t)
	valid := dnsCSR(t, key, &x509.CertificateRequest{})
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	for _, tt := range []struct {
		name    string
		raw     []byte
		policy  ca.CSRPolicy
		reason  ca.CSRReason
		wantErr string
		errPart string
	}{
		{name: "empty", raw: nil, reason: ca.ReasonMalformed, wantErr: "ca: CSR is empty"},
		{name: "over a custom size limit", raw: valid, policy: ca.CSRPolicy{MaxSize: 100}, reason: ca.ReasonTooLarge, wantErr: "ca: CSR is " + strconv.Itoa(len(valid)) + " bytes, more than the limit of 100"},
		{name: "garbage", raw: []byte("garbage"), reason: ca.ReasonMalformed, errPart: "ca: CSR is not a PKCS#10 request: "},
		{name: "tampered signature", raw: tamperSignature(t, valid), reason: ca.ReasonSignature, errPart: "ca: CSR signature does not verify: "},
		{name: "P-384", raw: dnsCSR(t, ecKey(t, elliptic.P384()), &x509.CertificateRequest{}), reason: ca.ReasonKey, wantErr: "ca: ECDSA curve P-384 is not supported for this request; use P-256"},
		{name: "RSA 2048", raw: dnsCSR(t, rsaKey(t, 2048), &x509.CertificateRequest{}), reason: ca.ReasonKey, wantErr: "ca: CSR key type *rsa.PublicKey is not supported for this request; use ECDSA P-256"},
		{name: "ed25519", raw: dnsCSR(t, edKey, &x509.CertificateRequest{}), reason: ca.ReasonKey, wantErr: "ca: CSR key type ed25519.PublicKey is not supported for this request; use ECDSA P-256"},
		{name: "no DNS SAN", raw: testca.CreateCSR(t, key), reason: ca.ReasonDNSSAN, wantErr: "ca: CSR has no DNS SAN; put the identity name in exactly one"},
		{name: "two DNS SANs", raw: dnsCSR(t, key, &x509.CertificateRequest{DNSNames: []string{linkerdName, "other.example.org"}}), reason: ca.ReasonDNSSAN, wantErr: "ca: CSR has 2 DNS SANs; put the identity name in exactly one"},
		{name: "URI SAN", raw: dnsCSR(t, key, &x509.CertificateRequest{URIs: []*url.URL{workloadID.URL()}}), reason: ca.ReasonForbiddenSAN, wantErr: "ca: CSR asks for URI, IP or email SANs; a request of the DNS form carries only its DNS name"},
		{name: "URI SAN only", raw: testca.CreateCSR(t, key, workloadID.String()), reason: ca.ReasonForbiddenSAN, wantErr: "ca: CSR asks for URI, IP or email SANs; a request of the DNS form carries only its DNS name"},
		{name: "IP SAN", raw: dnsCSR(t, key, &x509.CertificateRequest{IPAddresses: []net.IP{net.IPv4(10, 0, 0, 1)}}), reason: ca.ReasonForbiddenSAN, wantErr: "ca: CSR asks for URI, IP or email SANs; a request of the DNS form carries only its DNS name"},
		{name: "email SAN", raw: dnsCSR(t, key, &x509.CertificateRequest{EmailAddresses: []string{"web@example.org"}}), reason: ca.ReasonForbiddenSAN, wantErr: "ca: CSR asks for URI, IP or email SANs; a request of the DNS form carries only its DNS name"},
		{name: "CA=true", raw: dnsCSR(t, key, &x509.CertificateRequest{ExtraExtensions: []pkix.Extension{basicConstraintsExt(t, true)}}), reason: ca.ReasonCARequest, wantErr: "ca: CSR asks for CA=true; workload certificates are never CAs"},
		{name: "upper case", raw: dnsCSR(t, key, &x509.CertificateRequest{DNSNames: []string{"Web.default.svc"}}), reason: ca.ReasonDNSSAN, wantErr: `ca: CSR DNS SAN "Web.default.svc" is not a lowercase DNS name: it has a character other than a-z, 0-9, '-' and '.'`},
		{name: "wildcard", raw: dnsCSR(t, key, &x509.CertificateRequest{DNSNames: []string{"*.default.svc"}}), reason: ca.ReasonDNSSAN, wantErr: `ca: CSR DNS SAN "*.default.svc" is not a lowercase DNS name: it has a character other than a-z, 0-9, '-' and '.'`},
		{name: "trailing dot", raw: dnsCSR(t, key, &x509.CertificateRequest{DNSNames: []string{"web.default.svc."}}), reason: ca.ReasonDNSSAN, wantErr: `ca: CSR DNS SAN "web.default.svc." is not a lowercase DNS name: a label is empty or longer than 63 bytes`},
		{name: "leading hyphen", raw: dnsCSR(t, key, &x509.CertificateRequest{DNSNames: []string{"-web.default"}}), reason: ca.ReasonDNSSAN, wantErr: `ca: CSR DNS SAN "-web.default" is not a lowercase DNS name: a label starts or ends with a hyphen`},
		{name: "label over 63", raw: dnsCSR(t, key, &x509.CertificateRequest{DNSNames: []string{strings.Repeat("a", 64) + ".default"}}), reason: ca.ReasonDNSSAN, wantErr: `ca: CSR DNS SAN "` + strings.Repeat("a", 64) + `.default" is not a lowercase DNS name: a label is empty or longer than 63 bytes`},
		{name: "name over 253", raw: dnsCSR(t, key, &x509.CertificateRequest{DNSNames: []string{strings.Repeat("a.", 127) + "a"}}), reason: ca.ReasonDNSSAN, errPart: `ca: CSR DNS SAN "a.a.`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			csr, err := ca.ParseDNSCSR(tt.raw, tt.policy)
			require.Nil(t, csr)
			var csrErr *ca.CSRError
			require.ErrorAs(t, err, &csrErr)
			require.Equal(t, tt.reason, csrErr.Reason)
			if tt.wantErr != "" {
				require.EqualError(t, err, tt.wantErr)
			} else {
				require.True(t, strings.HasPrefix(err.Error(), tt.errPart), "error %q does not start with %q", err, tt.errPart)
			}
		})
	}
	t.Run("name over 253 says so", func(t *testing.T) {
		_, err := ca.ParseDNSCSR(dnsCSR(t, key, &x509.CertificateRequest{DNSNames: []string{strings.Repeat("a.", 127) + "a"}}), ca.CSRPolicy{})
		require.ErrorContains(t, err, "is not a lowercase DNS name: it is 255 bytes, more than 253")
	})
}

// RequirePEM refuses DER, for APIs whose CSR is a PEM string.
func TestCSRPolicyRequirePEM(t *testing.T) {
	key := testca.NewKey(t)
	der := testca.CreateCSR(t, key, workloadID.String())
	_, err := ca.ParseCSR(csrPEM(der), td, ca.CSRPolicy{RequirePEM: true})
	require.NoError(t, err)
	_, err = ca.ParseCSR(der, td, ca.CSRPolicy{RequirePEM: true})
	var csrErr *ca.CSRError
	require.ErrorAs(t, err, &csrErr)
	require.Equal(t, ca.ReasonMalformed, csrErr.Reason)
	require.EqualError(t, err, `ca: CSR is not PEM; send a PEM block of type "CERTIFICATE REQUEST"`)
}

func FuzzParseDNSCSR(f *testing.F) {
	key := testca.NewKey(f)
	der := dnsCSR(f, key, &x509.CertificateRequest{})
	f.Add(der)
	f.Add(csrPEM(der))
	f.Add(dnsCSR(f, key, &x509.CertificateRequest{DNSNames: []string{"a", "b"}}))
	f.Add(testca.CreateCSR(f, key, workloadID.String()))
	f.Add([]byte{0x30, 0x00})
	f.Fuzz(func(t *testing.T, raw []byte) {
		csr, err := ca.ParseDNSCSR(raw, ca.CSRPolicy{})
		if err != nil {
			var csrErr *ca.CSRError
			require.ErrorAs(t, err, &csrErr)
			require.NotEmpty(t, csrErr.Reason)
			require.Nil(t, csr)
			return
		}
		require.Equal(t, []string{csr.DNSName}, csr.Raw.DNSNames)
		require.LessOrEqual(t, len(csr.DNSName), 253)
		require.Empty(t, csr.Raw.URIs)
		require.Empty(t, csr.Raw.IPAddresses)
		require.Empty(t, csr.Raw.EmailAddresses)
		require.NoError(t, csr.Raw.CheckSignature())
		k, ok := csr.PublicKey.(*ecdsa.PublicKey)
		require.True(t, ok, "accepted a key of type %T", csr.PublicKey)
		require.Equal(t, "P-256", k.Curve.Params().Name)
	})
}
