// Package agent is the core of meshca-agent: it gets and renews one
// workload's X509-SVID from meshca-server, and serves it to the workload
// on a Unix socket, as the SPIFFE Workload API (package workloadapi) and
// Envoy SDS (package sds), and as PEM files with an optional reload
// command (package files).
//
// The SVID and bundle come from a rotation.Source: the first SVID with
// Config.Token (a service-account or bootstrap token), renewals at half
// life over mTLS with the current SVID, the bundle followed by a watch
// stream, federated bundles from every renewal. Every change is pushed at
// once to open Workload API and SDS streams and written to the files.
//
// # Outages and restarts
//
// While meshca-server is unreachable the agent keeps serving its last
// SVID until that expires: with the default renewal at half life, an
// outage shorter than half a lifetime is invisible to the workload. With
// Config.Files set, a restarted agent reads the SVID it wrote there and
// serves it at once, while valid, and renews it over mTLS: a restart
// during an outage costs nothing either.
//
// # One identity per agent
//
// An agent serves exactly one identity, Config.ID, to whoever can connect
// to its socket: the socket's file mode and directory are the access
// control. That fits a sidecar (the socket in a volume only the pod
// mounts) and a node agent for one identity. A node agent serving many
// workloads, each its own identity, would have to tell its callers apart
// by their process (workload attestation: the peer's PID, cgroup and
// Kubernetes pod over SO_PEERCRED, as SPIRE's agent does) and fetch a
// certificate per identity with a credential it is allowed to use for
// each. meshca does not build that; run one agent per identity.
//
// Example:
//
//	a, err := agent.New(agent.Config{
//		ID:            spiffeid.RequireFromPath(td, "/ns/shop/sa/web"),
//		ServerAddress: "meshca.meshca-system.svc:8443",
//		TrustBundle:   bundle, // x509bundle.Load(td, "/var/run/meshca/bundle.pem")
//		Token:         readTokenFile,
//		SocketPath:    "/run/meshca/agent.sock",
//		Files:         agent.FilesConfig{Dir: "/run/meshca/certs"},
//		Logger:        log,
//	})
//	if err != nil {
//		return err
//	}
//	return a.Run(ctx) // until ctx is done
package agent
