"""mister_jax.train: a run resumed after SIGKILL ends with the scores of an uninterrupted one, results.json,
model selection on validation, vmapped seeds = sequential seeds, checkpoints, non-finite steps, the report.

Runs use the tiny model on the tiny demo store (conftest) and the persistent compilation cache, so
that the whole file stays within its time budget. The runs that the tests compare are made once per
module by fixtures; every test asks for the runs it reads.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO, cli, tiny_config, train_args

from bridges import FeatureStore
from bridges.demo import DemoConfig, build_demo_store
from mister_jax import checkpoint
from mister_jax import main as train_cli
from mister_jax.batching import choose_pad_lengths, epoch_plan
from mister_jax.config import TrainConfig
from mister_jax.errors import UsageError
from mister_jax.input_pipeline import Batch, load_split
from mister_jax.runtime import direct_io
from mister_jax.runtime.host_mirror import HostMirror
from mister_jax.seeds import SeedStates
from mister_jax.train import train_and_evaluate
from mister_jax.trainer import checkpoint_due


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _untimed(history: list[dict]) -> list[dict]:
    """The epoch records without their wall-clock figures."""
    timing = ("seconds", "utterances_per_second", "validation_seconds", "checkpoint_seconds")
    return [{k: v for k, v in record.items() if k not in timing} for record in history]


def _scores(results: dict) -> dict:
    return {k: results[k] for k in ("test", "val", "best_epoch", "seeds", "epochs")}


def _train(features: Path, out: Path, epochs: int, *overrides: str, cache: Path | None = None, **kwargs) -> dict:
    """The library call behind ``python -m mister_jax.train`` with `train_args` (conftest)."""
    return train_and_evaluate(
        tiny_config(epochs, *overrides), features / "demo", out, dataset="demo", cache_dir=cache, **kwargs
    )


def _copy(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


# --------------------------------------------------------------------------- resume after SIGKILL


def _command_line(args: list[str], cwd: Path = REPO) -> tuple[int, str]:
    """``python -m mister_jax.train args`` run in this interpreter from ``cwd``: exit code and stderr."""
    err, old = io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err):
            code = train_cli.main(args)
    finally:
        os.chdir(old)
    return code, err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_features):
    """6 epochs of the command line: an uninterrupted run, and a run SIGKILLed after its first
    checkpoint (a process of its own), then resumed."""
    root = tmp_path_factory.mktemp("train")
    features, epochs = tiny_features, 6
    relative = Path(os.path.relpath(features, root))
    code, err = _command_line(train_args(relative, Path("whole"), epochs), cwd=root)  # relative paths work too
    assert code == 0, err
    args = train_args(features, root / "killed", epochs)
    proc = subprocess.Popen(cli(args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_dir = root / "killed" / "checkpoints" / "state"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state_dir.is_dir() and any(p.name.isdigit() for p in state_dir.iterdir()):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_after = sorted(int(p.name) for p in state_dir.iterdir() if p.name.isdigit())
    code, resumed_log = _command_line(args)
    assert code == 0, resumed_log
    return {
        "root": root,
        "features": features,
        "whole": root / "whole",
        "killed": root / "killed",
        "killed_returncode": proc.returncode,
        "killed_after": killed_after,
        "resumed_log": resumed_log,
    }


def test_a_run_killed_mid_training_resumes_to_the_same_scores(runs):
    assert runs["killed_returncode"] == -signal.SIGKILL
    assert runs["killed_after"] and max(runs["killed_after"]) < 6, "the kill came after training ended"
    assert f"resumed {runs['killed']} after epoch " in runs["resumed_log"]
    assert _scores(_results(runs["killed"])) == _scores(_results(runs["whole"]))
    assert _untimed(_history(runs["killed"])) == _untimed(_history(runs["whole"]))


def test_results_json_has_the_design_keys_and_fractions(runs):
    r = _results(runs["whole"])
    assert r["dataset"] == "demo" and r["seeds"] == [0, 1] and r["epochs"] == 6
    assert len(r["test"]["weighted_f1"]["per_seed"]) == 2 and len(r["best_epoch"]) == 2
    assert set(r["test"]["experts"]) == {"speech", "text", "multimodal", "moe"}
    assert r["test"]["experts"]["moe"]["weighted_f1"] == r["test"]["weighted_f1"]
    assert set(r["test"]["per_class_f1"]) == set(r["label_names"])
    assert 0.0 <= r["test"]["weighted_f1"]["mean"] <= 1.0 and 0.0 <= r["val"]["weighted_f1"]["mean"] <= 1.0
    per_seed = r["test"]["weighted_f1"]["per_seed"]
    assert r["test"]["weighted_f1"]["mean"] == pytest.approx(np.mean(per_seed))
    confusion = r["test"]["confusion_matrix_per_seed"]
    assert np.sum(confusion[0]) == np.sum(confusion[1]) > 0
    assert np.sum(r["test"]["confusion_matrix"]) == 2 * np.sum(confusion[0])
    assert r["test"]["gate"]["mean"] and len(r["train_shapes"]) == 1
    history = _history(runs["whole"])
    for k, epoch in enumerate(r["best_epoch"]):
        assert history[epoch - 1]["val"]["moe"][k] == max(h["val"]["moe"][k] for h in history)
        assert history[epoch - 1]["val"]["moe"][k] == r["val"]["weighted_f1"]["per_seed"][k]
    for name in ("report.md", "confusion.png", "gate.png", "experts.png", "curves.png"):
        assert (runs["whole"] / name).stat().st_size > 0


def test_test_scores_are_those_of_the_best_validation_epoch_in_a_run_with_test_curves(runs, compile_cache):
    every = runs["root"] / "every"
    _train(runs["features"], every, 6, "test_every_epoch=true", cache=compile_cache)
    assert _scores(_results(runs["whole"])) == _scores(_results(every))
    assert not any("test" in h for h in _history(runs["whole"]))  # test is scored once, after training
    curves, r = _history(every), _results(every)
    for k, epoch in enumerate(r["best_epoch"]):
        assert curves[epoch - 1]["test"]["moe"][k] == r["test"]["weighted_f1"]["per_seed"][k]


# ------------------------------------------------------------------------------ vmap = sequential


@pytest.fixture(scope="module")
def vmapped(tmp_path_factory, tiny_features, compile_cache):
    """4 epochs with the seeds vmapped."""
    out = tmp_path_factory.mktemp("vmap") / "whole"
    _train(tiny_features, out, 4, seed_mode="vmap", cache=compile_cache)
    return out


def test_a_vmapped_run_resumes_from_its_checkpoint_to_the_same_scores(vmapped, tiny_features, compile_cache, tmp_path):
    resumed = tmp_path / "vmap-resumed"
    _train(tiny_features, resumed, 2, seed_mode="vmap", cache=compile_cache)
    _train(tiny_features, resumed, 4, seed_mode="vmap", cache=compile_cache)
    assert _scores(_results(resumed)) == _scores(_results(vmapped))
    assert _untimed(_history(resumed)) == _untimed(_history(vmapped))


def test_interleaved_seeds_train_as_the_vmapped_ones_do(runs, vmapped):
    """The CLI's sequential mode steps the seeds interleaved; each seed must still see its own batches."""
    interleaved, stacked = _history(runs["whole"])[:4], _history(vmapped)
    assert len(stacked) == 4
    for a, b in zip(interleaved, stacked):
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-4)
    assert interleaved[0]["train_loss"][0] != interleaved[0]["train_loss"][1]


