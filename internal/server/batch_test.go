package server_test

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/internal/server"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/testca"
)

// proofAuditMethod is the method an SVID-proof entry is audited with. The
// proof's chain is authenticated by the SVID authenticator, as an mTLS
// client certificate is, and the shared path names it as a proof.
const proofAuditMethod = string(identity.MethodSVIDProof)

// batchIdentities returns n identities and a static-token authenticator
// that knows a token for each, to add to a harness's chain.
func batchIdentities(t testing.TB, n int) ([]spiffeid.ID, []string, identity.Authenticator) {
	ids := make([]spiffeid.ID, n)
	tokens := make([]string, n)
	entries := make([]identity.TokenFileEntry, n)
	for i := range ids {
		ids[i] = spiffeid.RequireFromPath(td, fmt.Sprintf("/ns/batch/sa/w%03d", i))
		tokens[i] = fmt.Sprintf("batch-token-%03d-0123456789abcdef", i)
		entries[i] = identity.TokenFileEntry{ID: ids[i].String(), Token: tokens[i]}
	}
	authn, err := identity.NewStaticTokens(identity.TokenFile{Tokens: entries}, td)
	require.NoError(t, err)
	return ids, tokens, authn
}

// currentSVID returns an SVID for id from the harness's CA, as a
// workload's current one.
func (h *harness) currentSVID(t testing.TB, id spiffeid.ID) *x509svid.SVID {
	return issueCurrent(t, h.ca, id)
}

func issueCurrent(tb testing.TB, c *ca.CA, id spiffeid.ID) *x509svid.SVID {
	key := testca.NewKey(tb)
	issued, err := c.Sign(context.Background(), ca.SignRequest{PublicKey: key.Public(), ID: id})
	require.NoError(tb, err)
	return &x509svid.SVID{ID: id, Certificates: issued.Chain, PrivateKey: key}
}

// tokenEntry is an entry for id's new key proven by token.
func tokenEntry(t testing.TB, key crypto.Signer, id spiffeid.ID, token string) *meshcav1.SignBatchEntry {
	return &meshcav1.SignBatchEntry{
		Csr:        testca.CreateCSR(t, key, id.String()),
		Credential: &meshcav1.SignBatchEntry_Token{Token: token},
	}
}

// proofEntry is an entry for csr proven by current: its chain, and a
// proof signed by signer.
func proofEntry(t testing.TB, csr []byte, current *x509svid.SVID, signer crypto.Signer) *meshcav1.SignBatchEntry {
	sig, err := identity.SignSVIDProof(signer, csr)
	require.NoError(t, err)
	return &meshcav1.SignBatchEntry{
		Csr:        csr,
		Credential: &meshcav1.SignBatchEntry_SvidProof{SvidProof: &meshcav1.SVIDProof{CertChain: rawCerts(current.Certificates), Signature: sig}},
	}
}

func rawCerts(certs []*x509.Certificate) [][]byte {
	out := make([][]byte, len(certs))
	for i, c := range certs {
		out[i] = c.Raw
	}
	return out
}

// requireIssued checks that res is an SVID for id and key that verifies
// against the response's bundle.
func requireIssued(t *testing.T, resp *meshcav1.SignBatchResponse, res *meshcav1.SignBatchResult, id spiffeid.ID, key crypto.Signer) *x509.Certificate {
	t.Helper()
	require.Equal(t, int32(codes.OK), res.Code, res.Message)
	require.Empty(t, res.Message)
	require.Nil(t, res.RetryAfter)
	require.Equal(t, id.String(), res.SpiffeId)
	chain, err := pemutil.ParseDER(res.CertChain)
	require.NoError(t, err)
	roots, err := pemutil.ParseDER(resp.Bundle.X509Authorities)
	require.NoError(t, err)
	got, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(td, roots))
	require.NoError(t, err)
	require.Equal(t, id, got)
	require.True(t, key.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(chain[0].PublicKey), "issued for the entry's key")
	require.Equal(t, chain[0].NotAfter.Unix(), res.ExpiresAt.AsTime().Unix())
	return chain[0]
}

