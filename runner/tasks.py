"""The plain messages that cross a process boundary between the driver and the workers.

The driver plans `ShardTask`s and sends each worker one `WorkerSetup`; workers report
`BatchDone` as each planned batch's rows have ended, `ShardDone` once the shard's file is
committed, and the pool reports `ShardRetried` when a shard goes back on the queue.
They belong to neither side: no Ray, no torch, nothing but data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from runner.config import JobConfig


@dataclass
class WorkerSetup:
    """Everything a worker needs for a whole job; sent once, when the actor starts."""

    job: JobConfig
    model_path: str  # what from_pretrained loads (the embedded model already resolved)
    run_id: str
    config_hash: str
    carry_schema: pa.Schema
    file_metadata: dict[bytes, bytes]
    model_revision: str = ""  # resolved once by the driver: a Hub commit, or local:<hash of the folder>
    adapter: str | None = None  # model.adapter's name@hash of its weights, checked against the base by the driver
    adapters: dict[str, str] | None = None  # model.adapters: each name -> its name@hash, likewise

    @property
    def adapter_key(self) -> str | None:
        """What the adapters hold (not where they lie): retrained weights in the same folder get new workers."""
        return self.adapter or (json.dumps(self.adapters, sort_keys=True) if self.adapters else None)


@dataclass
class HeldRows:
    """A chunk's prepared rows in the object store (`ref`), and the preparer actor that made them (`holder`).

    The holder runs on the node whose object store has the rows: a worker on another node asks it for only
    the rows its shard takes (`runner.generation.fetch`) instead of copying the whole chunk to its node.
    """

    ref: Any
    holder: Any


@dataclass
class ShardTask:
    """One shard: which prepared rows, in generation order, cut into batches of positions [start, end).

    `parts` are tables of prepared rows (`runner.input.prepare`), Ray object refs to them, or `HeldRows`:
    the worker fetches them from the object store itself, so no token passes through the driver.
    """

    shard_id: int
    file_name: str
    fingerprint: str
    batches: list[tuple[int, int, int]]  # (batch_id, start, end)
    parts: list[Any]
    take: Any  # int64 array (rows, 2): (part, row within the part) per row, in generation order
    attempt: int = 1  # which try of this shard (the pool counts them)
    redo: dict[str, list[int]] | None = None  # row id -> sample indices to generate again (retry_errors)


@dataclass
class BatchDone:
    """A planned batch whose sequences have all ended (they end at different steps)."""

    worker: str
    shard_id: int
    batch_id: int
    rows: int  # new rows in the output (0 when its rows are generated again over error rows)
    sequences: int
    prompt_tokens: int
    padded_prompt_tokens: int
    completion_tokens: int
    generated_steps: int  # tokens the engine computed for its sequences (generation-side cost)
    padded_length: int
    latency_s: float  # the worker's time since its previous event: these sum to its busy time
    oom_splits: int = 0
    computed_prompt_tokens: int = 0  # prompt positions the worker's prefills computed since its previous event
    empty_row_steps: int = 0  # decode steps its engine computed for ended sequences' empty rows since then


@dataclass
class ShardTotals:
    """What a shard's file holds, as its footer records it (`runner.store.shard_totals`)."""

    rows: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    run_ids: list[str] = field(default_factory=list)


@dataclass
class ShardDone:
    """A shard whose file is committed."""

    worker: str
    shard_id: int
    file: str
    totals: ShardTotals
    redone: int = 0  # sequences generated again over error rows (output.retry_errors)
    generated_steps: int = 0
    started_at: float = 0.0  # epoch seconds
    ended_at: float = 0.0
    ignored_settings: tuple[str, ...] = ()  # the model's own generation settings the engine did not apply

    def figures(self) -> dict[str, Any]:
        """What the manifest records of the file (rows and tokens; worker and times for the report)."""
        t = self.totals
        return {
            "rows": t.rows,
            "errors": t.errors,
            "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens,
            "run_ids": t.run_ids,
            "worker": self.worker,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "generated_steps": self.generated_steps,
        }


@dataclass
class ShardRetried:
    """A shard that failed (raised, its worker died or hung) and went back on the queue."""

    shard_id: int
    error: str


Event = BatchDone | ShardDone | ShardRetried


class TaskSource(Protocol):
    """Where the pool takes shard tasks from (`runner.driver`'s TaskFeed)."""

    def next(self) -> ShardTask | None:
        """The next task if one is ready now, else None."""

    @property
    def exhausted(self) -> bool:
        """No task is left and none will come."""
