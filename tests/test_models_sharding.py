"""`jaxrlhf.sharding`: meshes, the batch sharding and parameter rules on 8 simulated CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jaxrlhf.models import LanguageModel
from jaxrlhf.sharding import (
    DEFAULT_RULES,
    FSDP,
    LARGEST,
    REPLICATE,
    batch_sharding,
    batch_size_divisor,
    make_mesh,
    param_partition_specs,
    param_shardings,
    path_str,
    shard_params,
    spec_for,
)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

CFG = tiny_config("llama", vocab_size=100, qk_norm=True, qkv_bias=True)


@pytest.fixture(scope="module")
def setup():
    model = LanguageModel(CFG)
    params = jax.jit(model.init_params)(jax.random.key(0))
    mesh = make_mesh(data=2, fsdp=4)
    return model, params, mesh


def _flat(tree):
    return {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, P))
    }


def test_make_mesh_axes():
    mesh = make_mesh(data=2, fsdp=4)
    assert mesh.axis_names == ("data", "fsdp") and dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert dict(make_mesh().shape) == {"data": 8, "fsdp": 1}  # plain data parallelism
    assert dict(make_mesh(data=2, fsdp=-1).shape) == {"data": 2, "fsdp": 4}
    assert dict(make_mesh(fsdp=8, data=-1).shape) == {"data": 1, "fsdp": 8}
    one = make_mesh(devices=jax.devices()[:1])
    assert dict(one.shape) == {"data": 1, "fsdp": 1} and batch_size_divisor(one) == 1
    with pytest.raises(ValueError, match="devices"):
        make_mesh(data=3, fsdp=2)
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)


def test_make_mesh_runs_axis():
    mesh = make_mesh(runs=4, data=2)
    assert mesh.axis_names == ("runs", "data", "fsdp") and dict(mesh.shape) == {"runs": 4, "data": 2, "fsdp": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert dict(make_mesh(runs=-1, data=2).shape) == {"runs": 4, "data": 2, "fsdp": 1}
    assert dict(make_mesh(runs=3, data=1, devices=jax.devices()[:3]).shape)["runs"] == 3
    with pytest.raises(ValueError, match=r"devices=jax.devices\(\)\[:n\]"):
        make_mesh(runs=3, data=1)
    # The batch is split over data and fsdp, never over runs.
    assert batch_size_divisor(mesh) == 2


def test_batch_sharding():
    mesh = make_mesh(data=2, fsdp=4)
    assert batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert batch_sharding(mesh, batch_dim=1).spec == P(None, ("data", "fsdp"))
    x = jax.device_put(np.arange(16 * 3).reshape(16, 3), batch_sharding(mesh))
    assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}
    # A hand-built 1-D mesh: the axes it has.
    data_only = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    assert batch_sharding(data_only).spec == P(("data",)) and batch_size_divisor(data_only) == 8
    with pytest.raises(ValueError, match="batch axes"):
        batch_sharding(jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,)))


def test_param_shardings_replicate_without_fsdp(setup):
    _, params, _ = setup
    for mesh in (make_mesh(), jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))):
        shardings = param_shardings(params, mesh)
        assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings))


def test_path_str():
    tree = {"layer_0": {"attn": {"q": {"kernel": 0}}}, "blocks": [1, {"bias": 2}]}
    paths = [path_str(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
    assert paths == ["blocks/0", "blocks/1/bias", "layer_0/attn/q/kernel"]


def test_default_specs(setup):
    _, params, mesh = setup
    specs = _flat(param_partition_specs(params, mesh=mesh))
    shapes = {k: v.shape for k, v in _flat(params).items()}
    assert set(specs) == set(shapes)
    # Largest divisible dimension over fsdp; 100 (vocab) is divisible by 4.
    assert specs["embed/embedding"] == P("fsdp", None)
    assert specs["lm_head"] == P(None, "fsdp")
    assert specs["layer_0/mlp/gate/kernel"] == P(None, "fsdp")  # [32, 64]
    assert specs["layer_0/mlp/down/kernel"] == P("fsdp", None)  # [64, 32]
    assert specs["layer_0/attn/k/kernel"] == P("fsdp", None)  # [32, 16]: the larger side
    for name in ("layer_0/attn_norm/scale", "final_norm/scale", "layer_1/attn/q_norm/scale", "layer_0/attn/q/bias"):
        assert specs[name] == P(), name
    # Every spec divides its shape.
    for name, spec in specs.items():
        for dim, axis in zip(shapes[name], spec):
            if axis is not None:
                assert dim % mesh.shape[axis] == 0, name


def test_non_dividing_rule_falls_back_to_replication(setup):
    _, params, mesh = setup
    rules = (
        (r"embed/embedding$", P(None, FSDP)),  # 32 / 4: kept
        (r"lm_head$", P(None, ("data", FSDP))),  # 100 / 8: does not divide -> replicated
        (r"attn/k/kernel$", P(None, None, FSDP)),  # more dims than the tensor -> replicated
    ) + DEFAULT_RULES
    specs = _flat(param_partition_specs(params, rules, mesh=mesh))
    assert specs["embed/embedding"] == P(None, "fsdp")
    assert specs["lm_head"] == P()
    assert specs["layer_0/attn/k/kernel"] == P()
    # LARGEST skips a dimension the axis does not divide: [100, 32] over 8 -> the 32 side.
    assert spec_for("embed/embedding", (100, 32), fsdp_size=8) == P(None, "fsdp")
    assert spec_for("embed/embedding", (100, 30), fsdp_size=8) == P()
    assert spec_for("layer_0/mlp/up/kernel", (32, 64), fsdp_size=4, min_size=4096) == P()
    assert spec_for("x/kernel", (8, 8), rules=((r"kernel", REPLICATE),), fsdp_size=4) == P()
    assert spec_for("x/kernel", (8, 8), rules=((r"kernel", LARGEST),), fsdp_size=1) == P()
    with pytest.raises(ValueError, match="action"):
        spec_for("x/kernel", (8, 8), rules=((r"kernel", "shard-it"),), fsdp_size=4)


def test_custom_axis_name():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    params = jax.eval_shape(LanguageModel(CFG).init_params, jax.random.key(0))  # shapes are enough
    specs = _flat(param_partition_specs(params, fsdp_axis="model", mesh=mesh))
    assert specs["embed/embedding"] == P("model", None)
    with pytest.raises(ValueError, match="no 'fsdp' axis"):
        param_partition_specs(params, mesh=mesh)


@pytest.mark.slow
def test_sharded_logits_match_unsharded(setup):
    model, params, mesh = setup
    specs = param_partition_specs(params, mesh=mesh)
    sharded = shard_params(params, mesh, specs)
    # Parameters really are split: each device holds a quarter of the embedding.
    emb = sharded["embed"]["embedding"]
    assert emb.sharding.spec == P("fsdp", None)
    assert {s.data.shape for s in emb.addressable_shards} == {(25, 32)}
    assert sharded["final_norm"]["scale"].sharding.is_fully_replicated

    rng = np.random.default_rng(0)
    ids = rng.integers(0, CFG.vocab_size, size=(8, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1::2, :4] = 0
    want = jax.jit(model.apply)(params, ids, mask)
    ids_s = jax.device_put(ids, batch_sharding(mesh))
    mask_s = jax.device_put(mask, batch_sharding(mesh))
    got = jax.jit(model.apply)(sharded, ids_s, mask_s)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)

    # Gradients laid out like the parameters (FSDP: reduce-scattered), pinned with out_shardings
    # since GSPMD is otherwise free to pick any layout for outputs.
    def loss(p):
        return jnp.mean(model.apply(p, ids_s, mask_s) ** 2)

    param_shardings = jax.tree.map(lambda a: a.sharding, sharded)
    grads = jax.jit(jax.grad(loss), out_shardings=param_shardings)(sharded)
    assert grads["embed"]["embedding"].sharding.spec == P("fsdp", None)
    ref_grads = jax.jit(jax.grad(lambda p: jnp.mean(model.apply(p, ids, mask) ** 2)))(params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4), grads, ref_grads
    )


def test_shard_params_default_specs(setup):
    model, params, mesh = setup
    sharded = shard_params(params, mesh)
    assert sharded["lm_head"].sharding.spec == P(None, "fsdp")
