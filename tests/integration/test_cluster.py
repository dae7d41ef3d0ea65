"""A real two-node Ray cluster on loopback (cluster/local.sh): both nodes work, losing one loses nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, write_jsonl
from tests.integration.conftest import CREDENTIALS
from tests.integration.jobs import assert_complete, expected_ids, job_args, wait_for_files

PORT = "6391"
ENV = {**os.environ, "RAY_PORT": PORT, "RAY_DASHBOARD_PORT": "8266", "RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1"}


def local_cluster(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "cluster/local.sh", *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180
    )


@pytest.fixture(scope="module")
def two_nodes():
    local_cluster("down")
    up = local_cluster("up")
    assert up.returncode == 0, up.stderr[-2000:]
    status = local_cluster("status").stdout
    assert status.count(" 1 node_") == 2, status
    yield f"127.0.0.1:{PORT}"
    local_cluster("down")


def loopback_package_race(log: str) -> bool:
    """A submitted job whose uploaded files vanished under it: on this loopback cluster both nodes' runtime-env
    agents share one /tmp/ray session folder, and one may clean up the package the other just unpacked (seen
    on the first job after `up`; not a runner failure, and not possible with one node per machine)."""
    return "FAILED" in log and ("No such file or directory" in log or "no such file; check the path" in log)


def start_job(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def workers_in(out) -> set[str]:
    return {w for f in out.glob("*.parquet") for w in pq.read_table(f, columns=["worker"]).column("worker").to_pylist()}


@pytest.mark.slow  # keeps make test under 10 minutes: the failing submission below goes through the jobs API
def test_a_job_submitted_with_the_jobs_api_runs_on_both_nodes_and_its_credentials_stay_hidden(
    two_nodes, s3_server, prompts, tmp_path
):
    """Input and output on a real S3 server; credentials in an input URI and in the environment, never shown."""
    import psutil

    endpoint, fs = s3_server
    with fs.open_output_stream("runner-test/submitted-prompts/part-0.jsonl") as f:
        f.write(prompts.read_bytes())
    query = f"endpoint_override={endpoint}&scheme=http&region=us-east-1"
    key, secret = CREDENTIALS["AWS_ACCESS_KEY_ID"], CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    out_uri = f"s3://runner-test/submitted?{query}"  # its credentials come from the (hidden) environment
    overrides = job_args(prompts, "unused", "cluster.num_workers=2", "cluster.cpus_per_worker=1")[2:]
    # the embedded model (not job_args' tiny one): its shards take long enough for both nodes' workers to start
    overrides = [o for o in overrides if not o.startswith(("dataset.path=", "output.dir=", "model.name_or_path="))]
    overrides += [f"dataset.path='s3://{key}:{secret}@runner-test/submitted-prompts?{query}'"]
    overrides += [f"output.dir='{out_uri}'"]
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "jobs/submit.py", "--address", "http://127.0.0.1:8266", *overrides],
            cwd=REPO,
            env={**ENV, **CREDENTIALS},
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode == 0 or not loopback_package_race(result.stdout):
            break
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "SUCCEEDED" in result.stdout and "python jobs/generate.py cluster.address=auto" in result.stdout
    assert "+ 1 override(s) with credentials" in result.stdout
    verified = subprocess.run(
        [sys.executable, "jobs/verify.py", f"output.dir={out_uri}"],
        cwd=REPO,
        env={**os.environ, **CREDENTIALS},
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stderr
    table = ds.dataset("runner-test/submitted", filesystem=fs, format="parquet").to_table(columns=["id", "worker"])
    assert sorted(table.column("id").to_pylist()) == sorted(expected_ids(prompts))
    assert len({w.split(":")[1].split("/")[0] for w in table.column("worker").to_pylist()}) == 2  # both nodes
    ray_cli = str(Path(sys.executable).parent / "ray")
    listed = subprocess.run(  # what the dashboard's job list shows: entrypoints, runtime environments, metadata
        [ray_cli, "job", "list", "--address", "http://127.0.0.1:8266"], env=ENV, capture_output=True, text=True
    )
    assert listed.returncode == 0 and "runner_job_secrets_" in listed.stdout, listed.stderr[-2000:]
    shown = listed.stdout + result.stdout + result.stderr
    assert key not in shown and secret not in shown
    # every server of both nodes, dashboard and agents included, is on loopback
    listening = {
        c.laddr.ip
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid and "ray" in " ".join(psutil.Process(c.pid).cmdline())
    }
    assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening


def test_a_failing_submitted_job_makes_the_wrapper_fail(two_nodes, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "jobs/submit.py",
            "--address",
            "http://127.0.0.1:8266",
            "generation.temperature=-1",
            f"output.dir={tmp_path}",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "FAILED" in result.stdout
    assert "generation.temperature=-1.0: must be >= 0" in result.stdout


@pytest.mark.slow  # keeps make test under 10 minutes: test_private_ray shows outsiders cannot join
def test_a_local_run_listens_on_loopback_only_and_offers_no_job_api(tmp_path):
    code = """