// TestSignBatchIssuesEveryEntry: one call, from a connection with no
// credential of its own, carries token entries and SVID-proof entries for
// different identities; each is issued for its own identity and key,
// audited and counted under native_batch, and the bundle comes once.
func TestSignBatchIssuesEveryEntry(t *testing.T) {
	ids, tokens, authn := batchIdentities(t, 6)
	h := startWith(t, authn)
	client := meshcav1.NewCertificateServiceClient(h.conn(nil))

	keys := make([]crypto.Signer, len(ids)+1)
	var entries []*meshcav1.SignBatchEntry
	for i, id := range ids {
		keys[i] = testca.NewKey(t)
		if i%2 == 0 {
			entries = append(entries, tokenEntry(t, keys[i], id, tokens[i]))
			continue
		}
		current := h.currentSVID(t, id)
		entries = append(entries, proofEntry(t, testca.CreateCSR(t, keys[i], id.String()), current, current.PrivateKey))
	}
	// The harness's own bootstrap token, with a TTL.
	keys[len(ids)] = testca.NewKey(t)
	demo := tokenEntry(t, keys[len(ids)], demoID, demoToken)
	demo.Ttl = durationpb.New(10 * time.Minute)
	entries = append(entries, demo)
	wantIDs := append(append([]spiffeid.ID{}, ids...), demoID)

	resp, err := client.SignBatch(context.Background(), &meshcav1.SignBatchRequest{Entries: entries, BundleSequence: 1})
	require.NoError(t, err)
	require.Len(t, resp.Results, len(entries))
	require.Equal(t, td.Name(), resp.Bundle.TrustDomain)
	require.Equal(t, uint64(1), resp.Bundle.Sequence)
	require.NotEmpty(t, resp.Bundle.SpiffeJson)
	require.Empty(t, resp.FederatedBundles, "no federation")
	serials := map[string]bool{}
	for i, res := range resp.Results {
		leaf := requireIssued(t, resp, res, wantIDs[i], keys[i])
		serials[leaf.SerialNumber.Text(16)] = true
	}
	require.Len(t, serials, len(entries), "one certificate each")
	last, err := x509.ParseCertificate(resp.Results[len(ids)].CertChain[0])
	require.NoError(t, err)
	require.InDelta(t, (10 * time.Minute).Seconds(), last.NotAfter.Sub(last.NotBefore).Seconds()-ca.Backdate.Seconds(), 5, "the entry's TTL")

	// One audit line and one count per entry, each with its own caller.
	lines := auditRecords(t, h, "certificate issued")
	require.Len(t, lines, len(entries))
	methods := map[string]string{}
	for _, l := range lines {
		require.Equal(t, server.APINativeBatch, l["api"])
		require.True(t, serials[l["serial"].(string)])
		methods[l["identity"].(string)] = l["method"].(string)
	}
	for i, id := range ids {
		want := "bootstrap_token"
		if i%2 == 1 {
			want = proofAuditMethod
		}
		require.Equal(t, want, methods[id.String()], id.String())
	}
	require.Equal(t, "bootstrap_token", methods[demoID.String()])
	require.Equal(t, float64(len(entries)), metricValue(t, h.reg, "meshca_certificates_issued_total", map[string]string{"api": server.APINativeBatch}))
	logs := h.logs.String()
	for _, tok := range append(tokens, demoToken) {
		require.NotContains(t, logs, tok)
	}
}

