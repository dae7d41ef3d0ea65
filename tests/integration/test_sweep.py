"""Hydra multirun sweeps: one directory per point, one table for the sweep, models loaded once, reproducible."""

from __future__ import annotations

import subprocess
import sys

import duckdb
import pytest

from tests.conftest import REPO, tiny_llama
from tests.integration.jobs import read_with_every_reader

POINTS = {0.5, 1.0}


def run_sweep(prompts, sweep_dir) -> subprocess.CompletedProcess:
    args = [
        sys.executable,
        "jobs/generate.py",
        "-m",
        f"dataset.path={prompts}",
        "dataset.id_column=id",
        "dataset.limit=8",
        f"model.name_or_path={tiny_llama()}",  # what a sweep keeps and writes does not depend on the model
        "model.quantization=none",
        "generation.do_sample=true",
        "generation.temperature=0.5,1.0",
        "generation.max_new_tokens=6",
        "generation.seed=3",
        "cluster.num_workers=1",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def sweeps(prompts, tmp_path_factory):
    base = tmp_path_factory.mktemp("sweeps")
    run_sweep(prompts, base / "first")
    return base / "first", base / "again"  # `again` is run by the (slow) reproduction test alone


def test_each_point_has_its_own_complete_directory(sweeps):
    first, _ = sweeps
    points = sorted(p for p in first.iterdir() if p.is_dir())
    assert [p.name for p in points] == ["0", "1"]
    for point in points:
        assert (point / "_manifest.json").exists() and list(point.glob("*.parquet"))
        check = subprocess.run(
            [sys.executable, "jobs/verify.py", f"output.dir={point}"], cwd=REPO, capture_output=True, text=True
        )
        assert check.returncode == 0, check.stderr


def test_the_whole_sweep_reads_as_one_table_in_duckdb(sweeps):
    first, _ = sweeps
    rows = duckdb.execute(
        f"SELECT temperature, top_p, avg(completion_tokens), count(*) FROM read_parquet('{first}/**/*.parquet') "
        "GROUP BY ALL ORDER BY temperature"
    ).fetchall()
    assert {r[0] for r in rows} == POINTS and all(r[3] == 8 for r in rows) and all(r[1] == 1.0 for r in rows)


def test_every_reader_opens_the_sweep_directory_as_it_is(sweeps):
    first, _ = sweeps
    assert (first / "_multirun.yaml").exists() and not (first / "multirun.yaml").exists()
    assert (first / "0" / "_generate.log").exists() and (first / "0" / ".hydra").is_dir()
    found = read_with_every_reader(first)
    assert len(found["pyarrow.dataset"]) == 16 and {r[2] for r in found["pyarrow.dataset"]} == POINTS
    assert all(rows == found["pyarrow.dataset"] for rows in found.values()), {k: len(v) for k, v in found.items()}


def test_the_model_is_loaded_once_for_the_whole_sweep(sweeps):
    first, _ = sweeps
    workers = duckdb.execute(f"SELECT DISTINCT worker FROM read_parquet('{first}/**/*.parquet')").fetchall()
    assert len(workers) == 1  # the same worker process served every point


@pytest.mark.slow  # a second whole sweep; sampled rows that do not depend on the batching are in the default
# suite too (test_engine's test_sampled_rows_do_not_depend_on_batching_or_order)
def test_rerunning_the_sweep_reproduces_it_exactly(sweeps, prompts):
    first, again = sweeps
    run_sweep(prompts, again)
    query = "SELECT temperature, id, seed, completion FROM read_parquet('{}/**/*.parquet') ORDER BY ALL"
    a = duckdb.execute(query.format(first)).fetchall()
    b = duckdb.execute(query.format(again)).fetchall()
    assert a == b and {r[2] for r in a} == {3}
    # sampling really happened: the two temperatures do not give the same text everywhere
    by_point = {t: [r[3] for r in a if r[0] == t] for t in POINTS}
    assert by_point[0.5] != by_point[1.0]


def test_the_report_over_a_sweep_compares_the_settings(sweeps):
    first, _ = sweeps
    result = subprocess.run(
        [sys.executable, "jobs/report.py", f"output.dir={first}"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "report over 2 run(s), 16 rows" in result.stdout
    assert (first / "_report" / "report.html").exists() and (
        first / "_report" / "finish_reasons.svg"
    ).stat().st_size > 1000
