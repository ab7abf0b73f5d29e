"""Less recomputation in the PPO trainer, each checked against the path it replaces.

- Response-only heads: the experience and update passes apply the vocabulary (and value) head at
  the N response-predicting positions only. Against a policy whose forward computes the logits at
  every position and slices them afterwards (the previous path): same log-probs, values, and the
  same metrics and parameters after 2 PPO steps.
- ``old_logprobs_from_sampler``: old log-probs from the rollout instead of a policy forward; the
  first minibatch's ratio ``exp(forward - sampler)`` stays within 1e-3 of 1.
- A scanned, rematerialised policy and critic train exactly like the unrolled ones (1e-5).

Every PPO setup here compiles its fused step once (2 shared CPU cores: tiny models, short steps).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from jaxrlhf.core.logprobs import token_logprobs
from jaxrlhf.core.losses import ppo_policy_loss
from jaxrlhf.core.stats import masked_mean
from jaxrlhf.models import LanguageModel, ModelConfig, ValueModel
from jaxrlhf.models.transformer import unstack_layers
from jaxrlhf.models.value import init_value_head, value_head_apply
from jaxrlhf.sampling import generate
from jaxrlhf.training import PPO, PPOConfig, PromptBatch, Rollout, make_experience
from jaxrlhf.training.experience import Models, policy_and_values, response_slice
from jaxrlhf.training.hparams import HyperParams
from jaxrlhf.training.state import ScoreStats

VOCAB = 24
TARGET_TOKEN = 3
PROMPT_LEN = 5
NEW_TOKENS = 6
BATCH = 8
STEPS = 2


def llama_config(**changes) -> ModelConfig:
    return tiny_config("llama", vocab_size=VOCAB, intermediate_size=48, eos_token_id=None, **changes)


@dataclasses.dataclass(frozen=True)
class FullLogitsLM(LanguageModel):
    """The previous trainer path: the output layer at every position, sliced afterwards."""

    def forward(
        self,
        params,
        input_ids,
        attention_mask,
        positions=None,
        cache=None,
        cache_index=None,
        cache_size=None,
        logits_positions=None,
    ):
        out = super().forward(params, input_ids, attention_mask, positions, cache, cache_index, cache_size)
        return out if logits_positions is None else out._replace(logits=out.logits[:, logits_positions])


def target_reward(prompt_ids, prompt_mask, response_ids, response_mask):
    return masked_mean((response_ids == TARGET_TOKEN).astype(jnp.float32), response_mask, axis=1)


CONFIG = PPOConfig(
    total_steps=STEPS,
    batch_size=BATCH,
    minibatch_size=4,
    ppo_epochs=2,
    max_new_tokens=NEW_TOKENS,
    max_prompt_len=PROMPT_LEN,
    learning_rate=3e-3,
    critic_learning_rate=3e-3,
    eos_token_id=-1,
    seed=0,
)


def _prompts(n=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, VOCAB, size=(n, PROMPT_LEN)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    mask[5, :3] = 0
    return ids * mask, mask


@pytest.fixture(scope="module")
def params():
    return LanguageModel(llama_config()).init_params(jax.random.PRNGKey(0))


def _train(policy, params, config=CONFIG, steps=STEPS):
    """``steps`` fused PPO steps; returns (final state on host, [metrics per step], ppo)."""
    ppo = PPO(config, policy, target_reward)
    state = ppo.init_state(params)
    frozen = ppo.frozen_params(params)
    batch = ppo.prompt_batch(*_prompts())
    history = []
    for _ in range(steps):
        state, metrics = ppo.train_step(state, frozen, batch)
        history.append(jax.device_get(metrics))
    assert ppo.compiled_step_count("fused") == 1
    return jax.device_get(state), history, ppo


@pytest.fixture(scope="module")
def unrolled_run(params):
    return _train(LanguageModel(llama_config()), params)


def _max_abs_diff(tree_a, tree_b) -> float:
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), tree_a, tree_b)
    return max(jax.tree.leaves(diffs))


def _assert_same_metrics(history_a, history_b, atol=1e-5):
    for step, (a, b) in enumerate(zip(history_a, history_b)):
        assert sorted(a) == sorted(b)
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=atol, err_msg=f"step {step}: {name}")


# ----------------------------------------------------------------------------------------------
# Response-only heads


@pytest.mark.parametrize("critic", [pytest.param("separate", marks=pytest.mark.slow), "shared"])
def test_response_only_heads_equal_full_logits(params, critic):
    model = LanguageModel(llama_config())
    rng = np.random.default_rng(1)
    prompt_ids, prompt_mask = map(jnp.asarray, _prompts())
    response_ids = jnp.asarray(rng.integers(0, VOCAB, size=(BATCH, NEW_TOKENS)), jnp.int32)
    response_mask = jnp.asarray(
        np.arange(NEW_TOKENS)[None] < rng.integers(1, NEW_TOKENS + 1, size=(BATCH, 1)), jnp.int32
    )
    head = init_value_head(jax.random.PRNGKey(2), model.config.hidden_size, scale=1.0)
    if critic == "separate":
        value_model = ValueModel(model.config)
        models, value_params = Models(model, value_model), {"trunk": params, "head": head}
    else:
        models, value_params = Models(model, None), head
    temperature = 0.7
    logprobs, values, entropy = jax.jit(
        lambda p, v: policy_and_values(
            models, p, v, prompt_ids, prompt_mask, response_ids, response_mask, temperature, with_entropy=True
        )
    )(params, value_params)

    ids = jnp.concatenate([prompt_ids, response_ids], axis=1)  # prompt + response, as the trainer lays them
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    full_out = model.forward(params, ids, mask)
    assert full_out.logits.shape == (BATCH, PROMPT_LEN + NEW_TOKENS, VOCAB)
    expected_logprobs = token_logprobs(
        response_slice(full_out.logits, PROMPT_LEN, NEW_TOKENS), response_ids, temperature
    )
    np.testing.assert_allclose(logprobs, expected_logprobs, atol=1e-5)
    expected_values = response_slice(value_head_apply(head, full_out.hidden), PROMPT_LEN, NEW_TOKENS)
    np.testing.assert_allclose(values, expected_values, atol=1e-5)
    assert entropy.shape == (BATCH, NEW_TOKENS)
    # The model's own option: logits at the slice only, hidden states everywhere.
    window = slice(PROMPT_LEN - 1, PROMPT_LEN - 1 + NEW_TOKENS)
    windowed = model.forward(params, ids, mask, logits_positions=window)
    assert windowed.logits.shape == (BATCH, NEW_TOKENS, VOCAB)
    np.testing.assert_allclose(windowed.logits, full_out.logits[:, window], atol=1e-5)
    np.testing.assert_allclose(windowed.hidden, full_out.hidden, atol=1e-6)


@pytest.mark.slow
def test_two_steps_equal_the_full_logit_trainer(params, unrolled_run):
    state, history, _ = unrolled_run
    old_state, old_history, _ = _train(FullLogitsLM(llama_config()), params)
    _assert_same_metrics(old_history, history)
    assert _max_abs_diff(old_state.policy_params, state.policy_params) < 1e-5
    assert _max_abs_diff(old_state.value_params, state.value_params) < 1e-5


# ----------------------------------------------------------------------------------------------
# Old log-probs from the sampler


def _first_ratio_deviation(ppo, state, frozen, batch, rollout_out, raw_scores):
    """max |ratio - 1| over valid tokens of the first minibatch's ratio: the policy is still the
    rollout's, so ``ratio = exp(forward log-probs - experience.old_logprobs)`` for every row."""
    hp = state.hparams
    experience, _, _ = make_experience(
        ppo.config,
        ppo.models,
        state.policy_params,
        state.value_params,
        frozen.ref_params,
        ppo.repeat_prompts(batch),
        rollout_out,
        raw_scores,
        state.kl_ctl.kl_coef,
        state.score_stats,
        hp,
    )
    logprobs, _, _ = policy_and_values(
        ppo.models,
        state.policy_params,
        state.value_params,
        experience.prompt_ids,
        experience.prompt_mask,
        experience.response_ids,
        experience.response_mask,
        hp.temperature,
    )
    _, stats = ppo_policy_loss(
        logprobs, experience.old_logprobs, experience.advantages, experience.response_mask, 0.2, 0.2, "token-mean"
    )
    return max(float(stats["ratio_max"]) - 1.0, 1.0 - float(stats["ratio_min"])), experience


