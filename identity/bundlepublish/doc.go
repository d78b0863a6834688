// Package bundlepublish keeps the CA's trust bundle in a ConfigMap in every
// namespace of a Kubernetes cluster, so that workloads and tools that read
// files or the Kubernetes API, rather than the bundle stream, trust the
// current roots, a root prepared for rotation included.
//
// Each ConfigMap (DefaultConfigMapName unless configured) holds the bundle
// as PEM (KeyPEM), as a SPIFFE bundle document with its sequence and
// refresh hint (KeySPIFFE), and the sequence and trust domain on their own
// (KeySequence, KeyTrustDomain). With Options.Federated (a
// *federation.Federator), it also holds each federated trust domain's
// bundle, as PEM under FederatedPEMKey ("federated.<td>.pem") and as the
// peer's SPIFFE bundle document under FederatedSPIFFEKey
// ("federated.<td>.spiffe.json"); a trust domain whose keys would be longer
// than a ConfigMap key may be (253 bytes) is left out, with an error
// logged. It is rewritten on every change of the bundle or the federated
// bundles (a peer added, removed, or rotating its root), recreated when
// deleted, restored when edited, and created in every new namespace. The
// rules:
//
//   - A namespace labelled meshca.io/inject-bundle=false (OptOutLabel,
//     OptOutValue) gets none, and the one published there before is
//     deleted.
//   - Terminating namespaces are skipped.
//   - A ConfigMap is the publisher's when it carries
//     app.kubernetes.io/managed-by=meshca (ManagedByLabel). One of the
//     same name without it is someone else's: it is never changed or
//     deleted, and every check logs an error and counts not_ours in
//     meshca_bundle_configmap_syncs_total.
//   - A ConfigMap holding a later sequence of the same trust domain is not
//     rolled back: a replica whose CA lags behind the shared state must not
//     take a prepared root away from workloads. Delete the ConfigMaps to
//     publish a bundle whose sequence went back on purpose.
//
// Only one replica should publish: run the Publisher under leader
// election, with the leader's context, so that it stops when leadership is
// lost:
//
//	pub, err := bundlepublish.New(bundlepublish.Options{
//		Client:    clientset,
//		Source:    certificateAuthority, // *ca.CA
//		Federated: federator,            // *federation.Federator, or nil
//		Logger:    logger,
//	})
//	if err != nil { ... }
//	// under leader election:
//	OnStartedLeading: func(ctx context.Context) {
//		if err := pub.Run(ctx); err != nil { ... }
//	},
//
// The publisher needs, cluster-wide: list and watch on namespaces; create
// on configmaps; and list, watch, update and delete on configmaps limited
// to the ConfigMap's name with resourceNames (it lists and watches them
// with a metadata.name field selector, which RBAC checks against
// resourceNames).
package bundlepublish
