// Package server wires meshca's gRPC front ends to the CA: it takes a
// request's credential and CSR, runs the one shared path (authenticate,
// validate the CSR, authorise the identity, sign), and turns the outcome
// into a gRPC status, a metric and an audit line.
//
// Front ends translate their wire format and nothing more, so the native
// API and the Istio and Linkerd compatible ones cannot drift apart in
// policy. Each gives the shared path its CSR form (an X509-SVID request,
// or Linkerd's DNS-named one), where the credential comes from, the token
// audiences of its API and the authentication methods it accepts:
//
//	srv, err := server.New(server.Options{
//		CA:            c,
//		Authenticator: identity.Chain(tokens, reviews, svids),
//		Istio:         server.IstioOptions{Enabled: true},   // audience istio-ca
//		Linkerd:       server.LinkerdOptions{Enabled: true}, // audience identity.l5d.io
//	})
//	if err != nil { ... }
//	g := srv.GRPCServer(serving.TLSConfig())
package server
