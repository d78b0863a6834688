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

# shellcheck disable=SC2317 # called by wrapper-build.sh
log() { echo "vault.sh: $*" >&2; }
COLD_HINT="10 to 25 minutes"
# shellcheck source=scripts/wrapper-build.sh
. "$ROOT/scripts/wrapper-build.sh"

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
