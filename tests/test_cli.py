"""python -m mister_jax.train (mister_jax.main): what a user sees when the input is wrong — exit code 2 and
one ``error:`` line per problem naming the file or flag and the fix, no traceback — and the defaults the
command line adds to the preset."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import TINY_DEMO, tiny_store, train_args

from bridges import init_store, write_index, write_modality
from mister_jax import main as train_cli
from mister_jax.input_pipeline import open_store


def _error(capsys, args) -> str:
    assert train_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ")
    return err


def test_missing_store_says_how_to_make_one(tmp_path, capsys):
    err = _error(capsys, ["--dataset", "iemocap", "--features", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "no feature store" in err and "encoders_torch.extract" in err and "--dataset demo" in err
    assert not (tmp_path / "o").exists()


def test_store_without_val_is_refused_when_asked(tmp_path, capsys):
    tiny_store(tmp_path, dataclasses.replace(TINY_DEMO, conversations=(("train", 6), ("test", 3))))
    err = _error(capsys, train_args(tmp_path, tmp_path / "o", 1, "--no-val", "refuse"))
    assert "no 'val' split" in err and "--no-val carve" in err


def test_multimodal_variant_on_a_text_only_store_names_the_missing_modality(tmp_path, capsys):
    d = init_store(tmp_path, "demo", ["a", "b"], ["train", "val", "test"])
    for split in ("train", "val", "test"):
        write_index(d, split, ["u0", "u1"], ["c0", "c0"], [0, 1])
        write_modality(d, split, "text", np.ones((2, 4), np.float32), {})
    err = _error(capsys, train_args(tmp_path, tmp_path / "o", 1))
    assert "needs modality 'speech'" in err and "--variant text-only" in err


def test_bad_store_prints_the_store_problems(tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "manifest.json").write_text("{not json")
    err = _error(capsys, train_args(tmp_path, tmp_path / "o", 1))
    assert "manifest.json" in err and "not valid JSON" in err


@pytest.mark.parametrize(
    "flag, message",
    [
        (["--variant", "bimodal"], "--variant bimodal: unknown variant"),
        (["--set", "lamda_con=0"], "--set lamda_con: unknown key; valid keys"),
        (["--set", "gate=moe"], "--set: mister_jax/config.py: gate='moe'"),
    ],
)
def test_unknown_variant_or_key(tiny_features, tmp_path, capsys, flag, message):
    assert message in _error(capsys, train_args(tiny_features, tmp_path / "o", 1, *flag))
    assert not (tmp_path / "o").exists()


def test_unwritable_out(tiny_features, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    err = _error(capsys, train_args(tiny_features, tmp_path / "file" / "run", 1))
    assert f"--out {tmp_path / 'file' / 'run'}: cannot write there (Not a directory)" in err
    err = _error(capsys, train_args(tiny_features, tmp_path / "file", 1))
    assert f"--out {tmp_path / 'file'}: cannot write there (File exists)" in err


def test_matmuls_default_to_bfloat16_on_an_accelerator_only(tiny_features, monkeypatch):
    store = open_store("demo", str(tiny_features))
    config = lambda *extra: train_cli.config_from_args(
        train_cli.parse_args(["--dataset", "demo", *extra]), store.label_names
    )
    assert config().model.dtype == "float32"  # this machine: CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert config().model.dtype == "bfloat16"
    assert config("--set", "model.dtype=float32").model.dtype == "float32"


def test_the_flags_land_in_the_preset_after_the_overrides():
    args = train_cli.parse_args(
        [
            "--dataset",
            "meld",
            "--epochs",
            "3",
            "--seeds",
            "1",
            "--variant",
            "text-only",
            "--checkpoint-every",
            "2",
            "--set",
            "epochs=50",
            "--on-nonfinite",
            "skip-step",
        ]
    )
    config = train_cli.config_from_args(args, None)
    assert (config.train.epochs, config.train.seeds, config.train.checkpoint_every) == (3, 1, 2)
    assert config.model.variant == "text-only" and config.train.on_nonfinite == "skip-step"
    assert config.train.batch_size == 32  # MELD's preset underneath
    authors = train_cli.config_from_args(train_cli.parse_args(["--dataset", "meld", "--preset", "authors-code"]), None)
    assert authors.model.gate == "mlp" and authors.train.batching == "random"


def test_the_default_run_directory_names_dataset_variant_and_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = lambda *flags: train_cli.prepare_out(train_cli.parse_args(["--dataset", "meld", *flags]))
    assert out().as_posix() == "runs/meld"
    assert out("--variant", "text-only", "--preset", "authors-code").as_posix() == "runs/meld-text-only-authors-code"
    assert list(tmp_path.iterdir()) == []  # checked to be writable, created only once the store passes


def test_an_interrupted_run_says_how_to_resume(tiny_features, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli, "train_and_evaluate", interrupted)
    assert train_cli.main(train_args(tiny_features, tmp_path / "o", 1)) == 130
    assert "interrupted — rerun the same command to resume" in capsys.readouterr().err


def test_a_finished_run_prints_its_test_score_and_where_it_wrote(tiny_features, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli.main(train_args(tiny_features, out, 1)) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("test weighted F1 ") and f"wrote {out / 'results.json'} and {out / 'report.md'}" in last
    assert "moe" in last and (out / "report.md").exists()
