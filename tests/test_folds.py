"""IEMOCAP leave-one-session-out (`mister_jax.folds`, ``--protocol loso``): the fold rule, splits whose test
session never reaches train or val, the refusal of features whose encoder saw a fold's test session, the
manifest's ``encoders`` field, and a whole LOSO run on a tiny IEMOCAP-like store."""

import json

import numpy as np
import pytest
from conftest import TINY, train_args

from bridges import FeatureStore, StoreError, check, init_store, write_index, write_manifest, write_modality
from mister_jax import folds
from mister_jax import main as train_cli
from mister_jax.compare import read_test_predictions
from mister_jax.errors import UsageError

SESSIONS = [f"Ses0{k}" for k in range(1, 6)]
LABELS = ["angry", "happy", "sad", "neutral", "excited", "frustrated"]
PAPER_SPLIT = {"train": ("Ses02", "Ses03", "Ses04"), "val": ("Ses01",), "test": ("Ses05",)}
FROZEN = {"fold": None, "trained_on": [], "selected_on": []}
STANDARD = {"fold": None, "trained_on": ["Ses02", "Ses03", "Ses04"], "selected_on": ["Ses01"]}


def iemocap_store(root, name="iemocap", encoders=FROZEN, length=4, dims=(5, 6)):
    """An IEMOCAP-like store: 5 sessions of 2 dialogues of ``length`` turns, in the paper's splits;
    ``encoders`` is every modality's record (None: none)."""
    directory = init_store(root, name, LABELS)
    rng = np.random.default_rng(0)
    for split, sessions in PAPER_SPLIT.items():
        ids, conversations = [], []
        for s in sessions:
            for dialog in (f"{s}F_impro01", f"{s}M_script01_1"):
                ids += [f"{dialog}_{'FM'[i % 2]}{i:03d}" for i in range(length)]
                conversations += [dialog] * length
        labels = rng.integers(0, len(LABELS), size=len(ids))
        write_index(directory, split, ids, conversations, labels)
        for modality, dim in zip(("speech", "text"), dims):
            x = rng.normal(size=(len(ids), dim)) + labels[:, None]
            write_modality(directory, split, modality, x.astype(np.float32), {}, encoders)
    return directory


# ------------------------------------------------------------------------------------------ folds


def test_session_of_reads_the_session_from_the_utterance_id():
    assert folds.session_of("Ses03M_script01_1_F012") == "Ses03"
    with pytest.raises(ValueError, match="does not start with an IEMOCAP session"):
        folds.session_of("dia0_utt1")


def test_the_five_folds_partition_the_sessions_and_fold_5_is_the_papers_split():
    result = folds.loso_folds(reversed(SESSIONS))
    assert [f.index for f in result] == [1, 2, 3, 4, 5]
    assert sorted(f.test for f in result) == SESSIONS and sorted(f.val for f in result) == SESSIONS
    for k, fold in enumerate(result):
        parts = [(fold.test,), (fold.val,), fold.train]
        assert sorted(s for p in parts for s in p) == SESSIONS  # disjoint, and all of them
        assert fold.test == SESSIONS[k] and fold.val == SESSIONS[(k + 1) % 5]
    last = result[4]
    assert (last.train, (last.val,), (last.test,)) == (PAPER_SPLIT["train"], PAPER_SPLIT["val"], PAPER_SPLIT["test"])
    with pytest.raises(ValueError, match="at least 3 sessions"):
        folds.loso_folds(["Ses01", "Ses02"])


def test_no_fold_puts_its_test_session_in_train_or_val(tmp_path):
    store = FeatureStore.open(iemocap_store(tmp_path))
    every = {u for s in store.splits for u in store.split(s).utterance_ids}
    for fold in folds.loso_folds(SESSIONS):
        train, val, test = folds.fold_splits(store, fold, ("speech", "text"))
        ids = {name: set(part.utterance_ids) for name, part in (("train", train), ("val", val), ("test", test))}
        assert {folds.session_of(u) for u in ids["test"]} == {fold.test}
        assert {folds.session_of(u) for u in ids["val"]} == {fold.val}
        assert {folds.session_of(u) for u in ids["train"]} == set(fold.train)
        assert not ids["test"] & (ids["train"] | ids["val"]) and not ids["train"] & ids["val"]
        assert ids["train"] | ids["val"] | ids["test"] == every
        for part in (train, val, test):  # features and labels travel with their utterances
            row = {u: i for i, u in enumerate(part.utterance_ids)}
            for name in store.splits:
                split = store.split(name)
                for i, u in enumerate(split.utterance_ids):
                    if u in row:
                        assert split.labels[i] == part.labels[row[u]]
                        np.testing.assert_array_equal(split.features("text")[i], part.features["text"][row[u]])


