"""The planner: sorted token-budget batches, shards, determinism, nothing lost."""

from __future__ import annotations

import random

from runner.plan import batch_cost, padding_efficiency, plan_shards, schedule_order, shard_cost


def make_plan(lengths, max_new=16, nrs=1, budget=1000, size=8, shard=10):
    ids = [f"r{i}" for i in range(len(lengths))]
    return plan_shards(ids, lengths, max_new, nrs, budget, size, shard)


def test_every_row_exactly_once_and_longest_first():
    rng = random.Random(1)
    lengths = [rng.randint(1, 400) for _ in range(500)]
    plan = make_plan(lengths, budget=4000, size=16, shard=50)
    rows = [r for s in plan.shards for b in s.batches for r in b.rows]
    assert sorted(rows) == list(range(500))
    assert [lengths[r] for r in rows] == sorted(lengths, reverse=True)


def test_batches_respect_token_budget_and_size():
    rng = random.Random(2)
    lengths = [rng.randint(1, 300) for _ in range(300)]
    plan = make_plan(lengths, max_new=32, nrs=2, budget=6000, size=12)
    for shard in plan.shards:
        for b in shard.batches:
            assert len(b.rows) <= 12
            assert b.padded_length == max(lengths[r] for r in b.rows)
            assert batch_cost(len(b.rows), b.padded_length, 32, 2) <= 6000


def test_a_row_too_long_for_the_budget_gets_a_batch_of_its_own():
    plan = make_plan([5000, 10, 10], budget=1000)
    batches = [b for s in plan.shards for b in s.batches]
    assert batches[0].rows == (0,) and batches[1].rows == (1, 2)


def test_shards_hold_whole_batches_of_about_shard_size_rows():
    plan = make_plan([10] * 95, budget=10**6, size=8, shard=20)
    assert [s.num_rows for s in plan.shards] == [24, 24, 24, 23]
    assert [s.shard_id for s in plan.shards] == [0, 1, 2, 3]
    batch_ids = [b.batch_id for s in plan.shards for b in s.batches]
    assert batch_ids == sorted(set(batch_ids))


def test_same_input_same_plan_and_fingerprint_any_change_changes_it():
    lengths = [random.Random(3).randint(1, 200) for _ in range(100)]
    a, b = make_plan(lengths), make_plan(list(lengths))
    assert a == b and a.fingerprint == b.fingerprint
    assert make_plan(lengths, max_new=17).fingerprint != a.fingerprint
    changed = list(lengths)
    changed[5] += 1
    assert make_plan(changed).fingerprint != a.fingerprint


def test_schedule_hands_out_the_costliest_shards_first():
    rng = random.Random(5)
    lengths = [rng.randint(1, 2000) for _ in range(300)]
    plan = make_plan(lengths, budget=8000, size=16, shard=7)
    order = schedule_order(plan)
    costs = [shard_cost(s, plan) for s in order]
    assert sorted(s.shard_id for s in order) == list(range(len(plan.shards)))
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]


def test_sorting_cuts_padding_against_input_order():
    rng = random.Random(4)
    lengths = [rng.choice([10, 20, 500, 1000]) for _ in range(400)]
    plan = make_plan(lengths, budget=40000, size=32)
    assert padding_efficiency(plan, lengths) > 0.9
