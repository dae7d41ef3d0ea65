"""Benchmark arithmetic: figures per system, agreement, idle time, workload choice."""

from __future__ import annotations

import pytest

from jobs.bench.figures import (
    BatchRecord,
    SystemResult,
    agreement,
    compare,
    completion_length,
    figures,
    fixed_batches,
    markdown_table,
    select_workload,
    verdicts,
    worker_idle_at_end,
)


def batch(ids, prompt, width, generated, texts=None, worker="main", end=None):
    """A generate call whose rows were all padded to `width`."""
    return BatchRecord(ids, prompt, width * len(ids), generated, texts or [f"c{i}" for i in ids], worker, end)


def test_figures_count_real_and_padded_tokens_on_both_sides():
    result = SystemResult("x", 10.0, [batch(["a", "b"], [10, 5], 10, [4, 1]), batch(["c"], [3], 3, [2])])
    f = figures(result)
    assert f["generated_tokens"] == 7 and f["tokens_per_s"] == pytest.approx(0.7)
    assert f["prompt_efficiency"] == pytest.approx(18 / 23)
    # batch one runs 2 rows x 4 steps (its longest row), batch two 1 x 2: 7 useful of 10
    assert f["generation_efficiency"] == pytest.approx(7 / 10)


def test_agreement_names_the_rows_that_differ_or_are_missing():
    share, differ = agreement({"a": "x", "b": "y", "c": "z"}, {"a": "x", "b": "Y"})
    assert share == pytest.approx(1 / 3) and differ == ["b", "c"]


def test_compare_gives_speedups_against_the_plain_recipe():
    plain = SystemResult("plain", 20.0, [batch(["a", "b"], [4, 4], 4, [5, 5])])
    fast = SystemResult("runner", 5.0, [batch(["b"], [4], 4, [5]), batch(["a"], [4], 4, [5])])
    rows = compare([plain, fast])
    assert [r["speedup"] for r in rows] == [1.0, 4.0]
    assert rows[1]["agreement"] == 1.0 and rows[1]["missing_rows"] == 0
    table = markdown_table(rows)
    assert "| runner | 5.0 | 2.0 | 4.00x |" in table and "100.0%" in table


def test_idle_at_the_end_is_measured_from_each_workers_last_batch():
    batches = [batch(["a"], [1], 1, [1], worker="w0", end=10.0), batch(["b"], [1], 1, [1], worker="w1", end=12.5)]
    assert worker_idle_at_end(batches) == {"w0": 2.5, "w1": 0.0}


def test_workload_takes_the_first_rows_under_the_cap_and_batches_are_consecutive():
    assert select_workload([5, 50, 7, 9, 100], 2, 10) == [0, 2]
    assert select_workload([5, 50, 7], 10, None) == [0, 1, 2]
    assert fixed_batches([4, 3, 2, 1, 0], 2) == [[4, 3], [2, 1], [0]]


def test_completion_length_counts_up_to_the_first_end_token():
    assert completion_length([5, 6, 2, 2, 2], {2}) == 3
    assert completion_length([5, 6, 7], {2}) == 3


def test_verdicts_say_which_targets_were_met_and_show_idle_workers():
    rows = [
        {"system": "plain", "tokens_per_s": 10.0},
        {"system": "sorted", "tokens_per_s": 20.0},
        {
            "system": "runner",
            "tokens_per_s": 21.0,
            "prompt_efficiency": 0.95,
            "wall_s": 100.0,
            "worker_idle_at_end_s": {"h/w0-1": 0.0, "h/w1-2": 3.5},
        },
    ]
    lines = verdicts(rows)
    assert "- runner / plain: 2.10x (target >= 2.0x) met" in lines
    assert "- runner / sorted: 1.05x (target >= 1.1x) MISSED" in lines
    assert not any("ray_data" in line for line in lines)  # not run, not judged
    assert "- runner prompt padding efficiency: 0.950 (target >= 0.9) met" in lines
    assert "- runner idle at the end per worker: w0-1 0.0s, w1-2 3.5s (run 100.0s)" in lines
