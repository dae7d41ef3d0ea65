"""The streaming data path as a user meets it: a folder of files, the dry run, reruns over changed input."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, write_jsonl
from tests.integration.jobs import assert_complete, job_args


def run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, **kw)


def split_into_folder(t0_rows, folder, files=2, per_file=6) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [r for r in t0_rows if len(r["prompt"]) < 400][: files * per_file]
    for k in range(files):
        write_jsonl(folder / f"part-{k}.jsonl", rows[k * per_file : (k + 1) * per_file])
    return rows


def test_the_dry_run_plans_a_folder_without_a_model_and_writes_nothing(t0_rows, tmp_path):
    split_into_folder(t0_rows, tmp_path / "prompts", files=3, per_file=8)
    args = job_args(tmp_path / "prompts", tmp_path / "never", "batching.sort_window=8")
    result = run([sys.executable, "jobs/plan.py", "--compare-global-sort", *args[2:]], env=None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rows:        24 " in result.stdout and "3 sort window(s) of 8 rows" in result.stdout
    assert re.search(r"9 batches in \d+ shards", result.stdout) and "longest prompts: 't0-" in result.stdout
    assert "with one global sort" in result.stdout
    assert not (tmp_path / "never").exists() and not list(REPO.glob("plan.log"))
    assert "ShardGenerator" not in result.stderr  # no worker, no model


@pytest.mark.slow  # keeps make test under 10 minutes; runs in make test-slow
def test_a_rerun_over_changed_prompts_is_refused_and_overwrite_replaces_the_results(t0_rows, tmp_path):
    folder, out = tmp_path / "prompts", tmp_path / "run"
    rows = split_into_folder(t0_rows, folder)
    args = job_args(folder, out, "cluster.num_workers=1", "batching.sort_window=4")
    first = run(args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert_complete(out, {r["id"] for r in rows})

    edited = [dict(r) for r in rows[6:]]
    edited[2]["prompt"] = edited[2]["prompt"].upper()  # another text; ids and everything else unchanged
    write_jsonl(folder / "part-1.jsonl", edited)
    refused = run(args)
    assert refused.returncode == 2
    assert "holds results of different input" in refused.stderr and "output.overwrite=true" in refused.stderr
    assert_complete(out, {r["id"] for r in rows})  # the old results are untouched

    replaced = run([*args, "output.overwrite=true"])
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert_complete(out, {r["id"] for r in rows})
    table = pq.read_table(out, columns=["id", "prompt"])
    prompt = dict(zip(table.column("id").to_pylist(), table.column("prompt").to_pylist()))[edited[2]["id"]]
    assert edited[2]["prompt"] in prompt


@pytest.mark.slow  # keeps make test under 10 minutes; runs in make test-slow
def test_rerunning_a_finished_job_generates_nothing_and_keeps_the_manifest_totals(t0_rows, tmp_path):
    folder, out = tmp_path / "prompts", tmp_path / "run"
    rows = split_into_folder(t0_rows, folder, files=1, per_file=4)
    args = job_args(folder, out, "cluster.num_workers=1")
    assert run(args).returncode == 0
    first = json.loads((out / "_manifest.json").read_text())
    again = run(args)
    assert again.returncode == 0 and "0 generated now, 4 from an earlier run" in again.stdout
    second = json.loads((out / "_manifest.json").read_text())
    assert second["totals"] == first["totals"] and second["totals"]["rows"] == len(rows)
