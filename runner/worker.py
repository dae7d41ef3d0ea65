"""The generation worker: holds one model, turns a shard into one Parquet file.

`ShardGenerator` is plain Python: the scheduler wraps it as a Ray actor, and
benchmarks or a GPU check can drive it without Ray. `__init__` loads the
model once; `run_shard` generates batch by batch, yielding a progress event
after each batch and a summary once the shard's file is committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from runner import output, plan
from runner.config import JobConfig

# Transformers' own defaults when sampling and the config leaves a value unset.
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}


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
class SequenceResult:
    completion: str | None
    completion_tokens: int | None
    finish_reason: str  # stop, length, or error
    error: str | None = None
    tokens: list[int] | None = None  # the generated token ids up to where the sequence ended


class RowFailedError(RuntimeError):
    """A row could not be generated even alone, and the job is set to fail on that."""


@dataclass
class BatchStats:
    rows: int
    sequences: int
    prompt_tokens: int
    padded_prompt_tokens: int
    completion_tokens: int
    generated_steps: int  # sequences x decode steps the batch ran (generation-side cost)
    padded_length: int  # the batch's widest prompt, as held in the KV cache
    latency_s: float
    oom_splits: int = 0  # times this batch's rows were split after running out of memory
    row_padded: list[int] | None = None  # per row: the width its prompt was padded to when read


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


def batch_seed(seed: int, batch_id: int) -> int:
    """A seed per batch, so sampled output does not depend on which worker ran it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{batch_id}".encode()).digest()[:4], "little")


