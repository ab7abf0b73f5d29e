"""Policy losses (PPO with optional dual clip, GSPO, GSPO-token), the value loss, KL and entropy
terms, and the Bradley-Terry reward-model loss.

Every loss returns ``(loss, stats)``: a scalar to differentiate and a dict of scalar diagnostics
(already ``stop_gradient``-ed). Token-level losses reduce over the batch with
:func:`aggregate_loss`; pass ``axis_name`` under ``pmap``/``shard_map`` to reduce over all devices.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxrlhf.core.kl import kl_estimate
from jaxrlhf.core.stats import at_least_float32, masked_count, masked_mean, masked_sum
from jaxrlhf.typing import Scalar

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
GSPO_VARIANTS = ("seq", "token")

Stats = dict[str, jax.Array]


def aggregate_loss(
    loss_per_token: chex.Array,
    mask: chex.Array,
    agg: str = "token-mean",
    axis_name=None,
    max_len: float | None = None,
) -> jax.Array:
    """Reduce a ``[B, T]`` per-token loss to a scalar.

    * ``"token-mean"``: ``sum(l * m) / sum(m)`` over every valid token of the (global) batch;
    * ``"seq-mean-token-mean"``: per row ``sum_t(l * m) / sum_t(m)``, then the mean over rows
      with at least one valid token;
    * ``"seq-mean-token-sum"``: per row ``sum_t(l * m)``, then the mean over rows with at least one
      valid token;
    * ``"seq-mean-token-sum-norm"`` (Dr. GRPO, Liu et al. 2025): per row ``sum_t(l * m) / max_len``
      with a constant ``max_len`` (default ``T = loss_per_token.shape[-1]``, i.e.
      ``max_new_tokens``), then the mean over rows with at least one valid token. Unlike
      "seq-mean-token-mean" no response's tokens are up-weighted for being short.

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
    if agg == "seq-mean-token-sum-norm":
        per_row_B = per_row_B / (loss_per_token.shape[-1] if max_len is None else max_len)
    row_has_tokens_B = masked_count(mask, axis=-1) > 0
    return masked_mean(per_row_B, row_has_tokens_B, axis_name=axis_name)


def _clipped_surrogate(ratio_BxT, advantages_BxT, eps_low, eps_high, dual_clip):
    """``pg = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))``; with ``dual_clip = c``
    also ``pg = min(pg, -A * c)`` where ``A < 0``. Returns ``(pg, clipped, dual_clipped)``."""
    unclipped_BxT = -advantages_BxT * ratio_BxT
    clipped_BxT = -advantages_BxT * jnp.clip(ratio_BxT, 1.0 - eps_low, 1.0 + eps_high)
    pg_loss_BxT = jnp.maximum(unclipped_BxT, clipped_BxT)
    is_clipped_BxT = clipped_BxT > unclipped_BxT
    if dual_clip is None:
        return pg_loss_BxT, is_clipped_BxT, None
    negative_BxT = advantages_BxT < 0
    # The bound is +inf where A >= 0, so min() leaves those tokens (and their gradient) alone.
    bound_BxT = jnp.where(negative_BxT, -advantages_BxT * dual_clip, jnp.inf)
    is_dual_clipped_BxT = negative_BxT & (bound_BxT < pg_loss_BxT)
    return jnp.minimum(pg_loss_BxT, bound_BxT), is_clipped_BxT, is_dual_clipped_BxT


def _weighted(loss_BxT, weights):
    """Per-token losses times optional weights (constants: no gradient flows through them)."""
    return loss_BxT if weights is None else loss_BxT * jax.lax.stop_gradient(weights)


def _check_dual_clip(dual_clip):
    if isinstance(dual_clip, (int, float)) and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (Ye et al. 2020 use 3), got {dual_clip}.")


