package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/internal/securefile"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
)

type issueOptions struct {
	server    serverFlags
	token     string
	tokenFile string
	certFile  string
	keyFile   string
	spiffeID  string
	ttl       time.Duration
	keyType   string
	outDir    string
	output    string
}

func newIssueCommand() *cobra.Command {
	o := &issueOptions{}
	cmd := &cobra.Command{
		Use:   "issue",
		Short: "Get an X509-SVID: generate a key, send a CSR, write cert, key and bundle",
		Long: `issue generates a key, sends a CSR for a SPIFFE ID to meshca-server, and
writes the certificate chain (svid.pem), the key (svid-key.pem, mode 0600)
and the trust bundle (bundle.pem) to --out-dir.

Authenticate with a bootstrap token (--token-file, or --token) and name the
token's identity with --spiffe-id, or renew by presenting a current
certificate (--cert and --key), whose ID is asked for again.`,
		Example: `  meshctl issue --ca-bundle .meshca/bundle.pem --token-file .meshca/demo-token \
    --spiffe-id spiffe://meshca.local/ns/default/sa/demo --out-dir /tmp/demo
  meshctl issue --ca-bundle /tmp/demo/bundle.pem \
    --cert /tmp/demo/svid.pem --key /tmp/demo/svid-key.pem --out-dir /tmp/demo`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return o.run(cmd) },
	}
	o.server.register(cmd)
	f := cmd.Flags()
	f.StringVar(&o.token, "token", "", "bootstrap token (visible to other users in the process list; prefer --token-file)")
	f.StringVar(&o.tokenFile, "token-file", "", "file holding the bootstrap token")
	f.StringVar(&o.certFile, "cert", "", "current certificate chain (PEM) to renew with over mTLS")
	f.StringVar(&o.keyFile, "key", "", "key of --cert (PEM)")
	f.StringVar(&o.spiffeID, "spiffe-id", "", "SPIFFE ID to ask for; required with a token, defaults to --cert's ID")
	f.DurationVar(&o.ttl, "ttl", 0, "lifetime to ask for (0: the server's default; longer than its maximum is clamped)")
	f.StringVar(&o.keyType, "key-type", "ec-p256", "key to generate: ec-p256, ec-p384, rsa-2048, rsa-3072 or rsa-4096")
	f.StringVar(&o.outDir, "out-dir", ".", "directory to write svid.pem, svid-key.pem and bundle.pem to")
	f.StringVarP(&o.output, "output", "o", "text", "output format: text or json")
	return cmd
}