// TestSignBatchRefusesBadEntriesAlone: one batch holds every kind of bad
// entry between two good ones. Each bad entry gets the code and reason
// Sign would give, audited and counted; the good ones are issued.
func TestSignBatchRefusesBadEntriesAlone(t *testing.T) {
	h := start(t)
	client := meshcav1.NewCertificateServiceClient(h.conn(nil))
	otherID := spiffeid.RequireFromPath(td, "/ns/default/sa/other")
	current := h.currentSVID(t, otherID)
	key := testca.NewKey(t)
	csrFor := func(id spiffeid.ID) []byte { return testca.CreateCSR(t, key, id.String()) }
	otherCSR := csrFor(otherID)

	foreign := testca.New(t, td).ChildCA().CreateX509SVID(otherID)
	expired := expiredFromCA(t, h, time.Now()) // for demoID
	tooLong := &x509svid.SVID{Certificates: make([]*x509.Certificate, identity.MaxClientChainLength+1), PrivateKey: current.PrivateKey}
	for i := range tooLong.Certificates {
		tooLong.Certificates[i] = current.Certificates[0]
	}
	noCredential := &meshcav1.SignBatchEntry{Csr: csrFor(demoID)}
	badTTL := tokenEntry(t, key, demoID, demoToken)
	badTTL.Ttl = &durationpb.Duration{Seconds: 1, Nanos: -1}
	noSignature := proofEntry(t, otherCSR, current, current.PrivateKey)
	noSignature.GetSvidProof().Signature = nil

	const (
		unauth = codes.Unauthenticated
		denied = codes.PermissionDenied
	)
	for _, tt := range []struct {
		name   string
		entry  *meshcav1.SignBatchEntry
		code   codes.Code
		reason string
		msg    string
	}{
		{name: "good token", entry: tokenEntry(t, key, demoID, demoToken)},
		{name: "proof signed by another key", entry: proofEntry(t, otherCSR, current, testca.NewKey(t)), code: unauth, reason: "bad_proof",
			msg: "identity: SVID proof signature does not verify with the key of the certificate (serial " + current.Certificates[0].SerialNumber.Text(16) + ") over this entry's CSR; sign exactly the CSR sent, with the current SVID's key"},
		{name: "proof over another CSR", entry: func() *meshcav1.SignBatchEntry {
			e := proofEntry(t, csrFor(otherID), current, current.PrivateKey)
			e.Csr = otherCSR
			return e
		}(), code: unauth, reason: "bad_proof", msg: "identity: SVID proof signature does not verify"},
		{name: "proof without signature", entry: noSignature, code: unauth, reason: "bad_proof", msg: "identity: SVID proof has no signature"},
		{name: "chain of another CA", entry: proofEntry(t, otherCSR, foreign, foreign.PrivateKey), code: unauth, reason: "bad_certificate",
			msg: "identity: client certificate does not verify against the trust bundle: x509svid: could not verify leaf certificate: x509: certificate signed by unknown authority"},
		{name: "expired chain", entry: proofEntry(t, csrFor(demoID), expired, expired.PrivateKey), code: unauth, reason: "bad_certificate",
			msg: "identity: client certificate does not verify against the trust bundle: x509svid: could not verify leaf certificate: x509: certificate has expired or is not yet valid"},
		{name: "chain too long", entry: proofEntry(t, otherCSR, tooLong, current.PrivateKey), code: unauth, reason: "chain_too_large",
			msg: "identity: SVID proof chain has 9 certificates, more than the limit of 8; send your SVID and its intermediates only"},
		{name: "proof for another identity than the CSR's", entry: proofEntry(t, csrFor(demoID), current, current.PrivateKey), code: denied, reason: "identity_mismatch",
			msg: `identity: CSR asks for "spiffe://example.org/ns/default/sa/demo" but the credential is for "spiffe://example.org/ns/default/sa/other"`},
		{name: "token for another identity than the CSR's", entry: tokenEntry(t, key, otherID, demoToken), code: denied, reason: "identity_mismatch",
			msg: `identity: CSR asks for "spiffe://example.org/ns/default/sa/other" but the credential is for "spiffe://example.org/ns/default/sa/demo"`},
		{name: "unknown token", entry: tokenEntry(t, key, demoID, "not-a-known-token-at-all"), code: unauth, reason: "unknown_token", msg: "identity: bearer token is not known"},
		{name: "empty token", entry: tokenEntry(t, key, demoID, ""), code: unauth, reason: "no_credential",
			msg: "identity: no credential: the entry's token is empty; send the workload's service-account token"},
		{name: "no credential", entry: noCredential, code: unauth, reason: "no_credential",
			msg: "server: no credential: set the entry's token or svid_proof; the call's own metadata and TLS client certificate are not credentials for its entries"},
		{name: "invalid ttl", entry: badTTL, code: codes.InvalidArgument, reason: "bad_ttl",
			msg: "server: ttl is not a valid duration (seconds 1, nanos -1): want seconds within ±10000 years, nanos within ±999999999, both of one sign"},
		{name: "bad CSR", entry: &meshcav1.SignBatchEntry{Csr: []byte("not a CSR"), Credential: &meshcav1.SignBatchEntry_Token{Token: demoToken}}, code: codes.InvalidArgument, reason: "malformed",
			msg: "ca: CSR is not a PKCS#10 request"},
		{name: "good proof", entry: proofEntry(t, otherCSR, current, current.PrivateKey)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			// Each bad entry between two good ones, in a batch of its own
			// so that the counts are its alone.
			good := tokenEntry(t, key, demoID, demoToken)
			last := proofEntry(t, otherCSR, current, current.PrivateKey)
			labels := map[string]string{"api": server.APINativeBatch, "code": tt.code.String(), "reason": tt.reason}
			before := metricValue(t, h.reg, "meshca_requests_denied_total", labels)

			resp, err := client.SignBatch(context.Background(), &meshcav1.SignBatchRequest{Entries: []*meshcav1.SignBatchEntry{good, tt.entry, last}})
			require.NoError(t, err)
			require.Len(t, resp.Results, 3)
			requireIssued(t, resp, resp.Results[0], demoID, key)
			requireIssued(t, resp, resp.Results[2], otherID, key)
			res := resp.Results[1]
			if tt.code == codes.OK {
				requireIssued(t, resp, res, spiffeid.RequireFromString(res.SpiffeId), key)
				return
			}
			require.Equal(t, tt.code, codes.Code(res.Code), res.Message)
			require.Contains(t, res.Message, tt.msg)
			require.Empty(t, res.CertChain)
			require.Nil(t, res.RetryAfter)
			require.Equal(t, before+1, metricValue(t, h.reg, "meshca_requests_denied_total", labels), "counted once with reason %s", tt.reason)
		})
	}

	logs := h.logs.String()
	require.NotContains(t, logs, demoToken)
	require.NotContains(t, logs, "not-a-known-token-at-all")
	for _, l := range auditRecords(t, h, "certificate request denied") {
		require.Equal(t, server.APINativeBatch, l["api"])
	}
}

