"""Off-policy corrections: when the policy that sampled the tokens is not the one the trainer has.

Three policies take part in an update (Hilton et al. 2022, "Batch size-invariance for policy
optimization"; AReaL, Fu et al. 2025; docs/offpolicy.md):

* the **behaviour** policy ``mu``: what the sampler computed when it drew a token
  (``behaviour_logprobs``; possibly bf16 parameters, an older parameter version, another engine);
* the **proximal** policy ``pi_old``: the trainer's recomputation of the same tokens with the
  parameters the update starts from (``old_logprobs``); PPO's ratio and clip are taken against it;
* the **current** policy ``pi_theta`` being optimised (``logprobs``).

The PPO ratio is ``r_t = exp(logprobs_t - old_logprobs_t)``; the *correction weight* is

    w_t = pi_old(a_t) / mu(a_t) = exp(old_logprobs_t - behaviour_logprobs_t),   log w_t = old - behaviour,

at three *levels* over a row's action tokens ``A`` (``mask != 0``; not necessarily a prefix: in a
multi-turn episode only the policy's own tokens count):

* ``"token"``:     ``w_t``;
* ``"sequence"``:  ``W = exp(sum_{t in A} log w_t)`` (the importance weight of the whole response);
* ``"geometric"``: ``G = exp(mean_{t in A} log w_t)`` (its length-normalised geometric mean).

A correction turns these into per-token *loss weights* that multiply the per-token policy loss
(a weight is a constant of the loss: no gradient flows through it):

* truncated IS (TIS), ``min(w, C)``;
* masking outside a band ``[lo, hi]`` (IcePop-style): weight 0, the token stays in the mask;
* rejection of tokens or whole sequences whose sampler/trainer mismatch (a K1/K2/K3 KL estimate)
  exceeds a threshold: they leave the mask.

`apply_rollout_correction` applies a `RolloutCorrection` (static: which parts are on; the numbers
``is_cap``, ``mask_low``, ``mask_high``, ``reject_threshold`` are data) and returns the weights,
the possibly reduced mask and the mismatch statistics. With ``behaviour == old`` every correction
is the identity: weights exactly 1 on the action tokens, mask unchanged.

Batch reductions (only in the statistics; weights and masks are per row) take ``axis_name`` and
``lax.psum`` over it, so a device holding part of the batch reports the whole batch's numbers.
Every function gives finite results for all-zero mask rows.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp

from jaxrlhf.core.kl import kl_estimate
from jaxrlhf.core.losses import ppo_policy_loss
from jaxrlhf.core.stats import at_least_float32, masked_count, masked_mean, masked_sum
from jaxrlhf.typing import Scalar

CORRECTION_LEVELS = ("token", "sequence", "geometric")
MISMATCH_KINDS = ("k1", "k2", "k3")
REJECTION_AGGS = ("token", "sum", "mean", "max")
CAP_MODES = ("mask", "truncate")

Stats = dict[str, jax.Array]
sg = jax.lax.stop_gradient


def _check_level(level, name="level"):
    if level not in CORRECTION_LEVELS:
        raise ValueError(f"Unknown {name} {level!r}; valid ones are {CORRECTION_LEVELS}.")


def _check_inputs(mask, *logprobs):
    chex.assert_rank([*logprobs, mask], 2)
    chex.assert_equal_shape([*logprobs, mask])


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _reduced(mask, keep_BxT):
    """``mask`` where ``keep``, 0 elsewhere, in ``mask``'s own dtype (bool, int or float)."""
    mask = jnp.asarray(mask)
    return jnp.where(keep_BxT, mask, jnp.zeros_like(mask))


def _token_max(x_BxT, mask, axis_name):
    """The largest ``x`` over the action tokens of the (global) batch; 0 when there are none."""
    largest = jnp.max(jnp.where(jnp.asarray(mask) != 0, x_BxT, -jnp.inf))
    if axis_name is not None:
        largest = jax.lax.pmax(largest, axis_name)
    return jnp.where(masked_count(mask, axis_name=axis_name) > 0, largest, 0.0)


