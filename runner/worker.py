"""The generation worker: holds one model, turns a shard into one Parquet file.

`ShardGenerator` is plain Python: the scheduler wraps it as a Ray actor, and
benchmarks or a GPU check can drive it without Ray. `__init__` loads the
model once; `run_shard` hands the shard's rows to the engine (`runner.engine`:
continuous batching), yields a progress event as each planned batch's rows have
all ended and a summary once the shard's file is committed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from runner import output
from runner.config import JobConfig
from runner.sampling import SAMPLING_DEFAULTS

log = logging.getLogger(__name__)


@dataclass
class WorkerSetup:
    """Everything a worker needs for a whole job; sent once, when the actor starts."""

    job: JobConfig
    model_path: str  # what from_pretrained loads (the embedded model already resolved)
    run_id: str
    config_hash: str
    carry_schema: pa.Schema
    file_metadata: dict[bytes, bytes]


@dataclass
class ShardTask:
    """One shard: which prepared rows, in generation order, cut into batches of positions [start, end).

    `parts` are tables of prepared rows (`runner.prepare`), or Ray object refs to them: the
    worker fetches them from the object store itself, so no token passes through the driver.
    """

    shard_id: int
    file_name: str
    fingerprint: str
    batches: list[tuple[int, int, int]]  # (batch_id, start, end)
    parts: list[Any]
    take: Any  # int64 array (rows, 2): (part, row within the part) per row, in generation order
    attempt: int = 1  # which try of this shard (the scheduler counts them)
    redo: dict[str, list[int]] | None = None  # row id -> sample indices to generate again (retry_errors)

    def gather(self, carry_schema: pa.Schema) -> pa.Table:
        """The shard's prepared rows in generation order, carried columns cast to the run's schema."""
        import numpy as np

        parts = self.parts
        refs = [i for i, p in enumerate(parts) if not isinstance(p, pa.Table)]
        if refs:
            import ray

            fetched = ray.get([parts[i] for i in refs])
            parts = list(parts)
            for i, table in zip(refs, fetched):
                parts[i] = table
        take = np.asarray(self.take, dtype=np.int64).reshape(-1, 2)
        pieces, positions = [], []
        for k, part in enumerate(parts):
            where = np.nonzero(take[:, 0] == k)[0]
            if len(where):
                pieces.append(_conform(part.take(take[where, 1]), carry_schema))
                positions.append(where)
        table = pa.concat_tables(pieces)
        return table.take(np.argsort(np.concatenate(positions), kind="stable"))


def _conform(rows: pa.Table, carry_schema: pa.Schema) -> pa.Table:
    from runner.prepare import PREPARED_FIELDS

    fixed = pa.schema(PREPARED_FIELDS)
    columns = [rows.column(f.name) for f in fixed]
    for f in carry_schema:
        if f.name in rows.column_names:
            columns.append(rows.column(f.name).cast(f.type))
        else:  # a chunk where this column never appeared
            columns.append(pa.nulls(rows.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=pa.schema(list(fixed) + list(carry_schema)))


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
    def latency_s(self) -> float:
        return self.ended - (self.started or self.ended)


def _wanted(ids: list[str], per_row: int, redo: dict[str, list[int]] | None) -> dict[int, tuple[int, ...]]:
    """Which sample indices of which rows (by position) a task generates: all, or those to redo."""
    if redo is None:
        return {r: tuple(range(per_row)) for r in range(len(ids))}
    strangers = set(redo) - set(ids)
    if strangers:  # never write a file without rows it held
        raise RuntimeError(f"rows to generate again are not in this shard: {sorted(strangers)[:3]}")
    return {r: tuple(sorted(redo[i])) for r, i in enumerate(ids) if i in redo}


def worker_name(index: int) -> str:
    """host:node/wN-pid under Ray, host/wN-pid without it: which machine and which process."""
    host = socket.gethostname()
    process = f"w{index}-{os.getpid()}"
    try:
        import ray

        if ray.is_initialized():
            return f"{host}:{ray.get_runtime_context().get_node_id()[:8]}/{process}"
    except ImportError:
        pass
    return f"{host}/{process}"


class ShardGenerator:
    """Loads the model once and generates shards with it."""

    def __init__(self, setup: WorkerSetup, index: int = 0, threads: int | None = None):
        import torch

        from runner import model as model_lib
        from runner.submit import apply_submitted_env

        apply_submitted_env()  # a submitted job's credentials (object storage, the Hub), if any

        if threads:
            torch.set_num_threads(threads)
        self.name = worker_name(index)
        self.device = model_lib.pick_device()
        path = model_lib.resolve_model_path(setup.model_path)
        self.tokenizer = model_lib.load_tokenizer(path, setup.job.model)
        self.model = model_lib.load_model(path, setup.job.model, self.device)
        from runner import budget
        from runner.engine import Limits

        free, shape = model_lib.free_memory_bytes(self.device, threads), model_lib.model_shape(self.model)
        # What the running set may hold when the job sets no batching.max_batch_tokens; the engine
        # lowers it for good after an out-of-memory error (Limits.learned), across shards and sweep points.
        self.memory_budget = budget.token_budget(free, shape)
        self.memory_budget_note = budget.describe(free, shape)
        self.limits = Limits(max_sequences=1)
        self.setup = setup
        self.configure(setup)

    def configure(self, setup: WorkerSetup) -> None:
        """Take the settings of the next job (a sweep point) without reloading the model."""
        from runner.engine import Engine
        from runner.sampling import Decoding, unsupported_settings

        if (setup.job.model, setup.model_path) != (self.setup.job.model, self.setup.model_path):
            raise ValueError("configure() cannot change the model; start a new worker for another model")
        self.setup = setup
        job = setup.job
        self.generation_config = build_generation_config(self.model.generation_config, job, self.tokenizer)
        b = job.batching
        self.limits.max_sequences = b.max_batch_size * job.generation.num_return_sequences
        self.limits.max_tokens = b.max_batch_tokens if b.max_batch_tokens is not None else self.memory_budget
        self.limits.step_cost_tokens = b.step_cost_tokens
        decoding = Decoding.from_generation_config(
            self.generation_config, job.generation.seed, job.generation.stop_strings
        )
        ignored = unsupported_settings(self.generation_config)
        if ignored:  # from the model's own generation_config.json: the engine does not apply them
            log.warning("%s: the model's generation config sets %s, which the engine ignores", self.name, ignored)
        self.engine = Engine(self.model, self.tokenizer, decoding, self.limits, job.output.on_row_error)
        self.out = output.open_output_dir(job.output.dir)
        self.schema = output.output_schema(setup.carry_schema, setup.file_metadata)
        self.static_columns = static_columns(setup, self.generation_config, self.device, self.name)

    def ready(self) -> dict[str, Any]:
        return {"worker": self.name, "device": self.device, "token_budget": self.memory_budget_note}

    def run_shard(self, task: ShardTask) -> Iterator[dict[str, Any]]:
        """Generate every row of `task` through the engine, write its file, and report progress as it goes.

        Rows enter the engine in plan order; a progress event follows each planned batch once
        all its sequences have ended. The file holds the rows in plan order, samples in order.
        A task with `redo` (output.retry_errors) generates only those sequences again and
        writes them over their error rows in the committed file; every other row stays as it was.
        """
        from runner import faults
        from runner.engine import Row
        from runner.prepare import TOKENS

        faults.on_shard(task.shard_id, task.attempt)
        started_at = time.time()
        rows = task.gather(self.setup.carry_schema)
        ids, prompts = rows.column("id").to_pylist(), rows.column("prompt").to_pylist()
        input_ids = rows.column(TOKENS).to_pylist()
        truncated = rows.column("truncated_tokens").to_pylist()
        per_row = self.setup.job.generation.num_return_sequences
        wanted = _wanted(ids, per_row, task.redo)  # row -> the sample indices to generate
        batch_of: dict[int, BatchTally] = {}
        for batch_id, start, end in task.batches:
            tally = BatchTally(batch_id, 0 if task.redo else end - start)  # redone rows are not new rows
            for r in range(start, end):
                if r in wanted:
                    batch_of[r] = tally
                    tally.expected += len(wanted[r])
        done: dict[tuple[int, int], Any] = {}
        oom_seen, last_event = self.engine.oom_events, time.perf_counter()
        engine_rows = [Row(r, ids[r], input_ids[r], samples) for r, samples in wanted.items()]
        for f in self.engine.generate(engine_rows):
            now = time.perf_counter()
            done[(f.key, f.sample_index)] = f
            tally = batch_of[f.key]
            tally.add(f, len(input_ids[f.key]), now)
            if tally.sequences < tally.expected:
                continue
            yield {
                "event": "batch",
                "worker": self.name,
                "shard_id": task.shard_id,
                "batch_id": tally.batch_id,
                "rows": tally.rows,
                "sequences": tally.sequences,
                "prompt_tokens": tally.prompt_tokens,
                "padded_prompt_tokens": tally.padded_prompt_tokens,
                "completion_tokens": tally.completion_tokens,
                "generated_steps": tally.generated_steps,
                "padded_length": tally.padded_length,
                "latency_s": now - last_event,  # the worker's time since its last event: sums to busy time
                "oom_splits": self.engine.oom_events - oom_seen,
            }
            oom_seen, last_event = self.engine.oom_events, now
        columns: dict[str, list[Any]] = {f.name: [] for f in output.BASE_FIELDS}
        carry_rows: list[int] = []
        for row, samples in wanted.items():
            tally = batch_of[row]
            for k in samples:
                f = done[(row, k)]
                carry_rows.append(row)
                values = {
                    "id": ids[row],
                    "sample_index": k,
                    "prompt": prompts[row],
                    "prompt_tokens": len(input_ids[row]),
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
                    **self.static_columns,
                }
                for name, column in columns.items():
                    column.append(values[name])
        table = self._table(columns, rows.select(self.setup.carry_schema.names).take(pa.array(carry_rows, pa.int64())))
        if task.redo:
            table = self._over_committed(task, table, ids, per_row)
        totals = output.shard_totals(table)
        metadata = {**self.schema.metadata, output.META_PLAN: task.fingerprint.encode()}
        metadata[output.META_TOTALS] = json.dumps(totals).encode()
        output.write_shard(self.out, task.file_name, table.replace_schema_metadata(metadata))
        yield {
            "event": "shard",
            "worker": self.name,
            "shard_id": task.shard_id,
            "file": task.file_name,
            "redone": sum(len(s) for s in wanted.values()) if task.redo else 0,
            "generated_steps": sum(f.steps for f in done.values()),
            "started_at": started_at,
            "ended_at": time.time(),
            **totals,
        }

    def _over_committed(self, task: ShardTask, redone: pa.Table, ids: list[str], per_row: int) -> pa.Table:
        """The committed file's rows with the redone sequences in place of their error rows, in plan order."""
        import numpy as np
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        with self.out.fs.open_input_file(self.out.join(task.file_name)) as f:
            committed = pq.read_table(f).select(self.schema.names).cast(self.schema)
        position = {row_id: i for i, row_id in enumerate(ids)}
        redo = {(row_id, k) for row_id, samples in task.redo.items() for k in samples}
        pairs = zip(committed.column("id").to_pylist(), committed.column("sample_index").to_pylist())
        kept = committed.filter(pa.array([pair not in redo for pair in pairs]))
        table = pa.concat_tables([kept, redone])
        order = pc.add(
            pc.multiply(pa.array([position[i] for i in table.column("id").to_pylist()], pa.int64()), per_row),
            table.column("sample_index").cast(pa.int64()),
        )
        return table.take(np.argsort(order.to_numpy(), kind="stable"))

    def _table(self, columns: dict[str, list[Any]], carry: pa.Table) -> pa.Table:
        arrays = [pa.array(columns[f.name], type=f.type) for f in output.BASE_FIELDS]
        arrays += [carry.column(name).combine_chunks() for name in carry.column_names]
        return pa.Table.from_arrays(arrays, schema=self.schema)