@pytest.mark.slow
def test_sampler_logprobs_as_old_logprobs(params, unrolled_run):
    config = CONFIG.replace(old_logprobs_from_sampler=True)
    policy = LanguageModel(llama_config())
    ppo = PPO(config, policy, target_reward)
    # Temperature is data: a state with T = 0.8 checks that both sides are tempered alike.
    state, frozen = ppo.init_state(params, config=config.replace(temperature=0.8)), ppo.frozen_params(params)
    batch = ppo.prompt_batch(*_prompts())
    rollout_out = ppo.rollout_step(state, frozen, batch)
    prompts = ppo.repeat_prompts(batch)
    raw_scores = target_reward(prompts.ids, prompts.mask, rollout_out.tokens, rollout_out.mask)
    deviation, experience = _first_ratio_deviation(ppo, state, frozen, batch, rollout_out, raw_scores)
    np.testing.assert_array_equal(experience.old_logprobs, rollout_out.logprobs * rollout_out.mask)
    assert 0.0 <= deviation < 1e-3, deviation
    # The recomputing path on the same rollout starts at exactly 1.
    recompute = PPO(CONFIG, policy, target_reward)
    exact, _ = _first_ratio_deviation(recompute, state, frozen, batch, rollout_out, raw_scores)
    assert exact < 1e-6, exact

    # Two fused steps: one compile, the same metric names (but the sampler-trainer mismatch, which
    # exists only where old log-probs are recomputed), and the same run up to the ratio's
    # rounding (parameters are not compared: AdamW normalises away the size of a gradient, so
    # near-zero components differ by up to a learning rate per update).
    _, history, _ = _train(policy, params, config)
    _, base_history, _ = unrolled_run
    recomputed_only = {name for name in base_history[0] if name.startswith("mismatch_")}
    assert recomputed_only, "the recomputing run logs the sampler-trainer mismatch"
    assert sorted(history[0]) == sorted(set(base_history[0]) - recomputed_only)
    for step in range(STEPS):
        for name in ("score", "kl", "pg_loss", "vf_loss", "ratio_mean", "approx_kl"):
            np.testing.assert_allclose(
                history[step][name], base_history[step][name], rtol=1e-2, atol=1e-3, err_msg=f"step {step}: {name}"
            )
        # A sample estimate of the entropy against the exact one.
        np.testing.assert_allclose(history[step]["entropy"], base_history[step]["entropy"], rtol=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["shared_trunk", "grpo"])