def log_correction_weights(
    old_logprobs: chex.Array, behaviour_logprobs: chex.Array, mask: chex.Array, level: str = "token"
) -> jax.Array:
    """``log w`` at ``level``, per token ``[B, T]`` (a constant: no gradient).

    ``log w_t = old_logprobs_t - behaviour_logprobs_t`` on action tokens;
    ``"sequence"``: ``sum_{t in A} log w_t`` and ``"geometric"``: ``mean_{t in A} log w_t``, both
    broadcast over the row (0 for an all-zero row). Values at non-action tokens are ignored (even
    NaN); the token level returns 0 there.
    """
    _check_inputs(mask, old_logprobs, behaviour_logprobs)
    _check_level(level)
    old_BxT, behaviour_BxT = at_least_float32(old_logprobs, behaviour_logprobs)
    log_w_BxT = jnp.where(jnp.asarray(mask) != 0, sg(old_BxT - behaviour_BxT), 0.0)
    if level == "token":
        return log_w_BxT
    if level == "sequence":
        row_B = jnp.sum(log_w_BxT, axis=-1)
    else:
        row_B = masked_mean(log_w_BxT, mask, axis=-1)
    return jnp.broadcast_to(row_B[:, None], log_w_BxT.shape)


def correction_weights(
    old_logprobs: chex.Array, behaviour_logprobs: chex.Array, mask: chex.Array, level: str = "token"
) -> jax.Array:
    """The correction weight ``w = pi_old / mu`` at ``level``, ``[B, T]``, 0 at non-action tokens.

    ``"token"``: ``w_t = exp(old_t - behaviour_t)``; ``"sequence"``:
    ``W = exp(sum_{t in A} log w_t)``; ``"geometric"``: ``G = exp(mean_{t in A} log w_t)``
    (:func:`log_correction_weights`). Unbounded: a long sequence's ``W`` overflows to ``inf`` where
    ``sum log w > 88``; truncate or mask it (:func:`truncated_correction_weights`,
    :func:`correction_band_mask`).
    """
    log_w_BxT = log_correction_weights(old_logprobs, behaviour_logprobs, mask, level)
    return jnp.where(jnp.asarray(mask) != 0, jnp.exp(log_w_BxT), 0.0)


def truncated_correction_weights(
    old_logprobs: chex.Array,
    behaviour_logprobs: chex.Array,
    mask: chex.Array,
    cap: Scalar,
    level: str = "token",
) -> jax.Array:
    """Truncated importance sampling (TIS): ``min(w, C)`` at ``level``, 0 at non-action tokens.

    Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"
    (token level, ``C = 2``); verl ``rollout_is: token|sequence`` with a single
    ``rollout_is_threshold``; OpenRLHF ``is_correction_mode=clip``; TRL
    ``vllm_importance_sampling_mode=token_truncate|sequence_truncate``. Used as a loss weight: it
    bounds the variance a rare token the trainer likes much more than the sampler could add; a
    constant, no gradient.
    """
    w_BxT = correction_weights(old_logprobs, behaviour_logprobs, mask, level)
    return jnp.minimum(w_BxT, cap)  # 0 stays 0 at non-action tokens (C > 0)


def correction_band_mask(
    old_logprobs: chex.Array,
    behaviour_logprobs: chex.Array,
    mask: chex.Array,
    low: Scalar,
    high: Scalar,
    level: str = "token",
) -> jax.Array:
    """``mask`` with the tokens whose weight at ``level`` lies outside ``[low, high]`` set to 0.

    ``keep_t = [low <= w <= high]`` with ``w`` the token weight (IcePop: Ling Team 2025, "Every
    Step Evolves: Scaling RL for Trillion-Scale Thinking Model"; OpenRLHF ``icepop``; TRL
    ``token_mask``), the sequence weight ``W`` (TRL ``sequence_mask``, its default; verl
    ``rollout_is: sequence`` with ``"lo_hi"``) or the geometric mean ``G`` (OpenRLHF
    ``seq-mask-tis``; AReaL's sequence-level ratio filter): at the sequence levels a row is kept or
    dropped whole. Returned in ``mask``'s dtype. `apply_rollout_correction` uses it as a *weight*
    of 0 (the token stays in the loss's denominator, as IcePop, TRL and OpenRLHF do).
    """
    w_BxT = correction_weights(old_logprobs, behaviour_logprobs, mask, level)
    return _reduced(mask, (jnp.asarray(mask) != 0) & (w_BxT >= low) & (w_BxT <= high))


