"""A scoring job (generation.max_new_tokens=0, generation.prompt_logprobs=true) as a user runs it."""

from __future__ import annotations

import json
import subprocess

import pyarrow.dataset as ds
import pytest

from tests.conftest import REPO, tiny_llama
from tests.integration.jobs import assert_complete, expected_ids, job_args

SCORING = ["generation.max_new_tokens=0", "generation.prompt_logprobs=true", "model.chat_template=none"]


def test_a_scoring_job_writes_each_prompts_token_logprobs_as_a_plain_forward_pass_gives_them(tmp_path, t0_rows):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"t{i}", "prompt": r["prompt"]} for i, r in enumerate(t0_rows[:20]) if len(r["prompt"]) < 3000]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = subprocess.run(job_args(prompts, tmp_path / "out", *SCORING), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prompt tokens scored/s" in done.stdout and "sum of log p" in done.stdout
    assert_complete(tmp_path / "out", expected_ids(prompts))
    written = {r["id"]: r for r in ds.dataset(tmp_path / "out", format="parquet").to_table().to_pylist()}
    model = AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama())
    for r in rows:
        row = written[r["id"]]
        ids = tokenizer(r["prompt"])["input_ids"]
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
        want = logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
        assert row["prompt_tokens"] == len(ids) and len(row["prompt_logprobs"]) == len(ids) - 1
        assert row["prompt_logprobs"] == pytest.approx(want.tolist(), abs=1e-4)
        assert row["prompt_logprob_sum"] == pytest.approx(float(want.sum()), abs=1e-2)
        assert (row["completion"], row["completion_tokens"], row["finish_reason"]) == ("", 0, "length")
        assert json.loads(row["generation_config"])["max_new_tokens"] == 0
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.parquet")}
    again = subprocess.run(job_args(prompts, tmp_path / "out", *SCORING), cwd=REPO, capture_output=True, text=True)
    assert (
        again.returncode == 0 and {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.parquet")} == files
    )
