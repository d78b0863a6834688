package federation_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"

	"github.com/meshca/meshca/ca"
	"github.com/meshca/meshca/identity/federation"
	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/internal/securefile"
	"github.com/meshca/meshca/testca"
)

var (
	// ownTD is the federating server's trust domain; peerTD the peer's.
	ownTD   = spiffeid.RequireTrustDomainFromString("west.test")
	peerTD  = spiffeid.RequireTrustDomainFromString("east.test")
	otherTD = spiffeid.RequireTrustDomainFromString("elsewhere.test")

	// webTD names the test Web PKI's certificates; it is no peer.
	webTD = spiffeid.RequireTrustDomainFromString("web.test")

	serverID = spiffeid.RequireFromPath(peerTD, "/meshca/server")
)

// wait bounds every wait for a signal; a test that reaches it fails.
const wait = 10 * time.Second

var _ federation.BundleSource = (*ca.CA)(nil)

// peerCA is a meshca CA of a trust domain with its test root, for root
// rotations.
type peerCA struct {
	*ca.CA
	root *testca.CA
}

func newPeerCA(t *testing.T, td spiffeid.TrustDomain) *peerCA {
	t.Helper()
	inter := testca.New(t, td).ChildCA()
	c, err := ca.New(inter.AuthoritySet(), ca.Options{})
	require.NoError(t, err)
	return &peerCA{CA: c, root: inter.Root()}
}

// prepareRoot adds a new root to the bundle, prepared (not signing), and
// returns it.
func (p *peerCA) prepareRoot(t *testing.T) *testca.CA {
	t.Helper()
	root := testca.New(t, p.TrustDomain())
	set := p.Authorities().Clone()
	set.Sequence++
	set.Roots = append(set.Roots, ca.Root{
		Authority:      ca.Authority{Cert: root.Cert, Signer: root.Key},
		State:          ca.RootPrepared,
		BundleSequence: set.Sequence,
	})
	require.NoError(t, p.SetAuthorities(set))
	return root
}

// activateRoot makes root, prepared before, the active root with a new
// issuer under it; the former active root is retiring.
func (p *peerCA) activateRoot(t *testing.T, root *testca.CA) {
	t.Helper()
	inter := root.ChildCA()
	set := p.Authorities().Clone()
	set.Sequence++
	for i, r := range set.Roots {
		switch {
		case r.Cert.Equal(root.Cert):
			set.Roots[i].State = ca.RootActive
		case r.State == ca.RootActive:
			set.Roots[i].State = ca.RootRetiring
		}
	}
	set.Issuer = ca.Authority{Cert: inter.Cert, Signer: inter.Key}
	set.Chain = nil
	require.NoError(t, p.SetAuthorities(set))
}

// retireRoots removes the retiring roots from the bundle.
func (p *peerCA) retireRoots(t *testing.T) {
	t.Helper()
	set := p.Authorities().Clone()
	set.Sequence++
	set.Roots = nil
	for _, r := range p.Authorities().Roots {
		if r.State != ca.RootRetiring {
			set.Roots = append(set.Roots, r)
		}
	}
	require.NoError(t, p.SetAuthorities(set))
}

// webPKI is a test Web PKI: a root and server certificates for localhost.
type webPKI struct {
	root *testca.CA
}

func newWebPKI(t *testing.T) *webPKI {
	return &webPKI{root: testca.New(t, webTD)}
}

// serverCert returns a certificate for localhost.
func (w *webPKI) serverCert(t *testing.T) *x509svid.SVID {
	t.Helper()
	return w.root.CreateX509SVID(spiffeid.RequireFromPath(webTD, "/bundle-endpoint"), testca.WithDNSNames("localhost"))
}

// writeKeyPair writes svid's chain and key as PEM files in dir, atomically
// and private, as a certificate manager would.
func writeKeyPair(t *testing.T, dir string, svid *x509svid.SVID) (certFile, keyFile string) {
	t.Helper()
	certFile, keyFile = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	der, err := x509.MarshalPKCS8PrivateKey(svid.PrivateKey)
	require.NoError(t, err)
	require.NoError(t, securefile.WriteFile(certFile, pemutil.EncodeCertificates(svid.Certificates...), 0o600))
	require.NoError(t, securefile.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600))
	return certFile, keyFile
}

// tlsCert returns svid as a tls.Certificate.
func tlsCert(svid *x509svid.SVID) *tls.Certificate {
	c := &tls.Certificate{PrivateKey: svid.PrivateKey, Leaf: svid.Certificates[0]}
	for _, cert := range svid.Certificates {
		c.Certificate = append(c.Certificate, cert.Raw)
	}
	return c
}

// servingCert is the server's X509-SVID as meshca-server serves it on an
// https_spiffe endpoint (internal/server.ServingCert, which this test
// cannot import while that package's dependencies change): issued by the
// CA to id with a fresh key, and issued again whenever the bundle
// changes, so that it chains to the active root.
type servingCert struct {
	ca *ca.CA
	id spiffeid.ID

	mu   sync.Mutex
	cert *tls.Certificate
	seq  uint64
}

func newServingCert(c *ca.CA, id spiffeid.ID) *servingCert {
	return &servingCert{ca: c, id: id}
}

// GetCertificate is a tls.Config.GetCertificate.
func (sc *servingCert) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if _, seq := sc.ca.Bundle(); sc.cert != nil && seq == sc.seq {
		return sc.cert, nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	issued, err := sc.ca.Sign(context.Background(), ca.SignRequest{PublicKey: key.Public(), ID: sc.id, TTL: time.Hour})
	if err != nil {
		return nil, err
	}
	sc.cert = tlsCert(&x509svid.SVID{ID: sc.id, Certificates: issued.Chain, PrivateKey: key})
	sc.seq = issued.BundleSequence
	return sc.cert, nil
}

