package server

import (
	"context"
	"runtime"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/meshca/meshca/identity"
	"github.com/meshca/meshca/internal/wire"
	meshcav1 "github.com/meshca/meshca/proto/meshca/v1"
)

// APINativeBatch labels the native API's batch renewal,
// meshca.v1.CertificateService/SignBatch, in metrics and audit lines: one
// line and one count per entry.
const APINativeBatch = "native_batch"

// MaxBatchEntries is the most entries one SignBatch call may hold.
const MaxBatchEntries = 64

// ReasonNoCredential is the reason label of a batch entry refused because
// it carries neither a token nor an SVID proof.
const ReasonNoCredential = string(identity.ReasonNoCredential)

// SignBatch issues a certificate for each entry as Sign would, each entry
// with its own credential, and answers with one result per entry and the
// bundles once. A refused entry does not fail the call: its result says
// why.
func (c *certificateService) SignBatch(ctx context.Context, req *meshcav1.SignBatchRequest) (*meshcav1.SignBatchResponse, error) {
	entries := req.GetEntries()
	switch n := len(entries); {
	case n == 0:
		return nil, status.Error(codes.InvalidArgument, "server: the batch has no entries; send 1 to 64")
	case n > MaxBatchEntries:
		return nil, status.Errorf(codes.InvalidArgument, "server: the batch has %d entries, more than the limit of %d; split it into several calls", n, MaxBatchEntries)
	}

	results := make([]*meshcav1.SignBatchResult, len(entries))
	// Entries are independent: issue them side by side, as many at once
	// as there are CPUs to sign with. The shared path's admission still
	// bounds the signing work of every caller together.
	sem := make(chan struct{}, runtime.GOMAXPROCS(0))
	var wg sync.WaitGroup
	for i, e := range entries {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			wg.Wait()
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		wg.Go(func() {
			defer func() { <-sem }()
			results[i] = c.signEntry(ctx, e, req.GetBundleSequence())
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		// The caller is gone; what was issued is audited.
		return nil, status.FromContextError(err).Err()
	}
	federated, _ := c.s.fedCache.get()
	return &meshcav1.SignBatchResponse{
		Results:          results,
		Bundle:           c.s.bundleProto(),
		FederatedBundles: federated,
	}, nil
}

// signEntry issues one entry through the shared path, with the entry's
// own credential and nothing of the connection's.
func (c *certificateService) signEntry(ctx context.Context, e *meshcav1.SignBatchEntry, bundleSequence uint64) *meshcav1.SignBatchResult {
	r := issueRequest{api: APINativeBatch, csr: e.GetCsr(), bundleSequence: bundleSequence}
	r.ttl, r.refused = requestedTTL(e.GetTtl())
	switch cred := e.GetCredential().(type) {
	case *meshcav1.SignBatchEntry_Token:
		r.credential = func(context.Context) (identity.Credential, error) {
			token, err := identity.ParseToken([]byte(cred.Token), "the entry's token")
			if err != nil {
				return identity.Credential{}, err
			}
			return identity.Credential{Token: token}, nil
		}
	case *meshcav1.SignBatchEntry_SvidProof:
		var proof []byte
		r.credential = func(context.Context) (identity.Credential, error) {
			chain, err := identity.ParseSVIDProofChain(cred.SvidProof.GetCertChain())
			proof = cred.SvidProof.GetSignature()
			return identity.Credential{PeerCertificates: chain}, err
		}
		r.proof = func(c identity.Credential) error {
			return identity.VerifySVIDProof(c.PeerCertificates[0], e.GetCsr(), proof)
		}
		// The proven chain is authenticated as a TLS client certificate
		// is, by the SVID authenticator, and by nothing else; the audit
		// line and admission know it as a proof.
		r.methods = []identity.Method{identity.MethodMTLS}
		r.asMethod = identity.MethodSVIDProof
	default:
		r.credential = func(context.Context) (identity.Credential, error) {
			return identity.Credential{}, refusef(codes.Unauthenticated, ReasonNoCredential,
				"no credential: set the entry's token or svid_proof; the call's own metadata and TLS client certificate are not credentials for its entries")
		}
	}

	issued, err := c.s.issue(ctx, r)
	if err != nil {
		return batchError(err)
	}
	return &meshcav1.SignBatchResult{
		Code:      int32(codes.OK),
		CertChain: chainDER(issued),
		ExpiresAt: timestamppb.New(issued.Cert.NotAfter),
		SpiffeId:  issued.Cert.URIs[0].String(),
	}
}

// batchError turns the status error of the shared path into an entry's
// result, keeping a retry hint.
func batchError(err error) *meshcav1.SignBatchResult {
	st := status.Convert(err)
	res := &meshcav1.SignBatchResult{Code: int32(st.Code()), Message: st.Message()}
	if after, ok := wire.RetryAfter(err); ok {
		res.RetryAfter = durationpb.New(after)
	}
	return res
}
