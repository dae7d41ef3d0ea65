"""Progress totals: a shard redone after its worker died is not counted twice."""

from __future__ import annotations

from runner.progress import ProgressBar


def batch(shard_id: int, rows: int) -> dict:
    return {
        "event": "batch",
        "worker": "w",
        "shard_id": shard_id,
        "batch_id": 0,
        "rows": rows,
        "sequences": rows,
        "prompt_tokens": 10 * rows,
        "padded_prompt_tokens": 12 * rows,
        "completion_tokens": 5 * rows,
        "generated_steps": 6 * rows,
        "latency_s": 0.1,
    }


def test_a_retried_shard_counts_its_rows_once():
    bar = ProgressBar(total_rows=6, enabled=False)
    bar(batch(0, 2))
    bar(batch(1, 2))  # shard 1's worker then dies
    bar({"event": "retry", "shard_id": 1, "error": "actor died"})
    bar(batch(1, 2))
    bar(batch(1, 2))
    bar(batch(0, 0))
    totals = bar.close()
    assert totals.rows == 6 and totals.sequences == 6 and totals.retries == 1
    assert bar.rows_done == 6
