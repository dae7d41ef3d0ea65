"""Object-store bytes per node: a 2-node job over long prompts, its workers fetching whole chunks vs slices.

Starts the two-node loopback cluster (`cluster/local.sh`, one CPU per node, on its own ports), writes
N long prompts (the T0 mix's prompts of 2,000-7,000 characters, each made unique), and runs the same
job twice on the tiny random model of the tests (its forward costs little: what is measured is the data
path), one worker per node:
  1. `whole`: every worker copies each chunk its shard takes rows from whole (how workers fetched
     before; `RUNNER_FAULTS={"fetch_whole_chunks": true}`);
  2. `slices`: a chunk on another node is asked of the preparer that holds it, for the shard's rows only.
Per node it reads the raylet's object-store counters, and from the output which shards ran there:
- the peak of `object_store_bytes_used` (sampled every 0.5 s): what the node's store held at most, the
  figure that matters (a store that fills spills to disk, then fails);
- `cumulative_created_bytes`: every object written into the store: chunks prepared there, copies pulled
  from the other node, and with slices also the slices it served to the other node (so the node holding
  the chunks is written more with slices than without: its chunks and the slices it serves).

Usage:
    python jobs/bench_object_store.py                  # 8,192 prompts: two chunks of 4,096 rows
    python jobs/bench_object_store.py --rows 16384
Prints a table and writes it as JSON and markdown to OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

os.environ["RAY_AUTH_MODE"] = "token"  # before Ray is imported: the loopback cluster asks for its token
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
T0 = Path(os.environ.get("RUNNER_T0_DATA", REPO.parent / "shared" / "data" / "t0_mix_2k.jsonl"))
PORT = "6397"  # apart from the tests' cluster (6391) and a user's (6390)
ENV = {
    **os.environ,
    "RAY_PORT": PORT,
    "RAY_DASHBOARD_PORT": "8269",
    "RAY_AGENT_PORT": "52385",
    "RAY_AUTH_MODE": "token",
    "HEAD_CPUS": "1",
    "WORKER_CPUS": "1",
}
MIB = 1 << 20


def write_prompts(path: Path, n: int) -> int:
    """N unique prompts of 2,000-7,000 characters; returns the input's bytes."""
    with open(T0, encoding="utf-8") as f:  # by "\n" only: prompts hold other line separators
        base = [p for p in (json.loads(line)["prompt"] for line in f) if 2000 <= len(p) <= 7000]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"s{i}", "prompt": f"{base[i % len(base)]} (variant {i})"}) + "\n")
    return path.stat().st_size


def local_cluster(*args: str) -> None:
    done = subprocess.run(["bash", "cluster/local.sh", *args], cwd=REPO, env=ENV, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"cluster/local.sh {' '.join(args)} failed:\n{done.stderr[-2000:]}")