def _row_statistic(per_token_BxT, mask, agg):
    """``per_token`` reduced over each row's action tokens by ``agg`` (sum, mean or max; an
    all-zero row gives 0), broadcast back to ``[B, T]``; ``"token"`` returns it as is."""
    if agg == "token":
        return per_token_BxT
    if agg == "sum":
        row_B = masked_sum(per_token_BxT, mask, axis=-1)
    elif agg == "mean":
        row_B = masked_mean(per_token_BxT, mask, axis=-1)
    else:
        valid_BxT = jnp.asarray(mask) != 0
        row_B = jnp.max(jnp.where(valid_BxT, per_token_BxT, -jnp.inf), axis=-1)
        row_B = jnp.where(jnp.any(valid_BxT, axis=-1), row_B, 0.0)
    return jnp.broadcast_to(row_B[:, None], per_token_BxT.shape)


def _check_rejection(kind, agg):
    if kind not in MISMATCH_KINDS:
        raise ValueError(f"Unknown mismatch kind {kind!r}; valid ones are {MISMATCH_KINDS}.")
    if agg not in REJECTION_AGGS:
        raise ValueError(f"Unknown rejection aggregation {agg!r}; valid ones are {REJECTION_AGGS}.")
    if kind == "k1" and agg == "max":
        raise ValueError("Rejection by 'k1' takes agg 'token', 'sum' or 'mean' (k1 is signed; max needs k2 or k3).")


def mismatch_rejection_mask(
    old_logprobs: chex.Array,
    behaviour_logprobs: chex.Array,
    mask: chex.Array,
    threshold: Scalar,
    kind: str = "k3",
    agg: str = "mean",
) -> jax.Array:
    """``mask`` without the tokens (``agg="token"``) or whole rows whose mismatch exceeds ``threshold``.

    Per token, with ``d = log w_t = old_t - behaviour_t`` (:func:`jaxrlhf.core.kl_estimate` of
    ``KL(mu || pi_old)`` on tokens sampled from ``mu``; Schulman 2020): ``k1 = -d``,
    ``k2 = d^2 / 2``, ``k3 = e^d - d - 1``. Per row, ``agg`` reduces over the action tokens:
    ``"sum"``, ``"mean"`` or ``"max"`` (k2/k3 only); ``"token"`` judges each token alone. Kept where
    ``stat <= threshold`` (k2, k3: non-negative) or ``|stat| <= threshold`` (k1, signed: a band
    ``exp(-threshold) <= W or G <= exp(threshold)`` on the sequence or geometric weight).

    verl ``rollout_rs`` (``token_k*``, ``seq_sum_k*``, ``seq_mean_k*``, ``seq_max_k2|k3``; Liu,
    Li, Fu et al. 2025, "When Speed Kills Stability: Demystifying RL Collapse from the
    Training-Inference Mismatch"): its Geo-RS is ``k1``/``"mean"``, its K3-RS ``k3``/``"mean"``.
    Rejected tokens leave the mask (they are no longer part of the batch). Returned in ``mask``'s
    dtype.
    """
    _check_rejection(kind, agg)
    log_w_BxT = log_correction_weights(old_logprobs, behaviour_logprobs, mask)
    # kl_estimate(logprobs=behaviour, ref=old): d = old - behaviour = log w.
    per_token_BxT = kl_estimate(jnp.zeros_like(log_w_BxT), log_w_BxT, kind)
    stat_BxT = _row_statistic(per_token_BxT, mask, agg)
    if kind == "k1":
        stat_BxT = jnp.abs(stat_BxT)
    return _reduced(mask, (jnp.asarray(mask) != 0) & (stat_BxT <= threshold))


def off_policy_sequence_mask(
    logprobs: chex.Array,
    behaviour_logprobs: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    threshold: Scalar,
) -> jax.Array:
    """Off-policy sequence masking (OPSM; DeepSeek-AI 2025, "DeepSeek-V3.2", eq. 9; TRL
    ``off_policy_mask_threshold``): drop a row with a negative advantage whose mean
    ``k1 = behaviour - logprobs`` over its action tokens exceeds ``threshold``.

    ``keep_t = [A_t >= 0] or [mean_{s in A} (behaviour_s - logprobs_s) <= threshold]``: a sample
    the policy has moved far from is only kept when it teaches the policy to do *more* of
    something. Unlike the other corrections it reads the *current* log-probs (as constants), so it
    belongs inside the loss. Returned in ``mask``'s dtype.
    """
    _check_inputs(mask, logprobs, behaviour_logprobs, advantages)
    logprobs_BxT, behaviour_BxT = at_least_float32(sg(logprobs), sg(behaviour_logprobs))
    mean_k1_BxT = _row_statistic(behaviour_BxT - logprobs_BxT, mask, "mean")
    keep_BxT = (jnp.asarray(mask) != 0) & ((sg(advantages) >= 0) | (mean_k1_BxT <= threshold))
    return _reduced(mask, keep_BxT)