def test_vmapped_seeds_follow_the_sequential_trajectories(compile_cache):
    config = tiny_config(6, "speech_dim=5", "text_dim=6")  # as the runs above
    rng = np.random.default_rng(0)
    mask = np.arange(6)[None, :] < np.array([6, 4, 3, 6])[:, None]
    steps = [
        [
            Batch(
                rng.normal(size=(4, 6, 5)).astype(np.float32),
                rng.normal(size=(4, 6, 6)).astype(np.float32),
                np.where(mask, rng.integers(0, 6, (4, 6)), -1).astype(np.int32),
                mask,
            )
            for _ in range(2)
        ]
        for _ in range(3)
    ]  # [step][seed]
    trained = {}
    for mode in ("sequential", "vmap"):
        seeds = SeedStates(config.model, config.loss, config.train, [0, 1], mode, compile_cache)
        seeds.initialise()
        losses = [[float(m["loss"]) for m in per_seed] for per_seed in seeds.train_epoch(steps)]
        params = seeds.params()
        trained[mode] = (losses, params if mode == "vmap" else jax.tree_util.tree_map(lambda *x: np.stack(x), *params))
    np.testing.assert_allclose(trained["vmap"][0], trained["sequential"][0], rtol=1e-5)
    assert trained["sequential"][0][0] != trained["sequential"][0][1]
    # Attention key biases get no gradient in exact arithmetic (softmax is shift invariant): Adam turns
    # their rounding-level gradients into steps of up to lr, so they are held to 3 steps of lr only.
    leaves = jax.tree_util.tree_flatten_with_path(trained["sequential"][1])[0]
    for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(trained["vmap"][1])):
        key_bias = "key" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(b), a, rtol=1e-4, atol=3e-2 if key_bias else 1e-5)


