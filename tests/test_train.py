"""python -m mister_jax.train: presets, metrics, exact resume after SIGKILL, vmap = sequential, errors.

Runs use the demo generator shrunk to a few short conversations and a tiny model, one pad length and
the persistent compilation cache, so that the whole file stays within its time budget.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from bridges import init_store, write_index, write_modality
from bridges.demo import DemoConfig, build_demo_store
from mister_jax import train as train_cli
from mister_jax.data import Batch
from mister_jax.metrics import per_class_f1, weighted_f1
from mister_jax.presets import OverrideError, apply_overrides, get_preset
from mister_jax.trainer import (clip_by_global_norm, create_train_state, make_steps, seed_keys, stack_states,
                                unstack_states)

REPO = Path(__file__).resolve().parents[1]
CACHE = os.environ.get("MISTER_JAX_CACHE", str(Path.home() / ".cache" / "mister" / "jax"))
TINY = ["can_hidden=8", "fusion_dim=8", "attention_dim=8", "attention_heads=2", "gru_layers=1",
        "fusion_layers=1", "num_buckets=1", "batch_size=4", "learning_rate=0.01"]
TINY_DEMO = DemoConfig(conversations=(("train", 8), ("val", 4), ("test", 4)), min_length=3, max_length=6,
                       text_dim=6, speech_dim=5)


def tiny_store(root: Path, config: DemoConfig = TINY_DEMO) -> Path:
    return build_demo_store(root, config=config)


def train_args(features: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    args = ["--dataset", "demo", "--features", str(features), "--out", str(out), "--epochs", str(epochs),
            "--seeds", "2", "--checkpoint-every", "1", "--quiet", "--jax-cache", CACHE, *extra]
    for item in TINY:
        args += ["--set", item]
    return args


def cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "mister_jax.train", *args]


# ---------------------------------------------------------------------------------------- presets


def test_presets_follow_the_paper_table():
    for name, (batch, lam, alpha, tau, layers) in {"iemocap": (8, 2, 0.1, 1, 3), "meld": (32, 1, 1e-3, 0.05, 2),
                                                   "mosi": (8, 1, 0.1, 1, 3)}.items():
        p = get_preset(name)
        assert (p.train.batch_size, p.loss.lambda_con, p.loss.alpha_kl, p.loss.temperature,
                p.model.gru_layers) == (batch, lam, alpha, tau, layers)
        assert (p.train.learning_rate, p.train.clip_norm, p.train.epochs, p.train.seeds) == (1e-5, 1.0, 100, 3)
    assert get_preset("meld").model.num_classes == 7 and get_preset("mosi").model.num_classes == 2
    assert get_preset("emorynlp").model.variant == "text-only"
    other = get_preset("my-corpus", ["a", "b", "c"])
    assert other.model.num_classes == 3 and other.train == get_preset("iemocap").train


def test_authors_code_preset_is_the_paper_preset_with_their_departures():
    paper, authors = get_preset("meld"), get_preset("meld", style="authors-code")
    assert (authors.model.attention_heads, authors.model.gate, authors.model.gate_temperature,
            authors.model.can_dropout) == (3, "mlp", 2.0, 0.0)
    assert (authors.loss.contrastive_scope, authors.loss.kl_form) == ("batch", "symmetric")
    assert (authors.train.batching, paper.train.batching) == ("random", "bucketed")
    assert (dataclasses.replace(authors.train, batching="bucketed"), authors.model.gru_layers,
            authors.loss.lambda_con) == (paper.train, 2, 1.0)
    assert (paper.model.attention_heads, paper.model.gate, paper.loss.kl_form) == (4, "fc", "directional")


def test_set_overrides_convert_types_and_reject_unknown_keys():
    p = apply_overrides(get_preset("iemocap"), ["lambda_con=0", "train.epochs=7", "gate=mlp", "loss.gamma=0"])
    assert p.loss.lambda_con == 0.0 and isinstance(p.loss.lambda_con, float)
    assert p.train.epochs == 7 and p.model.gate == "mlp" and p.loss.gamma == 0.0
    with pytest.raises(OverrideError, match="unknown key; valid keys: .*lambda_con"):
        apply_overrides(get_preset("iemocap"), ["lamda_con=0"])
    with pytest.raises(OverrideError, match="expected a value of type int"):
        apply_overrides(get_preset("iemocap"), ["epochs=many"])


def test_matmuls_default_to_bfloat16_on_an_accelerator_only(tmp_path, monkeypatch):
    tiny_store(tmp_path / "features")
    store = train_cli.open_store("demo", str(tmp_path / "features"))
    args = lambda *extra: train_cli.parse_args(["--dataset", "demo", *extra])
    assert train_cli.build_preset(args(), store).model.dtype == "float32"  # this machine: CPU
    monkeypatch.setattr(train_cli, "on_accelerator", lambda: True)
    assert train_cli.build_preset(args(), store).model.dtype == "bfloat16"
    assert train_cli.build_preset(args("--set", "model.dtype=float32"), store).model.dtype == "float32"


def test_clipping_scales_the_gradient_to_the_global_norm_as_optax_does():
    import optax

    rng = np.random.default_rng(0)
    grads = {"w": rng.normal(size=(6, 5)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in grads.values()))
    clipped, _ = clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    for name, g in grads.items():
        np.testing.assert_allclose(clipped[name], g / norm, rtol=1e-6)
        np.testing.assert_allclose(clipped[name], theirs[name], rtol=1e-6)
    assert np.isclose(np.sqrt(sum(np.sum(np.square(c)) for c in clipped.values())), 1.0, rtol=1e-6)
    unclipped, _ = clip_by_global_norm(2.0 * norm).update(grads, optax.EmptyState())
    for name, g in grads.items():
        np.testing.assert_array_equal(unclipped[name], g)


def test_weighted_and_per_class_f1_on_a_worked_example():
    # true 0 0 0 1 1 2; predicted 0 0 1 1 2 2 -> per class F1: 0: 2*2/(3+2)=0.8, 1: 2*1/(2+2)=0.5,
    # 2: 2*1/(1+2)=2/3, class 3 absent and never predicted: 0; weighted by support 3, 2, 1, 0.
    y, p = np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 2, 2])
    assert per_class_f1(y, p, ["a", "b", "c", "d"]) == pytest.approx({"a": 0.8, "b": 0.5, "c": 2 / 3, "d": 0.0})
    assert weighted_f1(y, p, 4) == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)


def test_checkpoints_are_due_by_time_by_epoch_count_and_after_the_last_epoch():
    from mister_jax.presets import TrainConfig

    by_time = TrainConfig(epochs=10)  # the default: once 10 minutes have passed since the last save
    assert (by_time.checkpoint_every, by_time.checkpoint_minutes) == (0, 10.0)
    assert [train_cli.checkpoint_due(by_time, e, 599.0) for e in (1, 9, 10)] == [False, False, True]
    assert train_cli.checkpoint_due(by_time, 3, 600.0)
    every_4 = TrainConfig(epochs=10, checkpoint_every=4, checkpoint_minutes=0)
    assert [e for e in range(1, 11) if train_cli.checkpoint_due(every_4, e, 1e9)] == [4, 8, 10]
    with pytest.raises(ValueError, match="checkpoint_minutes=-1"):
        TrainConfig(checkpoint_minutes=-1)


# --------------------------------------------------------------------------- resume after SIGKILL


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _untimed(history: list[dict]) -> list[dict]:
    """The epoch records without their wall-clock figures."""
    timing = ("seconds", "utterances_per_second", "validation_seconds", "checkpoint_seconds")
    return [{k: v for k, v in record.items() if k not in timing} for record in history]


def _scores(results: dict) -> dict:
    return {k: results[k] for k in ("test", "val", "best_epoch", "seeds", "epochs")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run and a run SIGKILLed after its first checkpoint, then resumed."""
    root = tmp_path_factory.mktemp("train")
    features = root / "features"
    tiny_store(features)
    epochs = 6
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    whole = subprocess.run(cli(train_args(Path("features"), Path("whole"), epochs)), cwd=root, env=env,
                           capture_output=True, text=True, timeout=300)  # relative paths work too
    assert whole.returncode == 0, whole.stderr
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
    resumed = subprocess.run(cli(args), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    return {"root": root, "features": features, "whole": root / "whole", "killed": root / "killed",
            "killed_returncode": proc.returncode, "killed_after": killed_after, "resumed_log": resumed.stderr}


def test_a_run_killed_mid_training_resumes_to_the_same_scores(runs):
    assert runs["killed_returncode"] == -signal.SIGKILL
    assert runs["killed_after"] and max(runs["killed_after"]) < 6, "the kill came after training ended"
    assert "resumed" in runs["resumed_log"]
    whole = json.loads((runs["whole"] / "results.json").read_text())
    resumed = json.loads((runs["killed"] / "results.json").read_text())
    assert _scores(resumed) == _scores(whole)
    assert _untimed(_history(runs["killed"])) == _untimed(_history(runs["whole"]))


def test_results_json_has_the_design_keys_and_fractions(runs):
    r = json.loads((runs["whole"] / "results.json").read_text())
    assert r["dataset"] == "demo" and r["seeds"] == [0, 1] and r["epochs"] == 6
    assert len(r["test"]["weighted_f1"]["per_seed"]) == 2 and len(r["best_epoch"]) == 2
    assert set(r["test"]["experts"]) == {"speech", "text", "multimodal", "moe"}
    assert r["test"]["experts"]["moe"]["weighted_f1"] == r["test"]["weighted_f1"]
    assert set(r["test"]["per_class_f1"]) == set(r["label_names"])
    assert 0.0 <= r["test"]["weighted_f1"]["mean"] <= 1.0 and 0.0 <= r["val"]["weighted_f1"]["mean"] <= 1.0
    per_seed = r["test"]["confusion_matrix_per_seed"]
    assert np.sum(per_seed[0]) == np.sum(per_seed[1]) > 0
    assert np.sum(r["test"]["confusion_matrix"]) == 2 * np.sum(per_seed[0])
    assert r["test"]["gate"]["mean"] and len(r["train_shapes"]) == 1
    history = _history(runs["whole"])
    for k, epoch in enumerate(r["best_epoch"]):
        assert history[epoch - 1]["val"]["moe"][k] == max(h["val"]["moe"][k] for h in history)
        assert history[epoch - 1]["val"]["moe"][k] == r["val"]["weighted_f1"]["per_seed"][k]
    for name in ("report.md", "confusion.png", "gate.png", "experts.png", "curves.png"):
        assert (runs["whole"] / name).stat().st_size > 0


def test_test_scores_are_those_of_the_best_validation_epoch_in_a_run_with_test_curves(runs):
    every = runs["root"] / "every"
    assert train_cli.main(train_args(runs["features"], every, 6, "--set", "test_every_epoch=true")) == 0
    results = lambda run_dir: json.loads((run_dir / "results.json").read_text())
    assert _scores(results(runs["whole"])) == _scores(results(every))
    assert not any("test" in h for h in _history(runs["whole"]))  # test is scored once, after training
    curves, r = _history(every), results(every)
    for k, epoch in enumerate(r["best_epoch"]):
        assert curves[epoch - 1]["test"]["moe"][k] == r["test"]["weighted_f1"]["per_seed"][k]


def test_a_vmapped_run_resumes_from_its_checkpoint_to_the_same_scores(runs):
    whole, resumed = runs["root"] / "vmap-whole", runs["root"] / "vmap-resumed"
    assert train_cli.main(train_args(runs["features"], whole, 4, "--seed-mode", "vmap")) == 0
    assert train_cli.main(train_args(runs["features"], resumed, 2, "--seed-mode", "vmap")) == 0
    assert train_cli.main(train_args(runs["features"], resumed, 4, "--seed-mode", "vmap")) == 0
    results = lambda run_dir: json.loads((run_dir / "results.json").read_text())
    assert _scores(results(resumed)) == _scores(results(whole))
    assert _untimed(_history(resumed)) == _untimed(_history(whole))


def test_interleaved_seeds_train_as_the_vmapped_ones_do(runs):
    """The CLI's sequential mode steps the seeds interleaved; each seed must still see its own batches."""
    vmapped = runs["root"] / "vmap-2"
    assert train_cli.main(train_args(runs["features"], vmapped, 2, "--seed-mode", "vmap")) == 0
    interleaved, stacked = _history(runs["whole"])[:2], _history(vmapped)
    for a, b in zip(interleaved, stacked):
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-4)
    assert interleaved[0]["train_loss"][0] != interleaved[0]["train_loss"][1]


