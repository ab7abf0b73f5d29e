"""Mixture-of-experts models (Qwen3-MoE, Mixtral, OLMoE) against `transformers`, and the MoE
dispatch against the dense reference.

- the dispatch (`moe.dispatch`: expert-sorted rows through `ragged_dot`, or `[E, C, D]` capacity
  buffers; on CPU `blocked_ragged_dot`, tested equal to `ragged_dot`) equals every-expert-on-every-
  token with the routing weights, in values and gradients; over capacity exactly the assignments
  an independent NumPy queue drops are missing, and with unbounded capacity none;
- tiny `Qwen3MoeForCausalLM` / `MixtralForCausalLM` / `OlmoeForCausalLM` saved by transformers:
  logits, the router's logits and top-k choices, and the load-balancing loss equal theirs; save ->
  transformers -> same weights; greedy generation token for token; scanned = unscanned.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_models import (  # noqa: E402
    SMALL,
    assert_greedy_generation_matches,
    batch,
    checkpoint_cache,
    jit_forward,
    max_diff,
    torch_forward,
)

import jaxrlhf  # noqa: E402
from jaxrlhf.models import LanguageModel, UnsupportedModelError, pretrained_from_hf  # noqa: E402
from jaxrlhf.models.config import ModelConfig  # noqa: E402
from jaxrlhf.models.moe import (  # noqa: E402
    blocked_ragged_dot,
    capacity,
    dense_reference,
    dispatch,
    kept_assignments,
    route,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*holds no tokenizer files")

_SMALL = SMALL
FAMILIES = {
    # Renormalised top-2 of 4; layer 1 is a dense MLP (mlp_only_layers), as Qwen3-MoE allows.
    "qwen3_moe": (
        "qwen3_moe",
        dict(
            _SMALL,
            num_hidden_layers=3,
            head_dim=8,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        ),
    ),
    "mixtral": (
        "mixtral",
        dict(_SMALL, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4),
    ),
    # Top-3 of 5 without renormalisation, q/k norms over the whole projection, clipped q/k/v.
    "olmoe": (
        "olmoe",
        dict(_SMALL, intermediate_size=16, num_experts=5, num_experts_per_tok=3, clip_qkv=1.5),
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (directory, torch model, its forward on `batch()` with router logits)."""
    return checkpoint_cache(
        tmp_path_factory, FAMILIES, lambda model: torch_forward(model, *batch(), output_router_logits=True)
    )


# ----------------------------------------------------------------------------------------------
# The dispatch against the dense reference

T, D, F, E, K = 24, 8, 6, 4, 2


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, D)).astype(np.float32)
    # Skewed router logits: expert 0 is everyone's favourite, so small capacities overflow it.
    logits = (rng.normal(size=(T, E)) + np.array([2.0, 0.5, 0, -1])).astype(np.float32)
    kernels = {
        "gate": rng.normal(size=(E, D, F)).astype(np.float32) / np.sqrt(D),
        "up": rng.normal(size=(E, D, F)).astype(np.float32) / np.sqrt(D),
        "down": rng.normal(size=(E, F, D)).astype(np.float32) / np.sqrt(F),
    }
    valid = np.ones(T, np.int32)
    valid[[3, 10, 11]] = 0  # padding: last in every queue
    return x, logits, kernels, valid


def _numpy_kept(experts, valid, slots):
    """Which (token, choice) assignments fit: each expert's queue takes real tokens first, then
    first choices before second ones, then earlier tokens; the first `slots` are kept."""
    order = sorted((1 - valid[t], j, t) for t in range(T) for j in range(K))
    used, kept = np.zeros(E, int), np.zeros((T, K), bool)
    for _, j, t in order:
        e = experts[t, j]
        if used[e] < slots:
            kept[t, j] = True
            used[e] += 1
    return kept


def _numpy_moe(x, experts, weights, kernels, kept):
    """float64, one assignment at a time."""
    silu = lambda h: h / (1 + np.exp(-h))  # noqa: E731
    k64 = {n: w.astype(np.float64) for n, w in kernels.items()}
    out = np.zeros((T, D))
    for t in range(T):
        for j in range(K):
            if kept[t, j]:
                e = experts[t, j]
                h = silu(x[t] @ k64["gate"][e]) * (x[t] @ k64["up"][e])
                out[t] += weights[t, j] * (h @ k64["down"][e])
    return out


