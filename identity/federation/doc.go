// Package federation is SPIFFE federation for meshca: the bundle endpoint
// that serves this trust domain's bundle to other trust domains, and the
// Federator that fetches theirs and keeps them for workloads.
//
// # Bundle endpoint
//
// An Endpoint serves the CA's bundle as a SPIFFE bundle document at "/"
// over HTTPS, with spiffe_sequence set to the CA's bundle sequence and
// spiffe_refresh_hint to the configured hint, using go-spiffe's
// federation handler. Profile https_web serves a Web PKI certificate from
// files, read again when they change; https_spiffe serves the server's
// own X509-SVID:
//
//	ep, err := federation.NewEndpoint(federation.EndpointOptions{
//		TrustDomain:    certificateAuthority.TrustDomain(),
//		Bundles:        certificateAuthority, // *ca.CA
//		RefreshHint:    5 * time.Minute,
//		Profile:        federation.ProfileHTTPSSPIFFE,
//		GetCertificate: servingCert.GetCertificate,
//	})
//	if err != nil { ... }
//	go ep.Serve(ctx, listener)
//
// go-spiffe's federation.FetchBundle reads it unchanged.
//
// # Federator
//
// A Federator keeps one Peer per federated trust domain. It fetches each
// peer's bundle at once, then at the bundle's refresh hint (bounded by
// Options.MinRefresh and MaxRefresh, a little earlier at random), and
// after a failure retries sooner, backing off. A fetched bundle is taken
// only if it is a SPIFFE bundle no larger than Options.MaxBundleSize,
// with an X.509 authority, none naming another trust domain, and a
// spiffe_sequence not below the last good bundle's (equal only with the
// same authorities); otherwise, and when the endpoint cannot be reached,
// the last good bundle is kept and PeerStatus.LastError says why. For
// https_spiffe the endpoint's X509-SVID must carry Peer.EndpointID and
// verify against the peer's last good bundle, which starts as the
// bootstrap bundle and follows the peer's root rotations from there.
//
// Peers are added and removed at run time and kept, with their last good
// bundles, in a Store (FileStore in a file), so that after a restart the
// bundles are published before any fetch, even while a peer is down:
//
//	fed, err := federation.New(ctx, federation.Options{
//		TrustDomain: td,
//		Store:       federation.NewFileStore(filepath.Join(dataDir, "federation.json")),
//		Logger:      logger,
//		Registerer:  registry,
//	})
//	if err != nil { ... }
//	go fed.Run(ctx)
//	err = fed.AddPeer(ctx, federation.Peer{
//		TrustDomain: peerTD,
//		URL:         "https://meshca.west.example:8443/",
//		Profile:     federation.ProfileHTTPSSPIFFE,
//		EndpointID:  spiffeid.RequireFromPath(peerTD, "/meshca/server"),
//		Bootstrap:   bootstrapBundle,
//	})
//
// The server publishes the federated bundles to workloads from Watch (the
// bundle stream, Sign responses, ConfigMaps), and verifies federated SVIDs
// with the Federator as an x509bundle.Source:
//
//	for {
//		bundles, changed := fed.Watch()
//		publish(bundles)
//		select {
//		case <-changed:
//		case <-ctx.Done():
//			return
//		}
//	}
//
// Metrics: meshca_federation_fetches_total{peer,result},
// meshca_federation_bundle_sequence{peer},
// meshca_federation_bundle_age_seconds{peer} and
// meshca_federation_store_errors_total.
package federation
