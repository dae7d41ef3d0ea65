"""How much the engine's running set may hold, and what out-of-memory errors teach it.

Two limits are learned apart: how many KV-cache tokens the running set may hold (a decode step
that runs out of memory, or a prefill of one row beside a running set) and how many prompt
tokens one admission may read at once (a prefill of several rows that runs out: its activations).
Each is halved below the size that failed and grows back, half-way to that size at a time, after
GROW_BACK_STEPS clean decode steps; it never reaches the size that failed again. One spike
therefore costs minutes of a long job at a lower batch, not the rest of its life.

Pure logic: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GROW_BACK_STEPS = 256  # clean decode steps before a learned limit grows back half-way to what failed


@dataclass
class Learned:
    """A limit learned from out-of-memory errors (None: none met yet)."""

    value: int | None = None
    failed: int | None = None  # the smallest size that ran out of memory
    clean: int = 0  # clean steps since the last error or growth

    def failed_at(self, size: int) -> None:
        """`size` ran out of memory: stay at most half of it, and never grow back to it."""
        self.failed = size if self.failed is None else min(self.failed, size)
        self.value = max(1, min(self.value or size, size // 2))
        self.clean = 0

    def clean_step(self) -> None:
        """One step without an error; after GROW_BACK_STEPS of them, half-way back to (below) the size that failed."""
        if self.value is None or self.failed is None or self.value >= self.failed - 1:
            return
        self.clean += 1
        if self.clean >= GROW_BACK_STEPS:
            self.value = min(self.failed - 1, self.value + max(1, (self.failed - self.value) // 2))
            self.clean = 0


@dataclass
class Limits:
    """How much the running set may hold; `cache` and `prefill` are learned from out-of-memory errors."""

    max_sequences: int
    max_tokens: int | None = None  # KV-cache tokens (sequences x (widest prompt + max_new_tokens)), if bounded
    step_cost_tokens: int = 64  # padding a prefill group may add before it is cheaper to read two groups
    cache: Learned = field(default_factory=Learned)  # KV-cache tokens, as max_tokens counts them
    prefill: Learned = field(default_factory=Learned)  # prompt tokens one admission reads

    def tokens(self) -> int | None:
        """The KV-cache tokens the running set may hold, if bounded."""
        known = [x for x in (self.max_tokens, self.cache.value) if x is not None]
        return min(known) if known else None

    def clean_step(self) -> None:
        self.cache.clean_step()
        self.prefill.clean_step()
