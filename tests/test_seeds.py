"""mister_jax.seeds: the seeds of a run behind one interface, vmapped or stepped in turn — a state saved
in one mode continues in the other, and each seed's parameters and predictions are its own.

(That both modes follow the same trajectories is tests/test_train.py's
``test_vmapped_seeds_follow_the_sequential_trajectories``.)"""

import jax
import numpy as np
import pytest
from conftest import tiny_config

from mister_jax.input_pipeline import Batch
from mister_jax.runtime.host_mirror import HostMirror
from mister_jax.seeds import SeedStates, resolve_seed_mode
from mister_jax.steps import abstract_train_state, create_train_state

CONFIG = tiny_config(6, "speech_dim=5", "text_dim=6")  # the tiny runs' configuration, their programs cached


def _batches(num_steps: int, seed: int = 0) -> list[list[Batch]]:
    """``[step][seed]`` batches ``[4, 6]`` of two seeds, with padding and an unlabelled utterance."""
    rng = np.random.default_rng(seed)
    mask = np.arange(6)[None, :] < np.array([6, 4, 3, 6])[:, None]
    labels = lambda: np.where(mask, rng.integers(-1, 6, (4, 6)), -1).astype(np.int32)
    return [
        [
            Batch(
                rng.normal(size=(4, 6, 5)).astype(np.float32),
                rng.normal(size=(4, 6, 6)).astype(np.float32),
                labels(),
                mask,
            )
            for _ in range(2)
        ]
        for _ in range(num_steps)
    ]


def _seeds(mode: str, cache) -> SeedStates:
    seeds = SeedStates(CONFIG.model, CONFIG.loss, CONFIG.train, [0, 1], mode, cache)
    seeds.initialise()
    return seeds


def test_auto_steps_the_seeds_in_turn_on_a_cpu():
    assert jax.default_backend() == "cpu" and resolve_seed_mode("auto") == "sequential"
    assert (resolve_seed_mode("vmap"), resolve_seed_mode("sequential")) == ("vmap", "sequential")
    with pytest.raises(ValueError, match="seed mode 'parallel'"):
        resolve_seed_mode("parallel")


@pytest.mark.parametrize("saved_in, resumed_in", [("vmap", "sequential"), ("sequential", "vmap")])
def test_a_state_saved_in_one_mode_continues_in_the_other(saved_in, resumed_in, compile_cache):
    first, second = _batches(1), _batches(2, seed=1)
    saved = _seeds(saved_in, compile_cache)
    saved.train_epoch(first)
    mirror = HostMirror(abstract_train_state(CONFIG.model, CONFIG.train), 2)
    saved.copy_states_to(mirror)
    resumed = _seeds(resumed_in, compile_cache)
    resumed.load(mirror.tree)
    expected = saved.train_epoch(second)
    got = resumed.train_epoch(second)
    for k in range(2):
        np.testing.assert_allclose(
            [float(m["loss"]) for m in got[k]], [float(m["loss"]) for m in expected[k]], rtol=1e-5
        )
        assert [int(m["utterances"]) for m in got[k]] == [int(np.sum(b[k].labels >= 0)) for b in second]


def test_each_seed_starts_from_its_own_parameters_and_predicts_with_them(compile_cache):
    seeds = _seeds("vmap", compile_cache)
    best = HostMirror(abstract_train_state(CONFIG.model, CONFIG.train).params, 2)
    seeds.copy_params_to(best, [0, 1])
    for k, s in enumerate((0, 1)):  # seed s's initial parameters are create_train_state(seed=s)'s
        own = create_train_state(CONFIG.model, CONFIG.train, s).params
        for a, b in zip(jax.tree_util.tree_leaves(best.seed(k)), jax.tree_util.tree_leaves(own)):
            np.testing.assert_array_equal(a, np.asarray(b))
    batches = [step[0] for step in _batches(2)]
    vmapped = seeds.predict(seeds.params_from_host(best.tree), batches)
    sequential = SeedStates(CONFIG.model, CONFIG.loss, CONFIG.train, [0, 1], "sequential", compile_cache)
    in_turn = sequential.predict(sequential.params_from_host(best.tree), batches)
    assert len(vmapped) == 2 and len(vmapped[0]) == 2
    for per_batch_v, per_batch_s in zip(vmapped, in_turn):
        for v, s in zip(per_batch_v, per_batch_s):
            assert set(v) == {"moe", "speech", "text", "multimodal", "gate"}
            np.testing.assert_allclose(v["moe"].sum(-1), 1.0, atol=1e-5)
            for name in v:
                np.testing.assert_allclose(v[name], s[name], atol=1e-6)
    assert not np.allclose(vmapped[0][0]["moe"], vmapped[0][1]["moe"])
