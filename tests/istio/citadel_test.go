package istio_test

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"math/big"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"istio.io/istio/pkg/security"
	"istio.io/istio/security/pkg/credentialfetcher"
	"istio.io/istio/security/pkg/nodeagent/caclient/providers/citadel"
	pkiutil "istio.io/istio/security/pkg/pki/util"

	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/internal/securefile"
	"github.com/meshca/meshca/testca"
)

// The workload the bootstrap token is for.
const (
	namespace      = "istio-test"
	serviceAccount = "httpbin"
)

// agentOptions are the security.Options istio-agent builds for the
// workload (pilot-agent's NewSecurityOptions and SetupSecurityOptions with
// their defaults), with CA_ADDR pointed at meshca. The credential fetcher
// is Istio's JWT one reading tokenPath, as for a projected
// service-account token; an empty tokenPath means no token at all
// (certificates only), as NewCredFetcher has it.
func agentOptions(t *testing.T, m *meshca, tokenPath string) *security.Options {
	t.Helper()
	fetcher, err := credentialfetcher.NewCredFetcher(security.JWT, trustDomain.Name(), tokenPath, "")
	require.NoError(t, err)
	return &security.Options{
		CAEndpoint:                           m.Addr,
		CAProviderName:                       "Citadel",
		TrustDomain:                          trustDomain.Name(),
		WorkloadNamespace:                    namespace,
		ServiceAccount:                       serviceAccount,
		ClusterID:                            "Kubernetes",
		WorkloadRSAKeySize:                   2048,
		SecretTTL:                            24 * time.Hour,
		SecretRotationGracePeriodRatio:       0.5,
		SecretRotationGracePeriodRatioJitter: 0.01,
		CredFetcher:                          fetcher,
		CAHeaders:                            map[string]string{},
	}
}

// newCitadelClient returns Istio's citadel client for opts, trusting
// rootCert for the server and presenting the certificate in provCert
// (key.pem and cert-chain.pem, Istio's PROV_CERT layout) when provCert is
// not empty: what istio-agent's createCitadel builds.
func newCitadelClient(t *testing.T, opts *security.Options, rootCert, provCert string) *citadel.CitadelClient {
	t.Helper()
	tlsOpts := &citadel.TLSOptions{RootCert: rootCert}
	if provCert != "" {
		tlsOpts.Key, tlsOpts.Cert = filepath.Join(provCert, "key.pem"), filepath.Join(provCert, "cert-chain.pem")
	}
	c, err := citadel.NewCitadelClient(opts, tlsOpts)
	require.NoError(t, err)
	t.Cleanup(c.Close)
	return c
}

// csrFor makes a CSR for id with Istio's own code, as the agent's secret
// manager does; opts sets the key (RSA 2048 when zero, Istio's default).
func csrFor(t *testing.T, id spiffeid.ID, opts pkiutil.CertOptions) (csrPEM, keyPEM []byte) {
	t.Helper()
	opts.Host = id.String()
	if opts.ECSigAlg == "" && opts.RSAKeySize == 0 {
		opts.RSAKeySize = 2048
	}
	csrPEM, keyPEM, err := pkiutil.GenCSR(opts)
	require.NoError(t, err)
	return csrPEM, keyPEM
}

// requireChain checks a CreateCertificate chain as istio-agent and its
// peers use it: the leaf first, then its intermediates, one PEM
// certificate an element, each signed by the next; last, meshca's trust
// bundle (every root, in PEM), which istio-agent takes as the workload's
// trust anchor (ROOTCA), as it does with istiod's answer. The leaf is an
// X509-SVID for want that verifies against the bundle (go-spiffe and
// openssl) and matches keyPEM. It returns the leaf.
func requireChain(t *testing.T, m *meshca, chain []string, keyPEM []byte, want spiffeid.ID) *x509.Certificate {
	t.Helper()
	require.GreaterOrEqual(t, len(chain), 2, "a chain holds at least the leaf and the roots")
	certs := make([]*x509.Certificate, len(chain)-1)
	for i, s := range chain[:len(chain)-1] {
		parsed, err := pemutil.ParseCertificates([]byte(s))
		require.NoError(t, err, "chain element %d", i)
		require.Len(t, parsed, 1, "chain element %d holds one certificate", i)
		certs[i] = parsed[0]
	}
	for i := range len(certs) - 1 {
		require.NoError(t, certs[i].CheckSignatureFrom(certs[i+1]), "chain element %d is signed by element %d", i, i+1)
	}
	roots, err := pemutil.ParseCertificates([]byte(chain[len(chain)-1]))
	require.NoError(t, err, "the last element")
	require.Equal(t, fingerprints(m.Bundle.X509Authorities()), fingerprints(roots), "the last element is meshca's trust bundle")
	top := certs[len(certs)-1]
	require.True(t, slices.ContainsFunc(roots, func(root *x509.Certificate) bool { return top.CheckSignatureFrom(root) == nil }),
		"the chain's last certificate is signed by a root of the bundle")

	leaf := certs[0]
	require.False(t, leaf.IsCA, "the leaf comes first")
	id, _, err := x509svid.Verify(certs, m.Bundle)
	require.NoError(t, err)
	require.Equal(t, want, id)
	testca.RequireOpenSSLVerifies(t, time.Now(), roots, certs)

	// The chain as istio-agent stores it, with the key it made.
	_, err = tls.X509KeyPair([]byte(strings.Join(chain, "")), keyPEM)
	require.NoError(t, err, "the leaf is for the CSR's key")
	return leaf
}

