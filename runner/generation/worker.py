"""The generation worker: holds one model, turns a shard into one Parquet file.

`ShardGenerator` is plain Python: the pool (`runner.cluster`) wraps it as a Ray actor, and
benchmarks or a GPU check can drive it without Ray. `__init__` loads the model once;
`run_shard` hands the shard's rows to the engine (`runner.generation.engine`: continuous
batching), yields a `BatchDone` as each planned batch's rows have all ended and a
`ShardDone` once the shard's file is committed. Importing this module imports no torch:
the pool on the driver names the class without loading the model code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from runner import faults, store
from runner.config import has_row_settings, has_structured_output
from runner.constraints import job_constraint
from runner.generation import fetch, scoring, shard_rows
from runner.generation.row_settings import RowDecodings
from runner.generation.settings import build_generation_config, row_columns, static_columns
from runner.input import ADAPTER, SETTINGS, TOKENS
from runner.secrets import apply_submitted_env
from runner.tasks import BatchDone, ShardDone, ShardTask, ShardTotals, WorkerSetup

log = logging.getLogger(__name__)


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


DEFAULT_RUNNING_ROWS = 128  # batching.max_batch_size unset: rows running at once on the CPU
GPU_RUNNING_ROWS_CAP = 1024  # ... and at most this many on a GPU, where the memory budget sizes it
TOKENS_PER_RUNNING_ROW = 256  # the budget's tokens per row when it sizes the running set


def running_rows(max_batch_size: int | None, device: str, budget_tokens: int) -> int:
    """Rows the engine runs at once: `batching.max_batch_size` where set; unset, 128 on the CPU and on a GPU
    the memory budget / 256 tokens, between 128 and 1024 (the token budget still binds first)."""
    if max_batch_size:
        return max_batch_size
    if not device.startswith("cuda"):
        return DEFAULT_RUNNING_ROWS
    return max(DEFAULT_RUNNING_ROWS, min(GPU_RUNNING_ROWS_CAP, budget_tokens // TOKENS_PER_RUNNING_ROW))


class ModelChangedError(RuntimeError):
    """The model a worker finds is not the revision the job resolved when it started."""


def _check_adapter(key: str, folder: str, expected: str) -> None:
    """The adapter folder this node sees holds what the driver hashed (the same path on every node)."""
    from runner import input as input_lib
    from runner.errors import ConfigError

    try:
        found = input_lib.read_adapter(folder).label
    except ConfigError as e:
        raise ModelChangedError(
            f"{key}={folder!r} is not readable on this node ({e.problems[0]}): put the adapter at the "
            "same path on every node of the cluster (a shared file system), as the driver sees it"
        ) from None
    if found != expected:
        raise ModelChangedError(
            f"{folder}: the adapter changed since the job started (it was {expected}, it is {found} on this "
            "node): every worker must apply the same adapter; rerun once it is final"
        )


def pinned(path: str, setup: WorkerSetup) -> Any:
    """The model config a worker loads with: a Hub model at the commit the driver resolved, a local folder
    checked against the hash the driver took (a replacement worker or a resumed run must not load newer
    weights into the same output).

    Raises:
        ModelChangedError: the local folder's content changed since the job started.
    """
    import dataclasses
    from pathlib import Path

    from runner import input as input_lib

    if setup.adapter:
        _check_adapter("model.adapter", setup.job.model.adapter or "", setup.adapter)
    for name, label in (setup.adapters or {}).items():
        _check_adapter(f"model.adapters.{name}", setup.job.model.adapters[name], label)
    if not setup.model_revision:
        return setup.job.model
    if Path(path).is_dir():
        found = input_lib.folder_revision(Path(path))
        if found != setup.model_revision:
            raise ModelChangedError(
                f"{path}: the model folder changed since the job started (it was {setup.model_revision}, it is "
                f"{found} on this node): every worker must load the same weights; rerun once the folder is final"
            )
        return setup.job.model
    return dataclasses.replace(setup.job.model, revision=setup.model_revision)


def gather(task: ShardTask, carry_schema: pa.Schema) -> pa.Table:
    """The shard's prepared rows in generation order, fetched from the object store where they are refs."""
    parts, take = fetch.fetch_parts(task.parts, task.take)
    return shard_rows.in_generation_order(parts, take, carry_schema)


