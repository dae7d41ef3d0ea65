"""A QLoRA adapter through a real job: every worker applies it, the rows say which one, another is refused."""

from __future__ import annotations

import json
import subprocess

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, tiny_llama
from tests.integration.jobs import assert_complete, expected_ids, job_args
from tests.unit.generation.test_adapter import make_adapter


@pytest.mark.slow  # keeps make test under 10 minutes: the several-adapters job runs this path too
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
    """fp32 greedy: each row of the mixed job equals what its adapter merged into the model (or none) gives it
    alone. The prompts share a long prefix, which the engine reads once per adapter, never across them."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.unit.generation.test_engine import generated_alone

    a, b = (
        make_adapter(tiny_llama(), tmp_path / "lora-a", seed=1),
        make_adapter(tiny_llama(), tmp_path / "lora-b", seed=2),
    )
    choice = ["a", "b", None, "b", "a", "", "a", "b", "a"]
    shared = (
        "You are a careful geography teacher. Answer in two short sentences, plainly, for a class of curious "
        "children who like maps, boats and stories about water."
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "prompt": f"{shared} Tell me about river number {i}.", "lora": c}) + "\n"
            for i, c in enumerate(choice)
        )
    )
    out = tmp_path / "mixed"
    args = job_args(prompts, out, f"+model.adapters.a={a}", f"+model.adapters.b={b}", "dataset.adapter_column=lora")
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_complete(out, expected_ids(prompts))
    mixed = {r["id"]: r for f in out.glob("*.parquet") for r in pq.read_table(f).to_pylist()}
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama())

    def model_of(adapter):
        base = AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=torch.float32)
        return (PeftModel.from_pretrained(base, adapter).merge_and_unload() if adapter else base).eval()

    models = {"a": model_of(a), "b": model_of(b), None: model_of(None)}
    eos = models[None].generation_config.eos_token_id
    texts = {}
    for i, c in enumerate(choice):
        row = mixed[f"r{i}"]
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        assert len(ids) == row["prompt_tokens"] > 40  # the chat template and the shared prefix
        tokens = generated_alone(models[c or None], ids, 8, tokenizer.pad_token_id, eos_token_id=eos)
        texts[(i, c or None)] = tokenizer.decode(tokens, skip_special_tokens=True)
        assert row["completion"] == texts[(i, c or None)], (i, c)
        assert (row["adapter"] or "").split("@")[0] == {"a": "lora-a", "b": "lora-b"}.get(c or None, "")
    assert len({texts[(0, "a")], texts[(1, "b")], texts[(2, None)]}) == 3  # the adapters change the rows
    for f in (tmp_path / "mixed").glob("*.parquet"):  # planned apart: a file (shard) holds one adapter's rows
        assert len(set(pq.read_table(f, columns=["adapter"]).column("adapter").to_pylist())) == 1, f.name
    manifest = json.loads((tmp_path / "mixed" / "_manifest.json").read_text())
    files = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "mixed").glob("*.parquet")}
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]  # the same job resumes: nothing generated again
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "mixed").glob("*.parquet")} == files
    assert set(manifest["adapters"]) == {"a", "b"} and manifest["adapters"]["a"].startswith("lora-a@")
