#!/usr/bin/env bash
# Finds a Go vulnerability database for govulncheck, and installs the
# pinned govulncheck into $MESHCA_TOOLS. Prints the database's URL (for
# `govulncheck -db URL`) on stdout and what it chose on stderr.
#
# In order:
#   1. MESHCA_VULNDB_SOURCE, if set: a zip of OSV entries (osv.dev's
#      Go/all.zip) or a directory holding them (a golang/vulndb checkout's
#      data/osv). Its GO-*.json files are copied into the cache
#      ($MESHCA_VULNDB, default ~/.cache/meshca/vulndb), replacing it, and
#      the cache is used. This is how a machine without internet gets one:
#      copy the zip there from one that has it.
#   2. https://vuln.go.dev, when it answers.
#   3. The cache, if an earlier import filled it (with a warning when it
#      is older than MESHCA_VULNDB_MAX_AGE_DAYS, default 30).
# With none of them it exits 3 and says so: the caller decides whether
# that fails the build (`make lint VULNCHECK=required`).
#
# govulncheck reads a flat directory of <ID>.json OSV entries and builds
# the index itself (golang.org/x/vuln's internal/client, "hybrid source"),
# so the cache is that directory and nothing more. The module
# golang.org/x/vulndb, which holds the same entries, is refused by the Go
# module proxy (403), so it cannot be the source.
set -euo pipefail

TOOLS=${MESHCA_TOOLS:-$HOME/.cache/meshca/bin}
CACHE=${MESHCA_VULNDB:-$HOME/.cache/meshca/vulndb}
MAX_AGE_DAYS=${MESHCA_VULNDB_MAX_AGE_DAYS:-30}
LIVE=https://vuln.go.dev
# v1.9.0 needs a golang.org/x/telemetry version the proxy refuses.
GOVULNCHECK=v1.8.0

say() { echo "vulndb: $*" >&2; }

install_govulncheck() {
  local stamp="$TOOLS/.govulncheck.version"
  if [ -x "$TOOLS/govulncheck" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$GOVULNCHECK" ]; then
    return 0
  fi
  mkdir -p "$TOOLS"
  GOBIN="$TOOLS" go install "golang.org/x/vuln/cmd/govulncheck@$GOVULNCHECK"
  echo "$GOVULNCHECK" >"$stamp"
}

# import_source SRC: replaces the cache with the OSV entries of SRC.
import_source() {
  local src=$1
  mkdir -p "$(dirname "$CACHE")"
  tmp=$(mktemp -d "$(dirname "$CACHE")/.vulndb-import.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  mkdir "$tmp/osv"
  if [ -d "$src" ]; then
    find "$src" -type f -name 'GO-*.json' -exec cp {} "$tmp/osv/" \;
  elif [ -f "$src" ]; then
    (cd "$tmp/osv" && unzip -q -j -o "$src" 'GO-*.json')
  else
    say "MESHCA_VULNDB_SOURCE=$src is neither a file nor a directory"
    return 1
  fi
  local n
  n=$(find "$tmp/osv" -type f -name 'GO-*.json' | wc -l)
  if [ "$n" -eq 0 ]; then
    say "$src holds no GO-*.json OSV entries"
    return 1
  fi
  printf 'source %s\nimported %s\nentries %s\n' "$src" "$(date -u +%FT%TZ)" "$n" >"$tmp/osv/IMPORTED"
  rm -rf "$CACHE.old"
  [ -d "$CACHE" ] && mv "$CACHE" "$CACHE.old"
  mv "$tmp/osv" "$CACHE"
  rm -rf "$CACHE.old"
  say "imported $n entries from $src into $CACHE"
}

cached() {
  [ -d "$CACHE" ] && [ -n "$(find "$CACHE" -maxdepth 1 -name 'GO-*.json' -print -quit)" ]
}

install_govulncheck

if [ -n "${MESHCA_VULNDB_SOURCE:-}" ]; then
  import_source "$MESHCA_VULNDB_SOURCE"
  echo "file://$CACHE"
  exit 0
fi

if curl -fsS --max-time 5 -o /dev/null "$LIVE/index/db.json.gz" 2>/dev/null; then
  say "using $LIVE"
  echo "$LIVE"
  exit 0
fi

if cached; then
  if [ -n "$(find "$CACHE/IMPORTED" -mtime +"$MAX_AGE_DAYS" 2>/dev/null)" ]; then
    say "WARNING: $CACHE is older than $MAX_AGE_DAYS days ($(sed -n 's/^imported //p' "$CACHE/IMPORTED")); newer vulnerabilities are missing. Refresh it with MESHCA_VULNDB_SOURCE."
  fi
  say "$LIVE is unreachable; using the cache $CACHE ($(sed -n 's/^imported //p' "$CACHE/IMPORTED"))"
  echo "file://$CACHE"
  exit 0
fi

say "no vulnerability database: $LIVE is unreachable and $CACHE is empty."
say "On a machine with internet, download https://osv-vulnerabilities.storage.googleapis.com/Go/all.zip"
say "(or clone golang/vulndb), copy it here, and run: MESHCA_VULNDB_SOURCE=/path/to/all.zip bash scripts/vulndb.sh"
exit 3