import json, os, sys, time, psutil, urllib.request
from concurrent.futures import ThreadPoolExecutor
from runner.config import ClusterConfig
from runner.cluster import connect
connect(ClusterConfig())
time.sleep(5)  # every server of the cluster is up and listening
me = psutil.Process(os.getpid())
pids = {p.pid for p in me.children(recursive=True)} | {me.pid}
listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
             if c.status == psutil.CONN_LISTEN and c.pid in pids}
marker = sys.argv[1]
job = json.dumps({"entrypoint": f"touch {marker}", "submission_id": "intruder"}).encode()


def submit(port, path):  # what another local user could do, without a token
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=job, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return (port, path) if b"intruder" in r.read() else None
    except Exception:
        return None


with ThreadPoolExecutor(32) as pool:  # at once: a job API answers only once the job is submitted
    paths = ("/api/jobs/", "/api/job_agent/jobs/")
    tried = [pool.submit(submit, port, path) for _, port in listening for path in paths]
    job_apis = [f.result() for f in tried if f.result()]
for _ in range(12):  # a job API that took it (even slower than the timeout to answer) runs it in seconds
    if os.path.exists(marker):
        break
    time.sleep(0.5)
print(json.dumps({"addresses": sorted({ip for ip, _ in listening}), "job_apis": job_apis}))
"""
    marker = tmp_path / "intruder-job-ran"
    command = [sys.executable, "-c", code, str(marker)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]

    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["addresses"] and set(found["addresses"]) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, found
    assert found["job_apis"] == [] and not marker.exists(), found


@pytest.mark.slow  # keeps make test under 10 minutes; runs in make test-slow
def test_the_readmes_ray_job_submit_command_runs_on_the_cluster(two_nodes, tmp_path):
    """The README's `ray job submit` line, verbatim but for the test cluster's port, a small job and the output dir."""
    import re

    readme = (REPO / "README.md").read_text()
    command = re.search(r"(RAY_AUTH_MODE=token ray job submit .*?)\n```", readme, re.S).group(1).replace("\\\n", " ")
    out = tmp_path / "run1"
    command = command.replace("127.0.0.1:8265", "127.0.0.1:8266").replace("/tmp/out/run1", str(out))
    command += " dataset.limit=4 generation.max_new_tokens=4"  # on 1-CPU nodes: workers fit the nodes by default
    ray_bin = str(REPO / ".venv" / "bin")
    env = {**ENV, "PATH": ray_bin + os.pathsep + os.environ.get("PATH", "")}
    result = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    rows = sum(pq.read_table(f).num_rows for f in out.glob("*.parquet"))
    assert rows == 4


def test_a_worker_larger_than_any_node_is_refused_at_once(two_nodes, prompts, tmp_path):
    """Two 1-CPU nodes hold 2 CPUs in all, yet no 2-CPU worker fits on either: say so, do not wait."""
    args = job_args(prompts, tmp_path / "run", f"cluster.address={two_nodes}", "cluster.cpus_per_worker=2")
    result = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cluster.cpus_per_worker=2: no node of the cluster has that many CPUs (the largest has 1" in result.stderr


@pytest.mark.slow  # it leaves a third node in the shared cluster, which the node-loss test below must not see
def test_a_node_added_mid_job_gets_a_worker(two_nodes, t0_rows, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [r for r in t0_rows if len(r["prompt"]) < 500][:48])
    out = tmp_path / "run"
    proc = start_job(job_args(prompts, out, f"cluster.address={two_nodes}", "generation.max_new_tokens=64"))
    wait_for_files(out, 1, proc)
    added = local_cluster("add-worker")
    assert added.returncode == 0, added.stderr
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "the cluster grew: starting 1 more worker(s) (2 -> 3)" in stdout + stderr
    assert_complete(out, expected_ids(prompts))
    assert len({w.split(":")[1].split("/")[0] for w in workers_in(out)}) == 3  # the new node generated shards too


@pytest.mark.slow  # about 80 s: the switch to the GPU worker and back to CPU workers loads the model twice more
def test_a_gpu_node_joining_a_job_on_cpu_workers_gets_a_gpu_worker(two_nodes, t0_rows, tmp_path):
    """cluster.device=auto on CPU nodes: CPU workers; a node with a GPU joins mid-job and the pool asks for a
    GPU worker (1 GPU, 1 CPU), which Ray places there. No CUDA exists here: that worker says it finds none,
    and the job goes on on CPU workers without losing a row."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [r for r in t0_rows if len(r["prompt"]) < 500][:48])
    out = tmp_path / "run"
    proc = start_job(job_args(prompts, out, f"cluster.address={two_nodes}", "generation.max_new_tokens=64"))
    try:
        wait_for_files(out, 1, proc)
        added = local_cluster("add-gpu-worker")
        assert added.returncode == 0, added.stderr
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        local_cluster("stop-gpu-worker")
    log = stdout + stderr
    assert proc.returncode == 0, log[-3000:]
    assert "no GPU in the cluster, CPU workers (GPU nodes that join later get GPU workers): 2 CPU workers" in log
    assert "GPU node(s) joined (1 GPU(s)): starting 1 GPU worker(s) ({'num_gpus': 1, 'num_cpus': 1})" in log
    assert "a GPU worker cannot use its GPU" in log and "sees no CUDA device" in log, log[-3000:]
    assert_complete(out, expected_ids(prompts))


