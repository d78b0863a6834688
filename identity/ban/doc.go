// Package ban keeps meshca's emergency bans: SPIFFE IDs, or whole
// Kubernetes namespaces of the trust domain, for which no certificate is
// issued, by any front end, until the ban is removed or expires.
//
// A Registry holds the bans in force in memory, for the request path to
// check, and writes every change to a Store before it takes effect: a
// FileStore (<dataDir>/bans.json, embedded mode) or a KubeStore (a Secret
// shared by the replicas, written with resourceVersion and watched, so
// that a ban taken on any replica reaches all of them within seconds).
// A Registry that cannot load its bans is not made: a CA that would forget
// a ban does not start.
//
//	store, err := ban.NewFileStore(filepath.Join(dataDir, "bans.json"))
//	bans, err := ban.New(ctx, ban.Options{Store: store, TrustDomain: td})
//	go bans.Run(ctx) // follows a KubeStore's changes; returns at once otherwise
//	target, err := ban.ParseTarget("shop", td) // namespace shop
//	_, _, err = bans.Add(ctx, ban.Ban{Target: target, Reason: "INC-42: leaked key", By: "alice"}, time.Hour)
//	if b, banned := bans.Banned(id); banned { ... refuse, naming b ... }
package ban
