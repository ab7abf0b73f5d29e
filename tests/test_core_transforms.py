"""The core functions give the same numbers under jit, vmap, pmap (with axis_name) and shard_map.

Multi-device results are blocked on one at a time: jax on 2 CPU cores can otherwise hit XLA:CPU
rendezvous timeouts when several 8-device programs are in flight.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrlhf import core

N_DEV = 8
ROWS_PER_DEVICE = 2
B, T = N_DEV * ROWS_PER_DEVICE, 6


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, T + 1, size=B)
    lengths[3] = 0  # an all-zero row
    lengths[8:10] = 0  # a device whose rows are all empty
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    old_logprobs = -rng.exponential(size=(B, T)).astype(np.float32)
    return dict(
        x=rng.normal(size=(B, T)).astype(np.float32) * 2 + 0.5,
        mask=mask,
        logprobs=(old_logprobs + rng.normal(size=(B, T)) * 0.3).astype(np.float32),
        old_logprobs=old_logprobs,
        advantages=rng.normal(size=(B, T)).astype(np.float32),
        values=rng.normal(size=(B, T)).astype(np.float32),
        old_values=rng.normal(size=(B, T)).astype(np.float32),
        returns=rng.normal(size=(B, T)).astype(np.float32),
        scores=rng.normal(size=(B,)).astype(np.float32),
    )


def _reductions(b, axis_name=None):
    """Every batch reduction we care about, as one pytree of results."""
    out = {
        "masked_mean": core.masked_mean(b["x"], b["mask"], axis_name=axis_name),
        "masked_var": core.masked_var(b["x"], b["mask"], axis_name=axis_name),
        "masked_sum": core.masked_sum(b["x"], b["mask"], axis_name=axis_name),
        "whiten_shift_false": core.masked_whiten(b["x"], b["mask"], shift_mean=False, axis_name=axis_name),
        "whiten": core.masked_whiten(b["x"], b["mask"], axis_name=axis_name),
        "value_loss": core.ppo_value_loss(b["values"], b["old_values"], b["returns"], b["mask"], axis_name=axis_name),
    }
    for agg in core.LOSS_AGGREGATIONS:
        out["policy_" + agg] = core.ppo_policy_loss(
            b["logprobs"], b["old_logprobs"], b["advantages"], b["mask"], agg=agg, axis_name=axis_name
        )
    return out


def _per_row(b):
    rewards = core.kl_penalized_rewards(b["scores"], b["logprobs"], b["old_logprobs"], b["mask"], 0.1, "k3")
    return {
        "rewards": rewards,
        "returns": core.discounted_returns(rewards, b["mask"], 0.9),
        "gae": core.gae_advantages(rewards, b["values"], b["mask"], 1.0, 0.95),
        "kl": core.kl_estimate(b["logprobs"], b["old_logprobs"], "k2"),
        "last": core.last_valid_index(b["mask"]),
    }


def _assert_trees_close(actual, expected, atol=1e-6):
    flat_a, tree_a = jax.tree.flatten(actual)
    flat_e, tree_e = jax.tree.flatten(expected)
    assert tree_a == tree_e
    for a, e in zip(flat_a, flat_e):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, e, atol=atol, rtol=1e-6)


@pytest.fixture(scope="module")
def eager(batch):
    """Op-by-op (un-jitted) results on the whole batch on one device: the reference below."""
    return _everything(batch)


def _everything(b):
    return {"reductions": _reductions(b), "per_row": _per_row(b)}


@pytest.mark.slow
def test_jit_matches_eager(batch, eager):
    _assert_trees_close(jax.jit(_everything)(batch), eager)


def test_vmap_over_stacked_batches_matches_loop(batch):
    # Stack 4 batches of 4 rows and vmap the batch-level functions over the stack.
    stacked = jax.tree.map(lambda a: a.reshape((4, 4) + a.shape[1:]), batch)
    vmapped = jax.jit(jax.vmap(_everything))(stacked)
    jitted = jax.jit(_everything)  # compiled once, applied to each batch of the stack
    looped = [jitted(jax.tree.map(lambda a: a[i], stacked)) for i in range(4)]
    _assert_trees_close(vmapped, jax.tree.map(lambda *xs: jnp.stack(xs), *looped))


def test_pmap_reductions_equal_single_device_result(batch, eager):
    assert jax.device_count() >= N_DEV
    sharded = jax.tree.map(lambda a: a.reshape((N_DEV, ROWS_PER_DEVICE) + a.shape[1:]), batch)
    per_device = jax.pmap(functools.partial(_reductions, axis_name="batch"), axis_name="batch")(sharded)
    per_device = jax.block_until_ready(per_device)
    whole = eager["reductions"]
    for name, value in whole.items():
        if name.startswith("whiten"):
            # Per-element results: the device shards, put back together, are the global whitening.
            got = per_device[name].reshape(value.shape)
            _assert_trees_close(got, value)
        else:
            # Scalars (and stats dicts): every device holds the global value.
            expected = jax.tree.map(lambda v: np.broadcast_to(v, (N_DEV,)), value)
            _assert_trees_close(per_device[name], expected)


def test_pmap_per_row_functions_match(batch, eager):
    sharded = jax.tree.map(lambda a: a.reshape((N_DEV, ROWS_PER_DEVICE) + a.shape[1:]), batch)
    per_device = jax.block_until_ready(jax.pmap(_per_row)(sharded))
    unsharded = jax.tree.map(lambda a: a.reshape((B,) + a.shape[2:]), per_device)
    _assert_trees_close(unsharded, eager["per_row"])


def test_shard_map_matches_single_device(batch, eager):
    mesh = jax.make_mesh((N_DEV,), ("batch",))

    def local(b):
        out = _reductions(b, axis_name="batch")
        scalars = {k: v for k, v in out.items() if not k.startswith("whiten")}
        return out["whiten"], scalars

    sharded_fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("batch"),), out_specs=(P("batch"), P())))
    row_sharding = jax.sharding.NamedSharding(mesh, P("batch"))
    sharded_batch = jax.device_put(batch, row_sharding)
    whitened, scalars = jax.block_until_ready(sharded_fn(sharded_batch))
    whole = eager["reductions"]
    _assert_trees_close(whitened, whole["whiten"])
    _assert_trees_close(scalars, {k: v for k, v in whole.items() if not k.startswith("whiten")})


def test_kl_controller_update_under_jit():
    controller = core.adaptive_kl_controller(0.1, target=6.0, horizon=10_000)
    state = controller.init()
    jit_state = jax.jit(controller.update)(state, jnp.float32(9.0), 256)
    eager_state = controller.update(state, 9.0, 256)
    np.testing.assert_allclose(jit_state.kl_coef, eager_state.kl_coef, rtol=1e-7)
