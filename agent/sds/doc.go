// Package sds serves a workload's X509-SVID and trust bundles to Envoy over
// the Secret Discovery Service (SDS, envoy.service.secret.v3), on the
// agent's Unix socket.
//
// Three secrets are served, by name:
//
//   - Options.CertificateName ("default", as Istio's agent names it): a
//     tls_certificate with the SVID's chain (leaf first, then the
//     intermediates) and its PKCS#8 private key, inline PEM.
//   - Options.ValidationContextName ("ROOTCA"): a validation_context whose
//     trusted_ca is the roots of the SVID's own trust domain, and nothing
//     else.
//   - Options.FederatedValidationContextName ("ALL", as SPIRE's agent names
//     it): a validation_context that verifies peers of the own trust domain
//     and of every federated one with Envoy's SPIFFE certificate validator
//     (envoy.tls.cert_validator.spiffe), one trust_domains entry per trust
//     domain, each with only its own roots.
//
// Federated roots never join ROOTCA. Istio merges them into one root set,
// which lets a federated CA issue certificates that verify as identities of
// this trust domain; Envoy's SPIFFE validator picks the roots by the peer's
// trust domain instead, so a domain can vouch only for its own identities.
// A listener that must accept federated peers references the federated
// validation context in place of ROOTCA; one that must not keeps ROOTCA.
//
// The protocol is go-control-plane's own server and snapshot cache: state of
// the world and delta streams, on SecretDiscoveryService and on
// AggregatedDiscoveryService (ADS), and FetchSecrets. Every node is served
// the same snapshot: an agent serves one identity. Run publishes a new,
// versioned snapshot whenever the Source changes, and every open stream is
// pushed the secrets it asked for. Before the first SVID nothing is served
// and streams wait; a request for a name that is not served gets no answer
// for it, and the stream stays open.
//
// Example:
//
//	srv, err := sds.New(sds.Options{Source: src, Logger: log})
//	if err != nil {
//		return err
//	}
//	g := grpc.NewServer()
//	srv.Register(g)
//	go srv.Run(ctx)
//	lis, err := net.Listen("unix", "/run/meshca/agent.sock")
//	...
//	return g.Serve(lis)
package sds