// startEndpoint serves an endpoint on loopback until the test ends and
// returns its URL, with host localhost.
func startEndpoint(t *testing.T, opts federation.EndpointOptions) string {
	t.Helper()
	ep, err := federation.NewEndpoint(opts)
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ep.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	return "https://" + localhost(ln.Addr()) + "/"
}

func localhost(addr net.Addr) string {
	return fmt.Sprintf("localhost:%d", addr.(*net.TCPAddr).Port)
}

// fakePeer is a bundle endpoint over https_web that answers what a test
// sets, to play a broken or hostile peer.
type fakePeer struct {
	URL    string
	Roots  []*x509.Certificate
	answer atomic.Pointer[http.HandlerFunc]
	srv    *httptest.Server
}

func newFakePeer(t *testing.T) *fakePeer {
	t.Helper()
	web := newWebPKI(t)
	fp := &fakePeer{Roots: []*x509.Certificate{web.root.Cert}}
	fp.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		(*fp.answer.Load())(w, r)
	}))
	fp.srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	fp.srv.TLS = &tls.Config{Certificates: []tls.Certificate{*tlsCert(web.serverCert(t))}}
	fp.serve(http.StatusInternalServerError, "not set")
	fp.srv.StartTLS()
	t.Cleanup(fp.srv.Close)
	fp.URL = "https://" + localhost(fp.srv.Listener.Addr()) + "/"
	return fp
}

// set makes the peer answer with h.
func (fp *fakePeer) set(h http.HandlerFunc) { fp.answer.Store(&h) }

// serve makes the peer answer status and body.
func (fp *fakePeer) serve(status int, body string) {
	fp.set(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(status)
		_, _ = w.Write([]byte(body))
	})
}

// serveBundle makes the peer serve b.
func (fp *fakePeer) serveBundle(t *testing.T, b *spiffebundle.Bundle) {
	t.Helper()
	doc, err := b.Marshal()
	require.NoError(t, err)
	fp.serve(http.StatusOK, string(doc))
}

// webPeer returns the https_web Peer of fp for trust domain td.
func (fp *fakePeer) webPeer(td spiffeid.TrustDomain) federation.Peer {
	return federation.Peer{TrustDomain: td, URL: fp.URL, Profile: federation.ProfileHTTPSWeb, WebRoots: fp.Roots}
}

// bundleOf returns a bundle of td holding roots, with sequence seq.
func bundleOf(td spiffeid.TrustDomain, seq uint64, roots ...*testca.CA) *spiffebundle.Bundle {
	b := spiffebundle.New(td)
	for _, r := range roots {
		b.AddX509Authority(r.Cert)
	}
	b.SetSequenceNumber(seq)
	return b
}

// newFederator returns a federator of ownTD; the zero fields of opts are
// the defaults.
func newFederator(t *testing.T, opts federation.Options) *federation.Federator {
	t.Helper()
	opts.TrustDomain = ownTD
	f, err := federation.New(context.Background(), opts)
	require.NoError(t, err)
	return f
}

// run runs f until the test ends.
func run(t *testing.T, f *federation.Federator) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
}

// waitForBundle waits, on the federator's change signal, until the
// bundle it publishes for td satisfies ok, and returns it.
func waitForBundle(t *testing.T, f *federation.Federator, td spiffeid.TrustDomain, ok func(*spiffebundle.Bundle) bool) *spiffebundle.Bundle {
	t.Helper()
	timeout := time.After(wait)
	for {
		bundles, changed := f.Watch()
		for _, b := range bundles {
			if b.TrustDomain() == td && ok(b) {
				return b
			}
		}
		select {
		case <-changed:
		case <-timeout:
			t.Fatalf("no bundle of %q as expected after %s", td, wait)
		}
	}
}

// hasSequence returns a condition on a bundle's sequence.
func hasSequence(seq uint64) func(*spiffebundle.Bundle) bool {
	return func(b *spiffebundle.Bundle) bool {
		got, ok := b.SequenceNumber()
		return ok && got == seq
	}
}

// requireSameAuthorities fails unless b holds exactly certs.
func requireSameAuthorities(t *testing.T, b *spiffebundle.Bundle, certs ...*x509.Certificate) {
	t.Helper()
	raw := func(cs []*x509.Certificate) []string {
		out := make([]string, len(cs))
		for i, c := range cs {
			out[i] = string(c.Raw)
		}
		return out
	}
	require.ElementsMatch(t, raw(certs), raw(b.X509Authorities()))
}

// memStore is a federation.Store in memory that keeps the state as JSON,
// as a real store does.
type memStore struct {
	mu    sync.Mutex
	doc   []byte
	saves int
}

func (s *memStore) Load(context.Context) (*federation.State, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := &federation.State{}
	if s.doc == nil {
		return st, nil
	}
	if err := json.Unmarshal(s.doc, st); err != nil {
		return nil, err
	}
	return st, nil
}

func (s *memStore) Save(_ context.Context, st *federation.State) error {
	doc, err := json.Marshal(st)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.doc = doc
	s.saves++
	return nil
}

// setPeer replaces the stored configuration of p's trust domain with p,
// keeping its bundle.
func (s *memStore) setPeer(t *testing.T, p federation.Peer) {
	t.Helper()
	st, err := s.Load(context.Background())
	require.NoError(t, err)
	for i := range st.Peers {
		if st.Peers[i].Peer.TrustDomain == p.TrustDomain {
			st.Peers[i].Peer = p
			require.NoError(t, s.Save(context.Background(), st))
			return
		}
	}
	t.Fatalf("no stored peer %q", p.TrustDomain)
}
