"""Preparer actors: raw chunks of input prepared in parallel on the cluster's CPUs.

One preparer per CPU of the cluster (at most `MAX_PREPARERS`, and no more than there are chunks),
spread over the nodes. They
ask for no CPU so they never wait behind CPU workers holding every core, and once the first window
is prepared they run only on CPU time the workers leave idle; each prepares one
chunk at a time, and a few more chunks wait in their queues so no core idles while the
driver plans. The prepared rows stay in the object store: the driver gets each chunk's
`ChunkMeta` and an object ref to its rows, which the worker that generates them fetches.

A job's preparers stay until its last shard ran, and serve the rows a shard takes from each chunk
they made (`take`, on threads of its own beside the one preparing): a length-sorted shard takes a
few rows from nearly every chunk of its window, and a worker on another node copies only those, not
every chunk (`runner.generation.fetch`). A take may still wait for Python's lock while a chunk is being
prepared at idle priority on a node whose CPUs are all busy.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from runner.input import ChunkMeta, ChunkPreparer, PrepareSpec, RawChunk
from runner.tasks import HeldRows

MAX_PREPARERS = 16  # preparation actors at most, however many CPUs the cluster has
PREPARE_ATTEMPTS = 3  # times a chunk lost with its node is prepared again before the job gives up
TAKE_THREADS = 2  # a preparer's threads serving shards' rows (beside the one preparing)
log = logging.getLogger(__name__)


def _lost_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ObjectLostError, RayActorError

    return (ObjectLostError, RayActorError)  # ObjectLostError covers reconstruction that failed too


def prepare_on_cluster(
    spec: PrepareSpec, chunks: Iterable[RawChunk], first_rows: float = 0, keep: list[Any] | None = None
) -> Iterator[tuple[ChunkMeta, Any]]:
    """Each chunk's (meta, object ref of its prepared rows), in input order.

    Args:
        first_rows: rows prepared at normal priority before the preparers step aside for the workers
            (the first window: workers start only once it is planned, so nothing runs beside it yet).
        keep: where to put the preparers instead of stopping them at the end: while they live, prepared
            rows lost with a node before their shard ran are rebuilt by Ray (lineage reconstruction runs
            the preparing call again), and each chunk's rows come as `HeldRows` whose holder serves a
            shard the rows it takes; the caller stops them (`stop_preparers`) once every shard ran.
    """
    import ray

    lost_errors = _lost_errors()
    count = min(MAX_PREPARERS, max(1, int(ray.cluster_resources().get("CPU", 1))))
    # A preparer whose node is lost is started again elsewhere (max_restarts), and a chunk it was preparing
    # or had prepared there is prepared again (chunks are deterministic): `result` below, and Ray's lineage
    # reconstruction for rows a worker fetches later (max_task_retries).
    preparer = ray.remote(concurrency_groups={"take": TAKE_THREADS})(ChunkPreparer)
    options = {"num_cpus": 0, "scheduling_strategy": "SPREAD", "max_restarts": -1, "max_task_retries": -1}
    actors: list[Any] = keep if keep is not None else []  # started as chunks come: not one per CPU for one chunk
    pending: deque[_Pending] = deque()
    sent = submitted = 0

    def submit(p: _Pending) -> None:
        nonlocal submitted
        p.holder = actors[submitted % len(actors)]
        p.meta, p.rows = p.holder.prepare.options(num_returns=2).remote(p.chunk, p.background)
        submitted += 1

    def result(p: _Pending) -> tuple[ChunkMeta, Any]:
        while True:
            try:
                meta = ray.get(p.meta)
                return meta, (HeldRows(p.rows, p.holder) if keep is not None else p.rows)
            except lost_errors as e:
                p.attempts += 1
                if p.attempts >= PREPARE_ATTEMPTS:
                    raise
                c = p.chunk
                log.warning(
                    "rows %d-%d (%s) were lost with their node before they were planned (%s): preparing them "
                    "again (try %d of %d)",
                    c.first_row,
                    c.first_row + c.rows - 1,
                    c.file,
                    type(e).__name__,
                    p.attempts + 1,
                    PREPARE_ATTEMPTS,
                )
                submit(p)

    try:
        for chunk in chunks:
            if len(actors) < count:
                actors.append(preparer.options(**options).remote(spec))
            background, sent = sent >= first_rows, sent + chunk.rows
            pending.append(_Pending(chunk, background))
            submit(pending[-1])
            if len(pending) >= 2 * count + 2:
                yield result(pending.popleft())
        while pending:
            yield result(pending.popleft())
    finally:
        if keep is None:
            stop_preparers(actors)


def stop_preparers(actors: list[Any]) -> None:
    """Stop the preparers `prepare_on_cluster` kept."""
    import ray

    for actor in actors:
        ray.kill(actor)
    actors.clear()


@dataclass
class _Pending:
    """A chunk sent to a preparer: its refs, and how many times it was prepared."""

    chunk: RawChunk
    background: bool
    meta: Any = None
    rows: Any = None
    holder: Any = None  # the preparer it was sent to
    attempts: int = 0


def fetch(ref: Any) -> Any:
    """What an object ref (or `HeldRows`) holds: a table of prepared rows."""
    import ray

    return ray.get(ref.ref if isinstance(ref, HeldRows) else ref)


def unheld(chunks: list[tuple[ChunkMeta, Any]]) -> list[tuple[ChunkMeta, Any]]:
    """The chunks with plain object refs: for a later job, once the preparers that hold them are stopped."""
    return [(meta, rows.ref if isinstance(rows, HeldRows) else rows) for meta, rows in chunks]