def _run(x, logits, kernels, valid, capacity_factor):
    weights, experts = route(jnp.asarray(logits), K, norm_topk_prob=True)

    def matmul(rows, sizes, name):
        w = jnp.asarray(kernels[name])
        return jnp.einsum("eci,eio->eco", rows, w) if sizes is None else jax.lax.ragged_dot(rows, w, sizes)

    out = dispatch(matmul, jnp.asarray(x), experts, weights, jax.nn.silu, E, capacity_factor, jnp.asarray(valid))
    return out, weights, experts


@pytest.mark.parametrize("capacity_factor", [None, 0.75, 2.0])
def test_dispatch_equals_dense_reference(capacity_factor):
    """Dropless (None); 0.75: 9 slots per expert, expert 0's queue overflows; 2.0 = E / k: every
    expert has T slots, nothing dropped."""
    x, logits, kernels, valid = _problem()
    out, weights, experts = _run(x, logits, kernels, valid, capacity_factor)
    experts_np, weights_np = np.asarray(experts), np.asarray(weights)
    # The router: softmax top-2, renormalised (NumPy, float64).
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :K]
    np.testing.assert_array_equal(experts_np, top)
    chosen = np.take_along_axis(probs, top, -1)
    np.testing.assert_allclose(weights_np, chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)

    slots = T if capacity_factor is None else capacity(T, K, E, capacity_factor)
    kept = _numpy_kept(experts_np, valid, slots)
    if capacity_factor == 0.75:
        assert slots == 9 and (~kept[valid == 1]).any()  # real tokens dropped, too
        for e in range(E):  # an expert that drops a real token has dropped all its padding first
            if (~kept & (experts_np == e))[valid == 1].any():
                assert not (kept & (experts_np == e))[valid == 0].any()
    else:
        assert kept.all()
    np.testing.assert_array_equal(np.asarray(kept_assignments(experts, E, capacity_factor, jnp.asarray(valid))), kept)
    np.testing.assert_allclose(np.asarray(out), _numpy_moe(x, experts_np, weights_np, kernels, kept), atol=2e-5)
    dense = dense_reference(jnp.asarray(x), experts, weights, {n: jnp.asarray(w) for n, w in kernels.items()},
                            jax.nn.silu, jnp.asarray(kept))  # fmt: skip
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=2e-5)


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_dispatch_gradients_equal_dense_reference(capacity_factor):
    """d/d(x, router logits, every kernel) of <out, cotangent>: the dispatch's gradients equal the
    dense reference's (dropped assignments contribute nothing to either)."""
    x, logits, kernels, valid = _problem(seed=1)
    cot = jnp.asarray(np.random.default_rng(2).normal(size=(T, D)).astype(np.float32))
    slots_kept = None if capacity_factor is None else _numpy_kept(
        np.asarray(route(jnp.asarray(logits), K, True)[1]), valid, capacity(T, K, E, capacity_factor)
    )  # fmt: skip

    def via_dispatch(x, logits, kernels):
        return jnp.sum(_run(x, logits, kernels, valid, capacity_factor)[0] * cot)

    def via_dense(x, logits, kernels):
        weights, experts = route(logits, K, True)
        kept = None if slots_kept is None else jnp.asarray(slots_kept)
        return jnp.sum(dense_reference(x, experts, weights, kernels, jax.nn.silu, kept) * cot)

    args = (jnp.asarray(x), jnp.asarray(logits), {n: jnp.asarray(w) for n, w in kernels.items()})
    got = jax.grad(via_dispatch, argnums=(0, 1, 2))(*args)
    want = jax.grad(via_dense, argnums=(0, 1, 2))(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=3e-5)
        assert np.abs(np.asarray(w)).max() > 1e-3