def mismatch_metrics(
    old_logprobs: chex.Array, behaviour_logprobs: chex.Array, mask: chex.Array, axis_name=None
) -> Stats:
    """How far the sampler is from the trainer, over the action tokens of the (global) batch.

    With ``d = log w_t = old_t - behaviour_t``:

    * ``mismatch_k1``: token mean of ``-d`` (``KL(mu || pi_old)``, unbiased; verl ``kl``, OpenRLHF
      ``vllm_kl``);
    * ``mismatch_k3``: token mean of ``e^d - d - 1`` (same KL, low variance; verl ``k3_kl``);
    * ``mismatch_abs_mean``, ``mismatch_abs_max``: mean and max of ``|d|`` (TRL
      ``sampling/sampling_logp_difference``);
    * ``mismatch_log_ppl_diff``: mean over rows with tokens of
      ``mean_t behaviour_t - mean_t old_t`` (verl ``log_ppl_diff``);
    * ``mismatch_chi2``: token mean of ``w^2`` minus 1, the chi-square divergence that sets the
      token-level IS variance (verl ``chi2_token``).

    All 0 for an all-zero mask; scalars, without gradient.
    """
    _check_inputs(mask, old_logprobs, behaviour_logprobs)
    old_BxT, behaviour_BxT = at_least_float32(sg(old_logprobs), sg(behaviour_logprobs))
    log_w_BxT = log_correction_weights(old_BxT, behaviour_BxT, mask)
    zeros_BxT = jnp.zeros_like(log_w_BxT)
    token_mean = lambda x: masked_mean(x, mask, axis_name=axis_name)  # noqa: E731
    any_valid = masked_count(mask, axis_name=axis_name) > 0
    row_log_ppl_diff_B = masked_mean(behaviour_BxT, mask, axis=-1) - masked_mean(old_BxT, mask, axis=-1)
    row_has_tokens_B = masked_count(mask, axis=-1) > 0
    return {
        "mismatch_k1": token_mean(kl_estimate(zeros_BxT, log_w_BxT, "k1")),
        "mismatch_k3": token_mean(kl_estimate(zeros_BxT, log_w_BxT, "k3")),
        "mismatch_abs_mean": token_mean(jnp.abs(log_w_BxT)),
        "mismatch_abs_max": _token_max(jnp.abs(log_w_BxT), mask, axis_name),
        "mismatch_log_ppl_diff": masked_mean(row_log_ppl_diff_B, row_has_tokens_B, axis_name=axis_name),
        "mismatch_chi2": jnp.where(any_valid, token_mean(jnp.exp(2.0 * log_w_BxT)) - 1.0, 0.0),
    }


@dataclasses.dataclass(frozen=True)
class RolloutCorrection:
    """Which rollout correction to apply: static settings (they choose the code, not numbers).

    Three parts, each optional, applied together by `apply_rollout_correction`:

    * ``weight``: the level (``"token"``, ``"sequence"``, ``"geometric"``) of the importance
      weight the surviving tokens carry into the loss; None: weight 1 (filtering only).
      ``truncate``: the weight becomes ``min(w, is_cap)`` (TIS).
    * ``mask``: the level whose weight must lie in ``[mask_low, mask_high]``; outside, the token's
      (or the row's) weight is 0 (IcePop-style; the token stays in the mask).
    * ``reject``: ``"k1"``, ``"k2"`` or ``"k3"``: tokens or rows whose mismatch, reduced by
      ``reject_agg`` (``"token"``, ``"sum"``, ``"mean"``, ``"max"``), exceeds
      ``reject_threshold`` leave the mask (:func:`mismatch_rejection_mask`).

    The numbers (``is_cap``, ``mask_low``, ``mask_high``, ``reject_threshold``) are arguments of
    `apply_rollout_correction`: data, which a trainer keeps in its state's hyper-parameters.
    Named presets: `ROLLOUT_CORRECTIONS`.
    """

    weight: str | None = "token"
    truncate: bool = True
    mask: str | None = None
    reject: str | None = None
    reject_agg: str = "mean"

    def __post_init__(self):
        if self.weight is not None:
            _check_level(self.weight, "weight level")
        if self.mask is not None:
            _check_level(self.mask, "mask level")
        _check_rejection(self.reject or "k3", self.reject_agg)


