"""The driver's side of the streaming data path: prepare chunks in parallel, plan window by window.

The input is read in chunks (`runner.input`); each chunk is prepared (parsed, checked,
rendered, tokenized) by preparer actors on the cluster's CPUs, and the prepared rows stay
in the object store. The driver receives per row only its token count and two hashes,
gathers chunks into windows of `batching.sort_window` rows, and plans each window: sort
by length, cut batches, group shards. A shard task names the prepared rows it needs by
object ref; the worker fetches them. So the driver holds one window's lengths and hashes,
not the dataset, and workers start on the first window while later ones are prepared.

What the driver keeps for the whole job grows by 8 bytes a row (the id hashes that find
repeated ids across windows) and about 100 bytes a shard (its file name and row count);
a dry run also keeps every prompt length (4 bytes a row) to compare with a global sort.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from runner import cluster, plan, store
from runner.config import JobConfig, default_samples, planned_batch_rows
from runner.driver.seen_ids import SeenIds
from runner.errors import SHOW, ConfigError, listing
from runner.input import ChunkMeta, ChunkPreparer, PrepareSpec, read_chunks, resolve_source
from runner.secrets import redact
from runner.tasks import ShardTask

log = logging.getLogger(__name__)
CHUNK_ROWS = 4096  # rows one preparation call handles


@dataclass
class PlanStats:
    """What the plan holds so far: the dry run's report, the run's summary."""

    rows: int = 0
    prompt_tokens: int = 0
    padded_prompt_tokens: int = 0  # as the workers read them, in prefill groups
    batches: int = 0
    shards: int = 0
    windows: int = 0
    truncated: int = 0
    committed_shards: int = 0  # already in output.dir from an earlier run
    committed_rows: int = 0
    outputs: int = 0  # output rows: each input row's samples (num_return_sequences, the job's or its own)
    committed_outputs: int = 0
    redo_rows: int = 0  # error rows of committed shards generated again (output.retry_errors)
    longest: list[tuple[int, str]] = field(default_factory=list)  # (tokens, id), longest first
    lengths: list[np.ndarray] | None = None  # every prompt length, when asked for (dry run)
    started: float = field(default_factory=time.time)
    prepared_s: float | None = None

    @property
    def padding_efficiency(self) -> float:
        return self.prompt_tokens / self.padded_prompt_tokens if self.padded_prompt_tokens else 1.0


@dataclass
class PlannedShard:
    shard_id: int
    name: str
    rows: int  # input rows
    outputs: int  # output rows: each input row's num_return_sequences (the job's or its own)


class JobStream:
    """Prepares a job's input in parallel and plans it window by window.

    Args:
        job: the job config.
        spec: what preparing a chunk needs.
        config_hash: mixed into every shard's fingerprint, so another config plans other files.
        existing: what output.dir already holds (None: plan everything, a dry run).
        cached: prepared chunks of the same input from an earlier job of this process (a sweep).
        keep_lengths: keep every prompt length (to compare the windowed plan with a global sort).
    """

    def __init__(
        self,
        job: JobConfig,
        spec: PrepareSpec,
        config_hash: str,
        existing: store.Existing | None,
        cached: list[tuple[ChunkMeta, Any]] | None = None,
        keep_lengths: bool = False,
        use_ray: bool = True,
    ):
        self.job, self.spec, self.config_hash, self.existing = job, spec, config_hash, existing
        self.cached = cached
        self.use_ray = use_ray
        self.chunk_rows = min(CHUNK_ROWS, job.batching.sort_window)  # a window is whole chunks
        self.stats = PlanStats(lengths=[] if keep_lengths else None)
        self.shards: list[PlannedShard] = []
        self.carry_schema: pa.Schema | None = None
        self.single_window: list[tuple[ChunkMeta, Any]] | None = None  # the whole input, when it fit one window
        self.finished = False  # every window planned: the plan is complete
        self._seen_ids = SeenIds()
        self._next_batch = 0

    def windows(self) -> Iterator[list[ShardTask]]:
        """Each window's shard tasks still to run (committed ones skipped), largest shard first."""
        window: list[tuple[ChunkMeta, Any]] = []
        rows, count = 0, 0
        for meta, rows_ref in self._prepared():
            window.append((meta, rows_ref))
            rows += meta.rows
            if rows >= self.job.batching.sort_window:
                count += 1
                yield self._plan_window(window)
                window, rows = [], 0
        self.stats.prepared_s = time.time() - self.stats.started
        if window or count == 0:
            if count == 0:
                self.single_window = list(window)
            yield self._plan_window(window)
        self.finished = True

    def _prepared(self) -> Iterator[tuple[ChunkMeta, Any]]:
        if self.cached is not None:
            yield from self.cached
            return
        source = resolve_source(self.job.dataset)
        chunks = read_chunks(source, self.job.dataset, self.chunk_rows)
        if not self.use_ray:
            local = ChunkPreparer(self.spec)
            for chunk in chunks:
                yield local.prepare(chunk)
            return
        yield from cluster.prepare_on_cluster(self.spec, chunks, first_rows=self.job.batching.sort_window)

    def _plan_window(self, window: list[tuple[ChunkMeta, Any]]) -> list[ShardTask]:
        metas = [m for m, _ in window]
        self._check(window)
        if not metas or sum(m.rows for m in metas) == 0:
            return []
        lengths = np.concatenate([m.lengths for m in metas])
        keys = np.concatenate([m.row_hashes for m in metas])
        n = default_samples(self.job.generation)
        samples = np.concatenate([m.samples if m.samples is not None else np.full(m.rows, n, np.int32) for m in metas])
        where = np.concatenate([np.stack([np.full(m.rows, k), np.arange(m.rows)], 1) for k, m in enumerate(metas)])
        g, b = self.job.generation, self.job.batching
        lengths_list = lengths.tolist()
        the_plan = plan.plan_shards(
            [f"{k:016x}" for k in keys.tolist()],
            lengths_list,
            g.max_new_tokens,
            g.num_return_sequences,
            b.max_batch_tokens,
            planned_batch_rows(b),
            b.shard_size,
            first_shard_id=len(self.shards),
            first_batch_id=self._next_batch,
            salt=self.config_hash,
            groups=np.concatenate([m.groups for m in metas]).tolist() if metas[0].groups is not None else None,
            samples=samples.tolist() if metas[0].samples is not None else None,
        )
        self._next_batch += the_plan.num_batches
        self._count(metas, the_plan, lengths_list)
        self.stats.outputs += int(samples.sum())
        outputs = {s.shard_id: int(samples[np.array(s.rows, dtype=np.int64)].sum()) for s in the_plan.shards}
        tasks = []
        for shard in plan.schedule_order(the_plan):
            name = store.shard_file_name(shard.shard_id, shard.fingerprint)
            redo = None
            if self.existing is not None and self.existing.committed(shard.shard_id, name):
                self.stats.committed_shards += 1
                self.stats.committed_rows += shard.num_rows
                self.stats.committed_outputs += outputs[shard.shard_id]
                redo = self.existing.redo.get(name)
                if redo is None:
                    continue
                self.stats.redo_rows += sum(len(v) for v in redo.values())
            batches, start = [], 0
            for batch in shard.batches:
                batches.append((batch.batch_id, start, start + len(batch.rows)))
                start += len(batch.rows)
            take = where[np.array(shard.rows, dtype=np.int64)]
            used, take[:, 0] = np.unique(take[:, 0], return_inverse=True)  # only the chunks it takes rows from
            tasks.append(
                ShardTask(
                    shard_id=shard.shard_id,
                    file_name=name,
                    fingerprint=shard.fingerprint,
                    batches=batches,
                    parts=[window[k][1] for k in used.tolist()],
                    take=take,
                    redo=redo,
                )
            )
        for shard in sorted(the_plan.shards, key=lambda s: s.shard_id):
            self.shards.append(
                PlannedShard(
                    shard.shard_id,
                    store.shard_file_name(shard.shard_id, shard.fingerprint),
                    shard.num_rows,
                    outputs[shard.shard_id],
                )
            )
        return tasks

    def _count(self, metas: list[ChunkMeta], the_plan: plan.Plan, lengths: list[int]) -> None:
        s = self.stats
        s.windows += 1
        s.rows += len(lengths)
        s.prompt_tokens += sum(lengths)
        s.truncated += sum(m.truncated for m in metas)
        s.batches += the_plan.num_batches
        s.shards += len(the_plan.shards)
        s.padded_prompt_tokens += plan.prompt_tokens_read(the_plan, lengths, self.job.batching.step_cost_tokens)[1]
        s.longest = heapq.nlargest(SHOW, s.longest + [x for m in metas for x in m.longest])
        if s.lengths is not None:
            s.lengths.append(np.asarray(lengths, dtype=np.int32))

    def _check(self, window: list[tuple[ChunkMeta, Any]]) -> None:
        """Every problem of the window's chunks in one error; repeated ids; carried columns that change."""
        metas = [m for m, _ in window]
        problems = [p for m in metas for p in m.problems]
        if problems:
            titles = sorted({m.problem_title for m in metas if m.problems})
            raise ConfigError(problems, title="; ".join(titles))
        too_long = [x for m in metas for x in m.too_long]
        if too_long:
            g = self.job.generation
            shown = listing(f"{i!r} ({n} tokens)" for i, n in too_long)
            raise ConfigError(
                [
                    f"{len(too_long)} prompts are longer than the model's context ({self.spec.context} tokens) minus "
                    f"generation.max_new_tokens={g.max_new_tokens}: {shown}; shorten them, lower max_new_tokens, "
                    + (
                        "or set dataset.too_long=truncate_left to keep their ends"
                        if self.job.dataset.too_long == "refuse"
                        else "or shorten what the chat template puts around them (system prompt, earlier turns): "
                        "with too_long=truncate_left only the user's own text is cut, and that alone is not enough"
                    )
                ],
                title=f"bad input in {redact(self.job.dataset.path)}",
            )
        self._check_columns(metas)
        self._check_ids(window)

    def _check_columns(self, metas: list[ChunkMeta]) -> None:
        for m in metas:
            if self.carry_schema is None:
                # A column with no value in the first chunk is carried as text.
                self.carry_schema = pa.schema(
                    [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in m.carry_schema]
                )
                continue
            self._check_types(m)
            new = [n for n in m.carry_schema.names if n not in self.carry_schema.names]
            if new:
                raise ConfigError(
                    [
                        f"{m.file}: column(s) {', '.join(map(repr, new))} first appear at row {m.first_row} of the "
                        f"input; the columns carried to the output are those of its first rows "
                        f"({', '.join(self.carry_schema.names) or 'none'}). Add them (null) to the first rows, or "
                        "drop them"
                    ],
                    title=f"bad input in {redact(self.job.dataset.path)}",
                )

    def _check_types(self, m: ChunkMeta) -> None:
        """A carried column keeps the type of the first rows (null, or anything as text, aside)."""
        for f in m.carry_schema:
            if f.name not in self.carry_schema.names:
                continue
            want = self.carry_schema.field(f.name).type
            nested = pa.types.is_nested(f.type)  # lists, objects: no text to carry them as
            if f.type == want or pa.types.is_null(f.type) or (pa.types.is_string(want) and not nested):
                continue
            if nested and pa.types.is_string(want):
                raise ConfigError(
                    [
                        f"{m.file}: column {f.name!r} holds {f.type} values from row {m.first_row} of the input on, "
                        "but only nulls or text in its first rows, which fixed it as a text column; give its first "
                        "rows a value of that shape, put those rows first, or drop the column"
                    ],
                    title=f"bad input in {redact(self.job.dataset.path)}",
                )
            if pa.types.is_integer(f.type) and pa.types.is_floating(want):
                continue
            raise ConfigError(
                [
                    f"{m.file}: column {f.name!r} holds {f.type} values from row {m.first_row} of the input on, "
                    f"but {want} in its first rows; give the column one type in every file"
                ],
                title=f"bad input in {redact(self.job.dataset.path)}",
            )

    def _check_ids(self, window: list[tuple[ChunkMeta, Any]]) -> None:
        hashes = np.concatenate([m.id_hashes for m, _ in window]) if window else np.zeros(0, np.uint64)
        unique, counts = np.unique(hashes, return_counts=True)
        repeated = set(unique[counts > 1].tolist())
        repeated |= set(unique[self._seen_ids.contains(unique)].tolist())
        if repeated:
            raise ConfigError(
                [
                    f"dataset.id_column={self.job.dataset.id_column!r}: ids must be unique, but these repeat: "
                    f"{self._name_ids(window, repeated)}; deduplicate the input, or set dataset.id_column=null "
                    "to use row numbers"
                ],
                title=f"bad input in {redact(self.job.dataset.path)}",
            )
        self._seen_ids.add(unique)

    def _name_ids(self, window: list[tuple[ChunkMeta, Any]], hashes: set[int]) -> str:
        named = []
        for meta, rows_ref in window:
            hits = [i for i, h in enumerate(meta.id_hashes.tolist()) if h in hashes]
            if hits:
                rows = rows_ref if isinstance(rows_ref, pa.Table) else cluster.fetch(rows_ref)
                ids = rows.column("id").to_pylist()
                named += [f"{ids[i]!r} (row {meta.first_row + i})" for i in hits]
        return listing(named)
