"""Every family of KV cache keeps continuous batching: tiny random models built from configs (no download).

Each family's greedy fp32 rows through the engine (three slots, rows ending at different steps and
joining a set that is decoding) equal `model.generate` on each prompt alone. Prompts and completions
run well past the sliding windows, so a window applied to the wrong columns changes the tokens.
"""

from __future__ import annotations

import logging

import pytest

from runner.generation import engine as engine_lib
from runner.generation import kvcache
from runner.generation.engine import Engine, Limits, Row
from runner.generation.sampling import Decoding

WINDOW = 8
COMMON = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
FAMILIES = {  # model_type, its own settings, the layers its cache should hold
    "llama": ("llama", {}, "GrowingLayer x 4"),
    "mistral-sliding-window": ("mistral", {"sliding_window": WINDOW}, "SlidingLayer x 4"),
    "qwen2": ("qwen2", {}, "GrowingLayer x 4"),
    "qwen2-sliding-layers": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},
        "GrowingLayer x 2, SlidingLayer x 2",
    ),
    "qwen3": ("qwen3", {"head_dim": 16}, "GrowingLayer x 4"),
    "gemma2": ("gemma2", {"sliding_window": WINDOW, "head_dim": 16}, "SlidingLayer x 2, GrowingLayer x 2"),
    "gemma3-text": (
        "gemma3_text",
        {"sliding_window": WINDOW, "head_dim": 16, "sliding_window_pattern": 2},
        "SlidingLayer x 2, GrowingLayer x 2",
    ),
    "phi3": ("phi3", {"sliding_window": WINDOW}, "SlidingLayer x 4"),
    "mixtral-moe": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, "GrowingLayer x 4"),
    "qwen2-moe": (
        "qwen2_moe",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 8},
        "GrowingLayer x 4",
    ),
}
LENGTHS = [3, 40, 7, 25, 12, 60, 5, 33]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def build(tokenizer, family: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, settings, _ = FAMILIES[family]
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **COMMON, **settings
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def rows_of(tokenizer) -> list[Row]:
    ids = tokenizer.encode("the history of the city and its river told in many small parts " * 20)
    return [Row(i, f"row-{i}", ids[:n]) for i, n in enumerate(LENGTHS)]


def decoding(tokenizer, eos=()) -> Decoding:
    return Decoding(max_new_tokens=NEW_TOKENS, eos_ids=frozenset(eos), pad_id=tokenizer.pad_token_id)


def alone(model, row: Row, eos: set[int]) -> list[int]:
    """`model.generate` on one prompt, greedy, cut at its first EOS as the engine cuts its tokens."""
    import torch

    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([row.input_ids]),
            attention_mask=torch.ones(1, len(row.input_ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )[0, len(row.input_ids) :].tolist()
    ends = [i for i, t in enumerate(out) if t in eos]
    return out[: ends[0] + 1] if ends else out


def ending_tokens(model, tokenizer, rows: list[Row]) -> set[int]:
    """Three tokens the model generates often: as EOS, they end rows at different steps."""
    probe = Engine(model, tokenizer, decoding(tokenizer), Limits(max_sequences=8)).generate_all(rows)
    generated = [t for f in probe for t in f.result.tokens[2:]]
    return set(sorted(set(generated), key=lambda t: (-generated.count(t), t))[:3])


def check_as_alone(model, tokenizer, engine: Engine, rows: list[Row], eos: set[int]) -> list:
    together = engine.generate_all(rows)
    for row, f in zip(rows, together):
        assert f.result.tokens == alone(model, row, eos), f"row {row.row_id} differs from generate alone"
    return together


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_cache_family_joins_and_cuts_and_decodes_as_each_row_alone(tokenizer, family):
    model = build(tokenizer, family)
    assert kvcache.layer_kinds(kvcache.new_cache(model)) == FAMILIES[family][2]
    rows = rows_of(tokenizer)
    eos = ending_tokens(model, tokenizer, rows)
    engine = Engine(model, tokenizer, decoding(tokenizer, eos), Limits(max_sequences=3, step_cost_tokens=0))
    assert engine._joinable
    assert engine._share == ("Sliding" not in FAMILIES[family][2])  # holes between prefix and row: full attention only
    together = check_as_alone(model, tokenizer, engine, rows, eos)
    assert engine.joins > 0  # rows joined a running set mid-decode
    assert len({f.result.completion_tokens for f in together}) > 1  # rows really ended at different steps


@pytest.mark.parametrize("family", [f for f, (_, _, layers) in FAMILIES.items() if "Sliding" not in layers])
def test_rows_after_a_shared_prefix_decode_as_each_row_alone_in_every_full_attention_family(tokenizer, family):
    """The same 48-token block before every row, read once (and kept across admissions)."""
    model = build(tokenizer, family)
    block = tokenizer.encode("the history of the city and its river told in many small parts " * 6)[:48]
    words = "why do the boats come back at night to the old harbour".split()
    rows = [Row(i, f"row-{i}", block + tokenizer.encode(" ".join(words[: 1 + i]))) for i in range(7)]
    engine = Engine(model, tokenizer, decoding(tokenizer), Limits(max_sequences=3, step_cost_tokens=0))
    check_as_alone(model, tokenizer, engine, rows, set())
    assert engine._prefix is not None and len(engine._prefix) == 48


def test_a_cache_where_every_layer_slides_drops_the_columns_no_row_can_see(tokenizer, monkeypatch):
    """Mistral with a window of 8: the running set's cache stays within the window plus the cut's slack."""
    monkeypatch.setattr(engine_lib, "CUT_MIN", 4)
    model = build(tokenizer, "mistral-sliding-window")
    rows = rows_of(tokenizer)
    engine = Engine(model, tokenizer, decoding(tokenizer), Limits(max_sequences=3, step_cost_tokens=0))
    widths, step = [], engine._step

    def watched(waiting):
        widths.append(engine.mask.shape[1])
        yield from step(waiting)

    engine._step = watched
    check_as_alone(model, tokenizer, engine, rows, set())
    wide = [w for w in widths if w > WINDOW + 4]
    assert max(widths) == max(LENGTHS)  # the 60-token prompt was read whole...
    assert len(wide) <= -(-len(rows) // 3)  # ...and went after one step: one wide step per admission of 3 rows


def test_a_cache_that_cannot_join_says_so_and_still_decodes_each_row_as_alone(tokenizer, monkeypatch, caplog):
    """Without growing sliding layers (transformers' own DynamicSlidingWindowLayer): one group at a time."""
    monkeypatch.setattr(kvcache, "_GROWING", {"full_attention": kvcache.GrowingLayer})
    model = build(tokenizer, "mistral-sliding-window")
    rows = rows_of(tokenizer)
    with caplog.at_level(logging.WARNING, logger=engine_lib.__name__):
        engine = Engine(model, tokenizer, decoding(tokenizer), Limits(max_sequences=3, step_cost_tokens=0))
    assert not engine._joinable
    assert "DynamicSlidingWindowLayer x 4" in caplog.text and "cannot be joined" in caplog.text
    check_as_alone(model, tokenizer, engine, rows, set())
    assert engine.joins == 0


def test_a_cache_that_cannot_join_and_runs_out_while_reordered_reruns_its_rows(tokenizer, monkeypatch):
    """transformers reorders such a cache layer by layer: out of memory there and every row waits again."""
    import torch
    from transformers.cache_utils import DynamicCache

    monkeypatch.setattr(kvcache, "_GROWING", {"full_attention": kvcache.GrowingLayer})
    model = build(tokenizer, "mistral-sliding-window")
    rows = rows_of(tokenizer)
    eos = ending_tokens(model, tokenizer, rows)
    engine = Engine(model, tokenizer, decoding(tokenizer, eos), Limits(max_sequences=3, step_cost_tokens=0))
    reorder, failures = DynamicCache.reorder_cache, [1, 1]

    def tight(self, index):
        if failures and len(index) > 1:
            failures.pop()
            self.layers[0].keys = self.layers[0].keys[index]  # half-way: the first layer reordered
            raise torch.OutOfMemoryError("CUDA out of memory (injected: reordering)")
        return reorder(self, index)

    monkeypatch.setattr(DynamicCache, "reorder_cache", tight)
    check_as_alone(model, tokenizer, engine, rows, eos)
    assert not failures and engine.oom_events == 2