@pytest.mark.parametrize(
    "group_sizes, block",
    [
        ([5, 0, 9, 1, 0, 7], None),  # empty groups; the default block (8)
        ([5, 0, 9, 1, 0, 7], 4),  # groups over several blocks
        ([3, 0, 0, 2], 1),  # one row per block
        ([4, 4, 1, 0], 8),  # fewer rows than N: rows past the groups come out 0
        ([0, 0, 22, 0], 128),  # one group, the block cut to N
    ],
)
def test_blocked_ragged_dot_equals_ragged_dot(group_sizes, block):
    """The CPU path of the dropless dispatch (`blocked_ragged_dot`: blocks of one expert each)
    equals `jax.lax.ragged_dot` and a NumPy float64 loop over the groups, values and gradients."""
    rng = np.random.default_rng(7)
    N, n_in, n_out = 22, 6, 5
    rows = rng.normal(size=(N, n_in)).astype(np.float32)
    kernel = rng.normal(size=(len(group_sizes), n_in, n_out)).astype(np.float32)
    sizes = jnp.asarray(group_sizes, jnp.int32)
    want = np.zeros((N, n_out))
    start = 0
    for e, size in enumerate(group_sizes):
        want[start : start + size] = rows[start : start + size].astype(np.float64) @ kernel[e]
        start += size
    got = blocked_ragged_dot(jnp.asarray(rows), jnp.asarray(kernel), sizes, block)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.lax.ragged_dot(rows, kernel, sizes)), atol=1e-5)

    cot = jnp.asarray(rng.normal(size=(N, n_out)).astype(np.float32))
    grads = [
        jax.grad(lambda r, k, f=f: jnp.sum(f(r, k) * cot), argnums=(0, 1))(jnp.asarray(rows), jnp.asarray(kernel))
        for f in (lambda r, k: blocked_ragged_dot(r, k, sizes, block), lambda r, k: jax.lax.ragged_dot(r, k, sizes))
    ]
    for got_grad, want_grad in zip(*grads):
        np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want_grad), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Models against transformers


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_router_and_aux_loss_match_transformers(family, checkpoints):
    path, torch_model, ref = checkpoints(family)
    pre = jaxrlhf.load_pretrained(path)
    ids, mask = batch()
    out = jit_forward(pre.model, pre.params, ids, mask)
    keep = mask.astype(bool)
    diff = max_diff(out.logits, ref.logits.numpy(), mask)
    assert diff < 1e-4, f"{family}: max |logit diff| = {diff:.2e}"
    # The router: same logits and the same top-k experts at every real token of every MoE layer.
    theirs = np.stack([r.reshape(*ids.shape, -1).numpy() for r in ref.router_logits])
    ours = np.asarray(out.aux["router_logits"])
    assert ours.shape == theirs.shape == (len(theirs), *ids.shape, pre.config.num_experts)
    np.testing.assert_allclose(ours[:, keep], theirs[:, keep], atol=1e-4)
    k = pre.config.num_experts_per_tok
    chosen_theirs = np.sort(torch.topk(torch.tensor(theirs), k).indices.numpy(), -1)
    np.testing.assert_array_equal(np.sort(jax.lax.top_k(ours, k)[1], -1)[:, keep], chosen_theirs[:, keep])
    # The load-balancing loss transformers adds (times router_aux_loss_coef) to its LM loss.
    want = transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func(
        ref.router_logits, pre.config.num_experts, k, torch.tensor(mask)
    )
    np.testing.assert_allclose(float(out.aux["router_aux_loss"]), float(want), rtol=1e-5)
    assert pre.config.router_aux_loss_coef == torch_model.config.router_aux_loss_coef
    z = np.mean(np.log(np.exp(theirs[:, keep]).sum(-1)) ** 2)
    np.testing.assert_allclose(float(out.aux["router_z_loss"]), z, rtol=1e-5)


def test_config_fields(checkpoints):
    qwen = jaxrlhf.load_pretrained(checkpoints("qwen3_moe")[0]).config
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.moe_intermediate_size) == (4, 2, 16)
    assert qwen.norm_topk_prob and qwen.dense_layers == (1,) and qwen.qk_norm and qwen.intermediate_size == 48
    mix = jaxrlhf.load_pretrained(checkpoints("mixtral")[0]).config
    assert mix.norm_topk_prob and mix.sliding_window == 4 and mix.moe_intermediate_size == 16
    olmo = jaxrlhf.load_pretrained(checkpoints("olmoe")[0]).config
    assert not olmo.norm_topk_prob and not olmo.qk_norm_per_head and olmo.clip_qkv == 1.5
    assert olmo.router_aux_loss_coef == 0.01 and olmo.num_experts == 5


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe"])
def test_round_trip_through_transformers(family, checkpoints, tmp_path):
    """Saved per expert (the Hub layout transformers writes too); transformers reloads the same
    weights. transformers 5's in-memory state dict (fused `experts.gate_up_proj`) loads as well."""
    path, torch_model, ref = checkpoints(family)
    pre = jaxrlhf.load_pretrained(path)
    out = tmp_path / "saved"
    jaxrlhf.save_pretrained(str(out), pre, max_shard_bytes=30_000)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    assert type(reloaded) is type(torch_model)
    original = torch_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), original[name].numpy(), err_msg=f"{family}: {name}")
    again = jaxrlhf.load_pretrained(str(out))
    assert again.config == pre.config
    jax.tree.map(np.testing.assert_array_equal, again.params, pre.params)
    fused = {name: t.numpy() for name, t in original.items()}
    assert any(name.endswith("experts.gate_up_proj") for name in fused)
    in_memory = pretrained_from_hf(json.loads((out / "config.json").read_text()), fused)
    jax.tree.map(np.testing.assert_array_equal, in_memory.params, pre.params)


