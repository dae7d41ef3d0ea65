"""A shard's rows on the worker: which sequences to generate, their batches' figures, the file's table.

Pure Python and Arrow over the engine's `Finished` sequences; `runner.generation.worker` drives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.input import ADAPTER, PREPARED_FIELDS, SETTINGS, TOKENS
from runner.tasks import BatchDone, ShardTask


@dataclass
class BatchTally:
    """A planned batch's figures, summed as its sequences end (they end at different steps)."""

    batch_id: int
    rows: int  # new rows in the output (0 when its rows are generated again over error rows)
    expected: int = 0  # sequences to generate
    sequences: int = 0
    prompt_tokens: int = 0
    padded_prompt_tokens: int = 0
    completion_tokens: int = 0
    generated_steps: int = 0  # tokens the engine computed for its sequences (generation-side cost)
    padded_length: int = 0  # the widest its prompts were read at
    started: float | None = None  # perf_counter time its first row was admitted
    ended: float = 0.0
    ended_at: datetime | None = None

    def add(self, f: Any, prompt_tokens: int, now: float) -> None:
        self.sequences += 1
        if f.sample_index == 0:
            self.prompt_tokens += prompt_tokens
            self.padded_prompt_tokens += f.padded_length
        self.completion_tokens += f.result.completion_tokens or 0
        self.generated_steps += f.steps
        self.padded_length = max(self.padded_length, f.padded_length)
        admitted = now - f.latency_s
        self.started = admitted if self.started is None else min(self.started, admitted)
        self.ended = now
        self.ended_at = datetime.now(timezone.utc)

    @property
    def complete(self) -> bool:
        return self.sequences >= self.expected

    @property
    def latency_s(self) -> float:
        return self.ended - (self.started or self.ended)

    def event(
        self, worker: str, shard_id: int, since_last_s: float, oom_splits: int, computed: int = 0, empty: int = 0
    ) -> BatchDone:
        return BatchDone(
            worker=worker,
            shard_id=shard_id,
            batch_id=self.batch_id,
            rows=self.rows,
            sequences=self.sequences,
            prompt_tokens=self.prompt_tokens,
            padded_prompt_tokens=self.padded_prompt_tokens,
            completion_tokens=self.completion_tokens,
            generated_steps=self.generated_steps,
            padded_length=self.padded_length,
            latency_s=since_last_s,
            oom_splits=oom_splits,
            computed_prompt_tokens=computed,
            empty_row_steps=empty,
        )


def wanted(ids: list[str], per_row: list[int], redo: dict[str, list[int]] | None) -> dict[int, tuple[int, ...]]:
    """Which sample indices of which rows (by position) a task generates: all (`per_row`: each row's
    num_return_sequences), or those to redo."""
    if redo is None:
        return {r: tuple(range(n)) for r, n in enumerate(per_row)}
    strangers = set(redo) - set(ids)
    if strangers:  # never write a file without rows it held
        raise RuntimeError(f"rows to generate again are not in this shard: {sorted(strangers)[:3]}")
    return {r: tuple(sorted(redo[i])) for r, i in enumerate(ids) if i in redo}


def tallies(task: ShardTask, samples: dict[int, tuple[int, ...]]) -> dict[int, BatchTally]:
    """Each generated row's planned batch (row position -> its tally)."""
    batch_of: dict[int, BatchTally] = {}
    for batch_id, start, end in task.batches:
        tally = BatchTally(batch_id, 0 if task.redo else end - start)  # redone rows are not new rows
        for r in range(start, end):
            if r in samples:
                batch_of[r] = tally
                tally.expected += len(samples[r])
    return batch_of


