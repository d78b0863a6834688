package federation

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
)

// fetcher fetches one peer's bundle. go-spiffe's federation.FetchBundle
// does the same, but reads a body of any size, follows redirects (to
// plain http too) and takes any status; this one bounds the body, refuses
// both, and tells why a fetch failed.
type fetcher struct {
	td      spiffeid.TrustDomain
	url     string
	client  *http.Client
	maxSize int64
}

// newFetcher returns the fetcher of p. For https_spiffe, trust gives the
// peer's bundle at the time of each handshake: its last good bundle, so
// that the endpoint is authenticated by the bundle it last served.
func newFetcher(p Peer, trust x509bundle.Source, timeout time.Duration, maxSize int64) *fetcher {
	var tlsConf *tls.Config
	switch p.Profile {
	case ProfileHTTPSSPIFFE:
		tlsConf = tlsconfig.TLSClientConfig(trust, tlsconfig.AuthorizeID(p.EndpointID))
		verify := tlsConf.VerifyPeerCertificate
		tlsConf.VerifyPeerCertificate = func(raw [][]byte, chains [][]*x509.Certificate) error {
			if err := verify(raw, chains); err != nil {
				return &endpointAuthError{err: err}
			}
			return nil
		}
	default:
		tlsConf = &tls.Config{MinVersion: tls.VersionTLS12}
		if len(p.WebRoots) > 0 {
			pool := x509.NewCertPool()
			for _, c := range p.WebRoots {
				pool.AddCert(c)
			}
			tlsConf.RootCAs = pool
		}
	}
	transport := &http.Transport{
		Proxy:                  http.ProxyFromEnvironment,
		DialContext:            (&net.Dialer{Timeout: 10 * time.Second}).DialContext,
		TLSClientConfig:        tlsConf,
		TLSHandshakeTimeout:    10 * time.Second,
		ResponseHeaderTimeout:  timeout,
		MaxResponseHeaderBytes: 64 << 10,
		ForceAttemptHTTP2:      true,
		// A fresh handshake on every fetch: each fetch authenticates the
		// endpoint again, against the bundle current then, and no idle
		// connection waits for a refresh that comes minutes later.
		DisableKeepAlives: true,
	}
	return &fetcher{
		td:  p.TrustDomain,
		url: p.URL,
		client: &http.Client{
			Transport: transport,
			Timeout:   timeout,
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			},
		},
		maxSize: maxSize,
	}
}

// endpointAuthError marks a failure to authenticate an https_spiffe
// endpoint's X509-SVID.
type endpointAuthError struct{ err error }

func (e *endpointAuthError) Error() string {
	return "the endpoint's X509-SVID was refused: " + e.err.Error()
}

func (e *endpointAuthError) Unwrap() error { return e.err }

// fetch GETs the peer's bundle and checks it on its own: status, size,
// format, trust domain and authorities. Its order after the last good
// bundle is checked by the caller with checkOrder.
func (f *fetcher) fetch(ctx context.Context) (*spiffebundle.Bundle, *FetchError) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, f.url, http.NoBody)
	if err != nil {
		return nil, f.fail(ReasonTransport, fmt.Errorf("building the request: %w", err))
	}
	req.Header.Set("Accept", "application/json")
	resp, err := f.client.Do(req)
	if err != nil {
		var svidErr *endpointAuthError
		var webErr *tls.CertificateVerificationError
		if errors.As(err, &svidErr) || errors.As(err, &webErr) {
			return nil, f.fail(ReasonEndpointAuth, err)
		}
		return nil, f.fail(ReasonTransport, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		if resp.StatusCode >= 300 && resp.StatusCode < 400 {
			return nil, f.fail(ReasonHTTPStatus, fmt.Errorf("the endpoint answered %s; redirects are not followed, configure the URL it redirects to", resp.Status))
		}
		return nil, f.fail(ReasonHTTPStatus, fmt.Errorf("the endpoint answered %s; want 200 OK", resp.Status))
	}
	if resp.ContentLength > f.maxSize {
		return nil, f.fail(ReasonTooLarge, fmt.Errorf("the body is %d bytes, over the %d-byte limit", resp.ContentLength, f.maxSize))
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, f.maxSize+1))
	if err != nil {
		return nil, f.fail(ReasonTransport, fmt.Errorf("reading the body: %w", err))
	}
	if int64(len(body)) > f.maxSize {
		return nil, f.fail(ReasonTooLarge, fmt.Errorf("the body is over the %d-byte limit", f.maxSize))
	}
	return parseBundle(f.td, body)
}

func (f *fetcher) fail(r Reason, err error) *FetchError {
	return &FetchError{TrustDomain: f.td, Reason: r, Err: err}
}

