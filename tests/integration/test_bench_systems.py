"""The benchmark's comparison systems, on a tiny random Llama: same completions, honest figures."""

from __future__ import annotations

from jobs.bench import figures as bench
from jobs.bench import systems as bench_systems

TEXTS = ["many words " * 20, "hi", "many words " * 18, "yo", "many words " * 16, "ok"]  # long and short in turn


def test_fixed_size_sorted_and_pipeline_agree_and_report_their_padding(tiny_llama_dir):
    ids = [f"r{i}" for i in range(len(TEXTS))]
    common = {"model_path": tiny_llama_dir, "quantization": "none", "batch_size": 2, "max_new_tokens": 6}
    plain = bench_systems.fixed_size("plain", ids, TEXTS, list(range(len(TEXTS))), **common)
    order = sorted(range(len(TEXTS)), key=lambda i: -len(TEXTS[i]))
    ordered = bench_systems.fixed_size("sorted", ids, TEXTS, order, **common)
    pipe = bench_systems.pipeline(ids, TEXTS, **common)
    rows = bench.compare([plain, ordered, pipe])
    assert [r["agreement"] for r in rows] == [1.0, 1.0, 1.0]
    assert [r["rows"] for r in rows] == [6, 6, 6] and [r["batches"] for r in rows] == [3, 3, 3]
    # the same rows in input order pad the same way whichever loop runs them; sorting pads less
    assert rows[0]["padded_prompt_tokens"] == rows[2]["padded_prompt_tokens"] > rows[1]["padded_prompt_tokens"]
    assert rows[0]["prompt_tokens"] == rows[1]["prompt_tokens"] == rows[2]["prompt_tokens"]
    assert all(0 < r["generation_efficiency"] <= 1 and r["generated_tokens"] > 0 for r in rows)