@pytest.mark.slow
def test_greedy_generation_matches_transformers(checkpoints):
    """Mixtral with a window of 4: 10 new tokens after prompts of 2-6 tokens."""
    path, torch_model, _ = checkpoints("mixtral")
    assert_greedy_generation_matches(torch_model, jaxrlhf.load_pretrained(path))


@pytest.mark.slow
def test_scanned_and_capacity_variants(checkpoints):
    """OLMoE scanned + remat gives the per-layer model's logits and router losses; a capacity
    factor of E / k (every expert T slots) changes nothing, a small one drops tokens."""
    path, _, ref = checkpoints("olmoe")
    pre = jaxrlhf.load_pretrained(path)
    ids, mask = batch()
    base = jit_forward(pre.model, pre.params, ids, mask)
    scanned = pre.with_layers(scan_layers=True, remat="full")
    out = jit_forward(scanned.model, scanned.params, ids, mask)
    assert max_diff(out.logits, ref.logits.numpy(), mask) < 1e-4
    for name in ("router_aux_loss", "router_z_loss"):
        np.testing.assert_allclose(float(out.aux[name]), float(base.aux[name]), rtol=1e-5)
    cfg = pre.config
    unbounded = LanguageModel(cfg.replace(moe_capacity_factor=cfg.num_experts / cfg.num_experts_per_tok))
    assert max_diff(jit_forward(unbounded, pre.params, ids, mask).logits, base.logits, mask) < 1e-5
    tight = LanguageModel(cfg.replace(moe_capacity_factor=0.5))
    assert max_diff(jit_forward(tight, pre.params, ids, mask).logits, base.logits, mask) > 1e-3
    # Cached decoding of the scanned MoE model equals its full forward.
    prefill = scanned.forward(scanned.params, ids[:, :8], mask[:, :8], cache_size=12)
    steps, cache = [prefill.logits], prefill.cache
    for t in range(8, 12):
        step = scanned.forward(scanned.params, ids[:, t : t + 1], mask, cache=cache, cache_index=t)
        steps.append(step.logits)
        cache = step.cache
    assert max_diff(np.concatenate(steps, axis=1), ref.logits.numpy(), mask) < 1e-4


def test_unsupported_variants_are_refused(checkpoints):
    hf = json.loads(open(f"{checkpoints('qwen3_moe')[0]}/config.json").read())
    with pytest.raises(UnsupportedModelError, match=r"scoring_func='sigmoid'.*qwen3_moe"):
        ModelConfig.from_hf(dict(hf, scoring_func="sigmoid"))
    with pytest.raises(UnsupportedModelError, match="n_shared_experts=2"):
        ModelConfig.from_hf(dict(hf, n_shared_experts=2))
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        ModelConfig.from_hf(dict(hf, use_sliding_window=True))
    mix = json.loads(open(f"{checkpoints('mixtral')[0]}/config.json").read())
    with pytest.raises(UnsupportedModelError, match="router_jitter_noise=0.1"):
        ModelConfig.from_hf(dict(mix, router_jitter_noise=0.1))
    with pytest.raises(ValueError, match=r"scan_layers=True.*dense_layers=\(1,\)"):
        ModelConfig.from_hf(hf, scan_layers=True)
    with pytest.raises(ValueError, match="moe_capacity_factor must be > 0"):
        ModelConfig.from_hf(hf, moe_capacity_factor=0.0)


# ----------------------------------------------------------------------------------------------
# LoRA / PEFT / QLoRA


