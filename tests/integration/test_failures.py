"""What happens when things die: the driver, a worker process, a whole node. Nothing lost, nothing twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from runner.verify import verify_run
from tests.conftest import REPO, write_jsonl

ROWS = 24


@pytest.fixture(scope="module")
def prompts(t0_rows, tmp_path_factory) -> Path:
    short = [r for r in t0_rows if len(r["prompt"]) < 500][:ROWS]
    return write_jsonl(tmp_path_factory.mktemp("data") / "t0_short.jsonl", short)


def job_args(prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "jobs/generate.py",
        f"dataset.path={prompts}",
        "dataset.id_column=id",
        "generation.max_new_tokens=8",
        "batching.shard_size=3",
        "batching.max_batch_size=3",
        f"output.dir={out}",
        *extra,
    ]


def wait_for_files(out: Path, count: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len(list(out.glob("*.parquet"))) < count:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the job made no progress"
        time.sleep(0.2)


def assert_complete(out: Path, ids: set[str]) -> None:
    verdict = verify_run(str(out))
    assert verdict.ok, verdict.problems
    got = [i for f in sorted(out.glob("*.parquet")) for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
    assert sorted(got) == sorted(ids)


def expected_ids(prompts: Path) -> set[str]:
    import json

    return {json.loads(line)["id"] for line in prompts.read_text().splitlines()}


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
    assert 2 <= len(done_before) < ROWS // 3 and not (out / "manifest.json").exists()

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
