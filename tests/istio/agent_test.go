package istio_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"istio.io/istio/pkg/security"
	"istio.io/istio/security/pkg/nodeagent/cache"

	"github.com/meshca/meshca/internal/pemutil"
)

// newSecretManager returns Istio's secret manager, the part of istio-agent
// that makes the workload's key and CSR, calls the CA and serves the
// result to Envoy over SDS as "default" and "ROOTCA". rotations receives
// the resource names the manager asks to be pushed again, which it does
// when a certificate reaches its rotation time.
func newSecretManager(t *testing.T, client security.Client, opts *security.Options) (*cache.SecretManagerClient, <-chan string) {
	t.Helper()
	sm, err := cache.NewSecretManagerClient(client, opts)
	require.NoError(t, err)
	t.Cleanup(sm.Close)
	rotations := make(chan string, 16)
	sm.RegisterSecretHandler(func(resource string) {
		select {
		case rotations <- resource:
		default:
		}
	})
	return sm, rotations
}

// TestIstioAgentSecretManager drives meshca with istio-agent's secret
// manager: first with the token, writing the certificate out as
// OUTPUT_CERTS does; then as a VM agent restarted with PROV_CERT and
// OUTPUT_CERTS on that folder and no token, which renews over mTLS with
// the files it wrote, again when Istio's rotation timer fires.
func TestIstioAgentSecretManager(t *testing.T) {
	m := startMeshca(t, namespace, serviceAccount)
	certs := filepath.Join(t.TempDir(), "certs")
	require.NoError(t, os.Mkdir(certs, 0o700))

	// requireSecret checks a "default" secret and the files written: its
	// chain is the leaf, its intermediates and the roots, and its root
	// certificate meshca's trust bundle.
	requireSecret := func(t *testing.T, item *security.SecretItem) []byte {
		t.Helper()
		require.Equal(t, security.WorkloadKeyCertResourceName, item.ResourceName)
		roots, err := pemutil.ParseCertificates(item.RootCert)
		require.NoError(t, err)
		require.Equal(t, fingerprints(m.Bundle.X509Authorities()), fingerprints(roots), "ROOTCA is meshca's trust bundle")
		chain, err := pemutil.ParseCertificates(item.CertificateChain)
		require.NoError(t, err)
		require.Greater(t, len(chain), len(roots))
		var elems []string
		for _, c := range chain[:len(chain)-len(roots)] {
			elems = append(elems, string(pemutil.EncodeCertificates(c)))
		}
		require.Equal(t, fingerprints(roots), fingerprints(chain[len(chain)-len(roots):]), "the chain ends with the roots")
		leaf := requireChain(t, m, append(elems, string(item.RootCert)), item.PrivateKey, m.TokenID)
		for name, want := range map[string][]byte{"key.pem": item.PrivateKey, "cert-chain.pem": item.CertificateChain, "root-cert.pem": item.RootCert} {
			got, err := os.ReadFile(filepath.Join(certs, name))
			require.NoError(t, err)
			require.True(t, bytes.Equal(want, got), "%s as written by OUTPUT_CERTS", name)
		}
		return leaf.Raw
	}

	// With the token, as a Kubernetes pod's agent.
	opts := agentOptions(t, m, m.TokenPath)
	opts.OutputKeyCertToDir = certs
	sm, _ := newSecretManager(t, newCitadelClient(t, opts, m.RootCertPath, ""), opts)
	item, err := sm.GenerateSecret(security.WorkloadKeyCertResourceName)
	require.NoError(t, err)
	first := requireSecret(t, item)
	rootItem, err := sm.GenerateSecret(security.RootCertReqResourceName)
	require.NoError(t, err)
	rootCerts, err := pemutil.ParseCertificates(rootItem.RootCert)
	require.NoError(t, err)
	require.Equal(t, fingerprints(m.Bundle.X509Authorities()), fingerprints(rootCerts), "ROOTCA is meshca's trust bundle")

	// Restarted as a VM agent: PROV_CERT and OUTPUT_CERTS on the same
	// folder, no token. Every certificate it gets comes over mTLS. A grace
	// ratio of 1 makes Istio's rotation timer fire at once.
	vmOpts := agentOptions(t, m, "")
	vmOpts.ProvCert, vmOpts.OutputKeyCertToDir = certs, certs
	vmOpts.SecretRotationGracePeriodRatio, vmOpts.SecretRotationGracePeriodRatioJitter = 1, 0
	vm, rotations := newSecretManager(t, newCitadelClient(t, vmOpts, filepath.Join(certs, "root-cert.pem"), certs), vmOpts)
	item, err = vm.GenerateSecret(security.WorkloadKeyCertResourceName)
	require.NoError(t, err)
	renewed := requireSecret(t, item)
	require.NotEqual(t, first, renewed)

	waitForPush(t, rotations, security.WorkloadKeyCertResourceName)
	item, err = vm.GenerateSecret(security.WorkloadKeyCertResourceName)
	require.NoError(t, err)
	rotated := requireSecret(t, item)
	require.NotEqual(t, renewed, rotated)

	// Root rotation, step 1: a prepared root reaches the agent with its
	// next certificate, and Istio pushes the new trust anchor (ROOTCA) by
	// itself. The leaf is still issued under the old root.
	oldBundle := m.Bundle
	serial := m.prepareRoot(t)
	waitForPush(t, rotations, security.WorkloadKeyCertResourceName)
	item, err = vm.GenerateSecret(security.WorkloadKeyCertResourceName)
	require.NoError(t, err)
	roots, err := pemutil.ParseCertificates(item.RootCert)
	require.NoError(t, err)
	require.Len(t, roots, 2, "ROOTCA holds the active and the prepared root")
	require.True(t, oldBundle.HasX509Authority(roots[0]) || oldBundle.HasX509Authority(roots[1]))
	require.Contains(t, []string{roots[0].SerialNumber.Text(16), roots[1].SerialNumber.Text(16)}, serial)
	m.Bundle = x509bundle.FromX509Authorities(trustDomain, roots)
	requireSecret(t, item)
	chain, err := pemutil.ParseCertificates(item.CertificateChain)
	require.NoError(t, err)
	_, _, err = x509svid.Verify(chain[:len(chain)-len(roots)], oldBundle)
	require.NoError(t, err, "a peer that holds only the old root still verifies the new certificate")
	waitForPush(t, rotations, security.RootCertReqResourceName)
	rootItem, err = vm.GenerateSecret(security.RootCertReqResourceName)
	require.NoError(t, err)
	rootCerts, err = pemutil.ParseCertificates(rootItem.RootCert)
	require.NoError(t, err)
	require.Equal(t, fingerprints(roots), fingerprints(rootCerts), "ROOTCA is the new trust bundle")

	m.requireNoSecretsLogged(t)
}

// waitForPush waits until the secret manager asks for resource to be
// pushed again, skipping its other requests.
func waitForPush(t *testing.T, pushes <-chan string, resource string) {
	t.Helper()
	// A guard against a hang, not a timing assertion.
	guard := time.After(time.Minute)
	for {
		select {
		case got := <-pushes:
			if got == resource {
				return
			}
		case <-guard:
			t.Fatalf("Istio's secret manager did not ask for %q to be pushed", resource)
		}
	}
}
