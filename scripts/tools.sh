#!/usr/bin/env bash
# Installs the pinned tools the build and the tests need, outside the repo:
# Debian packages with apt-get, Go tools into $MESHCA_TOOLS (default
# ~/.cache/meshca/bin). Safe to run again: what is there is kept.
set -euo pipefail

TOOLS=${MESHCA_TOOLS:-$HOME/.cache/meshca/bin}
mkdir -p "$TOOLS"

PROTOC_GEN_GO=v1.36.12
PROTOC_GEN_GO_GRPC=v1.6.2
STATICCHECK=v0.8.2

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# go_install BIN PKG VERSION: installs PKG@VERSION as $TOOLS/BIN unless that
# version is there already.
go_install() {
  local bin=$1 pkg=$2 version=$3 stamp="$TOOLS/.$1.version"
  if [ -x "$TOOLS/$bin" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$version" ]; then
    return 0
  fi
  GOBIN="$TOOLS" go install "$pkg@$version"
  echo "$version" >"$stamp"
}

# protoc (libprotoc 3.21 with the well-known types) and openssl, which the
# tests use as an independent verifier of what meshca issues.
apt_install protobuf-compiler openssl

go_install protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go "$PROTOC_GEN_GO"
go_install protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc "$PROTOC_GEN_GO_GRPC"
go_install staticcheck honnef.co/go/tools/cmd/staticcheck "$STATICCHECK"
