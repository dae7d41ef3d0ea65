"""Shared prompt prefixes, read once: a system prompt, few-shot examples, a document before each question.

The engine finds the longest run of tokens that every row it admits starts with, from the token
ids themselves, reads it once as a single row, and prefills each row's own part against a copy
of that cache. A row's cache then holds [prefix][padding][its own part]: the padding between the
two is masked like left padding is, and positions are given explicitly, so every token sits at
the position it has when the prompt is read alone.

The last prefix read is kept (one row of cache) and reused while the rows admitted still start
with it, so a job whose rows all share one block reads it once per worker, not once per refill.

Not for caches with sliding-window layers (their window counts cache columns, padding between
included) nor caches that cannot join (`runner.generation.kvcache`): there every row is read whole.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

SHARE_MIN = 32  # fewer shared tokens are read with each row: one more forward would cost more than it saves


def shared_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least one token of its own (its logits)."""
    if len(prompts) < 2:
        return 0
    common = len(os.path.commonprefix([list(p) for p in prompts]))
    return max(0, min(common, min(len(p) for p in prompts) - 1))


def starts_all(prefix: Sequence[int], prompts: Sequence[Sequence[int]]) -> bool:
    """Whether every prompt starts with `prefix` and has a token of its own after it."""
    n, head = len(prefix), list(prefix)
    return all(len(p) > n and list(p[:n]) == head for p in prompts)


def choose(prompts: Sequence[Sequence[int]], kept: Sequence[int] | None) -> tuple[int, bool]:
    """How many leading tokens to read once for these prompts, and whether the kept prefix is them.

    The kept prefix is reused while every prompt starts with it, unless these prompts share at least
    SHARE_MIN tokens more; otherwise their own shared prefix is read, if it is at least SHARE_MIN long.
    """
    shared = shared_length(prompts)
    if kept is not None and starts_all(kept, prompts) and shared < len(kept) + SHARE_MIN:
        return len(kept), True
    return (shared, False) if shared >= SHARE_MIN else (0, False)


class SharedPrefix:
    """One prefix's KV cache, read once; `copies` gives each admitted group its own."""

    def __init__(self, model: Any, tokens: Sequence[int]):
        import torch

        from runner.generation import kvcache

        self.tokens = tuple(tokens)
        self.cache = kvcache.new_cache(model)
        ids = torch.tensor([self.tokens], device=model.device)
        model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            position_ids=torch.arange(len(self.tokens), device=model.device).unsqueeze(0),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )

    def __len__(self) -> int:
        return len(self.tokens)

    def copies(self, model: Any, rows: int, room: int) -> Any:
        """A cache of `rows` rows, each holding the prefix, with room for `room` more positions."""
        from runner.generation import kvcache

        return kvcache.broadcast(self.cache, kvcache.new_cache(model), rows, room)
