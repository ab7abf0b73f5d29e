"""Gemma 2, Gemma 3 (text) and Phi-3/4 against `transformers`, and their checkpoint I/O.

Tiny random models of `Gemma2ForCausalLM`, `Gemma3ForCausalLM` and `Phi3ForCausalLM`, saved by
transformers and loaded here: logits on a left-padded batch (positions from the mask), greedy
generation token for token past the sliding window, save -> transformers -> same weights and
logits, scanned layers whose layer types alternate, and the variants we refuse.
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
    reference_logits,
    torch_logits,
)

import jaxrlhf  # noqa: E402
from jaxrlhf.models import LanguageModel, UnsupportedModelError  # noqa: E402
from jaxrlhf.models.config import FULL, SLIDING, ModelConfig  # noqa: E402

_SMALL = dict(SMALL, intermediate_size=48)
FAMILIES = {
    # Soft-capping small enough to matter at these logit scales; window 4 < the 12-token batch.
    "gemma2": (
        "gemma2",
        dict(
            _SMALL,
            head_dim=16,
            sliding_window=4,
            query_pre_attn_scalar=24,
            final_logit_softcapping=3.0,
            attn_logit_softcapping=2.0,
        ),
    ),
    # Pattern 3 over 4 layers: sliding, sliding, full, sliding; linear rope scaling on the global
    # layers only, and the local layers' own theta.
    "gemma3": (
        "gemma3_text",
        dict(
            _SMALL,
            num_hidden_layers=4,
            head_dim=16,
            sliding_window=4,
            sliding_window_pattern=3,
            query_pre_attn_scalar=24,
            rope_parameters={
                FULL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                SLIDING: {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
    ),
    "phi3": ("phi3", dict(_SMALL, sliding_window=5)),
    # Phi-4-mini-like: partial rotary (half of each head), tied embeddings, LongRoPE with a short
    # original context of 8, so that rows of the 12-token batch use the long factors and others
    # the short ones.
    "phi4_mini": (
        "phi3",
        dict(
            _SMALL,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 1e4,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.5],
                "long_factor": [2.0, 5.0],
                "original_max_position_embeddings": 8,
                "factor": 8.0,
            },
            original_max_position_embeddings=8,
        ),
    ),
}


pytestmark = pytest.mark.filterwarnings("ignore:.*holds no tokenizer files")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (directory, torch model, torch logits on `batch()`), built once per module."""
    return checkpoint_cache(tmp_path_factory, FAMILIES, lambda model: reference_logits(model, *batch()))


def _logits(pre, ids, mask):
    return jit_forward(pre.model, pre.params, ids, mask).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family, checkpoints):
    path, torch_model, ref = checkpoints(family)
    pre = jaxrlhf.load_pretrained(path)
    ids, mask = batch()
    diff = max_diff(_logits(pre, ids, mask), ref, mask)
    assert diff < 1e-4, f"{family}: max |logit diff| = {diff:.2e}"
    assert np.abs(ref[mask.astype(bool)]).max() > 0.5
    assert type(torch_model).__name__ == {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}.get(
        family, "Phi3ForCausalLM"
    )


def test_config_fields(checkpoints):
    """Each family's switches are read from its config.json (HF's defaults where it is silent)."""
    g2 = jaxrlhf.load_pretrained(checkpoints("gemma2")[0]).config
    assert (g2.norm_weight_offset, g2.embed_scale, g2.sandwich_norms, g2.tie_word_embeddings) == (1.0, True, True, True)
    assert (g2.attn_logit_softcap, g2.final_logit_softcap, g2.query_pre_attn_scalar) == (2.0, 3.0, 24.0)
    assert g2.layer_types == (SLIDING, FULL) and g2.sliding_window == 4 and g2.activation == "gelu_pytorch_tanh"
    g3 = jaxrlhf.load_pretrained(checkpoints("gemma3")[0]).config
    assert g3.layer_types == (SLIDING, SLIDING, FULL, SLIDING) and g3.qk_norm and g3.final_logit_softcap is None
    assert (g3.rope_theta, g3.rope_scaling, g3.local_rope_theta) == (1e6, ("linear", 2.0, 0.0, 0.0, 0), 1e4)
    phi = jaxrlhf.load_pretrained(checkpoints("phi4_mini")[0]).config
    assert phi.rotary_dim == 4 and phi.is_longrope and phi.tie_word_embeddings
    assert phi.rope_scaling is not None and phi.rope_scaling[1] == pytest.approx(np.sqrt(1 + np.log(8) / np.log(8)))
    # Without a layer pattern in config.json, HF's defaults: Gemma 2 alternates, Gemma 3 every 6th is global.
    cfg = ModelConfig.from_hf(dict(model_type="gemma3_text", vocab_size=8, hidden_size=8, num_hidden_layers=7,
                                   num_attention_heads=1, intermediate_size=8))  # fmt: skip
    assert cfg.layer_types == (SLIDING,) * 5 + (FULL, SLIDING) and cfg.head_dim == 256 and cfg.sliding_window == 4096


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3"])
def test_greedy_generation_matches_transformers(family, checkpoints):
    """Prompts of 2-6 tokens and 10 new ones: every row runs past the window of 4 (or 5)."""
    path, torch_model, _ = checkpoints(family)
    assert_greedy_generation_matches(torch_model, jaxrlhf.load_pretrained(path))


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi4_mini"])
def test_round_trip_through_transformers(family, checkpoints, tmp_path):
    path, torch_model, ref = checkpoints(family)
    pre = jaxrlhf.load_pretrained(path)
    out = tmp_path / "saved"
    jaxrlhf.save_pretrained(str(out), pre, max_shard_bytes=20_000 if family == "gemma3" else 2 << 30)
    if family == "gemma3":  # sharded, with an index transformers reads
        assert (out / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    assert type(reloaded) is type(torch_model)
    original = torch_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), original[name].numpy(), err_msg=f"{family}: {name}")
    ids, mask = batch()
    assert max_diff(reference_logits(reloaded, ids, mask), ref, mask) < 1e-4
    again = jaxrlhf.load_pretrained(str(out))
    assert again.config == pre.config
    jax.tree.map(np.testing.assert_array_equal, again.params, pre.params)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == torch_model.config.model_type


