"""Helpers for integration tests that run real jobs as a user would (a subprocess per job)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from runner.store import verify_run
from tests.conftest import tiny_llama

ROWS = 24


def job_args(prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "jobs/generate.py",
        f"dataset.path={prompts}",
        "dataset.id_column=id",
        # A tiny random Llama in float32: these jobs test faults, streaming, clusters and stores, not the
        # model. The embedded model's 8 tokens cost each 3-row shard about 2 s on these 2 cores, its 4-bit
        # loading each worker 5 s more; the embedded model and the 4-bit path have tests of their own
        # (test_generate_job's full-contract run, test_left_padding, test_embedded_model, test_readme).
        f"model.name_or_path={tiny_llama()}",
        "model.quantization=none",
        "generation.max_new_tokens=8",
        "batching.shard_size=3",
        "batching.max_batch_size=3",
        "batching.sort_window=8",  # 24 rows stream through in three windows
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
    return {json.loads(line)["id"] for line in prompts.read_text().splitlines()}


def read_with_every_reader(directory: Path) -> dict[str, list[tuple]]:
    """The rows of a run or sweep directory, as it is, through each reader users point at it.

    Each reader's rows as sorted (id, sample_index, temperature, completion) tuples. DuckDB is given
    its directory syntax (a glob); the others the directory itself.
    """
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    columns = ["id", "sample_index", "temperature", "completion"]

    def rows(records) -> list[tuple]:
        return sorted((tuple(r[c] for c in columns) for r in records), key=repr)

    path = str(directory)
    found = {
        "pandas": rows(pd.read_parquet(path, columns=columns).to_dict("records")),
        "polars": rows(pl.read_parquet(path, columns=columns, use_pyarrow=True).to_dicts()),
        "pyarrow.dataset": rows(ds.dataset(path, format="parquet").to_table(columns=columns).to_pylist()),
        "duckdb": rows(
            duckdb.sql(f"SELECT {', '.join(columns)} FROM read_parquet('{path}/**/*.parquet')")
            .to_arrow_table()
            .to_pylist()
        ),
        "datasets": rows(datasets.load_dataset(path, split="train").select_columns(columns).to_list()),
    }
    return found