ROLLOUT_CORRECTIONS: dict[str, RolloutCorrection] = {
    # Token TIS (Yao et al. 2025): verl decoupled_token_is, OpenRLHF TIS, TRL token_truncate.
    "tis": RolloutCorrection(weight="token"),
    # Sequence TIS: verl decoupled_seq_is, TRL sequence_truncate.
    "seq-tis": RolloutCorrection(weight="sequence"),
    # IcePop (Ling Team 2025): verl decoupled_token_icepop, OpenRLHF ICEPOP, TRL token_mask.
    "icepop": RolloutCorrection(weight="token", truncate=False, mask="token"),
    # Sequence-level masked IS: TRL sequence_mask (its default), verl rollout_is=sequence "lo_hi".
    "seq-mask": RolloutCorrection(weight="sequence", truncate=False, mask="sequence"),
    # Token weights kept, rows gated by their geometric mean: OpenRLHF seq-mask-tis.
    "seq-mask-tis": RolloutCorrection(weight="token", truncate=False, mask="geometric"),
    # Rejection only: verl decoupled_geo_rs (|mean k1| = |log G|) and decoupled_k3_rs.
    "geo-rs": RolloutCorrection(weight=None, reject="k1", reject_agg="mean"),
    "k3-rs": RolloutCorrection(weight=None, reject="k3", reject_agg="mean"),
    # K3 rejection of rows plus token TIS: verl decoupled_k3_rs_token_tis.
    "k3-rs-tis": RolloutCorrection(weight="token", reject="k3", reject_agg="mean"),
}


def rollout_correction(correction: RolloutCorrection | str) -> RolloutCorrection:
    """``correction`` itself, or the preset of that name in `ROLLOUT_CORRECTIONS`."""
    if isinstance(correction, RolloutCorrection):
        return correction
    if correction not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"Unknown rollout correction {correction!r}; the named ones are {tuple(ROLLOUT_CORRECTIONS)}.")
    return ROLLOUT_CORRECTIONS[correction]


def _check_numbers(is_cap, mask_low, mask_high, reject_threshold):
    """Concrete numbers are checked (traced ones cannot be): each keeps ``behaviour == old`` the
    identity, i.e. accepts ``w = 1`` and a mismatch of 0."""
    if _is_number(is_cap) and not is_cap >= 1:
        raise ValueError(f"is_cap must be >= 1 (below 1 it down-weights tokens both policies agree on), got {is_cap}.")
    if _is_number(mask_low) and not 0 <= mask_low <= 1:
        raise ValueError(f"mask_low must be in [0, 1], got {mask_low}.")
    if _is_number(mask_high) and not mask_high >= 1:
        raise ValueError(f"mask_high must be >= 1, got {mask_high}.")
    if _is_number(reject_threshold) and not reject_threshold >= 0:
        raise ValueError(f"reject_threshold must be >= 0, got {reject_threshold}.")