# ------------------------------------------------------------------------------ vmap = sequential


def test_vmapped_seeds_follow_the_sequential_trajectories():
    train_cli.enable_compilation_cache(CACHE)
    preset = apply_overrides(get_preset("demo"), TINY + ["speech_dim=5", "text_dim=6"])  # as the runs above
    cfg, tcfg = preset.model, preset.train
    rng = np.random.default_rng(0)
    mask = np.arange(8)[None, :] < np.array([8, 5, 3, 8])[:, None]
    batches = [[Batch(rng.normal(size=(4, 8, 5)).astype(np.float32), rng.normal(size=(4, 8, 6)).astype(np.float32),
                      np.where(mask, rng.integers(0, 6, (4, 8)), -1).astype(np.int32), mask)
                for _ in range(2)] for _ in range(3)]  # [step][seed]
    initial = stack_states([create_train_state(cfg, tcfg, s) for s in (0, 1)])
    sequential, _ = make_steps(cfg, preset.loss, tcfg, vmap=False)
    vmapped, _ = make_steps(cfg, preset.loss, tcfg, vmap=True)
    states = [jax.device_put(s) for s in unstack_states(initial, 2)]
    stacked = jax.device_put(initial)
    keys = [seed_keys(s)[1] for s in (0, 1)]
    for step in batches:
        losses = []
        for k in range(2):
            states[k], m = sequential(states[k], step[k], keys[k])
            losses.append(float(m["loss"]))
        stacked, m = vmapped(stacked, jax.tree_util.tree_map(lambda *x: np.stack(x), *step), jax.numpy.stack(keys))
        np.testing.assert_allclose(np.asarray(m["loss"]), losses, rtol=1e-5)
    assert losses[0] != losses[1]
    # Attention key biases get no gradient in exact arithmetic (softmax is shift invariant): Adam turns
    # their rounding-level gradients into steps of up to lr, so they are held to 3 steps of lr only.
    leaves = jax.tree_util.tree_flatten_with_path(stack_states(states))[0]
    for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(stacked)):
        key_bias = "key" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(b), a, rtol=1e-4, atol=3e-2 if key_bias else 1e-5)


