// Package kubetest starts a real Kubernetes API server, backed by a real
// etcd, on loopback for meshca's integration tests: TokenReview, ConfigMaps,
// Secrets, Leases and RBAC behave exactly as in a cluster, which no fake
// clientset gives.
//
// The binaries come from scripts/kube.sh (run by `make tools` and
// `make test`), which puts kube-apiserver and etcd in $MESHCA_KUBE_ASSETS
// (default ~/.cache/meshca/kube). When they are missing a test fails and
// says how to get them; a developer without them can set MESHCA_SKIP_KUBE=1
// to skip such tests instead (CI never does).
//
// A cluster starts in about 3 s, so a test package shares one through a
// Shared started lazily by the first test that asks for it and stopped when
// the package's tests end:
//
//	var kube kubetest.Shared
//
//	func TestMain(m *testing.M) { kube.Run(m) }
//
//	func TestReview(t *testing.T) {
//		c := kube.Cluster(t)
//		ns := c.CreateNamespace(t, "review-").Name // a fresh, unique name
//		c.CreateServiceAccount(t, ns, "workload")
//		token := c.Token(t, ns, "workload", []string{"meshca"}, 10*time.Minute)
//		// ... review token with c.Client.AuthenticationV1() ...
//	}
//
// Tests sharing a cluster keep apart by working in namespaces of their own.
// Start gives a test a cluster of its own, stopped when the test ends.
//
// The cluster runs no controller manager and no scheduler: pods stay
// Pending, deleted namespaces stay Terminating, and no "default" service
// account appears by itself (the ServiceAccount admission plugin is off so
// pods can be created without one). Service-account tokens are issued by
// Issuer and signed with ServiceAccountKey; the API server caches a
// successful token authentication for 10 s (not configurable), so a token
// of a service account deleted just after it was reviewed still passes for
// up to 10 s.
package kubetest
