package main

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

type inspectOptions struct {
	output string
}

func newInspectCommand() *cobra.Command {
	o := &inspectOptions{}
	cmd := &cobra.Command{
		Use:   "inspect [FILE|-]",
		Short: "Decode the certificates of a PEM file: chain, bundle or SVID",
		Long: `inspect decodes every certificate of a PEM file (an X509-SVID chain, a trust
bundle, or any PEM certificates) and prints, for each: its SPIFFE ID, other
SANs, subject and issuer, serial (hex), validity with the time left or
EXPIRED, whether it is a CA (root or intermediate) or a leaf, its key, key
usage and extended key usage.

It also checks how the certificates of the file relate: whether each is
signed by the next one, as a chain must be (leaf first, root last), or is a
self-signed root, as in a bundle. The signatures are checked, not just the
names; nothing is checked against a trust bundle.

FILE "-" or no FILE reads standard input. Blocks other than CERTIFICATE
(keys, for example) are skipped.`,
		Example: `  meshctl inspect /tmp/meshca-demo/svid.pem
  meshctl inspect .meshca/bundle.pem
  meshctl inspect -o json svid.pem | jq '.[0].notAfter'
  kubectl get secret my-svid -o jsonpath='{.data.tls\.crt}' | base64 -d | meshctl inspect -`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			path := "-"
			if len(args) == 1 {
				path = args[0]
			}
			return o.run(cmd.OutOrStdout(), path, time.Now())
		},
	}
	cmd.Flags().StringVarP(&o.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func (o *inspectOptions) run(w io.Writer, path string, now time.Time) error {
	if o.output != "text" && o.output != "json" {
		return fmt.Errorf("--output %q: want text or json", o.output)
	}
	certs, err := readCertificates(path)
	if err != nil {
		return err
	}
	infos := describeCertificates(certs, now)
	if o.output == "json" {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(infos)
	}
	writeInspectText(w, infos)
	return nil
}

// certInfo is what inspect says about one certificate. It is also the
// element of inspect's JSON output.
type certInfo struct {
	// Index is the certificate's position in the file, from 1.
	Index int `json:"index"`
	// Kind is "leaf", "intermediate CA" or "root CA".
	Kind     string `json:"kind"`
	IsCA     bool   `json:"isCA"`
	SPIFFEID string `json:"spiffeID,omitempty"`
	// URIs are the URI SANs when they are not exactly one SPIFFE ID.
	URIs           []string  `json:"uris,omitempty"`
	DNSNames       []string  `json:"dnsNames,omitempty"`
	IPAddresses    []string  `json:"ipAddresses,omitempty"`
	EmailAddresses []string  `json:"emailAddresses,omitempty"`
	Subject        string    `json:"subject"`
	Issuer         string    `json:"issuer"`
	Serial         string    `json:"serial"`
	NotBefore      time.Time `json:"notBefore"`
	NotAfter       time.Time `json:"notAfter"`
	// Status is "valid", "expired" or "not yet valid".
	Status string `json:"status"`
	// RemainingSeconds is the time to NotAfter; negative once expired.
	RemainingSeconds int64    `json:"remainingSeconds"`
	KeyAlgorithm     string   `json:"keyAlgorithm"`
	KeySize          int      `json:"keySize,omitempty"`
	Key              string   `json:"key"`
	Signature        string   `json:"signatureAlgorithm"`
	KeyUsage         []string `json:"keyUsage,omitempty"`
	ExtKeyUsage      []string `json:"extKeyUsage,omitempty"`
	MaxPathLen       *int     `json:"maxPathLen,omitempty"`
	SelfSigned       bool     `json:"selfSigned"`
	// SignedBy is the index of the certificate of the file whose key
	// signed this one, if any.
	SignedBy *int `json:"signedBy,omitempty"`
	// SignedByNext says whether the next certificate of the file signed
	// this one, as in a chain. Absent for the last certificate.
	SignedByNext *bool `json:"signedByNext,omitempty"`
	// Chain says in words how this certificate relates to the others.
	Chain  string `json:"chain"`
	SHA256 string `json:"sha256"`
}

// describeCertificates describes certs, in order, as of now.
func describeCertificates(certs []*x509.Certificate, now time.Time) []certInfo {
	infos := make([]certInfo, len(certs))
	for i, c := range certs {
		info := &infos[i]
		info.Index = i + 1
		info.IsCA = c.IsCA
		info.Subject = nameOrEmpty(c.Subject.String())
		info.Issuer = nameOrEmpty(c.Issuer.String())
		info.Serial = c.SerialNumber.Text(16)
		info.NotBefore, info.NotAfter = c.NotBefore.UTC(), c.NotAfter.UTC()
		info.RemainingSeconds = int64(c.NotAfter.Sub(now).Truncate(time.Second) / time.Second)
		switch {
		case now.After(c.NotAfter):
			info.Status = "expired"
		case now.Before(c.NotBefore):
			info.Status = "not yet valid"
		default:
			info.Status = "valid"
		}
		if id, err := x509svid.IDFromCert(c); err == nil {
			info.SPIFFEID = id.String()
		} else {
			for _, u := range c.URIs {
				info.URIs = append(info.URIs, u.String())
			}
		}
		info.DNSNames = c.DNSNames
		for _, ip := range c.IPAddresses {
			info.IPAddresses = append(info.IPAddresses, ip.String())
		}
		info.EmailAddresses = c.EmailAddresses
		info.KeyAlgorithm, info.KeySize, info.Key = describeKey(c.PublicKey)
		info.Signature = c.SignatureAlgorithm.String()
		info.KeyUsage = keyUsageNames(c.KeyUsage)
		info.ExtKeyUsage = extKeyUsageNames(c)
		if c.IsCA && (c.MaxPathLen > 0 || c.MaxPathLenZero) {
			n := c.MaxPathLen
			info.MaxPathLen = &n
		}
		sum := sha256.Sum256(c.Raw)
		info.SHA256 = fmt.Sprintf("%x", sum)

		info.SelfSigned = c.CheckSignatureFrom(c) == nil
		if i+1 < len(certs) {
			next := c.CheckSignatureFrom(certs[i+1]) == nil
			info.SignedByNext = &next
		}
		info.SignedBy = signerIndex(certs, i)
		info.Chain = chainText(info, len(certs))
		switch {
		case !c.IsCA:
			info.Kind = "leaf"
		case info.SelfSigned:
			info.Kind = "root CA"
		default:
			info.Kind = "intermediate CA"
		}
	}
	return infos
}

// signerIndex returns the 1-based index of the certificate of certs whose
// key signed certs[i], looking at the next one first, or nil.
func signerIndex(certs []*x509.Certificate, i int) *int {
	order := make([]int, 0, len(certs))
	if i+1 < len(certs) {
		order = append(order, i+1)
	}
	order = append(order, i)
	for j := range certs {
		if j != i && j != i+1 {
			order = append(order, j)
		}
	}
	for _, j := range order {
		if certs[i].CheckSignatureFrom(certs[j]) == nil {
			n := j + 1
			return &n
		}
	}
	return nil
}

func chainText(info *certInfo, n int) string {
	switch {
	case info.SelfSigned:
		return "self-signed"
	case info.SignedByNext != nil && *info.SignedByNext:
		return fmt.Sprintf("signed by certificate %d (the next one)", info.Index+1)
	case info.SignedBy != nil:
		return fmt.Sprintf("signed by certificate %d, out of chain order (a chain lists each certificate's issuer next)", *info.SignedBy)
	case info.Index < n:
		return fmt.Sprintf("NOT signed by the next certificate (%d), nor by any other in the file", info.Index+1)
	default:
		return "issuer not in the file"
	}
}

// chainSummary says in one line what two or more certificates form
// together.
func chainSummary(infos []certInfo) string {
	n := len(infos)
	allRoots, chain := true, true
	for i, info := range infos {
		allRoots = allRoots && info.SelfSigned
		if i+1 < n && !*info.SignedByNext {
			chain = false
		}
	}
	last := infos[n-1]
	switch {
	case allRoots:
		return fmt.Sprintf("a bundle of %d self-signed roots", n)
	case chain && last.SelfSigned:
		return fmt.Sprintf("a chain of %d: each certificate is signed by the next, up to a self-signed root", n)
	case chain:
		return fmt.Sprintf("a chain of %d: each certificate is signed by the next; the last one's issuer (%s) is not in the file", n, last.Issuer)
	}
	var breaks []string
	for i, info := range infos[:n-1] {
		if !*info.SignedByNext && !info.SelfSigned {
			breaks = append(breaks, fmt.Sprintf("%d is not signed by %d", i+1, i+2))
		}
	}
	if len(breaks) == 0 {
		return fmt.Sprintf("%d certificates, not one chain", n)
	}
	return fmt.Sprintf("%d certificates, not one chain in order: %s", n, strings.Join(breaks, "; "))
}

func writeInspectText(w io.Writer, infos []certInfo) {
	for i, info := range infos {
		if i > 0 {
			fmt.Fprintln(w)
		}
		fmt.Fprintf(w, "certificate %d of %d: %s\n", info.Index, len(infos), info.Kind)
		row := func(label, value string) {
			if value != "" {
				fmt.Fprintf(w, "  %-12s %s\n", label, value)
			}
		}
		row("spiffe id", info.SPIFFEID)
		if info.SPIFFEID == "" {
			row("spiffe id", "none")
			row("uris", strings.Join(info.URIs, ", "))
		}
		row("dns names", strings.Join(info.DNSNames, ", "))
		row("ip addrs", strings.Join(info.IPAddresses, ", "))
		row("emails", strings.Join(info.EmailAddresses, ", "))
		row("subject", info.Subject)
		row("issuer", info.Issuer)
		row("serial", info.Serial)
		row("not before", info.NotBefore.Format(time.RFC3339))
		row("not after", fmt.Sprintf("%s (%s)", info.NotAfter.Format(time.RFC3339), validityText(info)))
		ca := "no (leaf)"
		if info.IsCA {
			ca = "yes, " + info.Kind
			if info.MaxPathLen != nil {
				ca += fmt.Sprintf(", max path length %d", *info.MaxPathLen)
			}
		}
		row("CA", ca)
		row("key", info.Key)
		row("signature", info.Signature)
		row("key usage", orNone(info.KeyUsage))
		row("ext usage", orNone(info.ExtKeyUsage))
		row("chain", info.Chain)
		row("sha256", info.SHA256)
	}
	if len(infos) > 1 {
		fmt.Fprintf(w, "\n%s\n", chainSummary(infos))
	}
}

func validityText(info certInfo) string {
	left := time.Duration(info.RemainingSeconds) * time.Second
	switch info.Status {
	case "expired":
		return "EXPIRED " + humanDuration(-left) + " ago"
	case "not yet valid":
		now := info.NotAfter.Add(-left)
		return "NOT YET VALID, starts in " + humanDuration(info.NotBefore.Sub(now))
	}
	return "expires in " + humanDuration(left)
}

// humanDuration prints d to the second, or in days and hours beyond two
// days.
func humanDuration(d time.Duration) string {
	if d < 0 {
		d = -d
	}
	if d >= 48*time.Hour {
		days := d / (24 * time.Hour)
		hours := (d % (24 * time.Hour)) / time.Hour
		return fmt.Sprintf("%dd%dh", days, hours)
	}
	return d.Round(time.Second).String()
}

func describeKey(pub any) (alg string, bits int, text string) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		name := k.Curve.Params().Name
		return "ECDSA", k.Curve.Params().BitSize, "ECDSA " + name
	case *rsa.PublicKey:
		return "RSA", k.N.BitLen(), fmt.Sprintf("RSA %d bits", k.N.BitLen())
	case ed25519.PublicKey:
		return "Ed25519", 256, "Ed25519"
	}
	return "unknown", 0, fmt.Sprintf("unknown (%T)", pub)
}

