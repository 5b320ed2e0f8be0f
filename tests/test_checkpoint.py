"""Training-state checkpoints: the host mirrors' buffers written as they are, committed atomically."""

import errno
import os

import numpy as np
import pytest

from mister_jax import checkpoint
from mister_jax.checkpoint import CheckpointError, RunCheckpoints
from mister_jax.host_mirror import HostMirror


def _mirrors(fill: float) -> dict:
    train = HostMirror({"w": np.zeros((2, 3), np.float32), "step": np.int32(0), "mask": np.zeros(5, bool)}, 2)
    best = HostMirror({"w": np.zeros((2, 3), np.float32)}, 2)
    for k in range(2):
        train.put(k, {"w": np.full((2, 3), fill + k, np.float32), "step": np.int32(7 + k),
                      "mask": np.arange(5) % 2 == k})
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
    with pytest.raises(CheckpointError, match=r"state/2: checkpoint is unreadable .*train.bin holds 100 bytes.*--restart"):
        ckpt.restore_state(_mirrors(0.0))
