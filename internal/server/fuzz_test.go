package server

// Fuzz tests of the request shapes of every front end, end to end in
// process: a Server with a test CA and a fake authenticator, its service
// methods called with fuzzed protobuf fields. Whatever the request, the
// answer is a certificate of exactly the authorised identity that
// verifies, or a gRPC status of a caller's mistake, never Internal or
// Unknown, whose message does not echo the token.

import (
	"context"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	securityv1alpha1 "istio.io/api/security/v1alpha1"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity"
	linkerdpb "github.com/meshca/meshca/proto/linkerd/identity"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
	"github.com/meshca/meshca/testca"
)

var (
	fuzzTD       = spiffeid.RequireTrustDomainFromString("example.org")
	fuzzWebID    = spiffeid.RequireFromPath(fuzzTD, "/ns/default/sa/web")
	fuzzDemoID   = spiffeid.RequireFromPath(fuzzTD, "/ns/default/sa/demo")
	fuzzServerID = spiffeid.RequireFromPath(fuzzTD, "/meshca/server")
)

// The fake authenticator's tokens. The canary "zq" is in none of the
// server's messages: an error holding "zq" and what follows it echoed a
// token.
const (
	fuzzWebToken    = "zq-web-sa-token-0123456789"    // Kubernetes token of web
	fuzzDemoToken   = "zq-demo-boot-token-0123456789" // bootstrap token of demo
	fuzzServerToken = "zq-server-token-0123456789"    // the reserved server ID
	fuzzLinkerdName = "web.default.serviceaccount.identity.linkerd.cluster.local"
)

// fuzzAuthn is a fake authenticator with three known tokens.
type fuzzAuthn struct{}

func (fuzzAuthn) Authenticate(_ context.Context, cred identity.Credential) (identity.Caller, error) {
	switch cred.Token {
	case "":
		return identity.Caller{}, identity.ErrNotApplicable
	case fuzzWebToken:
		return identity.Caller{ID: fuzzWebID, Method: identity.MethodKubernetesToken, Subject: "sa:default:web"}, nil
	case fuzzDemoToken:
		return identity.Caller{ID: fuzzDemoID, Method: identity.MethodBootstrapToken, Subject: "token:demo"}, nil
	case fuzzServerToken:
		return identity.Caller{ID: fuzzServerID, Method: identity.MethodBootstrapToken, Subject: "token:server"}, nil
	}
	return identity.Caller{}, &identity.AuthError{Reason: identity.ReasonUnknownToken}
}

// fuzzServer is a Server with every front end on, signing with a testca
// intermediate.
type fuzzServer struct {
	s      *Server
	roots  *x509.CertPool
	inters *x509.CertPool
	tca    *testca.CA
}

func newFuzzServer(f *testing.F) *fuzzServer {
	f.Helper()
	tca := testca.New(f, fuzzTD).ChildCA()
	c, err := ca.New(tca.AuthoritySet(), ca.Options{})
	if err != nil {
		f.Fatal(err)
	}
	s, err := New(Options{
		CA:            c,
		Authenticator: identity.Chain(fuzzAuthn{}),
		Policy:        identity.Policy{Reserved: []spiffeid.ID{fuzzServerID}},
		Istio:         IstioOptions{Enabled: true},
		Linkerd:       LinkerdOptions{Enabled: true},
	})
	if err != nil {
		f.Fatal(err)
	}
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(tca.Root().Cert)
	inters.AddCert(tca.Cert)
	return &fuzzServer{s: s, roots: roots, inters: inters, tca: tca}
}

// checkRefusal asserts that err is a gRPC status of a caller's mistake
// whose message does not echo the token.
func checkRefusal(t *testing.T, err error, token string) {
	t.Helper()
	st, ok := status.FromError(err)
	if !ok {
		t.Fatalf("error is not a gRPC status: %v", err)
	}
	switch st.Code() {
	case codes.InvalidArgument, codes.Unauthenticated, codes.PermissionDenied,
		// Limits on what comes from outside (rate limits) are allowed.
		codes.ResourceExhausted:
	default:
		t.Fatalf("refused with code %s: %v", st.Code(), err)
	}
	if st.Message() == "" {
		t.Fatalf("refused with code %s and no message", st.Code())
	}
	if i := strings.Index(token, "zq"); i >= 0 && len(token)-i >= 8 && strings.Contains(st.Message(), token[i:]) {
		t.Fatalf("the message echoes the token: %q", st.Message())
	}
}