def apply_rollout_correction(
    old_logprobs: chex.Array,
    behaviour_logprobs: chex.Array,
    mask: chex.Array,
    correction: RolloutCorrection | str,
    is_cap: Scalar = 2.0,
    mask_low: Scalar = 0.5,
    mask_high: Scalar = 5.0,
    reject_threshold: Scalar = 0.01,
    axis_name=None,
) -> tuple[jax.Array, jax.Array, Stats]:
    """Loss weights, mask and statistics of a rollout correction (see `RolloutCorrection`).

    ``weight_t = v_t * [band] * [kept]`` on the returned mask's tokens, 0 elsewhere, where
    ``v_t`` is the ``correction.weight`` level's ``w`` (``min(w, is_cap)`` if ``truncate``; 1 if
    the level is None), ``[band]`` is ``mask_low <= w <= mask_high`` at the ``correction.mask``
    level, and ``[kept]`` is :func:`mismatch_rejection_mask` with ``reject_threshold``. The caller
    multiplies its per-token policy loss by the weights (``ppo_policy_loss(..., weights=)``)
    and aggregates over the returned mask: band-masked tokens add 0 but still count (IcePop),
    rejected tokens are gone (verl's rejection sampling); with ``mask`` instead the rejected
    tokens would count as zeros.

    With ``behaviour_logprobs == old_logprobs`` the weights are exactly 1 on every action token
    and the mask is returned unchanged, so the loss equals the uncorrected one bit for bit.

    Args:
      old_logprobs: ``[B, T]`` the trainer's log-probs of the sampled tokens (proximal policy).
      behaviour_logprobs: ``[B, T]`` the sampler's log-probs of the same tokens (any float dtype).
      mask: ``[B, T]`` action mask (1 on the policy's tokens; need not be a prefix).
      correction: a `RolloutCorrection` or the name of one in `ROLLOUT_CORRECTIONS`.
      is_cap: ``C`` of TIS (>= 1); mask_low, mask_high: the band (``lo <= 1 <= hi``);
        reject_threshold: the rejection threshold (>= 0). Numbers, possibly traced.
      axis_name: device axis of the batch, for the statistics.

    Returns:
      ``(weights [B, T] float32 without gradient, mask [B, T] in mask's dtype, stats)``; stats are
      :func:`mismatch_metrics` and, over the action tokens of the input mask: ``is_weight_mean``,
      ``is_weight_min``, ``is_weight_max`` (of the returned weights; verl ``rollout_is_mean``,
      TRL ``importance_sampling_ratio``), ``is_ess`` (effective sample size per token,
      ``(sum w)^2 / (n sum w^2)``; verl ``rollout_is_eff_sample_size``), ``is_clipfrac`` (fraction
      truncated), ``is_maskfrac`` (fraction outside the band; verl ``rollout_is_oob_ratio``),
      ``reject_frac`` (fraction rejected; verl ``rollout_rs_masked_fraction``), and over rows
      with tokens ``is_mask_seqfrac`` and ``reject_seqfrac`` (rows that lost at least one token
      to the band, to rejection; OpenRLHF's sequence ``is_filter_ratio``, verl
      ``rollout_rs_seq_masked_fraction``).
    """
    _check_inputs(mask, old_logprobs, behaviour_logprobs)
    correction = rollout_correction(correction)
    _check_numbers(is_cap, mask_low, mask_high, reject_threshold)
    valid_BxT = jnp.asarray(mask) != 0
    no_BxT = jnp.zeros_like(valid_BxT)

    if correction.weight is None:
        weights_BxT, clipped_BxT = jnp.ones(valid_BxT.shape, jnp.float32), no_BxT
    else:
        raw_BxT = correction_weights(old_logprobs, behaviour_logprobs, mask, correction.weight)
        weights_BxT = jnp.minimum(raw_BxT, is_cap) if correction.truncate else raw_BxT
        clipped_BxT = valid_BxT & (raw_BxT > is_cap) if correction.truncate else no_BxT
    if correction.mask is None:
        band_out_BxT = no_BxT
    else:
        band = correction_band_mask(old_logprobs, behaviour_logprobs, mask, mask_low, mask_high, correction.mask)
        band_out_BxT = valid_BxT & (band == 0)
    if correction.reject is None:
        mask_out = jnp.asarray(mask)
    else:
        mask_out = mismatch_rejection_mask(
            old_logprobs, behaviour_logprobs, mask, reject_threshold, correction.reject, correction.reject_agg
        )
    rejected_BxT = valid_BxT & (mask_out == 0)
    # where, not a product: an overflowed (inf) weight outside the band or mask gives 0, not NaN.
    weights_BxT = sg(jnp.where(valid_BxT & ~band_out_BxT & ~rejected_BxT, weights_BxT, 0.0))

    token_frac = lambda x: masked_mean(x.astype(jnp.float32), mask, axis_name=axis_name)  # noqa: E731
    row_has_tokens_B = masked_count(mask, axis=-1) > 0
    row_frac = lambda x: masked_mean(jnp.any(x, axis=-1).astype(jnp.float32), row_has_tokens_B, axis_name=axis_name)  # noqa: E731
    weight_sum = masked_sum(weights_BxT, mask, axis_name=axis_name)
    weight_sq_sum = masked_sum(jnp.square(weights_BxT), mask, axis_name=axis_name)
    count = masked_count(mask, axis_name=axis_name)
    stats = {
        **mismatch_metrics(old_logprobs, behaviour_logprobs, mask, axis_name),
        "is_weight_mean": token_frac(weights_BxT),
        "is_weight_min": -_token_max(-weights_BxT, mask, axis_name),
        "is_weight_max": _token_max(weights_BxT, mask, axis_name),
        "is_ess": jnp.where(weight_sq_sum > 0, jnp.square(weight_sum) / (jnp.maximum(count, 1) * weight_sq_sum), 0.0),
        "is_clipfrac": token_frac(clipped_BxT),
        "is_maskfrac": token_frac(band_out_BxT),
        "is_mask_seqfrac": row_frac(band_out_BxT),
        "reject_frac": token_frac(rejected_BxT),
        "reject_seqfrac": row_frac(rejected_BxT),
    }
    return weights_BxT, mask_out, stats


