"""Sort rows by token length, cut token-budget batches, group them into shards.

Pure functions over plain data: no tokenizer, no Ray, no torch. The same
lengths and settings always give the same plan and the same fingerprint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Batch:
    """Rows generated together; `rows` index the input, longest prompt first."""

    batch_id: int
    rows: tuple[int, ...]
    padded_length: int  # the longest prompt in the batch: every row is left-padded to it


@dataclass(frozen=True)
class Shard:
    """A unit of work for one actor and one output file."""

    shard_id: int
    batches: tuple[Batch, ...]

    @property
    def rows(self) -> list[int]:
        return [r for b in self.batches for r in b.rows]

    @property
    def num_rows(self) -> int:
        return sum(len(b.rows) for b in self.batches)


@dataclass(frozen=True)
class Plan:
    shards: tuple[Shard, ...]
    fingerprint: str
    max_new_tokens: int
    num_return_sequences: int

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)

    @property
    def num_batches(self) -> int:
        return sum(len(s.batches) for s in self.shards)


def batch_cost(num_rows: int, padded_length: int, max_new_tokens: int, num_return_sequences: int) -> int:
    """Padded tokens a batch holds at its end: every sequence has prompt + max_new_tokens positions."""
    return num_rows * num_return_sequences * (padded_length + max_new_tokens)


def sort_by_length(lengths: Sequence[int]) -> list[int]:
    """Row indices, longest prompt first; ties keep input order (so the plan is deterministic)."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def cut_batches(
    lengths: Sequence[int],
    order: Sequence[int],
    max_new_tokens: int,
    num_return_sequences: int,
    max_batch_tokens: int,
    max_batch_size: int,
) -> list[Batch]:
    """Cut rows, taken in `order` (longest first), into batches that fit the token budget.

    A row too long for the budget on its own still gets a batch of its own.
    """
    batches: list[Batch] = []
    current: list[int] = []
    for row in order:
        if current:
            padded = lengths[current[0]]
            grown = batch_cost(len(current) + 1, padded, max_new_tokens, num_return_sequences)
            if len(current) >= max_batch_size or grown > max_batch_tokens:
                batches.append(Batch(len(batches), tuple(current), padded))
                current = []
        current.append(row)
    if current:
        batches.append(Batch(len(batches), tuple(current), lengths[current[0]]))
    return batches


def group_shards(batches: Sequence[Batch], shard_size: int) -> list[Shard]:
    """Group consecutive batches into shards of about `shard_size` rows (whole batches only)."""
    shards: list[Shard] = []
    current: list[Batch] = []
    rows = 0
    for batch in batches:
        current.append(batch)
        rows += len(batch.rows)
        if rows >= shard_size:
            shards.append(Shard(len(shards), tuple(current)))
            current, rows = [], 0
    if current:
        shards.append(Shard(len(shards), tuple(current)))
    return shards


def plan_shards(
    ids: Sequence[str],
    lengths: Sequence[int],
    max_new_tokens: int,
    num_return_sequences: int,
    max_batch_tokens: int,
    max_batch_size: int,
    shard_size: int,
) -> Plan:
    """The whole plan: sort, cut batches, group shards, fingerprint."""
    if len(ids) != len(lengths):
        raise ValueError(f"{len(ids)} ids but {len(lengths)} lengths")
    order = sort_by_length(lengths)
    batches = cut_batches(lengths, order, max_new_tokens, num_return_sequences, max_batch_tokens, max_batch_size)
    shards = group_shards(batches, shard_size)
    digest = hashlib.sha256()
    digest.update(f"{max_new_tokens}:{num_return_sequences}:{max_batch_tokens}:{max_batch_size}:{shard_size}".encode())
    for shard in shards:
        for batch in shard.batches:
            digest.update(f"|{shard.shard_id}/{batch.batch_id}:".encode())
            digest.update(",".join(f"{ids[r]}={lengths[r]}" for r in batch.rows).encode())
    return Plan(tuple(shards), digest.hexdigest()[:16], max_new_tokens, num_return_sequences)


def shard_cost(shard: Shard, plan: Plan) -> int:
    return sum(
        batch_cost(len(b.rows), b.padded_length, plan.max_new_tokens, plan.num_return_sequences) for b in shard.batches
    )


def schedule_order(plan: Plan) -> list[Shard]:
    """Shards largest first, so the long tail is not left to the end of the run."""
    return sorted(plan.shards, key=lambda s: (-shard_cost(s, plan), s.shard_id))


def padding_efficiency(plan: Plan, lengths: Sequence[int]) -> float:
    """Real prompt tokens / padded prompt tokens over the whole plan (1.0 = no padding)."""
    real = sum(lengths[r] for s in plan.shards for b in s.batches for r in b.rows)
    padded = sum(len(b.rows) * b.padded_length for s in plan.shards for b in s.batches)
    return real / padded if padded else 1.0