// fingerprints returns the SHA-256 fingerprints of certs, sorted, for
// comparing sets of roots.
func fingerprints(certs []*x509.Certificate) []string {
	out := make([]string, len(certs))
	for i, c := range certs {
		sum := sha256.Sum256(c.Raw)
		out[i] = hex.EncodeToString(sum[:])
	}
	slices.Sort(out)
	return out
}

// writeProvCert writes a certificate chain and key in Istio's PROV_CERT
// layout (key.pem, cert-chain.pem, root-cert.pem) and returns the folder.
func writeProvCert(t *testing.T, chainPEM, keyPEM, rootPEM []byte) string {
	t.Helper()
	dir := t.TempDir()
	require.NoError(t, securefile.WriteFile(filepath.Join(dir, "key.pem"), keyPEM, 0o600))
	require.NoError(t, securefile.WriteFile(filepath.Join(dir, "cert-chain.pem"), chainPEM, 0o644))
	require.NoError(t, securefile.WriteFile(filepath.Join(dir, "root-cert.pem"), rootPEM, 0o644))
	return dir
}

// requireRefused checks an error of CitadelClient.CSRSign. The client
// flattens the gRPC status into its message ("create certificate: rpc
// error: code = ... desc = ..."), so the code and reason are read there.
func requireRefused(t *testing.T, m *meshca, err error, code codes.Code, reason string) {
	t.Helper()
	require.Error(t, err)
	require.ErrorContains(t, err, "code = "+code.String()+" desc = ")
	require.ErrorContains(t, err, reason)
	require.NotContains(t, err.Error(), m.Token)
}

