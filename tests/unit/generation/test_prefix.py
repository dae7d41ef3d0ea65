"""Shared prompt prefixes read once: the rows come out as if each were read whole."""

from __future__ import annotations

import pytest

from runner.generation import prefix
from runner.generation.engine import Engine, Row
from runner.generation.limits import Limits
from runner.generation.sampling import Decoding


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from runner.config import ModelConfig
    from runner.generation import model as model_lib
    from runner.input import load_tokenizer

    config = ModelConfig(name_or_path=tiny_llama_dir, quantization="none")
    return model_lib.load_model(tiny_llama_dir, config, "cpu"), load_tokenizer(tiny_llama_dir, config)


def make(tiny, share: bool, max_sequences: int = 64, **decoding) -> Engine:
    model, tokenizer = tiny
    settings = {"max_new_tokens": 8, "eos_ids": frozenset(), "pad_id": tokenizer.pad_token_id, **decoding}
    limits = Limits(max_sequences=max_sequences, step_cost_tokens=0)
    return Engine(model, tokenizer, Decoding(**settings), limits, share_prefix=share)


def few_shot_rows(tokenizer, n: int = 9) -> list[Row]:
    """The same 70-token block of examples before each row's own question (1 to 20 tokens)."""
    block = tokenizer.encode("Q: what is the river called? A: the Thames. " * 8)[:70]
    words = "why do the boats come back at night to the old harbour near the city walls".split()
    return [Row(i, f"row-{i}", block + tokenizer.encode(" ".join(words[: 1 + (i * 5) % 14]))) for i in range(n)]


def test_the_shared_length_leaves_every_prompt_a_token_of_its_own():
    assert prefix.shared_length([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert prefix.shared_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter keeps its last token
    assert prefix.shared_length([[1, 2, 3]]) == 0 and prefix.shared_length([[7, 1], [8, 1]]) == 0


def test_the_kept_prefix_is_reused_while_rows_start_with_it():
    block = list(range(100, 140))  # 40 tokens
    rows = [block + [1, 2], block + [3]]
    assert prefix.choose(rows, None) == (40, False)
    assert prefix.choose(rows, tuple(block)) == (40, True)
    assert prefix.choose([block + [5]], tuple(block)) == (40, True)  # one row alone still shares the kept one
    assert prefix.choose([block[:20] + [1], block[:20] + [2]], None) == (0, False)  # under SHARE_MIN
    longer = [block + list(range(200, 240)) + [k] for k in (1, 2)]
    assert prefix.choose(longer, tuple(block)) == (80, False)  # SHARE_MIN more in common: the longer one


@pytest.mark.parametrize(
    "settings",
    [{}, {"do_sample": True, "samples": 2, "seed": 3, "repetition_penalty": 1.3}],
    ids=["greedy", "sampled-penalized"],
)
def test_rows_after_a_shared_block_equal_the_same_rows_read_whole(tiny, settings):
    """fp32: exact. Read in three admissions (room for 4 sequences), the block is read once."""
    model, tokenizer = tiny
    rows = few_shot_rows(tokenizer)
    whole = make(tiny, share=False, max_sequences=4, **settings)
    shared = make(tiny, share=True, max_sequences=4, **settings)
    reads = []
    original = prefix.SharedPrefix.__init__

    def counted(self, model_, tokens):
        reads.append(len(tokens))
        original(self, model_, tokens)

    prefix.SharedPrefix.__init__ = counted
    try:
        expected = whole.generate_all(rows)
        out = shared.generate_all(rows)
    finally:
        prefix.SharedPrefix.__init__ = original
    assert [(f.key, f.sample_index, f.result.tokens) for f in out] == [
        (f.key, f.sample_index, f.result.tokens) for f in expected
    ]
    assert reads == [70]  # once, for every admission
    assert shared.prompt_positions < whole.prompt_positions
    unshared = 70 + sum(len(r.input_ids) - 70 for r in rows)
    assert shared.prompt_positions <= 1.6 * unshared  # own parts are padded to their group's longest


def test_greedy_rows_after_a_shared_block_equal_transformers_generate_alone(tiny):
    import torch

    model, tokenizer = tiny
    rows = few_shot_rows(tokenizer, 5)
    out = make(tiny, share=True).generate_all(rows)
    for row, f in zip(rows, out):
        with torch.inference_mode():
            alone = model.generate(
                input_ids=torch.tensor([row.input_ids]),
                attention_mask=torch.ones(1, len(row.input_ids), dtype=torch.long),
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=None,
            )[0, len(row.input_ids) :].tolist()
        assert f.result.tokens == alone


def test_share_prefix_off_reads_every_row_whole(tiny):
    model, tokenizer = tiny
    rows = few_shot_rows(tokenizer, 4)
    engine = make(tiny, share=False)
    engine.generate_all(rows)
    assert engine._prefix is None
    assert engine.prompt_positions == sum(len(r.input_ids) for r in rows)  # each whole (a group per length)
