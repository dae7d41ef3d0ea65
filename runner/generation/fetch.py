"""How a worker gets its shard's prepared rows from the object store.

A shard's parts are the chunks of its window it takes rows from, and a length-sorted shard takes a
few rows from nearly every chunk of its window: copying whole chunks would put every window on every
node that runs one of its shards. So, per chunk:
- in this node's object store already: read in place (no copy);
- elsewhere, and its preparer still holds it (`HeldRows`): that preparer, on the chunk's node, sends
  only the rows this shard takes (a preparer lost with its node is restarted by Ray, which prepares the
  chunk again there first);
- small (under `SLICE_MIN_BYTES`), with no holder (a sweep's later points), or its preparer stopped:
  the whole chunk, which Ray rebuilds first when it was lost.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from runner import faults
from runner.tasks import HeldRows

log = logging.getLogger(__name__)
SLICE_MIN_BYTES = 1 << 20  # a smaller chunk is fetched whole: a slice would save little, and small results
# are kept by their owner (the driver) rather than on the preparer's node


def fetch_parts(parts: list[Any], take: Any) -> tuple[list[pa.Table], np.ndarray]:
    """The shard's parts as tables, and `take` (part, row within the part) for those tables.

    A part fetched as a slice holds only the rows the shard takes from it, in the order it takes them.
    """
    take = np.asarray(take, dtype=np.int64).reshape(-1, 2)
    parts = list(parts)
    refs = {k: p.ref if isinstance(p, HeldRows) else p for k, p in enumerate(parts) if not isinstance(p, pa.Table)}
    if not refs:
        return parts, take
    import ray

    take = take.copy()
    for k, positions, rows in _slices(parts, refs, take):
        parts[k] = rows
        take[positions, 1] = np.arange(len(positions))
    whole = [k for k in refs if not isinstance(parts[k], pa.Table)]
    for k, table in zip(whole, ray.get([refs[k] for k in whole])):
        parts[k] = table
    return parts, take


def _slices(parts: list[Any], refs: dict[int, Any], take: np.ndarray) -> list[tuple[int, np.ndarray, pa.Table]]:
    """(part, its positions in `take`, the rows at them) for each held part on another node whose holder
    answered; the others are left to be fetched whole."""
    import ray
    from ray.exceptions import ActorDiedError, ObjectLostError, RayActorError
    from ray.experimental import get_object_locations

    held = [k for k in refs if isinstance(parts[k], HeldRows)]
    if not held or faults.fetch_whole_chunks():
        return []
    here = ray.get_runtime_context().get_node_id()
    where = get_object_locations([refs[k] for k in held])
    asked = []
    for k in held:
        found = where.get(refs[k], {})
        if here in found.get("node_ids", []) or (found.get("object_size") or 0) < SLICE_MIN_BYTES:
            continue  # in this node's store: read in place; or small (or not yet anywhere): fetched whole
        if parts[k].holder in _gone:
            continue
        positions = np.nonzero(take[:, 0] == k)[0]
        call = parts[k].holder.take.options(concurrency_group="take")
        asked.append((k, positions, call.remote(refs[k], pa.array(take[positions, 1]))))
    got = []
    for k, positions, ref in asked:
        try:
            got.append((k, positions, ray.get(ref)))
        except ActorDiedError:  # stopped for good: its chunks whole from now on, rebuilt if lost
            if parts[k].holder not in _gone:
                _gone.add(parts[k].holder)
                log.warning("a preparer that holds this job's prepared rows was stopped: its chunks are fetched whole")
        except (RayActorError, ObjectLostError) as e:  # unreachable for now, or the slice lost: this chunk whole
            log.warning("part %d of this shard is fetched whole: its preparer did not answer (%s)", k, type(e).__name__)
    return got


_gone: set[Any] = set()  # handles of the preparers this process found stopped
