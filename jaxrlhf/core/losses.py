"""PPO policy / value losses, entropy bonus and the Bradley-Terry reward-model loss.

Every loss returns ``(loss, stats)``: a scalar to differentiate and a dict of scalar diagnostics
(already ``stop_gradient``-ed). Token-level losses reduce over the batch with
:func:`aggregate_loss`; pass ``axis_name`` under ``pmap``/``shard_map`` to reduce over all devices.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import chex
import jax
import jax.numpy as jnp

from jaxrlhf.core.kl import kl_estimate
from jaxrlhf.core.stats import masked_count, masked_mean, masked_sum

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")

Stats = Dict[str, jax.Array]


def _at_least_float32(*arrays):
    """Upcast bf16/f16 inputs so ratios and squared errors are computed in float32 or wider."""
    dtype = jnp.result_type(jnp.float32, *arrays)
    return tuple(jnp.asarray(a, dtype) for a in arrays)


def aggregate_loss(
    loss_per_token: chex.Array, mask: chex.Array, agg: str = "token-mean", axis_name=None
) -> jax.Array:
    """Reduce a ``[B, T]`` per-token loss to a scalar.

    * ``"token-mean"``: ``sum(l * m) / sum(m)`` over every valid token of the (global) batch;
    * ``"seq-mean-token-mean"``: per row ``sum_t(l * m) / sum_t(m)``, then the mean over rows
      with at least one valid token;
    * ``"seq-mean-token-sum"``: per row ``sum_t(l * m)``, then the mean over rows with at least one
      valid token.

    All denominators are ``max(count, 1)``, so an all-zero mask gives 0.
    """
    chex.assert_rank([loss_per_token, mask], 2)
    chex.assert_equal_shape([loss_per_token, mask])
    if agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"Unknown loss aggregation {agg!r}; valid ones are {LOSS_AGGREGATIONS}.")
    if agg == "token-mean":
        return masked_mean(loss_per_token, mask, axis_name=axis_name)
    if agg == "seq-mean-token-mean":
        per_row_B = masked_mean(loss_per_token, mask, axis=-1)
    else:
        per_row_B = masked_sum(loss_per_token, mask, axis=-1)
    row_has_tokens_B = masked_count(mask, axis=-1) > 0
    return masked_mean(per_row_B, row_has_tokens_B, axis_name=axis_name)


def ppo_policy_loss(
    logprobs: chex.Array,
    old_logprobs: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    clip_eps: float = 0.2,
    clip_eps_high: Optional[float] = None,
    agg: str = "token-mean",
    axis_name=None,
) -> Tuple[jax.Array, Stats]:
    """Clipped PPO surrogate (Schulman et al., 2017), per token.

    ``ratio = exp(logprobs - old_logprobs)``,
    ``pg = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))`` with
    ``eps_low = clip_eps`` and ``eps_high = clip_eps_high`` (defaults to ``clip_eps``), then
    :func:`aggregate_loss` with ``agg``.

    Args:
      logprobs: ``[B, T]`` log-probs under the policy being optimised (differentiated).
      old_logprobs: ``[B, T]`` log-probs under the rollout policy.
      advantages: ``[B, T]`` (treated as constants).
      mask: ``[B, T]``.

    Returns:
      ``(loss, stats)``; stats: ``pg_loss``, ``clipfrac`` (fraction of valid tokens where the
      clipped term is the larger one), ``approx_kl`` (masked mean of the k3 estimate with
      d = old_logprobs - logprobs), ``ratio_mean``, ``ratio_min``, ``ratio_max`` (over valid tokens).
    """
    chex.assert_rank([logprobs, old_logprobs, advantages, mask], 2)
    chex.assert_equal_shape([logprobs, old_logprobs, advantages, mask])
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    logprobs, old_logprobs, advantages = _at_least_float32(logprobs, old_logprobs, advantages)
    advantages = jax.lax.stop_gradient(advantages)
    old_logprobs = jax.lax.stop_gradient(old_logprobs)

    ratio_BxT = jnp.exp(logprobs - old_logprobs)
    unclipped_BxT = -advantages * ratio_BxT
    clipped_BxT = -advantages * jnp.clip(ratio_BxT, 1.0 - eps_low, 1.0 + eps_high)
    pg_loss_BxT = jnp.maximum(unclipped_BxT, clipped_BxT)
    loss = aggregate_loss(pg_loss_BxT, mask, agg, axis_name)

    sg = jax.lax.stop_gradient
    valid = mask != 0
    ratio_for_max = jnp.where(valid, sg(ratio_BxT), -jnp.inf)
    ratio_for_min = jnp.where(valid, sg(ratio_BxT), jnp.inf)
    ratio_max, ratio_min = jnp.max(ratio_for_max), jnp.min(ratio_for_min)
    if axis_name is not None:
        ratio_max = jax.lax.pmax(ratio_max, axis_name)
        ratio_min = jax.lax.pmin(ratio_min, axis_name)
    any_valid = masked_count(mask, axis_name=axis_name) > 0
    stats = {
        "pg_loss": sg(loss),
        "clipfrac": masked_mean((clipped_BxT > unclipped_BxT).astype(jnp.float32), mask, axis_name=axis_name),
        "approx_kl": masked_mean(sg(kl_estimate(logprobs, old_logprobs, "k3")), mask, axis_name=axis_name),
        "ratio_mean": masked_mean(sg(ratio_BxT), mask, axis_name=axis_name),
        "ratio_max": jnp.where(any_valid, ratio_max, 0.0),
        "ratio_min": jnp.where(any_valid, ratio_min, 0.0),
    }
    return loss, stats


def ppo_value_loss(
    values: chex.Array,
    old_values: chex.Array,
    returns: chex.Array,
    mask: chex.Array,
    clip_eps: Optional[float] = 0.2,
    axis_name=None,
) -> Tuple[jax.Array, Stats]:
    """Clipped value loss.

    ``V_clip = clip(V, V_old - eps, V_old + eps)``,
    ``loss = 0.5 * token-mean(max((V - R)^2, (V_clip - R)^2))``; ``clip_eps=None`` drops the
    clipped term: ``0.5 * token-mean((V - R)^2)``.

    Args:
      values: ``[B, T]`` current value predictions (differentiated).
      old_values: ``[B, T]`` values at rollout time.
      returns: ``[B, T]`` value targets (e.g. from :func:`gae_advantages`).
      mask: ``[B, T]``.

    Returns:
      ``(loss, stats)``; stats: ``vf_loss``, ``vf_clipfrac`` (fraction of valid tokens where the
      clipped error is the larger one), ``value_mean``, ``value_error`` (masked mean of (V - R)^2).
    """
    chex.assert_rank([values, old_values, returns, mask], 2)
    chex.assert_equal_shape([values, old_values, returns, mask])
    values, old_values, returns = _at_least_float32(values, old_values, returns)
    old_values = jax.lax.stop_gradient(old_values)
    returns = jax.lax.stop_gradient(returns)
    unclipped_error_BxT = jnp.square(values - returns)
    if clip_eps is None:
        error_BxT = unclipped_error_BxT
        clipfrac = jnp.zeros((), jnp.float32)
    else:
        clipped_values_BxT = jnp.clip(values, old_values - clip_eps, old_values + clip_eps)
        clipped_error_BxT = jnp.square(clipped_values_BxT - returns)
        error_BxT = jnp.maximum(unclipped_error_BxT, clipped_error_BxT)
        is_clipped = (clipped_error_BxT > unclipped_error_BxT).astype(jnp.float32)
        clipfrac = masked_mean(is_clipped, mask, axis_name=axis_name)
    loss = 0.5 * masked_mean(error_BxT, mask, axis_name=axis_name)
    sg = jax.lax.stop_gradient
    stats = {
        "vf_loss": sg(loss),
        "vf_clipfrac": clipfrac,
        "value_mean": masked_mean(sg(values), mask, axis_name=axis_name),
        "value_error": masked_mean(sg(unclipped_error_BxT), mask, axis_name=axis_name),
    }
    return loss, stats


def entropy_loss(
    entropy: chex.Array, mask: chex.Array, agg: str = "token-mean", axis_name=None
) -> Tuple[jax.Array, Stats]:
    """Entropy bonus as a loss to minimise: ``loss = -aggregate(H)``.

    Args:
      entropy: ``[B, T]`` per-token entropies (see :func:`entropy_from_logits`).
      mask: ``[B, T]``.

    Returns:
      ``(loss, stats)``; stats: ``entropy`` (the aggregated entropy).
    """
    aggregated_entropy = aggregate_loss(entropy, mask, agg, axis_name)
    return -aggregated_entropy, {"entropy": jax.lax.stop_gradient(aggregated_entropy)}


def reward_model_loss(
    chosen_scores: chex.Array, rejected_scores: chex.Array, margin=None
) -> Tuple[jax.Array, Stats]:
    """Bradley-Terry pairwise loss for a reward model.

    ``loss = mean(-log sigmoid(s_chosen - s_rejected - margin))`` (``margin`` 0 when None).

    Args:
      chosen_scores: ``[B]`` scores of the preferred responses.
      rejected_scores: ``[B]`` scores of the rejected responses.
      margin: optional scalar or ``[B]`` margin.

    Returns:
      ``(loss, stats)``; stats: ``accuracy`` (fraction with ``s_chosen > s_rejected``),
      ``reward_margin`` (mean ``s_chosen - s_rejected``), ``chosen_mean``, ``rejected_mean``.
    """
    chex.assert_rank([chosen_scores, rejected_scores], 1)
    chex.assert_equal_shape([chosen_scores, rejected_scores])
    score_gap_B = chosen_scores - rejected_scores
    if margin is not None:
        margin = jnp.asarray(margin)
        chex.assert_rank(margin, {0, 1})
        logits_B = score_gap_B - margin
    else:
        logits_B = score_gap_B
    loss = -jnp.mean(jax.nn.log_sigmoid(logits_B))
    sg = jax.lax.stop_gradient
    stats = {
        "accuracy": jnp.mean((score_gap_B > 0).astype(jnp.float32)),
        "reward_margin": jnp.mean(sg(score_gap_B)),
        "chosen_mean": jnp.mean(sg(chosen_scores)),
        "rejected_mean": jnp.mean(sg(rejected_scores)),
    }
    return loss, stats
