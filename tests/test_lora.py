"""LoRA adapters and QLoRA (`jaxrlhf.models.lora`, `jaxrlhf.models.peft_io`) and the PPO trainer on them.

- fresh adapters (B = 0) give exactly the base logits; merged weights give the adapter model's;
  scanned layers give the per-layer model's;
- PEFT interoperability on real transformers + peft models (Qwen2- and GPT-2-shaped): our adapter
  directory loads with `PeftModel.from_pretrained` with the same logits, reads back to the same
  logits, and the merged `save_pretrained` checkpoint equals the PEFT model;
- a PPO step with LoRA trains the adapters only (the state holds no base leaves; the frozen base
  is untouched), its reference is the base model, and with an NF4 base it runs and stays close to
  the float model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from jaxrlhf.core.stats import masked_mean
from jaxrlhf.models import LanguageModel, save_pretrained, stack_layers
from jaxrlhf.models.lora import (
    LoraConfig,
    LoraParams,
    count_params,
    dequantize_params,
    init_lora,
    is_quantized,
    merge_lora,
    quantize_params,
    with_lora,
)
from jaxrlhf.models.peft_io import AdapterError, export_policy, load_peft_adapter, save_merged, save_peft_adapter
from jaxrlhf.training import PPO, PPOConfig
from jaxrlhf.training.experience import reference_logprobs

VOCAB = 64
CONFIGS = {
    "qwen2": tiny_config("qwen2", vocab_size=VOCAB),
    "gpt2": tiny_config("gpt2", vocab_size=VOCAB, num_heads=2, max_position_embeddings=32),
}
LORA = LoraConfig(rank=4, alpha=8.0, target_modules=("q", "v", "o", "up", "down"))


def _batch():
    ids = (np.arange(14).reshape(2, 7) * 5) % (VOCAB - 1) + 1
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    return ids.astype(np.int32), mask.astype(np.int32)


def _setup(family, lora=LORA, seed=0):
    """(lora model, base params scaled to give non-trivial logits, trained-looking adapters)."""
    model = with_lora(LanguageModel(CONFIGS[family]), lora)
    base = jax.tree.map(lambda x: x * 5.0, model.init_params(jax.random.key(seed)))
    adapters = init_lora(lora, base, jax.random.key(seed + 1))
    noise = jax.random.key(seed + 2)
    adapters = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(noise, x.shape), adapters)  # B != 0
    return model, base, adapters


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_fresh_adapters_give_exactly_the_base_logits(family):
    model, base, _ = _setup(family)
    fresh = init_lora(model.config.lora, base, jax.random.key(7))
    ids, mask = _batch()
    assert all(float(jnp.abs(b).max()) == 0.0 for b in jax.tree.leaves(fresh) if b.shape[-2] == LORA.rank)
    base_logits = model.apply(base, ids, mask)
    np.testing.assert_array_equal(np.asarray(model.apply(LoraParams(base, fresh), ids, mask)), np.asarray(base_logits))
    # Only the targeted projections get adapters; A is PEFT's U(-1/sqrt(in), 1/sqrt(in)).
    layer = fresh["layer_0"]
    assert sorted(layer["attn"]) == ["o", "q", "v"] and sorted(layer["mlp"]) == ["down", "up"]
    a = np.asarray(layer["mlp"]["down"]["lora_A"])
    assert a.shape == (CONFIGS[family].intermediate_size, LORA.rank)
    assert np.abs(a).max() <= 1 / np.sqrt(a.shape[0]) and np.abs(a).max() > 0.5 / np.sqrt(a.shape[0])


@pytest.mark.slow
def test_adapters_merge_scan_and_dropout():
    model, base, adapters = _setup("qwen2")
    ids, mask = _batch()
    adapted = model.apply(LoraParams(base, adapters), ids, mask)
    assert _max_diff(adapted, model.apply(base, ids, mask)) > 0.1  # the adapters do something
    # W x + (alpha / r) B A x == (W + (alpha / r) A B) x
    merged = merge_lora(model.config.lora, base, adapters)
    assert _max_diff(model.apply(merged, ids, mask), adapted) < 1e-4  # float32 rounding of logits ~5
    # Scanned layers: stacked base and stacked adapters, same logits.
    scanned = with_lora(model.with_layers(scan_layers=True), model.config.lora)
    stacked = scanned.layout_params(LoraParams(base, adapters))
    assert stacked.adapters["layers"]["attn"]["q"]["lora_A"].shape == (2, 32, LORA.rank)
    assert _max_diff(scanned.apply(stacked, ids, mask), adapted) < 1e-4
    assert _max_diff(scanned.apply(LoraParams(stack_layers(base), stack_layers(adapters)), ids, mask), adapted) < 1e-4
    # Dropout on the adapters' input only with a key; same key, same mask.
    dropped = with_lora(LanguageModel(CONFIGS["qwen2"]), LORA.replace(dropout=0.5))
    np.testing.assert_array_equal(np.asarray(dropped.apply(LoraParams(base, adapters), ids, mask)), np.asarray(adapted))
    key = jax.random.key(3)
    with_key = dropped.apply(LoraParams(base, adapters, key), ids, mask)
    assert _max_diff(with_key, adapted) > 1e-3
    np.testing.assert_array_equal(
        np.asarray(with_key), np.asarray(dropped.apply(LoraParams(base, adapters, key), ids, mask))
    )


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unknown target module"):
        LoraConfig(target_modules=("qkv",))
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)
    assert LoraConfig(target_modules=("q_proj", "down_proj")).target_modules == ("q", "down")
    _, base, adapters = _setup("qwen2")
    ids, mask = _batch()
    with pytest.raises(ValueError, match="without ModelConfig.lora"):
        LanguageModel(CONFIGS["qwen2"]).apply(LoraParams(base, adapters), ids, mask)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_peft_round_trip_and_merged_checkpoint(family, tmp_path):
    """ours -> PEFT directory -> `PeftModel.from_pretrained` on transformers: same logits; read back:
    same logits; merged `save_pretrained` checkpoint: the PEFT model's logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model, base, adapters = _setup(family)
    ids, mask = _batch()
    ours = np.asarray(model.apply(LoraParams(base, adapters), ids, mask))
    save_pretrained(str(tmp_path / "base"), LanguageModel(CONFIGS[family]), jax.device_get(base))
    if family == "qwen2":
        save_peft_adapter(str(tmp_path / "adapter"), model, adapters)
    else:  # what `train` writes for a LoRA policy
        export_policy(str(tmp_path / "adapter"), model, adapters)

    from safetensors.numpy import load_file

    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    if family == "qwen2":
        a = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
        np.testing.assert_array_equal(a, np.asarray(adapters["layer_0"]["attn"]["q"]["lora_A"]).T)  # (r, in)
    else:  # q, v fused into c_attn with k's block empty: rank 2r
        assert weights["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (2 * LORA.rank, 32)

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))
    # Positions from the mask as ours (GPT-2 in transformers would count the padding otherwise).
    torch_inputs = dict(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0)),
    )
    with torch.no_grad():
        theirs = peft_model(**torch_inputs).logits.numpy()
    real = mask.astype(bool)  # padded positions are not compared (HF's own masking of them differs)
    assert _max_diff(theirs[real], ours[real]) < 1e-3

    loaded_model, loaded = load_peft_adapter(str(tmp_path / "adapter"), LanguageModel(CONFIGS[family]))
    assert loaded_model.config.lora.alpha / loaded_model.config.lora.rank == LORA.scale
    back = np.asarray(loaded_model.apply(LoraParams(base, loaded), ids, mask))
    if family == "qwen2":  # same arrays
        assert jax.tree.structure(loaded) == jax.tree.structure(adapters)
        for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(adapters)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert _max_diff(back, ours) < 1e-5

    save_merged(str(tmp_path / "merged"), model, base, adapters)
    merged_hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    with torch.no_grad():
        merged_logits = merged_hf(**torch_inputs).logits.numpy()
    assert _max_diff(merged_logits[real], theirs[real]) < 1e-3


