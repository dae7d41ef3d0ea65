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
    fingerprint: str = ""  # its rows' content, order and batching, and the settings: names its file

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
    max_batch_tokens: int | None,
    max_batch_size: int,
    batch_overhead: int | None = None,
    samples: Sequence[int] | None = None,
) -> list[Batch]:
    """Cut rows, taken in `order` (longest first), into the cheapest consecutive batches that fit the limits.

    A batch costs its padded tokens (rows x its longest prompt) plus `batch_overhead`;
    the cut minimising the sum is found exactly, by dynamic programming over the sorted
    rows. `batch_overhead=None` means "a batch costs more than any padding": the fewest
    batches, and among those the least padding.

    Every batch holds at most `max_batch_size` rows and, when `max_batch_tokens` is set,
    at most that many padded tokens (`batch_cost`); a row too long for the budget on
    its own still gets a batch of its own. `samples`: each row's own number of sequences (rows with
    settings of their own), where the budget counts them instead of `num_return_sequences` per row.
    """
    import numpy as np

    n = len(order)
    if n == 0:
        return []
    width = np.array([lengths[r] for r in order], dtype=np.int64)  # non-increasing
    seqs = np.zeros(n + 1, dtype=np.int64)  # seqs[j] - seqs[i]: the sequences of the rows i..j-1 (in order)
    seqs[1:] = np.cumsum([samples[r] if samples is not None else num_return_sequences for r in order])
    per_batch = int(width.sum()) * max_batch_size + 1 if batch_overhead is None else batch_overhead
    never = np.iinfo(np.int64).max // 4
    best = np.zeros(n + 1, dtype=np.int64)  # best[i]: cheapest cut of the rows from i on
    end = np.zeros(n + 1, dtype=np.int64)  # where the batch starting at row i ends
    for i in range(n - 1, -1, -1):
        stop = np.arange(i + 1, min(n, i + max_batch_size) + 1)  # candidate ends of the batch opening at row i
        rows = stop - i
        cost = rows * width[i] + per_batch + best[stop]
        if max_batch_tokens is not None:
            held = (seqs[stop] - seqs[i]) * (width[i] + max_new_tokens)
            fits = held <= max_batch_tokens
            fits[0] = True  # a single row always gets a batch
            cost = np.where(fits, cost, never)
        k = len(stop) - 1 - int(np.argmin(cost[::-1]))  # ties: the longest batch, so early batches fill up
        best[i], end[i] = min(cost[k], never), stop[k]
    bounds = []
    i = 0
    while i < n:
        bounds.append((i, int(end[i])))
        i = int(end[i])
    return [Batch(b, tuple(order[i:j]), int(width[i])) for b, (i, j) in enumerate(bounds)]


def group_shards(batches: Sequence[Batch], shard_size: int) -> list[Shard]:
    """Group consecutive batches into shards of at most `shard_size` rows (whole batches only).

    A shard never exceeds the size asked for, so the work a worker takes at once (and the
    wait for the first committed file) stays bounded.
    """
    shards: list[Shard] = []
    current: list[Batch] = []
    rows = 0
    for batch in batches:
        if current and rows + len(batch.rows) > shard_size:
            shards.append(Shard(len(shards), tuple(current)))
            current, rows = [], 0
        current.append(batch)
        rows += len(batch.rows)
    if current:
        shards.append(Shard(len(shards), tuple(current)))
    return shards


