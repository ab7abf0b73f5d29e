"""Offline preference losses: DPO (and conservative DPO, RPO), IPO, SimPO, KTO.

Every loss works on per-sequence log-probabilities of whole responses (see
:func:`sequence_logprobs`): ``logp(y) = sum_t logp(y_t)`` over the response's valid tokens, under
the policy and (except SimPO) the frozen reference. With

    h_w = logp(y_w) - ref_logp(y_w),   h_l = logp(y_l) - ref_logp(y_l),   d = h_w - h_l

for the chosen (``w``) and rejected (``l``) response of a pair, the implicit reward of a response
is ``beta * h`` (Rafailov et al. 2023). Every loss returns ``(loss, stats)``: the mean over the
(valid) pairs of the per-pair loss, and ``stop_gradient``-ed scalar diagnostics:

* ``chosen_reward`` / ``rejected_reward``: the mean implicit reward ``beta * h_w`` / ``beta * h_l``;
* ``reward_margin``: their difference, the mean of ``beta * d``;
* ``accuracy``: the fraction of pairs with ``h_w > h_l``; a tie counts one half (so the policy
  equal to the reference gives 0.5; TRL counts a tie as 0).

All means over the batch take ``axis_name``: under ``pmap``/``shard_map`` the sums and counts are
``psum``-ed over that axis (through :func:`jaxrlhf.core.stats.masked_mean`), so every device gets
the number one device computes on the whole batch. ``pair_mask`` (default: all ones) drops rows,
e.g. padding of a last, short batch; an all-zero ``pair_mask`` gives loss 0, never NaN.
Hyper-parameters (``beta``, ``label_smoothing``, ``gamma``, ...) may be traced arrays: nothing
branches on their values.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from jaxrlhf.core.logprobs import token_logprobs
from jaxrlhf.core.stats import at_least_float32, masked_count, masked_mean, masked_sum
from jaxrlhf.typing import Scalar

Stats = dict[str, jax.Array]

sg = jax.lax.stop_gradient


# ----------------------------------------------------------------------------- sequence log-probs


def sequence_logprobs(logprobs: chex.Array, mask: chex.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sequence sum of token log-probs over the valid (response) tokens, and the length.

    ``logp_B[b] = sum_t logprobs[b, t] * mask[b, t]``, ``length_B[b] = sum_t mask[b, t]``. Masked
    positions are ignored even if they hold NaN/inf; an all-zero row gives ``(0, 0)``.
    The length-averaged log-prob (IPO, SimPO) is ``logp_B / max(length_B, 1)``.

    Args:
      logprobs: ``[B, T]`` per-token log-probs (e.g. from :func:`token_logprobs`).
      mask: ``[B, T]``, 1 on the response tokens to score.

    Returns:
      ``(logp_B, length_B)``, both ``[B]`` (float32 or wider).
    """
    chex.assert_rank([logprobs, mask], 2)
    chex.assert_equal_shape([logprobs, mask])
    logp_B = masked_sum(logprobs, mask, axis=-1)
    length_B = masked_count(mask, axis=-1, dtype=logp_B.dtype)
    return logp_B, length_B


def sequence_logprobs_from_logits(
    logits: chex.Array, input_ids: chex.Array, response_mask: chex.Array, temperature=1.0
) -> tuple[jax.Array, jax.Array]:
    """:func:`sequence_logprobs` of the response part of prompt + response sequences.

    A causal LM's logits at position ``i`` predict token ``i + 1``, so token ``input_ids[b, i]``
    (``i >= 1``) gets ``log softmax(logits[b, i - 1] / temperature)[input_ids[b, i]]`` (via
    :func:`token_logprobs`) and counts where ``response_mask[b, i] != 0``. Position 0 has no
    prediction and is never counted (a prompt has at least one token).

    Args:
      logits: ``[B, L, V]`` logits of the whole prompt + response sequences.
      input_ids: ``[B, L]`` the token ids fed to the model.
      response_mask: ``[B, L]``, 1 on the response tokens (including the EOS), 0 on the prompt and
        padding.
      temperature: scalar; 1.0 for preference training.

    Returns:
      ``(logp_B, length_B)``, both ``[B]``.
    """
    chex.assert_rank([logits, input_ids, response_mask], [3, 2, 2])
    chex.assert_equal_shape([input_ids, response_mask])
    chex.assert_equal_shape_prefix([logits, input_ids], 2)
    next_token_logprobs_BxT = token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)
    return sequence_logprobs(next_token_logprobs_BxT, response_mask[:, 1:])


