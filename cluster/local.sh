#!/usr/bin/env bash
# A two-node Ray cluster on this machine, on loopback: a head node (dashboard on 127.0.0.1:8265)
# and one worker node with its own CPUs, for trying cluster behaviour for real.
#
#   cluster/local.sh up        start both nodes (prints the address to use)
#   cluster/local.sh status    nodes and resources
#   cluster/local.sh down      stop both nodes
#   cluster/local.sh kill-worker   SIGKILL the worker node's raylet (simulates losing that machine)
#
# Then: python jobs/generate.py cluster.address=127.0.0.1:6390 cluster.cpus_per_worker=1 ...
# Environment: RAY_PORT (6390), RAY_DASHBOARD_PORT (8265), HEAD_CPUS (1), WORKER_CPUS (1), RAY (the ray CLI).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
RAY="${RAY:-$here/../.venv/bin/ray}"
PORT="${RAY_PORT:-6390}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
HEAD_CPUS="${HEAD_CPUS:-1}"
WORKER_CPUS="${WORKER_CPUS:-1}"
export RAY_USAGE_STATS_ENABLED=0

worker_raylet_pids() {
  # The worker node's raylet is the one started with the `worker_node` custom resource.
  pgrep -f "raylet.*worker_node" || true
}

case "${1:-}" in
  up)
    "$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true \
      --num-cpus="$HEAD_CPUS" --num-gpus=0 --resources='{"head_node": 1}' --disable-usage-stats >/dev/null
    "$RAY" start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 \
      --num-cpus="$WORKER_CPUS" --num-gpus=0 --resources='{"worker_node": 1}' --disable-usage-stats >/dev/null
    echo "two-node Ray cluster up: address 127.0.0.1:$PORT, dashboard http://127.0.0.1:$DASHBOARD_PORT"
    ;;
  status)
    "$RAY" status --address="127.0.0.1:$PORT"
    ;;
  down)
    "$RAY" stop --force >/dev/null 2>&1 || true
    echo "Ray stopped"
    ;;
  kill-worker)
    pids="$(worker_raylet_pids)"
    [ -n "$pids" ] || { echo "no worker node running" >&2; exit 1; }
    kill -9 $pids
    echo "killed the worker node's raylet ($pids)"
    ;;
  *)
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
