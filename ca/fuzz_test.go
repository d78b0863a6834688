package ca_test

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/testca"
)

// FuzzParseCSRForms fuzzes both CSR parsers under every policy: the size
// limit and RequirePEM hold, no request is taken by both the X509-SVID
// and the DNS form, and the DER and PEM forms of one request are read
// alike.
func FuzzParseCSRForms(f *testing.F) {
	key := testca.NewKey(f)
	svid := testca.CreateCSR(f, key, workloadID.String())
	dns := dnsCSR(f, key, &x509.CertificateRequest{})
	for _, der := range [][]byte{svid, dns, testca.CreateCSR(f, key), {0x30, 0x00}} {
		f.Add(der, uint8(0), uint16(0))
		f.Add(csrPEM(der), uint8(1), uint16(0))
		f.Add(csrPEM(der), uint8(1), uint16(len(der)))
	}
	f.Add(append(csrPEM(svid), csrPEM(dns)...), uint8(1), uint16(0))
	f.Add([]byte("  \n-----BEGIN CERTIFICATE REQUEST-----\nMAA=\n-----END CERTIFICATE REQUEST-----\ntrailer"), uint8(0), uint16(0))
	f.Fuzz(func(t *testing.T, raw []byte, mode uint8, maxSize uint16) {
		policy := ca.CSRPolicy{RequirePEM: mode&1 == 1, MaxSize: int(maxSize)}
		limit := policy.MaxSize
		if limit == 0 {
			limit = ca.MaxCSRSize
		}
		svidCSR, svidErr := ca.ParseCSR(raw, td, policy)
		dnsCSR, dnsErr := ca.ParseDNSCSR(raw, policy)
		for _, err := range []error{svidErr, dnsErr} {
			if err == nil {
				continue
			}
			var csrErr *ca.CSRError
			require.ErrorAs(t, err, &csrErr)
			require.Equal(t, len(raw) > limit, csrErr.Reason == ca.ReasonTooLarge, "size %d, limit %d: %v", len(raw), limit, err)
		}
		if svidErr == nil && dnsErr == nil {
			t.Fatal("a CSR is taken both as an X509-SVID request and as a DNS request")
		}
		var accepted *ca.CSR
		switch {
		case svidErr == nil:
			accepted = svidCSR
		case dnsErr == nil:
			accepted = dnsCSR
		default:
			return
		}
		require.LessOrEqual(t, len(raw), limit)
		block, _ := pem.Decode(raw)
		if policy.RequirePEM {
			require.NotNil(t, block, "RequirePEM took a request that is not PEM")
		}
		// The same request in the other form is read alike.
		other := csrPEM(raw)
		if bytes.HasPrefix(bytes.TrimSpace(raw), []byte("-----BEGIN")) {
			other = block.Bytes
		}
		if len(other) > ca.MaxCSRSize {
			return
		}
		parse := func(b []byte) (*ca.CSR, error) {
			if svidErr == nil {
				return ca.ParseCSR(b, td, ca.CSRPolicy{})
			}
			return ca.ParseDNSCSR(b, ca.CSRPolicy{})
		}
		again, err := parse(other)
		require.NoError(t, err, "the request in its other form is refused")
		require.Equal(t, accepted.ID, again.ID)
		require.Equal(t, accepted.DNSName, again.DNSName)
		require.Equal(t, accepted.Raw.Raw, again.Raw.Raw)
	})
}
