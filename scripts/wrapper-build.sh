# shellcheck shell=bash
# Sourced by kube.sh and vault.sh: the real servers of the integration tests
# are built from the Go module proxy through wrapper modules under scripts/,
# into $ASSETS, once per version stamp. The caller sets ASSETS (created),
# COLD_HINT (how long a cold build takes, for the log) and defines log().

# The wrapper modules stand alone: no go.work, and go.sum must already hold
# every module (a build never edits it).
export GOWORK=off GOFLAGS=-mod=readonly

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
  local want stampfile
  stampfile="$ASSETS/.$(basename "$out").version"
  want=$(stamp_of "$dir" "$version")
  if [ -x "$out" ] && [ ! -L "$out" ] && [ "$(cat "$stampfile" 2>/dev/null)" = "$want" ]; then
    log "$(basename "$out") $version is there ($out)"
    return 0
  fi
  local start=$SECONDS
  log "building $(basename "$out") $version from $pkg (cold: $COLD_HINT; the Go build cache makes it faster)"
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

