package batch

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/internal/pemutil"
	"github.com/meshca/meshca/internal/wire"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
)

// MaxEntries is the most entries the server takes in one call
// (server.MaxBatchEntries).
const MaxEntries = 64

// DefaultMaxRequestBytes is the largest call Renew sends unless told
// otherwise: meshca-server's default transport limit (server.MaxRequestBytes).
const DefaultMaxRequestBytes = 64 << 10

// Entry is one identity to renew.
type Entry struct {
	// ID is the identity to issue for. Required.
	ID spiffeid.ID

	// Key is the new certificate's private key; nil means a new ECDSA
	// P-256 key, returned in Result.SVID.
	Key crypto.Signer

	// TTL is the lifetime asked for; zero means the server's default.
	TTL time.Duration

	// Current is the identity's current X509-SVID, with its private key.
	// When set, the entry is proven with it (an SVID proof), unless it has
	// expired and Token is set.
	Current *x509svid.SVID

	// Token is a bearer token for ID, used when Current is nil or expired.
	Token string
}

// Result is the outcome of one Entry.
type Result struct {
	// SVID is the new X509-SVID with its private key; nil when Err is set.
	SVID *x509svid.SVID

	// Bundle is the trust bundle SVID verified against, as the server sent
	// it with the call, and BundleSequence its sequence number.
	Bundle         *x509bundle.Bundle
	BundleSequence uint64

	// Err says why there is no SVID: a gRPC status error, the server's
	// refusal of this entry or of the whole call (RetryAfter reads its
	// retry hint), or a response that failed Renew's checks.
	Err error
}

// Option configures Renew.
type Option interface{ apply(*options) }

type options struct {
	bundleSequence  uint64
	maxRequestBytes int
}

type optionFunc func(*options)

func (f optionFunc) apply(o *options) { f(o) }

// WithBundleSequence reports the sequence number of the trust bundle the
// caller holds, so that the server can tell how far a new root has
// propagated. Without it, the server is told 0, unknown. With it, a
// response whose bundle is older (a replica that has not yet seen the
// newest roots) is refused: its results fail with Unavailable, to be
// tried again, rather than verified against roots the caller has moved
// past.
func WithBundleSequence(seq uint64) Option {
	return optionFunc(func(o *options) { o.bundleSequence = seq })
}

// WithMaxRequestBytes sets the largest call Renew sends, for a server
// whose transport limit is not the default; n <= 0 means
// DefaultMaxRequestBytes.
func WithMaxRequestBytes(n int) Option {
	return optionFunc(func(o *options) { o.maxRequestBytes = n })
}

// Renew asks client for a new X509-SVID for each entry, in as few
// SignBatch calls as MaxEntries and the request size allow, one call after
// the other. It returns one Result per entry, in order: a refused entry,
// or a failed call, does not keep the others from their certificates.
//
// Renew's own error is for entries it cannot send (no ID, no credential,
// a current SVID of another ID); then nothing is sent.
func Renew(ctx context.Context, client meshcav1.CertificateServiceClient, entries []Entry, opts ...Option) ([]Result, error) {
	o := options{maxRequestBytes: DefaultMaxRequestBytes}
	for _, opt := range opts {
		opt.apply(&o)
	}
	if o.maxRequestBytes <= 0 {
		o.maxRequestBytes = DefaultMaxRequestBytes
	}
	now := time.Now()
	keys := make([]crypto.Signer, len(entries))
	wire := make([]*meshcav1.SignBatchEntry, len(entries))
	for i, e := range entries {
		var err error
		if keys[i], wire[i], err = prepare(e, now); err != nil {
			return nil, fmt.Errorf("batch: entry %d (%s): %w", i, e.ID, err)
		}
	}

	results := make([]Result, len(entries))
	for _, c := range pack(wire, o) {
		req := &meshcav1.SignBatchRequest{Entries: wire[c.start:c.end], BundleSequence: o.bundleSequence}
		resp, err := client.SignBatch(ctx, req)
		if err == nil && len(resp.GetResults()) != len(req.Entries) {
			err = fmt.Errorf("batch: the CA answered %d results for %d entries", len(resp.GetResults()), len(req.Entries))
		}
		var (
			bundle *x509bundle.Bundle
			seq    uint64
		)
		if err == nil {
			bundle, seq, err = parseBundle(resp.GetBundle())
		}
		if err == nil && seq < o.bundleSequence {
			err = status.Errorf(codes.Unavailable, "batch: the CA's trust bundle (sequence %d) is older than the caller's (%d): a replica behind on the roots; try again", seq, o.bundleSequence)
		}
		for j := range req.Entries {
			i := c.start + j
			results[i] = Result{Bundle: bundle, BundleSequence: seq, Err: err}
			if err == nil {
				results[i].SVID, results[i].Err = check(resp.GetResults()[j], entries[i].ID, keys[i], bundle)
			}
		}
	}
	return results, nil
}

