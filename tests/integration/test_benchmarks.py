"""Slow: the benchmark scripts end to end on a small workload, and Spark reading a run's output."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, T0_MIX

pytestmark = pytest.mark.slow


def benchmark(tmp_path, *args: str) -> tuple[dict, dict]:
    """`jobs/benchmark.py ARGS --out tmp_path`: its report and its systems' rows by name."""
    result = subprocess.run(
        [sys.executable, "jobs/benchmark.py", *args, "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "benchmark.json").read_text())
    return report, {r["system"]: r for r in report["systems"]}


def test_the_throughput_benchmark_runs_every_system_and_they_agree(tmp_path):
    report, systems = benchmark(tmp_path, "--n", "6", "--max-new-tokens", "4")
    assert set(systems) == {"plain", "sorted", "pipeline", "ray_data", "runner", "runner_2w"}
    assert all(r["rows"] == 6 and r["agreement"] == 1.0 and r["tokens_per_s"] > 0 for r in systems.values())
    assert len({r["prompt_tokens"] for r in systems.values()}) == 1  # every system saw the same prompts
    assert "| runner |" in (tmp_path / "benchmark.md").read_text()


def test_the_long_workload_runs_transformers_continuous_batching_beside_the_runner(tmp_path):
    report, systems = benchmark(tmp_path, "--workload", "long", "--n", "4", "--max-new-tokens", "12")
    assert set(systems) == {"plain", "sorted", "generate_batch", "runner"} and report["workload"]["workload"] == "long"
    assert all(r["rows"] == 4 and r["generated_tokens"] > 0 for r in systems.values())
    assert systems["runner"]["generation_efficiency"] == 1.0  # with 4 rows an ended row's empty row goes at once
    assert "runner / generate_batch" in (tmp_path / "benchmark.md").read_text()


def test_the_few_shot_workload_counts_the_prompt_tokens_the_runner_computed(tmp_path):
    args = ["--workload", "fewshot", "--n", "6", "--max-new-tokens", "2", "--systems", "sorted,runner"]
    report, systems = benchmark(tmp_path, *args)
    unshared = report["workload"]["unshared_prompt_tokens"]
    assert report["workload"]["prompt_tokens"]["min"] > 900  # the block of examples before every question
    assert unshared < report["workload"]["prompt_tokens"]["total"] / 3
    assert systems["runner"]["computed_prompt_tokens"] <= 1.2 * unshared  # the block was read once
    assert "computed prompt tokens" in (tmp_path / "benchmark.md").read_text()


def test_the_scale_benchmark_measures_a_small_input(tmp_path):
    args = ["jobs/bench_scale.py", "--sizes", "300", "--shard-size", "50", "--run-seconds", "2", "--out", str(tmp_path)]
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = json.loads((tmp_path / "bench_scale.json").read_text())
    assert row["prompts"] == 300 and row["first_shard_s"] > 0 and row["shards_committed"] >= 1
    assert 0.5 < row["padding_windowed"] <= 1 and 0 < row["driver_rss_mib"] < row["job_pss_mib"]
    assert "| 300 |" in (tmp_path / "bench_scale.md").read_text()


def test_the_object_store_benchmark_measures_both_nodes_both_ways(tmp_path):
    args = ["jobs/bench_object_store.py", "--rows", "1024", "--out", str(tmp_path)]
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    whole, sliced = json.loads((tmp_path / "bench_object_store.json").read_text())
    assert (whole["fetch"], sliced["fetch"]) == ("whole", "slices")
    for run in (whole, sliced):
        assert set(run["nodes"]) == {"head", "worker"}
        assert sum(n["rows"] for n in run["nodes"].values()) == 1024
        assert all(n["written_mib"] > 0 for n in run["nodes"].values())
    assert result.stdout.count("its store held at most") == 2  # a ratio per node


def test_the_sweep_benchmark_runs(tmp_path):
    args = ["jobs/bench_sweep.py", "--rows", "4", "--max-new-tokens", "4", "--out", str(tmp_path)]
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "sweep.json").read_text())["points"] == 3


def test_the_engine_benchmark_counts_ops_outside_the_forward_apart_from_the_number_of_rows(tmp_path):
    args = ["jobs/bench_engine.py", "--models", "tiny", "--sizes", "8,32", "--steps", "24", "--out", str(tmp_path)]
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["size"]: r for r in json.loads((tmp_path / "engine.json").read_text())}
    assert set(rows) == {8, 32} and all(r["ending"]["forward_ms"] > 0 for r in rows.values())
    # a step where rows end, or where the cache's empty rows are dropped (two copies per layer), costs the
    # same operations at 8 and at 32 running rows
    for kind in ("ending", "compacting"):
        if kind in rows[8] and kind in rows[32]:
            assert rows[32][kind]["ops_outside_forward"] <= 1.1 * rows[8][kind]["ops_outside_forward"], kind
    assert rows[32]["ending"]["ops_outside_forward"] <= 1.1 * rows[32]["none_ending"]["ops_outside_forward"] + 4


def test_the_gpu_check_runs_on_the_cpu_with_a_tiny_model(tmp_path):
    """`jobs/bench_gpu.py --device cpu --shape tiny`: the script itself (its gpu tests skip without CUDA)."""
    args = ["jobs/bench_gpu.py", "--device", "cpu", "--shape", "tiny", "--n", "8", "--max-new-tokens", "16"]
    result = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    systems = {(r["quantization"], r["system"]) for r in report["rows"]}
    assert systems == {(q, s) for q in ("nf4", "none") for s in ("engine", "sorted", "generate_batch")}
    assert all(r["rows"] == 8 and r["tokens_per_s"] > 0 for r in report["rows"])
    assert report["gpu_tests"]["skipped"] == 3 and report["gpu_tests"]["failed"] == 0
    assert "| nf4 | engine | 8 |" in result.stdout


def test_spark_reads_a_run_as_the_readme_shows(tmp_path):
    pyspark = pytest.importorskip("pyspark", reason="make test-slow installs pyspark (the [spark] extra)")
    assert pyspark
    prompts = tmp_path / "prompts.jsonl"
    with open(T0_MIX) as f:
        prompts.write_text("".join(next(f) for _ in range(6)))
    out = tmp_path / "out" / "run1"
    generate = [sys.executable, "jobs/generate.py", f"dataset.path={prompts}", "generation.max_new_tokens=4"]
    result = subprocess.run([*generate, f"output.dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    readme = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "pyspark" in b)
    check = block + (
        "\nimport duckdb\n"
        "rows = spark.read.parquet('out/run1')  # the directory as it is\n"
        "expected = duckdb.sql(\"SELECT count(*), sum(completion_tokens) FROM 'out/run1/*.parquet'\").fetchall()[0]\n"
        "got = rows.selectExpr('count(*)', 'sum(completion_tokens)').collect()[0]\n"
        "assert tuple(got) == tuple(expected), (got, expected)\n"
        "assert dict(rows.dtypes)['created_at'] == 'timestamp' and dict(rows.dtypes)['prompt_tokens'] == 'int'\n"
        "print('spark ok', tuple(got))\n"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "spark ok (6," in result.stdout
