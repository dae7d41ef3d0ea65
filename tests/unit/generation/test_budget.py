"""The token budget derived from free memory and the model's shape."""

from __future__ import annotations

from runner.generation.budget import (
    HEADROOM,
    MIN_BUDGET,
    ModelShape,
    activation_bytes_per_token,
    kv_bytes_per_token,
    token_budget,
)

# Llama-3.1-8B in bfloat16: 32 layers, 8 KV heads of 128, hidden 4096, MLP 14336.
LLAMA_8B = ModelShape(layers=32, kv_heads=8, head_dim=128, hidden=4096, intermediate=14336, dtype_bytes=2)


def test_kv_cache_bytes_per_token_match_the_published_figure():
    # 2 (K, V) x 32 layers x 8 heads x 128 x 2 bytes = 128 KiB per token, as usually quoted for Llama-3-8B
    assert kv_bytes_per_token(LLAMA_8B) == 128 * 1024
    assert activation_bytes_per_token(LLAMA_8B) == (4 * 4096 + 2 * 14336) * 2


def test_budget_is_free_memory_with_headroom_over_bytes_per_token():
    free = 60 * 2**30  # an 80 GB card with the 4-bit 8B model loaded
    per_token = kv_bytes_per_token(LLAMA_8B) + activation_bytes_per_token(LLAMA_8B)
    assert token_budget(free, LLAMA_8B) == int(free * HEADROOM) // per_token
    assert 200_000 < token_budget(free, LLAMA_8B) < 250_000
    assert token_budget(2 * free, LLAMA_8B) > token_budget(free, LLAMA_8B)


def test_budget_never_drops_below_the_floor():
    assert token_budget(0, LLAMA_8B) == MIN_BUDGET


def test_the_worker_reads_the_shape_and_derives_a_budget_when_none_is_set(tiny_llama_dir, tmp_path):
    from tests.unit.generation.test_worker import make_generator

    gen = make_generator(tiny_llama_dir, tmp_path)
    assert gen.setup.job.batching.max_batch_tokens is None
    assert gen.limits.tokens() == gen.memory_budget >= MIN_BUDGET  # what the engine's running set may hold
    assert "bytes per token" in gen.ready()["token_budget"]
    gen.setup.job.batching.max_batch_tokens = 4096  # an explicit budget bounds the running set instead
    gen.configure(gen.setup)
    assert gen.limits.tokens() == 4096
