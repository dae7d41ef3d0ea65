"""Preparer actors: raw chunks of input prepared in parallel on the cluster's CPUs.

One preparer per CPU of the cluster (at most `MAX_PREPARERS`, and no more than there are chunks),
spread over the nodes. They
ask for no CPU so they never wait behind CPU workers holding every core, and once the first window
is prepared they run only on CPU time the workers leave idle; each prepares one
chunk at a time, and a few more chunks wait in their queues so no core idles while the
driver plans. The prepared rows stay in the object store: the driver gets each chunk's
`ChunkMeta` and an object ref to its rows, which the worker that generates them fetches.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from runner.input import ChunkMeta, ChunkPreparer, PrepareSpec, RawChunk

MAX_PREPARERS = 16  # preparation actors at most, however many CPUs the cluster has


def prepare_on_cluster(
    spec: PrepareSpec, chunks: Iterable[RawChunk], first_rows: int = 0
) -> Iterator[tuple[ChunkMeta, Any]]:
    """Each chunk's (meta, object ref of its prepared rows), in input order.

    Args:
        first_rows: rows prepared at normal priority before the preparers step aside for the workers
            (the first window: workers start only once it is planned, so nothing runs beside it yet).
    """
    import ray

    count = min(MAX_PREPARERS, max(1, int(ray.cluster_resources().get("CPU", 1))))
    # A preparer whose node is lost is started again elsewhere and its chunks prepared again (they are
    # deterministic): without restarts a lost node ended the job with a raw traceback.
    preparer = ray.remote(ChunkPreparer).options(
        num_cpus=0, scheduling_strategy="SPREAD", max_restarts=-1, max_task_retries=-1
    )
    actors: list[Any] = []  # started as chunks come: an input of one chunk starts one preparer, not one per CPU
    pending: deque = deque()
    sent = 0
    try:
        for k, chunk in enumerate(chunks):
            if len(actors) < count:
                actors.append(preparer.remote(spec))
            background, sent = sent >= first_rows, sent + chunk.rows
            pending.append(actors[k % count].prepare.options(num_returns=2).remote(chunk, background))
            if len(pending) >= 2 * count + 2:
                meta_ref, rows_ref = pending.popleft()
                yield ray.get(meta_ref), rows_ref
        while pending:
            meta_ref, rows_ref = pending.popleft()
            yield ray.get(meta_ref), rows_ref
    finally:
        for actor in actors:
            ray.kill(actor)


def fetch(ref: Any) -> Any:
    """What an object ref holds (a table of prepared rows)."""
    import ray

    return ray.get(ref)