// TestSignBatchRefusesBadBatches: a batch with no entry or over the limit
// is refused as a whole, before any entry is looked at.
func TestSignBatchRefusesBadBatches(t *testing.T) {
	h := start(t)
	client := meshcav1.NewCertificateServiceClient(h.conn(nil))
	entry := tokenEntry(t, testca.NewKey(t), demoID, demoToken)

	_, err := client.SignBatch(context.Background(), &meshcav1.SignBatchRequest{})
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	require.Equal(t, "server: the batch has no entries; send 1 to 64", status.Convert(err).Message())

	over := make([]*meshcav1.SignBatchEntry, server.MaxBatchEntries+1)
	for i := range over {
		over[i] = entry
	}
	_, err = client.SignBatch(context.Background(), &meshcav1.SignBatchRequest{Entries: over})
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	require.Equal(t, "server: the batch has 65 entries, more than the limit of 64; split it into several calls", status.Convert(err).Message())

	// Over the transport limit: refused before it is parsed.
	big := &meshcav1.SignBatchEntry{Csr: make([]byte, server.MaxRequestBytes/2), Credential: entry.Credential}
	_, err = client.SignBatch(context.Background(), &meshcav1.SignBatchRequest{Entries: []*meshcav1.SignBatchEntry{big, big}})
	require.Equal(t, codes.ResourceExhausted, status.Code(err))
	require.Contains(t, status.Convert(err).Message(), "grpc: received message larger than max")

	require.Empty(t, auditRecords(t, h, "certificate issued"))
	require.Empty(t, auditRecords(t, h, "certificate request denied"))

	// The limit itself is fine.
	at := over[:server.MaxBatchEntries]
	resp, err := client.SignBatch(context.Background(), &meshcav1.SignBatchRequest{Entries: at})
	require.NoError(t, err)
	require.Len(t, resp.Results, server.MaxBatchEntries)
	for _, res := range resp.Results {
		require.Equal(t, int32(codes.OK), res.Code, res.Message)
	}
}