// prepare makes the entry's key, CSR and credential.
func prepare(e Entry, now time.Time) (crypto.Signer, *meshcav1.SignBatchEntry, error) {
	if e.ID.IsZero() {
		return nil, nil, errors.New("no ID")
	}
	useCurrent := e.Current != nil
	if useCurrent {
		if len(e.Current.Certificates) == 0 || e.Current.PrivateKey == nil {
			return nil, nil, errors.New("the current SVID has no certificate or no private key")
		}
		if e.Current.ID != e.ID {
			return nil, nil, fmt.Errorf("the current SVID is for %q", e.Current.ID)
		}
		leaf := e.Current.Certificates[0]
		if e.Token != "" && (now.Before(leaf.NotBefore) || now.After(leaf.NotAfter)) {
			useCurrent = false
		}
	}
	if !useCurrent && e.Token == "" {
		return nil, nil, errors.New("no credential: set Current or Token")
	}

	key := e.Key
	if key == nil {
		var err error
		if key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
			return nil, nil, fmt.Errorf("generating a key: %w", err)
		}
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{e.ID.URL()}}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("creating the CSR: %w", err)
	}
	w := &meshcav1.SignBatchEntry{Csr: csr}
	if e.TTL > 0 {
		w.Ttl = durationpb.New(e.TTL)
	}
	if useCurrent {
		sig, err := identity.SignSVIDProof(e.Current.PrivateKey, csr)
		if err != nil {
			return nil, nil, err
		}
		chain := make([][]byte, len(e.Current.Certificates))
		for i, c := range e.Current.Certificates {
			chain[i] = c.Raw
		}
		w.Credential = &meshcav1.SignBatchEntry_SvidProof{SvidProof: &meshcav1.SVIDProof{CertChain: chain, Signature: sig}}
	} else {
		w.Credential = &meshcav1.SignBatchEntry_Token{Token: e.Token}
	}
	return key, w, nil
}

// call is the entries [start, end) of one SignBatch call.
type call struct{ start, end int }

// pack splits entries into calls of at most MaxEntries entries and, where
// entries allow, o.maxRequestBytes bytes. An entry larger than that alone
// goes alone, for the server to refuse.
func pack(entries []*meshcav1.SignBatchEntry, o options) []call {
	base := 0
	if o.bundleSequence != 0 {
		base = protowire.SizeTag(2) + protowire.SizeVarint(o.bundleSequence)
	}
	var calls []call
	cur, size := call{}, base
	for i, e := range entries {
		n := protowire.SizeTag(1) + protowire.SizeBytes(proto.Size(e))
		if cur.end > cur.start && (cur.end-cur.start == MaxEntries || size+n > o.maxRequestBytes) {
			calls = append(calls, cur)
			cur, size = call{start: i, end: i}, base
		}
		cur.end = i + 1
		size += n
	}
	if cur.end > cur.start {
		calls = append(calls, cur)
	}
	return calls
}

// check validates the result of one entry: the chain parses, is for id
// and key, and verifies against bundle.
func check(r *meshcav1.SignBatchResult, id spiffeid.ID, key crypto.Signer, bundle *x509bundle.Bundle) (*x509svid.SVID, error) {
	if code := codes.Code(r.GetCode()); code != codes.OK {
		st := status.New(code, r.GetMessage())
		if d := r.GetRetryAfter(); d != nil {
			if withInfo, err := st.WithDetails(&errdetails.RetryInfo{RetryDelay: d}); err == nil {
				st = withInfo
			}
		}
		return nil, st.Err()
	}
	if len(r.GetCertChain()) == 0 {
		return nil, errors.New("batch: the CA's result has no certificate chain")
	}
	chain, err := pemutil.ParseDER(r.GetCertChain())
	if err != nil {
		return nil, fmt.Errorf("batch: the CA's certificate chain: %w", err)
	}
	leaf := chain[0]
	got, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return nil, fmt.Errorf("batch: the CA issued a certificate that is not an X509-SVID: %w", err)
	}
	if got != id {
		return nil, fmt.Errorf("batch: the CA issued a certificate for %q; asked for %q", got, id)
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(leaf.PublicKey) {
		return nil, errors.New("batch: the CA issued a certificate for another public key than the CSR's")
	}
	if bundle.TrustDomain() != id.TrustDomain() {
		return nil, fmt.Errorf("batch: the CA's bundle is for trust domain %q; %q is in %q", bundle.TrustDomain(), id, id.TrustDomain())
	}
	// A certificate not yet valid by this clock (the server's is ahead by
	// more than its backdating) is judged at its NotBefore, as rotation
	// does; an expired one is refused.
	at := time.Now()
	if at.Before(leaf.NotBefore) {
		at = leaf.NotBefore
	}
	if _, _, err := x509svid.Verify(chain, bundle, x509svid.WithTime(at)); err != nil {
		return nil, fmt.Errorf("batch: the CA's certificate chain does not verify against its trust bundle: %w", err)
	}
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}, nil
}

// parseBundle parses the response's bundle.
func parseBundle(pb *meshcav1.TrustBundle) (*x509bundle.Bundle, uint64, error) {
	bundle, seq, err := wire.ParseBundle(pb)
	if err != nil {
		return nil, 0, fmt.Errorf("batch: the CA's response: %w", err)
	}
	return bundle, seq, nil
}

// RetryAfter returns the delay the server asked the caller to wait before
// trying again (a google.rpc.RetryInfo detail of err's gRPC status), and
// whether there was one: set when the server shed load or rate-limited
// the entry or the call.
func RetryAfter(err error) (time.Duration, bool) {
	return wire.RetryAfter(err)
}
