"""Id hashes seen so far: the same answers as a set, in runs that merge like a binary counter."""

from __future__ import annotations

import numpy as np

from runner.driver.seen_ids import SeenIds


def test_seen_ids_answer_as_a_set_does_over_many_windows():
    rng = np.random.default_rng(7)
    seen, reference = SeenIds(), set()
    for _ in range(300):
        size = int(rng.integers(1, 400))
        hashes = np.unique(rng.integers(0, 2**64 - 1, size=size, dtype=np.uint64))
        probe = np.concatenate([hashes, np.array(sorted(reference)[:5], dtype=np.uint64)])
        assert seen.contains(probe).tolist() == [int(h) in reference for h in probe.tolist()]
        fresh = hashes[~seen.contains(hashes)]
        seen.add(fresh)
        reference |= set(fresh.tolist())
        assert len(seen) == len(reference)
        assert all(np.all(run[:-1] < run[1:]) for run in seen.runs)  # each run sorted, no repeats
    sizes = [len(run) for run in seen.runs]
    assert all(a > 2 * b for a, b in zip(sizes, sizes[1:]))  # runs halve: about log2(N) of them
    assert len(sizes) <= int(np.log2(len(reference))) + 1


def test_the_largest_hash_and_an_empty_window():
    seen = SeenIds()
    assert seen.contains(np.array([5], dtype=np.uint64)).tolist() == [False]
    seen.add(np.array([], dtype=np.uint64))
    top = np.array([2**64 - 1], dtype=np.uint64)
    seen.add(top)
    assert seen.contains(np.array([2**64 - 1, 0], dtype=np.uint64)).tolist() == [True, False]