def test_an_utterance_in_two_splits_is_refused(tmp_path):
    directory = iemocap_store(tmp_path)
    ids = list(FeatureStore.open(directory).split("test").utterance_ids)
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "extra").mkdir()
    for name in ("index.npz", "speech.npy", "text.npy"):
        (directory / "extra" / name).write_bytes((directory / "test" / name).read_bytes())
    write_manifest(directory, {**manifest, "splits": [*manifest["splits"], "extra"]})
    with pytest.raises(UsageError, match=f"utterance '{ids[0]}' appears in more than one split"):
        folds.fold_splits(FeatureStore.open(directory), folds.loso_folds(SESSIONS)[0], ("text",))


# ----------------------------------------------------------------------------------- leak refusal


def test_features_of_an_encoder_that_saw_the_test_session_are_refused(tmp_path):
    store = FeatureStore.open(iemocap_store(tmp_path, encoders=STANDARD))
    all_folds = folds.loso_folds(SESSIONS)
    folds.check_fold_encoders(store, all_folds[4])  # the paper's split: the encoder never saw Ses05
    for fold in all_folds[:4]:
        with pytest.raises(UsageError) as err:
            folds.check_fold_encoders(store, fold)
        message = str(err.value)
        assert "\n" not in message and str(store.directory / "manifest.json") in message
        assert f"--fold {fold.index}" in message and f"iemocap-fold{fold.index}" in message
        assert f"on {fold.test}" in message and ("fine-tuned" in message or "selected" in message)


def test_a_store_that_does_not_record_its_encoders_sessions_is_refused(tmp_path):
    store = FeatureStore.open(iemocap_store(tmp_path, encoders=None))
    assert store.encoders == {}
    with pytest.raises(UsageError, match="records no encoder sessions for speech, text .*--fold 1"):
        folds.check_fold_encoders(store, folds.loso_folds(SESSIONS)[0])
    folds.check_fold_encoders(store, folds.loso_folds(SESSIONS)[0], modalities=())  # nothing read, nothing leaks


