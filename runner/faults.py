"""Faults injected on purpose, so that the failure tests drive the real recovery paths.

Nothing is injected unless the environment variable RUNNER_FAULTS holds a JSON object
(the failure tests set it; a job started by the driver passes it on to its workers):

    {"shard_error": {"3": 1}}         shard 3 raises in its first attempt (of any worker)
    {"shard_hang": {"2": 1}}          shard 2's worker sleeps forever in its first attempt
    {"row_error": ["q-7"]}            decoding the row with id q-7 raises (only that row fails)
    {"write_error": {"part-000001": 2}}  the first 2 writes of files named part-000001* fail (OSError)
    {"prepare_delay": 4}              preparing each chunk of input takes 4 s more (slow preparation:
                                      later windows are still being prepared while workers generate)
    {"fetch_whole_chunks": true}      workers copy every chunk their shard takes rows from whole (how
                                      they fetched before preparers served slices: a benchmark's baseline)
"""

from __future__ import annotations

import json
import os
import time
from functools import cache
from typing import Any

ENV = "RUNNER_FAULTS"


class InjectedFault(RuntimeError):
    """An error raised on purpose by a failure test."""


@cache
def _faults() -> dict[str, Any]:
    text = os.environ.get(ENV)
    return json.loads(text) if text else {}


_writes: dict[str, int] = {}


def on_shard(shard_id: int, attempt: int) -> None:
    """Raise, or hang, when a test asked for it for this attempt of the shard."""
    f = _faults()
    if attempt <= int(f.get("shard_error", {}).get(str(shard_id), 0)):
        raise InjectedFault(f"injected error in shard {shard_id}, attempt {attempt}")
    if attempt <= int(f.get("shard_hang", {}).get(str(shard_id), 0)):
        while True:
            time.sleep(60)


def on_prepare() -> None:
    """Sleep as long as a test asked each chunk's preparation to take more."""
    delay = float(_faults().get("prepare_delay", 0))
    if delay:
        time.sleep(delay)


def fetch_whole_chunks() -> bool:
    return bool(_faults().get("fetch_whole_chunks"))


def failing_rows() -> frozenset[str]:
    return frozenset(_faults().get("row_error", []))


def on_write(name: str) -> None:
    for prefix, times in _faults().get("write_error", {}).items():
        if name.startswith(prefix):
            _writes[prefix] = _writes.get(prefix, 0) + 1
            if _writes[prefix] <= int(times):
                raise OSError(f"injected write failure {_writes[prefix]} of {times} for {name}")