def conform(rows: pa.Table, carry_schema: pa.Schema) -> pa.Table:
    """Prepared rows with the run's carried columns, cast to their types (null where a chunk lacks one)."""
    fixed = pa.schema(PREPARED_FIELDS)
    for own in (SETTINGS, ADAPTER):  # the rows' own settings (runner.input.settings) and adapters
        if own in rows.column_names:
            fixed = fixed.append(rows.schema.field(own))
    columns = [rows.column(f.name) for f in fixed]
    for f in carry_schema:
        if f.name in rows.column_names:
            columns.append(rows.column(f.name).cast(f.type))
        else:  # a chunk where this column never appeared
            columns.append(pa.nulls(rows.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=pa.schema(list(fixed) + list(carry_schema)))


def in_generation_order(parts: list[pa.Table], take: Any, carry_schema: pa.Schema) -> pa.Table:
    """The shard's prepared rows, in generation order, from the parts they were planned from."""
    take = np.asarray(take, dtype=np.int64).reshape(-1, 2)
    pieces, positions = [], []
    for k, part in enumerate(parts):
        where = np.nonzero(take[:, 0] == k)[0]
        if len(where):
            pieces.append(conform(part.take(take[where, 1]), carry_schema))
            positions.append(where)
    table = pa.concat_tables(pieces)
    return table.take(np.argsort(np.concatenate(positions), kind="stable"))


def shard_table(
    task: ShardTask,
    rows: pa.Table,
    samples: dict[int, tuple[int, ...]],
    batch_of: dict[int, BatchTally],
    done: dict[tuple[int, int], Any],
    static: dict[str, Any],
    schema: pa.Schema,
    carry_names: list[str],
    own: dict[int, dict[str, Any]] | None = None,
) -> pa.Table:
    """The output rows of the generated sequences, in plan order (samples in order), carried columns after.

    Args:
        own: the settings columns of rows with settings of their own (by position), over `static`'s.
    """
    ids, prompts = rows.column("id").to_pylist(), rows.column("prompt").to_pylist()
    lengths = pc.list_value_length(rows.column(TOKENS)).to_pylist()
    truncated = rows.column("truncated_tokens").to_pylist()
    fields = [f for f in schema if f.name not in carry_names]  # the contract's columns (logprobs where on)
    columns: dict[str, list[Any]] = {f.name: [] for f in fields}
    own = own or {}
    carry_rows: list[int] = []
    for row, indices in samples.items():
        tally = batch_of[row]
        for k in indices:
            f = done[(row, k)]
            carry_rows.append(row)
            values = {
                "id": ids[row],
                "sample_index": k,
                "prompt": prompts[row],
                "prompt_tokens": lengths[row],
                "truncated_tokens": truncated[row],
                "shard_id": task.shard_id,
                "batch_id": tally.batch_id,
                "batch_size": f.batch_size,
                "padded_length": f.padded_length,
                "latency_s": tally.latency_s,
                "created_at": tally.ended_at,
                "completion": f.result.completion,
                "completion_tokens": f.result.completion_tokens,
                "finish_reason": f.result.finish_reason,
                "error": f.result.error,
                **static,
                **own.get(row, {}),
                **logprob_values(f.result),
                **prompt_logprob_values(f.result),
            }
            for name, column in columns.items():
                column.append(values[name])
    carry = rows.select(carry_names).take(pa.array(carry_rows, pa.int64()))
    arrays = [pa.array(columns[f.name], type=f.type) for f in fields]
    arrays += [carry.column(name).combine_chunks() for name in carry.column_names]
    return pa.Table.from_arrays(arrays, schema=schema)


def logprob_values(result: Any) -> dict[str, Any]:
    """A sequence's logprob columns (null where it has none: an error row, or logprobs off)."""
    if result.logprobs is None:
        return {"token_logprobs": None, "top_logprobs": None, "cumulative_logprob": None}
    top = None
    if result.top_logprobs is not None:
        top = [[{"token_id": i, "token": t, "logprob": lp} for i, t, lp in step] for step in result.top_logprobs]
    return {
        "token_logprobs": result.logprobs,
        "top_logprobs": top,
        "cumulative_logprob": float(np.sum(np.asarray(result.logprobs, dtype=np.float64))),
    }


def prompt_logprob_values(result: Any) -> dict[str, Any]:
    """A scoring job's columns of a row (null where it has none: an error row, or not a scoring job)."""
    if result.prompt_logprobs is None:
        return {"prompt_logprobs": None, "prompt_logprob_sum": None}
    values = result.prompt_logprobs
    return {"prompt_logprobs": values, "prompt_logprob_sum": float(np.sum(np.asarray(values, dtype=np.float64)))}


def over_committed(
    committed: pa.Table, redone: pa.Table, redo: dict[str, list[int]], ids: list[str], per_row: int
) -> pa.Table:
    """The committed file's rows with the redone sequences in place of their error rows, in plan order."""
    position = {row_id: i for i, row_id in enumerate(ids)}
    again = {(row_id, k) for row_id, samples in redo.items() for k in samples}
    pairs = zip(committed.column("id").to_pylist(), committed.column("sample_index").to_pylist())
    kept = committed.filter(pa.array([pair not in again for pair in pairs]))
    table = pa.concat_tables([kept, redone])
    order = pc.add(
        pc.multiply(pa.array([position[i] for i in table.column("id").to_pylist()], pa.int64()), per_row),
        table.column("sample_index").cast(pa.int64()),
    )
    return table.take(np.argsort(order.to_numpy(), kind="stable"))
