"""Greedy output from length-sorted, left-padded batches equals generating each prompt alone.

This holds too where a batch's prompts are read in groups of similar length whose KV
caches are then joined (`ShardGenerator.prefill`).

The embedded SmolLM2-135M-Instruct in 4-bit NF4 (the default path), float32
compute on the CPU. Tolerance: none. The prompts are 20 from the shared T0
mix, spread from the shortest to about 500 tokens, so every batch mixes
lengths and most rows carry left padding. With the attention mask and
mask-derived position ids, padded positions contribute exactly nothing, and
on this machine the results matched token for token. If a future kernel makes
fp32 reductions shape-dependent, near-ties could flip a token: the test would
then fail, and that is what it should do, since users would see different text.
"""

from __future__ import annotations

import numpy as np

from runner.plan import plan_shards
from tests.unit.test_worker import make_generator

PROMPTS = 20
MAX_PROMPT_TOKENS = 500
MAX_NEW_TOKENS = 12


def test_batched_greedy_equals_one_prompt_at_a_time(embedded_model_dir, t0_rows, tmp_path):
    gen = make_generator(
        embedded_model_dir, tmp_path, quantization="nf4", chat_template="auto", max_new_tokens=MAX_NEW_TOKENS
    )
    tok = gen.tokenizer
    texts = [
        tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True)
        for r in t0_rows[:400]
    ]
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    fitting = sorted((i for i in range(len(ids)) if len(ids[i]) <= MAX_PROMPT_TOKENS), key=lambda i: len(ids[i]))
    chosen = [fitting[int(k)] for k in np.linspace(0, len(fitting) - 1, PROMPTS)]
    prompts = [ids[i] for i in chosen]
    lengths = [len(p) for p in prompts]
    assert max(lengths) > 10 * min(lengths)  # very different lengths, so padding is real

    plan = plan_shards([str(i) for i in chosen], lengths, MAX_NEW_TOKENS, 1, 10**6, 7, 1000)
    batched, read_in_groups = {}, 0
    for batch in plan.shards[0].batches:
        assert len(set(lengths[r] for r in batch.rows)) > 1
        results, stats = gen.generate_batch([prompts[r] for r in batch.rows], batch.batch_id)
        batched.update({r: res for r, res in zip(batch.rows, results)})
        read_in_groups += len(set(stats.row_padded)) > 1
    assert read_in_groups  # some batches had their prompts read in groups, their KV caches joined
    alone = {r: gen.generate_batch([prompts[r]], 0)[0][0] for r in range(PROMPTS)}

    mismatched = [
        (lengths[r], alone[r].completion, batched[r].completion)
        for r in range(PROMPTS)
        if (alone[r].completion, alone[r].completion_tokens) != (batched[r].completion, batched[r].completion_tokens)
    ]
    assert mismatched == []