class ShardGenerator:
    """Loads the model once and generates shards with it."""

    def __init__(
        self, setup: WorkerSetup | None = None, index: int = 0, threads: int | None = None, device: str = "auto"
    ):
        """Import the model code and pick the device; load the model now when `setup` is given, else on `load`.

        The pool starts its workers without a setup while the first window is still being
        prepared (the imports cost seconds), and loads the model once that window is sound:
        bad input fails before any model loads.

        Args:
            device: `cuda` (the pool placed this worker on GPUs: they must work), `cpu`, or `auto`
                (CUDA where torch sees it: benchmarks and the GPU check).

        Raises:
            DeviceUnavailableError: `device` is cuda and torch sees no CUDA device.
        """
        import torch

        from runner.generation import model as model_lib

        apply_submitted_env()  # a submitted job's credentials (object storage, the Hub), if any
        if threads:
            torch.set_num_threads(threads)
        self.name = worker_name(index)
        self.threads = threads
        self.first_device = model_lib.pick_device(device)
        model_lib.import_model_code()
        self.device = self.first_device
        self.setup: WorkerSetup | None = None
        if setup is not None:
            self.load(setup)

    def load(self, setup: WorkerSetup) -> dict[str, Any]:
        """Load the job's model (over `cluster.gpus_per_worker` GPUs on a GPU worker); what `ready` says.

        Raises:
            DeviceUnavailableError: the worker sees fewer CUDA devices than `cluster.gpus_per_worker`.
        """
        import torch

        from runner import input as input_lib
        from runner.generation import model as model_lib
        from runner.generation.engine import Limits

        first = self.first_device
        gpus = setup.job.cluster.gpus_per_worker if first.startswith("cuda") else 1
        if gpus > 1 and gpus > torch.cuda.device_count():
            raise model_lib.DeviceUnavailableError(
                f"cluster.gpus_per_worker={gpus}: this worker sees {torch.cuda.device_count()} CUDA device(s)"
            )
        self.device = first if gpus == 1 else "cuda:" + ",".join(str(i) for i in range(gpus))
        path = input_lib.resolve_model_path(setup.model_path)
        model_cfg = pinned(path, setup)
        self.tokenizer = input_lib.load_tokenizer(path, model_cfg)
        self.model = model_lib.load_model(path, model_cfg, first, gpus)
        # model.adapters: every adapter in the model's layers, the one of each row's group applied as it runs
        self.adapters = model_lib.Adapters(self.model, model_cfg.adapters) if model_cfg.adapters else None
        # What the running set may hold when the job sets no batching.max_batch_tokens; the engine
        # learns lower limits from out-of-memory errors (runner.generation.limits), across shards and sweep points.
        self.memory_budget, self.memory_budget_note = model_lib.memory_budget(self.model, first, gpus, self.threads)
        self.limits = Limits(max_sequences=1)
        self.setup = setup
        self.configure(setup)
        return self.ready()

    def configure(self, setup: WorkerSetup) -> None:
        """Take the settings of the next job (a sweep point) without reloading the model."""
        from runner.generation.engine import Engine
        from runner.generation.sampling import Decoding, unsupported_settings

        if self.setup is None:
            raise ValueError("configure() before load(): load the model first")
        if (setup.job.model, setup.model_path, setup.model_revision, setup.adapter_key) != (
            self.setup.job.model,
            self.setup.model_path,
            self.setup.model_revision,
            self.setup.adapter_key,
        ):
            raise ValueError("configure() cannot change the model; start a new worker for another model")
        self.setup = setup
        job = setup.job
        self.generation_config = build_generation_config(self.model.generation_config, job, self.tokenizer)
        b = job.batching
        self.limits.max_sequences = running_rows(b.max_batch_size, self.device, self.memory_budget) * (
            job.generation.num_return_sequences
        )
        self.limits.max_tokens = b.max_batch_tokens if b.max_batch_tokens is not None else self.memory_budget
        self.limits.step_cost_tokens = b.step_cost_tokens
        gen = job.generation
        constraint = job_constraint(gen)
        decoding = Decoding.from_generation_config(self.generation_config, gen.seed, gen.logprobs, constraint)
        sampled = decoding
        if not gen.do_sample:  # what a row of its own temperature > 0 samples with
            as_sampled = dataclasses.replace(job, generation=dataclasses.replace(gen, do_sample=True))
            config = build_generation_config(self.model.generation_config, as_sampled, self.tokenizer)
            sampled = Decoding.from_generation_config(config, gen.seed, gen.logprobs, constraint)
        self.row_decodings = RowDecodings(decoding, sampled)
        # The job's own settings are all applied (the config schema has no others); these come from the
        # model's generation_config.json. They are named in the log, the run's summary and its manifest.
        self.ignored = tuple(unsupported_settings(self.generation_config))
        if self.ignored:
            log.warning("%s: the model's generation config sets %s, which the engine ignores", self.name, self.ignored)
        self.engine = Engine(self.model, self.tokenizer, decoding, self.limits, job.output.on_row_error, b.share_prefix)
        if has_structured_output(job):
            self.engine.check_structured()  # before any shard: a tokenizer llguidance cannot read fails the job here
        self.out = store.open_output_dir(job.output.dir)
        self.schema = store.output_schema(
            setup.carry_schema,
            setup.file_metadata,
            job.generation.logprobs is not None,
            setup.adapter is not None,
            has_row_settings(job),
            bool(setup.adapters),
            job.generation.prompt_logprobs,
            has_structured_output(job),
        )
        self.static_columns = static_columns(setup, self.generation_config, self.device, self.name)

    def ready(self) -> dict[str, Any]:
        return {"worker": self.name, "device": self.device, "token_budget": self.memory_budget_note}

    def run_shard(self, task: ShardTask) -> Iterator[BatchDone | ShardDone]:
        """Generate every row of `task` through the engine, write its file, and report progress as it goes.

        Rows enter the engine in plan order; a `BatchDone` follows each planned batch once
        all its sequences have ended. The file holds the rows in plan order, samples in order.
        A task with `redo` (output.retry_errors) generates only those sequences again and
        writes them over their error rows in the committed file; every other row stays as it was.
        """
        from runner.generation.engine import Row

        faults.on_shard(task.shard_id, task.attempt)
        started_at = time.time()
        rows = gather(task, self.setup.carry_schema)
        ids = rows.column("id").to_pylist()
        decodings = self._row_decodings(rows)
        per_row = [(d or self.row_decodings.job).samples for d in decodings]
        samples = shard_rows.wanted(ids, per_row, task.redo)
        batch_of = shard_rows.tallies(task, samples)
        done: dict[tuple[int, int], Any] = {}
        input_ids = rows.column(TOKENS).to_pylist()
        names = rows.column(ADAPTER).to_pylist() if ADAPTER in rows.column_names else [None] * rows.num_rows
        engine_rows: dict[str | None, list[Any]] = {}  # by adapter: rows of one adapter decode together
        for r, k in samples.items():
            engine_rows.setdefault(names[r], []).append(Row(r, ids[r], input_ids[r], k, decodings[r]))
        for name, group in engine_rows.items():
            if self.adapters:  # a prefix kept from another adapter's rows holds that adapter's keys and values
                self.engine.forget_prefix()
            with self.adapters.use(name) if self.adapters else contextlib.nullcontext():
                if self.setup.job.generation.prompt_logprobs:  # a scoring job: prompts read, nothing generated
                    pad, on_error = self.tokenizer.pad_token_id, self.setup.job.output.on_row_error
                    finished = scoring.score(self.model, group, pad, on_error)
                else:
                    finished = self.engine.generate(group)
                yield from self._generate(task, input_ids, finished, batch_of, done)
        table = shard_rows.shard_table(
            task,
            rows,
            samples,
            batch_of,
            done,
            self.static_columns,
            self.schema,
            self.setup.carry_schema.names,
            self._own_columns(decodings, names),
        )
        totals = self._commit(task, table, ids)
        yield ShardDone(
            worker=self.name,
            shard_id=task.shard_id,
            file=task.file_name,
            totals=totals,
            redone=sum(len(s) for s in samples.values()) if task.redo else 0,
            generated_steps=sum(f.steps for f in done.values()),
            started_at=started_at,
            ended_at=time.time(),
            ignored_settings=self.ignored,
        )

    def _own_columns(self, decodings: list[Any], adapters: list[str | None]) -> dict[int, dict[str, Any]]:
        """The columns of rows with settings or an adapter of their own (by position), over the job's."""
        settings: dict[Any, dict[str, Any]] = {}
        for d in {d for d in decodings if d is not None and d is not self.row_decodings.job}:
            settings[d] = row_columns(self.static_columns, d)
        own: dict[int, dict[str, Any]] = {}
        for r, d in enumerate(decodings):
            if d in settings:
                own[r] = settings[d]
        if self.setup.adapters:
            for r, name in enumerate(adapters):
                own[r] = {**own.get(r, {}), "adapter": self.setup.adapters[name] if name else None}
        return own

    def _row_decodings(self, rows: pa.Table) -> list[Any]:
        """Each row's own `Decoding` (None: it decodes with the job's), from its settings column."""
        if SETTINGS not in rows.column_names:
            return [None] * rows.num_rows
        return [self.row_decodings.of(v) for v in rows.column(SETTINGS).to_pylist()]

    def _generate(
        self,
        task: ShardTask,
        input_ids: list[list[int]],
        finished: Iterator[Any],
        batch_of: dict[int, shard_rows.BatchTally],
        done: dict[tuple[int, int], Any],
    ) -> Iterator[BatchDone]:
        """Take the rows' `Finished` sequences as they end (from the engine, or scoring), filling `done`;
        a `BatchDone` as each planned batch completes."""
        counted, last_event = self.engine.counts(), time.perf_counter()
        for f in finished:
            now = time.perf_counter()
            done[(f.key, f.sample_index)] = f
            tally = batch_of[f.key]
            tally.add(f, len(input_ids[f.key]), now)
            if not tally.complete:
                continue
            counts = self.engine.counts()
            oom, read, empty = (a - b for a, b in zip(counts, counted))  # since the previous event
            yield tally.event(self.name, task.shard_id, now - last_event, oom, read, empty)
            counted, last_event = counts, now

    def _commit(self, task: ShardTask, table: pa.Table, ids: list[str]) -> ShardTotals:
        """Write the shard's file (over its committed rows, for a redo); return what its footer records."""
        if task.redo:
            table = shard_rows.over_committed(
                self._committed(task), table, task.redo, ids, self.setup.job.generation.num_return_sequences
            )
        totals = store.shard_totals(table)
        metadata = {**self.schema.metadata, store.META_PLAN: task.fingerprint.encode()}
        metadata[store.META_TOTALS] = json.dumps(totals).encode()
        store.write_shard(self.out, task.file_name, table.replace_schema_metadata(metadata))
        return ShardTotals(**totals)

    def _committed(self, task: ShardTask) -> pa.Table:
        import pyarrow.parquet as pq

        with self.out.fs.open_input_file(self.out.join(task.file_name)) as f:
            return pq.read_table(f).select(self.schema.names).cast(self.schema)
