#!/usr/bin/env bash
# make bench: the standard set of meshctl bench runs against a fresh
# meshca-server.
#
# Starts bin/meshca-server --demo --profiling on free loopback ports with a
# new temporary data directory, runs
#
#   steady  -c 8 -d 10s                     (Sign over one long-lived connection)
#   steady  -c 8 -d 10s --batch 32          (SignBatch of 32 token entries a call)
#   storm   -n 1000                         (new key and new TLS connection each)
#   storm   -n 10000
#   mixed   -n 5000 --renewals 64           (new workloads while 64 clients renew over mTLS)
#
# prints each report, and stops the server however the script ends. The
# binaries must be built first (make bench does). The server's log (with
# one audit line per certificate) is kept in the data directory only while
# the script runs; BENCH_KEEP=1 keeps the directory and prints its path.
#
# Environment:
#   BIN          where meshca-server and meshctl are (default bin)
#   BENCH_OUTPUT text (default) or json: meshctl bench's -o
#   BENCH_KEEP   1 keeps the data directory and the server's log
set -euo pipefail

BIN=${BIN:-bin}
BENCH_OUTPUT=${BENCH_OUTPUT:-text}
for b in meshca-server meshctl; do
	if [ ! -x "$BIN/$b" ]; then
		echo "bench: $BIN/$b not found: run make build first" >&2
		exit 1
	fi
done

dir=$(mktemp -d "${TMPDIR:-/tmp}/meshca-bench.XXXXXX")
log="$dir/server.log"
server_pid=""
cleanup() {
	if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
		kill -TERM "$server_pid" 2>/dev/null || true
		# A server that has not stopped 10s after TERM is killed.
		for _ in $(seq 1 100); do
			kill -0 "$server_pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$server_pid" 2>/dev/null || true
		wait "$server_pid" 2>/dev/null || true
	fi
	if [ "${BENCH_KEEP:-0}" = 1 ]; then
		echo "bench: data directory and server log kept in $dir" >&2
	else
		rm -rf "$dir"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Port 0: the kernel picks free ports; the server logs the ones it got.
"$BIN/meshca-server" --data-dir "$dir/data" --demo --profiling \
	--listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
	>"$dir/banner.txt" 2>"$log" &
server_pid=$!

ready=""
for _ in $(seq 1 300); do
	if ready=$(grep -m1 '"msg":"meshca-server ready"' "$log" 2>/dev/null); then
		break
	fi
	if ! kill -0 "$server_pid" 2>/dev/null; then
		echo "bench: meshca-server exited:" >&2
		cat "$log" >&2
		exit 1
	fi
	sleep 0.1
done
if [ -z "$ready" ]; then
	echo "bench: meshca-server not ready after 30s; its log:" >&2
	cat "$log" >&2
	exit 1
fi
field() { sed -E 's/.*"'"$1"'":"([^"]*)".*/\1/' <<<"$ready"; }
addr=$(field address)
metrics=$(field metrics_address)
bundle="$dir/data/bundle.pem"
token="$dir/data/demo-token"
spiffe_id=$(sed -nE 's/.*demo identity +([^ ]+) .*/\1/p' "$dir/banner.txt")

echo "meshca-server $addr (metrics http://$metrics/metrics), pid $server_pid, data $dir/data"
common=(--server "$addr" --ca-bundle "$bundle" --token-file "$token"
	--spiffe-id "$spiffe_id" --metrics-url "http://$metrics/metrics" -o "$BENCH_OUTPUT")

run() {
	echo
	echo "== meshctl bench $*"
	"$BIN/meshctl" bench "${common[@]}" "$@"
}

run --mode steady -c 8 -d 10s
run --mode steady -c 8 -d 10s --batch 32
run --mode storm -n 1000
run --mode storm -n 10000
run --mode mixed -n 5000 --renewals 64