func (o *issueOptions) run(cmd *cobra.Command) error {
	if o.output != "text" && o.output != "json" {
		return fmt.Errorf("--output %q: want text or json", o.output)
	}
	token, err := o.readToken()
	if err != nil {
		return err
	}
	var current *x509svid.SVID
	if o.certFile != "" || o.keyFile != "" {
		if current, err = x509svid.Load(o.certFile, o.keyFile); err != nil {
			return fmt.Errorf("loading --cert and --key: %w", err)
		}
	}
	if token == "" && current == nil {
		return errors.New("no credential: give --token-file (or --token), or --cert and --key to renew")
	}
	var id spiffeid.ID
	switch {
	case o.spiffeID != "":
		if id, err = spiffeid.FromString(o.spiffeID); err != nil {
			return fmt.Errorf("--spiffe-id: %w", err)
		}
	case current != nil:
		id = current.ID
	default:
		return errors.New("--spiffe-id is required with a token: the CSR must ask for the token's identity")
	}
	key, err := generateKey(o.keyType)
	if err != nil {
		return err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
	if err != nil {
		return fmt.Errorf("creating CSR: %w", err)
	}

	var source x509svid.Source
	if current != nil {
		source = current
	}
	o.server.sendsCredential = true
	conn, err := o.server.dial(source)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := o.server.context(cmd.Context())
	defer cancel()
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	req := &meshcav1.SignRequest{Csr: csr}
	if o.ttl != 0 {
		req.Ttl = durationpb.New(o.ttl)
	}
	resp, err := meshcav1.NewCertificateServiceClient(conn).Sign(ctx, req)
	if err != nil {
		return fmt.Errorf("sign: %w", err)
	}
	chain, err := pemutil.ParseDER(resp.GetCertChain())
	if err != nil {
		return fmt.Errorf("server's response: %w", err)
	}
	roots, err := pemutil.ParseDER(resp.GetBundle().GetX509Authorities())
	if err != nil {
		return fmt.Errorf("server's bundle: %w", err)
	}
	if err := checkIssued(chain, roots, id, key); err != nil {
		return err
	}
	if err := writeSVID(o.outDir, chain, key, roots); err != nil {
		return err
	}
	leaf := chain[0]
	if o.output == "json" {
		enc := json.NewEncoder(cmd.OutOrStdout())
		enc.SetIndent("", "  ")
		return enc.Encode(map[string]any{
			"spiffeID":       resp.GetSpiffeId(),
			"serial":         fmt.Sprintf("%x", leaf.SerialNumber),
			"notBefore":      leaf.NotBefore.UTC(),
			"notAfter":       leaf.NotAfter.UTC(),
			"bundleSequence": resp.GetBundle().GetSequence(),
			"files":          outFiles(o.outDir),
		})
	}
	fmt.Fprintf(cmd.OutOrStdout(), "issued %s\n  serial     %x\n  not after  %s (%s)\n  files      %s\n",
		resp.GetSpiffeId(), leaf.SerialNumber, leaf.NotAfter.UTC().Format(time.RFC3339),
		time.Until(leaf.NotAfter).Round(time.Second), strings.Join(outFiles(o.outDir), ", "))
	return nil
}

func (o *issueOptions) readToken() (string, error) {
	if o.token != "" && o.tokenFile != "" {
		return "", errors.New("give --token or --token-file, not both")
	}
	if o.tokenFile == "" {
		return o.token, nil
	}
	data, err := os.ReadFile(o.tokenFile)
	if err != nil {
		return "", fmt.Errorf("--token-file: %w", err)
	}
	return strings.TrimSpace(string(data)), nil
}

func generateKey(kind string) (crypto.Signer, error) {
	switch kind {
	case "ec-p256":
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "ec-p384":
		return ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case "rsa-2048":
		return rsa.GenerateKey(rand.Reader, 2048)
	case "rsa-3072":
		return rsa.GenerateKey(rand.Reader, 3072)
	case "rsa-4096":
		return rsa.GenerateKey(rand.Reader, 4096)
	}
	return nil, fmt.Errorf("--key-type %q: want ec-p256, ec-p384, rsa-2048, rsa-3072 or rsa-4096", kind)
}

// checkIssued refuses to write a response that is not an X509-SVID of id
// for key verified by roots: nothing a server sends is written unchecked.
func checkIssued(chain, roots []*x509.Certificate, id spiffeid.ID, key crypto.Signer) error {
	got, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(id.TrustDomain(), roots))
	if err != nil {
		return fmt.Errorf("server's response does not verify against its bundle: %w", err)
	}
	if got != id {
		return fmt.Errorf("server issued a certificate for %q; asked for %q", got, id)
	}
	if pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(chain[0].PublicKey) {
		return errors.New("server issued a certificate for another key")
	}
	return nil
}

func outFiles(dir string) []string {
	return []string{filepath.Join(dir, "svid.pem"), filepath.Join(dir, "svid-key.pem"), filepath.Join(dir, "bundle.pem")}
}

// writeSVID writes the chain, the key (0600) and the bundle, each
// atomically. The key is written first, so that a chain on disk always has
// its key beside it.
func writeSVID(dir string, chain []*x509.Certificate, key crypto.Signer, roots []*x509.Certificate) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	files := outFiles(dir)
	if err := securefile.WriteFile(files[1], pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return err
	}
	if err := securefile.WriteFile(files[0], pemutil.EncodeCertificates(chain...), 0o644); err != nil {
		return err
	}
	return securefile.WriteFile(files[2], pemutil.EncodeCertificates(roots...), 0o644)
}
