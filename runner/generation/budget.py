"""How many padded tokens one batch may hold, from free device memory and the model's shape.

Pure arithmetic; `runner.generation.model` reads the numbers off the loaded model and device.

    budget_tokens = floor(free_bytes * HEADROOM / bytes_per_token)
    bytes_per_token = kv_cache + activations
    kv_cache    = 2 (K and V) x layers x kv_heads x head_dim x cache dtype bytes
    activations = (4 x hidden + 2 x intermediate) x compute dtype bytes   (prefill, one layer live at a time)

A batch's tokens are `rows x samples x (longest prompt + max_new_tokens)`, the
positions the KV cache holds at the end of generation. `free_bytes` is measured
after the model is loaded: on a GPU what CUDA reports free, on the CPU the
available RAM times this worker's share of the node's cores.
"""

from __future__ import annotations

from dataclasses import dataclass

HEADROOM = 0.8  # of free memory: the rest covers logits, the allocator's slack and estimate error
MIN_BUDGET = 256


@dataclass(frozen=True)
class ModelShape:
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    dtype_bytes: int  # of the KV cache and of activations (the compute dtype)


def kv_bytes_per_token(shape: ModelShape) -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * shape.dtype_bytes


def activation_bytes_per_token(shape: ModelShape) -> int:
    return (4 * shape.hidden + 2 * shape.intermediate) * shape.dtype_bytes


def token_budget(free_bytes: int, shape: ModelShape) -> int:
    """Padded tokens one batch may hold; never below MIN_BUDGET (the out-of-memory backoff is the safety net)."""
    per_token = kv_bytes_per_token(shape) + activation_bytes_per_token(shape)
    return max(MIN_BUDGET, int(free_bytes * HEADROOM) // per_token)


def spread_token_budget(free_bytes: list[int], layers: list[int], shape: ModelShape) -> int:
    """The budget of a worker whose model is spread over several GPUs (`cluster.gpus_per_worker`).

    GPU i holds `layers[i]` decoder layers and so that share of every token's KV cache, and runs
    a prefill's activations for its layers in turn: its tokens are
    `free_i x HEADROOM / (kv per layer x layers[i] + activations)`. The worker's budget is the
    smallest over its GPUs (every token is cached on all of them).
    """
    if len(free_bytes) != len(layers):
        raise ValueError(f"free memory for {len(free_bytes)} GPU(s), layers for {len(layers)}")
    kv_per_layer = kv_bytes_per_token(shape) // shape.layers
    fits = [
        int(free * HEADROOM) // (kv_per_layer * n + activation_bytes_per_token(shape))
        for free, n in zip(free_bytes, layers)
        if n
    ]
    return max(MIN_BUDGET, min(fits, default=MIN_BUDGET))


def describe(free_bytes: int, shape: ModelShape) -> str:
    per_token = kv_bytes_per_token(shape) + activation_bytes_per_token(shape)
    return (
        f"{token_budget(free_bytes, shape)} tokens per batch "
        f"({free_bytes / 2**30:.1f} GiB free x {HEADROOM} / {per_token} bytes per token: "
        f"KV cache {kv_bytes_per_token(shape)} + activations {activation_bytes_per_token(shape)})"
    )
