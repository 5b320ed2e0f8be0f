"""The feature store of DESIGN §2: round trip, every validation failure, atomic writes, lazy reads."""

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from bridges import FeatureStore, StoreError, check, init_store, write_index, write_modality
from bridges import store as store_module

LABELS = ["angry", "happy", "sad"]


def _write(root: Path, n_train=7, dim_text=5, dim_speech=3, dtype=np.float32) -> Path:
    rng = np.random.default_rng(0)
    dataset_dir = init_store(root, "toy", LABELS, ["train", "test"])
    for split, n in (("train", n_train), ("test", 4)):
        conversation_ids = ["a"] * (n - 2) + ["b"] * 2
        write_index(
            dataset_dir, split, [f"{split}{i}" for i in range(n)], conversation_ids, rng.integers(-1, 3, size=n)
        )
        write_modality(dataset_dir, split, "text", rng.normal(size=(n, dim_text)).astype(dtype), {"model": "t"})
        write_modality(dataset_dir, split, "speech", rng.normal(size=(n, dim_speech)).astype(dtype), {"model": "s"})
    return dataset_dir


def _check(path) -> tuple[int, str]:
    with mock.patch("sys.stdout") as out:
        code = check.main([str(path)])
    printed = "".join(call.args[0] for call in out.write.call_args_list)
    return code, printed


@pytest.fixture
def toy(tmp_path):
    return _write(tmp_path)


def test_round_trip_of_every_field(tmp_path):
    rng = np.random.default_rng(1)
    dataset_dir = init_store(tmp_path, "toy", LABELS, ["train"])
    ids, convs, labels = ["u0", "u1", "u2", "u3"], ["c1", "c1", "c0", "c0"], [2, -1, 0, 1]
    text = rng.normal(size=(4, 6)).astype(np.float16)
    write_index(dataset_dir, "train", ids, convs, labels)
    write_modality(dataset_dir, "train", "text", text, {"model": "m", "adapter": "a"})

    store = FeatureStore.open(dataset_dir)
    split = store.split("train")
    assert store.dataset == "toy" and store.label_names == LABELS and store.splits == ("train",)
    assert store.modalities == {"text": {"dim": 6, "dtype": "float16", "source": {"model": "m", "adapter": "a"}}}
    assert split.utterance_ids.tolist() == ids
    assert split.conversation_ids.tolist() == convs
    assert split.labels.dtype == np.int32 and split.labels.tolist() == labels
    np.testing.assert_array_equal(split.features("text"), text)
    assert [(c.id, c.start, c.stop) for c in split.conversations()] == [("c1", 0, 2), ("c0", 2, 4)]
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    assert manifest["format"] == "mister-features" and manifest["version"] == 1


def test_modalities_arrive_in_either_order_without_touching_each_other(tmp_path):
    dataset_dir = init_store(tmp_path, "toy", LABELS, ["train"])
    write_index(dataset_dir, "train", ["u0", "u1"], ["c", "c"], [0, 1])
    write_modality(dataset_dir, "train", "speech", np.ones((2, 3), np.float32), {"run": 1})
    speech_bytes = (dataset_dir / "train" / "speech.npy").read_bytes()
    init_store(tmp_path, "toy", LABELS, ["train"])  # the text run starts later
    write_index(dataset_dir, "train", ["u0", "u1"], ["c", "c"], [0, 1])
    write_modality(dataset_dir, "train", "text", np.zeros((2, 4), np.float32), {"run": 2})
    store = FeatureStore.open(dataset_dir)
    assert set(store.modalities) == {"speech", "text"}
    assert store.modalities["speech"]["source"] == {"run": 1}
    assert (dataset_dir / "train" / "speech.npy").read_bytes() == speech_bytes


def test_a_second_index_that_disagrees_is_refused(toy):
    with pytest.raises(StoreError, match="index.npz"):
        write_index(toy, "train", [f"x{i}" for i in range(7)], ["a"] * 7, [0] * 7)


def test_check_prints_a_summary_and_exits_0(toy):
    code, printed = _check(toy)
    assert code == 0
    assert "train: 2 conversations, 7 utterances" in printed
    assert "text: dim 5, float32" in printed


def _assert_problem(path, *words):
    code, printed = _check(path)
    assert code == 1, printed
    for word in words:
        assert word in printed, printed
    assert "Traceback" not in printed


def _edit_manifest(dataset_dir, **changes):
    path = dataset_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_wrong_format_is_named(toy):
    _edit_manifest(toy, format="something-else")
    _assert_problem(toy, "manifest.json", "format")