def decoupled_ppo_policy_loss(
    logprobs: chex.Array,
    old_logprobs: chex.Array,
    behaviour_logprobs: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    clip_eps: Scalar = 0.2,
    clip_eps_high: Scalar | None = None,
    behaviour_weight_cap: Scalar | None = None,
    cap_mode: str = "mask",
    agg: str = "token-mean",
    axis_name=None,
    dual_clip=None,
) -> tuple[jax.Array, Stats]:
    """Decoupled PPO (Hilton et al. 2022; AReaL, Fu et al. 2025, "AReaL: A Large-Scale Asynchronous
    Reinforcement Learning System for Language Reasoning"): the clip is taken against the
    proximal policy, the off-policyness of the sampler is corrected by an importance weight.

    ``u_t = exp(logprobs_t - old_logprobs_t)`` (current / proximal),
    ``w_t = exp(old_logprobs_t - behaviour_logprobs_t)`` (proximal / behaviour, no gradient),
    ``pg_t = w_t * max(-A_t u_t, -A_t clip(u_t, 1 - eps_low, 1 + eps_high))`` (dual clip as in
    :func:`ppo_policy_loss`), aggregated over ``mask`` by ``agg``. ``behaviour_weight_cap = c``:
    ``cap_mode="mask"`` gives tokens with ``w_t > c`` a weight of 0 (AReaL's
    ``behav_imp_weight_cap``; they stay in the denominator), ``"truncate"`` uses ``min(w_t, c)``.
    With ``behaviour == old`` (on-policy sampling) it is :func:`ppo_policy_loss` exactly.

    Returns:
      ``(loss, stats)``: :func:`ppo_policy_loss`'s stats and ``behaviour_weight_mean``,
      ``behaviour_weight_max`` (of the applied weights over the action tokens) and
      ``behaviour_capfrac`` (fraction of action tokens with ``w_t`` above the cap).
    """
    _check_inputs(mask, logprobs, old_logprobs, behaviour_logprobs, advantages)
    if cap_mode not in CAP_MODES:
        raise ValueError(f"Unknown cap_mode {cap_mode!r}; valid ones are {CAP_MODES}.")
    if isinstance(behaviour_weight_cap, (int, float)) and not behaviour_weight_cap >= 1:
        raise ValueError(f"behaviour_weight_cap must be >= 1, got {behaviour_weight_cap}.")
    raw_BxT = correction_weights(old_logprobs, behaviour_logprobs, mask)
    if behaviour_weight_cap is None:
        weights_BxT, above_cap_BxT = raw_BxT, jnp.zeros(raw_BxT.shape, bool)
    else:
        above_cap_BxT = raw_BxT > behaviour_weight_cap
        if cap_mode == "truncate":
            weights_BxT = jnp.minimum(raw_BxT, behaviour_weight_cap)
        else:
            weights_BxT = jnp.where(above_cap_BxT, 0.0, raw_BxT)
    loss, stats = ppo_policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_eps,
        clip_eps_high,
        agg,
        axis_name,
        dual_clip,
        weights=weights_BxT,
    )
    stats["behaviour_weight_mean"] = masked_mean(weights_BxT, mask, axis_name=axis_name)
    stats["behaviour_weight_max"] = _token_max(weights_BxT, mask, axis_name)
    stats["behaviour_capfrac"] = masked_mean(above_cap_BxT.astype(jnp.float32), mask, axis_name=axis_name)
    return loss, stats
