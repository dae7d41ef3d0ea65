"""output.dir as an s3:// URI, against a real S3-compatible server (moto) on 127.0.0.1, resume included."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO
from tests.integration.conftest import CREDENTIALS
from tests.integration.jobs import expected_ids, job_args


def run(prompts, uri):
    args = job_args(prompts, "unused", "cluster.num_workers=1")
    args = [a for a in args if not a.startswith("output.dir=")] + [f"output.dir='{uri}'"]
    env = {**os.environ, **CREDENTIALS}
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def verify(uri) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "jobs/verify.py", f"output.dir={uri}"],
        cwd=REPO,
        env={**os.environ, **CREDENTIALS},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # keeps make test under 10 minutes; runs in make test-slow
def test_a_run_writes_to_s3_resumes_there_and_verifies(s3_server, prompts):
    endpoint, fs = s3_server
    uri = f"s3://runner-test/runs/run1?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    first = run(prompts, uri)
    assert "24 generated now" in first.stdout
    assert verify(uri).returncode == 0

    table = ds.dataset("runner-test/runs/run1", filesystem=fs, format="parquet", exclude_invalid_files=True).to_table()
    assert sorted(table.column("id").to_pylist()) == sorted(expected_ids(prompts))
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector("runner-test/runs/run1")))
    assert "_manifest.json" in names and not [n for n in names if ".tmp-" in n]
    manifest = fs.open_input_stream("runner-test/runs/run1/_manifest.json").read().decode()
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in manifest

    # lose one shard and the manifest, as a run killed before its end would: the rerun redoes just that shard
    lost = next(n for n in names if n.endswith(".parquet"))
    with fs.open_input_file(f"runner-test/runs/run1/{lost}") as f:
        lost_rows = pq.ParquetFile(f).metadata.num_rows
    fs.delete_file(f"runner-test/runs/run1/{lost}")
    fs.delete_file("runner-test/runs/run1/_manifest.json")
    assert verify(uri).returncode == 1
    again = run(prompts, uri)
    assert f"{lost_rows} generated now, {24 - lost_rows} from an earlier run" in again.stdout
    assert verify(uri).returncode == 0


def test_prompts_from_a_folder_of_files_on_s3_run_and_no_credential_is_printed_or_saved(s3_server, prompts, tmp_path):
    endpoint, fs = s3_server
    lines = prompts.read_text().splitlines(keepends=True)
    for k in range(3):  # three files, and one that is not data
        with fs.open_output_stream(f"runner-test/prompts/part-{k}.jsonl") as f:
            f.write("".join(lines[k * 8 : (k + 1) * 8]).encode())
    with fs.open_output_stream("runner-test/prompts/_SUCCESS") as f:
        f.write(b"")
    query = f"endpoint_override={endpoint}&scheme=http&region=us-east-1"
    hydra_dir = tmp_path / "hydra"
    args = job_args(prompts, "unused", "cluster.num_workers=1")
    args = [a for a in args if not a.startswith(("dataset.", "output."))]
    args += ["dataset.id_column=id", f"hydra.run.dir={hydra_dir}"]
    env = {**os.environ, **CREDENTIALS}
    # the credentials inside the URIs this time, input and output: they must not show or stay anywhere
    key, secret = CREDENTIALS["AWS_ACCESS_KEY_ID"], CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    out_uri = f"s3://{key}:{secret}@runner-test/with-credentials?{query}"
    inputs = f"dataset.path='s3://{key}:{secret}@runner-test/prompts?{query}'"
    command = [*args, inputs, f"output.dir='{out_uri}'"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "a few completions" in result.stdout  # read back through the real URI, not the masked one
    assert secret not in result.stdout + result.stderr and "***@runner-test/with-credentials" in result.stdout
    assert verify(out_uri).returncode == 0
    table = ds.dataset("runner-test/with-credentials", filesystem=fs, format="parquet").to_table()
    assert sorted(table.column("id").to_pylist()) == sorted(expected_ids(prompts))
    manifest = fs.open_input_stream("runner-test/with-credentials/_manifest.json").read().decode()
    assert secret not in manifest and key not in manifest
    saved = {p.name: p.read_text() for p in hydra_dir.rglob("*") if p.is_file()}
    assert {"config.yaml", "overrides.yaml", "hydra.yaml"} <= set(saved)
    assert not [name for name, text in saved.items() if secret in text or key in text]

    missing = subprocess.run(
        [*args, f"dataset.path='s3://{key}:{secret}@runner-test/nothing-here/*.jsonl?{query}'", "output.dir=unused"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "no data file there" in missing.stderr and secret not in missing.stderr