def concat_pairs(chosen: Any, rejected: Any, pad_value=0) -> Any:
    """Puts chosen and rejected in one batch: ``concat([chosen, rejected], axis=0)`` leaf by leaf.

    One forward pass over the ``[2B, ...]`` batch then scores both responses of every pair; rows
    ``[:B]`` are the chosen ones, ``[B:]`` the rejected ones (undo it with :func:`split_pairs`).
    Leaves of rank >= 2 whose second axis (time) differs are right-padded with ``pad_value`` to the
    longer one (0: a padding token id and a 0 mask).

    Args:
      chosen: a pytree of arrays with leading axis ``B``.
      rejected: a pytree of the same structure with the same leading axis ``B``.

    Returns:
      The pytree of ``[2B, ...]`` arrays.
    """

    def concat(chosen_leaf, rejected_leaf):
        chosen_leaf, rejected_leaf = jnp.asarray(chosen_leaf), jnp.asarray(rejected_leaf)
        if chosen_leaf.ndim != rejected_leaf.ndim or chosen_leaf.ndim == 0:
            raise ValueError(
                f"concat_pairs: chosen and rejected leaves need the same rank >= 1, got shapes "
                f"{chosen_leaf.shape} and {rejected_leaf.shape}."
            )
        if chosen_leaf.shape[0] != rejected_leaf.shape[0]:
            raise ValueError(
                f"concat_pairs: chosen and rejected need the same number of rows, got shapes "
                f"{chosen_leaf.shape} and {rejected_leaf.shape}."
            )
        if chosen_leaf.ndim >= 2:
            length = max(chosen_leaf.shape[1], rejected_leaf.shape[1])

            def pad(x):
                widths = [(0, 0)] * x.ndim
                widths[1] = (0, length - x.shape[1])
                return jnp.pad(x, widths, constant_values=pad_value)

            chosen_leaf, rejected_leaf = pad(chosen_leaf), pad(rejected_leaf)
        if chosen_leaf.shape[1:] != rejected_leaf.shape[1:]:
            raise ValueError(
                f"concat_pairs: chosen and rejected leaves differ beyond the time axis: "
                f"{chosen_leaf.shape} vs {rejected_leaf.shape}."
            )
        return jnp.concatenate([chosen_leaf, rejected_leaf.astype(chosen_leaf.dtype)], axis=0)

    return jax.tree.map(concat, chosen, rejected)


