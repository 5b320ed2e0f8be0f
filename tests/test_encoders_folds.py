"""``python -m encoders_torch.extract --fold K``: IEMOCAP leave-one-session-out on the extraction side. The
encoder is fine-tuned on fold K's train sessions and selected on its val session only, every utterance is
exported, and the manifest records the sessions the encoder saw, so that `mister_jax.folds` can refuse a
fold whose test session it saw. Tiny models built from a transformers config, the IEMOCAP fixture."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bridges import FeatureStore
from bridges.check import main as check_store
from encoders_torch import extract
from encoders_torch.corpora import read_corpus
from encoders_torch.encoder import EncoderError
from mister_jax import folds
from mister_jax.errors import UsageError

torch.set_num_threads(1)
SESSIONS = [f"Ses0{k}" for k in range(1, 6)]
FOLD_2 = {"fold": 2, "trained_on": ["Ses01", "Ses04", "Ses05"], "selected_on": ["Ses03"]}
PAPER = {"fold": None, "trained_on": ["Ses02", "Ses03", "Ses04"], "selected_on": ["Ses01"]}


def _fixture(name):
    spec = importlib.util.spec_from_file_location(f"fixture_{name}", Path(__file__).parent / "fixtures" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _argv(data, model, out, *extra):
    return [
        "--dataset",
        "iemocap",
        "--data-root",
        str(data),
        "--modality",
        "text",
        "--model",
        str(model),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--embedding-dim",
        "8",
        "--chunk-size",
        "8",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """The paper's split and fold 2 extracted into one store root; what each fine-tuning trained and
    selected on."""
    root = tmp_path_factory.mktemp("encoders-folds")
    data = _fixture("iemocap").write_iemocap(root / "IEMOCAP_full_release", audio=False)
    corpus = read_corpus("iemocap", data)
    model = _fixture("tiny_models").tiny_llama(
        root / "tiny-llama", [u.transcript for s in corpus.splits for u in corpus.utterances(s)]
    )
    fitted, fit = [], extract.fit

    def recording_fit(model, train, val, *args, **kwargs):
        fitted.append(({u.id for u in train}, {u.id for u in val}))
        return fit(model, train, val, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(extract, "fit", recording_fit)
        assert extract.main(_argv(data, model, root / "features")) == 0
        assert extract.main(_argv(data, model, root / "features", "--fold", "2")) == 0
    return {
        "root": root,
        "data": data,
        "model": model,
        "corpus": corpus,
        "features": root / "features",
        "fitted": dict(zip(("paper", "fold 2"), fitted)),
    }


def test_the_extractions_fold_rule_is_mister_jax_folds():
    for fold in folds.loso_folds(SESSIONS):
        assert extract.iemocap_fold(fold.index) == {"train": fold.train, "val": (fold.val,), "test": (fold.test,)}
    with pytest.raises(EncoderError, match="--fold 6: IEMOCAP has folds 1 to 5"):
        extract.iemocap_fold(6)


def test_fold_2_fine_tunes_on_its_train_sessions_and_selects_on_its_val_session(extracted):
    train, val = extracted["fitted"]["fold 2"]
    assert {folds.session_of(u) for u in train} == {"Ses01", "Ses04", "Ses05"}
    assert {folds.session_of(u) for u in val} == {"Ses03"}
    training = json.loads((extracted["features"] / "iemocap-fold2" / "adapters" / "text" / "training.json").read_text())
    assert training["sessions"] == {k: FOLD_2[k] for k in ("trained_on", "selected_on")}


def test_fold_2_exports_every_utterance_as_its_train_val_and_test_and_records_the_encoders_sessions(extracted):
    directory = extracted["features"] / "iemocap-fold2"
    store = FeatureStore.open(directory)
    assert store.encoders == {"text": FOLD_2} and store.dataset == "iemocap-fold2"
    corpus = extracted["corpus"]
    every = {u.id for s in corpus.splits for u in corpus.utterances(s)}
    exported = {name: set(store.split(name).utterance_ids) for name in store.splits}
    assert set().union(*exported.values()) == every and sum(map(len, exported.values())) == len(every)
    assert {name: {folds.session_of(u) for u in ids} for name, ids in exported.items()} == {
        "train": {"Ses01", "Ses04", "Ses05"},
        "val": {"Ses03"},
        "test": {"Ses02"},
    }
    assert check_store([str(directory)]) == 0
    fold = folds.loso_folds(SESSIONS)[1]
    folds.check_fold_encoders(store, fold)
    _, _, test = folds.fold_splits(store, fold, ("text",))
    assert set(test.utterance_ids) == {u for u in every if u.startswith("Ses02")}
    with pytest.raises(UsageError, match="fold 1: .*text was fine-tuned on Ses01 .*--fold 1"):
        folds.check_fold_encoders(store, folds.loso_folds(SESSIONS)[0])


def test_the_papers_split_is_recorded_too_and_serves_fold_5_alone(extracted):
    train, val = extracted["fitted"]["paper"]
    assert {folds.session_of(u) for u in train} == {"Ses02", "Ses03", "Ses04"}
    assert {folds.session_of(u) for u in val} == {"Ses01"}
    store = FeatureStore.open(extracted["features"] / "iemocap")
    assert store.encoders == {"text": PAPER}
    stores = folds.open_fold_stores(extracted["features"], "iemocap")
    assert stores[2].directory.name == "iemocap-fold2" and stores[5].directory.name == "iemocap"
    refused = [f.index for f in folds.loso_folds(SESSIONS) if folds.fold_problem(stores[f.index], f)]
    assert refused == [1, 3, 4]


def test_fold_k_refuses_an_adapter_that_saw_session_k(extracted, capsys):
    adapter = extracted["features"] / "iemocap" / "adapters" / "text"
    argv = _argv(
        extracted["data"], extracted["model"], extracted["root"] / "leak", "--fold", "2", "--adapter", str(adapter)
    )
    assert extract.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fold 2's test session Ses02" in err and "drop --adapter" in err
    assert not (extracted["root"] / "leak").exists()


def test_fold_k_refuses_an_adapter_that_does_not_say_what_it_saw(extracted, capsys, tmp_path):
    adapter = tmp_path / "old-adapter"
    source = extracted["features"] / "iemocap-fold2" / "adapters" / "text"
    for path in source.rglob("*"):
        if path.is_file():
            (adapter / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (adapter / path.relative_to(source)).write_bytes(path.read_bytes())
    info = json.loads((adapter / "training.json").read_text())
    del info["sessions"]
    (adapter / "training.json").write_text(json.dumps(info))
    argv = _argv(extracted["data"], extracted["model"], tmp_path / "out", "--fold", "2", "--adapter", str(adapter))
    assert extract.main(argv) == 2
    assert "does not record the sessions it was fine-tuned on" in capsys.readouterr().err


def test_fold_with_another_corpus_is_one_line_and_exit_2(tmp_path, capsys):
    argv = [
        "--dataset",
        "meld",
        "--data-root",
        str(tmp_path),
        "--modality",
        "text",
        "--model",
        str(tmp_path),
        "--out",
        str(tmp_path / "out"),
        "--fold",
        "1",
    ]
    assert extract.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "IEMOCAP only" in err and "drop --fold" in err
