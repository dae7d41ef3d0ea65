"""Greedy output of the engine equals generating each prompt alone.

The engine (`runner.generation.engine`) runs rows of very different lengths together: they are read in
groups of similar length, their KV caches joined left-padded, rows that end leave the running
set and waiting rows join it at later steps. The embedded SmolLM2-135M-Instruct; 10-16 prompts
from the shared T0 mix, spread from the shortest to about 400 tokens, at most 6 running at
once, so rows join and leave at many different steps and most carry left padding.

With the attention mask and mask-derived position ids, padded positions contribute nothing,
but a batch of another shape runs other matrix kernels, whose float sums may round
differently in the last bits. Where the two best next tokens are that close, the batched and
the alone run may pick different ones, and from there the texts differ: users would see it,
but it is not a bug. A bug (a pad token attended to, a position shifted) moves logits by
whole units.

So every completion must equal the alone run's, or differ first at a near-tie: at the
first differing token, the alone run's logits of its own choice and of the batched
run's choice are within MARGIN. Measured on a 2-core x86 machine (AVX-512, bitsandbytes
0.50 without its optional `kernels` package): the next-token logits of a prompt alone and
of the same prompt in a left-padded batch of 7 are identical in float32, and differ by up
to 0.25 (max over the vocabulary) in NF4, whose CPU kernels change with the batch shape
and the machine. A gap between two candidates can move by twice that, hence 0.5; a
padding or position bug moves logits by several units.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.generation.test_worker import make_generator

# float32's rows end (EOS) at steps spread enough for rows to join a running set with 10; in 4-bit,
# whose answers differ, it takes 16
PROMPTS = {"none": 10, "nf4": 16}
MAX_PROMPT_TOKENS = 400
MAX_NEW_TOKENS = 12
MARGIN = {"none": 1e-3, "nf4": 0.5}


def pick_prompts(tok, t0_rows, count: int) -> tuple[list[int], list[list[int]]]:
    texts = [
        tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True)
        for r in t0_rows[:400]
    ]
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    fitting = sorted((i for i in range(len(ids)) if len(ids[i]) <= MAX_PROMPT_TOKENS), key=lambda i: len(ids[i]))
    chosen = [fitting[int(k)] for k in np.linspace(0, len(fitting) - 1, count)]
    return chosen, [ids[i] for i in chosen]


def next_token_logits(gen, tokens: list[int]):
    import torch

    with torch.inference_mode():
        return gen.model(input_ids=torch.tensor([tokens], device=gen.device)).logits[0, -1].float()


def first_difference(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_batched_greedy_equals_one_prompt_at_a_time(embedded_model_dir, t0_rows, tmp_path, quantization):
    gen = make_generator(
        embedded_model_dir, tmp_path, quantization=quantization, chat_template="auto", max_new_tokens=MAX_NEW_TOKENS
    )
    count = PROMPTS[quantization]
    chosen, prompts = pick_prompts(gen.tokenizer, t0_rows, count)
    lengths = [len(p) for p in prompts]
    assert max(lengths) > 10 * min(lengths)  # very different lengths, so padding is real

    from runner.generation.engine import Row

    rows = [Row(r, str(chosen[r]), prompts[r]) for r in np.argsort(lengths, kind="stable")]  # plan order
    gen.limits.max_sequences = 6
    together = gen.engine.generate_all(rows)
    batched = {f.key: f.result for f in together}
    assert gen.engine.joins > 0  # rows joined a running set that was decoding
    assert len({f.padded_length for f in together}) > 2  # prompts read in groups of similar length
    alone = {r: gen.engine.generate_all([Row(r, str(chosen[r]), prompts[r])])[0].result for r in range(count)}

    equal, not_near_ties = 0, []
    for r in range(count):
        a, b = alone[r].tokens, batched[r].tokens
        if a == b:
            assert (alone[r].completion, alone[r].finish_reason) == (batched[r].completion, batched[r].finish_reason)
            equal += 1
            continue
        k = first_difference(a, b)
        assert k < min(len(a), len(b)), f"row {r}: one run stopped early where the other went on"
        logits = next_token_logits(gen, prompts[r] + a[:k])
        gap = float(logits[a[k]] - logits[b[k]])
        if gap > MARGIN[quantization]:
            not_near_ties.append((lengths[r], k, gap, alone[r].completion, batched[r].completion))
    assert not_near_ties == []
    assert equal >= count - 2  # a near-tie is rare; many would mean the margin hides something