def test_wrong_version_is_named(toy):
    _edit_manifest(toy, version=2)
    _assert_problem(toy, "manifest.json", "version 2")


def test_missing_modality_file_is_named(toy):
    (toy / "test" / "speech.npy").unlink()
    _assert_problem(toy, str(toy / "test" / "speech.npy"), "missing")


def test_row_counts_that_disagree_are_named(toy):
    np.save(toy / "train" / "text.npy", np.zeros((6, 5), np.float32))
    _assert_problem(toy, str(toy / "train" / "text.npy"), "6 rows", "7 utterances")


def test_dim_that_disagrees_with_the_manifest_is_named(toy):
    np.save(toy / "train" / "speech.npy", np.zeros((7, 4), np.float32))
    _assert_problem(toy, str(toy / "train" / "speech.npy"), "dim 4", "manifest says 3")


def test_label_out_of_range_is_named(toy):
    np.savez(
        toy / "train" / "index.npz",
        utterance_id=np.array([f"u{i}" for i in range(7)]),
        conversation_id=np.array(["a"] * 7),
        label=np.array([0, 1, 2, 3, 0, 0, 0], np.int32),
    )
    _assert_problem(toy, str(toy / "train" / "index.npz"), "label 3", "[-1, 3)")


def test_conversation_whose_rows_are_not_contiguous_is_named(toy):
    np.savez(
        toy / "train" / "index.npz",
        utterance_id=np.array([f"u{i}" for i in range(7)]),
        conversation_id=np.array(["a", "a", "b", "b", "a", "c", "c"]),
        label=np.zeros(7, np.int32),
    )
    _assert_problem(toy, str(toy / "train" / "index.npz"), "'a'", "not contiguous")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_is_named(toy, bad):
    values = np.zeros((4, 3), np.float32)
    values[2, 1] = bad
    np.save(toy / "test" / "speech.npy", values)
    _assert_problem(toy, str(toy / "test" / "speech.npy"), "NaN or Inf", "row 2")


def test_truncated_npy_is_named(toy):
    path = toy / "train" / "text.npy"
    path.write_bytes(path.read_bytes()[:-9])
    _assert_problem(toy, str(path), "truncated")


def test_missing_store_is_named(tmp_path):
    _assert_problem(tmp_path / "nothing", "manifest.json", "missing")


def test_writer_refuses_nan_and_wrong_shapes(toy):
    with pytest.raises(StoreError, match="NaN"):
        write_modality(toy, "train", "text", np.full((7, 5), np.nan, np.float32))
    with pytest.raises(StoreError, match="7 utterances"):
        write_modality(toy, "train", "text", np.zeros((5, 5), np.float32))
    with pytest.raises(StoreError, match="disagrees with the manifest"):
        write_modality(toy, "train", "text", np.zeros((7, 8), np.float32))


def test_crash_between_temporary_write_and_rename_leaves_the_old_store_readable(toy):
    before = np.array(FeatureStore.open(toy).split("train").features("text"))
    with mock.patch.object(store_module.os, "replace", side_effect=KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            write_modality(toy, "train", "text", np.ones((7, 5), np.float32))
    after = FeatureStore.open(toy)
    np.testing.assert_array_equal(after.split("train").features("text"), before)
    assert after.check_values() == []
    assert not [p for p in toy.rglob("*") if ".tmp" in p.name]


def test_opening_a_store_reads_no_arrays_into_memory(toy):
    real_load = np.load

    def spy(path, *args, **kwargs):
        if str(path).endswith(".npy"):
            assert kwargs.get("mmap_mode") == "r", f"{path} was read into memory"
        return real_load(path, *args, **kwargs)

    with mock.patch.object(store_module.np, "load", side_effect=spy):
        store = FeatureStore.open(toy)
    features = store.split("train").features("text")
    assert isinstance(features, np.memmap) and not features.flags.writeable


def test_iterating_conversations_gives_ids_row_ranges_and_labels(toy):
    split = FeatureStore.open(toy).split("train")
    conversations = split.conversations()
    assert [(c.id, len(c)) for c in conversations] == [("a", 5), ("b", 2)]
    assert np.concatenate([split.labels[c.start : c.stop] for c in conversations]).tolist() == split.labels.tolist()


def test_written_files_are_readable_by_other_users(toy):
    for path in [toy / "manifest.json", toy / "train" / "index.npz", toy / "train" / "text.npy"]:
        assert path.stat().st_mode & 0o044 == 0o044, path
