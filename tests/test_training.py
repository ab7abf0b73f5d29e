"""PPO trainer: learning on a toy task, one compile, device-count invariance, reward paths, errors.

Compiles are the cost here (2 shared CPU cores), so one module-scoped learning run on one device
provides the single-device reference for the other tests, and tests reuse compiled steps by using
equal `PPO` setups (jit caches are keyed on them).
"""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.core.stats import masked_mean
from jaxrlhf.models import LanguageModel, ModelConfig
from jaxrlhf.training import PPO, PPOConfig, parallel

VOCAB = 16
TARGET_TOKEN = 3
POISON_TOKEN = 15  # a prompt starting with it makes the test reward NaN (to test the NaN guard)
PROMPT_LEN = 4
BATCH = 32
LEARN_STEPS = 25


def tiny_gpt2_config() -> ModelConfig:
    return ModelConfig(
        model_type="gpt2", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
        head_dim=16, intermediate_size=64, max_position_embeddings=32, norm_eps=1e-5,
        positions="learned", norm="layernorm", mlp="plain", activation="gelu_new",
        qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True, eos_token_id=None)


TRACES = {"reward": 0}


def target_fraction_reward(prompt_ids, prompt_mask, response_ids, response_mask):
    """Fraction of valid response tokens equal to TARGET_TOKEN (NaN for poisoned prompts)."""
    TRACES["reward"] += 1  # Python side effect: runs once per trace of the train step
    fraction = masked_mean((response_ids == TARGET_TOKEN).astype(jnp.float32), response_mask, axis=1)
    return jnp.where(prompt_ids[:, -PROMPT_LEN] == POISON_TOKEN, jnp.nan, fraction)


BASE_CONFIG = PPOConfig(
    total_steps=LEARN_STEPS, batch_size=BATCH, minibatch_size=16, ppo_epochs=2, max_new_tokens=8,
    max_prompt_len=PROMPT_LEN, learning_rate=3e-3, critic_learning_rate=3e-3, eos_token_id=-1,
    init_kl_coef=0.01, adaptive_kl=True, target_kl=1.0, kl_horizon=200.0, seed=0)


def make_prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, POISON_TOKEN, size=(n, PROMPT_LEN)).astype(np.int32)
    return ids, np.ones_like(ids)


@pytest.fixture(scope="module")
def tiny():
    model = LanguageModel(tiny_gpt2_config())
    params = model.init_params(jax.random.PRNGKey(0))
    return model, params


@pytest.fixture(scope="module")
def learning_run(tiny):
    """LEARN_STEPS PPO iterations on one device; keeps the metrics and the state after step 1."""
    model, params = tiny
    ppo = PPO(BASE_CONFIG, model, target_fraction_reward)
    state = ppo.init_state(params)
    frozen = ppo.frozen_params(params)
    ids, mask = make_prompts(BATCH)
    batch = ppo.prompt_batch(ids, mask)
    traces_before = TRACES["reward"]
    history, state_after_1 = [], None
    for i in range(LEARN_STEPS):
        state, metrics = ppo.train_step(state, frozen, batch)
        history.append(jax.device_get(metrics))
        if i == 0:
            state_after_1 = jax.device_get(state)
    return dict(ppo=ppo, history=history, state_after_1=state_after_1, batch_np=(ids, mask),
                traces=TRACES["reward"] - traces_before, final_state=state)


def test_ppo_increases_reward_with_finite_positive_kl(learning_run):
    scores = np.array([m["score"] for m in learning_run["history"]])
    kls = np.array([m["kl"] for m in learning_run["history"]])
    assert scores[:3].mean() < 0.15  # chance level is 1/16
    assert scores[-3:].mean() > 0.5, scores
    assert np.all(np.isfinite(kls)) and np.all(kls[1:] > 0), kls
    assert kls[0] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the first rollout
    assert all(m["all_finite"] for m in learning_run["history"])


def test_train_step_compiles_once(learning_run):
    assert learning_run["traces"] == 1


def test_adaptive_kl_coef_moves_toward_target(learning_run):
    history = learning_run["history"]
    for before, after in zip(history, history[1:]):
        direction = np.sign(after["kl_coef"] - before["kl_coef"])
        assert direction == np.sign(before["kl"] - BASE_CONFIG.target_kl), (before, after)