def _ratio_stats(ratio_BxT, mask, axis_name, prefix=""):
    sg = jax.lax.stop_gradient
    valid = mask != 0
    ratio_max = jnp.max(jnp.where(valid, sg(ratio_BxT), -jnp.inf))
    ratio_min = jnp.min(jnp.where(valid, sg(ratio_BxT), jnp.inf))
    if axis_name is not None:
        ratio_max = jax.lax.pmax(ratio_max, axis_name)
        ratio_min = jax.lax.pmin(ratio_min, axis_name)
    any_valid = masked_count(mask, axis_name=axis_name) > 0
    return {
        prefix + "ratio_mean": masked_mean(sg(ratio_BxT), mask, axis_name=axis_name),
        prefix + "ratio_max": jnp.where(any_valid, ratio_max, 0.0),
        prefix + "ratio_min": jnp.where(any_valid, ratio_min, 0.0),
    }


def ppo_policy_loss(
    logprobs: chex.Array,
    old_logprobs: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    clip_eps: Scalar = 0.2,
    clip_eps_high: Scalar | None = None,
    agg: str = "token-mean",
    axis_name=None,
    dual_clip=None,
    weights: chex.Array | None = None,
) -> tuple[jax.Array, Stats]:
    """Clipped PPO surrogate (Schulman et al., 2017), per token, with optional dual clip.

    ``ratio = exp(logprobs - old_logprobs)``,
    ``pg = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))`` with
    ``eps_low = clip_eps`` and ``eps_high = clip_eps_high`` (defaults to ``clip_eps``; a larger
    ``eps_high`` is DAPO's "clip-higher"), then :func:`aggregate_loss` with ``agg``.

    Dual-clip PPO (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL"): with
    ``dual_clip = c > 1``, for ``A < 0`` also ``pg = min(pg, -A * c)``, which bounds the loss (and
    zeroes the gradient) of a negative-advantage token whose ratio has grown beyond ``c``.
    ``dual_clip=None`` (default) is plain PPO; ``c`` may be a traced scalar.

    ``weights`` (optional ``[B, T]``, no gradient) multiply the per-token losses before aggregation
    (e.g. off-policy correction weights, `jaxrlhf.core.offpolicy`); None is 1 everywhere.

    Args:
      logprobs: ``[B, T]`` log-probs under the policy being optimised (differentiated).
      old_logprobs: ``[B, T]`` log-probs under the rollout policy.
      advantages: ``[B, T]`` (treated as constants).
      mask: ``[B, T]``.

    Returns:
      ``(loss, stats)``; stats: ``pg_loss``, ``clipfrac`` (fraction of valid tokens where the
      clipped term is the larger one), ``approx_kl`` (masked mean of the k3 estimate with
      d = old_logprobs - logprobs), ``ratio_mean``, ``ratio_min``, ``ratio_max`` (over valid
      tokens); with ``dual_clip`` also ``dual_clipfrac`` (fraction of valid tokens where the
      dual-clip bound is taken).
    """
    chex.assert_rank([logprobs, old_logprobs, advantages, mask], 2)
    chex.assert_equal_shape([logprobs, old_logprobs, advantages, mask])
    _check_dual_clip(dual_clip)
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    logprobs_BxT, old_logprobs_BxT, advantages_BxT = at_least_float32(logprobs, old_logprobs, advantages)
    advantages_BxT = jax.lax.stop_gradient(advantages_BxT)
    old_logprobs_BxT = jax.lax.stop_gradient(old_logprobs_BxT)

    ratio_BxT = jnp.exp(logprobs_BxT - old_logprobs_BxT)
    pg_loss_BxT, is_clipped_BxT, is_dual_clipped_BxT = _clipped_surrogate(
        ratio_BxT, advantages_BxT, eps_low, eps_high, dual_clip
    )
    loss = aggregate_loss(_weighted(pg_loss_BxT, weights), mask, agg, axis_name)

    sg = jax.lax.stop_gradient
    stats = {
        "pg_loss": sg(loss),
        "clipfrac": masked_mean(is_clipped_BxT.astype(jnp.float32), mask, axis_name=axis_name),
        "approx_kl": masked_mean(sg(kl_estimate(logprobs_BxT, old_logprobs_BxT, "k3")), mask, axis_name=axis_name),
        **_ratio_stats(ratio_BxT, mask, axis_name),
    }
    if is_dual_clipped_BxT is not None:
        stats["dual_clipfrac"] = masked_mean(is_dual_clipped_BxT.astype(jnp.float32), mask, axis_name=axis_name)
    return loss, stats