def test_reading_a_non_lora_adapter_fails(tmp_path):
    import json

    model, _, adapters = _setup("qwen2")
    save_peft_adapter(str(tmp_path), model, adapters)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="only LoRA"):
        load_peft_adapter(str(tmp_path), LanguageModel(CONFIGS["qwen2"]))
    with pytest.raises(AdapterError, match="not a PEFT adapter"):
        load_peft_adapter(str(tmp_path / "missing"), LanguageModel(CONFIGS["qwen2"]))


@pytest.mark.parametrize("qtype, kernel_tolerance, logits_tolerance", [("nf4", 0.11, 0.25), ("int8", 0.01, 0.02)])
def test_quantized_base_is_close_to_the_float_model(qtype, kernel_tolerance, logits_tolerance):
    """Relative RMS errors of the quantised kernels and of the logits against the float model.

    Observed on this 2-layer model (kernels N(0, 0.1^2)): NF4 0.093 per kernel, 0.16 on the logits;
    int8 0.006 and 0.009. 4-bit codes of Gaussian weights lose about a tenth of each weight; a tiny
    random network passes that on to its logits almost undamped.
    """
    model = with_lora(LanguageModel(CONFIGS["qwen2"]), LORA)
    base = jax.tree_util.tree_map_with_path(  # weights x5 (as in _setup), norm scales left at 1
        lambda path, x: x if "norm" in jax.tree_util.keystr(path) else 5.0 * x, model.init_params(jax.random.key(0))
    )
    adapters = init_lora(LORA, base, jax.random.key(1))
    quantized = quantize_params(base, qtype)
    up = quantized["layer_0"]["mlp"]["up"]
    assert is_quantized(quantized) and "kernel" not in up
    assert up["kernel_q"].dtype == {"nf4": jnp.uint4, "int8": jnp.int8}[qtype] and up["kernel_q"].shape == (32, 64)
    assert up["kernel_scale"].shape == (1, 64)  # one scale per block of (here all 32) input rows and column
    assert quantized["embed"]["embedding"].dtype == jnp.float32  # embeddings stay float

    def relative_rms(x, reference):
        x, reference = np.asarray(x, np.float64), np.asarray(reference, np.float64)
        return float(np.sqrt(np.mean((x - reference) ** 2)) / np.std(reference))

    plain = dequantize_params(quantized)
    kernel_error = relative_rms(plain["layer_0"]["mlp"]["down"]["kernel"], base["layer_0"]["mlp"]["down"]["kernel"])
    assert kernel_error < kernel_tolerance, kernel_error
    ids, mask = _batch()
    float_logits = model.apply(LoraParams(base, adapters), ids, mask)
    quant_logits = model.apply(LoraParams(quantized, adapters), ids, mask)
    assert relative_rms(quant_logits, float_logits) < logits_tolerance
    # dequantize_params gives the plain model the quantised one computes
    assert _max_diff(model.apply(plain, ids, mask), model.apply(quantized, ids, mask)) < 1e-4


