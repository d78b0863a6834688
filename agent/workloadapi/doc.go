// Package workloadapi serves the SPIFFE Workload API
// (github.com/spiffe/go-spiffe/v2/proto/spiffe/workload, service
// SpiffeWorkloadAPI) for one workload identity, on the agent's Unix
// socket. go-spiffe's workloadapi client, and SPIRE-compatible clients,
// work against it unchanged.
//
// What is served:
//
//   - FetchX509SVID: a stream of X509SVIDResponse messages, one svids entry
//     with the SVID's SPIFFE ID, its chain (leaf first, concatenated DER),
//     its private key (PKCS#8 DER) and the roots of its trust domain
//     (concatenated DER), and federated_bundles keyed by each federated
//     trust domain's SPIFFE ID ("spiffe://other.example"). A message is
//     sent at once when the source holds a valid SVID, else when it first
//     does (the call waits: before the first SVID, and after the SVID
//     expired while the CA was unreachable), then on every change: every
//     rotation, every change of the bundle or of the federated bundles.
//   - FetchX509Bundles: a stream of X509BundlesResponse messages with the
//     own trust domain's roots and the federated ones, sent at once (the
//     bundle is known before any SVID) and on every change of them.
//   - FetchJWTSVID, FetchJWTBundles, ValidateJWTSVID: Unimplemented. meshca
//     issues X509-SVIDs only; the CA has no JWT signing key yet, so there
//     is nothing to sign JWT-SVIDs with or validate them against. The same
//     holds for the WIT-SVID profile (FetchWITSVID, FetchWITBundles).
//
// Every call must carry the gRPC metadata "workload.spiffe.io: true", as
// the SPIFFE Workload API specification requires (it keeps browsers and
// other confused deputies from reaching the socket through a proxy); one
// without it is refused with InvalidArgument "security header missing from
// request", as SPIRE refuses it. go-spiffe's client sends it and does not
// retry InvalidArgument.
//
// Streams end when the caller cancels, or with Unavailable when the server
// shuts down (Shutdown), which go-spiffe's client retries. At most
// Options.MaxStreams streams are open at once; one more is refused with
// ResourceExhausted.
//
// The server holds no identity of its own: whoever can connect to the
// socket is served the source's SVID and private key. An agent serves one
// identity, so the socket's file mode and directory are the access control
// (see the agent's docs); a node agent serving many identities would need
// workload attestation (telling callers apart by their process), which is
// not built.
//
// Example:
//
//	api, err := workloadapi.New(workloadapi.Options{Source: src, TrustDomain: td, Logger: log})
//	if err != nil {
//		return err
//	}
//	g := grpc.NewServer()
//	api.Register(g)
//	defer api.Shutdown() // before g.GracefulStop
//	return g.Serve(lis)
package workloadapi