// callerOf returns the identity the token proves, if any.
func callerOf(token string) (spiffeid.ID, identity.Method, bool) {
	caller, err := fuzzAuthn{}.Authenticate(context.Background(), identity.Credential{Token: token})
	return caller.ID, caller.Method, err == nil
}

// checkLeaf asserts what every issued leaf is: not a CA, within the
// longest TTL, chaining to the root.
func (fs *fuzzServer) checkLeaf(t *testing.T, leaf *x509.Certificate) {
	t.Helper()
	if leaf.IsCA {
		t.Fatal("issued a CA certificate")
	}
	if leaf.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign) != 0 {
		t.Fatalf("issued a leaf with key usage %v", leaf.KeyUsage)
	}
	if life := leaf.NotAfter.Sub(leaf.NotBefore); life > ca.MaxTTL+time.Minute {
		t.Fatalf("issued a leaf of lifetime %s, more than %s", life, ca.MaxTTL)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: fs.roots, Intermediates: fs.inters, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("issued a leaf that does not verify: %v", err)
	}
}

// fuzzCSRs returns real requests to seed with: the SVID request of id in
// DER, and of other identities.
func fuzzCSRs(f *testing.F) (web, demo, server, other, dns []byte) {
	key := testca.NewKey(f)
	web = testca.CreateCSR(f, key, fuzzWebID.String())
	demo = testca.CreateCSR(f, key, fuzzDemoID.String())
	server = testca.CreateCSR(f, key, fuzzServerID.String())
	other = testca.CreateCSR(f, key, "spiffe://other.org/ns/default/sa/web")
	dns = testca.SignCSR(f, &x509.CertificateRequest{DNSNames: []string{fuzzLinkerdName}, Subject: pkix.Name{CommonName: fuzzLinkerdName}}, key)
	return web, demo, server, other, dns
}

func pemCSR(der []byte) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

// FuzzIstioCreateCertificate fuzzes Istio's CreateCertificate: the CSR
// (a PEM string), the authorization header, validity_duration and the
// metadata struct (one field of any kind).
func FuzzIstioCreateCertificate(f *testing.F) {
	fs := newFuzzServer(f)
	svc := &istioService{s: fs.s}
	web, demo, server, other, dns := fuzzCSRs(f)
	for _, seed := range []struct {
		csr, header string
		validity    int64
		mdKey       string
		mdKind      uint8
		mdValue     string
	}{
		{pemCSR(web), "Bearer " + fuzzWebToken, 3600, "", 0, ""},
		{pemCSR(web), "bearer " + fuzzWebToken, 0, "ClusterID", 0, "Kubernetes"},
		{pemCSR(demo), "Bearer " + fuzzDemoToken, -1, "ImpersonatedIdentity", 0, ""},
		{pemCSR(web), "Bearer " + fuzzWebToken, 1 << 62, "ImpersonatedIdentity", 0, "spiffe://example.org/ns/x/sa/y"},
		{pemCSR(web), "Bearer " + fuzzWebToken, 60, "ImpersonatedIdentity", 1, "1"},
		{pemCSR(server), "Bearer " + fuzzServerToken, 3600, "", 0, ""},
		{pemCSR(other), "Bearer " + fuzzWebToken, 3600, "", 0, ""},
		{pemCSR(dns), "Bearer " + fuzzWebToken, 3600, "", 0, ""},
		{string(web), "Bearer " + fuzzWebToken, 3600, "", 0, ""},
		{pemCSR(web), "Bearer zq-unknown-token-0123456789", 3600, "", 0, ""},
		{pemCSR(web), "Basic zq-web-sa-token-0123456789", 3600, "", 0, ""},
		{pemCSR(web), "", 3600, "", 0, ""},
		{"-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n", "Bearer " + fuzzWebToken, 3600, "", 0, ""},
	} {
		f.Add(seed.csr, seed.header, seed.validity, seed.mdKey, seed.mdKind, seed.mdValue)
	}
	f.Fuzz(func(t *testing.T, csr, header string, validity int64, mdKey string, mdKind uint8, mdValue string) {
		req := &securityv1alpha1.IstioCertificateRequest{Csr: csr, ValidityDuration: validity}
		if mdKey != "" {
			req.Metadata = &structpb.Struct{Fields: map[string]*structpb.Value{mdKey: fuzzValue(mdKind, mdValue)}}
		}
		ctx := context.Background()
		if header != "" {
			ctx = metadata.NewIncomingContext(ctx, metadata.Pairs("authorization", header))
		}
		resp, err := svc.CreateCertificate(ctx, req)
		if err != nil {
			checkRefusal(t, err, header)
			return
		}
		token, _ := identity.ParseBearer(header)
		id, _, ok := callerOf(token)
		if !ok {
			t.Fatalf("issued to a caller with header %q", header)
		}
		if impersonates(req.GetMetadata()) {
			t.Fatal("issued a request asking for impersonation")
		}
		chain := resp.GetCertChain()
		if len(chain) < 2 {
			t.Fatalf("chain of %d elements", len(chain))
		}
		var certs []*x509.Certificate
		for _, p := range chain[:len(chain)-1] {
			block, rest := pem.Decode([]byte(p))
			if block == nil || len(strings.TrimSpace(string(rest))) != 0 {
				t.Fatalf("chain element is not one PEM block: %q", p)
			}
			cert, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				t.Fatal(err)
			}
			certs = append(certs, cert)
		}
		got, _, err := x509svid.Verify(certs, fs.tca.Bundle())
		if err != nil {
			t.Fatalf("issued an SVID that does not verify: %v", err)
		}
		if got != id {
			t.Fatalf("issued %q to a caller of %q", got, id)
		}
		fs.checkLeaf(t, certs[0])
	})
}