def test_qlora_sft_steps_with_dropout_lower_the_loss():
    """QLoRA supervised steps: NF4 base as a jit argument (not a baked-in constant), gradients and
    AdamW for the adapters only, adapter dropout with a fresh key each step."""
    import optax

    from jaxrlhf.training.sft import sft_loss

    lora = LORA.replace(dropout=0.1)
    model = with_lora(LanguageModel(CONFIGS["qwen2"]), lora)
    base = quantize_params(model.init_params(jax.random.key(0)), "nf4")
    adapters = init_lora(lora, base, jax.random.key(1))
    ids, mask = _batch()
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    optimizer = optax.adamw(3e-2)

    @jax.jit
    def step(adapters, opt_state, base, key):
        def loss_fn(adapters):
            return sft_loss(model.apply, LoraParams(base, adapters, key), batch)[0]

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = optimizer.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    opt_state = optimizer.init(adapters)
    losses = []
    for i in range(8):
        adapters, opt_state, loss = step(adapters, opt_state, base, jax.random.key(100 + i))
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses
    frozen_codes = base["layer_0"]["attn"]["q"]["kernel_q"]
    assert frozen_codes.dtype == jnp.uint4  # the base stayed quantised (it was never a gradient target)


# ----------------------------------------------------------------------------------------------
# PPO with LoRA