def split_pairs(batch: Any) -> tuple[Any, Any]:
    """Inverse of :func:`concat_pairs`: ``(x[:B], x[B:])`` for every ``[2B, ...]`` leaf."""

    def half(x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % 2:
            raise ValueError(f"split_pairs: leaves need an even leading axis (2B), got shape {x.shape}.")
        return x.shape[0] // 2

    chosen = jax.tree.map(lambda x: jnp.asarray(x)[: half(x)], batch)
    rejected = jax.tree.map(lambda x: jnp.asarray(x)[half(x) :], batch)
    return chosen, rejected


# ----------------------------------------------------------------------------- helpers


def _check_rows(names_and_arrays):
    arrays = [a for _, a in names_and_arrays]
    chex.assert_rank(arrays, 1, custom_message="per-sequence inputs must be [B] (sum log-probs first)")
    chex.assert_equal_shape(arrays, custom_message="per-sequence inputs must all be [B]")


def _pair_mask(pair_mask, like_B):
    if pair_mask is None:
        return jnp.ones_like(like_B)
    pair_mask = jnp.asarray(pair_mask)
    chex.assert_equal_shape([pair_mask, like_B], custom_message="pair_mask must be [B]")
    return pair_mask


def _rows(names_and_arrays, row_mask=None):
    """The per-sequence inputs after checking that each is ``[B]``, upcast together
    (`at_least_float32`), followed by the ``[B]`` row mask (all ones when None)."""
    _check_rows(names_and_arrays)
    arrays_B = at_least_float32(*(a for _, a in names_and_arrays))
    return (*arrays_B, _pair_mask(row_mask, arrays_B[0]))


def _length_mean(logp_B, length_B):
    return logp_B / jnp.maximum(length_B, 1)


def _pairwise_stats(loss_B, chosen_reward_B, rejected_reward_B, pair_mask_B, axis_name) -> Stats:
    """Means over the valid pairs (and devices) of the implicit rewards, margin and accuracy."""
    margin_B = chosen_reward_B - rejected_reward_B
    accuracy_B = jnp.where(margin_B > 0, 1.0, jnp.where(margin_B == 0, 0.5, 0.0)).astype(margin_B.dtype)

    def mean(x):
        return masked_mean(sg(x), pair_mask_B, axis_name=axis_name)

    return {
        "chosen_reward": mean(chosen_reward_B),
        "rejected_reward": mean(rejected_reward_B),
        "reward_margin": mean(margin_B),
        "accuracy": mean(accuracy_B),
        "pref_loss": mean(loss_B),
    }


def chosen_nll_loss(chosen_logps: chex.Array, chosen_lengths: chex.Array, pair_mask=None, axis_name=None) -> jax.Array:
    """SFT term on the chosen responses: the per-token mean negative log-likelihood.

    ``nll = -sum_b logp(y_w^b) / sum_b |y_w^b|`` over the valid pairs of the (global) batch, i.e.
    the cross-entropy averaged over every chosen token, as in RPO (Pang et al. 2024, "Iterative
    Reasoning Preference Optimization") and TRL's ``rpo_alpha``. 0 when there are no tokens.

    Args:
      chosen_logps: ``[B]`` summed policy log-probs of the chosen responses (differentiated).
      chosen_lengths: ``[B]`` their numbers of valid tokens.
      pair_mask: optional ``[B]`` row mask.
    """
    chosen_logps_B, chosen_lengths_B, pair_mask_B = _rows(
        [("chosen_logps", chosen_logps), ("chosen_lengths", chosen_lengths)], pair_mask
    )
    token_count = masked_sum(chosen_lengths_B, pair_mask_B, axis_name=axis_name)
    return -masked_sum(chosen_logps_B, pair_mask_B, axis_name=axis_name) / jnp.maximum(token_count, 1)


# ----------------------------------------------------------------------------- losses


def dpo_loss(
    chosen_logps: chex.Array,
    rejected_logps: chex.Array,
    ref_chosen_logps: chex.Array,
    ref_rejected_logps: chex.Array,
    beta: Scalar = 0.1,
    label_smoothing: Scalar = 0.0,
    rpo_alpha: Scalar | None = None,
    chosen_lengths: chex.Array | None = None,
    pair_mask: chex.Array | None = None,
    axis_name=None,
) -> tuple[jax.Array, Stats]:
    """Direct Preference Optimization (Rafailov et al. 2023), optionally conservative and with RPO.

    With ``h = logp(y) - ref_logp(y)`` (summed over the response) and ``d = h_w - h_l``:

        loss_b = -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d)

    ``e = label_smoothing = 0`` is DPO, ``-log sigmoid(beta d)``; ``0 < e < 0.5`` is conservative
    DPO (cDPO; Mitchell 2023), which assumes each label is flipped with probability ``e``. Its
    gradient is ``-beta ((1 - e) sigmoid(-beta d) - e sigmoid(beta d)) (grad h_w - grad h_l)``.
    With ``rpo_alpha`` set, ``rpo_alpha * nll`` is added, the per-token mean NLL of the chosen
    responses (:func:`chosen_nll_loss`; RPO, Pang et al. 2024); it needs ``chosen_lengths``.

    Args:
      chosen_logps, rejected_logps: ``[B]`` summed policy log-probs (differentiated).
      ref_chosen_logps, ref_rejected_logps: ``[B]`` summed reference log-probs (constants).
      beta: KL strength (the paper's default 0.1).
      label_smoothing: ``e`` in ``[0, 0.5)``.
      rpo_alpha: weight of the NLL term, or None for none (RPO uses 1.0).
      chosen_lengths: ``[B]`` number of valid chosen tokens; needed with ``rpo_alpha``.
      pair_mask: optional ``[B]``; 0 drops a pair.
      axis_name: device axis to average over under ``pmap``/``shard_map``.

    Returns:
      ``(loss, stats)``: the module docstring's stats, ``pref_loss`` (the loss without the NLL term)
      and, with ``rpo_alpha``, ``nll_loss``.
    """
    chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, pair_mask_B = _rows(
        [
            ("chosen_logps", chosen_logps),
            ("rejected_logps", rejected_logps),
            ("ref_chosen_logps", ref_chosen_logps),
            ("ref_rejected_logps", ref_rejected_logps),
        ],
        pair_mask,
    )
    chosen_logratio_B = chosen_B - sg(ref_chosen_B)  # h_w
    rejected_logratio_B = rejected_B - sg(ref_rejected_B)  # h_l
    logits_B = beta * (chosen_logratio_B - rejected_logratio_B)  # beta * d
    loss_B = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits_B) - label_smoothing * jax.nn.log_sigmoid(-logits_B)
    loss = masked_mean(loss_B, pair_mask_B, axis_name=axis_name)
    stats = _pairwise_stats(loss_B, beta * chosen_logratio_B, beta * rejected_logratio_B, pair_mask_B, axis_name)
    if rpo_alpha is not None:
        if chosen_lengths is None:
            raise ValueError("dpo_loss: rpo_alpha needs chosen_lengths (the [B] chosen token counts).")
        _check_rows([("chosen_logps", chosen_logps), ("chosen_lengths", chosen_lengths)])
        nll = chosen_nll_loss(chosen_B, chosen_lengths, pair_mask_B, axis_name=axis_name)
        loss = loss + rpo_alpha * nll
        stats["nll_loss"] = sg(nll)
    return loss, stats


