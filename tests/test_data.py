"""mister_jax.data: bucketing, deterministic shuffling, padding, carving a validation split."""

import itertools

import numpy as np
import pytest

from bridges.demo import build_demo_store
from bridges import FeatureStore
from mister_jax.data import (BATCHING, align_steps, batch_rows, bucket_lengths, carve_validation, choose_pad_lengths,
                             epoch_plan, load_split, make_batch, padding_efficiency, sorted_batch_maxima)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    store = FeatureStore.open(build_demo_store(tmp_path_factory.mktemp("features")))
    return {s: load_split(store, s, ("speech", "text")) for s in ("train", "val", "test")}


def _waste(lengths, pads):
    pads = np.asarray(sorted(pads))
    return sum(pads[np.searchsorted(pads, n)] - n for n in lengths)


def test_bucket_lengths_is_the_least_padding_choice_of_at_most_k_multiples():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=80)
    pads = bucket_lengths(lengths, num_buckets=3, multiple=8)
    assert len(pads) <= 3 and all(p % 8 == 0 for p in pads) and max(pads) >= lengths.max()
    candidates = sorted({int(-(-n // 8) * 8) for n in lengths})
    best = min(_waste(lengths, c) for k in (1, 2, 3) for c in itertools.combinations(candidates, k)
               if max(c) == candidates[-1])
    assert _waste(lengths, pads) == best


@pytest.mark.parametrize("batching", ("sorted", "shuffled", "bucketed"))
def test_demo_train_split_compiles_at_most_4_shapes_at_padding_efficiency_above_0_8(demo, batching):
    train = demo["train"]
    pads = choose_pad_lengths([d.lengths for d in demo.values()], 8, num_buckets=4, multiple=8, batching=batching)
    plan = epoch_plan(train.lengths, pads, batch_size=8, seed=0, epoch=0, batching=batching)
    assert len({p.length for p in plan}) <= 4
    real = sum(int((batch_rows(train, p) >= 0).sum()) for p in plan)
    slots = sum(batch_rows(train, p).size for p in plan)
    assert real == train.num_utterances
    assert padding_efficiency(train.lengths, plan) == pytest.approx(real / slots)
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
    lengths = demo["train"].lengths
    pads = choose_pad_lengths([lengths], 8, 3, 8, batching)
    plan = lambda seed, epoch: [(p.length, p.conversations.tolist()) for p in
                                epoch_plan(lengths, pads, 8, seed=seed, epoch=epoch, batching=batching)]
    assert plan(1, 5) == plan(1, 5)
    assert plan(1, 5) != plan(1, 6) and plan(1, 5) != plan(2, 5)
    for seed, epoch in [(0, 0), (1, 5)]:
        members = [c for _, convs in plan(seed, epoch) for c in convs if c >= 0]
        assert sorted(members) == list(range(len(lengths)))
        assert all(lengths[c] <= t for t, convs in plan(seed, epoch) for c in convs if c >= 0)


@pytest.mark.parametrize("batching", ("sorted", "shuffled"))
def test_every_seed_sees_the_same_sequence_of_batch_shapes(demo, batching):
    lengths = demo["train"].lengths
    pads = choose_pad_lengths([lengths], 8, 4, 8, batching)
    shapes = {seed: [p.length for p in epoch_plan(lengths, pads, 8, seed=seed, epoch=3, batching=batching)]
              for seed in range(4)}
    assert all(s == shapes[0] for s in shapes.values())


def _co_batched(plan):
    """Pairs of conversations that share a batch."""
    return {(a, b) for p in plan for a in p.conversations for b in p.conversations if 0 <= a < b}


@pytest.mark.parametrize("batching", ("random", "bucketed"))
def test_random_batches_change_members_from_epoch_to_epoch_and_seed_to_seed(demo, batching):
    lengths = demo["train"].lengths
    pads = choose_pad_lengths([lengths], 8, 4, 8, batching, pool_batches=4)
    plan = lambda seed, epoch: epoch_plan(lengths, pads, 8, seed=seed, epoch=epoch, batching=batching, pool_batches=4)
    sorted_pads = choose_pad_lengths([lengths], 8, 4, 8)
    sorted_pairs = [_co_batched(epoch_plan(lengths, sorted_pads, 8, seed=0, epoch=e)) for e in (0, 1)]
    kept = lambda a, b: len(a & b) / len(a)
    assert kept(*sorted_pairs) > 0.5   # sorted batches keep most neighbours
    assert kept(_co_batched(plan(0, 0)), _co_batched(plan(0, 1))) < 0.35
    assert kept(_co_batched(plan(0, 0)), _co_batched(plan(1, 0))) < 0.35


def test_bucketed_batches_hold_conversations_of_one_pool_sorted_by_length():
    lengths = np.random.default_rng(1).integers(5, 60, size=64)
    pads = choose_pad_lengths([lengths], 4, 4, 2, "bucketed", pool_batches=4)
    plan = epoch_plan(lengths, pads, 4, seed=3, epoch=2, batching="bucketed", pool_batches=4)
    order = np.random.default_rng([3, 2]).permutation(64)   # the pools: 16 consecutive shuffled conversations
    pool_of = {c: i // 16 for i, c in enumerate(order)}
    for p in plan:
        members = [c for c in p.conversations if c >= 0]
        assert len({pool_of[c] for c in members}) == 1
        pool = [c for c in order if pool_of[c] == pool_of[members[0]]]
        ranked = sorted(pool, key=lambda c: -lengths[c])
        rank = [ranked.index(c) for c in members]
        assert max(rank) - min(rank) == len(members) - 1   # B neighbours in the pool's length order


def test_aligned_steps_give_every_seed_one_shape_that_holds_each():
    lengths = np.random.default_rng(2).integers(3, 40, size=50)
    pads = choose_pad_lengths([lengths], 8, 4, 2, "bucketed", pool_batches=2)
    plans = [epoch_plan(lengths, pads, 8, seed=s, epoch=1, batching="bucketed", pool_batches=2) for s in range(3)]
    aligned = align_steps(plans)
    for i in range(len(plans[0])):
        assert len({p[i].length for p in aligned}) == 1
        assert all(aligned[k][i].length >= plans[k][i].length for k in range(3))
        assert aligned[0][i].length in pads
    assert [[b.conversations.tolist() for b in p] for p in aligned] == [[b.conversations.tolist() for b in p]
                                                                         for p in plans]


def test_bucketed_padding_on_iemocap_shaped_lengths_is_at_least_0_78():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import PAPER, conversation_lengths

    lengths = conversation_lengths(PAPER)
    pads = choose_pad_lengths([lengths], 8, 4, 2, "bucketed", pool_batches=8)
    plans = [epoch_plan(lengths, pads, 8, seed=s, epoch=e, batching="bucketed", pool_batches=8)
             for s in range(3) for e in range(30)]
    assert len(pads) <= 4
    assert np.mean([padding_efficiency(lengths, p) for p in plans]) >= 0.78


def test_make_batch_places_each_conversation_in_order_and_zeroes_padding(demo):
    test = demo["test"]
    plan = epoch_plan(test.lengths, bucket_lengths(test.lengths, 2, 8), 8, seed=None, epoch=0)
    rows = batch_rows(test, plan[0])
    batch = make_batch(test, rows)
    for i, c in enumerate(plan[0].conversations):
        n = test.lengths[c] if c >= 0 else 0
        span = slice(test.starts[c], test.starts[c] + n) if c >= 0 else slice(0, 0)
        np.testing.assert_array_equal(batch.text[i, :n], test.features["text"][span])
        np.testing.assert_array_equal(batch.labels[i, :n], test.labels[span])
        assert batch.mask[i, :n].all() and not batch.mask[i, n:].any()
        assert (batch.labels[i, n:] == -1).all() and (batch.speech[i, n:] == 0).all()
    assert batch.speech.shape == (8, plan[0].length, test.features["speech"].shape[1])


def test_carve_validation_splits_whole_conversations_with_a_fixed_seed(demo):
    train = demo["train"]
    rest, val = carve_validation(train, 0.2, seed=0)
    again, val_again = carve_validation(train, 0.2, seed=0)
    np.testing.assert_array_equal(val.utterance_ids, val_again.utterance_ids)
    assert val.num_conversations == round(0.2 * train.num_conversations)
    assert set(val.conversation_ids).isdisjoint(rest.conversation_ids)
    assert sorted(np.concatenate([rest.utterance_ids, val.utterance_ids])) == sorted(train.utterance_ids)
    for part in (rest, val):
        for s, n in zip(part.starts, part.lengths):
            assert len(set(part.conversation_ids[s:s + n])) == 1


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


def test_the_trainer_steps_bucketed_batches_of_every_pad_length_vmapped_and_interleaved(tmp_path):
    """Seed 0's first epoch leaves a pad length out here, which must be compiled all the same; vmapped
    seeds pad each step to the longest of theirs, interleaved ones keep their own, for the same losses
    (without dropout: its masks are drawn for the padded shape)."""
    import json
    import os
    from pathlib import Path

    from bridges.demo import DemoConfig
    from mister_jax import train as train_cli

    config = DemoConfig(conversations=(("train", 12), ("val", 4), ("test", 4)), min_length=3, max_length=12,
                        text_dim=6, speech_dim=5)
    lengths = load_split(FeatureStore.open(build_demo_store(tmp_path / "features", config=config)), "train",
                         ("text",)).lengths
    pads = choose_pad_lengths([lengths], 4, 3, 2, "bucketed", pool_batches=2)
    assert {p.length for p in epoch_plan(lengths, pads, 4, seed=0, epoch=0, batching="bucketed",
                                         pool_batches=2)} < set(pads)
    cache = os.environ.get("MISTER_JAX_CACHE", str(Path.home() / ".cache" / "mister" / "jax"))
    settings = ["can_hidden=8", "fusion_dim=8", "attention_dim=8", "attention_heads=2", "gru_layers=1",
                "fusion_layers=1", "batch_size=4", "learning_rate=0.01", "num_buckets=3", "batching=bucketed",
                "pool_batches=2", "can_dropout=0", "fusion_dropout=0", "attention_dropout=0"]
    losses = {}
    for mode in ("vmap", "sequential"):
        out = tmp_path / mode
        args = ["--dataset", "demo", "--features", str(tmp_path / "features"), "--out", str(out), "--epochs", "2",
                "--seeds", "2", "--quiet", "--jax-cache", cache, "--seed-mode", mode]
        assert train_cli.main(args + [a for s in settings for a in ("--set", s)]) == 0
        results = json.loads((out / "results.json").read_text())
        assert [t for _, t in results["train_shapes"]] == list(pads)
        losses[mode] = [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(losses["vmap"], losses["sequential"], rtol=1e-4)
    assert losses["vmap"][0][0] != losses["vmap"][0][1]