// TestSignBatchIgnoresTheConnectionsCredentials: a call whose metadata
// holds a valid bearer token, over a connection presenting a valid SVID,
// does not lend either to an entry without a credential of its own. The
// same credentials do issue on Sign.
func TestSignBatchIgnoresTheConnectionsCredentials(t *testing.T) {
	h := start(t)
	svid := h.currentSVID(t, demoID)
	conn := h.conn(svid)
	client := meshcav1.NewCertificateServiceClient(conn)
	ctx := withToken(demoToken)

	resp, err := client.SignBatch(ctx, &meshcav1.SignBatchRequest{Entries: []*meshcav1.SignBatchEntry{
		{Csr: testca.CreateCSR(t, testca.NewKey(t), demoID.String())},
		// A proof entry's chain only: the connection's key does not sign
		// for it.
		{Csr: testca.CreateCSR(t, testca.NewKey(t), demoID.String()), Credential: &meshcav1.SignBatchEntry_SvidProof{SvidProof: &meshcav1.SVIDProof{CertChain: rawCerts(svid.Certificates)}}},
	}})
	require.NoError(t, err)
	require.Equal(t, int32(codes.Unauthenticated), resp.Results[0].Code)
	require.Equal(t, "server: no credential: set the entry's token or svid_proof; the call's own metadata and TLS client certificate are not credentials for its entries", resp.Results[0].Message)
	require.Equal(t, int32(codes.Unauthenticated), resp.Results[1].Code)
	require.Contains(t, resp.Results[1].Message, "identity: SVID proof has no signature")
	require.Empty(t, auditRecords(t, h, "certificate issued"))

	// The connection's credentials are good ones: Sign takes them.
	_, err = client.Sign(ctx, &meshcav1.SignRequest{Csr: testca.CreateCSR(t, testca.NewKey(t), demoID.String())})
	require.NoError(t, err)
	_, err = client.Sign(context.Background(), &meshcav1.SignRequest{Csr: testca.CreateCSR(t, testca.NewKey(t), demoID.String())})
	require.NoError(t, err)
}

// recordingObserver records the bundle sequences the server observed.
type recordingObserver struct {
	mu   sync.Mutex
	seen map[spiffeid.ID]uint64
}

func (o *recordingObserver) Observe(id spiffeid.ID, seq uint64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.seen[id] = seq
}

// TestSignBatchRateLimitsEachEntry: the per-identity rate limit applies to
// each entry; the entry over it gets ResourceExhausted with the retry hint
// in retry_after, the others are issued, and every issued entry's bundle
// sequence is observed.
func TestSignBatchRateLimitsEachEntry(t *testing.T) {
	ids, tokens, authn := batchIdentities(t, 2)
	observer := &recordingObserver{seen: map[spiffeid.ID]uint64{}}
	h := startServer(t, harnessOptions{authns: []identity.Authenticator{authn}, configure: func(o *server.Options) {
		o.Limits.PerIdentity = server.Rate{PerSecond: 0.01, Burst: 1}
		o.Observer = observer
	}})
	client := meshcav1.NewCertificateServiceClient(h.conn(nil))

	key := testca.NewKey(t)
	resp, err := client.SignBatch(context.Background(), &meshcav1.SignBatchRequest{BundleSequence: 7, Entries: []*meshcav1.SignBatchEntry{
		tokenEntry(t, key, ids[0], tokens[0]),
		tokenEntry(t, key, ids[1], tokens[1]),
		tokenEntry(t, key, ids[0], tokens[0]), // the same identity again
	}})
	require.NoError(t, err)
	requireIssued(t, resp, resp.Results[1], ids[1], key)
	// Entries run side by side: either of ids[0]'s may be the one limited.
	var limited *meshcav1.SignBatchResult
	for _, i := range []int{0, 2} {
		if resp.Results[i].Code == int32(codes.OK) {
			requireIssued(t, resp, resp.Results[i], ids[0], key)
			continue
		}
		require.Nil(t, limited, "one of the two is issued")
		limited = resp.Results[i]
	}
	require.NotNil(t, limited, "one of the two is limited")
	require.Equal(t, int32(codes.ResourceExhausted), limited.Code, limited.Message)
	require.Contains(t, limited.Message, "server: rate limited: identity "+ids[0].String()+" asked for more than 0.01 certificates a second (burst 1) across all APIs; retry in ")
	require.NotNil(t, limited.RetryAfter)
	require.Greater(t, limited.RetryAfter.AsDuration(), 90*time.Second, "a token a hundred seconds")
	require.Equal(t, map[spiffeid.ID]uint64{ids[0]: 7, ids[1]: 7}, observer.seen)
}

