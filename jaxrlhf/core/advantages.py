"""Generalised advantage estimation (Schulman et al., 2016) over ``[B, T]`` token arrays."""

from __future__ import annotations

import chex
import jax.numpy as jnp
from jax import lax

from jaxrlhf.core.stats import compute_dtype
from jaxrlhf.typing import Scalar


def gae_advantages(
    rewards: chex.Array, values: chex.Array, mask: chex.Array, gamma: Scalar = 1.0, gae_lambda: Scalar = 0.95
):
    """GAE advantages and value targets, by a reverse ``lax.scan`` over time.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``  (V past the last valid token is 0),
    ``A_t = delta_t + gamma * gae_lambda * A_{t+1}``, ``returns_t = A_t + V_t``.

    Masked positions are skipped by the recursion (the carry passes through them unchanged, so
    ``V_{t+1}`` is the value of the next *valid* token) and get ``A = returns = 0``. With
    ``gae_lambda = 1`` the returns are the discounted returns of the rewards; with ``gae_lambda = 0`` the
    advantages are the one-step TD errors.

    Args:
      rewards: ``[B, T]`` step rewards (see :func:`jaxrlhf.core.rewards.kl_penalized_rewards`).
      values: ``[B, T]`` value-model predictions ``V(s_t)``.
      mask: ``[B, T]``.
      gamma: discount factor (1.0 for text).
      gae_lambda: GAE lambda.

    Returns:
      ``(advantages, returns)``, both ``[B, T]``.
    """
    chex.assert_rank([rewards, values, mask], 2)
    chex.assert_equal_shape([rewards, values, mask])
    dtype = compute_dtype(rewards, values)
    valid_TxB = (mask != 0).T
    rewards_TxB = jnp.where(valid_TxB, rewards.astype(dtype).T, 0)
    values_TxB = jnp.where(valid_TxB, values.astype(dtype).T, 0)
    gamma = jnp.asarray(gamma, dtype)
    gae_lambda = jnp.asarray(gae_lambda, dtype)

    def step(carry, inputs):
        next_value_B, next_advantage_B = carry
        reward_B, value_B, valid_B = inputs
        delta_B = reward_B + gamma * next_value_B - value_B
        advantage_B = delta_B + gamma * gae_lambda * next_advantage_B
        carry = (
            jnp.where(valid_B, value_B, next_value_B),
            jnp.where(valid_B, advantage_B, next_advantage_B),
        )
        return carry, jnp.where(valid_B, advantage_B, 0)

    # zeros_like of a row (not jnp.zeros): under shard_map the carry must vary per device like the rows.
    zeros_B = jnp.zeros_like(rewards_TxB[0])
    _, advantages_TxB = lax.scan(step, (zeros_B, zeros_B), (rewards_TxB, values_TxB, valid_TxB), reverse=True)
    advantages_BxT = advantages_TxB.T
    returns_BxT = jnp.where(valid_TxB.T, advantages_BxT + values_TxB.T, 0)
    return advantages_BxT, returns_BxT
