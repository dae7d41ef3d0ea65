"""Progress totals: a shard redone after its worker died is not counted twice: rows, tokens, steps, busy time."""

from __future__ import annotations

from runner.driver.progress import ProgressBar
from runner.tasks import BatchDone, ShardDone, ShardRetried, ShardTotals


def batch(shard_id: int, rows: int, worker: str = "w") -> BatchDone:
    return BatchDone(
        worker=worker,
        shard_id=shard_id,
        batch_id=0,
        rows=rows,
        sequences=rows,
        prompt_tokens=10 * rows,
        padded_prompt_tokens=12 * rows,
        completion_tokens=5 * rows,
        generated_steps=6 * rows,
        padded_length=12,
        latency_s=0.1,
    )


def test_a_retried_shard_counts_its_rows_once():
    bar = ProgressBar(total_rows=6, enabled=False)
    bar(batch(0, 2))
    bar(batch(1, 2))  # shard 1's worker then dies
    bar(ShardRetried(1, "actor died"))
    bar(batch(1, 2))
    bar(batch(1, 2))
    bar(batch(0, 0))
    totals = bar.close()
    assert totals.rows == 6 and totals.sequences == 6 and totals.retries == 1
    assert bar.rows_done == 6


def test_a_retried_shard_leaves_no_trace_of_its_failed_attempt_in_tokens_steps_or_busy_time():
    bar = ProgressBar(total_rows=4, enabled=False)
    bar(batch(0, 2, worker="a"))
    bar(ShardDone(worker="a", shard_id=0, file="f0", totals=ShardTotals(2, 0, 20, 10, ["r"])))
    bar(batch(1, 1, worker="b"))  # shard 1 fails on worker b after one batch, then runs whole on a
    bar(ShardRetried(1, "ValueError: boom"))
    bar(batch(1, 2, worker="a"))
    totals = bar.close()
    assert (totals.rows, totals.prompt_tokens, totals.padded_prompt_tokens) == (4, 40, 48)
    assert (totals.completion_tokens, totals.generated_steps, totals.batches) == (20, 24, 2)
    assert totals.busy_s == {"a": 0.2, "b": 0.0}