def test_the_command_line_refuses_a_leaking_fold_in_one_line_and_trains_nothing(tmp_path, capsys):
    iemocap_store(tmp_path, encoders={"fold": None, "trained_on": [], "selected_on": ["Ses03"]})
    out = tmp_path / "run"
    assert train_cli.main(train_args(tmp_path, out, 1, "--protocol", "loso", seeds=1, dataset="iemocap")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert "manifest.json" in err and "fold 3" in err and "selected on Ses03" in err and "--fold 3" in err
    assert not out.exists()


def test_each_fold_takes_its_own_store_where_one_was_extracted(tmp_path):
    iemocap_store(tmp_path, encoders=STANDARD)
    iemocap_store(
        tmp_path, "iemocap-fold2", {"fold": 2, "trained_on": ["Ses01", "Ses04", "Ses05"], "selected_on": ["Ses03"]}
    )
    stores = folds.open_fold_stores(tmp_path, "iemocap")
    assert {k: s.directory.name for k, s in stores.items()} == {
        1: "iemocap",
        2: "iemocap-fold2",
        3: "iemocap",
        4: "iemocap",
        5: "iemocap",
    }
    problems = [folds.fold_problem(stores[f.index], f) for f in folds.loso_folds(SESSIONS)]
    assert [p is None for p in problems] == [False, True, False, False, True]
    with pytest.raises(UsageError, match="no feature store, and no"):
        folds.open_fold_stores(tmp_path / "empty", "iemocap")


# ----------------------------------------------------------------------- the manifest's encoders


def test_write_modality_records_replaces_and_drops_the_encoder_sessions(tmp_path):
    directory = iemocap_store(tmp_path, encoders=STANDARD)
    assert FeatureStore.open(directory).encoders == {"speech": STANDARD, "text": STANDARD}
    text = np.asarray(FeatureStore.open(directory).split("val").features("text"))
    write_modality(directory, "val", "text", text, {})  # new features, sessions unknown
    assert FeatureStore.open(directory).encoders == {"speech": STANDARD}
    write_modality(directory, "val", "text", text, {}, FROZEN)
    assert FeatureStore.open(directory).encoders["text"] == FROZEN
    with pytest.raises(StoreError, match="encoders.text.trained_on must be a list of session names"):
        write_modality(directory, "val", "text", text, {}, {"trained_on": "Ses01", "selected_on": []})


@pytest.mark.parametrize(
    "encoders, message",
    [
        ([], "encoders must be an object"),
        ({"audio": FROZEN}, "encoders lists modality 'audio', which the manifest does not declare"),
        ({"text": {"trained_on": []}}, "encoders.text.selected_on must be a list of session names"),
        ({"text": {**FROZEN, "fold": "two"}}, "encoders.text.fold is 'two', not a fold number"),
    ],
)
def test_a_malformed_encoders_field_is_named_by_the_reader_and_bridges_check(tmp_path, capsys, encoders, message):
    directory = iemocap_store(tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    write_manifest(directory, {**manifest, "encoders": encoders})
    with pytest.raises(StoreError, match=message):
        FeatureStore.open(directory)
    assert check.main([str(directory)]) == 1
    assert message in capsys.readouterr().out


def test_bridges_check_prints_the_encoder_sessions(tmp_path, capsys):
    directory = iemocap_store(tmp_path, encoders={**STANDARD, "fold": 5})
    assert check.main([str(directory)]) == 0
    assert "encoder: fold 5, fine-tuned on Ses02, Ses03, Ses04, selected on Ses01" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def loso_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("loso")
    iemocap_store(root)
    out = root / "run"
    assert (
        train_cli.main(train_args(root, out, 1, "--protocol", "loso", seeds=1, dataset="iemocap", settings=TINY)) == 0
    )
    return {"root": root, "out": out, "results": json.loads((out / "results.json").read_text())}


def test_loso_writes_five_fold_runs_and_their_aggregate(loso_run):
    out, results = loso_run["out"], loso_run["results"]
    assert results["protocol"] == "loso" and results["speaker_independent"] is True
    assert results["fold_rule"] == folds.FOLD_RULE and len(results["folds"]) == 5
    for k, row in enumerate(results["folds"], 1):
        run = out / f"fold_{k}"
        fold_results = json.loads((run / "results.json").read_text())
        assert fold_results["val_source"] == "given" and (run / "report.md").exists()
        assert row["test"]["weighted_f1"] == fold_results["test"]["weighted_f1"]
        assert row["test_session"] == SESSIONS[k - 1] and row["utterances"] == {"train": 24, "val": 8, "test": 8}
        tested = read_test_predictions(run)["utterance_ids"]
        assert len(tested) == 8 and {folds.session_of(u) for u in tested} == {SESSIONS[k - 1]}
    per_fold = [r["test"]["weighted_f1"]["per_seed"][0] for r in results["folds"]]
    assert results["test"]["weighted_f1"]["per_fold_seed"] == per_fold
    assert results["test"]["weighted_f1"]["mean"] == pytest.approx(np.mean(per_fold))
    assert results["test"]["weighted_f1"]["std"] == pytest.approx(np.std(per_fold))
    assert set(results["test"]["experts"]) == {"speech", "text", "multimodal", "moe"}
    report = (out / "report.md").read_text()
    assert report.count("](fold_") == 5 and "| **all** |" in report and "speaker-independent" in report


def test_loso_run_again_skips_the_finished_folds(loso_run, capsys):
    assert (
        train_cli.main(
            train_args(loso_run["root"], loso_run["out"], 1, "--protocol", "loso", seeds=1, dataset="iemocap")
        )
        == 0
    )
    err = capsys.readouterr().err
    assert err.count(": complete in ") == 5 and "training into" not in err
    assert json.loads((loso_run["out"] / "results.json").read_text()) == loso_run["results"]
