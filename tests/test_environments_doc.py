"""The hand-worked 2-turn episode of docs/environments.md ("Masking and credit over turns"): the
trainer's step rewards, returns (gamma 1 and 0.9), GAE advantages and the outcome estimators'
episode return give the page's numbers."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.core.kl import kl_estimate
from jaxrlhf.training import PPOConfig
from jaxrlhf.training.hparams import HyperParams
from jaxrlhf.training.plugins import AdvantageEstimator, AdvantageInputs, lookup, numbers_view

ACTION = jnp.array([[1, 1, 0, 0, 0, 1, 1, 0]], jnp.float32)  # turn 1: t = 0, 1; observation t = 2..4; turn 2: t = 5, 6
TURN_REWARDS = jnp.zeros((1, 8)).at[0, 1].set(0.5)
LOGPROBS = jnp.zeros((1, 8))
REF_LOGPROBS = LOGPROBS - 0.2 * ACTION  # k1 = 0.2 on every action token
VALUES = jnp.array([[0.5, 0.6, 0.0, 0.0, 0.0, 0.7, 0.8, 0.0]])


def _inputs(gamma, lam, values):
    config = PPOConfig(gamma=gamma, gae_lambda=lam, whiten_advantages=False, batch_size=1, minibatch_size=1)
    return AdvantageInputs(
        scores=jnp.array([1.0]),
        logprobs=LOGPROBS,
        ref_logprobs=REF_LOGPROBS,
        values=values,
        mask=ACTION,
        kl=kl_estimate(LOGPROBS, REF_LOGPROBS, "k1"),
        reward_kl_coef=jnp.float32(0.5),
        numbers=numbers_view(HyperParams.from_config(config)),
        group_size=1,
        greedy_scores=None,
        config=config,
        token_rewards=TURN_REWARDS,
    )


@pytest.mark.parametrize(
    "gamma, lam, values, advantages",
    [
        (1.0, 1.0, jnp.zeros((1, 8)), [1.1, 1.2, 0, 0, 0, 0.8, 0.9, 0]),  # V = 0, lambda = 1: the returns
        (0.9, 1.0, jnp.zeros((1, 8)), [0.8351, 1.039, 0, 0, 0, 0.71, 0.9, 0]),
        (1.0, 0.95, VALUES, [0.5607375, 0.59025, 0, 0, 0, 0.095, 0.1, 0]),
    ],
)
def test_the_pages_hand_worked_two_turn_episode(gamma, lam, values, advantages):
    x = _inputs(gamma, lam, values)
    np.testing.assert_allclose(np.asarray(x.step_rewards())[0], [-0.1, 0.4, 0, 0, 0, -0.1, 0.9, 0], atol=1e-6)
    out = lookup(AdvantageEstimator, "gae")(x)
    np.testing.assert_allclose(np.asarray(out.advantages)[0], advantages, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(out.returns)[0], np.asarray(advantages) + np.asarray(values)[0] * np.asarray(ACTION)[0], atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(x.sequence_scores()), [1.1], atol=1e-6)  # 1.0 + 0.5 - 0.5 * 0.8
