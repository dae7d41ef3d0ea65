"""What happens when things die: the driver, a worker process, a whole node. Nothing lost, nothing twice."""

from __future__ import annotations

import os
import signal
import subprocess

import psutil

from tests.conftest import REPO
from tests.integration.jobs import ROWS, assert_complete, expected_ids, job_args, wait_for_files


def test_driver_killed_mid_run_then_the_same_command_finishes_the_job(prompts, tmp_path):
    out = tmp_path / "run"
    args = job_args(prompts, out, "cluster.num_workers=1")
    proc = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    wait_for_files(out, 2, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, without warning
    proc.wait()
    done_before = {p.name for p in out.glob("*.parquet")}
    assert 2 <= len(done_before) < ROWS // 3 and not (out / "_manifest.json").exists()

    rerun = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "from an earlier run" in rerun.stdout
    assert_complete(out, expected_ids(prompts))
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


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
