"""Every command in the README runs: here, verbatim, or by the test named for it.

The README's bash, SQL and Python blocks are read from the file itself. Commands a
newcomer runs first are run here exactly as written, in a scratch folder that links to
this checkout's `jobs/`, `conf/` and `.venv/` and holds a small `my_prompts.jsonl`.
Commands that need a cluster, minutes of benchmark or make itself are run elsewhere;
for each, the test that runs it must still contain it, so neither side can drift alone.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
MY_PROMPTS = [
    {"qid": "q1", "question": "What is the capital of France? Answer in one word."},
    {"qid": "q2", "question": "Name a primary color. Answer in one word."},
    {"qid": "q3", "question": "What is 2 + 3? Answer with the number only."},
]

# Commands run outside this module: (how the command starts, file that runs it, text that file must contain).
ELSEWHERE = [
    ("make demo", "Makefile", "demo: model"),  # run from a fresh clone before every hand-over
    ("make test", ".ci/run", "make test"),  # what CI runs
    ("make test-slow", "Makefile", "pytest -m slow"),
    ("make lint", "Makefile", "ruff check"),
    ("make lock", "Makefile", "pip freeze --exclude-editable"),
    ("make gpu-bundle", "Makefile", "jobs/bench_gpu.py --bundle .gpu"),  # downloads wheels
    ("make gpu-check", "Makefile", "jobs/bench_gpu.py --from .gpu"),  # needs a CUDA GPU
    ("make cluster-up", "tests/integration/test_cluster.py", '"cluster/local.sh"'),
    ("make cluster-down", "tests/integration/test_cluster.py", 'local_cluster("down")'),
    ("export RAY_AUTH_MODE=token", "tests/integration/test_cluster.py", '"RAY_AUTH_MODE": "token"'),
    (".venv/bin/python jobs/generate.py cluster.address=", "tests/integration/test_cluster.py", "cluster.address="),
    ("RAY_AUTH_MODE=token ray job submit", "tests/integration/test_cluster.py", "ray job submit"),
    ("RAY_AUTH_MODE=token .venv/bin/python jobs/submit.py", "tests/integration/test_cluster.py", '"jobs/submit.py"'),
    (
        ".venv/bin/python jobs/generate.py dataset.path=my_prompts.jsonl generation.logprobs",
        "tests/integration/test_generate_job.py",
        '"generation.logprobs=2"',
    ),
    (".venv/bin/python jobs/generate.py model.adapter=", "tests/integration/test_adapter_job.py", "model.adapter="),
    (
        ".venv/bin/python jobs/generate.py dataset.path=my_prompts.jsonl generation.max_new_tokens=0",
        "tests/integration/test_scoring_job.py",
        '"generation.prompt_logprobs=true"',
    ),
    (".venv/bin/python jobs/generate.py +model.adapters.", "tests/integration/test_adapter_job.py", "+model.adapters."),
    (
        ".venv/bin/python jobs/generate.py dataset.path=my_prompts.csv +dataset.settings_columns.",
        "tests/integration/test_row_settings_job.py",
        "+dataset.settings_columns.",
    ),
    (
        ".venv/bin/python jobs/generate.py dataset.path=batch_input.jsonl dataset.format=openai_batch",
        "tests/integration/test_openai_batch_job.py",
        '"dataset.format=openai_batch"',
    ),
    (
        ".venv/bin/python jobs/generate.py dataset.path=my_prompts.jsonl generation.json_schema=",
        "tests/integration/test_structured_job.py",
        '"generation.json_schema=conf/schemas/place.json"',
    ),
    # the dry run (Ray and preparers, 11 s): run over a folder of files by the streaming tests
    (".venv/bin/python jobs/plan.py", "tests/integration/test_streaming.py", '"jobs/plan.py"'),
    (".venv/bin/python jobs/bench_sweep.py", "tests/integration/test_benchmarks.py", '"jobs/bench_sweep.py"'),
    (".venv/bin/python jobs/benchmark.py", "tests/integration/test_benchmarks.py", '"jobs/benchmark.py"'),
    (".venv/bin/python jobs/bench_scale.py", "tests/integration/test_benchmarks.py", '"jobs/bench_scale.py"'),
    (
        ".venv/bin/python jobs/bench_object_store.py",
        "tests/integration/test_benchmarks.py",
        "jobs/bench_object_store.py",
    ),
]
SPARK = "pyspark"  # the Spark block runs in the slow Spark test (tests/integration/test_benchmarks.py)


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def bash_commands() -> list[str]:
    """Each command of the bash blocks: continuation lines joined, trailing comments dropped."""
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def runs_elsewhere(command: str) -> bool:
    return any(command.startswith(prefix) for prefix, _, _ in ELSEWHERE)


def test_commands_run_elsewhere_are_still_run_there():
    for prefix, path, needle in ELSEWHERE:
        assert any(c.startswith(prefix) for c in bash_commands()), f"README no longer has {prefix!r}: drop it here"
        assert needle in (REPO / path).read_text(), f"{path} no longer runs {prefix!r}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A scratch folder laid out like the project root, holding the README's my_prompts.jsonl."""
    root = tmp_path_factory.mktemp("readme")
    for name in ("jobs", "conf", ".venv"):
        (root / name).symlink_to(REPO / name)
    (root / "my_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MY_PROMPTS))
    return root


def run(command: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def test_the_readme_commands_run_as_written(workspace):
    here = [c for c in bash_commands() if not runs_elsewhere(c)]
    assert any("output.dir=out/run1" in c for c in here) and any(" -m " in c for c in here)
    for command in here:  # in README order: the first run comes before what reads its output
        result = run(command, workspace)
        if "jobs/generate.py --cfg job" in command:
            assert "max_new_tokens: 256" in result.stdout
    first_run = workspace / "out" / "run1"
    assert (first_run / "_manifest.json").exists() and (first_run / "_report" / "report.html").exists()
    assert len(list((workspace / "multirun" / "sweep1").glob("*/_manifest.json"))) == 4


def test_the_readme_queries_answer(workspace):
    import duckdb

    statements = [s.strip() for block in blocks("sql") for s in block.split(";") if s.strip()]
    assert len(statements) >= 4
    con = duckdb.connect()
    for statement in statements:
        sql = statement.replace("read_parquet('", f"read_parquet('{workspace}/")
        rows = con.execute(sql).fetchall()
        assert rows, f"no rows from:\n{statement}"
    for block in blocks("python"):
        if SPARK in block:
            continue
        result = subprocess.run([sys.executable, "-c", block], cwd=workspace, capture_output=True, text=True)
        assert result.returncode == 0, f"{block}\n{result.stderr[-3000:]}"