def test_the_trainer_steps_bucketed_batches_of_every_pad_length_vmapped_and_interleaved(tmp_path, compile_cache):
    """Seed 0's first epoch leaves a pad length out here, which must be compiled all the same; vmapped
    seeds pad each step to the longest of theirs, interleaved ones keep their own, for the same losses
    (without dropout: its masks are drawn for the padded shape)."""
    config = DemoConfig(
        conversations=(("train", 12), ("val", 4), ("test", 4)), min_length=3, max_length=12, text_dim=6, speech_dim=5
    )
    store = FeatureStore.open(build_demo_store(tmp_path / "features", config=config))
    lengths = load_split(store, "train", ("text",)).lengths
    pads = choose_pad_lengths([lengths], 4, 3, 2, "bucketed", pool_batches=2)
    assert {p.length for p in epoch_plan(lengths, pads, 4, seed=0, epoch=0, batching="bucketed", pool_batches=2)} < set(
        pads
    )
    settings = [
        "num_buckets=3",
        "batching=bucketed",
        "pool_batches=2",
        "can_dropout=0",
        "fusion_dropout=0",
        "attention_dropout=0",
    ]
    losses = {}
    for mode in ("vmap", "sequential"):
        results = _train(tmp_path / "features", tmp_path / mode, 2, *settings, seed_mode=mode, cache=compile_cache)
        assert [t for _, t in results["train_shapes"]] == list(pads)
        losses[mode] = [h["train_loss"] for h in _history(tmp_path / mode)]
    np.testing.assert_allclose(losses["vmap"], losses["sequential"], rtol=1e-4)
    assert losses["vmap"][0][0] != losses["vmap"][0][1]


# ------------------------------------------------------------------------------------ checkpoints


def test_checkpoints_are_due_by_time_by_epoch_count_and_after_the_last_epoch():
    by_time = TrainConfig(epochs=10)  # the default: once 10 minutes have passed since the last save
    assert (by_time.checkpoint_every, by_time.checkpoint_minutes) == (0, 10.0)
    assert [checkpoint_due(by_time, e, 599.0) for e in (1, 9, 10)] == [False, False, True]
    assert checkpoint_due(by_time, 3, 600.0)
    every_4 = TrainConfig(epochs=10, checkpoint_every=4, checkpoint_minutes=0)
    assert [e for e in range(1, 11) if checkpoint_due(every_4, e, 1e9)] == [4, 8, 10]
    with pytest.raises(ValueError, match="checkpoint_minutes=-1"):
        TrainConfig(checkpoint_minutes=-1)


def test_no_intact_checkpoint_names_the_directory_and_the_fix(runs, tmp_path, compile_cache):
    out = _copy(runs["whole"], tmp_path / "run")
    for f in (out / "checkpoints" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(UsageError) as err:
        _train(runs["features"], out, 6, cache=compile_cache)
    assert f"{out / 'checkpoints' / 'state'}: no intact checkpoint" in str(err.value) and "--restart" in str(err.value)


def test_a_failed_checkpoint_write_names_the_directory_and_the_fix(tmp_path, monkeypatch):
    ckpt = checkpoint.RunCheckpoints(tmp_path / "checkpoints")

    def disk_full(path, buffer):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(direct_io, "write_buffer", disk_full)
    ckpt.save_state(1, {"train": HostMirror({"w": np.zeros(3, np.float32)}, 1)}, {})
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"checkpoints/state: writing a checkpoint failed \(OSError: "
        r".*No space left.*free disk space.*rerun the same",
    ):
        ckpt.wait()
    assert ckpt.latest_epoch() is None