def ipo_loss(
    chosen_logps: chex.Array,
    rejected_logps: chex.Array,
    ref_chosen_logps: chex.Array,
    ref_rejected_logps: chex.Array,
    chosen_lengths: chex.Array,
    rejected_lengths: chex.Array,
    beta: Scalar = 0.1,
    pair_mask: chex.Array | None = None,
    axis_name=None,
) -> tuple[jax.Array, Stats]:
    """Identity Preference Optimization (Azar et al. 2023, "A General Theoretical Paradigm ...").

    ``loss_b = (d - 1 / (2 beta))^2`` with ``d = h_w - h_l`` on length-averaged log-ratios,
    ``h = (logp(y) - ref_logp(y)) / max(|y|, 1)`` (as TRL's ``loss_type="ipo"``). The squared
    loss regresses the log-ratio gap onto ``1 / (2 beta)`` instead of pushing it to infinity.
    The implicit rewards in the stats are ``beta * h`` with these averaged ``h``.

    Args:
      chosen_logps, rejected_logps: ``[B]`` summed policy log-probs (differentiated).
      ref_chosen_logps, ref_rejected_logps: ``[B]`` summed reference log-probs (constants).
      chosen_lengths, rejected_lengths: ``[B]`` numbers of valid response tokens.
      beta: regularisation strength (tau in the paper); 0.1 as in TRL.
      pair_mask, axis_name: as in :func:`dpo_loss`.
    """
    chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, chosen_len_B, rejected_len_B, pair_mask_B = _rows(
        [
            ("chosen_logps", chosen_logps),
            ("rejected_logps", rejected_logps),
            ("ref_chosen_logps", ref_chosen_logps),
            ("ref_rejected_logps", ref_rejected_logps),
            ("chosen_lengths", chosen_lengths),
            ("rejected_lengths", rejected_lengths),
        ],
        pair_mask,
    )
    chosen_logratio_B = _length_mean(chosen_B - sg(ref_chosen_B), chosen_len_B)
    rejected_logratio_B = _length_mean(rejected_B - sg(ref_rejected_B), rejected_len_B)
    gap_B = chosen_logratio_B - rejected_logratio_B
    loss_B = jnp.square(gap_B - 1.0 / (2.0 * beta))
    loss = masked_mean(loss_B, pair_mask_B, axis_name=axis_name)
    stats = _pairwise_stats(loss_B, beta * chosen_logratio_B, beta * rejected_logratio_B, pair_mask_B, axis_name)
    return loss, stats


