// Package rotation keeps certificates current: a workload's, with Source,
// and the CA's own authorities, with Manager.
//
// A Source holds a workload's X509-SVID and its trust domain's bundle, and
// renews them from meshca-server: agents and Go programs use it to hold an
// identity. It renews by half of the certificate's life, at a point drawn
// from the tenth of the life before (40–50%), so that workloads started
// together do not renew together; retries failures with capped exponential
// backoff, never waiting more than a twentieth of the time the SVID has
// left; and serves the current certificate until it truly expires. So a CA
// outage shorter than half a leaf lifetime, minus that retry cap, is
// invisible to a workload that renewed on time. When the server turns a
// request away with a google.rpc.RetryInfo detail (meshca-server sheds
// load and rate-limits with ResourceExhausted, sometimes Unavailable), the
// retry waits that delay plus up to half of it at random instead, so that
// workloads shed together do not come back together; the hint is held to
// Backoff.Max and to the same retry cap. It also follows the bundle
// stream, so new roots reach the workload before anything is signed under
// them.
//
// A Source is an x509svid.Source and an x509bundle.Source. TLS configs
// built on it read the live SVID and bundle at every handshake, so a
// rotation swaps the certificate in without dropping connections:
//
//	src, err := rotation.NewSource(rotation.Options{
//		ID:            spiffeid.RequireFromPath(td, "/ns/shop/sa/web"),
//		InitialBundle: bundle, // e.g. x509bundle.Load(td, "bundle.pem")
//		Token:         readServiceAccountToken,
//		Logger:        logger,
//	})
//	if err != nil { ... }
//	serverID := spiffeid.RequireFromPath(td, "/meshca/server")
//	go src.Run(ctx, src.Dialer("dns:///meshca.meshca-system.svc:8443", serverID))
//	if err := src.WaitUntilReady(ctx); err != nil { ... }
//
//	// Serve and dial with the live SVID and bundle (go-spiffe's tlsconfig):
//	serverTLS := tlsconfig.MTLSServerConfig(src, src, tlsconfig.AuthorizeAny())
//	clientTLS := tlsconfig.MTLSClientConfig(src, src, tlsconfig.AuthorizeID(peerID))
//
// An agent that pushes certificates to its own clients waits on Changed.
// One that keeps its certificate on disk passes it back as
// Options.InitialSVID when it restarts: it is served at once, and renewed
// over mTLS, so a restart during a CA outage costs nothing.
//
// # Credentials and connections
//
// The first certificate is got with Options.Token, sent as
// "authorization: Bearer" metadata; renewals present the current SVID as
// the TLS client certificate and send no token. The SVID is presented only
// while the server would take it: it has not expired and it verifies
// against the bundle the source holds. The token is sent again, with no
// client certificate, when the source holds no such SVID (renewals failed
// until it expired, or its root left the bundle), and on the attempt after
// the server refused the SVID as Unauthenticated (its root was retired and
// the watch has not told the source yet); should that attempt fail too,
// the next presents the SVID again.
//
// Run takes a Dialer rather than one connection, and dials anew for every
// Sign request: a TLS client certificate is fixed for a connection's life,
// so a connection opened with no certificate (before the first SVID) or
// with an expired one could never renew over mTLS. One handshake every
// half lifetime costs nothing, and a retry on a new connection may reach a
// healthy replica. The bundle watch keeps its own connection, dialed again
// when the stream breaks.
//
// # What is checked
//
// A Sign response is swapped in only when its chain parses, its leaf is an
// X509-SVID of Options.ID for the key the source generated, and the chain
// verifies against the bundle the source will hold (the response's, when
// its sequence is higher). A bad response is a failed attempt, retried
// with backoff. Bundles are swapped in only when their sequence is higher
// than the held one's, from the watch or from a Sign response; every Sign
// request reports the held sequence, so the server can tell how far a new
// root has propagated. When the bundle no longer verifies the current
// SVID (its root was retired early), the SVID is renewed at once, with the
// token; this holds whichever of a Sign response and the watch brings its
// part last. An Options.InitialSVID that does not verify against
// Options.InitialBundle is ignored, and logged.
//
// # Time
//
// Every renew point, retry and expiry is read from Options.Clock, so tests
// run a day of renewals in milliseconds with a fake clock. The one
// exception is Options.RequestTimeout, a gRPC deadline, which gRPC measures
// on the real clock.
//
// Timers run on the monotonic clock, which stops while the machine is
// suspended or the VM paused, while renew points and expiries are wall
// times. So while it waits the source also reads the wall clock every
// minute: a renewal due during a suspend is made within a minute of the
// resume.
//
// # The CA's authorities
//
// A Manager rotates the authority set of a ca.CA it owns (the server's
// leader runs one). Intermediates rotate by themselves: a successor is
// prepared, under the active root, with a third of the issuer's life left,
// and takes over with a sixth left but never with less than one maximum
// leaf lifetime, so no leaf is cut short; the old one is remembered until
// its last leaf expires. The bundle does not change.
//
// Roots rotate when an operator says so, in three steps:
//
//	PrepareRoot   a new root joins the bundle (its sequence goes up); it
//	              signs nothing yet.
//	ActivateRoot  a new intermediate under it signs; chains carry the new
//	              root cross-signed by the old one, which is now retiring. Refused until every
//	              workload seen by the Tracker within the maximum leaf
//	              lifetime reported holding the new root, or that lifetime
//	              has passed since prepare.
//	RetireRoot    the old root leaves the bundle. Refused while a leaf
//	              under it can still be valid.
//
// OpOptions.Force overrides a refusal and OpOptions.DryRun changes nothing.
// Every step is saved to the ca.Store before the CA uses it: a crash
// between the two leaves the saved step, which the next start loads.
//
// # With an upstream authority
//
// With ManagerOptions.Upstream (Vault's PKI engine, ca/vaultca; the
// server's authority.mode vault), the roots are the upstream's: each
// successor intermediate is made here and signed by the upstream, the
// bundle follows the upstream's roots at every check (a root added there
// joins as prepared; one made the upstream's default becomes active with
// the next intermediate), and PrepareRoot, ActivateRoot and RetireRoot are
// refused with a RefusedError that says how to rotate in the upstream
// instead. While the upstream cannot be reached the CA goes on signing
// with its current intermediate; Run retries with UpstreamBackoff and
// UpstreamStatus (and the meshca_upstream_* metrics, with Registerer)
// says how the upstream last answered.
package rotation