TARGET = 3
PPO_CONFIG = PPOConfig(
    total_steps=4,
    batch_size=8,
    num_generations=2,
    minibatch_size=4,
    ppo_epochs=1,
    max_new_tokens=4,
    max_prompt_len=4,
    learning_rate=1e-2,
    eos_token_id=-1,
    advantage_estimator="grpo",
    kl_coef=0.05,
    seed=0,
)


def target_reward(prompt_ids, prompt_mask, response_ids, response_mask):
    """Mean token id of the response, scaled to [0, 1): every group of samples has signal."""
    return masked_mean(response_ids.astype(jnp.float32) / VOCAB, response_mask, axis=1)


def _prompts(rows):
    ids = (np.arange(rows * 4).reshape(rows, 4) % (VOCAB - 1) + 1).astype(np.int32)
    return ids, np.ones_like(ids)


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_ppo_step_trains_only_the_adapters(quantize):
    model, base, _ = _setup("qwen2")
    if quantize:
        base = quantize_params(base, quantize)
    ppo = PPO(PPO_CONFIG, model, target_reward)
    state = ppo.init_state(base)  # fresh adapters (B = 0) from the run's seed
    frozen = ppo.frozen_params(base)
    adapters_before = jax.device_get(state.policy_params)
    # The state holds adapters only: no base leaf, optimizer moments only for the adapters.
    assert jax.tree.structure(state.policy_params) == jax.tree.structure(init_lora(LORA, base, jax.random.key(0)))
    assert count_params(state.policy_params) < count_params(base) / 3
    moments = [x for x in jax.tree.leaves(state.policy_opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * count_params(state.policy_params)

    batch = ppo.prompt_batch(*_prompts(PPO_CONFIG.prompts_per_step))
    state, metrics = ppo.train_step(state, frozen, batch)
    assert bool(metrics["all_finite"])
    assert float(metrics["kl"]) == pytest.approx(0.0, abs=1e-6)  # B = 0: policy == reference at the rollout
    changed = jax.tree.map(
        lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), adapters_before, jax.device_get(state.policy_params)
    )
    assert all(jax.tree.leaves(changed))  # every adapter leaf moved (B from 0, A through B's gradient)
    assert jax.tree.structure(state.policy_params) == jax.tree.structure(adapters_before)
    # The frozen base (also the reference) is the same buffers, untouched.
    for x, y in zip(jax.tree.leaves(frozen.ref_params), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # Reference log-probs are the base model's (adapters off); the policy's now differ.
    ids, mask = _prompts(2)
    response = jnp.asarray(np.full((2, 3), TARGET, np.int32))
    response_mask = jnp.ones((2, 3), jnp.int32)
    ref = reference_logprobs(ppo.models, frozen.ref_params, ids, mask, response, response_mask, 1.0)
    plain = LanguageModel(CONFIGS["qwen2"])
    logits = plain.apply(base, jnp.concatenate([ids, response], 1), jnp.concatenate([mask, response_mask], 1))
    expected = jnp.take_along_axis(jax.nn.log_softmax(logits[:, 3:-1]), response[..., None], -1)[..., 0]
    assert _max_diff(ref, expected) < 1e-5
    policy_logits = model.apply(
        ppo.policy_params(state, frozen), jnp.concatenate([ids, response], 1), jnp.concatenate([mask, response_mask], 1)
    )
    assert _max_diff(policy_logits, logits) > 1e-4

    state, metrics = ppo.train_step(state, frozen, batch)  # the same compiled step again
    assert bool(metrics["all_finite"]) and float(metrics["kl"]) > 0
    assert ppo.compiled_step_count() == 1


def test_ppo_with_lora_refuses_dropout_and_a_quantised_critic():
    model, base, _ = _setup("qwen2")
    with pytest.raises(ValueError, match="dropout"):
        PPO(PPO_CONFIG, with_lora(LanguageModel(CONFIGS["qwen2"]), LORA.replace(dropout=0.1)), target_reward)
    ppo = PPO(PPO_CONFIG.replace(advantage_estimator="gae", num_generations=1), model, target_reward)
    with pytest.raises(ValueError, match="quantised"):
        ppo.init_state(quantize_params(base, "nf4"))


@pytest.mark.slow
def test_sweep_with_lora_shares_the_base():
    """Two runs (own seed and learning rate): each has its own adapters `[R, ...]`; the base is one
    copy in the frozen parameters, not stacked per run."""
    from jaxrlhf.training import Sweep

    model, base, _ = _setup("qwen2")
    runs = [{"seed": 0, "learning_rate": 1e-2}, {"seed": 1, "learning_rate": 0.0}]
    sweep = Sweep(PPO_CONFIG, model, target_reward, runs)
    state = sweep.init_state(base)
    frozen = sweep.frozen_params(base)
    single = init_lora(LORA, base, jax.random.key(0))
    for stacked, one in zip(jax.tree.leaves(state.runs.policy_params), jax.tree.leaves(single)):
        assert stacked.shape == (2,) + one.shape
    for shared, original in zip(jax.tree.leaves(frozen.ref_params), jax.tree.leaves(base)):
        assert shared.shape == original.shape  # no run axis
    # different seeds: different A
    a = state.runs.policy_params["layer_0"]["attn"]["q"]["lora_A"]
    assert _max_diff(a[0], a[1]) > 0
    ids, mask = _prompts(PPO_CONFIG.prompts_per_step)
    batch = sweep.prompt_batch(np.stack([ids, ids]), np.stack([mask, mask]))
    before = jax.device_get(state.runs.policy_params)
    state, metrics = sweep.train_step(state, frozen, batch)
    after = jax.device_get(state.runs.policy_params)
    b_before, b_after = before["layer_0"]["mlp"]["up"]["lora_B"], after["layer_0"]["mlp"]["up"]["lora_B"]
    assert np.any(b_after[0] != b_before[0])  # learning rate 1e-2: trained
    np.testing.assert_array_equal(b_after[1], b_before[1])  # learning rate 0: unchanged


@pytest.mark.slow
def test_train_driver_checkpoints_and_exports_the_adapters(tmp_path):
    """`train` with a LoRA policy: the checkpoint holds the adapters, resuming restores them, and
    ``out_dir/policy`` is a PEFT adapter directory of the final adapters."""
    from jaxrlhf.training import train

    model, base, _ = _setup("qwen2")
    config = PPO_CONFIG.replace(total_steps=2, save_every=1)
    prompts = _prompts(2 * PPO_CONFIG.prompts_per_step)
    with pytest.raises(ValueError, match="pass no ref_params"):
        train((model, base), target_reward, prompts, config, tmp_path / "bad", ref_params=base, progress=False)
    result = train((model, base), target_reward, prompts, config, tmp_path / "run", num_steps=1, progress=False)
    assert (tmp_path / "run" / "policy" / "adapter_config.json").is_file()
    _, exported = load_peft_adapter(result.policy_dir, LanguageModel(CONFIGS["qwen2"]))
    for x, y in zip(jax.tree.leaves(exported), jax.tree.leaves(jax.device_get(result.state.policy_params))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    resumed = train((model, base), target_reward, prompts, config, tmp_path / "run", progress=False, export=False)
    assert int(resumed.state.step) == 2 and resumed.history and "kl" in resumed.history[-1]