def plan_shards(
    keys: Sequence[object],
    lengths: Sequence[int],
    max_new_tokens: int,
    num_return_sequences: int,
    max_batch_tokens: int | None,
    max_batch_size: int,
    shard_size: int,
    first_shard_id: int = 0,
    first_batch_id: int = 0,
    salt: str = "",
    groups: Sequence[int] | None = None,
    samples: Sequence[int] | None = None,
) -> Plan:
    """The whole plan of a set of rows (a job's input, or one window of it): sort, cut batches, group shards.

    A batch never holds more rows than a shard (`shard_size`): a shard is the unit of
    work a worker takes, so a small shard size spreads even a small job over every worker.

    Args:
        keys: each row's content key (ids, or hashes of the rows' content): the shards'
            fingerprints cover them, so other rows give other fingerprints.
        first_shard_id, first_batch_id: numbering continues from earlier windows.
        salt: mixed into every fingerprint (the job's config hash).
        groups: each row's group (its adapter): rows of one group are planned apart from the others, so no
            batch or shard holds two groups. None: one group.
        samples: each row's own number of sequences, where rows have their own (the token budget counts
            them); None: `num_return_sequences` each.
    """
    if len(keys) != len(lengths):
        raise ValueError(f"{len(keys)} keys but {len(lengths)} lengths")
    order = sort_by_length(lengths)
    parts = [order] if groups is None else [[r for r in order if groups[r] == g] for g in sorted(set(groups))]
    rows_per_batch = min(max_batch_size, shard_size)
    batches: list[Batch] = []
    grouped: list[Shard] = []
    for part in parts:
        cut = cut_batches(
            lengths, part, max_new_tokens, num_return_sequences, max_batch_tokens, rows_per_batch, samples=samples
        )
        cut = [Batch(first_batch_id + len(batches) + b.batch_id, b.rows, b.padded_length) for b in cut]
        batches += cut
        grouped += group_shards(cut, shard_size)
    settings = ":".join(map(str, (salt, max_new_tokens, num_return_sequences, max_batch_tokens, max_batch_size)))
    whole = hashlib.sha256(f"{settings}:{shard_size}".encode())
    shards = []
    for number, shard in enumerate(grouped):
        first_batch = shard.batches[0].batch_id  # batch ids are columns of the file: a part of what it holds
        digest = hashlib.sha256(f"{settings}|{first_shard_id + number}|{first_batch}".encode())
        for batch in shard.batches:
            digest.update(b"|")
            digest.update(",".join(f"{keys[r]}={lengths[r]}" for r in batch.rows).encode())
        shards.append(Shard(first_shard_id + number, shard.batches, digest.hexdigest()[:16]))
        whole.update(shards[-1].fingerprint.encode())
    return Plan(tuple(shards), whole.hexdigest()[:16], max_new_tokens, num_return_sequences)


def shard_cost(shard: Shard, plan: Plan) -> int:
    return sum(
        batch_cost(len(b.rows), b.padded_length, plan.max_new_tokens, plan.num_return_sequences) for b in shard.batches
    )


def schedule_order(plan: Plan) -> list[Shard]:
    """Shards largest first, so the long tail is not left to the end of the run."""
    return sorted(plan.shards, key=lambda s: (-shard_cost(s, plan), s.shard_id))


def prompt_tokens_read(plan: Plan, lengths: Sequence[int], step_cost_tokens: int | None = None) -> tuple[int, int]:
    """(real, padded) prompt tokens over the whole plan.

    With `step_cost_tokens`, each batch's prompts count as read in their prefill groups
    (what the worker does); without, as one piece padded to the batch's longest prompt.
    """
    real = padded = 0
    for shard in plan.shards:
        for b in shard.batches:
            widths = [lengths[r] for r in b.rows]
            real += sum(widths)
            if step_cost_tokens is None:
                padded += len(widths) * b.padded_length
            else:
                groups = prefill_groups(widths, step_cost_tokens)
                padded += sum(len(g) * max(widths[r] for r in g) for g in groups)
    return real, padded


def padding_efficiency(plan: Plan, lengths: Sequence[int], step_cost_tokens: int | None = None) -> float:
    """Real prompt tokens / padded prompt tokens over the whole plan (1.0 = no padding); see `prompt_tokens_read`."""
    real, padded = prompt_tokens_read(plan, lengths, step_cost_tokens)
    return real / padded if padded else 1.0


def prefill_groups(lengths: Sequence[int], step_cost_tokens: int) -> list[list[int]]:
    """Split one batch into prefill groups: positions of rows run through one forward pass together.

    The batch decodes as one, but its prompts are read in groups of similar length, each
    padded only to its own longest prompt. A group costs its padded tokens plus
    `step_cost_tokens` (what one more forward pass costs, in prompt tokens); the cheapest
    split is found exactly (`cut_batches`).
    """
    widest = max(lengths, default=0)
    if sum(widest - n for n in lengths) < step_cost_tokens:
        # Any split costs at least one more pass and saves less padding than that: one group.
        return [sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))]
    order = sort_by_length(lengths)
    groups = cut_batches(lengths, order, 1, 1, None, max(1, len(lengths)), step_cost_tokens)
    return [list(g.rows) for g in groups]
