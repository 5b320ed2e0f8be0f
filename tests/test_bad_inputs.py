"""Bad inputs through the public command lines: exit code, one line naming the file or flag, no traceback,
nothing half-written (docs/RELIABILITY.md lists them).

``python -m bridges.check`` runs as its own process (it starts in a fraction of a second); the training
and prediction commands run in this interpreter (`_in_process`), since a new one spends seconds
importing JAX, except where a test drops capabilities, which only a new process can.
"""

import contextlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CACHE, REPO, TINY, set_flags

from bridges import init_store, write_index, write_modality


def _store(
    root: Path, labels=("neutral", "happy"), splits=("train", "val", "test"), train_labels=None, unlabelled=()
) -> Path:
    """4 conversations of 3 utterances per split; the splits in ``unlabelled`` get every label -1."""
    directory = init_store(root, "mine", list(labels), list(splits))
    rng = np.random.default_rng(0)
    for split in splits:
        ids = [f"{split}{c}_{u}" for c in range(4) for u in range(3)]
        convs = [f"{split}{c}" for c in range(4) for _ in range(3)]
        y = np.arange(12) % len(labels) if split != "train" or train_labels is None else train_labels
        y = np.full(12, -1) if split in unlabelled else y
        write_index(directory, split, ids, convs, y)
        for modality, dim in (("speech", 5), ("text", 6)):
            write_modality(directory, split, modality, rng.normal(size=(12, dim)).astype(np.float32), {})
    return directory


def _run(args, cwd=REPO):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


