"""The id hashes a job has seen so far, to find an id that repeats in a later window.

Held as sorted runs whose sizes at least halve from one to the next, merged like a binary
counter's carries: adding a window's w hashes costs O(w log N) amortized and checking them
O(w log^2 N), where N is every hash seen so far. One sorted array merged with each window
(`np.union1d`) would copy all N hashes every window: quadratic over a job, hours at 100M rows.
8 bytes a hash either way. Pure numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class SeenIds:
    def __init__(self) -> None:
        self.runs: list[Any] = []  # sorted uint64 arrays, each at least twice the size of the next

    def __len__(self) -> int:
        return sum(len(run) for run in self.runs)

    def contains(self, hashes: Any) -> Any:
        """Which of `hashes` were seen (a bool array in their order)."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        found = np.zeros(len(hashes), dtype=bool)
        for run in self.runs:
            at = np.searchsorted(run, hashes).clip(max=len(run) - 1)
            found |= run[at] == hashes
        return found

    def add(self, hashes: Any) -> None:
        """Add hashes none of which were seen (unique among themselves: `np.unique`'s output)."""
        run = np.sort(np.asarray(hashes, dtype=np.uint64))
        if not len(run):
            return
        while self.runs and len(self.runs[-1]) <= 2 * len(run):
            run = _merge(self.runs.pop(), run)
        self.runs.append(run)


def _merge(a: Any, b: Any) -> Any:
    """Two sorted arrays as one sorted array."""
    out = np.concatenate([a, b])
    out.sort(kind="stable")  # timsort finds the two runs: a linear merge
    return out