// BenchmarkSignBatch compares issuing 32 certificates with one SignBatch
// call against 32 Sign calls: with tokens (Sign one after the other, and
// all 32 at once), and with the current SVID (proofs in the batch; for
// Sign, a new mTLS connection per identity, as a renewal over mTLS needs).
// One op is 32 certificates.
func BenchmarkSignBatch(b *testing.B) {
	const n = 32
	ids, tokens, authn := batchIdentities(b, n)
	h := startBench(b, authn)
	conn := h.dial(tlsconfig.TLSClientConfig(h.bundle, tlsconfig.AuthorizeID(serverID)))
	client := meshcav1.NewCertificateServiceClient(conn)

	keys := make([]crypto.Signer, n)
	csrs := make([][]byte, n)
	currents := make([]*x509svid.SVID, n)
	tokenEntries := make([]*meshcav1.SignBatchEntry, n)
	proofEntries := make([]*meshcav1.SignBatchEntry, n)
	for i, id := range ids {
		keys[i] = testca.NewKey(b)
		csrs[i] = testca.CreateCSR(b, keys[i], id.String())
		currents[i] = h.currentSVID(b, id)
		tokenEntries[i] = &meshcav1.SignBatchEntry{Csr: csrs[i], Credential: &meshcav1.SignBatchEntry_Token{Token: tokens[i]}}
		proofEntries[i] = proofEntry(b, csrs[i], currents[i], currents[i].PrivateKey)
	}
	batch := func(entries []*meshcav1.SignBatchEntry) func(b *testing.B) {
		return func(b *testing.B) {
			for b.Loop() {
				resp, err := client.SignBatch(context.Background(), &meshcav1.SignBatchRequest{Entries: entries})
				if err != nil {
					b.Fatal(err)
				}
				for _, r := range resp.Results {
					if r.Code != 0 {
						b.Fatal(r.Message)
					}
				}
			}
		}
	}
	b.Run("batch/token", batch(tokenEntries))
	b.Run("batch/proof", batch(proofEntries))
	b.Run("sign/token", func(b *testing.B) {
		for b.Loop() {
			for i := range n {
				if _, err := client.Sign(withToken(tokens[i]), &meshcav1.SignRequest{Csr: csrs[i]}); err != nil {
					b.Fatal(err)
				}
			}
		}
	})
	b.Run("sign/token-concurrent", func(b *testing.B) {
		for b.Loop() {
			var wg sync.WaitGroup
			errs := make([]error, n)
			for i := range n {
				wg.Go(func() {
					_, errs[i] = client.Sign(withToken(tokens[i]), &meshcav1.SignRequest{Csr: csrs[i]})
				})
			}
			wg.Wait()
			for _, err := range errs {
				if err != nil {
					b.Fatal(err)
				}
			}
		}
	})
	b.Run("sign/mtls", func(b *testing.B) {
		for b.Loop() {
			for i := range n {
				c, err := grpc.NewClient(h.addr, grpc.WithTransportCredentials(credentials.NewTLS(
					tlsconfig.MTLSClientConfig(currents[i], h.bundle, tlsconfig.AuthorizeID(serverID)))))
				if err != nil {
					b.Fatal(err)
				}
				_, err = meshcav1.NewCertificateServiceClient(c).Sign(context.Background(), &meshcav1.SignRequest{Csr: csrs[i]})
				c.Close()
				if err != nil {
					b.Fatal(err)
				}
			}
		}
	})
}

// benchHarness is the harness's server for a benchmark: the same
// authenticator chain, on loopback with its own serving certificate.
type benchHarness struct {
	tb     testing.TB
	ca     *ca.CA
	addr   string
	bundle *x509bundle.Bundle
}

func startBench(tb testing.TB, authn identity.Authenticator) *benchHarness {
	set, err := ca.NewSelfSigned(ca.AuthorityOptions{TrustDomain: td})
	require.NoError(tb, err)
	c, err := ca.New(set, ca.Options{})
	require.NoError(tb, err)
	srv, err := server.New(server.Options{
		CA:            c,
		Authenticator: identity.Chain(authn, identity.NewSVIDAuthenticator(td, c, nil)),
		Policy:        identity.Policy{Reserved: []spiffeid.ID{serverID}},
	})
	require.NoError(tb, err)
	serving, err := server.NewServingCert(c, serverID, []string{"localhost"}, nil, time.Hour, nil)
	require.NoError(tb, err)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(tb, err)
	g := srv.GRPCServer(serving.TLSConfig())
	go func() { _ = g.Serve(lis) }()
	tb.Cleanup(g.Stop)
	bundle, _ := c.Bundle()
	return &benchHarness{tb: tb, ca: c, addr: lis.Addr().String(), bundle: bundle}
}

func (h *benchHarness) dial(cfg *tls.Config) *grpc.ClientConn {
	conn, err := grpc.NewClient(h.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	require.NoError(h.tb, err)
	h.tb.Cleanup(func() { conn.Close() })
	return conn
}

func (h *benchHarness) currentSVID(tb testing.TB, id spiffeid.ID) *x509svid.SVID {
	return issueCurrent(tb, h.ca, id)
}
