"""mister_jax.batching: pad lengths, epoch plans (sorted, shuffled, random, bucketed), aligned steps and
the run's `BatchPlanner` (DESIGN §3 "Batches")."""

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

from bridges import FeatureStore
from bridges.demo import build_demo_store
from mister_jax.batching import (
    BATCHING,
    BatchPlanner,
    PlannedBatch,
    align_steps,
    bucket_lengths,
    choose_pad_lengths,
    epoch_plan,
    example_batch,
    padding_efficiency,
    sorted_batch_maxima,
)
from mister_jax.config import TrainConfig


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Conversation lengths ``[M]`` of each split of the default demo store."""
    store = FeatureStore.open(build_demo_store(tmp_path_factory.mktemp("features")))
    return {s: np.array([c.stop - c.start for c in store.split(s).conversations()]) for s in ("train", "val", "test")}


def _waste(lengths, pads):
    pads = np.asarray(sorted(pads))
    return sum(pads[np.searchsorted(pads, n)] - n for n in lengths)


def _real_and_slots(lengths, plan):
    """Real utterances and padded slots of a plan, counted batch by batch."""
    real = sum(int(lengths[c]) for p in plan for c in p.conversations if c >= 0)
    return real, sum(len(p.conversations) * p.length for p in plan)


def test_bucket_lengths_is_the_least_padding_choice_of_at_most_k_multiples():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=80)
    pads = bucket_lengths(lengths, num_buckets=3, multiple=8)
    assert len(pads) <= 3 and all(p % 8 == 0 for p in pads) and max(pads) >= lengths.max()
    candidates = sorted({int(-(-n // 8) * 8) for n in lengths})
    best = min(
        _waste(lengths, c) for k in (1, 2, 3) for c in itertools.combinations(candidates, k) if max(c) == candidates[-1]
    )
    assert _waste(lengths, pads) == best


@pytest.mark.parametrize("batching", ("sorted", "shuffled", "bucketed"))
def test_demo_train_split_compiles_at_most_4_shapes_at_padding_efficiency_above_0_8(demo, batching):
    train = demo["train"]
    pads = choose_pad_lengths(list(demo.values()), 8, num_buckets=4, multiple=8, batching=batching)
    plan = epoch_plan(train, pads, batch_size=8, seed=0, epoch=0, batching=batching)
    assert len({p.length for p in plan}) <= 4
    real, slots = _real_and_slots(train, plan)
    assert real == train.sum()
    assert padding_efficiency(train, plan) == pytest.approx(real / slots)
    assert real / slots > 0.8


def test_sorted_batches_hold_neighbours_in_length_and_pad_less_than_shuffled_ones():
    lengths = np.random.default_rng(0).lognormal(3.9, 0.35, size=92).astype(int).clip(24, 110)
    efficiency = {}
    for batching in BATCHING:
        pads = choose_pad_lengths([lengths], 8, num_buckets=4, multiple=8, batching=batching)
        plan = epoch_plan(lengths, pads, 8, seed=0, epoch=0, batching=batching)
        efficiency[batching] = padding_efficiency(lengths, plan)
    assert efficiency["sorted"] > efficiency["shuffled"] + 0.05
    pads = choose_pad_lengths([lengths], 8, num_buckets=4, multiple=8)
    plan = epoch_plan(lengths, pads, 8, seed=0, epoch=0)
    maxima = sorted(max(lengths[c] for c in p.conversations if c >= 0) for p in plan)
    assert maxima == sorted(sorted_batch_maxima(lengths, 8).tolist())
    assert sum(int(np.sum(p.conversations >= 0)) < 8 for p in plan) == 1  # 92 = 11 x 8 + 4
    for p in plan:  # a batch holds a run of neighbours in length: no other conversation lies strictly inside
        members = [c for c in p.conversations if c >= 0]
        low, high = min(lengths[members]), max(lengths[members])
        others = np.delete(lengths, members)
        assert not np.any((others > low) & (others < high))


@pytest.mark.parametrize("batching", BATCHING)
def test_epoch_plan_is_a_pure_function_of_seed_and_epoch_and_covers_every_conversation_once(demo, batching):
    lengths = demo["train"]
    pads = choose_pad_lengths([lengths], 8, 3, 8, batching)
    plan = lambda seed, epoch: [
        (p.length, p.conversations.tolist())
        for p in epoch_plan(lengths, pads, 8, seed=seed, epoch=epoch, batching=batching)
    ]
    assert plan(1, 5) == plan(1, 5)
    assert plan(1, 5) != plan(1, 6) and plan(1, 5) != plan(2, 5)
    for seed, epoch in [(0, 0), (1, 5)]:
        members = [c for _, convs in plan(seed, epoch) for c in convs if c >= 0]
        assert sorted(members) == list(range(len(lengths)))
        assert all(lengths[c] <= t for t, convs in plan(seed, epoch) for c in convs if c >= 0)


@pytest.mark.parametrize("batching", ("sorted", "shuffled"))
def test_every_seed_sees_the_same_sequence_of_batch_shapes(demo, batching):
    lengths = demo["train"]
    pads = choose_pad_lengths([lengths], 8, 4, 8, batching)
    shapes = {
        seed: [p.length for p in epoch_plan(lengths, pads, 8, seed=seed, epoch=3, batching=batching)]
        for seed in range(4)
    }
    assert all(s == shapes[0] for s in shapes.values())


def _co_batched(plan):
    """Pairs of conversations that share a batch."""
    return {(a, b) for p in plan for a in p.conversations for b in p.conversations if 0 <= a < b}


@pytest.mark.parametrize("batching", ("random", "bucketed"))
def test_random_batches_change_members_from_epoch_to_epoch_and_seed_to_seed(demo, batching):
    lengths = demo["train"]
    pads = choose_pad_lengths([lengths], 8, 4, 8, batching, pool_batches=4)
    plan = lambda seed, epoch: epoch_plan(lengths, pads, 8, seed=seed, epoch=epoch, batching=batching, pool_batches=4)
    sorted_pads = choose_pad_lengths([lengths], 8, 4, 8)
    sorted_pairs = [_co_batched(epoch_plan(lengths, sorted_pads, 8, seed=0, epoch=e)) for e in (0, 1)]
    kept = lambda a, b: len(a & b) / len(a)
    assert kept(*sorted_pairs) > 0.5  # sorted batches keep most neighbours
    assert kept(_co_batched(plan(0, 0)), _co_batched(plan(0, 1))) < 0.35
    assert kept(_co_batched(plan(0, 0)), _co_batched(plan(1, 0))) < 0.35


def test_bucketed_batches_hold_conversations_of_one_pool_sorted_by_length():
    lengths = np.random.default_rng(1).integers(5, 60, size=64)
    pads = choose_pad_lengths([lengths], 4, 4, 2, "bucketed", pool_batches=4)
    plan = epoch_plan(lengths, pads, 4, seed=3, epoch=2, batching="bucketed", pool_batches=4)
    order = np.random.default_rng([3, 2]).permutation(64)  # the pools: 16 consecutive shuffled conversations
    pool_of = {c: i // 16 for i, c in enumerate(order)}
    for p in plan:
        members = [c for c in p.conversations if c >= 0]
        assert len({pool_of[c] for c in members}) == 1
        pool = [c for c in order if pool_of[c] == pool_of[members[0]]]
        ranked = sorted(pool, key=lambda c: -lengths[c])
        rank = [ranked.index(c) for c in members]
        assert max(rank) - min(rank) == len(members) - 1  # B neighbours in the pool's length order


def test_aligned_steps_give_every_seed_one_shape_that_holds_each():
    lengths = np.random.default_rng(2).integers(3, 40, size=50)
    pads = choose_pad_lengths([lengths], 8, 4, 2, "bucketed", pool_batches=2)
    plans = [epoch_plan(lengths, pads, 8, seed=s, epoch=1, batching="bucketed", pool_batches=2) for s in range(3)]
    aligned = align_steps(plans)
    for i in range(len(plans[0])):
        assert len({p[i].length for p in aligned}) == 1
        assert all(aligned[k][i].length >= plans[k][i].length for k in range(3))
        assert aligned[0][i].length in pads
    assert [[b.conversations.tolist() for b in p] for p in aligned] == [
        [b.conversations.tolist() for b in p] for p in plans
    ]
    with pytest.raises(ValueError, match="different numbers of batches"):
        align_steps([plans[0], plans[1][:-1]])


def test_bucketed_padding_on_iemocap_shaped_lengths_is_at_least_0_78():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import PAPER, conversation_lengths

    lengths = conversation_lengths(PAPER)
    pads = choose_pad_lengths([lengths], 8, 4, 2, "bucketed", pool_batches=8)
    plans = [
        epoch_plan(lengths, pads, 8, seed=s, epoch=e, batching="bucketed", pool_batches=8)
        for s in range(3)
        for e in range(30)
    ]
    assert len(pads) <= 4
    assert np.mean([padding_efficiency(lengths, p) for p in plans]) >= 0.78


@pytest.mark.parametrize("batching", ("random", "bucketed"))
def test_drawn_batches_use_at_most_num_buckets_pad_lengths_and_every_conversation_fits(batching):
    lengths = np.random.default_rng(4).integers(2, 80, size=70)
    pads = choose_pad_lengths([lengths], 8, 3, 2, batching, pool_batches=3)
    used = set()
    for seed, epoch in itertools.product(range(5), range(20)):
        for p in epoch_plan(lengths, pads, 8, seed=seed, epoch=epoch, batching=batching, pool_batches=3):
            members = p.conversations[p.conversations >= 0]
            assert lengths[members].max() <= p.length
            assert p.length == min(t for t in pads if t >= lengths[members].max())  # the smallest holding it
            used.add(p.length)
    assert len(pads) <= 3 and used <= set(pads)


def test_an_example_batch_holds_the_shortest_conversation_at_the_asked_length():
    lengths = np.array([7, 3, 9, 5])
    batch = example_batch(lengths, 8, batch_size=4)
    assert batch.length == 8 and batch.conversations.tolist() == [1, -1, -1, -1]
    with pytest.raises(ValueError, match="no conversation fits the pad length 2"):
        example_batch(lengths, 2, batch_size=4)


def test_padding_efficiency_counts_real_utterances_over_padded_slots():
    lengths = np.array([3, 5, 2])
    plan = [PlannedBatch(6, np.array([1, 0])), PlannedBatch(4, np.array([2, -1]))]
    assert padding_efficiency(lengths, plan) == pytest.approx((5 + 3 + 2) / (2 * 6 + 2 * 4))
    assert padding_efficiency(lengths, []) == 1.0


def _listed(plan):
    return [(p.length, p.conversations.tolist()) for p in plan]


@pytest.mark.parametrize("batching", BATCHING)
def test_the_planner_pads_training_and_evaluation_each_on_their_own_splits(batching):
    rng = np.random.default_rng(5)
    train, val, test = rng.integers(2, 40, size=30), rng.integers(2, 60, size=9), rng.integers(2, 50, size=9)
    cfg = TrainConfig(batch_size=4, num_buckets=3, bucket_multiple=2, batching=batching, pool_batches=2)
    planner = BatchPlanner.create(cfg, train, [val, test])
    assert planner.train_pads == choose_pad_lengths([train], 4, 3, 2, batching, pool_batches=2)
    assert planner.eval_pads == choose_pad_lengths([val, test], 4, 3, 2, "sorted")
    seeds = [0, 1, 2]
    plans = planner.train_epoch(train, seeds, 4, aligned=False)
    for s, plan in zip(seeds, plans):
        assert _listed(plan) == _listed(
            epoch_plan(train, planner.train_pads, 4, seed=s, epoch=4, batching=batching, pool_batches=2)
        )
    aligned = planner.train_epoch(train, seeds, 4, aligned=True)
    assert [_listed(p) for p in aligned] == [_listed(p) for p in align_steps(plans)]
    evaluation = planner.evaluation(val)
    assert _listed(evaluation) == _listed(epoch_plan(val, planner.eval_pads, 4, seed=None, epoch=0))
    assert sorted(c for p in evaluation for c in p.conversations if c >= 0) == list(range(len(val)))
    shapes = planner.train_shapes(plans[0])
    # Drawn batchings compile every pad length, as a later epoch may need any; fixed ones what they use.
    assert shapes == (
        sorted(planner.train_pads) if batching in ("random", "bucketed") else sorted({p.length for p in plans[0]})
    )
    assert planner.example(train, shapes[-1]).length == shapes[-1]
