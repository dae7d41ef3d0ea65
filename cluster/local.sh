#!/usr/bin/env bash
# A two-node Ray cluster on this machine, on loopback: a head node (dashboard on 127.0.0.1:8265)
# and one worker node with its own CPUs, for trying cluster behaviour for real.
#
#   cluster/local.sh up        start both nodes (prints the address to use)
#   cluster/local.sh status    nodes and resources
#   cluster/local.sh down      stop both nodes
#   cluster/local.sh kill-worker   SIGKILL the worker node's raylet (simulates losing that machine)
#   cluster/local.sh add-worker    start one more worker node (simulates the autoscaler adding a machine)
#   cluster/local.sh add-gpu-worker    start a node that advertises one GPU (Ray's `GPU` resource; no CUDA
#                                      here: a GPU worker placed there reports that it finds none)
#   cluster/local.sh stop-gpu-worker   stop that node
#
# Then, with the token authentication the cluster uses:
#   export RAY_AUTH_MODE=token
#   python jobs/generate.py cluster.address=127.0.0.1:6390 cluster.cpus_per_worker=1 ...
# Every server of both nodes listens on 127.0.0.1 only: cluster/loopback/sitecustomize.py keeps Ray
# from swapping 127.0.0.1 for the machine's external address in every process of the cluster.
# Environment: RAY_PORT (6390), RAY_DASHBOARD_PORT (8265), RAY_AGENT_PORT (52365 and the next one),
# HEAD_CPUS (1), WORKER_CPUS (1), PYTHON.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-$here/../.venv/bin/python}"
# The venv first on PATH, so `python` in a submitted job's entrypoint is the project's.
ray_cli() {
  (cd "$here/.." && PATH="$(dirname "$PYTHON"):$PATH" PYTHONPATH="$here/loopback${PYTHONPATH:+:$PYTHONPATH}" \
    RUNNER_RAY_LOOPBACK=1 "$PYTHON" -m ray.scripts.scripts "$@")
}
PORT="${RAY_PORT:-6390}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
HEAD_CPUS="${HEAD_CPUS:-1}"
WORKER_CPUS="${WORKER_CPUS:-1}"
# Each node's dashboard agent needs its own HTTP port on a shared machine (job submission goes through it).
AGENT_PORT="${RAY_AGENT_PORT:-52365}"
export RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=token

worker_raylet_pids() {
  # The worker node's raylet is the one started with the `worker_node` custom resource.
  pgrep -f "raylet.*worker_node" || true
}

case "${1:-}" in
  up)
    [ -s "$HOME/.ray/auth_token" ] || ray_cli get-auth-token --generate >/dev/null
    ray_cli start --head --node-ip-address=127.0.0.1 --port="$PORT" \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true \
      --dashboard-agent-listen-port="$AGENT_PORT" \
      --num-cpus="$HEAD_CPUS" --num-gpus=0 --resources='{"head_node": 1}' --disable-usage-stats >/dev/null
    ray_cli start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 \
      --dashboard-agent-listen-port="$((AGENT_PORT + 1))" \
      --num-cpus="$WORKER_CPUS" --num-gpus=0 --resources='{"worker_node": 1}' --disable-usage-stats >/dev/null
    for _ in $(seq 60); do
      [ "$(ray_cli status --address="127.0.0.1:$PORT" 2>/dev/null | grep -c '^ 1 node_')" -ge 2 ] && break
      sleep 1
    done
    echo "two-node Ray cluster up: address 127.0.0.1:$PORT, dashboard http://127.0.0.1:$DASHBOARD_PORT"
    ;;
  status)
    ray_cli status --address="127.0.0.1:$PORT"
    ;;
  down)
    # Only this cluster's processes: `ray stop` would also end every other Ray on the machine (a job's
    # private one included). This cluster's are the ones naming its session folder (the GCS on $PORT
    # says which), and every process started under them.
    "$PYTHON" - "$PORT" <<'PY'
import re, sys, psutil
port = sys.argv[1]
def cmd(p):
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""
gcs = [p for p in psutil.process_iter() if re.search(rf"gcs_server_port={port}( |$)", cmd(p))]
sessions = {m.group(0) for p in gcs for m in [re.search(r"/\S*?/session_[^/ ]+", cmd(p))] if m}
mine = re.compile(rf"address=127.0.0.1:{port}( |$)")
roots = [p for p in psutil.process_iter() if any(s in cmd(p) for s in sessions) or mine.search(cmd(p))]
def tree(root):
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:  # ended meanwhile
        return []
doomed = {p.pid: p for r in roots for p in tree(r) if p.pid != psutil.Process().pid}
for p in doomed.values():
    try:
        p.kill()
    except psutil.Error:
        pass
psutil.wait_procs(list(doomed.values()), timeout=10)
PY
    echo "Ray stopped (the cluster on port $PORT)"
    ;;
  add-worker)
    ray_cli start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 \
      --dashboard-agent-listen-port="$((AGENT_PORT + 2))" \
      --num-cpus="$WORKER_CPUS" --num-gpus=0 --resources='{"added_node": 1}' --disable-usage-stats >/dev/null
    echo "added a worker node to 127.0.0.1:$PORT"
    ;;
  add-gpu-worker)
    ray_cli start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 \
      --dashboard-agent-listen-port="$((AGENT_PORT + 4))" \
      --num-cpus=1 --num-gpus=1 --resources='{"gpu_node": 1}' --disable-usage-stats >/dev/null
    echo "added a node with one GPU to 127.0.0.1:$PORT"
    ;;
  stop-gpu-worker)
    pids="$(pgrep -f "raylet.*gpu_node" || true)"
    [ -n "$pids" ] || { echo "no GPU node running" >&2; exit 1; }
    kill -TERM $pids  # a clean stop: the head marks the node dead at once (a kill waits for missed heartbeats)
    for _ in $(seq 60); do
      ray_cli status --address="127.0.0.1:$PORT" 2>/dev/null | grep -q "/1.0 GPU" || break
      sleep 0.5
    done
    echo "stopped the GPU node ($pids)"
    ;;
  kill-worker)
    pids="$(worker_raylet_pids)"
    [ -n "$pids" ] || { echo "no worker node running" >&2; exit 1; }
    kill -9 $pids
    echo "killed the worker node's raylet ($pids)"
    ;;
  *)
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
