"""The new families through the rollout engine and episodes (issues 29, 30, 32 together): per-row
cache writes with Gemma 3's alternating sliding windows and a mixture of experts. Refilled slots
give the static sampler's tokens, and a multi-turn episode's KV cache holds exactly the episode
(the sampled action log-probs equal a full forward's over prompt + episode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from episode_envs import EchoEnv

from jaxrlhf.core import token_logprobs
from jaxrlhf.episodes import run_episodes
from jaxrlhf.models import LanguageModel, ModelConfig
from jaxrlhf.sampling import generate

SMALL = dict(vocab_size=32, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
FAMILIES = {
    # Sliding (window 4), sliding, full, sliding: the windows are per layer, inside the attention.
    "gemma3": dict(SMALL, model_type="gemma3_text", head_dim=8, intermediate_size=48, sliding_window=4,
                   sliding_window_pattern=3, query_pre_attn_scalar=8),
    "qwen3_moe": dict(SMALL, model_type="qwen3_moe", head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
}  # fmt: skip


def model_and_params(family):
    model = LanguageModel(ModelConfig.from_hf(FAMILIES[family]))
    params = model.init_params(jax.random.PRNGKey(0))
    return model, params


def prompts(B=6, P=5, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(8, 32, (B, P)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    return ids * mask, mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_refilled_slots_sample_what_the_static_sampler_samples(family):
    model, params = model_and_params(family)
    ids, mask = prompts()
    run = lambda **kw: jax.device_get(  # noqa: E731
        jax.jit(
            lambda p, i, m: generate(model, p, i, m, jax.random.PRNGKey(1), max_new_tokens=12, eos_token_id=2, **kw)
        )(params, ids, mask)
    )
    static, slots = run(cache_segments=1), run(slots=3)
    np.testing.assert_array_equal(slots.tokens, static.tokens)
    np.testing.assert_array_equal(slots.mask, static.mask)
    np.testing.assert_allclose(slots.logprobs, static.logprobs, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_episode_cache_holds_the_episode(family):
    model, params = model_and_params(family)
    ids, mask = prompts(seed=1)
    P, N = ids.shape[1], 20
    out = jax.device_get(
        jax.jit(
            lambda p, i, m: run_episodes(
                model, p, i, m, jax.random.PRNGKey(2), EchoEnv(), max_new_tokens=N, max_turns=4, max_turn_tokens=5,
                eos_token_id=2,
            )
        )(params, ids, mask)
    )  # fmt: skip
    assert (out.mask - out.action_mask).sum() > 0  # observations were written
    full_ids = jnp.concatenate([jnp.asarray(ids), jnp.asarray(out.tokens)], axis=1)
    full_mask = jnp.concatenate([jnp.asarray(mask), jnp.asarray(out.mask)], axis=1)
    logits = model.forward(params, full_ids, full_mask).logits[:, P - 1 : P + N - 1]
    recomputed = np.asarray(token_logprobs(logits, jnp.asarray(out.tokens)))
    np.testing.assert_allclose(np.where(out.action_mask, recomputed, 0), out.logprobs, atol=3e-5)
