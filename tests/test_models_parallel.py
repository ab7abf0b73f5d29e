"""Tensor and expert parallelism on 8 simulated CPU devices.

`make_mesh(data=2, fsdp=2, model=2)` splits attention heads and MLP units over `"model"` (and
the rest over `"fsdp"`); `make_mesh(data=2, expert=4)` splits a mixture of experts' weights by
expert. GSPMD inserts the collectives, so the sharded programs must compute what one device
computes: logits, log-probs, router losses, and the parameters after two PPO steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrlhf.core.logprobs import token_logprobs
from jaxrlhf.models import LanguageModel
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.sharding import (
    EXPERT,
    MODEL,
    batch_sharding,
    batch_size_divisor,
    make_mesh,
    param_partition_specs,
    shard_params,
)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

VOCAB = 64
_BASE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, intermediate_size=48, max_position_embeddings=64, eos_token_id=None)  # fmt: skip
# Gemma-3-shaped (sandwich norms, a sliding and a global layer, q/k norms, tied) and a
# Qwen3-MoE-shaped model (4 experts, top-2).
GEMMA = ModelConfig.from_hf(dict(_BASE, model_type="gemma3_text", sliding_window=4, sliding_window_pattern=2))
MOE = ModelConfig.from_hf(
    dict(
        _BASE,
        model_type="qwen3_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
    )  # fmt: skip
)


def _params(cfg, seed=0):
    """Random parameters with norms off their init values and weights large enough to matter."""
    params = LanguageModel(cfg).init_params(jax.random.key(seed))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    out = []
    for (path, leaf), key in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        noise = jax.random.normal(key, leaf.shape, leaf.dtype)
        out.append(leaf + 0.3 * noise if "norm" in name else leaf * 5.0)
    return jax.tree_util.tree_unflatten(treedef, out)


def _batch(batch=8, length=10, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    for row in range(1, batch, 2):
        mask[row, : row % 7] = 0
    return ids * mask, mask


def _flat(tree):
    return {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, P))
    }


def test_mesh_axes_and_megatron_specs():
    mesh = make_mesh(data=2, fsdp=2, model=2)
    assert mesh.axis_names == ("data", "fsdp", MODEL) and batch_size_divisor(mesh) == 4
    assert batch_sharding(mesh).spec == P(("data", "fsdp"))
    ep = make_mesh(data=2, expert=-1)
    assert dict(ep.shape) == {"data": 2, "fsdp": 1, EXPERT: 4} and batch_size_divisor(ep) == 8
    assert make_mesh(runs=2, data=1, fsdp=1, expert=2, model=2).axis_names == ("runs", "data", "fsdp", EXPERT, MODEL)
    specs = _flat(param_partition_specs(jax.eval_shape(LanguageModel(GEMMA).init_params, jax.random.key(0)), mesh=mesh))
    assert specs["layer_0/attn/q/kernel"] == P("fsdp", MODEL)  # column-parallel, FSDP on the other side
    assert specs["layer_0/attn/o/kernel"] == P(MODEL, "fsdp")  # row-parallel
    assert specs["layer_0/mlp/gate/kernel"] == P("fsdp", MODEL)
    assert specs["layer_0/mlp/down/kernel"] == P(MODEL, "fsdp")
    assert specs["embed/embedding"] == P(MODEL, "fsdp")  # vocabulary-parallel
    assert specs["layer_0/attn/q_norm/scale"] == P()
    moe_specs = _flat(param_partition_specs(jax.eval_shape(LanguageModel(MOE).init_params, jax.random.key(0)),
                                            mesh=make_mesh(data=1, fsdp=2, expert=2, model=2)))  # fmt: skip
    assert moe_specs["layer_0/mlp/experts/gate/kernel"] == P(EXPERT, "fsdp", MODEL)  # [E, D, F]
    assert moe_specs["layer_0/mlp/experts/down/kernel"] == P(EXPERT, MODEL, "fsdp")  # [E, F, D]
    assert moe_specs["layer_0/mlp/router/kernel"] == P("fsdp", None)  # [D, E]: FSDP only
    stacked = jax.eval_shape(LanguageModel(MOE.replace(scan_layers=True)).init_params, jax.random.key(0))
    scanned = _flat(param_partition_specs(stacked, mesh=ep))
    assert scanned["layers/mlp/experts/up/kernel"] == P(None, EXPERT, None, None)  # the layer axis is never split


def _forward_everywhere(cfg, meshes, atol=1e-5):
    """Logits, token log-probs and (MoE) router losses: each mesh against one device."""
    model = LanguageModel(cfg)
    params = _params(cfg)
    ids, mask = _batch()

    def run(params, ids, mask):
        out = model.forward(params, ids, mask)
        logprobs = token_logprobs(out.logits[:, :-1], ids[:, 1:])
        aux = {} if out.aux is None else {k: out.aux[k] for k in ("router_aux_loss", "router_z_loss")}
        return out.logits, logprobs, aux

    want = jax.device_get(jax.jit(run)(params, ids, mask))
    for mesh in meshes:
        sharded = shard_params(params, mesh, param_partition_specs(params, mesh=mesh))
        assert any(MODEL in tuple(leaf.sharding.spec) or EXPERT in tuple(leaf.sharding.spec)
                   for leaf in jax.tree.leaves(sharded))  # fmt: skip
        batch_sh = batch_sharding(mesh)
        got = jax.device_get(jax.jit(run)(sharded, jax.device_put(ids, batch_sh), jax.device_put(mask, batch_sh)))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=0, err_msg=str(dict(mesh.shape)))


@pytest.mark.slow
def test_tensor_parallel_forward_equals_one_device():
    _forward_everywhere(GEMMA, [make_mesh(data=2, fsdp=2, model=2)])


@pytest.mark.slow
def test_expert_parallel_forward_equals_one_device():
    """Dropless (ragged) and capacity dispatch, experts over 4 devices or over expert x model."""
    meshes = [make_mesh(data=2, expert=4), make_mesh(data=1, fsdp=2, expert=2, model=2)]
    _forward_everywhere(MOE, meshes)
    _forward_everywhere(MOE.replace(moe_capacity_factor=1.0), meshes[:1])
    _forward_everywhere(MOE.replace(scan_layers=True, remat="full"), meshes[:1])


# ----------------------------------------------------------------------------------------------
# PPO: two steps on a mesh equal two steps on one device


def _ppo_states(cfg, mesh, steps=2):
    from jaxrlhf.training import PPO, PPOConfig

    def reward(prompt_ids, prompt_mask, response_ids, response_mask):
        return jnp.mean(response_ids.astype(jnp.float32) * response_mask, axis=1) / VOCAB

    config = PPOConfig(total_steps=steps, batch_size=16, minibatch_size=8, ppo_epochs=1, max_new_tokens=4,
                       max_prompt_len=4, learning_rate=1e-3, critic_learning_rate=1e-3, seed=0)  # fmt: skip
    model = LanguageModel(cfg)
    params = _params(cfg)
    ppo = PPO(config, model, reward, mesh=mesh)
    state = ppo.init_state(params)
    frozen = ppo.frozen_params(params)
    ids = np.random.default_rng(0).integers(4, VOCAB, size=(16, 4)).astype(np.int32)
    batch = ppo.prompt_batch(ids, np.ones_like(ids))
    for _ in range(steps):
        state, _ = ppo.train_step(state, frozen, batch)
        jax.block_until_ready(state)
    return jax.device_get((state.policy_params, state.value_params))


def _max_abs_diff(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma", "moe"])
def test_ppo_steps_on_a_mesh_equal_one_device(family):
    """data x fsdp x model = 2 x 2 x 2 (Gemma-3-shaped) and data x expert = 2 x 4 (MoE)."""
    cfg, mesh = (GEMMA, make_mesh(data=2, fsdp=2, model=2)) if family == "gemma" else (MOE, make_mesh(data=2, expert=4))
    one = _ppo_states(cfg, make_mesh(devices=jax.devices()[:1]))
    many = _ppo_states(cfg, mesh)
    initial = jax.device_get(_params(cfg))
    assert _max_abs_diff(one[0], initial) > 1e-4  # the steps moved the policy
    assert _max_abs_diff(many[0], one[0]) < 1e-5
    assert _max_abs_diff(many[1], one[1]) < 1e-5