def simpo_loss(
    chosen_logps: chex.Array,
    rejected_logps: chex.Array,
    chosen_lengths: chex.Array,
    rejected_lengths: chex.Array,
    beta: Scalar = 2.0,
    gamma: Scalar = 1.0,
    pair_mask: chex.Array | None = None,
    axis_name=None,
) -> tuple[jax.Array, Stats]:
    """Simple Preference Optimization (Meng et al. 2024): reference-free, length-normalised.

    ``loss_b = -log sigmoid(beta * (logp(y_w) / |y_w| - logp(y_l) / |y_l|) - gamma)`` with the
    lengths floored at 1. The implicit reward of a response is ``beta * logp(y) / |y|`` (no
    reference model), and ``gamma`` is the target reward margin. The paper tunes ``beta`` in
    2.0-2.5 and ``gamma`` in about 0.3-1.6 (``gamma / beta`` near 0.5).

    Args:
      chosen_logps, rejected_logps: ``[B]`` summed policy log-probs (differentiated).
      chosen_lengths, rejected_lengths: ``[B]`` numbers of valid response tokens.
      beta: reward scale; gamma: target margin (in reward units).
      pair_mask, axis_name: as in :func:`dpo_loss`.
    """
    chosen_B, rejected_B, chosen_len_B, rejected_len_B, pair_mask_B = _rows(
        [
            ("chosen_logps", chosen_logps),
            ("rejected_logps", rejected_logps),
            ("chosen_lengths", chosen_lengths),
            ("rejected_lengths", rejected_lengths),
        ],
        pair_mask,
    )
    chosen_reward_B = beta * _length_mean(chosen_B, chosen_len_B)
    rejected_reward_B = beta * _length_mean(rejected_B, rejected_len_B)
    loss_B = -jax.nn.log_sigmoid(chosen_reward_B - rejected_reward_B - gamma)
    loss = masked_mean(loss_B, pair_mask_B, axis_name=axis_name)
    stats = _pairwise_stats(loss_B, chosen_reward_B, rejected_reward_B, pair_mask_B, axis_name)
    return loss, stats