FETCH_ON_NODES = r"""
import json, sys
import numpy as np, pyarrow as pa, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from runner.cluster import keep_loopback_addresses
from runner.generation import fetch
from runner.input import ChunkPreparer
from runner.tasks import HeldRows

with keep_loopback_addresses():  # the cluster listens on 127.0.0.1 only
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
head = ray.get_runtime_context().get_node_id()  # this driver's node: where ray.put stores the chunks
holder = ray.remote(concurrency_groups={"take": 2})(ChunkPreparer).options(
    num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote(None)
chunks = [pa.table({"id": [f"c{c}-{i}" for i in range(1000)], "text": ["x" * 2000] * 1000}) for c in range(2)]
parts = [HeldRows(ray.put(t), holder) for t in chunks]
take = np.array([[k, r] for r in range(0, 1000, 97) for k in (1, 0)])

@ray.remote(num_cpus=0)
def fetch_here(parts, take):
    tables, where = fetch.fetch_parts(parts, take)
    ids = [tables[k].column("id")[r].as_py() for k, r in where.tolist()]
    return ray.get_runtime_context().get_node_id(), ids, [t.num_rows for t in tables]

def on(node):
    return fetch_here.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
other = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head)
found = {"head": ray.get(on(head).remote(parts, take)), "other": ray.get(on(other).remote(parts, take))}
ray.kill(holder)
while True:  # until it is dead: a call sent just after the kill may still reach it
    try:
        ray.get(holder.take.remote(parts[0].ref, pa.array([0])))
    except ray.exceptions.ActorDiedError:
        break
found["other, holder gone"] = ray.get(on(other).remote(parts, take))
found["want"] = [chunks[k].column("id")[r].as_py() for k, r in take.tolist()]
found["nodes"] = [head, other]
print(json.dumps(found))
"""


def test_a_shard_on_another_node_copies_only_the_rows_it_takes_from_each_chunk(two_nodes, tmp_path):
    """A worker on the chunks' node reads them in place; one on another node gets from their preparer only
    the rows its shard takes; with that preparer gone it fetches the chunks whole. The rows are the same."""
    done = subprocess.run(
        [sys.executable, "-c", FETCH_ON_NODES, two_nodes],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    head, other = found["nodes"]
    want = found["want"]
    assert found["head"] == [head, want, [1000, 1000]]  # in place, whole
    assert found["other"] == [other, want, [11, 11]]  # 11 rows taken from each chunk, and only those
    assert found["other, holder gone"] == [other, want, [1000, 1000]]


# Last in the module: it takes the shared cluster's second node away.
def test_losing_the_second_node_mid_run_still_completes_the_job(two_nodes, t0_rows, tmp_path):
    """The node is killed while later windows are still being prepared (each chunk's preparation made 5 s
    slow): a preparer on it is started again on the head, the chunks it held or was preparing are prepared
    again, a shard in flight there goes back on the queue, and the job completes without losing a row."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [r for r in t0_rows if len(r["prompt"]) < 500][:48])
    out = tmp_path / "run"
    args = job_args(prompts, out, f"cluster.address={two_nodes}", "cluster.num_workers=2", "cluster.cpus_per_worker=1")
    proc = subprocess.Popen(  # six windows of 8 rows, one chunk each, on two preparers: 15 s of preparation
        args,
        cwd=REPO,
        env={**ENV, "RUNNER_FAULTS": json.dumps({"prepare_delay": 5})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_files(out, 1, proc)
    killed = local_cluster("kill-worker")
    assert killed.returncode == 0, killed.stderr
    before = {f.name for f in out.glob("*.parquet")}
    # The last two windows (shards 12-17) were not yet planned: their chunks were still being prepared.
    assert max(int(name.split("-")[1]) for name in before) < 12, before
    time.sleep(2)  # the lost node's worker processes end with its raylet: nothing after this is theirs
    before = {f.name for f in out.glob("*.parquet")}
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert_complete(out, expected_ids(prompts))
    assert "1 node_" in local_cluster("status").stdout  # the head is still there, alone
    # A shard running on the lost node goes back on the queue (when one was running there at that moment:
    # it may have been between shards); every shard committed after the loss came from the surviving node.
    after = [f for f in out.glob("*.parquet") if f.name not in before]
    nodes = {
        w.split(":")[1].split("/")[0] for f in after for w in pq.read_table(f, columns=["worker"])["worker"].to_pylist()
    }
    assert after and len(nodes) == 1, nodes
    if "worker lost" in stdout + stderr:
        assert "goes back on the queue" in stdout + stderr