// fuzzValue returns a structpb value of one of its kinds.
func fuzzValue(kind uint8, s string) *structpb.Value {
	switch kind % 5 {
	case 1:
		return structpb.NewNumberValue(float64(len(s)))
	case 2:
		return structpb.NewBoolValue(s != "")
	case 3:
		return structpb.NewNullValue()
	case 4:
		return structpb.NewListValue(&structpb.ListValue{Values: []*structpb.Value{structpb.NewStringValue(s)}})
	}
	return structpb.NewStringValue(s)
}

// FuzzLinkerdCertify fuzzes Linkerd's Certify: identity, token and the
// CSR (DER bytes).
func FuzzLinkerdCertify(f *testing.F) {
	fs := newFuzzServer(f)
	svc := &linkerdService{s: fs.s}
	web, _, _, _, dns := fuzzCSRs(f)
	key := testca.NewKey(f)
	for _, seed := range []struct {
		identity string
		token    []byte
		csr      []byte
	}{
		{fuzzLinkerdName, []byte(fuzzWebToken), dns},
		{fuzzLinkerdName, []byte(fuzzWebToken + "\n"), dns},
		{fuzzLinkerdName, []byte(fuzzDemoToken), dns},
		{fuzzLinkerdName, nil, dns},
		{fuzzLinkerdName, []byte(fuzzWebToken), web},
		{fuzzLinkerdName, []byte(fuzzWebToken), []byte(pemCSR(dns))},
		{"demo.default.serviceaccount.identity.linkerd.cluster.local", []byte(fuzzWebToken), testca.SignCSR(f, &x509.CertificateRequest{DNSNames: []string{"demo.default.serviceaccount.identity.linkerd.cluster.local"}}, key)},
		{"a.b.c.default.serviceaccount.identity.linkerd.cluster.local", []byte(fuzzWebToken), dns},
		{"web.default.serviceaccount.identity.linkerd.cluster.local.", []byte(fuzzWebToken), dns},
		{"web.default.serviceaccount.identity.other.cluster.local", []byte(fuzzWebToken), dns},
		{"", []byte("zq-unknown-token-0123456789"), nil},
	} {
		f.Add(seed.identity, seed.token, seed.csr)
	}
	f.Fuzz(func(t *testing.T, name string, token, csr []byte) {
		resp, err := svc.Certify(context.Background(), &linkerdpb.CertifyRequest{Identity: name, Token: token, CertificateSigningRequest: csr})
		if err != nil {
			checkRefusal(t, err, string(token))
			return
		}
		id, method, ok := callerOf(strings.TrimSpace(string(token)))
		if !ok || method != identity.MethodKubernetesToken {
			t.Fatalf("issued to a caller of token %q", token)
		}
		if id != fuzzWebID || name != fuzzLinkerdName {
			t.Fatalf("issued %q to a caller of %q", name, id)
		}
		leaf, err := x509.ParseCertificate(resp.GetLeafCertificate())
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(leaf.DNSNames, []string{fuzzLinkerdName}) || len(leaf.URIs) != 0 || len(leaf.IPAddresses) != 0 || len(leaf.EmailAddresses) != 0 {
			t.Fatalf("leaf SANs: DNS %q, URIs %v, IPs %v, emails %q", leaf.DNSNames, leaf.URIs, leaf.IPAddresses, leaf.EmailAddresses)
		}
		if !resp.GetValidUntil().AsTime().Equal(leaf.NotAfter) {
			t.Fatalf("valid_until %v, leaf's NotAfter %v", resp.GetValidUntil().AsTime(), leaf.NotAfter)
		}
		fs.checkLeaf(t, leaf)
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: fs.roots, Intermediates: fs.inters, DNSName: fuzzLinkerdName}); err != nil {
			t.Fatalf("leaf is not valid for %q: %v", fuzzLinkerdName, err)
		}
	})
}

