"""mister_jax.runtime.compile_cache: compiled steps equal the jitted step; a warm start reuses the traced program."""

import functools

import jax
import numpy as np

from mister_jax.config import LossConfig, ModelConfig, TrainConfig
from mister_jax.input_pipeline import Batch
from mister_jax.runtime import compile_cache
from mister_jax.runtime.compile_cache import TrainStepCompiler
from mister_jax.steps import abstract_train_state, create_train_state, make_optimizer, seed_keys, train_step

MODEL = ModelConfig(
    speech_dim=6,
    text_dim=5,
    num_classes=3,
    can_hidden=4,
    gru_layers=1,
    fusion_dim=8,
    fusion_layers=1,
    attention_dim=4,
    attention_heads=2,
)
TRAIN = TrainConfig(batch_size=2, learning_rate=1e-2)
# XLA:CPU's cheapest compile settings: the same results, a third of the compile time.
FAST = {
    "xla_cpu_use_fusion_emitters": False,
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def _batch(length):
    rng = np.random.default_rng(length)
    mask = np.arange(length)[None] < np.array([length, length - 2])[:, None]
    labels = np.where(mask, rng.integers(0, 3, mask.shape), -1).astype(np.int32)
    return Batch(
        rng.normal(size=(2, length, 6)).astype(np.float32),
        rng.normal(size=(2, length, 5)).astype(np.float32),
        labels,
        mask,
    )


def _counting_step(calls):
    step = functools.partial(train_step, model_cfg=MODEL, loss_cfg=LossConfig(), tx=_tx())

    def counted(*args):
        calls.append(1)  # runs only while JAX traces the step
        return step(*args)

    return counted


def _tx():
    return make_optimizer(TRAIN)


def test_compiled_step_equals_the_jitted_step_for_every_shape():
    key = seed_keys(0)[1]
    reference = jax.jit(
        functools.partial(train_step, model_cfg=MODEL, loss_cfg=LossConfig(), tx=_tx()), compiler_options=FAST
    )
    compiler = TrainStepCompiler(_counting_step([]), "test", cache_dir=None, compiler_options=FAST)
    ours, theirs = create_train_state(MODEL, TRAIN, 0), create_train_state(MODEL, TRAIN, 0)
    for length in (5, 7, 5):
        theirs, expected = reference(theirs, _batch(length), key)
        ours, got = compiler(ours, _batch(length), key)
        np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-5)
    assert compiler.num_shapes == 2
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_warm_start_reads_the_traced_step_from_disk_and_does_not_trace(tmp_path):
    key, batch = seed_keys(0)[1], _batch(6)
    state = abstract_train_state(MODEL, TRAIN)
    cold_calls, warm_calls, other_calls = [], [], []
    TrainStepCompiler(_counting_step(cold_calls), "config A", tmp_path, FAST).compile(state, batch, key)
    assert cold_calls and len(list((tmp_path / "exported").iterdir())) == 1
    warm = TrainStepCompiler(_counting_step(warm_calls), "config A", tmp_path, FAST)
    warm.compile(state, batch, key)
    assert warm_calls == []
    TrainStepCompiler(_counting_step(other_calls), "config B", tmp_path, FAST).compile(state, batch, key)
    assert other_calls and len(list((tmp_path / "exported").iterdir())) == 2
    _, metrics = warm(create_train_state(MODEL, TRAIN, 0), batch, key)
    assert np.isfinite(metrics["loss"])


def test_an_unreadable_cached_step_is_traced_again_and_rewritten(tmp_path):
    key, batch, state = seed_keys(0)[1], _batch(6), abstract_train_state(MODEL, TRAIN)
    TrainStepCompiler(_counting_step([]), "config", tmp_path, FAST).compile(state, batch, key)
    (cached,) = (tmp_path / "exported").iterdir()
    cached.write_bytes(b"garbage")
    calls = []
    TrainStepCompiler(_counting_step(calls), "config", tmp_path, FAST).compile(state, batch, key)
    assert calls and cached.read_bytes() != b"garbage"


def _package(root, files):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_an_edit_in_a_subpackage_changes_the_key_of_the_cached_programs(tmp_path):
    files = {"__init__.py": "", "model.py": "a = 1\n", "ops/__init__.py": "", "ops/gru.py": "b = 2\n"}
    before = compile_cache._source_digest(_package(tmp_path / "one", files))
    assert compile_cache._source_digest(_package(tmp_path / "two", files)) == before  # not the folder's name
    edited = compile_cache._source_digest(_package(tmp_path / "three", {**files, "ops/gru.py": "b = 3\n"}))
    moved = compile_cache._source_digest(_package(tmp_path / "four", {**files, "ops/model.py": files.pop("model.py")}))
    assert before not in (edited, moved)


def test_a_compilation_cache_that_cannot_be_created_is_none(tmp_path):
    (tmp_path / "a_file").write_text("")
    assert compile_cache.enable_compilation_cache(str(tmp_path / "a_file" / "cache")) is None