# Runs ``python -m module args`` for each (module, args) of argv[1] in one interpreter; prints, for each,
# its exit code and what it printed.
_RUNNER = """
import contextlib, io, json, runpy, sys
results = []
for module, args in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [module, *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def _without_caps(*calls) -> list[subprocess.CompletedProcess]:
    """``python -m module args`` for each ``(module, args)``, in one new process that cannot override file
    permissions (root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, as an ordinary user is)."""
    command = [sys.executable, "-c", _RUNNER, json.dumps([[m, list(a)] for m, a in calls])]
    proc = subprocess.run(
        ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", shlex.join(command)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return [
        subprocess.CompletedProcess([m, *a], code, out, err)
        for (m, a), (code, out, err) in zip(calls, json.loads(proc.stdout.splitlines()[-1]))
    ]


def _in_process(module: str, args: list[str]) -> subprocess.CompletedProcess:
    """``python -m module args`` run in this interpreter: its exit code and what it printed."""
    from mister_jax import main as train_cli
    from mister_jax import predict as predict_cli

    main = {"mister_jax.train": train_cli.main, "mister_jax.predict": predict_cli.main}[module]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def _train(features: Path, out: Path, *extra):
    return _in_process(
        "mister_jax.train",
        [
            "--dataset",
            "mine",
            "--features",
            str(features),
            "--out",
            str(out),
            "--seeds",
            "1",
            "--quiet",
            "--jax-cache",
            CACHE,
            *extra,
            *set_flags(TINY),
        ],
    )


def _one_error_line(proc, code, *needles):
    assert proc.returncode == code, proc.stderr + proc.stdout
    text = (proc.stderr + proc.stdout).strip()
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error:")] or text.splitlines()
    assert len(errors) == 1, text
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_train_or_val_split_without_labels_is_refused_by_check_and_training(tmp_path, split):
    directory = _store(tmp_path / "f", unlabelled=(split,))
    _one_error_line(_run(["-m", "bridges.check", str(directory)]), 1, f"{split}/index.npz", "no labelled utterance")
    _one_error_line(_train(tmp_path / "f", tmp_path / "run"), 2, f"{split}/index.npz", "no labelled utterance")
    assert not (tmp_path / "run").exists()


def test_a_store_with_one_label_name_is_refused_naming_the_manifest(tmp_path):
    directory = _store(tmp_path / "f", labels=("neutral",))
    _one_error_line(_run(["-m", "bridges.check", str(directory)]), 1, "manifest.json", "at least two")
    _one_error_line(_train(tmp_path / "f", tmp_path / "run"), 2, "manifest.json", "at least two")
    assert not (tmp_path / "run").exists()


needs_capsh = pytest.mark.skipif(
    shutil.which("capsh") is None or os.geteuid() != 0,
    reason="needs capsh (Debian libcap2-bin) and root to drop CAP_DAC_OVERRIDE",
)


UNREADABLE = ["", "manifest.json", "train", "train/text.npy", "val/index.npz"]


@pytest.fixture(scope="module")
def unreadable(tmp_path_factory, finished):
    """Per target of `UNREADABLE`: a store whose target (a file or folder; "": the store folder) nobody
    may read, and what check, training and prediction said of it, all run in one process without the
    capabilities that let root read anything."""
    root = tmp_path_factory.mktemp("unreadable")
    stores = {target: _store(root / f"f{i}") for i, target in enumerate(UNREADABLE)}
    calls = []
    for i, (target, directory) in enumerate(stores.items()):
        calls += [
            ("bridges.check", [str(directory)]),
            (
                "mister_jax.train",
                ["--dataset", "mine", "--features", str(root / f"f{i}"), "--out", str(root / f"run{i}"), "--quiet"],
            ),
            (
                "mister_jax.predict",
                [
                    "--run",
                    str(finished / "run"),
                    "--dataset",
                    "mine",
                    "--features",
                    str(root / f"f{i}"),
                    "--out",
                    str(root / f"p{i}.jsonl"),
                ],
            ),
        ]
    for target, directory in stores.items():
        (directory / target).chmod(0)
    try:
        procs = _without_caps(*calls)
    finally:
        for target, directory in stores.items():
            (directory / target).chmod(0o755)
    return {
        target: {
            "directory": directory,
            "procs": procs[3 * i : 3 * i + 3],
            "written": [root / f"run{i}", root / f"p{i}.jsonl"],
        }
        for i, (target, directory) in enumerate(stores.items())
    }


@needs_capsh
@pytest.mark.parametrize("target", UNREADABLE)
def test_unreadable_store_files_are_named_with_their_permissions(unreadable, target):
    directory = unreadable[target]["directory"]
    for proc, code in zip(unreadable[target]["procs"], (1, 2, 2)):  # check, train, predict
        _one_error_line(proc, code, f"{directory / target}: not readable — check its permissions")
    assert not any(path.exists() for path in unreadable[target]["written"])


@needs_capsh
def test_a_store_under_a_folder_that_cannot_be_entered_names_that_folder(tmp_path):
    directory = _store(tmp_path / "locked" / "f")
    (tmp_path / "locked").chmod(0)
    try:
        check, train = _without_caps(
            ("bridges.check", [str(directory)]),
            (
                "mister_jax.train",
                [
                    "--dataset",
                    "mine",
                    "--features",
                    str(tmp_path / "locked" / "f"),
                    "--out",
                    str(tmp_path / "run"),
                    "--quiet",
                ],
            ),
        )
    finally:
        (tmp_path / "locked").chmod(0o755)
    for proc, code in ((check, 1), (train, 2)):
        _one_error_line(proc, code, f"{tmp_path / 'locked'}: not readable — check its permissions")
    assert not (tmp_path / "run").exists()


@needs_capsh
def test_an_unreadable_demo_store_is_named_not_rebuilt(tmp_path):
    (tmp_path / "f").mkdir()
    _store(tmp_path / "f").rename(tmp_path / "f" / "demo")
    (tmp_path / "f" / "demo").chmod(0)
    try:
        (proc,) = _without_caps(
            ("mister_jax.train", ["--features", str(tmp_path / "f"), "--out", str(tmp_path / "run"), "--quiet"])
        )
    finally:
        (tmp_path / "f" / "demo").chmod(0o755)
    _one_error_line(proc, 2, f"{tmp_path / 'f' / 'demo'}: not readable — check its permissions")
    assert not (tmp_path / "run").exists()


def test_features_that_is_a_file_is_told_so(tmp_path):
    (tmp_path / "file").write_text("")
    _one_error_line(_train(tmp_path / "file", tmp_path / "run"), 2, "--features", "is a file")
    assert not (tmp_path / "run").exists()


def test_check_of_a_file_says_it_is_not_a_store_folder(tmp_path):
    (tmp_path / "file").write_text("")
    _one_error_line(
        _run(["-m", "bridges.check", str(tmp_path / "file")]), 1, f"{tmp_path / 'file'}: is a file, not a store folder"
    )


def test_a_test_split_without_labels_passes_check_and_is_refused_by_training(tmp_path):
    """An unlabelled test split is a store to predict on; training scores on test and cannot use it."""
    directory = _store(tmp_path / "f", unlabelled=("test",))
    check = _run(["-m", "bridges.check", str(directory)])
    assert check.returncode == 0 and "unlabelled 12" in check.stdout, check.stdout + check.stderr
    _one_error_line(_train(tmp_path / "f", tmp_path / "run"), 2, "test/index.npz", "no labelled utterance")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("labelled, split", [(1, "val"), (0, "train")])
def test_a_carved_split_without_labels_is_refused(tmp_path, labelled, split):
    """Train has one labelled conversation of 4; the store has no val, so the trainer carves 1 conversation,
    order[0] of permutation(4) under val_carve_seed 0: either val or what is left of train has no label."""
    order = np.random.default_rng(0).permutation(4)
    train_labels = np.where(np.repeat(np.arange(4), 3) == order[labelled], 1, -1)
    _store(tmp_path / "f", splits=("train", "test"), train_labels=train_labels)
    _one_error_line(
        _train(tmp_path / "f", tmp_path / "run", "--set", "val_carve_seed=0"),
        2,
        "after carving val",
        f"{split} has no labelled utterance",
    )
    assert not (tmp_path / "run").exists()


def test_a_store_without_test_split_is_refused_before_out_is_created(tmp_path):
    _store(tmp_path / "f", splits=("train", "val"))
    _one_error_line(_train(tmp_path / "f", tmp_path / "run"), 2, "'test'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value", [("--epochs", "-1"), ("--seeds", "0"), ("--checkpoint-every", "-2")])
def test_a_bad_count_names_its_flag(tmp_path, flag, value):
    _store(tmp_path / "f")
    args = ["--dataset", "mine", "--features", str(tmp_path / "f"), "--out", str(tmp_path / "run"), flag, value]
    _one_error_line(_in_process("mister_jax.train", args), 2, f"{flag} {value}: must be >=")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    _store(root / "f")
    proc = _train(root / "f", root / "run", "--epochs", "3")
    assert proc.returncode == 0, proc.stderr
    return root


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_finished_run_is_not_rewritten_with_fewer_epochs(finished):
    before = _files(finished / "run")
    _one_error_line(
        _train(finished / "f", finished / "run", "--epochs", "2"), 2, "already trained for 3 epochs", "--restart"
    )
    after = _files(finished / "run")
    assert sorted(after) == sorted(before)
    assert [name for name in before if after[name] != before[name]] == []  # run_config.json keeps epochs 3 too


def test_a_finished_run_continues_to_more_epochs(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished / "run", out)
    proc = _train(finished / "f", out, "--epochs", "4")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 4 and len((out / "metrics.jsonl").read_text().splitlines()) == 4


def test_predict_with_corrupt_best_parameters_says_to_retrain_not_restart(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished / "run", out)
    record = out / "checkpoints" / "best" / "seed_0.digest.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": "0" * 64}))
    proc = _in_process(
        "mister_jax.predict",
        [
            "--run",
            str(out),
            "--dataset",
            "mine",
            "--features",
            str(finished / "f"),
            "--out",
            str(tmp_path / "p.jsonl"),
            "--jax-cache",
            CACHE,
        ],
    )
    line = _one_error_line(proc, 2, "fail their SHA-256 digest", "rerun the training command")
    assert "--restart" not in line and not (tmp_path / "p.jsonl").exists()
