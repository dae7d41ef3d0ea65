"""A real job whose rows carry their own generation settings (dataset.settings_columns)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pyarrow.dataset as ds
import pytest

from tests.conftest import REPO
from tests.integration.jobs import job_args

MAPPING = [
    "+dataset.settings_columns.temperature=temp",
    "+dataset.settings_columns.max_new_tokens=budget",
    "+dataset.settings_columns.num_return_sequences=n",
    "+dataset.settings_columns.stop_strings=stop",
    "+dataset.settings_columns.seed=seed",
]
ROWS = [  # id, temp, budget, n, stop, seed ("": the job's)
    ("a", "", "", "", "", ""),
    ("b", "0.5", "3", "", "", "7"),
    ("c", "0", "", "1", "", ""),
    ("d", "1.3", "", "1", "\n", ""),
    ("e", "", "5", "3", "", "2"),
    ("f", "0.8", "", "", "", ""),
]


def write_csv(path, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "temp", "budget", "n", "stop", "seed"])
        for r in rows:
            w.writerow([r[0], f"Tell me a story about {r[0]} and the sea.", *r[1:]])


def run(tmp_path, prompts, *extra):
    args = job_args(prompts, tmp_path / "out", "generation.do_sample=true", "generation.num_return_sequences=3", *extra)
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # keeps make test under 10 minutes: the Batch job has rows of their own settings too
def test_rows_of_a_csv_decode_with_their_own_settings_and_say_so(tmp_path):
    prompts = tmp_path / "prompts.csv"
    write_csv(prompts, ROWS)
    done = run(tmp_path, prompts, *MAPPING)
    assert done.returncode == 0, done.stderr[-3000:]
    table = ds.dataset(tmp_path / "out", format="parquet").to_table().to_pylist()
    by_id: dict[str, list[dict]] = {}
    for r in table:
        by_id.setdefault(r["id"], []).append(r)
    assert {i: len(v) for i, v in by_id.items()} == {"a": 3, "b": 3, "c": 1, "d": 1, "e": 3, "f": 3}
    first = {i: v[0] for i, v in by_id.items()}
    assert first["a"]["temperature"] == 1.0 and first["a"]["max_new_tokens"] == 8 and first["a"]["seed"] == 0
    assert (first["b"]["temperature"], first["b"]["max_new_tokens"], first["b"]["seed"]) == (0.5, 3, 7)
    assert all(r["completion_tokens"] <= 3 for r in by_id["b"])
    assert (first["c"]["do_sample"], first["c"]["temperature"], first["c"]["num_return_sequences"]) == (False, None, 1)
    assert first["d"]["stop_strings"] == ["\n"] and first["a"]["stop_strings"] == []
    assert first["e"]["num_return_sequences"] == 3 and all(r["completion_tokens"] <= 5 for r in by_id["e"])
    config = json.loads(first["b"]["generation_config"])
    assert (config["temperature"], config["max_new_tokens"]) == (0.5, 3)
    assert first["b"]["temp"] == "0.5"  # the input column is carried as it was
    verified = subprocess.run(
        [sys.executable, "jobs/verify.py", f"output.dir={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.parquet")}
    again = run(tmp_path, prompts, *MAPPING)  # the same job resumes: nothing to generate
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.parquet")} == files


@pytest.mark.slow  # keeps make test under 10 minutes: tests/unit/input/test_own_settings.py checks the messages
def test_bad_row_settings_are_refused_by_row_before_any_model_loads(tmp_path):
    prompts = tmp_path / "prompts.csv"
    write_csv(
        prompts,
        [
            ("a", "hot", "", "", "", ""),
            ("b", "", "99", "", "", ""),
            ("c", "0", "", "2", "", ""),
            ("d", "", "", "", "", ""),
        ],
    )
    done = run(tmp_path, prompts, *MAPPING)
    assert done.returncode == 2, done.stderr[-3000:]
    message = done.stdout + done.stderr
    assert "dataset.settings_columns.temperature='temp'" in message and "'a' ('hot')" in message
    assert "'b' (99)" in message and "raise it" in message
    assert "greedy" in message and "'c'" in message
    assert "Traceback" not in message
    unknown = run(tmp_path, prompts, "+dataset.settings_columns.beams=temp")
    assert unknown.returncode == 2 and "not a setting rows can hold" in unknown.stdout + unknown.stderr
