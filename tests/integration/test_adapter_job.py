"""A QLoRA adapter through a real job: every worker applies it, the rows say which one, another is refused."""

from __future__ import annotations

import json
import subprocess

import pyarrow.parquet as pq

from tests.conftest import REPO, tiny_llama
from tests.integration.jobs import assert_complete, expected_ids, job_args
from tests.unit.generation.test_adapter import make_adapter


def test_a_job_with_an_adapter_records_it_and_a_rerun_with_other_weights_is_refused(prompts, tmp_path):
    adapter = make_adapter(tiny_llama(), tmp_path / "support-lora")
    out = tmp_path / "run"
    args = job_args(prompts, out, f"model.adapter={adapter}")
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_complete(out, expected_ids(prompts))
    labels = {
        v for f in out.glob("*.parquet") for v in pq.read_table(f, columns=["adapter"]).column("adapter").to_pylist()
    }
    assert len(labels) == 1 and labels.pop().startswith("support-lora@")
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["adapter"].startswith("support-lora@")
    # the same folder with other weights is another adapter: its rows are not this run's
    make_adapter(tiny_llama(), tmp_path / "support-lora", seed=7)
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "config hash mismatch" in again.stderr, again.stderr[-2000:]


def test_an_adapter_of_another_base_model_is_refused_before_anything_starts(embedded_model_dir, prompts, tmp_path):
    adapter = make_adapter(embedded_model_dir, tmp_path / "smollm-lora")  # the job's model is the tiny Llama
    result = subprocess.run(
        job_args(prompts, tmp_path / "run", f"model.adapter={adapter}"), cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "does not fit model" in result.stderr and "takes 576 inputs, the model's 64" in result.stderr
    assert "Traceback" not in result.stderr and not list((tmp_path / "run").glob("*.parquet"))


def test_several_adapters_in_one_job_give_each_row_its_own_adapters_output(tmp_path):
    """fp32 greedy: each row of the mixed job equals the same row in a job of its adapter alone (or none)."""
    a, b = (
        make_adapter(tiny_llama(), tmp_path / "lora-a", seed=1),
        make_adapter(tiny_llama(), tmp_path / "lora-b", seed=2),
    )
    choice = ["a", "b", None, "b", "a", "", "a", "b", "a"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "prompt": f"Tell me about the river number {i}.", "lora": c}) + "\n"
            for i, c in enumerate(choice)
        )
    )

    def completions(out, *extra) -> dict[str, tuple]:
        result = subprocess.run(job_args(prompts, out, *extra), cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert_complete(out, expected_ids(prompts))
        rows = [r for f in out.glob("*.parquet") for r in pq.read_table(f).to_pylist()]
        return {r["id"]: (r["completion"], r.get("adapter")) for r in rows}

    mixed = completions(
        tmp_path / "mixed", f"+model.adapters.a={a}", f"+model.adapters.b={b}", "dataset.adapter_column=lora"
    )
    alone = {
        "a": completions(tmp_path / "a", f"model.adapter={a}"),
        "b": completions(tmp_path / "b", f"model.adapter={b}"),
        None: completions(tmp_path / "base"),
    }
    for i, c in enumerate(choice):
        text, label = mixed[f"r{i}"]
        assert text == alone[c or None][f"r{i}"][0], (i, c)
        assert (label or "").split("@")[0] == {"a": "lora-a", "b": "lora-b"}.get(c or None, "")
    assert alone["a"]["r0"][0] != alone["b"]["r0"][0] != alone[None]["r0"][0]  # the adapters change the rows
    for f in (tmp_path / "mixed").glob("*.parquet"):  # planned apart: a file (shard) holds one adapter's rows
        assert len(set(pq.read_table(f, columns=["adapter"]).column("adapter").to_pylist())) == 1, f.name
    manifest = json.loads((tmp_path / "mixed" / "_manifest.json").read_text())
    files = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "mixed").glob("*.parquet")}
    assert (
        completions(
            tmp_path / "mixed", f"+model.adapters.a={a}", f"+model.adapters.b={b}", "dataset.adapter_column=lora"
        )
        == mixed
    )  # the same job resumes: nothing generated again
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "mixed").glob("*.parquet")} == files
    assert set(manifest["adapters"]) == {"a", "b"} and manifest["adapters"]["a"].startswith("lora-a@")
    unknown = subprocess.run(
        job_args(prompts, tmp_path / "unknown", f"+model.adapters.a={a}", "dataset.adapter_column=lora"),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert unknown.returncode == 2 and "name an adapter that model.adapters does not have" in unknown.stderr
    assert "'r1' ('b')" in unknown.stderr and "Traceback" not in unknown.stderr
