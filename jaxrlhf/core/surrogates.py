"""Policy-gradient surrogates beyond PPO's clip: CISPO, Clip-Cov, KL-Cov, GMPO and SAPO.

Each takes the per-token log-probs of the policy being optimised (``logprobs``, differentiated),
of the policy the update started from (``old_logprobs``), the advantages and the (action) mask,
all ``[B, T]``, and returns ``(loss, stats)`` like `jaxrlhf.core.losses.ppo_policy_loss`. With
``r = exp(logprobs - old_logprobs)`` the token ratio:

    CISPO    -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * logp          (MiniMax-M1, 2025)
    Clip-Cov PPO's clipped loss, with a random few high-covariance tokens' gradients dropped
                                                                    (Cui et al. 2025)
    KL-Cov   -A r, plus coef * |log r| on the top-covariance tokens  (Cui et al. 2025)
    GMPO     -A_i * exp(mean_t clip_log(log r_t)): the geometric mean of token ratios
                                                                    (Zhao et al. 2025)
    SAPO     -A * 4/tau * sigmoid(tau (r - 1)): a smooth gate instead of a hard clip
                                                                    (Gao et al. 2025)

verl ships each under the same name (``cispo``, ``clip_cov``, ``kl_cov``, ``geo_mean``, ``sapo`` in
``verl/trainer/ppo/core_algos.py``); the tests compare with it on identical inputs. Like verl, the
ratios of CISPO and SAPO are computed from a log-ratio clamped to [-20, 20] (no overflow).

``weights`` (optional ``[B, T]``, no gradient) multiply the per-token losses before aggregation:
the off-policy correction weights (`jaxrlhf.core.offpolicy`). Every reduction over the batch
takes ``axis_name``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxrlhf.core.kl import kl_estimate
from jaxrlhf.core.losses import _weighted, aggregate_loss
from jaxrlhf.core.stats import at_least_float32, masked_count, masked_mean, masked_sum
from jaxrlhf.typing import Scalar

Stats = dict[str, jax.Array]
_LOG_RATIO_LIMIT = 20.0


def _prepare(logprobs, old_logprobs, advantages, mask):
    chex.assert_rank([logprobs, old_logprobs, advantages, mask], 2)
    chex.assert_equal_shape([logprobs, old_logprobs, advantages, mask])
    logprobs, old_logprobs, advantages = at_least_float32(logprobs, old_logprobs, advantages)
    sg = jax.lax.stop_gradient
    return logprobs, sg(old_logprobs), sg(advantages)


def ratio_diagnostics(logprobs, old_logprobs, mask, axis_name=None) -> Stats:
    """``approx_kl`` (k3 with d = old - new) and ``ratio_mean`` over the mask, as PPO's loss logs them."""
    sg = jax.lax.stop_gradient
    return {
        "approx_kl": masked_mean(sg(kl_estimate(logprobs, old_logprobs, "k3")), mask, axis_name=axis_name),
        "ratio_mean": masked_mean(sg(jnp.exp(logprobs - old_logprobs)), mask, axis_name=axis_name),
    }


