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
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from runner import cluster, plan, store
from runner.config import JobConfig, default_samples, planned_batch_rows
from runner.driver import checks
from runner.driver.seen_ids import SeenIds
from runner.errors import SHOW, ConfigError
from runner.input import ChunkMeta, ChunkPreparer, PrepareSpec, chunk_digest, read_chunks, resolve_source
from runner.secrets import redact
from runner.tasks import ShardTask

log = logging.getLogger(__name__)
CHUNK_ROWS = 4096  # rows one preparation call handles
COUNTED = ("rows", "prompt_tokens", "padded_prompt_tokens", "truncated")  # what a window's record counts


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
    skipped_windows: int = 0  # committed windows counted from their records, not prepared again
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
        records: the run directory's window records: committed windows are skipped unprepared, and each
            window planned is recorded (None: neither, a dry run).
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
        records: store.WindowRecords | None = None,
    ):
        self.job, self.spec, self.config_hash, self.existing = job, spec, config_hash, existing
        self.records = records
        self._digests: dict[int, str] = {}  # raw digest of each window read and not yet planned
        self._window_ids: dict[int, Any] = {}  # id hashes of committed windows read and not yet counted
        self._skipping = True  # every window read so far was committed and skipped
        self._preparers: list[Any] = []  # a job's preparers, kept (rebuilding lost rows) until `close`
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
        count = 0
        first = None
        for window in self._prepared():
            count += 1
            if isinstance(window, store.WindowRecord):  # committed: skipped unprepared
                yield self._skip_window(window)
                continue
            first = window if count == 1 else None
            yield self._plan_window(window, count - 1)
        self.stats.prepared_s = time.time() - self.stats.started
        if count == 0:
            yield self._plan_window([], 0)
        self.single_window = first if count == 1 else None
        if self.stats.skipped_windows:
            log.warning(
                "resuming: %d of %d windows are committed and were not prepared again",
                self.stats.skipped_windows,
                count,
            )
        self.finished = True

    def close(self) -> None:
        """Stop the preparers kept for the job's shards (call once every shard ran, or the job failed)."""
        if self._preparers:
            cluster.stop_preparers(self._preparers)

    def _prepared(self) -> Iterator[list[tuple[ChunkMeta, Any]] | store.WindowRecord]:
        """Each window in input order: its prepared chunks, or the record of a committed one (not prepared).

        Raw chunks are gathered into windows of at least `batching.sort_window` rows as they are read. A
        window with no record of an earlier run goes to the preparers chunk by chunk as it is read; one with
        a record is read whole first, and not prepared if its raw rows are what that run planned into
        shards that are all committed (`_committed_window`).
        """
        size = self.job.batching.sort_window
        if self.cached is not None:
            window: list[tuple[ChunkMeta, Any]] = []
            for item in self.cached:
                window.append(item)
                if sum(m.rows for m, _ in window) >= size:
                    yield window
                    window = []
            if window:
                yield window
            return
        chunks = read_chunks(resolve_source(self.job.dataset), self.job.dataset, self.chunk_rows)
        order: deque[store.WindowRecord | int] = deque()  # per window read: its record, or its chunks to prepare
        if self.use_ray:
            keep = self._preparers if self.records is not None else None  # a job's: kept until its shards ran
            # Preparers step aside for the workers after the first window; a dry run (no `existing`) has none.
            ahead = size if self.existing is not None else float("inf")
            prepared = cluster.prepare_on_cluster(self.spec, self._to_prepare(chunks, order), ahead, keep)
        else:
            local = ChunkPreparer(self.spec)
            prepared = (local.prepare(chunk) for chunk in self._to_prepare(chunks, order))
        ready: deque[tuple[ChunkMeta, Any]] = deque()
        done = False

        def pull() -> None:  # one more chunk prepared (reading on, so more windows are known)
            nonlocal done
            try:
                ready.append(next(prepared))
            except StopIteration:
                done = True

        while True:
            while not order and not done:
                pull()
            if not order:
                return
            entry = order.popleft()
            if isinstance(entry, store.WindowRecord):
                yield entry
                continue
            while len(ready) < entry:
                pull()
            yield [ready.popleft() for _ in range(entry)]

    def _to_prepare(self, chunks: Iterator[Any], order: deque) -> Iterator[Any]:
        """The raw chunks to prepare; appends to `order`, per window, its record (skipped) or its chunk count.

        Only the committed windows at the start of the input are skipped: a window's shard and batch ids
        (and so its shards' names) follow from the windows before it, which must then be the same too.
        """
        index, held, digest, count, taken = 0, 0, None, 0, []
        streaming = True
        for chunk in chunks:
            if not count:  # a window starts
                streaming = not (self._skipping and self.records is not None and self.records.has(index))
            if self.records is not None:
                digest = chunk_digest(chunk, digest)
            count += 1
            held += chunk.rows
            if streaming:
                yield chunk  # prepared as read: the driver keeps no raw rows
            else:
                taken.append(chunk)
            if held >= self.job.batching.sort_window:
                yield from self._window_read(index, count, taken, digest, order)
                index, held, digest, count, taken = index + 1, 0, None, 0, []
        if count:
            yield from self._window_read(index, count, taken, digest, order)

    def _window_read(self, index: int, count: int, taken: list[Any], digest: Any, order: deque) -> Iterator[Any]:
        """A window read whole: skipped (its record to `order`), or its `count` chunks to prepare (`taken`: the
        ones held back to decide, none when they were sent as read)."""
        if digest is not None:
            self._digests[index] = digest.hexdigest()  # recorded with the window once it is planned
        record = self._committed_window(index) if taken else None
        if record is not None:
            order.append(record)
            return
        self._skipping = False
        order.append(count)
        yield from taken

    def _committed_window(self, index: int) -> store.WindowRecord | None:
        """The record of a window an earlier run planned from these raw rows, if all its shards are committed."""
        if self.records is None or self.existing is None:
            return None
        record = self.records.get(index, self._digests[index])
        if record is None or any(name in self.existing.redo for _, name, _, _ in record.shards):
            return None
        if not all(self.existing.committed(shard_id, name) for shard_id, name, _, _ in record.shards):
            return None
        ids = self.records.ids(record)
        if ids is None:
            return None
        self._window_ids[index] = ids
        del self._digests[index]
        return record

    def _skip_window(self, record: store.WindowRecord) -> list[ShardTask]:
        """Count a committed window from its record, as planning it again would have."""
        s, c = self.stats, record.counts
        s.windows += 1
        s.skipped_windows += 1
        for key in (*COUNTED, "outputs"):
            setattr(s, key, getattr(s, key) + c[key])
        s.batches += record.batches
        s.shards += len(record.shards)
        s.committed_shards += len(record.shards)
        s.committed_rows += c["rows"]
        s.committed_outputs += c["outputs"]
        first_shard = record.shards[0][0] if record.shards else len(self.shards)
        if first_shard != len(self.shards) or record.first_batch != self._next_batch:
            raise ConfigError(  # cannot happen while only the leading windows are skipped; a damaged record
                [
                    f"_windows/ of output.dir records window {record.index + 1} as shards from "
                    f"{first_shard} and batches from {record.first_batch}, but the windows before it "
                    f"planned {len(self.shards)} shards and {self._next_batch} batches; remove that folder "
                    "and rerun (committed shards are kept)"
                ],
                title="output.dir's window records do not match its plan",
            )
        if self.carry_schema is not None and not record.schema().equals(self.carry_schema):
            raise ConfigError(
                [
                    f"window {record.index + 1} (committed by an earlier run) carries the input columns "
                    f"{record.schema()}, the windows before it {self.carry_schema}; give the columns one type in "
                    "every file"
                ],
                title=f"bad input in {redact(self.job.dataset.path)}",
            )
        ids = self._window_ids.pop(record.index)
        repeated = int(self._seen_ids.contains(ids).sum())  # the earlier windows' ids, prepared or skipped
        if repeated:
            raise ConfigError(
                [
                    f"dataset.id_column={self.job.dataset.id_column!r}: ids must be unique, but {repeated} ids of "
                    f"window {record.index + 1} (rows an earlier run committed, not prepared again) repeat ids of "
                    "earlier "
                    "rows, which changed since that run; deduplicate the input, or set dataset.id_column=null to use "
                    "row numbers"
                ],
                title=f"bad input in {redact(self.job.dataset.path)}",
            )
        self._seen_ids.add(ids)
        if self.carry_schema is None:
            self.carry_schema = record.schema()
        self._next_batch += record.batches
        self.shards += [PlannedShard(shard_id, name, rows, outputs) for shard_id, name, rows, outputs in record.shards]
        return []

    def _plan_window(self, window: list[tuple[ChunkMeta, Any]], index: int) -> list[ShardTask]:
        metas = [m for m, _ in window]
        self._check(window)
        if not metas or sum(m.rows for m in metas) == 0:
            return []
        before = {key: getattr(self.stats, key) for key in COUNTED}
        first_shard = len(self.shards)
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
        digest = self._digests.pop(index, None)
        if self.records is not None and digest is not None:
            counts = {key: getattr(self.stats, key) - before[key] for key in before}
            counts["outputs"] = int(samples.sum())
            record = store.WindowRecord(
                index=index,
                digest=digest,
                first_batch=self._next_batch - the_plan.num_batches,
                config_hash=self.config_hash,
                model_revision=self.records.model_revision,
                batches=the_plan.num_batches,
                shards=[[p.shard_id, p.name, p.rows, p.outputs] for p in self.shards[first_shard:]],
                counts=counts,
                carry_schema=store.WindowRecord.encode_schema(self.carry_schema),
            )
            try:
                self.records.write(record, np.unique(np.concatenate([m.id_hashes for m in metas])))
            except OSError as e:  # records only save a rerun's preparation: the job goes on without this one
                log.warning("could not record window %d in _windows/ (%s): a rerun prepares it again", index + 1, e)
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
        checks.raise_chunk_problems(metas, self.job, self.spec.context)
        self.carry_schema = checks.carried_schema(self.carry_schema, metas, self.job.dataset.path)
        self._check_ids(window)

    def _check_ids(self, window: list[tuple[ChunkMeta, Any]]) -> None:
        hashes = np.concatenate([m.id_hashes for m, _ in window]) if window else np.zeros(0, np.uint64)
        unique, counts = np.unique(hashes, return_counts=True)
        repeated = set(unique[counts > 1].tolist())
        repeated |= set(unique[self._seen_ids.contains(unique)].tolist())
        if repeated:
            raise ConfigError(
                [
                    f"dataset.id_column={self.job.dataset.id_column!r}: ids must be unique, but these repeat: "
                    f"{checks.name_ids(window, repeated)}; deduplicate the input, or set dataset.id_column=null "
                    "to use row numbers"
                ],
                title=f"bad input in {redact(self.job.dataset.path)}",
            )
        self._seen_ids.add(unique)