def gspo_policy_loss(
    logprobs_BxT: chex.Array,
    old_logprobs_BxT: chex.Array,
    advantages_BxT: chex.Array,
    mask_BxT: chex.Array,
    clip_eps: Scalar = 3e-4,
    clip_eps_high: Scalar | None = 4e-4,
    variant: str = "seq",
    agg: str = "seq-mean-token-mean",
    axis_name=None,
    weights: chex.Array | None = None,
) -> tuple[jax.Array, Stats]:
    """GSPO, Group Sequence Policy Optimization (Zheng et al. 2025): a sequence-level ratio.

    ``s_i = exp(mean over valid t of (logp_it - old_logp_it))`` (the length-normalised sequence
    likelihood ratio), clipped like PPO's token ratio:
    ``pg_it = max(-A_it * s, -A_it * clip(s, 1 - eps_low, 1 + eps_high))``, aggregated with
    ``agg`` (default "seq-mean-token-mean", the paper's ``1/G sum_i 1/|y_i| sum_t``).

    * ``variant="seq"``: ``s = s_i`` at every token of row i. With a per-sequence advantage
      broadcast over the valid tokens this is the paper's objective
      ``-1/G sum_i min(s_i A_i, clip(s_i) A_i)``; every token's gradient flows through ``s_i``.
    * ``variant="token"`` (GSPO-token): ``s_it = sg(s_i) * exp(logp_it - sg(logp_it))``, equal to
      ``s_i`` in value but with the gradient ``s_i * grad(logp_it)`` of token t alone, so per-token
      advantages ``A_it`` can be used. With ``A_it = A_i`` it gives the same loss and gradient as
      ``"seq"``.

    The paper's clip range is tiny (``eps_low = 3e-4``, ``eps_high = 4e-4``) because ``s_i`` is a
    geometric mean of token ratios; those are the defaults here.

    Args:
      logprobs_BxT: ``[B, T]`` log-probs under the policy being optimised (differentiated).
      old_logprobs_BxT: ``[B, T]`` log-probs under the rollout policy.
      advantages_BxT: ``[B, T]`` (constants), e.g. ``broadcast_over_tokens(grpo_advantages(...))``.
      mask_BxT: ``[B, T]``.
      clip_eps, clip_eps_high: ``eps_low`` and ``eps_high`` (``None`` for ``eps_high = eps_low``).
      variant: ``"seq"`` or ``"token"``.
      agg: see :func:`aggregate_loss`.
      axis_name: device axis for the batch reductions.
      weights: optional ``[B, T]`` per-token loss weights (no gradient), as in :func:`ppo_policy_loss`.

    Returns:
      ``(loss, stats)``; stats: ``pg_loss``, ``clipfrac`` (fraction of valid tokens whose
      clipped term is the larger one), ``approx_kl`` (token-level k3 as in
      :func:`ppo_policy_loss`), ``seq_ratio_mean``, ``seq_ratio_min``, ``seq_ratio_max`` (``s_i``
      over rows with at least one valid token).
    """
    chex.assert_rank([logprobs_BxT, old_logprobs_BxT, advantages_BxT, mask_BxT], 2)
    chex.assert_equal_shape([logprobs_BxT, old_logprobs_BxT, advantages_BxT, mask_BxT])
    if variant not in GSPO_VARIANTS:
        raise ValueError(f"Unknown GSPO variant {variant!r}; valid ones are {GSPO_VARIANTS}.")
    sg = jax.lax.stop_gradient
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    logprobs_BxT, old_logprobs_BxT, advantages_BxT = at_least_float32(logprobs_BxT, old_logprobs_BxT, advantages_BxT)
    advantages_BxT, old_logprobs_BxT = sg(advantages_BxT), sg(old_logprobs_BxT)

    log_seq_ratio_B = masked_mean(logprobs_BxT - old_logprobs_BxT, mask_BxT, axis=-1)  # 0 for an empty row
    if variant == "seq":
        log_ratio_BxT = jnp.broadcast_to(log_seq_ratio_B[:, None], logprobs_BxT.shape)
    else:
        log_ratio_BxT = sg(log_seq_ratio_B)[:, None] + logprobs_BxT - sg(logprobs_BxT)
    ratio_BxT = jnp.exp(log_ratio_BxT)
    pg_loss_BxT, is_clipped_BxT, _ = _clipped_surrogate(ratio_BxT, advantages_BxT, eps_low, eps_high, None)
    loss = aggregate_loss(_weighted(pg_loss_BxT, weights), mask_BxT, agg, axis_name)

    row_has_tokens_B = masked_count(mask_BxT, axis=-1) > 0
    stats = {
        "pg_loss": sg(loss),
        "clipfrac": masked_mean(is_clipped_BxT.astype(jnp.float32), mask_BxT, axis_name=axis_name),
        "approx_kl": masked_mean(sg(kl_estimate(logprobs_BxT, old_logprobs_BxT, "k3")), mask_BxT, axis_name=axis_name),
        **_ratio_stats(jnp.exp(log_seq_ratio_B)[:, None], row_has_tokens_B[:, None], axis_name, prefix="seq_"),
    }
    return loss, stats


