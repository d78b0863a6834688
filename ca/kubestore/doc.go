// Package kubestore keeps meshca's authority set, private keys included,
// in a Kubernetes Secret in the CA's namespace: the store of replicas
// that share one CA.
//
// Writes are optimistic: Save updates the Secret with the resourceVersion
// this Store last read or wrote, so a write made from stale state fails
// with ErrConflict instead of overwriting another replica's change. The
// writer then reloads (Reload) and decides again. Replicas that do not
// write learn of changes through Watch, or Follow, which applies them to
// their CA.
//
//	store, err := kubestore.New(kubestore.Options{Client: client.CoreV1(), Namespace: ns})
//	set, err := kubestore.LoadOrCreate(ctx, store, ca.AuthorityOptions{TrustDomain: td})
//	authority, err := ca.New(set, ca.Options{})
//	go kubestore.Follow(ctx, store, authority, logger, 0)
//
// The service account needs get, create, update, list and watch on
// Secrets in its own namespace; when the deployment creates the Secret
// empty beforehand, create is not needed and the other verbs can be
// limited to its name.
package kubestore
