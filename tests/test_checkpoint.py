"""Training-state checkpoints: the host mirrors' buffers written as they are, committed atomically."""

import errno
import os

import numpy as np
import pytest

from mister_jax import checkpoint
from mister_jax.checkpoint import CheckpointError, RunCheckpoints
from mister_jax.runtime.host_mirror import HostMirror


def _mirrors(fill: float) -> dict:
    train = HostMirror({"w": np.zeros((2, 3), np.float32), "step": np.int32(0), "mask": np.zeros(5, bool)}, 2)
    best = HostMirror({"w": np.zeros((2, 3), np.float32)}, 2)
    for k in range(2):
        train.put(
            k, {"w": np.full((2, 3), fill + k, np.float32), "step": np.int32(7 + k), "mask": np.arange(5) % 2 == k}
        )
        best.put(k, {"w": np.full((2, 3), -fill - k, np.float32)})
    return {"train": train, "best_params": best}


def _assert_same(a: dict, b: dict) -> None:
    for name in a:
        np.testing.assert_array_equal(a[name].buffer, b[name].buffer)
        for k in range(2):
            for leaf in a[name].tree:
                np.testing.assert_array_equal(a[name].seed(k)[leaf], b[name].seed(k)[leaf])


def test_a_saved_state_restores_into_fresh_buffers_with_its_meta(tmp_path):
    ckpt = RunCheckpoints(tmp_path)
    saved = _mirrors(1.5)
    ckpt.save_state(3, saved, {"history": [{"epoch": 3}], "best": [None, None]})
    ckpt.wait()
    restored = _mirrors(0.0)
    epoch, meta = RunCheckpoints(tmp_path).restore_state(restored)
    assert epoch == 3 and meta == {"history": [{"epoch": 3}], "best": [None, None]}
    _assert_same(saved, restored)


def test_the_last_two_steps_are_kept_and_an_unfinished_one_is_ignored(tmp_path):
    ckpt = RunCheckpoints(tmp_path)
    for epoch in (1, 2, 3, 4):
        ckpt.save_state(epoch, _mirrors(float(epoch)), {"epoch": epoch})
    ckpt.close()
    (tmp_path / "state" / "5.partial").mkdir()  # a write killed before its commit
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["3", "4", "5.partial"]
    restored = _mirrors(0.0)
    assert RunCheckpoints(tmp_path).restore_state(restored) == (4, {"epoch": 4})
    _assert_same(_mirrors(4.0), restored)


def test_buffers_bypass_the_page_cache_where_the_filesystem_allows_and_fall_back_where_not(tmp_path, monkeypatch):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    real_open, opened = os.open, []

    def no_direct_io(path, flags, *args):
        opened.append(bool(flags & os.O_DIRECT))
        if flags & os.O_DIRECT and "fallback" in str(path):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct_io)
    for name in ("direct", "fallback"):
        ckpt, saved = RunCheckpoints(tmp_path / name), _mirrors(2.0)
        ckpt.save_state(1, saved, {})
        ckpt.wait()
        restored = _mirrors(0.0)
        ckpt.restore_state(restored)
        _assert_same(saved, restored)
    assert opened.count(True) == 4  # two buffers per run, each opened for direct I/O first


def test_a_state_of_other_arrays_is_unreadable_with_the_fix(tmp_path):
    ckpt = RunCheckpoints(tmp_path)
    ckpt.save_state(2, _mirrors(1.0), {})
    ckpt.wait()
    other = {"train": HostMirror({"w": np.zeros((2, 4), np.float32)}, 2), "best_params": _mirrors(0.0)["best_params"]}
    with pytest.raises(CheckpointError, match=r"state/2: checkpoint is unreadable .*other arrays.*--restart"):
        ckpt.restore_state(other)