// close releases the fetcher's connections.
func (f *fetcher) close() { f.client.CloseIdleConnections() }

// parseBundle parses a SPIFFE bundle document of td and checks its
// authorities.
func parseBundle(td spiffeid.TrustDomain, doc []byte) (*spiffebundle.Bundle, *FetchError) {
	b, err := spiffebundle.Parse(td, doc)
	if err != nil {
		return nil, &FetchError{TrustDomain: td, Reason: ReasonMalformed, Err: err}
	}
	if ferr := checkAuthorities(td, b); ferr != nil {
		return nil, ferr
	}
	return b, nil
}

// CheckKey refuses an X.509 authority whose public key is of no
// algorithm it can verify with. x509 parses a certificate whose key
// algorithm it does not know, with a nil key: such an authority verifies
// nothing, and its bundle could not be encoded again (for the store, the
// ConfigMaps and Sign responses).
func CheckKey(c *x509.Certificate) error {
	switch c.PublicKey.(type) {
	case *ecdsa.PublicKey, *rsa.PublicKey, ed25519.PublicKey:
		return nil
	}
	return fmt.Errorf("X.509 authority %q has a public key of an unsupported algorithm (%s)", c.Subject, c.PublicKeyAlgorithm)
}

// checkAuthorities checks that b has an X.509 authority, each with a
// usable key, and that none carries the SPIFFE ID of a trust domain other
// than td. (The bundle
// document does not name its trust domain; a root's SPIFFE ID, which
// meshca's and SPIRE's roots carry, is the one sign of it.)
func checkAuthorities(td spiffeid.TrustDomain, b *spiffebundle.Bundle) *FetchError {
	auths := b.X509Authorities()
	if len(auths) == 0 {
		return &FetchError{TrustDomain: td, Reason: ReasonNoAuthorities,
			Err: errors.New(`the bundle holds no X.509 authority (no key with "use": "x509-svid")`)}
	}
	for _, c := range auths {
		if err := CheckKey(c); err != nil {
			return &FetchError{TrustDomain: td, Reason: ReasonMalformed, Err: err}
		}
		for _, u := range c.URIs {
			if u.Scheme != "spiffe" {
				continue
			}
			id, err := spiffeid.FromURI(u)
			if err != nil {
				continue
			}
			if id.TrustDomain() != td {
				return &FetchError{TrustDomain: td, Reason: ReasonWrongTrustDomain,
					Err: fmt.Errorf("X.509 authority %q carries SPIFFE ID %q, of trust domain %q; want %q",
						c.Subject, id, id.TrustDomain(), td)}
			}
		}
	}
	return nil
}

// checkOrder checks that next may follow last, the peer's last good
// bundle (nil if none): its spiffe_sequence is not lower, and a bundle
// of the same sequence holds the same authorities.
func checkOrder(last, next *spiffebundle.Bundle) *FetchError {
	if last == nil {
		return nil
	}
	td := next.TrustDomain()
	lastSeq, lastHas := last.SequenceNumber()
	seq, has := next.SequenceNumber()
	switch {
	case !lastHas:
		return nil // nothing to order by
	case !has:
		return &FetchError{TrustDomain: td, Reason: ReasonMissingSequence,
			Err: fmt.Errorf("the bundle has no spiffe_sequence, the last good bundle has %d: it cannot be told newer", lastSeq)}
	case seq < lastSeq:
		return &FetchError{TrustDomain: td, Reason: ReasonStaleSequence,
			Err: fmt.Errorf("spiffe_sequence %d is lower than %d, the last good bundle's: a lagging endpoint, a cache or a replay", seq, lastSeq)}
	case seq == lastSeq && !sameAuthorities(last, next):
		return &FetchError{TrustDomain: td, Reason: ReasonSequenceConflict,
			Err: fmt.Errorf("spiffe_sequence %d is the last good bundle's, but the authorities differ: "+
				"an endpoint must raise spiffe_sequence with every change, so one of the two is not the peer's", seq)}
	}
	return nil
}

// sameAuthorities reports whether a and b hold the same X.509 authorities
// (in any order) and the same JWT authorities.
func sameAuthorities(a, b *spiffebundle.Bundle) bool {
	return sameCertSet(a.X509Authorities(), b.X509Authorities()) && a.JWTBundle().Equal(b.JWTBundle())
}

func sameCertSet(a, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	raw := func(cs []*x509.Certificate) [][]byte {
		out := make([][]byte, len(cs))
		for i, c := range cs {
			out[i] = c.Raw
		}
		slices.SortFunc(out, bytes.Compare)
		return out
	}
	return slices.EqualFunc(raw(a), raw(b), bytes.Equal)
}