def build_generation_config(model_defaults: Any, job: JobConfig, tokenizer: Any) -> Any:
    """The job's generation settings over the model's own defaults; max_new_tokens always explicit."""
    import copy

    gen = job.generation
    config = copy.deepcopy(model_defaults)
    settings: dict[str, Any] = {
        "max_new_tokens": gen.max_new_tokens,
        "do_sample": gen.do_sample,
        "num_return_sequences": gen.num_return_sequences,
        "max_length": None,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if gen.do_sample:
        settings.update({k: getattr(gen, k) for k in ("temperature", "top_p", "top_k") if getattr(gen, k) is not None})
    else:  # sampling knobs do nothing in greedy decoding; unset them so nothing warns or misleads
        settings.update({"temperature": None, "top_p": None, "top_k": None})
    if gen.repetition_penalty is not None:
        settings["repetition_penalty"] = gen.repetition_penalty
    if gen.stop_strings:
        settings["stop_strings"] = list(gen.stop_strings)
    if config.eos_token_id is None:
        settings["eos_token_id"] = tokenizer.eos_token_id
    config.update(**settings)
    return config


def static_columns(setup: WorkerSetup, generation_config: Any, device: str, name: str) -> dict[str, Any]:
    """Columns that hold the same value for every row a worker writes in this job."""
    gen = setup.job.generation
    sampled = {
        k: (getattr(generation_config, k) if getattr(generation_config, k) is not None else default)
        for k, default in SAMPLING_DEFAULTS.items()
    }
    config_json = json.dumps(
        {k: v for k, v in generation_config.to_dict().items() if v is not None}, sort_keys=True, default=str
    )
    return {
        "model": setup.job.model.name_or_path,
        "quantization": setup.job.model.quantization,
        "temperature": sampled["temperature"] if gen.do_sample else None,
        "top_p": sampled["top_p"] if gen.do_sample else None,
        "top_k": sampled["top_k"] if gen.do_sample else None,
        "repetition_penalty": sampled["repetition_penalty"],
        "do_sample": gen.do_sample,
        "max_new_tokens": gen.max_new_tokens,
        "seed": gen.seed,
        "generation_config": config_json,
        "run_id": setup.run_id,
        "config_hash": setup.config_hash,
        "worker": name,
        "device": device,
    }