class StoreWatch:
    """Every node's object-store counters, from its raylet: bytes written, and the peak in use (sampled)."""

    def __init__(self):
        import ray

        self.nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        self.peak = dict.fromkeys(self.nodes, 0)
        self.created_at_start = {k: s.cumulative_created_bytes for k, s in self.stats().items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stats(self) -> dict:
        from ray._private.internal_api import node_stats

        return {
            k: node_stats(n["NodeManagerAddress"], n["NodeManagerPort"], include_memory_info=False).store_stats
            for k, n in self.nodes.items()
        }

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            try:
                stats = self.stats()
            except Exception as e:  # a missed sample lowers the peak: say so
                print(f"object-store sample failed: {e}", file=sys.stderr)
                continue
            for k, s in stats.items():
                self.peak[k] = max(self.peak[k], s.object_store_bytes_used)

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        self._thread.join()
        return {
            k: {
                "written_mib": round((s.cumulative_created_bytes - self.created_at_start[k]) / MIB, 1),
                "peak_used_mib": round(self.peak[k] / MIB, 1),
            }
            for k, s in self.stats().items()
        }


def run_job(prompts: Path, out: Path, model: str, whole: bool) -> dict:
    """One job on the cluster; per node: its store's bytes, the shards that ran there and their tokens."""
    command = [
        sys.executable,
        "jobs/generate.py",
        f"dataset.path={prompts}",
        "dataset.id_column=id",
        f"output.dir={out}",
        "output.overwrite=true",
        f"model.name_or_path={model}",
        "model.quantization=none",
        "generation.max_new_tokens=1",
        "batching.shard_size=256",
        f"cluster.address=127.0.0.1:{PORT}",
        "cluster.num_workers=2",
        "cluster.cpus_per_worker=1",
    ]
    env = {**ENV, "RUNNER_FAULTS": json.dumps({"fetch_whole_chunks": True})} if whole else ENV
    watch = StoreWatch()
    started = time.time()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - started
    time.sleep(2.0)  # the last frees reach the stores
    nodes = watch.stop()
    if done.returncode:  # said before raising: stopping the cluster then ends this process (Ray's client)
        print(f"the job failed:\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
        raise RuntimeError("the job failed")
    head = next(k for k, n in watch.nodes.items() if "head_node" in n["Resources"])
    ran: dict[str, dict[str, int]] = {}
    for f in sorted(out.glob("part-*.parquet")):
        t = pq.read_table(f, columns=["worker", "prompt_tokens"])
        node = t.column("worker")[0].as_py().split(":")[1].split("/")[0]
        r = ran.setdefault(node, {"shards": 0, "rows": 0, "prompt_tokens": 0})
        r["shards"] += 1
        r["rows"] += t.num_rows
        r["prompt_tokens"] += sum(t.column("prompt_tokens").to_pylist())
    result = {"fetch": "whole" if whole else "slices", "wall_s": round(wall, 1), "nodes": {}}
    for k, figures in nodes.items():
        name = "head" if k == head else "worker"
        result["nodes"][name] = {**figures, **ran.get(k[:8], {"shards": 0, "rows": 0, "prompt_tokens": 0})}
    return result


def table(results: list[dict], input_mib: float) -> str:
    lines = [
        "| fetch | node | MiB written to its store | peak MiB in use | shards run | rows | prompt tokens | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, n in r["nodes"].items():
            lines.append(
                f"| {r['fetch']} | {name} | {n['written_mib']} | {n['peak_used_mib']} | {n['shards']} | {n['rows']:,} "
                f"| {n['prompt_tokens']:,} | {r['wall_s']} |"
            )
    lines.append("")
    lines.append(f"input: {input_mib:.1f} MiB of JSON lines")
    whole, sliced = results[0]["nodes"], results[1]["nodes"]
    for k in whole:
        if whole[k]["peak_used_mib"] and whole[k]["written_mib"]:
            peak = sliced[k]["peak_used_mib"] / whole[k]["peak_used_mib"]
            written = sliced[k]["written_mib"] / whole[k]["written_mib"]
            lines.append(
                f"{k}: with slices its store held at most {peak:.2f}x, and was written {written:.2f}x, "
                "what whole chunks took"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--out", default="outputs/bench_object_store")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from tests.conftest import tiny_llama

    model = tiny_llama()
    prompts = out / "prompts.jsonl"
    input_mib = write_prompts(prompts, args.rows) / MIB
    local_cluster("down")
    local_cluster("up")
    try:
        import ray

        from runner.cluster import keep_loopback_addresses

        with keep_loopback_addresses():  # the cluster listens on 127.0.0.1 only
            ray.init(address=f"127.0.0.1:{PORT}", logging_level="ERROR", log_to_driver=False)
        results = [run_job(prompts, out / f"run-{kind}", model, kind == "whole") for kind in ("whole", "slices")]
        ray.shutdown()
    finally:
        local_cluster("down")
    text = table(results, input_mib)
    print(text)
    (out / "bench_object_store.json").write_text(json.dumps(results, indent=2))
    (out / "bench_object_store.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
