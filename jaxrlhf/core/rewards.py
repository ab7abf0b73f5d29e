"""Per-token (step) rewards for RLHF and their discounted returns.

A response earns one score at its end; RL needs a reward for every token. The step reward is

    r[b, t] = -kl_coef * kl[b, t] * mask[b, t]         (per-token KL penalty)
    r[b, last valid t] += scores[b]                      (sequence score on the last token)

and the return is ``G_t = sum_{k >= t} gamma^(k - t) r_k`` over the valid tokens.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import lax

from jaxrlhf.core.kl import kl_estimate
from jaxrlhf.core.stats import compute_dtype
from jaxrlhf.typing import Scalar


def last_valid_index(mask: chex.Array) -> jax.Array:
    """Index of the last position with ``mask != 0`` in each row; -1 for an all-zero row.

    Args:
      mask: ``[B, T]``.

    Returns:
      ``[B]`` int32.
    """
    chex.assert_rank(mask, 2)
    positions_T = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask != 0, positions_T, -1), axis=-1)


def kl_penalized_rewards(
    scores: chex.Array,
    logprobs: chex.Array,
    ref_logprobs: chex.Array,
    mask: chex.Array,
    kl_coef: Scalar,
    kind: str = "k1",
) -> jax.Array:
    """Step rewards: a per-token KL penalty plus the sequence score on the last valid token.

    ``r = -kl_coef * kl_estimate(logprobs, ref_logprobs, kind) * mask``, then
    ``r[b, last_valid_index(mask)[b]] += scores[b]``. A row whose mask is all zeros gets no score
    (its rewards are all 0).

    Args:
      scores: ``[B]`` sequence-level scores (reward model or programmatic reward).
      logprobs: ``[B, T]`` policy log-probs of the response tokens.
      ref_logprobs: ``[B, T]`` reference-model log-probs of the same tokens.
      mask: ``[B, T]`` 1 for response tokens up to and including EOS.
      kl_coef: scalar KL coefficient beta (0 turns the penalty off).
      kind: KL estimator, see :func:`jaxrlhf.core.kl.kl_estimate`.

    Returns:
      ``[B, T]`` float rewards.
    """
    chex.assert_rank([scores, logprobs, ref_logprobs, mask], [1, 2, 2, 2])
    chex.assert_equal_shape([logprobs, ref_logprobs, mask])
    dtype = compute_dtype(logprobs)
    kl_BxT = kl_estimate(logprobs.astype(dtype), ref_logprobs.astype(dtype), kind)
    return step_rewards(scores, kl_BxT, mask, kl_coef)


def step_rewards(scores: chex.Array, kl: chex.Array, mask: chex.Array, kl_coef: Scalar) -> jax.Array:
    """`kl_penalized_rewards` from a per-token KL estimate ``kl`` (of any estimator).

    ``r = -kl_coef * kl * mask``, then ``r[b, last_valid_index(mask)[b]] += scores[b]``. With an
    action mask (multi-turn episodes) the score lands on the last action token; tokens off the mask
    get 0.

    Args:
      scores: ``[B]`` sequence-level scores.
      kl: ``[B, T]`` per-token KL estimates.
      mask: ``[B, T]``.
      kl_coef: scalar beta.

    Returns:
      ``[B, T]`` float rewards.
    """
    chex.assert_rank([scores, kl, mask], [1, 2, 2])
    chex.assert_equal_shape([kl, mask])
    chex.assert_equal_shape_prefix([scores, mask], 1)
    kl_coef = jnp.asarray(kl_coef)
    chex.assert_rank(kl_coef, 0)
    dtype = compute_dtype(kl)
    mask_BxT = mask.astype(dtype)
    kl_BxT = kl.astype(dtype)
    kl_penalty_BxT = jnp.where(mask_BxT != 0, -kl_coef.astype(dtype) * kl_BxT * mask_BxT, 0)
    positions_T = jnp.arange(mask_BxT.shape[-1], dtype=jnp.int32)
    is_last_BxT = positions_T[None, :] == last_valid_index(mask_BxT)[:, None]  # no match if row empty
    return kl_penalty_BxT + jnp.where(is_last_BxT, scores.astype(dtype)[:, None], 0)


def discounted_returns(rewards: chex.Array, mask: chex.Array, gamma: Scalar = 1.0) -> jax.Array:
    """Reward-to-go ``G_t = r_t + gamma * G_{t+1}`` over the valid tokens, by a reverse scan.

    For the usual mask (a valid prefix per row) this is ``G_t = sum_{k >= t} gamma^(k - t) r_k``.
    Masked positions contribute no reward, are skipped by the recursion (the carry passes through
    them unchanged) and get ``G = 0``.

    Args:
      rewards: ``[B, T]`` step rewards.
      mask: ``[B, T]``.
      gamma: discount factor (1.0 for text).

    Returns:
      ``[B, T]`` returns.
    """
    chex.assert_rank([rewards, mask], 2)
    chex.assert_equal_shape([rewards, mask])
    dtype = compute_dtype(rewards)
    valid_TxB = (mask != 0).T
    rewards_TxB = jnp.where(valid_TxB, rewards.astype(dtype).T, 0)
    gamma = jnp.asarray(gamma, dtype)

    def step(next_return_B, inputs):
        reward_B, valid_B = inputs
        return_B = reward_B + gamma * next_return_B
        return jnp.where(valid_B, return_B, next_return_B), jnp.where(valid_B, return_B, 0)

    # zeros_like of a row (not jnp.zeros): under shard_map the carry must vary per device like the rows.
    init_B = jnp.zeros_like(rewards_TxB[0])
    _, returns_TxB = lax.scan(step, init_B, (rewards_TxB, valid_TxB), reverse=True)
    return returns_TxB.T
