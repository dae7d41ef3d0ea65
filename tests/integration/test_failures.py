"""What happens when things die: the driver, a worker process, a whole node. Nothing lost, nothing twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO
from tests.integration.jobs import ROWS, assert_complete, expected_ids, job_args, wait_for_files


def test_driver_killed_mid_run_and_a_file_cut_by_power_loss_then_the_same_command_finishes_the_job(prompts, tmp_path):
    out = tmp_path / "run"
    args = job_args(prompts, out, "cluster.num_workers=1")
    slow = {**os.environ, "RUNNER_FAULTS": json.dumps({"prepare_delay": 6})}  # the last window comes at 12 s
    proc = subprocess.Popen(
        args, cwd=REPO, env=slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    wait_for_files(out, 4, proc)  # the first window's three shards and more, with one worker taking them in order
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, without warning
    proc.wait()
    done_before = sorted(p.name for p in out.glob("*.parquet"))
    assert 4 <= len(done_before) < 9 and not (out / "_manifest.json").exists()  # 3 windows of 3 shards
    assert (out / "_lease.json").exists()  # the dead driver's lease stays behind
    # a power loss right after a rename: the name reached the disk, the data did not
    (out / done_before[-1]).write_bytes(b"")
    # the windows whose shards are all committed (and whole) are not prepared again by the rerun
    records = [json.loads(p.read_text()) for p in sorted((out / "_windows").glob("window-*.rec"))]
    whole = set(done_before[:-1])
    skipped = sum(all(shard[1] in whole for shard in r["shards"]) for r in records)
    assert skipped >= 1, (records, done_before)

    rerun = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    assert "from an earlier run" in rerun.stdout and "taking over" in log and "of this host is gone" in log
    assert f"{done_before[-1]} is damaged (0 bytes): removing it" in log
    assert f"resuming: {skipped} of 3 windows are committed and were not prepared again" in log
    assert_complete(out, expected_ids(prompts))
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name or p.name.startswith("_lease")]


@pytest.mark.slow  # keeps make test under 10 minutes (the hung-worker kill and the node loss stay in it)
def test_a_worker_process_killed_mid_shard_is_replaced_and_the_job_completes(prompts, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        job_args(prompts, out, "cluster.num_workers=1"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_files(out, 1, proc)
    actors = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "ShardGenerator" in " ".join(p.cmdline() or [p.name()])
    ]
    assert actors, "no worker process found"
    for actor in actors:
        actor.send_signal(signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "goes back on the queue" in stdout + stderr
    assert_complete(out, expected_ids(prompts))


def test_a_raising_shard_a_failing_write_a_hung_worker_and_a_failing_row_cost_nothing(prompts, tmp_path):
    """Real faults injected in the real worker processes (runner.faults), then the run checked as a user would."""
    out = tmp_path / "run"
    failing_id = sorted(expected_ids(prompts))[5]
    faults = {
        "shard_error": {"1": 1},  # shard 1 raises in its first attempt
        "write_error": {"part-000002": 2},  # shard 2's file fails to write twice, then lands
        "shard_hang": {"4": 1},  # shard 4's first worker sleeps forever
        "row_error": [failing_id],  # one row's decoding raises, every time
    }
    env = {**os.environ, "RUNNER_FAULTS": json.dumps(faults)}
    # the tiny model's batches take milliseconds; the clock starts once a loaded worker has the shard
    args = job_args(prompts, out, "cluster.num_workers=1", "cluster.hang_timeout_s=6")
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "shard 1 failed (InjectedFault: injected error in shard 1, attempt 1)" in log
    assert "writing part-000002" in log and "trying again" in log
    assert "shard 4 failed (no progress for" in log
    assert "errors:      1 rows with finish_reason=error (rerun with output.retry_errors=true" in result.stdout
    assert_complete(out, expected_ids(prompts))
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["totals"]["errors"] == 1 and manifest["this_run"]["retries"] == 2
    assert manifest["this_run"]["rows"] == ROWS  # the failed attempts' rows are not counted twice
    verify = [sys.executable, "jobs/verify.py", f"output.dir={out}"]
    checked = subprocess.run(verify, cwd=REPO, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert f"1 error rows (finish_reason=error), e.g. [('{failing_id}', 0)]" in checked.stdout

    # the same command with output.retry_errors=true, the fault gone: that row, and nothing else, again
    before = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    rerun = subprocess.run([*args, "output.retry_errors=true"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "errors:      0 rows" in rerun.stdout and "1 error rows of an earlier run generated again" in rerun.stdout
    assert_complete(out, expected_ids(prompts))
    after = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    changed = [n for n in before if before[n] != after[n]]
    assert len(changed) == 1
    rows = pq.read_table(out / changed[0]).to_pylist()
    old = {r["id"]: r for r in pq.read_table(pa.BufferReader(before[changed[0]])).to_pylist()}
    assert [r["id"] for r in rows] == list(old)
    for r in rows:
        if r["id"] == failing_id:
            assert r["finish_reason"] != "error" and r["completion"] and r["run_id"] != old[r["id"]]["run_id"]
        else:
            assert r == old[r["id"]]


def test_a_second_run_on_a_live_runs_directory_is_refused_and_overwrite_deletes_nothing(prompts, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        job_args(prompts, out, "cluster.num_workers=1", "output.overwrite=true"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_files(out, 1, first)
    holder = json.loads((out / "_lease.json").read_text())
    for extra in ("output.overwrite=true", "output.overwrite=false"):
        started = time.time()
        second = subprocess.run(job_args(prompts, out, extra), cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and time.time() - started < 60, second.stderr[-2000:]
        assert f"in use by another run (run {holder['run_id']}" in second.stderr
        assert f"process {first.pid}" in second.stderr
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert_complete(out, expected_ids(prompts))
    assert not (out / "_lease.json").exists()


@pytest.mark.slow  # keeps make test under 10 minutes (its preparers wait for a CPU the node does not have)
def test_a_cluster_where_no_node_can_hold_a_worker_fails_within_a_minute(prompts, tmp_path):
    """The job's own Ray, its node reporting no CPU at all (as when the only worker node is gone)."""
    env = {**os.environ, "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 0})}
    args = job_args(prompts, tmp_path / "run", "cluster.resources_timeout_s=4")
    started = time.time()
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and time.time() - started < 60, result.stderr[-3000:]
    assert "error: the job failed: no live node of the cluster can hold a worker ({'num_cpus': 1}) for 4s" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # keeps make test under 10 minutes: the choice itself is tested in tests/unit/cluster (placement)
def test_cuda_workers_wait_for_gpu_nodes_and_never_start_on_cpus(prompts, tmp_path):
    """cluster.device=cuda on a cluster without GPUs: a GPU worker is asked for, none on the CPUs, then the
    clear error once cluster.resources_timeout_s has passed."""
    args = job_args(prompts, tmp_path / "run", "cluster.device=cuda", "cluster.resources_timeout_s=3")
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-3000:]
    assert "cluster.device=cuda: GPU workers only: 1 GPU workers (1 GPU(s) each)" in log
    assert "no live node of the cluster can hold a worker ({'num_gpus': 1, 'num_cpus': 1}) for 3s" in log
    assert "set cluster.device=cpu to run on CPUs" in log and "Traceback" not in log
    assert " on cpu: " not in log and not list((tmp_path / "run").glob("*.parquet"))  # no worker loaded a model


@pytest.mark.slow  # keeps make test under 10 minutes; the message itself is tested in tests/unit/test_cli.py
def test_an_unforeseen_failure_ends_with_one_line_naming_it_and_the_log_never_a_traceback(prompts, tmp_path):
    """A real fault the runner has no message for: the manifest's name is taken by a folder, so its
    final write fails (IsADirectoryError). The shards stay committed; the traceback goes to the log file."""
    out = tmp_path / "run"
    (out / "_manifest.json").mkdir(parents=True)
    result = subprocess.run(job_args(prompts, out), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    line = next(x for x in result.stderr.splitlines() if x.startswith("error: unexpected failure"))
    assert "IsADirectoryError" in line and "_manifest.json" in line and "rerun the same command" in line
    assert "Traceback" not in result.stdout + result.stderr
    log_file = line.split("the traceback is in ")[1].split(". Committed")[0]
    assert "Traceback" in open(log_file).read() and "IsADirectoryError" in open(log_file).read()
    # every shard was committed before the manifest's write failed
    assert sum(pq.read_table(f).num_rows for f in out.glob("part-*.parquet")) == len(expected_ids(prompts))
