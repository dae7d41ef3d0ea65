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