var keyUsages = []struct {
	bit  x509.KeyUsage
	name string
}{
	{x509.KeyUsageDigitalSignature, "digitalSignature"},
	{x509.KeyUsageContentCommitment, "contentCommitment"},
	{x509.KeyUsageKeyEncipherment, "keyEncipherment"},
	{x509.KeyUsageDataEncipherment, "dataEncipherment"},
	{x509.KeyUsageKeyAgreement, "keyAgreement"},
	{x509.KeyUsageCertSign, "keyCertSign"},
	{x509.KeyUsageCRLSign, "cRLSign"},
	{x509.KeyUsageEncipherOnly, "encipherOnly"},
	{x509.KeyUsageDecipherOnly, "decipherOnly"},
}

func keyUsageNames(ku x509.KeyUsage) []string {
	var out []string
	for _, u := range keyUsages {
		if ku&u.bit != 0 {
			out = append(out, u.name)
		}
	}
	return out
}

var extKeyUsages = map[x509.ExtKeyUsage]string{
	x509.ExtKeyUsageAny:             "any",
	x509.ExtKeyUsageServerAuth:      "serverAuth",
	x509.ExtKeyUsageClientAuth:      "clientAuth",
	x509.ExtKeyUsageCodeSigning:     "codeSigning",
	x509.ExtKeyUsageEmailProtection: "emailProtection",
	x509.ExtKeyUsageTimeStamping:    "timeStamping",
	x509.ExtKeyUsageOCSPSigning:     "OCSPSigning",
}

func extKeyUsageNames(c *x509.Certificate) []string {
	var out []string
	for _, u := range c.ExtKeyUsage {
		name, ok := extKeyUsages[u]
		if !ok {
			name = fmt.Sprintf("usage %d", u)
		}
		out = append(out, name)
	}
	for _, oid := range c.UnknownExtKeyUsage {
		out = append(out, oid.String())
	}
	return out
}

func nameOrEmpty(s string) string {
	if s == "" {
		return "(empty)"
	}
	return s
}

func orNone(s []string) string {
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ", ")
}
