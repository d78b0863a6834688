#!/usr/bin/env bash
# Installs the real Vault server that the integration tests start on loopback
# in dev mode (internal/vaulttest), into $MESHCA_VAULT_ASSETS (default
# ~/.cache/meshca/vault), outside the repo:
#
#   vault  built from the Go module proxy through the wrapper module
#          scripts/vault (its go.mod and go.sum pin every module): cold,
#          about 2 minutes of downloads and 10 to 25 minutes of compile on
#          2 cores (25 on a machine shared with other builds), a 360 MB
#          binary (stripped).
#
# Safe to run again: a binary whose version stamp matches is kept, so a warm
# run takes well under a second. Prints the binary's path on stdout.
set -euo pipefail

VAULT_VERSION=v1.21.0

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WRAPPER="$ROOT/scripts/vault"
ASSETS=${MESHCA_VAULT_ASSETS:-$HOME/.cache/meshca/vault}
mkdir -p "$ASSETS"

# The wrapper module stands alone: no go.work, and go.sum must already hold
# every module (a build never edits it).
export GOWORK=off GOFLAGS=-mod=readonly

log() { echo "vault.sh: $*" >&2; }

# One run at a time per assets folder (two `make test` in parallel).
if command -v flock >/dev/null 2>&1; then
  exec 9>"$ASSETS/.lock"
  flock 9
fi

# stamp_of DIR VERSION: what a binary built from the wrapper module in DIR
# at VERSION is stamped with; a change to go.mod or go.sum rebuilds it.
stamp_of() {
  echo "$2 $(cat "$1/go.mod" "$1/go.sum" | sha256sum | cut -c1-16)"
}

# go_build DIR PKG OUT VERSION [LDFLAGS]: builds PKG in the wrapper module DIR
# into OUT (atomically) unless OUT carries VERSION's stamp already.
go_build() {
  local dir=$1 pkg=$2 out=$3 version=$4 ldflags=${5:-}
  local want stampfile="$ASSETS/.$(basename "$out").version"
  want=$(stamp_of "$dir" "$version")
  if [ -x "$out" ] && [ ! -L "$out" ] && [ "$(cat "$stampfile" 2>/dev/null)" = "$want" ]; then
    log "$(basename "$out") $version is there ($out)"
    return 0
  fi
  local start=$SECONDS
  log "building $(basename "$out") $version from $pkg (cold: 10 to 25 minutes; the Go build cache makes it faster)"
  (cd "$dir" && go mod download)
  log "modules downloaded after $((SECONDS - start))s; compiling"
  # A heartbeat so a quiet cold build does not look hung in CI logs.
  (while sleep 60; do log "still compiling $(basename "$out") ($((SECONDS - start))s)"; done) &
  local heartbeat=$!
  local tmp="$out.tmp.$$" rc=0
  (cd "$dir" && CGO_ENABLED=0 go build -trimpath -buildvcs=false -ldflags "$ldflags" -o "$tmp" "$pkg") || rc=$?
  kill "$heartbeat" 2>/dev/null || true
  wait "$heartbeat" 2>/dev/null || true
  if [ $rc -ne 0 ]; then
    rm -f "$tmp"
    log "building $(basename "$out") failed"
    return $rc
  fi
  rm -f "$out"
  mv "$tmp" "$out"
  echo "$want" >"$stampfile"
  log "built $(basename "$out") $version in $((SECONDS - start))s"
}

start=$SECONDS
# Vault embeds its version (its VERSION file), so no -X is needed; -s -w
# leaves out the symbol table and DWARF, a fifth of the binary.
go_build "$WRAPPER" github.com/hashicorp/vault "$ASSETS/vault" "$VAULT_VERSION" "-s -w"
# A binary that does not run (a bad build, a wrong platform) fails here, not
# in the middle of a test run.
if ! got=$("$ASSETS/vault" version 2>&1); then
  log "$ASSETS/vault does not run: $got"
  exit 1
fi
log "ready in $((SECONDS - start))s: $got (MESHCA_VAULT_ASSETS=$ASSETS)"
echo "$ASSETS/vault"
