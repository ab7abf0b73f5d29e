"""Critic-free, group-based advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++, ReMax) and DAPO pieces.

With ``num_generations = G`` the G responses to one prompt sit in consecutive rows: row ``b``
belongs to group ``b // G``, so a ``[B]`` array of scores reshapes to ``[B // G, G]``. A group
statistic reduces over those G rows only; ``group_size`` is a static (Python int) argument.

Outcome advantages give one number per response (``[B]``); :func:`broadcast_over_tokens` spreads
it over the response's valid tokens (``[B, T]``). A group whose scores are all equal gets exactly
0 (never NaN): the estimators test for it and write 0, rather than trusting ``r - mean(r)`` to
cancel in floating point.

Under ``shard_map``/``pmap`` every device must hold whole groups (its row count a multiple of G);
group statistics are then local, and only the batch-wide reductions (REINFORCE++'s whitening, the
fraction of groups with signal) take ``axis_name``.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from jaxrlhf.core.rewards import discounted_returns, kl_penalized_rewards
from jaxrlhf.core.stats import compute_dtype, masked_whiten
from jaxrlhf.typing import Scalar

GRPO_STD_EPS = 1e-6


def num_groups(batch_size: int, group_size: int, min_group_size: int = 1) -> int:
    """``batch_size // group_size``, after checking that the batch splits into whole groups.

    Raises:
      ValueError: ``group_size`` is not an int ``>= min_group_size``, or ``batch_size`` is not a
        multiple of it.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise ValueError(f"group_size must be a static Python int, got {group_size!r}.")
    if group_size < min_group_size:
        raise ValueError(
            f"group_size must be >= {min_group_size} for this estimator, got {group_size} (a group "
            "of one response has no baseline to compare it with)."
            if min_group_size > 1
            else f"group_size must be >= 1, got {group_size}."
        )
    if batch_size % group_size:
        raise ValueError(
            f"The batch of {batch_size} rows is not a whole number of groups of {group_size} "
            "(rows of one group must be consecutive: row b is in group b // group_size)."
        )
    return batch_size // group_size


def _grouped(scores_B: chex.Array, group_size: int, min_group_size: int = 1) -> jax.Array:
    """``[B] -> [B // G, G]`` in a float dtype of at least 32 bits."""
    chex.assert_rank(scores_B, 1)
    n = num_groups(scores_B.shape[0], group_size, min_group_size)
    return jnp.asarray(scores_B, compute_dtype(scores_B)).reshape(n, group_size)


def group_has_signal(scores_B: chex.Array, group_size: int) -> jax.Array:
    """``[B // G]`` bool: True where the group's scores are not all equal (``max_g != min_g``).

    A group whose G responses all scored the same (all right, all wrong) gets zero advantage from
    every group-relative estimator: it carries no learning signal (DAPO's "dynamic sampling").
    """
    scores_PxG = _grouped(scores_B, group_size)
    return jnp.max(scores_PxG, axis=-1) != jnp.min(scores_PxG, axis=-1)


def _zero_where_no_signal(advantages_PxG: jax.Array, scores_PxG: jax.Array) -> jax.Array:
    has_signal_P = jnp.max(scores_PxG, axis=-1) != jnp.min(scores_PxG, axis=-1)
    return jnp.where(has_signal_P[:, None], advantages_PxG, 0)