// FuzzNativeSign fuzzes the native Sign: the CSR (DER or PEM bytes), the
// authorization header, the TTL (any seconds and nanos, or none) and the
// bundle sequence.
func FuzzNativeSign(f *testing.F) {
	fs := newFuzzServer(f)
	svc := &certificateService{s: fs.s}
	web, demo, server, other, dns := fuzzCSRs(f)
	for _, seed := range []struct {
		csr    []byte
		header string
		hasTTL bool
		secs   int64
		nanos  int32
	}{
		{demo, "Bearer " + fuzzDemoToken, false, 0, 0},
		{demo, "Bearer " + fuzzDemoToken, true, 600, 0},
		{[]byte(pemCSR(web)), "Bearer " + fuzzWebToken, true, 1 << 40, 0},
		{web, "Bearer " + fuzzWebToken, true, -5, -1},
		{web, "Bearer " + fuzzWebToken, true, 1, 2_000_000_000},
		{server, "Bearer " + fuzzServerToken, false, 0, 0},
		{other, "Bearer " + fuzzWebToken, false, 0, 0},
		{dns, "Bearer " + fuzzWebToken, false, 0, 0},
		{web, "Bearer " + fuzzDemoToken, false, 0, 0},
		{web, "Bearer zq-unknown-token-0123456789", false, 0, 0},
		{nil, "", false, 0, 0},
	} {
		f.Add(seed.csr, seed.header, seed.hasTTL, seed.secs, seed.nanos, uint64(0))
	}
	f.Fuzz(func(t *testing.T, csr []byte, header string, hasTTL bool, secs int64, nanos int32, seq uint64) {
		req := &meshcav1.SignRequest{Csr: csr, BundleSequence: seq}
		if hasTTL {
			req.Ttl = &durationpb.Duration{Seconds: secs, Nanos: nanos}
		}
		ctx := context.Background()
		if header != "" {
			ctx = metadata.NewIncomingContext(ctx, metadata.Pairs("authorization", header))
		}
		resp, err := svc.Sign(ctx, req)
		if err != nil {
			checkRefusal(t, err, header)
			return
		}
		token, _ := identity.ParseBearer(header)
		id, _, ok := callerOf(token)
		if !ok {
			t.Fatalf("issued to a caller with header %q", header)
		}
		var certs []*x509.Certificate
		for _, der := range resp.GetCertChain() {
			cert, err := x509.ParseCertificate(der)
			if err != nil {
				t.Fatal(err)
			}
			certs = append(certs, cert)
		}
		got, _, err := x509svid.Verify(certs, fs.tca.Bundle())
		if err != nil {
			t.Fatalf("issued an SVID that does not verify: %v", err)
		}
		if got != id || resp.GetSpiffeId() != id.String() {
			t.Fatalf("issued %q (spiffe_id %q) to a caller of %q", got, resp.GetSpiffeId(), id)
		}
		if !resp.GetExpiresAt().AsTime().Equal(certs[0].NotAfter) {
			t.Fatalf("expires_at %v, leaf's NotAfter %v", resp.GetExpiresAt().AsTime(), certs[0].NotAfter)
		}
		fs.checkLeaf(t, certs[0])
	})
}