def test_a_truncated_buffer_is_unreadable_with_the_fix(tmp_path):
    ckpt = RunCheckpoints(tmp_path)
    ckpt.save_state(2, _mirrors(1.0), {})
    ckpt.wait()
    path = tmp_path / "state" / "2" / "train.bin"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(
        CheckpointError, match=r"state/2: checkpoint is unreadable .*train.bin holds 100 bytes.*--restart"
    ):
        ckpt.restore_state(_mirrors(0.0))


def _overwrite_with_random_bytes(path):
    """Same size, other bytes: what a flipped disk block or a bad copy leaves."""
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


def test_a_step_whose_bytes_changed_is_reported_and_the_previous_step_resumed(tmp_path):
    ckpt = RunCheckpoints(tmp_path)
    for epoch in (1, 2):
        ckpt.save_state(epoch, _mirrors(float(epoch)), {"epoch": epoch})
    ckpt.close()
    _overwrite_with_random_bytes(tmp_path / "state" / "2" / "train.bin")
    reports, restored = [], _mirrors(0.0)
    assert RunCheckpoints(tmp_path, log=reports.append).restore_state(restored) == (1, {"epoch": 1})
    _assert_same(_mirrors(1.0), restored)
    assert len(reports) == 1 and "state/2" in reports[0] and "train.bin fails its SHA-256 digest" in reports[0]
    assert "epoch 1" in reports[0]


def test_no_intact_step_stops_with_the_directory_and_the_fix(tmp_path):
    ckpt = RunCheckpoints(tmp_path)
    for epoch in (1, 2):
        ckpt.save_state(epoch, _mirrors(float(epoch)), {"epoch": epoch})
    ckpt.close()
    for epoch in (1, 2):
        _overwrite_with_random_bytes(tmp_path / "state" / str(epoch) / "best_params.bin")
    with pytest.raises(
        CheckpointError,
        match=r"state: no intact checkpoint \(epochs 1, 2; .*best_params.bin fails"
        r".*--restart",
    ):
        RunCheckpoints(tmp_path, log=lambda _: None).restore_state(_mirrors(0.0))


def test_edited_meta_fails_its_digest(tmp_path):
    ckpt = RunCheckpoints(tmp_path)
    ckpt.save_state(1, _mirrors(1.0), {"best": [0.5]})
    ckpt.close()
    (tmp_path / "state" / "1" / "meta.json").write_text('{"best": [0.9]}')
    with pytest.raises(CheckpointError, match="meta.json fails its SHA-256 digest"):
        RunCheckpoints(tmp_path).restore_state(_mirrors(0.0))


def test_best_parameters_whose_bytes_changed_fail_their_digest(tmp_path):
    params = {"w": np.arange(4096, dtype=np.float32).reshape(64, 64), "b": np.ones(3, np.float32)}
    ckpt = RunCheckpoints(tmp_path)
    ckpt.save_best(0, 5, params)
    ckpt.close()
    target = {"w": np.zeros((64, 64), np.float32), "b": np.zeros(3, np.float32)}
    epoch, restored = RunCheckpoints(tmp_path).restore_best(0, target)
    assert epoch == 5
    np.testing.assert_array_equal(restored["w"], params["w"])
    record = tmp_path / "best" / "seed_0.digest.json"
    record.write_text(record.read_text().replace(checkpoint.params_digest(params), "0" * 64))
    with pytest.raises(CheckpointError, match=r"best/seed_0/5: the best parameters of seed 0 fail their SHA-256"):
        RunCheckpoints(tmp_path).restore_best(0, target)


def test_params_digest_sees_values_shapes_and_names():
    params = {"w": np.zeros((2, 3), np.float32)}
    digest = checkpoint.params_digest(params)
    assert digest == checkpoint.params_digest({"w": np.zeros((2, 3), np.float32)})
    for other in (
        {"w": np.zeros((3, 2), np.float32)},
        {"v": np.zeros((2, 3), np.float32)},
        {"w": np.full((2, 3), 1e-30, np.float32)},
    ):
        assert checkpoint.params_digest(other) != digest