@pytest.mark.slow
def test_scanned_alternating_layers_and_kv_cache(checkpoints):
    """Gemma 3's sliding/full pattern under `nn.scan` (the layer type is data inside the scanned
    body): the scanned model's logits equal the per-layer model's, and so do a prefill plus cached
    decoding steps past the window, for both layouts."""
    path, _, ref = checkpoints("gemma3")
    pre = jaxrlhf.load_pretrained(path)
    scanned = pre.with_layers(scan_layers=True, remat="full")
    ids, mask = batch()
    assert max_diff(_logits(scanned, ids, mask), ref, mask) < 1e-4
    B, T = ids.shape
    prompt = 5
    for model in (pre, scanned):
        forward = jax.jit(model.forward)
        out = model.forward(model.params, ids[:, :prompt], mask[:, :prompt], cache_size=T)
        steps, cache = [out.logits], out.cache
        for t in range(prompt, T):
            out = forward(model.params, ids[:, t : t + 1], mask, cache=cache, cache_index=t)
            steps.append(out.logits)
            cache = out.cache
        assert max_diff(np.concatenate(steps, axis=1), ref, mask) < 1e-4


def test_init_params_tree_matches_loaded(checkpoints):
    for family in ("gemma2", "phi4_mini"):
        pre = jaxrlhf.load_pretrained(checkpoints(family)[0])
        fresh = jax.eval_shape(LanguageModel(pre.config).init_params, jax.random.key(0))
        assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, pre.params)


# ----------------------------------------------------------------------------------------------
# LongRoPE past the original context


def test_longrope_factors_per_row_and_per_packed_segment(checkpoints):
    """Rows of 12, 9 and 5 tokens around the original context of 8: the long rows use the long
    factors and the short one the short factors (each equal to transformers on that row alone,
    see `reference_logits`), and two rows packed into one (`segment_ids`) keep their own."""
    path, torch_model, ref = checkpoints("phi4_mini")
    pre = jaxrlhf.load_pretrained(path)
    ids, mask = batch()
    lengths = mask.sum(1)
    scaling = pre.config.rope_scaling
    assert lengths.tolist() == [12, 9, 5] and scaling is not None and scaling[4] == 8
    packed_ids = np.concatenate([ids[1, -9:], ids[2, -5:], [0, 0]])[None]  # rows 1 and 2 and padding
    segments = np.array([[1] * 9 + [2] * 5 + [0, 0]])
    positions = np.concatenate([np.arange(9), np.arange(5), [0, 0]])[None]
    out = pre.model.forward(pre.params, packed_ids, (segments > 0).astype(np.int32), positions, segment_ids=segments)
    packed = np.asarray(out.logits[0])
    np.testing.assert_allclose(packed[:9], ref[1, -9:], atol=1e-4)
    np.testing.assert_allclose(packed[9:14], ref[2, -5:], atol=1e-4)
    # The batch rule transformers uses would rotate row 2 with the long factors: a real difference.
    assert max_diff(torch_logits(torch_model, ids, mask)[2:], ref[2:], mask[2:]) > 1e-2


