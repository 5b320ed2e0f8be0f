"""The host mirror of the seeds' states: copies into buffers allocated once, one slot per seed."""

import jax
import jax.numpy as jnp
import numpy as np

from mister_jax.runtime.host_mirror import HostMirror


def _tree(offset):
    return {"w": jnp.arange(6.0).reshape(2, 3) + offset, "step": jnp.asarray(offset, jnp.int32)}


def test_each_seed_lands_in_its_own_slot_of_buffers_allocated_once():
    mirror = HostMirror(jax.eval_shape(lambda: _tree(0)), num_seeds=3)
    buffers = [id(x) for x in jax.tree_util.tree_leaves(mirror.tree)]
    for k in range(3):
        mirror.put(k, _tree(10 * k))
    for k in range(3):
        np.testing.assert_array_equal(mirror.seed(k)["w"], np.arange(6.0).reshape(2, 3) + 10 * k)
        assert int(mirror.seed(k)["step"]) == 10 * k
    assert [id(x) for x in jax.tree_util.tree_leaves(mirror.tree)] == buffers
    assert mirror.tree["w"].shape == (3, 2, 3) and mirror.tree["step"].shape == (3,)


def test_stacked_trees_copy_whole_or_one_slot():
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[_tree(10 * k) for k in range(2)])
    whole, one = HostMirror(_tree(0), 2), HostMirror(_tree(0), 2)
    whole.put_stacked(stacked)
    one.put(0, _tree(-1))
    one.put(1, stacked, stacked=True)
    np.testing.assert_array_equal(whole.tree["w"], np.asarray(stacked["w"]))
    np.testing.assert_array_equal(one.tree["w"][1], np.asarray(stacked["w"][1]))
    np.testing.assert_array_equal(one.tree["w"][0], np.asarray(_tree(-1)["w"]))


def test_a_copy_does_not_follow_later_changes_of_the_source():
    mirror = HostMirror(_tree(0), 1)
    source = np.zeros((2, 3), np.float32)
    mirror.put(0, {"w": source, "step": np.int32(0)})
    source += 1
    assert not mirror.tree["w"].any()


def test_every_leaf_starts_on_a_page_boundary_of_one_buffer():
    mirror = HostMirror({"a": np.zeros(3, np.float32), "b": np.zeros((5, 7), np.int32), "c": np.float32(0)}, 3)
    assert mirror.buffer.ctypes.data % 4096 == 0 and mirror.buffer.nbytes % 4096 == 0
    for leaf in jax.tree_util.tree_leaves(mirror.tree):
        assert (leaf.ctypes.data - mirror.buffer.ctypes.data) % 4096 == 0
        assert np.shares_memory(leaf, mirror.buffer)
