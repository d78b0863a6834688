#!/usr/bin/env bash
# Installs the real Kubernetes API server and etcd that the integration tests
# start on loopback (internal/kubetest), into $MESHCA_KUBE_ASSETS (default
# ~/.cache/meshca/kube), outside the repo:
#
#   kube-apiserver  built from the Go module proxy through the wrapper module
#                   scripts/kube-apiserver (its go.mod and go.sum pin every
#                   module), about 5 minutes cold on 2 cores, 150 MB;
#   etcd            a symlink to Debian's etcd-server (3.4, works with 1.36),
#                   or built from source through scripts/kube-apiserver/etcd
#                   when apt-get is not available or MESHCA_ETCD_FROM_SOURCE=1.
#
# Safe to run again: binaries whose version stamp matches are kept, so a warm
# run takes well under a second.
set -euo pipefail

KUBE_VERSION=v1.36.3
ETCD_VERSION=v3.7.3 # only for the build from source

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WRAPPER="$ROOT/scripts/kube-apiserver"
ASSETS=${MESHCA_KUBE_ASSETS:-$HOME/.cache/meshca/kube}
mkdir -p "$ASSETS"

# shellcheck disable=SC2317 # called by wrapper-build.sh
log() { echo "kube.sh: $*" >&2; }
COLD_HINT="several minutes"
# shellcheck source=scripts/wrapper-build.sh
. "$ROOT/scripts/wrapper-build.sh"

# apt_etcd: installs Debian's etcd-server and links its etcd into $ASSETS.
# Fails (without output) when apt-get cannot be used here.
apt_etcd() {
  command -v apt-get >/dev/null 2>&1 || return 1
  command -v dpkg >/dev/null 2>&1 || return 1
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || return 1
    sudo="sudo"
  fi
  if ! dpkg -s etcd-server >/dev/null 2>&1; then
    log "installing etcd-server with apt-get"
    # Without systemd (containers, CI) the package does not start a daemon;
    # with systemd it may, on 2379, which the tests do not use.
    $sudo apt-get update -qq || return 1
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq etcd-server >/dev/null || return 1
  fi
  local etcd
  etcd=$(dpkg -L etcd-server | grep -E '/bin/etcd$' | head -n1)
  [ -n "$etcd" ] && [ -x "$etcd" ] || return 1
  ln -sfn "$etcd" "$ASSETS/etcd"
  rm -f "$ASSETS/.etcd.version"
  log "etcd: $("$ASSETS/etcd" --version 2>/dev/null | head -n1) ($etcd)"
}

install_etcd() {
  if [ "${MESHCA_ETCD_FROM_SOURCE:-}" != "1" ]; then
    # A link to a package that is still installed is kept as it is.
    if [ -L "$ASSETS/etcd" ] && [ -x "$ASSETS/etcd" ]; then
      log "etcd is there ($(readlink "$ASSETS/etcd"))"
      return 0
    fi
    # A binary built from source (an earlier fallback) is kept too.
    if [ ! -L "$ASSETS/etcd" ] && [ -x "$ASSETS/etcd" ] &&
      [ "$(cat "$ASSETS/.etcd.version" 2>/dev/null)" = "$(stamp_of "$WRAPPER/etcd" "$ETCD_VERSION")" ]; then
      log "etcd $ETCD_VERSION is there ($ASSETS/etcd)"
      return 0
    fi
    if apt_etcd; then
      return 0
    fi
    log "etcd-server from apt-get is not available here; building etcd $ETCD_VERSION from source"
  fi
  [ -L "$ASSETS/etcd" ] && rm -f "$ASSETS/etcd"
  go_build "$WRAPPER/etcd" go.etcd.io/etcd/server/v3 "$ASSETS/etcd" "$ETCD_VERSION"
}

install_kube_apiserver() {
  local minor=${KUBE_VERSION#v1.}
  minor=${minor%%.*}
  go_build "$WRAPPER" k8s.io/kubernetes/cmd/kube-apiserver "$ASSETS/kube-apiserver" "$KUBE_VERSION" \
    "-X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
}

start=$SECONDS
install_etcd
install_kube_apiserver
log "ready in $((SECONDS - start))s: MESHCA_KUBE_ASSETS=$ASSETS"