// FuzzParsePeerBundle fuzzes the reading of a federated trust domain's
// bundle given out of band (JSON or PEM): an error or a bundle of that
// trust domain that encodes and reads again to the same authorities.
func FuzzParsePeerBundle(f *testing.F) {
	peer := spiffeid.RequireTrustDomainFromString("peer.example")
	tca := testca.New(f, peer)
	b, err := tca.Bundle().Marshal()
	if err != nil {
		f.Fatal(err)
	}
	f.Add([]byte(`{"keys":[],"spiffe_sequence":1}`))
	f.Add([]byte(`{"keys":[{"kty":"EC","use":"x509-svid","x5c":["MA=="]}]}`))
	f.Add([]byte("  \n"))
	f.Add(b)
	f.Add(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: tca.Cert.Raw}))
	f.Fuzz(func(t *testing.T, data []byte) {
		got, err := ParsePeerBundle(peer, data)
		if err != nil {
			if got != nil {
				t.Fatal("a bundle and an error")
			}
			return
		}
		if got.TrustDomain() != peer {
			t.Fatalf("bundle of %q", got.TrustDomain())
		}
		if len(got.X509Authorities()) == 0 {
			t.Fatal("took a bundle without X.509 authority")
		}
		doc, err := got.Marshal()
		if err != nil {
			// A bundle read from a document always encodes again; one
			// read from PEM only when its certificates do.
			if len(data) > 0 && strings.TrimSpace(string(data))[0] == '{' {
				t.Fatalf("a bundle read from JSON does not encode: %v", err)
			}
			return
		}
		again, err := ParsePeerBundle(peer, doc)
		if err != nil {
			t.Fatalf("an encoded bundle is refused: %v", err)
		}
		if len(again.X509Authorities()) != len(got.X509Authorities()) {
			t.Fatalf("%d authorities after a round trip, %d before", len(again.X509Authorities()), len(got.X509Authorities()))
		}
		for _, c := range got.X509Authorities() {
			if !again.HasX509Authority(c) {
				t.Fatal("an authority was lost in a round trip")
			}
		}
	})
}

// TestFuzzHarnessIssues shows that the fuzz harness reaches issuance:
// the valid seed of each front end is signed, so that the fuzzers'
// checks of what is issued can fail.
func TestFuzzHarnessIssues(t *testing.T) {
	tca := testca.New(t, fuzzTD).ChildCA()
	c, err := ca.New(tca.AuthoritySet(), ca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(Options{CA: c, Authenticator: identity.Chain(fuzzAuthn{}), Policy: identity.Policy{Reserved: []spiffeid.ID{fuzzServerID}}})
	if err != nil {
		t.Fatal(err)
	}
	key := testca.NewKey(t)
	ctx := func(token string) context.Context {
		return metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer "+token))
	}
	istio, err := (&istioService{s: s}).CreateCertificate(ctx(fuzzWebToken), &securityv1alpha1.IstioCertificateRequest{Csr: pemCSR(testca.CreateCSR(t, key, fuzzWebID.String()))})
	if err != nil || len(istio.GetCertChain()) < 2 {
		t.Fatalf("Istio: %v", err)
	}
	dns := testca.SignCSR(t, &x509.CertificateRequest{DNSNames: []string{fuzzLinkerdName}}, key)
	linkerd, err := (&linkerdService{s: s}).Certify(context.Background(), &linkerdpb.CertifyRequest{Identity: fuzzLinkerdName, Token: []byte(fuzzWebToken), CertificateSigningRequest: dns})
	if err != nil || len(linkerd.GetLeafCertificate()) == 0 {
		t.Fatalf("Linkerd: %v", err)
	}
	native, err := (&certificateService{s: s}).Sign(ctx(fuzzDemoToken), &meshcav1.SignRequest{Csr: testca.CreateCSR(t, key, fuzzDemoID.String())})
	if err != nil || native.GetSpiffeId() != fuzzDemoID.String() {
		t.Fatalf("native: %v", err)
	}
}

// A bundle document without X.509 authority, found by
// FuzzParsePeerBundle ({"keys":[]} was taken, and did not encode to a
// document it takes again), is refused: it would verify no endpoint.
func TestParsePeerBundleNeedsX509Authority(t *testing.T) {
	peer := spiffeid.RequireTrustDomainFromString("peer.example")
	for _, doc := range []string{
		`{"keys":[],"spiffe_sequence":1}`,
		`{"keys":[{"kty":"EC","use":"jwt-svid","kid":"k","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"}]}`,
	} {
		b, err := ParsePeerBundle(peer, []byte(doc))
		if b != nil || err == nil || err.Error() != `the bundle has no X.509 authority (no key with "use": "x509-svid")` {
			t.Fatalf("ParsePeerBundle(%s) = %v, %v", doc, b, err)
		}
	}
}
