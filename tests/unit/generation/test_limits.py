"""Limits learned from out-of-memory errors: halved below what failed, grown back after clean steps."""

from __future__ import annotations

from runner.generation import limits as limits_lib
from runner.generation.limits import Learned, Limits


def test_a_learned_limit_halves_then_grows_back_but_never_to_the_size_that_failed(monkeypatch):
    monkeypatch.setattr(limits_lib, "GROW_BACK_STEPS", 3)
    learned = Learned()
    learned.failed_at(1000)
    assert (learned.value, learned.failed) == (500, 1000)
    seen = []
    for _ in range(40):
        learned.clean_step()
        seen.append(learned.value)
    assert seen[:3] == [500, 500, 750]  # three clean steps, then half-way back
    assert seen == sorted(seen) and max(seen) == 999  # never the size that failed
    learned.failed_at(900)  # a smaller size fails: that is the ceiling now
    assert (learned.value, learned.failed) == (450, 900)
    learned.failed_at(2000)  # a larger one does not raise the limit
    assert (learned.value, learned.failed) == (450, 900)


def test_the_cache_and_the_prefill_limits_are_learned_apart():
    limits = Limits(max_sequences=8, max_tokens=10_000)
    limits.prefill.failed_at(4000)
    assert limits.tokens() == 10_000 and limits.prefill.value == 2000
    limits.cache.failed_at(6000)
    assert limits.tokens() == 3000 and limits.prefill.value == 2000