class ShardGenerator:
    """Loads the model once and generates shards with it."""

    def __init__(self, setup: WorkerSetup, index: int = 0, threads: int | None = None):
        import torch

        from runner import model as model_lib

        if threads:
            torch.set_num_threads(threads)
        self.name = worker_name(index)
        self.device = model_lib.pick_device()
        path = model_lib.resolve_model_path(setup.model_path)
        self.tokenizer = model_lib.load_tokenizer(path, setup.job.model)
        self.model = model_lib.load_model(path, setup.job.model, self.device)
        from runner import budget

        free, shape = model_lib.free_memory_bytes(self.device, threads), model_lib.model_shape(self.model)
        # Used when the job sets no batching.max_batch_tokens: batches holding more are split before they run.
        self.memory_budget = budget.token_budget(free, shape)
        self.memory_budget_note = budget.describe(free, shape)
        # Learned after an out-of-memory error: batches costing more are split before they run.
        self.oom_limit: int | None = None
        self.setup = setup
        self.configure(setup)

    def configure(self, setup: WorkerSetup) -> None:
        """Take the settings of the next job (a sweep point) without reloading the model."""
        if (setup.job.model, setup.model_path) != (self.setup.job.model, self.setup.model_path):
            raise ValueError("configure() cannot change the model; start a new worker for another model")
        self.setup = setup
        self.generation_config = build_generation_config(self.model.generation_config, setup.job, self.tokenizer)
        self.end_ids = end_token_ids(self.generation_config, self.tokenizer)
        self.out = output.open_output_dir(setup.job.output.dir)
        self.schema = output.output_schema(setup.carry_schema, setup.file_metadata)
        self.static_columns = static_columns(setup, self.generation_config, self.device, self.name)

    def ready(self) -> dict[str, Any]:
        return {"worker": self.name, "device": self.device, "token_budget": self.memory_budget_note}

    @property
    def token_limit(self) -> int | None:
        """Padded tokens a batch may cost before it is split: the learned OOM limit, and the derived budget."""
        limits = [self.oom_limit]
        if self.setup.job.batching.max_batch_tokens is None:
            limits.append(self.memory_budget)
        known = [x for x in limits if x is not None]
        return min(known) if known else None

    def run_shard(self, task: ShardTask) -> Iterator[dict[str, Any]]:
        """Generate every batch of `task`, write its file, and report progress as it goes."""
        from runner.prepare import TOKENS

        rows = task.gather(self.setup.carry_schema)
        ids, prompts = rows.column("id").to_pylist(), rows.column("prompt").to_pylist()
        input_ids = rows.column(TOKENS).to_pylist()
        truncated = rows.column("truncated_tokens").to_pylist()
        carry = rows.select(self.setup.carry_schema.names)
        columns: dict[str, list[Any]] = {f.name: [] for f in output.BASE_FIELDS}
        carry_rows: list[int] = []
        per_row = self.setup.job.generation.num_return_sequences
        for batch_id, start, end in task.batches:
            for offset, results, stats in self.generate_with_backoff(input_ids[start:end], batch_id):
                created = datetime.now(timezone.utc)
                for i, result in enumerate(results):
                    row = start + offset + i // per_row
                    carry_rows.append(row)
                    padded = stats.row_padded[i // per_row] if stats.row_padded else stats.padded_length
                    values = {
                        "id": ids[row],
                        "sample_index": i % per_row,
                        "prompt": prompts[row],
                        "prompt_tokens": len(input_ids[row]),
                        "truncated_tokens": truncated[row],
                        "shard_id": task.shard_id,
                        "batch_id": batch_id,
                        "padded_length": padded,
                        "created_at": created,
                    }
                    self._append_row(columns, values, result, stats)
                yield {
                    "event": "batch",
                    "worker": self.name,
                    "shard_id": task.shard_id,
                    "batch_id": batch_id,
                    **stats.__dict__,
                }
        table = self._table(columns, carry.take(pa.array(carry_rows, pa.int64())))
        totals = output.shard_totals(table)
        metadata = {**self.schema.metadata, output.META_PLAN: task.fingerprint.encode()}
        metadata[output.META_TOTALS] = json.dumps(totals).encode()
        output.write_shard(self.out, task.file_name, table.replace_schema_metadata(metadata))
        yield {
            "event": "shard",
            "worker": self.name,
            "shard_id": task.shard_id,
            "file": task.file_name,
            **totals,
        }

    def _append_row(self, columns, values, result, stats) -> None:
        values.update(
            {
                "completion": result.completion,
                "completion_tokens": result.completion_tokens,
                "finish_reason": result.finish_reason,
                "error": result.error,
                "batch_size": stats.rows,
                "latency_s": stats.latency_s,
                **self.static_columns,
            }
        )
        for name, column in columns.items():
            column.append(values[name])

    def batch_cost(self, input_ids: list[list[int]]) -> int:
        gen = self.setup.job.generation
        return len(input_ids) * gen.num_return_sequences * (max(map(len, input_ids)) + gen.max_new_tokens)

    def generate_with_backoff(self, input_ids: list[list[int]], batch_id: int):
        """Generate a batch; on out-of-memory split it in half and retry, down to one row.

        Yields (offset of the chunk's first row, results, stats) chunk by chunk. The
        budget learned from an out-of-memory error holds for the rest of the job.

        Raises:
            RowFailedError: a single row ran out of memory and `output.on_row_error` is `fail`.
        """
        queue = self._split_to_limit(0, len(input_ids), input_ids)
        splits = 0
        while queue:
            start, end = queue.pop(0)
            chunk = input_ids[start:end]
            if self.token_limit and end - start > 1 and self.batch_cost(chunk) > self.token_limit:
                queue[0:0] = self._split_to_limit(start, end, input_ids)
                continue
            try:
                results, stats = self.generate_batch(chunk, batch_id)
            except out_of_memory_errors() as e:
                free_device_memory()
                cost = self.batch_cost(chunk)
                self.oom_limit = max(1, min(self.oom_limit or cost, cost // 2))
                splits += 1
                if end - start > 1:
                    mid = (start + end) // 2
                    queue[0:0] = [(start, mid), (mid, end)]
                    continue
                message = f"out of memory even alone ({len(chunk[0])} prompt tokens): {str(e).splitlines()[0][:200]}"
                if self.setup.job.output.on_row_error == "fail":
                    raise RowFailedError(message) from e
                results, stats = self.failed_row(chunk[0], message)
            stats.oom_splits = splits
            splits = 0
            yield start, results, stats

    def _split_to_limit(self, start: int, end: int, input_ids: list[list[int]]) -> list[tuple[int, int]]:
        if self.token_limit is None or end - start == 1 or self.batch_cost(input_ids[start:end]) <= self.token_limit:
            return [(start, end)]
        mid = (start + end) // 2
        return self._split_to_limit(start, mid, input_ids) + self._split_to_limit(mid, end, input_ids)

    def failed_row(self, prompt: list[int], message: str) -> tuple[list[SequenceResult], BatchStats]:
        samples = self.setup.job.generation.num_return_sequences
        results = [SequenceResult(None, None, "error", message) for _ in range(samples)]
        stats = BatchStats(
            rows=1,
            sequences=samples,
            prompt_tokens=len(prompt),
            padded_prompt_tokens=len(prompt),
            completion_tokens=0,
            generated_steps=0,
            padded_length=len(prompt),
            latency_s=0.0,
        )
        return results, stats

    def _table(self, columns: dict[str, list[Any]], carry: pa.Table) -> pa.Table:
        arrays = [pa.array(columns[f.name], type=f.type) for f in output.BASE_FIELDS]
        arrays += [carry.column(name).combine_chunks() for name in carry.column_names]
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def generate_batch(self, input_ids: list[list[int]], batch_id: int) -> tuple[list[SequenceResult], BatchStats]:
        """Read the batch's prompts, generate, and decode the new tokens of every sequence.

        The whole batch decodes together (one decode loop, the costly part of generation),
        but its prompts are read in groups of similar length (`plan.prefill_groups`), each
        left-padded only to its own longest prompt; their KV caches are then left-padded to
        one width and joined. A batch of one group is simply left-padded and generated.
        """
        import torch

        started = time.perf_counter()
        gen = self.setup.job.generation
        groups = plan.prefill_groups([len(x) for x in input_ids], self.setup.job.batching.step_cost_tokens)
        ids, mask = left_pad(input_ids, self.tokenizer.pad_token_id)
        if gen.do_sample:
            torch.manual_seed(batch_seed(gen.seed, batch_id))
        with torch.inference_mode():
            cache, row_padded = None, [int(ids.shape[1])] * len(input_ids)
            if len(groups) > 1 and min(map(len, input_ids)) > 1:
                cache, row_padded = self.prefill(input_ids, groups, int(ids.shape[1]))
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                past_key_values=cache,
                generation_config=self.generation_config,
                tokenizer=self.tokenizer if gen.stop_strings else None,
            )
        new_tokens = out[:, ids.shape[1] :].tolist()
        results = [finish(tokens, self.end_ids, self.tokenizer, gen.stop_strings) for tokens in new_tokens]
        steps = len(new_tokens[0]) if new_tokens else 0
        stats = BatchStats(
            rows=len(input_ids),
            sequences=len(results),
            prompt_tokens=sum(len(x) for x in input_ids),
            padded_prompt_tokens=sum(row_padded),
            completion_tokens=sum(r.completion_tokens for r in results),
            generated_steps=steps * len(results),
            padded_length=int(ids.shape[1]),
            latency_s=time.perf_counter() - started,
            row_padded=row_padded,
        )
        return results, stats

    def prefill(self, input_ids: list[list[int]], groups: list[list[int]], width: int) -> tuple[Any, list[int]]:
        """KV caches of every prompt but its last token, read group by group, joined left-padded to `width - 1`.

        `generate` then feeds each row's last token and decodes the batch as one. Returns
        (None, ...) when the model's cache is not a plain per-layer cache that can be joined
        (sliding-window or hybrid models): the batch is then read in one piece.
        """
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        pad = self.tokenizer.pad_token_id
        keys: list[list[Any]] = []
        values: list[list[Any]] = []
        order: list[int] = []
        row_padded = [0] * len(input_ids)
        joined = None
        for group in groups:
            ids, mask = left_pad([input_ids[r][:-1] for r in group], pad)
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what generate computes for left padding
            cache = DynamicCache(config=self.model.config)
            if any(type(layer) is not DynamicLayer for layer in cache.layers):  # known before any forward pass
                return None, [width] * len(input_ids)
            self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            left = width - 1 - ids.shape[1]
            for k, layer in enumerate(cache.layers):
                if len(keys) <= k:
                    keys.append([])
                    values.append([])
                keys[k].append(torch.nn.functional.pad(layer.keys, (0, 0, left, 0)))
                values[k].append(torch.nn.functional.pad(layer.values, (0, 0, left, 0)))
            order += group
            for r in group:
                row_padded[r] = ids.shape[1] + 1
            if joined is None:
                joined = cache
        back = torch.tensor(sorted(range(len(order)), key=order.__getitem__), device=self.device)  # to batch order
        for k, layer in enumerate(joined.layers):
            layer.keys = torch.cat(keys[k]).index_select(0, back)
            layer.values = torch.cat(values[k]).index_select(0, back)
        samples = self.setup.job.generation.num_return_sequences
        if samples > 1:
            joined.batch_repeat_interleave(samples)
        return joined, row_padded


def out_of_memory_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "this batch does not fit": torch's OutOfMemoryError (CUDA, MPS, XPU)."""
    import torch

    return (torch.OutOfMemoryError,)


def free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def left_pad(input_ids: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """Left-padded id and attention-mask tensors for a batch of unpadded sequences."""
    import torch

    width = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for i, seq in enumerate(input_ids):
        if seq:
            ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids, mask


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


def end_token_ids(generation_config: Any, tokenizer: Any) -> tuple[set[int], int]:
    """(EOS ids, pad id): where a generated sequence ends."""
    eos = generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    if not eos_ids and tokenizer.eos_token_id is not None:
        eos_ids = {tokenizer.eos_token_id}
    return eos_ids, tokenizer.pad_token_id


def finish(tokens: list[int], end_ids: tuple[set[int], int], tokenizer: Any, stop_strings: list[str]) -> SequenceResult:
    """Decode one generated sequence and tell why it ended.

    The sequence ends at the first EOS (counted as generated) or pad (filler
    after a stop string, not counted). A stop string found in the text ends
    the completion just before it. Otherwise a sequence that used every step
    ended on `length`.
    """
    eos_ids, pad_id = end_ids
    end = next((k for k, t in enumerate(tokens) if t in eos_ids or t == pad_id), len(tokens))
    text = tokenizer.decode(tokens[:end], skip_special_tokens=True)
    hits = [text.find(s) for s in stop_strings if s in text]
    if hits:
        return SequenceResult(text[: min(hits)], end, "stop", tokens=tokens[:end])
    if end < len(tokens):
        counted = end + 1 if tokens[end] in eos_ids else end
        return SequenceResult(text, counted, "stop", tokens=tokens[:counted])
    return SequenceResult(text, end, "length", tokens=tokens)


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
