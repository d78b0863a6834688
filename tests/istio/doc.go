// Package istio proves that Istio's own CA client works against
// meshca-server. It holds no code, only tests, and is a module of its own
// (github.com/meshca/meshca/tests/istio) so that meshca's main module never
// depends on istio.io/istio.
//
// The tests build meshca-server from this repository, start it on loopback
// with a bootstrap token, and drive it with istio.io/istio's citadel client
// (security/pkg/nodeagent/caclient/providers/citadel) and secret manager
// (security/pkg/nodeagent/cache), configured the way istio-agent
// configures them:
//
//	cd tests/istio && go test -race ./...
//
// or `make test-istio` from the repository root.
package istio
