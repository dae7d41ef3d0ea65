"""Rows with settings of their own decode together, each as it would in a job of its settings alone."""

from __future__ import annotations

import dataclasses

from runner.generation.row_settings import RowDecodings
from runner.generation.sampling import Decoding, warp_rows
from tests.unit.generation.test_engine import engine, rows_of, tiny  # noqa: F401 (tiny: the fixture)


def test_warping_rows_at_once_equals_transformers_warpers_row_by_row():
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(7, 300) * 4
    scores[2, 10:20] = scores[2, 9]  # ties at the top-k and top-p boundaries
    temperature = [1.0, 0.7, 1.3, 1.0, 0.2, 2.0, 1.0]
    top_k = [0, 50, 12, 1, 0, 400, 299]
    top_p = [1.0, 0.9, 1.0, 0.5, 0.95, 0.3, 1.0]
    together = warp_rows(scores, temperature, top_k, top_p)
    for i in range(len(scores)):
        row = scores[i : i + 1]
        if temperature[i] != 1.0:
            row = TemperatureLogitsWarper(temperature[i])(None, row)
        if top_k[i]:
            row = TopKLogitsWarper(top_k[i])(None, row)
        if top_p[i] != 1.0:
            row = TopPLogitsWarper(top_p[i])(None, row)
        assert torch.equal(together[i : i + 1], row), f"row {i}"


def decodings(job: Decoding) -> RowDecodings:
    sampled = job if job.do_sample else dataclasses.replace(job, do_sample=True, temperature=1.0, top_k=50, top_p=1.0)
    return RowDecodings(job, sampled)


def test_row_settings_become_decodings_and_the_jobs_own_when_equal():
    job = Decoding(max_new_tokens=16, eos_ids=frozenset({2}), pad_id=0)
    made = decodings(job)
    assert made.of({}) is None and made.of({"temperature": None}) is None
    assert made.of({"max_new_tokens": 16}) is job  # the job's settings: decoded as the job's rows
    hot = made.of({"temperature": 0.8, "top_k": 5, "seed": 3})
    assert (hot.do_sample, hot.temperature, hot.top_k, hot.top_p, hot.seed) == (True, 0.8, 5, 1.0, 3)
    assert made.of({"temperature": 0.8, "top_k": 5, "seed": 3}) is hot  # one per distinct setting
    sampled_job = dataclasses.replace(job, do_sample=True, temperature=0.9, top_k=40, top_p=0.9, samples=4)
    cold = decodings(sampled_job).of({"temperature": 0, "top_p": 0.5, "num_return_sequences": 1})
    assert (cold.do_sample, cold.temperature, cold.top_p, cold.samples) == (False, None, None, 1)
    short = made.of({"max_new_tokens": 4, "stop_strings": ["\n"]})
    assert (short.max_new_tokens, short.stop_strings) == (4, ("\n",))


def test_rows_with_their_own_settings_decode_together_as_each_alone_in_a_job_of_its_settings(tiny):  # noqa: F811
    """fp32, exact: greedy and sampled rows, other temperatures, top-k/top-p, seeds, lengths, stop
    strings and sample counts, all in one running set, each equal to a job whose settings are that row's."""
    model, tokenizer = tiny
    job = engine(tiny, max_new_tokens=10)
    text = tokenizer.decode(job.generate_all(rows_of(tokenizer, [9]))[0].result.tokens[2:4])
    own = [
        {},
        {"temperature": 0.7, "seed": 5, "num_return_sequences": 3},
        {"temperature": 1.2, "top_k": 20, "top_p": 0.8},
        {"max_new_tokens": 3},
        {"stop_strings": [text]},
        {"temperature": 0.0},
        {"temperature": 0.9, "top_p": 0.5, "seed": 11, "max_new_tokens": 6, "num_return_sequences": 2},
        {"seed": 9},
    ]
    made = decodings(job.decoding)
    rows = rows_of(tokenizer, [9, 30, 14, 22, 9, 5, 40, 17])
    for row, values in zip(rows, own):
        row.decoding = made.of(values)
    together = {
        (f.key, f.sample_index): f.result for f in engine(tiny, max_sequences=5, max_new_tokens=10).generate_all(rows)
    }
    assert len(together) == sum(v.get("num_return_sequences", 1) for v in own)
    for row, values in zip(rows, own):
        d = row.decoding or job.decoding
        fields = {k: getattr(d, k) for k in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p")}
        fields.update(seed=d.seed, stop_strings=d.stop_strings, samples=d.samples)
        alone = engine(tiny, **fields).generate_all([dataclasses.replace(row, decoding=None)])
        for f in alone:
            assert together[(row.key, f.sample_index)] == f.result, (values, f.sample_index)
    assert together[(4, 0)].finish_reason == "stop" and together[(3, 0)].completion_tokens == 3