def kto_loss(
    logps: chex.Array,
    ref_logps: chex.Array,
    desirable: chex.Array,
    kl_logps: chex.Array | None = None,
    ref_kl_logps: chex.Array | None = None,
    beta: Scalar = 0.1,
    desirable_weight: Scalar = 1.0,
    undesirable_weight: Scalar = 1.0,
    mask: chex.Array | None = None,
    kl_mask: chex.Array | None = None,
    axis_name=None,
) -> tuple[jax.Array, Stats]:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024), on unpaired labelled examples.

    Each row is one response ``y`` to a prompt ``x``, labelled desirable or undesirable, with
    ``h = logp(y) - ref_logp(y)``. The reference point is the batch estimate of
    ``KL(pi || pi_ref)``:

        z0 = stop_gradient(max(0, mean_k (kl_logps_k - ref_kl_logps_k)))

    over a "KL batch" of mismatched pairs (each prompt with another row's completion, as the paper
    and TRL do); the mean is over all devices when ``axis_name`` is set; without a KL batch
    (``kl_logps=None``) ``z0 = 0``. The per-example loss (the paper's eq. 7 as ``lambda_y - v``):

        desirable:    lambda_D * (1 - sigmoid(beta * (h - z0)))
        undesirable:  lambda_U * (1 - sigmoid(beta * (z0 - h)))

    and the loss is its mean over all (valid) examples. The paper recommends weights with
    ``lambda_D n_D / (lambda_U n_U)`` in ``[1, 4/3]``.

    Args:
      logps: ``[B]`` summed policy log-probs of the responses (differentiated).
      ref_logps: ``[B]`` summed reference log-probs.
      desirable: ``[B]`` bool (or 0/1): the label.
      kl_logps, ref_kl_logps: ``[K]`` summed policy / reference log-probs of the mismatched
        completions, or both None.
      beta: 0.1 in the paper; desirable_weight, undesirable_weight: ``lambda_D``, ``lambda_U``.
      mask: optional ``[B]`` row mask; kl_mask: optional ``[K]`` row mask of the KL batch.
      axis_name: as in :func:`dpo_loss`.

    Returns:
      ``(loss, stats)``; stats: ``chosen_reward`` / ``rejected_reward`` (mean ``beta * h`` over the
      desirable / undesirable rows; 0 when there are none), ``reward_margin`` (their difference),
      ``kl`` (``z0``), ``desirable_fraction``, ``pref_loss``. There is no pairwise accuracy: the
      examples are unpaired.
    """
    _check_rows([("logps", logps), ("ref_logps", ref_logps), ("desirable", desirable)])
    logps_B, ref_logps_B, row_mask_B = _rows([("logps", logps), ("ref_logps", ref_logps)], mask)
    desirable_B = jnp.asarray(desirable).astype(bool)
    if (kl_logps is None) != (ref_kl_logps is None):
        raise ValueError("kto_loss: pass both kl_logps and ref_kl_logps, or neither.")
    if kl_logps is None:
        z0 = jnp.zeros((), logps_B.dtype)
    else:
        kl_B, ref_kl_B, kl_mask_K = _rows([("kl_logps", kl_logps), ("ref_kl_logps", ref_kl_logps)], kl_mask)
        z0 = sg(jnp.maximum(masked_mean(kl_B - ref_kl_B, kl_mask_K, axis_name=axis_name), 0.0))
    logratio_B = logps_B - sg(ref_logps_B)  # h
    desirable_loss_B = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (logratio_B - z0)))
    undesirable_loss_B = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - logratio_B)))
    loss_B = jnp.where(desirable_B, desirable_loss_B, undesirable_loss_B)
    loss = masked_mean(loss_B, row_mask_B, axis_name=axis_name)

    reward_B = sg(beta * logratio_B)
    desirable_mask_B = row_mask_B * desirable_B
    undesirable_mask_B = row_mask_B * (~desirable_B)
    chosen_reward = masked_mean(reward_B, desirable_mask_B, axis_name=axis_name)
    rejected_reward = masked_mean(reward_B, undesirable_mask_B, axis_name=axis_name)
    stats = {
        "chosen_reward": chosen_reward,
        "rejected_reward": rejected_reward,
        "reward_margin": chosen_reward - rejected_reward,
        "kl": z0,
        "desirable_fraction": masked_mean(desirable_B.astype(logps_B.dtype), row_mask_B, axis_name=axis_name),
        "pref_loss": sg(loss),
    }
    return loss, stats