# ------------------------------------------------------------------------------------------ errors


def _error(capsys, args) -> str:
    assert train_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_missing_store_says_how_to_make_one(tmp_path, capsys):
    err = _error(capsys, ["--dataset", "iemocap", "--features", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "no feature store" in err and "encoders_torch.extract" in err and "--dataset demo" in err


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


@pytest.mark.parametrize("flag, message", [(["--variant", "bimodal"], "unknown variant"),
                                           (["--set", "lamda_con=0"], "unknown key; valid keys")])
def test_unknown_variant_or_key(tmp_path, capsys, flag, message):
    tiny_store(tmp_path)
    assert message in _error(capsys, train_args(tmp_path, tmp_path / "o", 1, *flag))


def test_unwritable_out(tmp_path, capsys):
    tiny_store(tmp_path)
    (tmp_path / "file").write_text("")
    err = _error(capsys, train_args(tmp_path, tmp_path / "file" / "run", 1))
    assert "--out" in err and "cannot write there" in err


def test_no_intact_checkpoint_names_the_directory_and_the_fix(runs, capsys, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(runs["whole"], out)
    for f in (out / "checkpoints" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    err = _error(capsys, train_args(runs["features"], out, 6))
    assert f"{out / 'checkpoints' / 'state'}: no intact checkpoint" in err and "--restart" in err


def test_a_failed_checkpoint_write_names_the_directory_and_the_fix(tmp_path, monkeypatch):
    from mister_jax import checkpoint
    from mister_jax.host_mirror import HostMirror

    ckpt = checkpoint.RunCheckpoints(tmp_path / "checkpoints")

    def disk_full(path, buffer):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_buffer", disk_full)
    ckpt.save_state(1, {"train": HostMirror({"w": np.zeros(3, np.float32)}, 1)}, {})
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/state: writing a checkpoint failed \(OSError: "
                                                         r".*No space left.*free disk space.*rerun the same"):
        ckpt.wait()
    assert ckpt.latest_epoch() is None


def test_a_checkpoint_holds_its_own_epoch_while_the_next_one_runs(tmp_path, monkeypatch):
    """The background write of epoch 1 is still going while epoch 2 trains and validates: the trainer
    must not refill the host mirrors before it ends, so state/1 holds what a 1-epoch run saves."""
    from mister_jax import checkpoint

    features = tiny_store(tmp_path / "features")
    assert train_cli.main(train_args(features, tmp_path / "one", 1)) == 0
    write = checkpoint._write_buffer

    def slow_write(path, buffer):
        if path.name == "train.bin":  # the first buffer of a checkpoint: the whole write is held up
            time.sleep(3.0)  # longer than an epoch of this tiny model
        write(path, buffer)

    monkeypatch.setattr(checkpoint, "_write_buffer", slow_write)
    assert train_cli.main(train_args(features, tmp_path / "two", 2)) == 0
    for name in ("train.bin", "best_params.bin"):
        saved = (tmp_path / "two" / "checkpoints" / "state" / "1" / name).read_bytes()
        assert saved == (tmp_path / "one" / "checkpoints" / "state" / "1" / name).read_bytes(), name


# ------------------------------------------------------------------------------ nothing wrong passes


def test_a_checkpoint_with_changed_bytes_is_passed_over_for_the_previous_one(runs, capsys, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(runs["whole"], out)
    newest = max(int(p.name) for p in (out / "checkpoints" / "state").iterdir() if p.name.isdigit())
    buffer = out / "checkpoints" / "state" / str(newest) / "train.bin"
    buffer.write_bytes(np.random.default_rng(0).integers(0, 256, buffer.stat().st_size, dtype=np.uint8).tobytes())
    assert train_cli.main(train_args(runs["features"], out, 6)) == 0
    err = capsys.readouterr().err
    assert f"state/{newest}: checkpoint is unreadable" in err and "train.bin fails its SHA-256 digest" in err
    assert f"resumed {out} after epoch {newest - 1}" in err
    whole = json.loads((runs["whole"] / "results.json").read_text())
    assert _scores(json.loads((out / "results.json").read_text())) == _scores(whole)


def test_non_finite_training_stops_at_the_step_and_names_seed_and_term(tmp_path, capsys):
    tiny_store(tmp_path / "features")
    out = tmp_path / "run"
    err = _error(capsys, train_args(tmp_path / "features", out, 2) + ["--set", "learning_rate=1e36"])
    assert "epoch 1, step 2 of 2, seed 0: loss term focal_speech = nan" in err and "--on-nonfinite skip-step" in err
    assert len(err.strip().splitlines()[-1:]) == 1 and not (out / "results.json").exists()


def test_skipped_non_finite_steps_are_counted_in_results(tmp_path):
    tiny_store(tmp_path / "features")
    out = tmp_path / "run"
    args = train_args(tmp_path / "features", out, 2, "--on-nonfinite", "skip-step") + ["--set", "learning_rate=1e36"]
    assert train_cli.main(args) == 0
    # Step 1 makes the parameters huge; every later step of each seed (2 per epoch) is non-finite.
    assert json.loads((out / "results.json").read_text())["skipped_nonfinite_steps"] == [3, 3]


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

    results = json.loads((runs["whole"] / "results.json").read_text())
    history = [json.loads(line) for line in (runs["whole"] / "metrics.jsonl").read_text().splitlines()]
    (small_disk / "filler").write_bytes(b"\0" * (1024 * 1024 - 60 * 1024))  # room for a figure or two
    with pytest.raises(ReportError, match=r"\.png: could not be written \(No space left on device\)"):
        write_report(small_disk, results, history)
    left = sorted(p.name for p in small_disk.iterdir() if p.name != "filler")
    assert left and "report.md" not in left and not any(name.startswith(".") for name in left)
    for name in left:  # each figure that made it is a whole PNG
        assert (small_disk / name).read_bytes().endswith(b"IEND\xaeB`\x82"), name


def test_a_report_that_cannot_be_written_exits_non_zero_after_the_results(runs, capsys, tmp_path, monkeypatch):
    import shutil

    from mister_jax import report

    out = tmp_path / "run"
    shutil.copytree(runs["whole"], out)
    (out / "results.json").unlink()

    def full_disk(path, data):
        raise report.ReportError(f"{path}: could not be written (No space left on device)")

    monkeypatch.setattr(report, "_write", full_disk)
    err = _error(capsys, train_args(runs["features"], out, 6))
    assert "confusion.png: could not be written (No space left on device); results.json and metrics.jsonl" in err
    assert json.loads((out / "results.json").read_text())["best_epoch"]