def drgrpo_advantages(scores_B: chex.Array, group_size: int) -> jax.Array:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): ``A_i = r_i - mean_g r``.

    GRPO without the division by the group's std (which over-weights near-uniform groups).

    Args:
      scores_B: ``[B]`` sequence scores, groups of ``group_size`` consecutive rows.
      group_size: G (static), ``>= 2``.

    Returns:
      ``[B]`` advantages; exactly 0 for a group whose scores are all equal.
    """
    scores_PxG = _grouped(scores_B, group_size, min_group_size=2)
    centered_PxG = scores_PxG - jnp.mean(scores_PxG, axis=-1, keepdims=True)
    return _zero_where_no_signal(centered_PxG, scores_PxG).reshape(-1)


def grpo_advantages(scores_B: chex.Array, group_size: int, eps: float = GRPO_STD_EPS) -> jax.Array:
    """GRPO (Shao et al. 2024, DeepSeekMath): ``A_i = (r_i - mean_g r) / (std_g r + 1e-6)``.

    ``std_g`` is the group's standard deviation with Bessel's correction (``/ (G - 1)``), as in
    ``torch.std`` (TRL, verl, OpenRLHF).

    Args:
      scores_B: ``[B]`` sequence scores, groups of ``group_size`` consecutive rows.
      group_size: G (static), ``>= 2``.
      eps: added to the std.

    Returns:
      ``[B]`` advantages; exactly 0 for a group whose scores are all equal.
    """
    scores_PxG = _grouped(scores_B, group_size, min_group_size=2)
    centered_PxG = scores_PxG - jnp.mean(scores_PxG, axis=-1, keepdims=True)
    std_Px1 = jnp.sqrt(jnp.sum(jnp.square(centered_PxG), axis=-1, keepdims=True) / (group_size - 1))
    return _zero_where_no_signal(centered_PxG / (std_Px1 + eps), scores_PxG).reshape(-1)


def rloo_advantages(scores_B: chex.Array, group_size: int) -> jax.Array:
    """RLOO (Ahmadian et al. 2024, "Back to Basics"): ``A_i = r_i - (sum_g r - r_i) / (G - 1)``.

    Each response's baseline is the mean score of the *other* G - 1 responses to its prompt; it
    equals ``G / (G - 1) * (r_i - mean_g r)``.

    Args:
      scores_B: ``[B]`` sequence scores, groups of ``group_size`` consecutive rows.
      group_size: G (static), ``>= 2``.

    Returns:
      ``[B]`` advantages; exactly 0 for a group whose scores are all equal.
    """
    scores_PxG = _grouped(scores_B, group_size, min_group_size=2)
    leave_one_out_PxG = (jnp.sum(scores_PxG, axis=-1, keepdims=True) - scores_PxG) / (group_size - 1)
    return _zero_where_no_signal(scores_PxG - leave_one_out_PxG, scores_PxG).reshape(-1)


def remax_advantages(scores_B: chex.Array, greedy_scores_P: chex.Array, group_size: int = 1) -> jax.Array:
    """ReMax (Li et al. 2023): ``A_i = r_i - r(greedy response to the same prompt)``.

    Args:
      scores_B: ``[B]`` scores of the sampled responses, groups of ``group_size`` consecutive rows
        (ReMax itself samples one response per prompt: ``group_size = 1``).
      greedy_scores_P: ``[B // group_size]`` score of the greedy (argmax-decoded) response to each
        prompt, the baseline of every sampled response to that prompt.
      group_size: G (static).

    Returns:
      ``[B]`` advantages.
    """
    scores_PxG = _grouped(scores_B, group_size)
    chex.assert_shape(greedy_scores_P, (scores_PxG.shape[0],))
    baseline_Px1 = jnp.asarray(greedy_scores_P, scores_PxG.dtype)[:, None]
    return (scores_PxG - baseline_Px1).reshape(-1)


def opo_advantages(scores_B: chex.Array, lengths_B: chex.Array, group_size: int) -> jax.Array:
    """OPO (Hao et al. 2025, "On-Policy RL with Optimal Reward Baseline"): the optimal baseline of
    a sequence-level policy gradient under its assumptions is the length-weighted group mean,
    ``A_i = s_i - sum_g(L_g s_g) / sum_g(L_g)`` (``L`` the responses' token counts; the baseline is
    0 for a group of one response, or when the group has no tokens).

    Args:
      scores_B: ``[B]`` sequence scores, groups of ``group_size`` consecutive rows.
      lengths_B: ``[B]`` response lengths (action tokens).
      group_size: G (static).

    Returns:
      ``[B]`` advantages; exactly 0 for a group (of two or more) whose scores are all equal.
    """
    scores_PxG = _grouped(scores_B, group_size)
    chex.assert_shape(lengths_B, scores_B.shape)
    lengths_PxG = jnp.asarray(lengths_B, scores_PxG.dtype).reshape(scores_PxG.shape)
    total_length_Px1 = jnp.sum(lengths_PxG, axis=-1, keepdims=True)
    baseline_Px1 = jnp.sum(lengths_PxG * scores_PxG, axis=-1, keepdims=True) / jnp.maximum(total_length_Px1, 1)
    if group_size == 1:
        return scores_PxG.reshape(-1)
    return _zero_where_no_signal(scores_PxG - baseline_Px1, scores_PxG).reshape(-1)


def gpg_advantages(scores_B: chex.Array, group_size: int, f_norm: Scalar = 1.0, axis_name=None) -> jax.Array:
    """GPG (Chu et al. 2025, "GPG: A Simple and Strong Reinforcement Learning Baseline for Model
    Reasoning"): ``A_i = alpha * (s_i - mean_g s) / F_norm`` with ``alpha = B / M``, ``M`` the
    number of non-zero scores of the whole batch (at least 1; across devices with ``axis_name``), as
    verl computes it: it rescales the gradient when many responses score 0. ``mean_g`` is 0 for a
    group of one response.

    Args:
      scores_B: ``[B]`` sequence scores, groups of ``group_size`` consecutive rows.
      group_size: G (static).
      f_norm: ``F_norm`` (scalar, may be traced).
      axis_name: device axis of the batch count.

    Returns:
      ``[B]`` advantages; exactly 0 for a group (of two or more) whose scores are all equal.
    """
    scores_PxG = _grouped(scores_B, group_size)
    nonzero = jnp.sum((scores_PxG != 0).astype(scores_PxG.dtype))
    total = jnp.asarray(scores_PxG.size, scores_PxG.dtype)
    if axis_name is not None:
        nonzero, total = jax.lax.psum(nonzero, axis_name), jax.lax.psum(total, axis_name)
    alpha = total / jnp.maximum(nonzero, 1)
    if group_size == 1:
        centered_PxG = scores_PxG
    else:
        centered_PxG = _zero_where_no_signal(scores_PxG - jnp.mean(scores_PxG, axis=-1, keepdims=True), scores_PxG)
    return (alpha * centered_PxG / jnp.asarray(f_norm, scores_PxG.dtype)).reshape(-1)


def grpo_passk_advantages(scores_B: chex.Array, group_size: int, eps: float = GRPO_STD_EPS) -> jax.Array:
    """GRPO for pass@k (Chen et al. 2025, "Pass@k Training for Adaptively Balancing Exploration and
    Exploitation", arXiv 2503.19595, as verl's ``grpo_passk``): in each group only the best response
    (the first of equal maxima) gets an advantage, ``(s_max - s_second) / (std_g s + 1e-6)``, with
    ``s_second`` the second largest score and ``std_g`` Bessel-corrected; the others get 0. It
    rewards the one response that pass@k would take.

    Args:
      scores_B: ``[B]`` sequence scores, groups of ``group_size`` consecutive rows.
      group_size: G (static), ``>= 2``.
      eps: added to the std.

    Returns:
      ``[B]`` advantages (0 everywhere in a group whose two best scores tie).
    """
    scores_PxG = _grouped(scores_B, group_size, min_group_size=2)
    top2_Px2 = jax.lax.top_k(scores_PxG, 2)[0]
    best_P = jnp.argmax(scores_PxG, axis=-1)
    centered_PxG = scores_PxG - jnp.mean(scores_PxG, axis=-1, keepdims=True)
    std_P = jnp.sqrt(jnp.sum(jnp.square(centered_PxG), axis=-1) / (group_size - 1))
    gap_P = (top2_Px2[:, 0] - top2_Px2[:, 1]) / (std_P + eps)
    is_best_PxG = jnp.arange(group_size)[None, :] == best_P[:, None]
    return jnp.where(is_best_PxG, gap_P[:, None], 0).reshape(-1)


def broadcast_over_tokens(advantages_B: chex.Array, mask_BxT: chex.Array) -> jax.Array:
    """Spread a per-sequence advantage over its valid tokens: ``A[b, t] = A[b] * (mask[b, t] != 0)``.

    Args:
      advantages_B: ``[B]``.
      mask_BxT: ``[B, T]``.

    Returns:
      ``[B, T]``, 0 at masked positions.
    """
    chex.assert_rank([advantages_B, mask_BxT], [1, 2])
    chex.assert_equal_shape_prefix([advantages_B, mask_BxT], 1)
    advantages_B = jnp.asarray(advantages_B, compute_dtype(advantages_B))
    return jnp.where(mask_BxT != 0, advantages_B[:, None], 0)


def reinforce_pp_advantages(
    scores_B: chex.Array,
    logprobs_BxT: chex.Array,
    ref_logprobs_BxT: chex.Array,
    mask_BxT: chex.Array,
    kl_coef: Scalar,
    kl_kind: str = "k1",
    gamma: Scalar = 1.0,
    baseline_group_size: int | None = None,
    axis_name=None,
) -> jax.Array:
    """REINFORCE++ (Hu 2025): whitened discounted returns of the KL-penalised step rewards.

    ``r = kl_penalized_rewards(scores, ...)`` (``-kl_coef * kl`` per token, the score on the last
    valid token), ``G_t = sum_{k >= t} gamma^(k - t) r_k``, then
    ``A = (G - mean) / sqrt(var + 1e-8)`` with the masked mean and Bessel-corrected variance over
    every valid token of the whole batch (across devices when ``axis_name`` is set).

    "REINFORCE++-baseline": with ``baseline_group_size = G`` the scores first become
    ``r_i - mean_g r`` (exactly 0 for an all-equal group), then the same.

    Args:
      scores_B: ``[B]`` sequence scores.
      logprobs_BxT: ``[B, T]`` rollout-policy log-probs.
      ref_logprobs_BxT: ``[B, T]`` reference log-probs.
      mask_BxT: ``[B, T]``.
      kl_coef: scalar beta (may be traced).
      kl_kind: KL estimator of the step reward (see :func:`jaxrlhf.core.kl.kl_estimate`).
      gamma: discount (1.0 for text).
      baseline_group_size: None for REINFORCE++, G (static, ``>= 2``) for REINFORCE++-baseline.
      axis_name: device axis for the whitening under ``pmap``/``shard_map``.

    Returns:
      ``[B, T]`` advantages, 0 at masked positions.
    """
    chex.assert_rank([scores_B, logprobs_BxT, ref_logprobs_BxT, mask_BxT], [1, 2, 2, 2])
    chex.assert_equal_shape([logprobs_BxT, ref_logprobs_BxT, mask_BxT])
    chex.assert_equal_shape_prefix([scores_B, mask_BxT], 1)
    if baseline_group_size is not None:
        scores_B = drgrpo_advantages(scores_B, baseline_group_size)
    rewards_BxT = kl_penalized_rewards(scores_B, logprobs_BxT, ref_logprobs_BxT, mask_BxT, kl_coef, kl_kind)
    returns_BxT = discounted_returns(rewards_BxT, mask_BxT, gamma)
    return masked_whiten(returns_BxT, mask_BxT, shift_mean=True, axis_name=axis_name)


# ----------------------------------------------------------------------------- DAPO pieces


def overlong_reward_shaping(lengths_B: chex.Array, max_len: Scalar, buffer: Scalar) -> jax.Array:
    """DAPO's soft overlong punishment (Yu et al. 2025), added to the score.

    With response length ``L``, limit ``L_max`` and buffer ``L_c``:
    ``0`` if ``L <= L_max - L_c``, else ``(L_max - L_c - L) / L_c``: a penalty that grows linearly
    from 0 to -1 over the last ``L_c`` tokens. Beyond ``L_max`` (which a sampler capped at
    ``max_new_tokens = L_max`` never produces) it stays at the paper's -1.

    Args:
      lengths_B: ``[B]`` response lengths (e.g. ``masked_count(mask, axis=-1)``).
      max_len: ``L_max`` (scalar, may be traced).
      buffer: ``L_c`` (scalar, may be traced), ``0 < L_c <= L_max``.

    Returns:
      ``[B]`` float penalties in ``[-1, 0]``.
    """
    chex.assert_rank(lengths_B, 1)
    if isinstance(buffer, numbers.Real) and not float(buffer) > 0:
        raise ValueError(f"The overlong buffer L_c must be > 0, got {buffer}.")
    if isinstance(buffer, numbers.Real) and isinstance(max_len, numbers.Real) and float(buffer) > float(max_len):
        raise ValueError(f"The overlong buffer L_c = {buffer} exceeds the length limit L_max = {max_len}.")
    dtype = compute_dtype(lengths_B)
    lengths_B = jnp.asarray(lengths_B, dtype)
    max_len, buffer = jnp.asarray(max_len, dtype), jnp.asarray(buffer, dtype)
    expected_len = max_len - buffer
    penalty_B = jnp.maximum((expected_len - lengths_B) / buffer, -1.0)
    return jnp.where(lengths_B <= expected_len, 0.0, penalty_B).astype(dtype)


def group_signal_fraction(scores_B: chex.Array, group_size: int, axis_name=None) -> jax.Array:
    """Fraction of groups whose scores are not all equal (a metric for dynamic sampling).

    Over every group of the batch, across devices when ``axis_name`` is set. Scalar float32.
    """
    has_signal_P = group_has_signal(scores_B, group_size).astype(jnp.float32)
    total, count = jnp.sum(has_signal_P), jnp.float32(has_signal_P.shape[0])
    if axis_name is not None:
        total, count = jax.lax.psum(total, axis_name), jax.lax.psum(count, axis_name)
    return total / jnp.maximum(count, 1)


class GroupSelection(NamedTuple):
    """The groups kept by :func:`select_groups_with_signal` (all shapes static).

    Attributes:
      group_indices_K: ``[K]`` int32 indices of the kept groups in the oversampled batch.
      row_indices_R: ``[K * G]`` int32 rows of those groups, group by group (``batch[row_indices]``).
      group_valid_K: ``[K]`` bool: the kept group has signal.
      row_valid_R: ``[K * G]`` bool, ``group_valid_K`` repeated over each group's rows: multiply
        the loss mask (or a per-row weight) by it.
      signal_fraction: scalar float32, the fraction of the *oversampled* groups with signal.
    """

    group_indices_K: jax.Array
    row_indices_R: jax.Array
    group_valid_K: jax.Array
    row_valid_R: jax.Array
    signal_fraction: jax.Array


def select_groups_with_signal(scores_B: chex.Array, group_size: int, num_keep: int) -> GroupSelection:
    """DAPO dynamic sampling under static shapes: keep the first ``num_keep`` groups with signal.

    DAPO (Yu et al. 2025) drops the groups whose scores are all equal (zero advantage, no
    gradient) and samples more prompts until a batch is full. Under ``jax.jit`` the batch size is
    fixed, so the choice here is: sample ``P > K`` groups (an oversampling factor), keep the first
    ``K`` groups with signal in batch order (a stable sort on "has no signal"; the prompts are
    already in random order, so "first" is an unbiased pick), and when fewer than K have signal,
    fill the batch with the first signal-less groups and mark them invalid in ``group_valid_K`` /
    ``row_valid_R``. The caller zeroes their weight (e.g. ``mask * row_valid[:, None]``); the
    loss aggregations divide by the valid tokens / rows that remain, so the kept groups are
    rescaled to a full batch. Their advantages are 0 anyway; masking also removes them from the
    KL and entropy terms. ``signal_fraction`` is the metric to log.

    Selection is over the groups of this array: under ``shard_map`` each device selects among its
    own groups (under GSPMD ``jit`` the array is the global batch).

    Args:
      scores_B: ``[B]`` scores of the oversampled batch, ``B = P * G``.
      group_size: G (static).
      num_keep: K (static), ``1 <= K <= P``.

    Returns:
      a :class:`GroupSelection`.
    """
    has_signal_P = group_has_signal(scores_B, group_size)
    n_groups = has_signal_P.shape[0]
    if isinstance(num_keep, bool) or not isinstance(num_keep, numbers.Integral) or not 1 <= num_keep <= n_groups:
        raise ValueError(f"num_keep must be a static int in [1, {n_groups}] (the number of groups), got {num_keep!r}.")
    order_P = jnp.argsort(jnp.logical_not(has_signal_P).astype(jnp.int32), stable=True)
    group_indices_K = order_P[:num_keep].astype(jnp.int32)
    row_indices_R = (group_indices_K[:, None] * group_size + jnp.arange(group_size, dtype=jnp.int32)).reshape(-1)
    group_valid_K = has_signal_P[group_indices_K]
    return GroupSelection(
        group_indices_K=group_indices_K,
        row_indices_R=row_indices_R,
        group_valid_K=group_valid_K,
        row_valid_R=jnp.repeat(group_valid_K, group_size),
        signal_fraction=jnp.mean(has_signal_P.astype(jnp.float32)),
    )
