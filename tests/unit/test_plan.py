"""The planner: sorted token-budget batches, shards, determinism, nothing lost."""

from __future__ import annotations

import random

from runner.plan import batch_cost, padding_efficiency, plan_shards, prefill_groups, schedule_order, shard_cost


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


def test_shards_hold_whole_batches_of_at_most_shard_size_rows():
    plan = make_plan([10] * 95, budget=10**6, size=8, shard=20)
    assert [s.num_rows for s in plan.shards] == [16, 16, 16, 16, 16, 15]
    assert [s.shard_id for s in plan.shards] == [0, 1, 2, 3, 4, 5]
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


def _brute_force_best(lengths, max_new, overhead, size, budget):
    """The best cut of the sorted rows by trying every cut (small inputs only): (batches, padded) when
    overhead is None (fewest batches, then least padding), else padded + overhead per batch."""
    widths = sorted(lengths, reverse=True)
    n = len(widths)
    best = None
    for mask in range(1 << (n - 1)):
        cuts = [0] + [k + 1 for k in range(n - 1) if mask >> k & 1] + [n]
        spans = list(zip(cuts, cuts[1:]))
        if any(j - i > size or (j - i > 1 and (j - i) * (widths[i] + max_new) > budget) for i, j in spans):
            continue
        padded = sum((j - i) * widths[i] for i, j in spans)
        key = (len(spans), padded) if overhead is None else padded + overhead * len(spans)
        best = key if best is None else min(best, key)
    return best


def test_batches_are_the_fewest_that_fit_then_the_least_padded():
    rng = random.Random(7)
    for _ in range(200):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 9))]
        max_new, size, budget = rng.randint(1, 6), rng.randint(1, 6), rng.randint(20, 300)
        plan = plan_shards([str(i) for i in range(len(lengths))], lengths, max_new, 1, budget, size, 100)
        batches = [b for s in plan.shards for b in s.batches]
        got = (len(batches), sum(len(b.rows) * b.padded_length for b in batches))
        assert got == _brute_force_best(lengths, max_new, None, size, budget)
        assert sorted(r for b in batches for r in b.rows) == list(range(len(lengths)))


def test_prefill_groups_are_the_cheapest_split_padding_plus_forward_passes():
    rng = random.Random(8)
    for _ in range(200):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 9))]
        step_cost = rng.randint(0, 40)
        groups = prefill_groups(lengths, step_cost)
        assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
        cost = sum(len(g) * max(lengths[r] for r in g) + step_cost for g in groups)
        assert cost == _brute_force_best(lengths, 0, step_cost, len(lengths), 10**9)


def test_grouped_prefill_reads_a_mixed_batch_with_little_padding():
    rng = random.Random(9)
    lengths = [rng.randint(8, 1000) for _ in range(256)]
    plan = plan_shards([str(i) for i in range(256)], lengths, 32, 1, None, 128, 1000)
    assert plan.num_batches == 2  # fewest batches: decode loops are the costly part
    assert padding_efficiency(plan, lengths) < 0.7  # one piece per batch: much padding
    assert padding_efficiency(plan, lengths, step_cost_tokens=64) > 0.9  # read in groups
    assert padding_efficiency(plan, lengths, step_cost_tokens=0) == 1.0


def test_without_a_token_budget_only_the_row_cap_limits_a_batch():
    plan = plan_shards(["a", "b", "c"], [5000, 4000, 4000], 16, 1, None, 8, 10)
    assert [b.rows for s in plan.shards for b in s.batches] == [(0, 1, 2)]


def test_a_batch_never_holds_more_rows_than_a_shard():
    plan = plan_shards([str(i) for i in range(100)], [10] * 100, 16, 1, None, 128, 25)
    assert [len(b.rows) for s in plan.shards for b in s.batches] == [25, 25, 25, 25]
    assert len(plan.shards) == 4


def test_rows_of_each_group_are_planned_apart_and_one_group_plans_as_none():
    rng = random.Random(9)
    lengths = [rng.randint(1, 300) for _ in range(120)]
    groups = [rng.choice([-1, 0, 1]) for _ in lengths]
    ids = [f"r{i}" for i in range(len(lengths))]
    plan = plan_shards(ids, lengths, 16, 1, 4000, 8, 10, groups=groups)
    rows = [r for s in plan.shards for b in s.batches for r in b.rows]
    assert sorted(rows) == list(range(120))
    for shard in plan.shards:  # no batch or shard holds two groups; each group longest first
        assert len({groups[r] for b in shard.batches for r in b.rows}) == 1
    assert [s.shard_id for s in plan.shards] == list(range(len(plan.shards)))
    batch_ids = [b.batch_id for s in plan.shards for b in s.batches]
    assert batch_ids == list(range(len(batch_ids)))
    assert plan_shards(ids, lengths, 16, 1, 4000, 8, 10, groups=[0] * 120) == plan_shards(
        ids, lengths, 16, 1, 4000, 8, 10
    )


def test_rows_own_sample_counts_are_what_the_token_budget_counts():
    rng = random.Random(11)
    lengths = [rng.randint(1, 100) for _ in range(200)]
    samples = [rng.choice([1, 1, 1, 4]) for _ in lengths]
    ids = [str(i) for i in range(200)]
    own = plan_shards(ids, lengths, 16, 4, 3000, 64, 1000, samples=samples)
    most = plan_shards(ids, lengths, 16, 4, 3000, 64, 1000)
    for b in (b for s in own.shards for b in s.batches):
        assert sum(samples[r] for r in b.rows) * (b.padded_length + 16) <= 3000 or len(b.rows) == 1
    assert own.num_batches < most.num_batches  # batches sized by what rows ask, not the most any may
    assert plan_shards(ids, lengths, 16, 4, 3000, 64, 1000, samples=[4] * 200) == most