@pytest.mark.slow
def test_longrope_generation_past_the_original_context(checkpoints):
    """Greedy generation across the original context (8): prompts of 6, 4 and 2 tokens and 10 new
    ones cross it at different steps. transformers drops its cache and recomputes the sequence
    with the long factors when it crosses; jaxrlhf recomputes the crossing row's cache. Every
    engine (static, cache segments, refilled slots, shared prefill) equals transformers on each
    row alone, token for token; sampled, they equal each other bit for bit."""
    from hf_models import torch_greedy

    from jaxrlhf.sampling import generate

    path, torch_model, _ = checkpoints("phi4_mini")
    pre = jaxrlhf.load_pretrained(path)
    ids = np.random.default_rng(1).integers(3, 96, size=(3, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2], mask[2, :4] = 0, 0
    ids = ids * mask
    want = np.stack([
        torch_greedy(torch_model, ids[r : r + 1, mask[r] > 0], mask[r : r + 1, mask[r] > 0], 10)[0] for r in range(3)
    ])  # fmt: skip

    def run(temperature, **engine):
        return generate(pre.model, pre.params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(3),
                        max_new_tokens=10, temperature=temperature, eos_token_id=None, **engine)  # fmt: skip

    for engine in (dict(), dict(cache_segments=3), dict(slots=2)):
        np.testing.assert_array_equal(np.asarray(run(0.0, **engine).tokens), want, err_msg=str(engine))
    sampled = run(1.0)
    for engine in (dict(cache_segments=3), dict(slots=2)):
        other = run(1.0, **engine)
        np.testing.assert_array_equal(np.asarray(other.tokens), np.asarray(sampled.tokens))
        np.testing.assert_allclose(np.asarray(other.logprobs), np.asarray(sampled.logprobs), atol=1e-5)
    # One prefill for G = 2 generations of each prompt equals the prompts repeated.
    shared = generate(pre.model, pre.params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(3),
                      max_new_tokens=10, temperature=1.0, num_generations=2)  # fmt: skip
    repeated = generate(pre.model, pre.params, jnp.repeat(jnp.asarray(ids), 2, 0), jnp.repeat(jnp.asarray(mask), 2, 0),
                        jax.random.key(3), max_new_tokens=10, temperature=1.0)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(repeated.tokens))
    # Under a sweep's vmap (the recompute's cond reduced over the runs) each run equals its own call.
    keys = jax.random.split(jax.random.key(4), 2)

    def sweep(key):
        return generate(pre.model, pre.params, jnp.asarray(ids), jnp.asarray(mask), key, max_new_tokens=10,
                        temperature=1.0, stop_axis_name="runs", slots=2)  # fmt: skip

    runs = jax.jit(jax.vmap(sweep, axis_name="runs"))(keys)
    for run_index in range(2):
        alone = generate(pre.model, pre.params, jnp.asarray(ids), jnp.asarray(mask), keys[run_index],
                         max_new_tokens=10, temperature=1.0)  # fmt: skip
        np.testing.assert_array_equal(np.asarray(runs.tokens[run_index]), np.asarray(alone.tokens))


def test_longrope_episodes_past_the_original_context_are_refused(checkpoints):
    from jaxrlhf.episodes import Episodes, EpisodeSettings

    pre = jaxrlhf.load_pretrained(checkpoints("phi4_mini")[0])
    settings = EpisodeSettings(max_new_tokens=4, max_turns=2, max_turn_tokens=2)
    Episodes(pre.model, None, settings, prompt_len=5)  # 8 tokens at most: within the context  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"LongRoPE.*\(8\), got 6 \+ 4 - 1"):
        Episodes(pre.model, None, settings, prompt_len=6)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Refused variants: a clear error naming the field


def _config(checkpoints, family):
    return json.loads(open(f"{checkpoints(family)[0]}/config.json").read())


def test_unsupported_variants_are_refused(checkpoints, tmp_path):
    multimodal = dict(model_type="gemma3", text_config=_config(checkpoints, "gemma3"), vision_config={})
    with pytest.raises(UnsupportedModelError, match=r"'gemma3'.*vision_config.*gemma3_text"):
        ModelConfig.from_hf(multimodal)
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        ModelConfig.from_hf(dict(_config(checkpoints, "gemma3"), use_bidirectional_attention=True))
    g3 = _config(checkpoints, "gemma3")
    g3["rope_parameters"][SLIDING] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(UnsupportedModelError, match=r"rope_parameters\.sliding_attention\.rope_type 'linear'"):
        ModelConfig.from_hf(g3)
    phi = _config(checkpoints, "phi4_mini")
    phi["rope_parameters"]["short_factor"] = [1.0, 1.0, 1.0]
    with pytest.raises(UnsupportedModelError, match="short_factor / long_factor need 2 entries"):
        ModelConfig.from_hf(phi)
    phi["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(UnsupportedModelError, match="'yarn'"):
        ModelConfig.from_hf(phi)
    # Through load_pretrained the message names the file.
    d = tmp_path / "mm"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(multimodal))
    with pytest.raises(UnsupportedModelError, match=r"config\.json: model_type 'gemma3'"):
        jaxrlhf.load_pretrained(str(d))


# ----------------------------------------------------------------------------------------------
# LoRA / PEFT


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_peft_round_trips(family, checkpoints, tmp_path):
    """Adapters on every projection (Phi-3's fused qkv_proj / gate_up_proj get one exact adapter
    each), against `peft` on the transformers model, both ways."""
    from hf_models import peft_round_trips

    from jaxrlhf.models.lora import LoraConfig

    path = checkpoints(family)[0]
    lora = LoraConfig(rank=4, alpha=8.0, target_modules=("q", "k", "v", "o", "gate", "up", "down"))
    modules = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if family == "phi3" else [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # fmt: skip
    peft_round_trips(
        jaxrlhf.load_pretrained(path), lora, path, tmp_path, dict(r=4, lora_alpha=8, target_modules=modules)
    )
