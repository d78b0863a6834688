#!/usr/bin/env bash
# Runs the Istio compatibility tests: Istio's own CA client (istio.io/istio's
# citadel client and istio-agent's secret manager) against a meshca-server
# built from this repository. They live in tests/istio, a module of its own
# (go.mod pins istio.io/istio and replaces istio.io/api and Envoy's protos
# with the versions meshca serves), so that the main module never depends on
# istio.io/istio. `make test-istio` runs this; `make test` depends on it.
#
# Cold, the first run downloads istio.io/istio and its dependencies from the
# Go module proxy and compiles them (a few minutes on 2 cores); after that the
# Go build cache holds everything and a run takes well under a minute.
set -euo pipefail

cd "$(dirname "$0")/../tests/istio"

# tests/istio stands alone: no go.work, and go.sum already holds every
# module, so a test run never edits go.mod or go.sum (after a change of the
# main module's requirements, run `go mod tidy` in tests/istio). No VCS
# stamping, so that a change of the checkout's git state does not relink
# meshca-server on every run. The user's own GOFLAGS are kept, so that the
# build cache entries are the ones the rest of the repository's builds use.
export GOWORK=off
GOFLAGS="$(go env GOFLAGS) -mod=readonly -buildvcs=false"
export GOFLAGS

echo "test-istio: go vet (tests/istio)" >&2
go vet ./...
echo "test-istio: go test -race (tests/istio)" >&2
go test -race -count=1 ./...