def kl_loss(
    logprobs_BxT: chex.Array,
    ref_logprobs_BxT: chex.Array,
    mask_BxT: chex.Array,
    kind: str = "k3",
    agg: str = "token-mean",
    axis_name=None,
) -> tuple[jax.Array, Stats]:
    """KL to the reference as a loss term (GRPO's ``+ beta * KL``): ``aggregate(kl_estimate(...))``.

    ``d = ref_logprobs - logprobs`` on tokens sampled from the policy; the reference is constant.
    What matters for a loss is the gradient, and ``E_pi[grad k]`` is *not* ``grad E_pi[k]``: the
    loss differentiates through ``logp`` of fixed samples, with no score-function term. For
    on-policy samples (``pi_old = pi``), per token, with ``g = grad log pi(a)``:

    * ``k1 = -d``: gradient ``g``, and ``E_pi[g] = 0``: zero expected gradient, pure noise. (k1 is
      right as a *reward* penalty, where the policy gradient supplies the score function.)
    * ``k2 = d^2 / 2``: gradient ``(log pi - log ref) g``, whose expectation is exactly
      ``grad KL(pi || ref)``: the unbiased reverse-KL gradient (k2 is a biased estimate of the KL
      *value*, but the right loss).
    * ``k3 = e^d - d - 1``: gradient ``(1 - ref / pi) g``, whose expectation is
      ``-E_ref[g] = grad KL(ref || pi)``: the *forward* KL's gradient, a biased estimate of the
      reverse-KL gradient (they agree to first order near ``pi = ref``). This is GRPO's choice
      (DeepSeekMath) and the default, for its low variance and non-negative values.
    * ``abs = |d|``: gradient ``sign(log pi - log ref) g``, whose expectation is
      ``2 * grad TV(pi, ref)`` (total variation), not a KL gradient.

    These expectations are checked exactly on a small categorical distribution in the tests.
    Off-policy samples (``pi_old != pi``) change all of the above unless weighted by the ratio.

    Args:
      logprobs_BxT: ``[B, T]`` policy log-probs (differentiated).
      ref_logprobs_BxT: ``[B, T]`` reference log-probs (constants).
      mask_BxT: ``[B, T]``.
      kind: one of ``KL_KINDS``.
      agg: see :func:`aggregate_loss`.
      axis_name: device axis for the batch reduction.

    Returns:
      ``(loss, stats)``; stats: ``kl_loss``.
    """
    chex.assert_rank([logprobs_BxT, ref_logprobs_BxT, mask_BxT], 2)
    chex.assert_equal_shape([logprobs_BxT, ref_logprobs_BxT, mask_BxT])
    logprobs_BxT, ref_logprobs_BxT = at_least_float32(logprobs_BxT, ref_logprobs_BxT)
    kl_BxT = kl_estimate(logprobs_BxT, jax.lax.stop_gradient(ref_logprobs_BxT), kind)
    loss = aggregate_loss(kl_BxT, mask_BxT, agg, axis_name)
    return loss, {"kl_loss": jax.lax.stop_gradient(loss)}