def cispo_policy_loss(
    logprobs: chex.Array,
    old_logprobs: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    clip_eps: Scalar = 0.2,
    clip_eps_high: Scalar | None = None,
    agg: str = "token-mean",
    axis_name=None,
    weights: chex.Array | None = None,
) -> tuple[jax.Array, Stats]:
    """CISPO (MiniMax et al. 2025, "MiniMax-M1", Clipped IS-weight Policy Optimization).

    ``w = sg(clip(r, 1 - eps_low, 1 + eps_high))``, per-token loss ``-w * A * logp``: the ratio is
    clipped as an importance weight, never as a gate, so every token keeps its gradient
    ``-w * A * grad logp`` (PPO's clip zeroes the gradient of clipped tokens, often the rare
    high-information ones). The loss *value* is not an objective; its gradient is.

    Returns:
      ``(loss, stats)``; stats: ``clipfrac`` (fraction of tokens whose weight was clipped),
      ``approx_kl``, ``ratio_mean``.
    """
    logprobs, old_logprobs, advantages = _prepare(logprobs, old_logprobs, advantages, mask)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    sg = jax.lax.stop_gradient
    log_ratio = jnp.clip(logprobs - old_logprobs, -_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    ratio = sg(jnp.exp(log_ratio))
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    loss_BxT = -clipped_ratio * advantages * logprobs
    loss = aggregate_loss(_weighted(loss_BxT, weights), mask, agg, axis_name)
    stats = {
        "clipfrac": masked_mean((ratio != clipped_ratio).astype(jnp.float32), mask, axis_name=axis_name),
        **ratio_diagnostics(logprobs, old_logprobs, mask, axis_name),
    }
    return loss, stats


def _covariance(advantages, logprobs, mask, axis_name):
    """Per-token ``(A - mean A) * (logp - mean logp)`` with means over the mask (no gradient)."""
    logprobs = jax.lax.stop_gradient(logprobs)
    centered_advantages = advantages - masked_mean(advantages, mask, axis_name=axis_name)
    return centered_advantages * (logprobs - masked_mean(logprobs, mask, axis_name=axis_name))


def _rank_within(priority_BxT):
    """Rank (0 = smallest) of every entry of a ``[B, T]`` array among all of its entries."""
    flat = priority_BxT.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return (
        jnp.zeros(flat.shape, jnp.int32)
        .at[order]
        .set(jnp.arange(flat.size, dtype=jnp.int32))
        .reshape(priority_BxT.shape)
    )


def _token_budget(mask, fraction):
    """``max(floor(fraction * n_valid), 1)``: how many tokens a covariance method selects."""
    return jnp.maximum(jnp.floor(fraction * masked_count(mask)), 1.0)


def clip_cov_policy_loss(
    logprobs: chex.Array,
    old_logprobs: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    key: jax.Array,
    clip_eps: Scalar = 0.2,
    clip_eps_high: Scalar | None = None,
    clip_cov_ratio: Scalar = 2e-4,
    clip_cov_lb: Scalar = 1.0,
    clip_cov_ub: Scalar = 5.0,
    agg: str = "token-mean",
    axis_name=None,
    weights: chex.Array | None = None,
) -> tuple[jax.Array, Stats]:
    """Clip-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning
    Language Models"): PPO's clipped loss, with the gradient of a few high-covariance tokens cut.

    Entropy falls when confident tokens get positive advantages; the change of entropy tracks the
    covariance ``c_t = (A_t - mean A)(logp_t - mean logp)``. Among the tokens that PPO did not clip
    and whose ``c_t`` lies in ``(lb, ub)``, ``n = max(floor(ratio * #tokens), 1)`` are drawn at
    random (``key``) and their loss (hence gradient) is set to 0:
    ``loss_t = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) * (1 - picked_t)``.

    Returns:
      ``(loss, stats)``; stats: ``clipfrac`` (fraction of tokens picked), ``approx_kl``, ``ratio_mean``.
    """
    logprobs, old_logprobs, advantages = _prepare(logprobs, old_logprobs, advantages, mask)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    valid = mask != 0
    ratio = jnp.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    clipped_by_ppo = (clipped > unclipped) & valid
    covariance = _covariance(advantages, logprobs, mask, axis_name)
    candidate = valid & ~clipped_by_ppo & (covariance > clip_cov_lb) & (covariance < clip_cov_ub)
    # A random pick of n candidates: the n smallest of uniform priorities (non-candidates last).
    priority = jnp.where(candidate, jax.random.uniform(key, mask.shape), 2.0)
    picked = candidate & (_rank_within(priority) < _token_budget(mask, clip_cov_ratio))
    loss_BxT = jnp.maximum(unclipped, clipped) * (1.0 - picked.astype(ratio.dtype))
    loss = aggregate_loss(_weighted(loss_BxT, weights), mask, agg, axis_name)
    stats = {
        "clipfrac": masked_mean(picked.astype(jnp.float32), mask, axis_name=axis_name),
        **ratio_diagnostics(logprobs, old_logprobs, mask, axis_name),
    }
    return loss, stats


def kl_cov_policy_loss(
    logprobs: chex.Array,
    old_logprobs: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    kl_cov_ratio: Scalar = 2e-4,
    kl_cov_coef: Scalar = 0.1,
    agg: str = "token-mean",
    axis_name=None,
    weights: chex.Array | None = None,
) -> tuple[jax.Array, Stats]:
    """KL-Cov (Cui et al. 2025, same paper as Clip-Cov): no clip; a KL penalty on the tokens of
    largest covariance ``c_t = (A_t - mean A)(logp_t - mean logp)``:

    ``loss_t = -A_t r_t + coef * |logp_t - old_logp_t|`` on the ``k = max(floor(ratio * #tokens), 1)``
    tokens of largest ``c_t``, ``-A_t r_t`` elsewhere.

    Returns:
      ``(loss, stats)``; stats: ``kl_cov_fraction`` (fraction of tokens penalised), ``approx_kl``,
      ``ratio_mean``.
    """
    logprobs, old_logprobs, advantages = _prepare(logprobs, old_logprobs, advantages, mask)
    valid = mask != 0
    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    covariance = _covariance(advantages, logprobs, mask, axis_name)
    # The k largest covariances: rank of -c among the valid tokens (invalid ones ranked last).
    priority = jnp.where(valid, -covariance, jnp.inf)
    penalised = valid & (_rank_within(priority) < _token_budget(mask, kl_cov_ratio))
    loss_BxT = -advantages * ratio + jnp.where(penalised, kl_cov_coef * jnp.abs(log_ratio), 0.0)
    loss = aggregate_loss(_weighted(loss_BxT, weights), mask, agg, axis_name)
    stats = {
        "kl_cov_fraction": masked_mean(penalised.astype(jnp.float32), mask, axis_name=axis_name),
        **ratio_diagnostics(logprobs, old_logprobs, mask, axis_name),
    }
    return loss, stats


def gmpo_policy_loss(
    logprobs: chex.Array,
    old_logprobs: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    clip_eps: Scalar = 0.4,
    clip_eps_high: Scalar | None = None,
    axis_name=None,
    weights: chex.Array | None = None,
) -> tuple[jax.Array, Stats]:
    """GMPO (Zhao et al. 2025, "Geometric-Mean Policy Optimization"): the sequence ratio is the
    geometric mean of token ratios, each clipped in log space on the side its advantage sign makes
    pessimistic:

    ``l_t = log r_t``, ``l'_t = sign(A_t) * min(sign(A_t) l_t, sign(A_t) clip(l_t, -eps_low, eps_high))``,
    ``s_i = exp(mean_t l'_t)``, ``A_i = mean_t A_t``, ``loss = mean_i(-A_i s_i)`` over responses with
    at least one token (verl averages over every row; an empty row adds 0 there but counts).

    The paper clips ``r`` to ``(e^-0.4, e^0.4)``: ``clip_eps = 0.4``. ``weights`` enter per
    sequence as their geometric mean, as verl does.

    Returns:
      ``(loss, stats)``; stats: ``clipfrac`` (tokens clipped with A > 0), ``clipfrac_lower``
      (with A < 0), ``approx_kl``, ``ratio_mean`` (the sequence ratio's mean).
    """
    logprobs, old_logprobs, advantages = _prepare(logprobs, old_logprobs, advantages, mask)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    valid = mask != 0
    log_ratio = logprobs - old_logprobs
    clipped_log_ratio = jnp.clip(log_ratio, -clip_eps, eps_high)
    sign = jnp.sign(advantages)
    pessimistic = sign * jnp.minimum(sign * log_ratio, sign * clipped_log_ratio)
    seq_ratio_B = jnp.exp(jnp.where(valid, pessimistic, 0.0).sum(-1) / jnp.maximum(masked_count(mask, axis=-1), 1))
    seq_advantage_B = masked_sum(advantages, mask, axis=-1) / jnp.maximum(masked_count(mask, axis=-1), 1)
    seq_loss_B = -seq_advantage_B * seq_ratio_B
    if weights is not None:
        log_weights = jnp.log(jax.lax.stop_gradient(weights) + 1e-10)
        seq_loss_B = seq_loss_B * jnp.exp(
            masked_sum(log_weights, mask, axis=-1) / jnp.maximum(masked_count(mask, axis=-1), 1)
        )
    has_tokens_B = masked_count(mask, axis=-1) > 0
    loss = masked_mean(seq_loss_B, has_tokens_B, axis_name=axis_name)
    was_clipped = (log_ratio != clipped_log_ratio).astype(jnp.float32)
    sg = jax.lax.stop_gradient
    stats = {
        "clipfrac": masked_mean(was_clipped * (advantages > 0), mask, axis_name=axis_name),
        "clipfrac_lower": masked_mean(was_clipped * (advantages < 0), mask, axis_name=axis_name),
        "approx_kl": masked_mean(sg(kl_estimate(logprobs, old_logprobs, "k3")), mask, axis_name=axis_name),
        "ratio_mean": masked_mean(sg(seq_ratio_B), has_tokens_B, axis_name=axis_name),
    }
    return loss, stats


def sapo_policy_loss(
    logprobs: chex.Array,
    old_logprobs: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    tau_pos: Scalar = 1.0,
    tau_neg: Scalar = 1.05,
    agg: str = "seq-mean-token-mean",
    axis_name=None,
    weights: chex.Array | None = None,
) -> tuple[jax.Array, Stats]:
    """SAPO (Gao et al. 2025, "Soft Adaptive Policy Optimization", arXiv 2511.20347): a smooth,
    temperature-controlled gate replaces the hard clip.

    ``f(r) = sigmoid(tau (r - 1)) * 4 / tau`` with ``tau = tau_pos`` where ``A > 0`` and ``tau_neg``
    otherwise; per-token loss ``-f(r) * A``. At ``r = 1`` the gradient equals PPO's (``f'(1) = 1``);
    away from 1 it decays smoothly instead of vanishing at the clip edge, and a larger ``tau_neg``
    damps negative-advantage tokens faster. The paper aggregates "seq-mean-token-mean" (the default
    here; verl forces it).

    Returns:
      ``(loss, stats)``; stats: ``approx_kl``, ``ratio_mean``.
    """
    logprobs, old_logprobs, advantages = _prepare(logprobs, old_logprobs, advantages, mask)
    ratio = jnp.exp(jnp.clip(logprobs - old_logprobs, -_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT))
    tau = jnp.where(advantages > 0, tau_pos, tau_neg)
    gate = jax.nn.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    loss_BxT = -gate * advantages
    loss = aggregate_loss(_weighted(loss_BxT, weights), mask, agg, axis_name)
    return loss, ratio_diagnostics(logprobs, old_logprobs, mask, axis_name)
