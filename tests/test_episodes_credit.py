"""Credit over turns (issue 30): with an action mask, returns / GAE / advantages run over the action
tokens in order (observation tokens skipped, their results 0), per-turn rewards sit on each turn's
last action token, every loss has exactly zero gradient at observation positions, and a single
turn is today's trainer.

The references gather each row's action tokens, apply the single-turn formulas in float64 NumPy,
and scatter back (DESIGN.md, "Credit over turns").
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.training import PPOConfig
from jaxrlhf.training.experience import Experience, Models
from jaxrlhf.training.hparams import HyperParams
from jaxrlhf.training.plugins import AdvantageEstimator, AdvantageInputs, lookup, numbers_view
from jaxrlhf.training.update import loss_from_outputs

# Two rows of N = 8 tokens: "a" actions, "o" observations, "." after the episode.
#   row 0: a a o o o a a .   two turns; turn 1 ends at t=1, turn 2 at t=6
#   row 1: a a a .  . . . .  the episode ends in turn 1
#   row 2: o o . . . . . .   no action token (an environment that wrote first and ended)
#   row 3: a o a o a a o a   ragged turns of 1, 1, 2 and 1 tokens
ACTION = np.array(
    [
        [1, 1, 0, 0, 0, 1, 1, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 1, 1, 0, 1],
    ],
    np.float64,
)
ATTENDED = np.array(
    [
        [1, 1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ],
    np.float64,
)
TURN_REWARDS = np.zeros_like(ACTION)
TURN_REWARDS[0, 1] = 0.5  # end of row 0's first turn
TURN_REWARDS[3, 0], TURN_REWARDS[3, 2], TURN_REWARDS[3, 5] = -0.25, 0.3, 0.1
SCORES = np.array([1.0, -0.5, 0.7, 0.2])


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    logprobs = rng.normal(-1.0, 0.4, ACTION.shape)
    ref_logprobs = logprobs + rng.normal(0, 0.2, ACTION.shape)
    values = rng.normal(0, 0.5, ACTION.shape)
    return logprobs, ref_logprobs, values


def _reference(scores, logprobs, ref_logprobs, values, beta, gamma, lam):
    """Per row: gather the action tokens, the single-turn step rewards / returns / GAE, scatter back."""
    B, N = ACTION.shape
    rewards, returns, advantages, gae_returns = (np.zeros((B, N)) for _ in range(4))
    for b in range(B):
        idx = np.flatnonzero(ACTION[b])
        if idx.size == 0:
            continue
        kl = logprobs[b, idx] - ref_logprobs[b, idx]  # k1
        r = -beta * kl + TURN_REWARDS[b, idx]
        r[-1] += scores[b]
        G = np.zeros_like(r)
        A = np.zeros_like(r)
        v = values[b, idx]
        running, next_adv, next_v = 0.0, 0.0, 0.0
        for k in reversed(range(len(idx))):
            running = r[k] + gamma * running
            G[k] = running
            delta = r[k] + gamma * next_v - v[k]
            next_adv = delta + gamma * lam * next_adv
            A[k], next_v = next_adv, v[k]
        rewards[b, idx], returns[b, idx], advantages[b, idx], gae_returns[b, idx] = r, G, A, A + v
    return rewards, returns, advantages, gae_returns


def _advantage_inputs(config, scores, logprobs, ref_logprobs, values, beta):
    from jaxrlhf.core.kl import kl_estimate

    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return AdvantageInputs(
        scores=f32(scores),
        logprobs=f32(logprobs),
        ref_logprobs=f32(ref_logprobs),
        values=None if values is None else f32(values),
        mask=f32(ACTION),
        kl=kl_estimate(f32(logprobs), f32(ref_logprobs), "k1"),
        reward_kl_coef=jnp.float32(beta),
        numbers=numbers_view(HyperParams.from_config(config)),
        group_size=config.num_generations,
        greedy_scores=None,
        config=config,
        token_rewards=f32(TURN_REWARDS),
    )


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_gae_over_action_tokens_matches_the_gathered_reference(gamma):
    logprobs, ref_logprobs, values = _inputs()
    config = PPOConfig(gamma=gamma, gae_lambda=0.8, whiten_advantages=False, batch_size=4, minibatch_size=4)
    x = _advantage_inputs(config, SCORES, logprobs, ref_logprobs, values, beta=0.1)
    out = jax.jit(lookup(AdvantageEstimator, "gae"))(x)
    rewards, _, advantages, gae_returns = _reference(SCORES, logprobs, ref_logprobs, values, 0.1, gamma, 0.8)
    np.testing.assert_allclose(np.asarray(x.step_rewards()), rewards, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.advantages), advantages, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.returns), gae_returns, atol=1e-5)
    assert np.all(np.asarray(out.advantages)[ACTION == 0] == 0)  # observation tokens: exactly 0


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_over_action_tokens_matches_the_gathered_reference(gamma):
    logprobs, ref_logprobs, values = _inputs(1)
    config = PPOConfig(gamma=gamma, advantage_estimator="reinforce++", batch_size=4, minibatch_size=4)
    out = lookup(AdvantageEstimator, "reinforce++")(
        _advantage_inputs(config, SCORES, logprobs, ref_logprobs, None, beta=0.05)
    )
    _, returns, _, _ = _reference(SCORES, logprobs, ref_logprobs, np.zeros_like(values), 0.05, gamma, 1.0)
    valid = ACTION > 0
    whitened = (returns - returns[valid].mean()) / np.sqrt(returns[valid].var(ddof=1) + 1e-8)
    np.testing.assert_allclose(np.asarray(out.advantages), np.where(valid, whitened, 0), atol=1e-5)


def test_outcome_estimators_compare_the_episode_return():
    """GRPO's score of an episode: its final score plus its turn rewards, minus beta * its KL."""
    logprobs, ref_logprobs, _ = _inputs(2)
    config = PPOConfig(advantage_estimator="grpo", num_generations=4, batch_size=4, minibatch_size=4)
    x = _advantage_inputs(config, SCORES, logprobs, ref_logprobs, None, beta=0.1)
    kl_sum = ((logprobs - ref_logprobs) * ACTION).sum(1)
    episode_return = SCORES + (TURN_REWARDS * ACTION).sum(1) - 0.1 * kl_sum
    np.testing.assert_allclose(np.asarray(x.sequence_scores()), episode_return, atol=1e-6)
    out = lookup(AdvantageEstimator, "grpo")(x)
    expected = (episode_return - episode_return.mean()) / (episode_return.std(ddof=1) + 1e-6)
    np.testing.assert_allclose(np.asarray(out.advantages), ACTION * expected[:, None], atol=1e-5)