def ppo_value_loss(
    values: chex.Array,
    old_values: chex.Array,
    returns: chex.Array,
    mask: chex.Array,
    value_clip_eps: Scalar | None = 0.2,
    axis_name=None,
) -> tuple[jax.Array, Stats]:
    """Clipped value loss.

    ``V_clip = clip(V, V_old - eps, V_old + eps)``,
    ``loss = 0.5 * token-mean(max((V - R)^2, (V_clip - R)^2))``; ``value_clip_eps=None`` drops the
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
    values_BxT, old_values_BxT, returns_BxT = at_least_float32(values, old_values, returns)
    old_values_BxT = jax.lax.stop_gradient(old_values_BxT)
    returns_BxT = jax.lax.stop_gradient(returns_BxT)
    unclipped_error_BxT = jnp.square(values_BxT - returns_BxT)
    if value_clip_eps is None:
        error_BxT = unclipped_error_BxT
        clipfrac = jnp.zeros((), jnp.float32)
    else:
        clipped_values_BxT = jnp.clip(values_BxT, old_values_BxT - value_clip_eps, old_values_BxT + value_clip_eps)
        clipped_error_BxT = jnp.square(clipped_values_BxT - returns_BxT)
        error_BxT = jnp.maximum(unclipped_error_BxT, clipped_error_BxT)
        is_clipped_BxT = (clipped_error_BxT > unclipped_error_BxT).astype(jnp.float32)
        clipfrac = masked_mean(is_clipped_BxT, mask, axis_name=axis_name)
    loss = 0.5 * masked_mean(error_BxT, mask, axis_name=axis_name)
    sg = jax.lax.stop_gradient
    stats = {
        "vf_loss": sg(loss),
        "vf_clipfrac": clipfrac,
        "value_mean": masked_mean(sg(values_BxT), mask, axis_name=axis_name),
        "value_error": masked_mean(sg(unclipped_error_BxT), mask, axis_name=axis_name),
    }
    return loss, stats


def entropy_loss(
    entropy: chex.Array, mask: chex.Array, agg: str = "token-mean", axis_name=None
) -> tuple[jax.Array, Stats]:
    """Entropy bonus as a loss to minimise: ``loss = -aggregate(H)``.

    Args:
      entropy: ``[B, T]`` per-token entropies (see :func:`entropy_from_logits`).
      mask: ``[B, T]``.

    Returns:
      ``(loss, stats)``; stats: ``entropy`` (the aggregated entropy).
    """
    aggregated_entropy = aggregate_loss(entropy, mask, agg, axis_name)
    return -aggregated_entropy, {"entropy": jax.lax.stop_gradient(aggregated_entropy)}


def reward_model_loss(chosen_scores: chex.Array, rejected_scores: chex.Array, margin=None) -> tuple[jax.Array, Stats]:
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
