"""Real jobs through Hydra, Ray actors on the CPU and the embedded model in 4-bit, read back as users do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pytest

from tests.conftest import REPO, tiny_llama, write_jsonl
from tests.integration.jobs import read_with_every_reader
from tests.unit.store.test_output import DESIGN_COLUMNS

QUESTIONS = [
    "What is the boiling point of water at sea level?",
    "Name a primary colour.",
    "Write one sentence about the moon.",
    "What is 3 + 4?",
    "Who wrote Romeo and Juliet?",
    "List two fruits that are yellow.",
    "What is the opposite of cold?",
    "Explain in a few words what a bicycle is, how it works, who might use one and why it is good for cities.",
    "Say hello in German.",
    "What colour is grass?",
    "How many legs does a spider have?",
    "Give a synonym for big.",
    "What is the largest planet?",
    "Finish the phrase: once upon a",
]


def run_cli(*overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_TOKEN": "hf_secret_never_printed_123"}
    return subprocess.run(
        [sys.executable, "jobs/generate.py", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def unseen_jsonl(tmp_path_factory) -> Path:
    rows = [
        {"qid": f"Q-{i:03d}", "question": q, "category": "trivia" if i % 2 else "misc", "id": i * 10}
        for i, q in enumerate(QUESTIONS)
    ]
    return write_jsonl(tmp_path_factory.mktemp("data") / "my_questions.jsonl", rows)


@pytest.fixture(scope="module")
def sampled_run(unseen_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run1"
    args = [
        f"dataset.path={unseen_jsonl}",
        "dataset.prompt_column=question",
        "dataset.id_column=qid",
        "generation.max_new_tokens=8",
        "generation.do_sample=true",
        "generation.temperature=0.8",
        "generation.num_return_sequences=2",
        "generation.seed=11",
        "generation.logprobs=2",
        "batching.shard_size=4",
        "batching.max_batch_size=4",
        "cluster.num_workers=2",
        "cluster.cpus_per_worker=1",
        f"output.dir={out}",
    ]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, args, result


def test_every_row_and_sample_exactly_once_with_the_full_contract(sampled_run):
    out, _, result = sampled_run
    rows = len(QUESTIONS) * 2
    con = duckdb.connect()
    files = f"{out}/*.parquet"
    assert con.execute(f"select count(*) from read_parquet('{files}')").fetchone()[0] == rows
    assert con.execute(f"select count(distinct (id, sample_index)) from read_parquet('{files}')").fetchone()[0] == rows
    ids = {r[0] for r in con.execute(f"select distinct id from read_parquet('{files}')").fetchall()}
    assert ids == {f"Q-{i:03d}" for i in range(len(QUESTIONS))}
    frame = pl.read_parquet(files)
    for name in DESIGN_COLUMNS:
        assert name in frame.columns, name
    assert frame.schema["sample_index"] == pl.Int32 and frame.schema["created_at"] == pl.Datetime("us", "UTC")
    assert frame.schema["latency_s"] == pl.Float64 and frame.schema["do_sample"] == pl.Boolean
    # input columns are carried; `id` collides with the output column and becomes input_id
    assert {"qid", "category", "input_id"} <= set(frame.columns)
    assert set(frame["finish_reason"].unique()) <= {"stop", "length"}
    assert frame["completion_tokens"].max() <= 8 and frame["prompt_tokens"].min() > 0
    assert set(frame["temperature"].unique()) == {0.8} and set(frame["seed"].unique()) == {11}
    assert frame["model"][0] == "embedded:SmolLM2-135M-Instruct" and frame["quantization"][0] == "nf4"
    assert frame["worker"].n_unique() >= 1 and frame["device"][0] == "cpu"
    assert not list(out.glob(".*tmp*"))
    assert "generated tokens/s" in result.stdout and str(out) in result.stdout
    # generation.logprobs=2: one log-probability per generated token, the 2 most likely tokens at each step
    for row in frame.select("completion_tokens", "token_logprobs", "top_logprobs", "cumulative_logprob").to_dicts():
        assert len(row["token_logprobs"]) == len(row["top_logprobs"]) == row["completion_tokens"]
        assert row["cumulative_logprob"] == pytest.approx(sum(row["token_logprobs"]), abs=1e-4)
        for chosen, top in zip(row["token_logprobs"], row["top_logprobs"]):
            assert len(top) == 2 and top[0]["logprob"] >= top[1]["logprob"] >= -1e9
            assert chosen <= top[0]["logprob"] + 1e-5 and all(isinstance(t["token"], str) for t in top)


def test_manifest_and_file_metadata_hold_the_resolved_config_without_secrets(sampled_run):
    import pyarrow.parquet as pq

    out, _, result = sampled_run
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["totals"]["rows"] == len(QUESTIONS) * 2
    assert sum(f["rows"] for f in manifest["files"]) == len(QUESTIONS) * 2
    assert {f["path"] for f in manifest["files"]} == {p.name for p in out.glob("*.parquet")}
    assert manifest["config"]["generation"]["num_return_sequences"] == 2
    for f in out.glob("*.parquet"):
        meta = pq.read_schema(f).metadata
        assert json.loads(meta[b"runner.config"])["dataset"]["prompt_column"] == "question"
        assert meta[b"runner.config_hash"].decode() == manifest["config_hash"]
    everything = result.stdout + result.stderr + (out / "_manifest.json").read_text()
    everything += "".join(str(pq.read_schema(f).metadata) for f in out.glob("*.parquet"))
    assert "hf_secret_never_printed_123" not in everything


def test_rerun_resumes_and_another_config_is_refused(sampled_run):
    out, args, _ = sampled_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "0 generated now" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == before
    other = run_cli(*[a for a in args if not a.startswith("generation.seed")], "generation.seed=12")
    assert other.returncode == 2
    assert "config hash mismatch" in other.stderr and "output.overwrite=true" in other.stderr


@pytest.mark.slow  # keeps make test under 10 minutes; the engine's own test of this stays in it
# (tests/unit/generation/test_engine.py: test_sampled_rows_do_not_depend_on_batching_or_order)
def test_sampled_rows_do_not_depend_on_workers_or_batching(unseen_jsonl, tmp_path):
    """Each sequence draws from its own random stream (seed, id, sample_index), whatever the batching.

    Two float32 runs (of the tiny random Llama) of one config and data, with 2 workers and small
    batches and with 1 worker and others: the engine also reads, joins and drops rows at other
    steps. Their samples agree,
    up to float rounding: a prompt read with one pad token in one run and none in the other gets
    logits that differ in the last bits, and a draw that lands right at the boundary between two
    tokens then picks the other one (seen here: 1 of 28 sequences, at its 8th token). With a
    random stream per batch, as before the engine, nearly every sequence differs.
    """
    common = [
        f"dataset.path={unseen_jsonl}",
        "dataset.prompt_column=question",
        "dataset.id_column=qid",
        f"model.name_or_path={tiny_llama()}",  # the streams are the runner's, whatever the model
        "model.quantization=none",
        "generation.max_new_tokens=8",
        "generation.do_sample=true",
        "generation.temperature=0.8",
        "generation.num_return_sequences=2",
        "generation.seed=11",
    ]
    runs = {
        "two": [
            "cluster.num_workers=2",
            "cluster.cpus_per_worker=1",
            "batching.shard_size=4",
            "batching.max_batch_size=4",
        ],
        # one thread per worker in both: a matrix product split over another number of threads rounds
        # differently in the last bits, which can move a draw that falls right at a token's boundary
        "one": [
            "cluster.num_workers=1",
            "cluster.cpus_per_worker=1",
            "batching.shard_size=16",
            "batching.max_batch_size=3",
        ],
    }
    rows = {}
    for name, extra in runs.items():
        result = run_cli(*common, *extra, f"output.dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-3000:]
        frame = duckdb.sql(
            f"SELECT qid, sample_index, completion, completion_tokens, finish_reason, shard_id, batch_size "
            f"FROM read_parquet('{tmp_path / name}/*.parquet') ORDER BY qid, sample_index"
        ).fetchall()
        rows[name] = frame
    assert len(rows["one"]) == 2 * len(QUESTIONS)
    same = sum(a[:5] == b[:5] for a, b in zip(rows["one"], rows["two"]))
    assert same >= len(rows["one"]) - 2, f"{same} of {len(rows['one'])} sequences identical"
    assert [r[5:] for r in rows["one"]] != [r[5:] for r in rows["two"]]  # really run in other shards and batches
    assert any(a[2] != b[2] for a, b in zip(rows["one"][::2], rows["one"][1::2]))  # a row's samples differ


def test_bad_config_fails_fast_naming_every_problem(tmp_path):
    result = run_cli(
        "generation.temperature=-0.5",
        "generation.top_p=0",
        "model.quantization=int3",
        f"output.dir={tmp_path}",
        timeout=120,
    )
    assert result.returncode == 2
    for text in ("generation.temperature=-0.5", "generation.top_p=0", "model.quantization='int3'"):
        assert text in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_input_fails_before_any_model_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": oops}\n')
    result = run_cli(
        f"dataset.path={bad}",
        "dataset.id_column=null",
        f"output.dir={tmp_path / 'out'}",
        timeout=120,
    )
    assert result.returncode == 2
    assert f"{bad}:2: not valid JSON" in result.stderr and "Traceback" not in result.stderr
    assert "ShardGenerator" not in result.stderr and not list((tmp_path / "out").glob("*.parquet"))


def test_missing_model_folder_is_named(tmp_path, unseen_jsonl):
    result = run_cli(
        f"dataset.path={unseen_jsonl}",
        "dataset.prompt_column=question",
        "dataset.id_column=qid",
        "model.name_or_path=./models/missing-model",
        f"output.dir={tmp_path}",
        timeout=120,
    )
    assert result.returncode == 2 and "model.name_or_path='./models/missing-model': no such folder" in result.stderr


def test_the_report_renders_and_its_numbers_match_duckdb(sampled_run, tmp_path):
    out, _, _ = sampled_run
    result = subprocess.run(
        [sys.executable, "jobs/report.py", f"output.dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("report.html", "lengths.svg", "finish_reasons.svg", "throughput.svg", "timeline.svg", "padding.svg"):
        assert (out / "_report" / name).stat().st_size > 1000, name
    page = (out / "_report" / "report.html").read_text()
    assert page.count("data:image/svg+xml;base64,") == 5  # self-contained
    assert "<td>error rows</td><td>0</td>" in page and "settings side by side" in page
    con = duckdb.connect()
    files = f"read_parquet('{out}/*.parquet')"
    rows, tokens = con.execute(f"SELECT count(*), sum(completion_tokens) FROM {files}").fetchone()
    assert f"{rows} rows" in result.stdout and f"total {tokens}" in result.stdout
    for reason, count in con.execute(f"SELECT finish_reason, count(*) FROM {files} GROUP BY ALL").fetchall():
        assert f"{reason} {count}" in result.stdout
    efficiency = con.execute(
        f"SELECT sum(prompt_tokens) / sum(padded_length) FROM {files} WHERE sample_index = 0"
    ).fetchone()[0]
    assert f"prompt side {efficiency:.3f}" in result.stdout
    for worker in {r[0] for r in con.execute(f"SELECT DISTINCT worker FROM {files}").fetchall()}:
        assert f"worker {worker}:" in result.stdout


def test_every_reader_opens_the_run_directory_as_it_is_with_the_same_rows_and_types(sampled_run):
    import pandas as pd
    import pyarrow.dataset as ds

    out, _, _ = sampled_run
    if not (out / "_report").exists():  # the directory as a user has it: report and manifest beside the data
        subprocess.run([sys.executable, "jobs/report.py", f"output.dir={out}"], cwd=REPO, check=True, timeout=300)
    assert {"_manifest.json", "_report"} <= {p.name for p in out.iterdir()}
    found = read_with_every_reader(out)
    assert len(found["pyarrow.dataset"]) == 2 * len(QUESTIONS)
    assert all(rows == found["pyarrow.dataset"] for rows in found.values()), {k: len(v) for k, v in found.items()}
    table = ds.dataset(str(out), format="parquet").to_table()
    assert str(table.schema.field("created_at").type) == "timestamp[us, tz=UTC]"
    frame = pd.read_parquet(out)
    assert str(frame["created_at"].dtype) == "datetime64[us, UTC]" and str(frame["prompt_tokens"].dtype) == "int32"
    assert list(frame.columns) == table.schema.names == pl.read_parquet(out, use_pyarrow=True).columns


def test_report_on_a_directory_without_a_finished_run_says_so(tmp_path):
    result = subprocess.run(
        [sys.executable, "jobs/report.py", f"output.dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "no _manifest.json" in result.stderr


def test_the_run_exports_as_an_openai_batch_output_file(sampled_run, tmp_path):
    """Every input row exactly once, its samples as choices, token counts as in the Parquet files; read back
    with the openai package's own types."""
    from openai.types.chat import ChatCompletion

    out, _, _ = sampled_run
    target = tmp_path / "exported" / "batch_output.jsonl"
    args = [f"output.dir={out}", "export.format=openai_batch", f"export.path={target}"]
    result = subprocess.run([sys.executable, "jobs/export.py", *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{len(QUESTIONS)} lines (chat responses)" in result.stdout
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"Q-{i:03d}" for i in range(len(QUESTIONS)))
    parquet = duckdb.sql(
        f"SELECT qid, sum(completion_tokens), max(prompt_tokens) FROM read_parquet('{out}/*.parquet') GROUP BY qid"
    ).fetchall()
    counts = {qid: (completion, prompt) for qid, completion, prompt in parquet}
    for line in lines:
        body = ChatCompletion.model_validate(line["response"]["body"])
        assert len(body.choices) == 2 and {c.index for c in body.choices} == {0, 1}
        assert (body.usage.completion_tokens, body.usage.prompt_tokens) == counts[line["custom_id"]]
    assert not list(target.parent.glob("*.tmp-*"))
    bad = subprocess.run(
        [sys.executable, "jobs/export.py", f"output.dir={tmp_path / 'nothing'}", *args[1:]],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "is not a complete run" in bad.stderr