def test_a_hand_worked_two_turn_episode():
    """Row 0: actions at t = 0, 1 (turn 1, reward 0.5) and 5, 6 (turn 2, final score 1.0), the
    environment's observation at t = 2..4; k1 KL of 0.2 per action token, beta = 0.5, gamma = 1:

        r = [-0.1 + 0, -0.1 + 0.5, 0, 0, 0, -0.1, -0.1 + 1.0] = [-0.1, 0.4, 0, 0, 0, -0.1, 0.9]
        G = [0.4 + 0.4 + 0.8, ...] -> [1.1, 1.2, 0, 0, 0, 0.8, 0.9]
    """
    logprobs = np.zeros(ACTION.shape)
    ref_logprobs = logprobs - 0.2 * ACTION  # k1 = logp - ref = 0.2 on actions
    config = PPOConfig(gae_lambda=1.0, whiten_advantages=False, batch_size=4, minibatch_size=4)
    x = _advantage_inputs(config, SCORES, logprobs, ref_logprobs, np.zeros(ACTION.shape), beta=0.5)
    np.testing.assert_allclose(np.asarray(x.step_rewards())[0], [-0.1, 0.4, 0, 0, 0, -0.1, 0.9, 0], atol=1e-6)
    out = lookup(AdvantageEstimator, "gae")(x)  # V = 0 and lambda = 1: the advantages are the returns
    np.testing.assert_allclose(np.asarray(out.advantages)[0], [1.1, 1.2, 0, 0, 0, 0.8, 0.9, 0], atol=1e-6)


POLICY_LOSSES = ["ppo", "gspo", "gspo-token", "cispo", "clip-cov", "kl-cov", "gmpo", "sapo"]


@pytest.mark.parametrize("policy_loss", POLICY_LOSSES)
def test_every_loss_has_zero_gradient_at_observation_positions(policy_loss):
    """The policy loss, the KL term, the entropy bonus and the value loss: the gradient with
    respect to the log-probs / entropies / values (functions of the logits at the same position)
    is exactly 0 wherever the action mask is 0."""
    B, N = ACTION.shape
    rng = np.random.default_rng(3)
    config = PPOConfig(
        policy_loss=policy_loss, kl_placement="loss", entropy_coef=0.01, batch_size=4, minibatch_size=4,
        max_new_tokens=N, loss_agg="seq-mean-token-mean" if policy_loss == "sapo" else "token-mean",
    )  # fmt: skip
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    experience = Experience(
        prompt_ids=jnp.zeros((B, 2), jnp.int32), prompt_mask=jnp.ones((B, 2), jnp.int32),
        response_ids=jnp.zeros((B, N), jnp.int32), response_mask=f32(ATTENDED), action_mask=f32(ACTION),
        old_logprobs=f32(rng.normal(-1, 0.3, (B, N))), ref_logprobs=f32(rng.normal(-1, 0.3, (B, N))),
        old_values=f32(rng.normal(size=(B, N))), advantages=f32(rng.normal(size=(B, N)) * ACTION),
        returns=f32(rng.normal(size=(B, N))), rewards=f32(np.zeros((B, N))), scores=f32(np.zeros(B)),
    )  # fmt: skip
    models = dataclasses.replace(Models(None, None, has_value=True))  # the loss never calls the models

    def loss(logprobs, values, entropy):
        return loss_from_outputs(
            logprobs, values, entropy, experience, jnp.float32(0.1), HyperParams.from_config(config), config,
            models, jnp.float32(1.0), jnp.float32(1.0), jax.random.PRNGKey(0),
        )[0]  # fmt: skip

    args = (f32(rng.normal(-1, 0.3, (B, N))), f32(rng.normal(size=(B, N))), f32(rng.random((B, N))))
    grads = jax.grad(loss, argnums=(0, 1, 2))(*args)
    for name, grad in zip(("logprobs", "values", "entropy"), grads):
        grad = np.asarray(grad)
        assert np.all(grad[ACTION == 0] == 0), (name, grad[ACTION == 0])
        assert np.any(grad[ACTION > 0] != 0), name