def test_a_checkpoint_holds_its_own_epoch_while_the_next_one_runs(tmp_path, tiny_features, compile_cache, monkeypatch):
    """The background write of epoch 1 is still going while epoch 2 trains and validates: the trainer
    must not refill the host mirrors before it ends, so state/1 holds what a 1-epoch run saves."""
    _train(tiny_features, tmp_path / "one", 1, cache=compile_cache)
    write = direct_io.write_buffer

    def slow_write(path, buffer):
        if path.name == "train.bin":  # the first buffer of a checkpoint: the whole write is held up
            time.sleep(3.0)  # longer than an epoch of this tiny model
        write(path, buffer)

    monkeypatch.setattr(direct_io, "write_buffer", slow_write)
    _train(tiny_features, tmp_path / "two", 2, cache=compile_cache)
    for name in ("train.bin", "best_params.bin"):
        saved = (tmp_path / "two" / "checkpoints" / "state" / "1" / name).read_bytes()
        assert saved == (tmp_path / "one" / "checkpoints" / "state" / "1" / name).read_bytes(), name


def test_a_checkpoint_with_changed_bytes_is_passed_over_for_the_previous_one(runs, capsys, tmp_path, compile_cache):
    out = _copy(runs["whole"], tmp_path / "run")
    newest = max(int(p.name) for p in (out / "checkpoints" / "state").iterdir() if p.name.isdigit())
    buffer = out / "checkpoints" / "state" / str(newest) / "train.bin"
    buffer.write_bytes(np.random.default_rng(0).integers(0, 256, buffer.stat().st_size, dtype=np.uint8).tobytes())
    results = _train(runs["features"], out, 6, cache=compile_cache)
    err = capsys.readouterr().err
    assert f"state/{newest}: checkpoint is unreadable" in err and "train.bin fails its SHA-256 digest" in err
    assert f"resumed {out} after epoch {newest - 1}" in err
    assert _scores(results) == _scores(_results(runs["whole"]))


# ------------------------------------------------------------------------------- non-finite steps


def test_non_finite_training_stops_at_the_step_and_names_seed_and_term(tmp_path, tiny_features, compile_cache):
    out = tmp_path / "run"
    with pytest.raises(UsageError) as err:
        _train(tiny_features, out, 2, "learning_rate=1e36", cache=compile_cache)
    message = str(err.value)
    assert "epoch 1, step 2 of 2, seed 0: loss term focal_speech = nan" in message
    assert "--on-nonfinite skip-step" in message and len(message.splitlines()) == 1
    assert not (out / "results.json").exists()


def test_skipped_non_finite_steps_are_counted_in_results(tmp_path, tiny_features, compile_cache):
    results = _train(
        tiny_features, tmp_path / "run", 2, "learning_rate=1e36", "on_nonfinite=skip-step", cache=compile_cache
    )
    # Step 1 makes the parameters huge; every later step of each seed (2 per epoch) is non-finite.
    assert results["skipped_nonfinite_steps"] == [3, 3] == _results(tmp_path / "run")["skipped_nonfinite_steps"]


# ----------------------------------------------------------------------------------------- report


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (the tests run as root); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_while_the_report_is_written_leaves_no_broken_file(runs, small_disk):
    from mister_jax.report import ReportError, write_report

    (small_disk / "filler").write_bytes(b"\0" * (1024 * 1024 - 60 * 1024))  # room for a figure or two
    with pytest.raises(ReportError, match=r"\.png: could not be written \(No space left on device\)"):
        write_report(small_disk, _results(runs["whole"]), _history(runs["whole"]))
    left = sorted(p.name for p in small_disk.iterdir() if p.name != "filler")
    assert left and "report.md" not in left and not any(name.startswith(".") for name in left)
    for name in left:  # each figure that made it is a whole PNG
        assert (small_disk / name).read_bytes().endswith(b"IEND\xaeB`\x82"), name


def test_a_report_that_cannot_be_written_fails_after_the_results(runs, tmp_path, compile_cache, monkeypatch):
    from mister_jax import report

    out = _copy(runs["whole"], tmp_path / "run")
    (out / "results.json").unlink()

    def full_disk(path, data):
        raise report.ReportError(f"{path}: could not be written (No space left on device)")

    monkeypatch.setattr(report, "_write", full_disk)
    with pytest.raises(
        UsageError,
        match=r"\.png: could not be written \(No space left on device\); results\.json "
        r"and metrics\.jsonl are complete — free the space and rerun",
    ):
        _train(runs["features"], out, 6, cache=compile_cache)
    assert _results(out)["best_epoch"] == _results(runs["whole"])["best_epoch"]
