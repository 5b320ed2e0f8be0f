"""mister_jax.input_pipeline: splits read into host memory, padded batches, a carved validation split,
the store fitted to the config and the splits a run trains on."""

import dataclasses

import numpy as np
import pytest

from bridges import FeatureStore, init_store, write_index, write_modality
from bridges.demo import DemoConfig, build_demo_store
from mister_jax.batching import bucket_lengths, epoch_plan
from mister_jax.configs import get_config
from mister_jax.errors import UsageError
from mister_jax.input_pipeline import (
    Batch,
    batch_rows,
    carve_validation,
    fit_to_store,
    iterate_batches,
    load_split,
    load_splits,
    make_batch,
    open_store,
    required_modalities,
    select_conversations,
    stack_batches,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return FeatureStore.open(build_demo_store(tmp_path_factory.mktemp("features")))


@pytest.fixture(scope="module")
def demo(store):
    return {s: load_split(store, s, ("speech", "text")) for s in ("train", "val", "test")}


def test_a_split_is_read_in_store_order_with_one_start_and_length_per_conversation(store, demo):
    split, test = store.split("test"), demo["test"]
    np.testing.assert_array_equal(test.features["text"], np.asarray(split.features("text"), np.float32))
    np.testing.assert_array_equal(test.labels, split.labels)
    assert list(test.utterance_ids) == list(split.utterance_ids) and test.num_utterances == len(split)
    ids = list(split.conversation_ids)
    firsts = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]  # where a conversation begins
    assert test.starts.tolist() == firsts and test.lengths.tolist() == np.diff(firsts + [len(ids)]).tolist()
    assert set(load_split(store, "test", ("text",)).features) == {"text"}


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


def test_a_text_only_batch_has_no_speech_and_iterated_batches_are_those_of_the_plan(demo):
    test = dataclasses.replace(demo["test"], features={"text": demo["test"].features["text"]})
    plan = epoch_plan(test.lengths, bucket_lengths(test.lengths, 2, 8), 4, seed=None, epoch=0)
    pairs = list(iterate_batches(test, plan))
    assert len(pairs) == len(plan)
    for (rows, batch), planned in zip(pairs, plan):
        np.testing.assert_array_equal(rows, batch_rows(test, planned))
        assert batch.speech is None and batch.text.shape[:2] == (4, planned.length)
    covered = np.concatenate([rows[rows >= 0] for rows, _ in pairs])
    assert sorted(covered) == list(range(test.num_utterances))


def test_stacked_batches_have_a_leading_seed_axis(demo):
    test = demo["test"]
    plan = epoch_plan(test.lengths, bucket_lengths(test.lengths, 1, 8), 4, seed=None, epoch=0)
    a, b = (make_batch(test, batch_rows(test, p)) for p in plan[:2])
    stacked = stack_batches([a, b])
    for name, x, y, s in zip(Batch._fields, a, b, stacked):
        np.testing.assert_array_equal(s, np.stack([x, y]), err_msg=name)
    assert stack_batches([a._replace(speech=None)] * 2).speech is None


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
            assert len(set(part.conversation_ids[s : s + n])) == 1
    order = np.random.default_rng(0).permutation(train.num_conversations)  # the carving, drawn again
    chosen = sorted(order[: val.num_conversations])
    assert list(val.conversation_ids[val.starts]) == list(train.conversation_ids[train.starts[chosen]])


def test_selected_conversations_keep_store_order_and_their_rows(demo):
    train = demo["train"]
    part = select_conversations(train, np.array([3, 1]), "part")
    rows = np.concatenate([np.arange(train.starts[c], train.starts[c] + train.lengths[c]) for c in (1, 3)])
    np.testing.assert_array_equal(part.features["speech"], train.features["speech"][rows])
    np.testing.assert_array_equal(part.labels, train.labels[rows])
    assert part.lengths.tolist() == [train.lengths[1], train.lengths[3]]
    assert part.starts.tolist() == [0, train.lengths[1]] and part.name == "part"


def test_the_config_takes_the_stores_dims_and_classes(store):
    config = fit_to_store(get_config("demo"), store)
    assert (config.model.speech_dim, config.model.text_dim) == (
        store.modalities["speech"]["dim"],
        store.modalities["text"]["dim"],
    )
    assert config.model.num_classes == len(store.label_names)
    assert required_modalities("text-only") == ("text",) and required_modalities("mister-e") == ("speech", "text")


def test_a_store_lacking_a_modality_the_variant_needs_is_refused(tmp_path):
    d = init_store(tmp_path, "demo", ["a", "b"], ["train", "test"])
    for split in ("train", "test"):
        write_index(d, split, ["u0", "u1"], ["c0", "c0"], [0, 1])
        write_modality(d, split, "text", np.ones((2, 4), np.float32), {})
    store = FeatureStore.open(d)
    with pytest.raises(UsageError, match="needs modality 'speech'"):
        fit_to_store(get_config("demo"), store)
    text_only = fit_to_store(
        dataclasses.replace(
            get_config("demo"), model=dataclasses.replace(get_config("demo").model, variant="text-only")
        ),
        store,
    )
    assert text_only.model.text_dim == 4


def test_the_splits_of_a_run_come_from_the_store_or_val_is_carved(store, tmp_path):
    cfg = get_config("demo").train
    train, val, test, source = load_splits(store, "mister-e", cfg, log=lambda m: None)
    assert source == "store" and (train.name, val.name, test.name) == ("train", "val", "test")
    assert val.num_utterances == len(store.split("val"))
    no_val = tmp_path / "f"
    build_demo_store(no_val, config=DemoConfig(conversations=(("train", 10), ("test", 3))))
    no_val_store = FeatureStore.open(no_val / "demo")
    lines = []
    train, val, _, source = load_splits(no_val_store, "text-only", cfg, log=lines.append)
    assert source == "carved" and val.num_conversations == 1 and train.num_conversations == 9
    assert set(train.features) == {"text"} and "carved 1 of 10" in lines[0]
    with pytest.raises(UsageError, match="no 'val' split .*--no-val carve"):
        load_splits(no_val_store, "mister-e", cfg, no_val="refuse")


def test_the_demo_store_is_built_where_it_is_asked_for_and_absent(tmp_path):
    store = open_store("demo", str(tmp_path))
    assert store.directory == tmp_path / "demo" and (tmp_path / "demo" / "manifest.json").exists()
    with pytest.raises(UsageError, match="no feature store"):
        open_store("iemocap", str(tmp_path))
