#!/usr/bin/env bash
# trio_sni in its three forwarding modes against HAProxy (with and without splice), nginx
# stream and no proxy, over real TLS 1.3, with the shared peer harness (../shared/bench beside
# the project; its README has the method). A benchmark that prints tables, not a test. As root:
#
#   BENCH_STATE=/tmp/sni-bench ../shared/bench/setup.sh       # once per machine
#   bench/bench_tls_peers.sh -s bulk,latency --runs 3         # any further run.sh options
#   PEERS=direct,haproxy,nginx-stream bench/bench_tls_peers.sh -s rate,latency,idle
#
# PEERS chooses the other systems (default: direct,haproxy,haproxy-splice,nginx-stream).
# MODES chooses trio_sni's configs (default: "kernel splice copy"; "kernel-workers" is kernel
# mode with a worker per CPU, as HAProxy runs a thread per CPU; the others are one process).
# The report lands in $BENCH_STATE/results/<UTC time>/report.md. The configs are
# bench/peers/trio_sni-<mode>.json.in (no fallback, no access log).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
shared="${SHARED_BENCH:-$here/../../shared/bench}"
export BENCH_STATE="${BENCH_STATE:-/tmp/sni-bench}"
python="${PYTHON:-$(command -v python3)}"
args=()
systems="${PEERS:-direct,haproxy,haproxy-splice,nginx-stream}"
for mode in ${MODES:-kernel splice copy}; do
    args+=(--proxy "$python -m trio_sni --config @CONF@" --name "trio_sni-$mode"
           --config-template "$here/peers/trio_sni-$mode.json.in")
    systems+=",trio_sni-$mode"
done
exec "$shared/run.sh" --systems "$systems" --cwd "$here/.." \
    --out "$BENCH_STATE/results/$(date -u +%Y%m%dT%H%M%SZ)" \
    "${args[@]}" "$@"
