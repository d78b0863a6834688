// Package leader elects the one meshca replica that rotates authorities
// and distributes bundles, with a coordination.k8s.io Lease in the CA's
// namespace. Every replica signs; only the leader changes shared state,
// and it does so only while it holds the Lease.
//
//	err := leader.Run(ctx, leader.Options{
//		Client:    client.CoordinationV1(),
//		Namespace: ns,
//		Name:      "meshca-leader",
//		Identity:  podName,
//		Logger:    logger,
//		OnStartedLeading: func(ctx context.Context) {
//			_ = manager.Run(ctx) // until the Lease is lost or the server stops
//		},
//	})
//
// A replica that stops gracefully releases the Lease after its leader's
// work has returned, so another takes over at once; one that dies is
// replaced after LeaseDuration.
package leader