@pytest.mark.slow
@pytest.mark.parametrize("experts", [False, True])
def test_peft_round_trips(experts, checkpoints, tmp_path):
    """OLMoE with adapters on attention, and on every expert's gate / up / down when enabled
    (PEFT's `target_parameters` on transformers' stacked experts). (PEFT rewrites `gate_proj` /
    `up_proj` / `down_proj` targets of these model types to the experts, so dense MLP layers of an
    MoE model, Qwen3-MoE's `mlp_only_layers`, cannot carry PEFT adapters; OLMoE has none.)"""
    from hf_models import peft_round_trips

    from jaxrlhf.models.lora import LoraConfig

    path = checkpoints("olmoe")[0]
    lora = LoraConfig(rank=3, alpha=6.0, target_modules=("q", "v", "o", "gate", "up", "down"), experts=experts)
    peft_config: dict = dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "o_proj"])
    if experts:
        peft_config["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    peft_round_trips(jaxrlhf.load_pretrained(path), lora, path, tmp_path, peft_config)


@pytest.mark.slow
def test_lora_and_qlora_on_experts(checkpoints):
    """Fresh adapters (B = 0) on the experts leave the logits exactly as they are; merged adapters
    equal the adapter model; NF4 quantises the experts too and stays close to the float model."""
    from jaxrlhf.models.lora import LoraConfig, LoraParams, init_lora, merge_lora, quantize_params, with_lora

    pre = jaxrlhf.load_pretrained(checkpoints("olmoe")[0])
    lora = LoraConfig(rank=2, alpha=4.0, target_modules=("q", "gate", "up", "down"), experts=True)
    model = with_lora(pre.model, lora)
    adapters = init_lora(lora, pre.params, jax.random.key(0))
    assert adapters["layer_0"]["mlp"]["experts"]["gate"]["lora_A"].shape == (5, 32, 2)  # [E, D, r]
    assert adapters["layer_0"]["mlp"]["experts"]["down"]["lora_B"].shape == (5, 2, 32)  # [E, r, D]
    assert "router" not in adapters["layer_0"]["mlp"]
    ids, mask = batch()
    base = jit_forward(pre.model, pre.params, ids, mask).logits
    np.testing.assert_array_equal(np.asarray(jit_forward(model, LoraParams(pre.params, adapters), ids, mask).logits),
                                  np.asarray(base))  # fmt: skip
    adapters = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape), adapters)
    adapted = jit_forward(model, LoraParams(pre.params, adapters), ids, mask).logits
    merged = jit_forward(pre.model, merge_lora(lora, pre.params, adapters), ids, mask).logits
    assert max_diff(adapted, base, mask) > 1e-2 and max_diff(merged, adapted, mask) < 1e-4
    quantized = quantize_params(pre.params, "int8")
    assert (
        "kernel_q" in quantized["layer_0"]["mlp"]["experts"]["up"] and "kernel" in quantized["layer_0"]["mlp"]["router"]
    )
    assert max_diff(jit_forward(pre.model, quantized, ids, mask).logits, base, mask) < 0.05 * float(np.abs(base).max())
    with pytest.raises(ValueError, match="experts=True needs dropout 0"):
        LoraConfig(dropout=0.1, experts=True)


@pytest.mark.slow
def test_vmapped_over_runs_equals_each_run():
    """A sweep runs R models under `jax.vmap`: the ragged and the capacity dispatch batch, and each
    run's logits and router loss (and a gradient through it) equal that run alone."""
    cfg = ModelConfig.from_hf(dict(FAMILIES["qwen3_moe"][1], model_type="qwen3_moe", vocab_size=96))
    model = LanguageModel(cfg.replace(dense_layers=()))
    runs = [model.init_params(jax.random.key(i)) for i in range(3)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *runs)
    ids, mask = batch()
    for capacity_factor in (None, 1.0):
        m = LanguageModel(model.config.replace(moe_capacity_factor=capacity_factor))
        out = jax.jit(jax.vmap(lambda p, m=m: m.forward(p, ids, mask)))(stacked)
        for r, params in enumerate(runs):
            one = m.forward(params, ids, mask)
            np.testing.assert_allclose(np.asarray(out.logits[r]), np.asarray(one.logits), atol=1e-5)
            aux = float(out.aux["router_aux_loss"][r])
            np.testing.assert_allclose(aux, float(one.aux["router_aux_loss"]), rtol=1e-5)
    grads = jax.jit(jax.vmap(jax.grad(lambda p: model.forward(p, ids, mask).aux["router_aux_loss"])))(stacked)
    router = grads["layer_0"]["mlp"]["router"]["kernel"]
    assert router.shape == (3, 32, 4) and float(jnp.abs(router).max()) > 0  # the aux loss trains the router
