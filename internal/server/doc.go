// Package server wires meshca's gRPC front ends to the CA: it takes a
// request's credential and CSR, runs the one shared path (authenticate,
// validate the CSR, authorise the identity, sign), and turns the outcome
// into a gRPC status, a metric and an audit line.
//
// Front ends translate their wire format and nothing more, so the native
// API and the Istio and Linkerd compatible ones cannot drift apart in
// policy.
package server