def test_sampler_logprobs_without_a_separate_critic(params, setup):
    """Shared trunk: values from the trunk without its vocabulary head, equal to the recomputing
    path's; critic-free: no forward of the policy at all. Advantages as the recomputing path's."""
    if setup == "shared_trunk":
        config, value_params = CONFIG.replace(shared_trunk=True), init_value_head(jax.random.PRNGKey(3), 32, scale=1.0)
    else:
        config, value_params = CONFIG.replace(advantage_estimator="grpo", num_generations=2), {}
    models = Models(LanguageModel(llama_config()), None, has_value=config.uses_critic)
    prompt_ids, prompt_mask = map(jnp.asarray, _prompts())
    sample = generate(
        models.policy,
        params,
        prompt_ids,
        prompt_mask,
        jax.random.PRNGKey(4),
        max_new_tokens=NEW_TOKENS,
        temperature=0.9,
    )
    rollout_out = Rollout(sample.tokens, sample.mask, sample.logprobs)
    # Distinct scores in every group: a group of equal scores has a zero standard deviation, and
    # its normalised advantages would compare the round-off of two ways to compute the same KL.
    raw_scores = target_reward(prompt_ids, prompt_mask, sample.tokens, sample.mask)
    raw_scores = raw_scores + 0.1 * jnp.arange(raw_scores.shape[0])
    hp = HyperParams.from_config(config.replace(temperature=0.9))

    @jax.jit
    def both(params, value_params):
        args = (
            params,
            value_params,
            params,
            PromptBatch(prompt_ids, prompt_mask),
            rollout_out,
            raw_scores,
            jnp.float32(0.05),
            ScoreStats.zeros(),
            hp,
        )
        return (
            make_experience(config.replace(old_logprobs_from_sampler=True), models, *args)[0],
            make_experience(config, models, *args)[0],
        )

    from_sampler, recomputed = both(params, value_params)
    np.testing.assert_array_equal(from_sampler.old_logprobs, sample.logprobs * sample.mask)
    np.testing.assert_allclose(from_sampler.old_logprobs, recomputed.old_logprobs, atol=1e-4)
    np.testing.assert_allclose(from_sampler.advantages, recomputed.advantages, atol=1e-3)
    if setup == "shared_trunk":
        np.testing.assert_allclose(from_sampler.old_values, recomputed.old_values, atol=1e-6)
    else:
        assert from_sampler.old_values is None
    with pytest.raises(ValueError, match="old_logprobs_from_sampler"):
        make_experience(
            config.replace(old_logprobs_from_sampler=True),
            models,
            params,
            value_params,
            params,
            PromptBatch(prompt_ids, prompt_mask),
            Rollout(sample.tokens, sample.mask),
            raw_scores,
            jnp.float32(0.05),
            ScoreStats.zeros(),
            hp,
        )


# ----------------------------------------------------------------------------------------------
# A scanned, rematerialised policy and critic


@pytest.mark.slow
def test_scanned_rematerialised_trainer_equals_unrolled(params, unrolled_run):
    policy = LanguageModel(llama_config(scan_layers=True, remat="full"))
    state, history, ppo = _train(policy, policy.layout_params(params))
    assert ppo.critic.config.scan_layers and "layers" in state.policy_params  # stacked [num_layers, ...]
    base_state, base_history, _ = unrolled_run
    _assert_same_metrics(base_history, history)
    assert _max_abs_diff(unstack_layers(state.policy_params), base_state.policy_params) < 1e-5
    value_params = {"trunk": unstack_layers(state.value_params["trunk"]), "head": state.value_params["head"]}
    assert _max_abs_diff(value_params, base_state.value_params) < 1e-5