func TestCitadelClient(t *testing.T) {
	m := startMeshca(t, namespace, serviceAccount)
	opts := agentOptions(t, m, m.TokenPath)
	client := newCitadelClient(t, opts, m.RootCertPath, "")

	t.Run("token gets a chain", func(t *testing.T) {
		for _, tt := range []struct {
			name string
			key  pkiutil.CertOptions
		}{
			{"RSA 2048, Istio's default", pkiutil.CertOptions{}},
			{"ECDSA P-256", pkiutil.CertOptions{ECSigAlg: pkiutil.EcdsaSigAlg}},
			{"ECDSA P-384", pkiutil.CertOptions{ECSigAlg: pkiutil.EcdsaSigAlg, ECCCurve: pkiutil.P384Curve}},
			{"PKCS#8 key", pkiutil.CertOptions{ECSigAlg: pkiutil.EcdsaSigAlg, PKCS8Key: true}},
		} {
			t.Run(tt.name, func(t *testing.T) {
				csr, key := csrFor(t, m.TokenID, tt.key)
				chain, err := client.CSRSign(csr, 3600)
				require.NoError(t, err)
				requireChain(t, m, chain, key, m.TokenID)
			})
		}
	})

	t.Run("validity is the one asked, at most leaf.maxTTL", func(t *testing.T) {
		for _, tt := range []struct {
			name    string
			seconds int64
			want    time.Duration
		}{
			{"30 minutes", 1800, 30 * time.Minute},
			{"Istio's default SECRET_TTL of 24h, clamped", int64((24 * time.Hour).Seconds()), m.MaxTTL},
		} {
			t.Run(tt.name, func(t *testing.T) {
				csr, key := csrFor(t, m.TokenID, pkiutil.CertOptions{ECSigAlg: pkiutil.EcdsaSigAlg})
				before := time.Now().Truncate(time.Second)
				chain, err := client.CSRSign(csr, tt.seconds)
				after := time.Now()
				require.NoError(t, err)
				leaf := requireChain(t, m, chain, key, m.TokenID)
				require.False(t, leaf.NotAfter.Before(before.Add(tt.want)), "NotAfter %s", leaf.NotAfter)
				require.False(t, leaf.NotAfter.After(after.Add(tt.want)), "NotAfter %s", leaf.NotAfter)
			})
		}
	})

	t.Run("renews over mTLS with the issued certificate and no token", func(t *testing.T) {
		csr, key := csrFor(t, m.TokenID, pkiutil.CertOptions{})
		chain, err := client.CSRSign(csr, 3600)
		require.NoError(t, err)
		first := requireChain(t, m, chain, key, m.TokenID)

		// istio-agent with PROV_CERT: the chain as the agent writes it
		// (leaf to root) and its key; no token file.
		prov := writeProvCert(t, []byte(strings.Join(chain, "")), key, []byte(chain[len(chain)-1]))
		renewer := newCitadelClient(t, agentOptions(t, m, ""), filepath.Join(prov, "root-cert.pem"), prov)
		csr, key = csrFor(t, m.TokenID, pkiutil.CertOptions{})
		chain, err = renewer.CSRSign(csr, 3600)
		require.NoError(t, err)
		renewed := requireChain(t, m, chain, key, m.TokenID)
		require.NotEqual(t, first.SerialNumber, renewed.SerialNumber)
		require.NotEqual(t, first.PublicKey, renewed.PublicKey)

		// The server says how each caller proved who it is.
		for serial, method := range map[*big.Int]string{first.SerialNumber: "bootstrap_token", renewed.SerialNumber: "mtls"} {
			audit := m.auditLine(t, serial)
			require.Equal(t, "istio", audit["api"])
			require.Equal(t, method, audit["method"])
			require.Equal(t, m.TokenID.String(), audit["identity"])
		}
	})

	t.Run("refused", func(t *testing.T) {
		other := spiffeid.RequireFromSegments(trustDomain, "ns", "kube-system", "sa", "admin")
		foreign := testca.New(t, trustDomain).ChildCA().CreateX509SVID(m.TokenID)
		foreignChain, foreignKey, err := foreign.Marshal()
		require.NoError(t, err)
		wrongToken := filepath.Join(t.TempDir(), "istio-token")
		require.NoError(t, securefile.WriteFile(wrongToken, []byte(randomToken(t)), 0o600))

		for _, tt := range []struct {
			name   string
			client func(t *testing.T) *citadel.CitadelClient
			csrFor spiffeid.ID
			code   codes.Code
			reason string
		}{
			{
				name: "a wrong token",
				client: func(t *testing.T) *citadel.CitadelClient {
					return newCitadelClient(t, agentOptions(t, m, wrongToken), m.RootCertPath, "")
				},
				csrFor: m.TokenID,
				code:   codes.Unauthenticated,
				reason: "bearer token is not known",
			},
			{
				name: "no credential",
				client: func(t *testing.T) *citadel.CitadelClient {
					return newCitadelClient(t, agentOptions(t, m, ""), m.RootCertPath, "")
				},
				csrFor: m.TokenID,
				code:   codes.Unauthenticated,
				reason: "no credential",
			},
			{
				name: "a certificate from another CA of the same trust domain",
				client: func(t *testing.T) *citadel.CitadelClient {
					prov := writeProvCert(t, foreignChain, foreignKey, nil)
					return newCitadelClient(t, agentOptions(t, m, ""), m.RootCertPath, prov)
				},
				csrFor: m.TokenID,
				code:   codes.Unauthenticated,
				reason: "client certificate does not verify against the trust bundle",
			},
			{
				name:   "a CSR for another identity than the token's",
				client: func(t *testing.T) *citadel.CitadelClient { return client },
				csrFor: other,
				code:   codes.PermissionDenied,
				reason: `but the credential is for "` + m.TokenID.String() + `"`,
			},
		} {
			t.Run(tt.name, func(t *testing.T) {
				csr, _ := csrFor(t, tt.csrFor, pkiutil.CertOptions{ECSigAlg: pkiutil.EcdsaSigAlg})
				chain, err := tt.client(t).CSRSign(csr, 3600)
				require.Nil(t, chain)
				requireRefused(t, m, err, tt.code, tt.reason)
			})
		}
	})

	m.requireNoSecretsLogged(t)
}
