"""Off-policy corrections (jaxrlhf.core.offpolicy): against float64 NumPy loops, hand-worked numbers,
the identity when the sampler is the trainer, gradients, jit / vmap / shard_map, and the peers' own
functions on identical inputs (verl's rollout correction and PPO loss, OpenRLHF's PolicyLoss, TRL's
vLLM importance-sampling block and off-policy sequence mask).

Action masks here are ragged, hold an all-zero row, and are not prefixes of ones (a multi-turn
episode's action tokens alternate with observation tokens).
"""

import ast
import functools
import importlib.util
import inspect
import math
import os
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrlhf import core

B, T = 8, 7
# Rows: a full row, multi-turn rows (action segments between observation tokens), a row with one
# token, an all-zero row, ragged prefixes.
ACTION_MASK = np.array(
    [
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1, 0, 1],
        [1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 1, 0, 1],
        [1, 1, 1, 1, 1, 0, 0],
    ],
    np.float32,
)
NO_EMPTY_ROW = [b for b in range(B) if ACTION_MASK[b].any()]


def make_batch(seed=0, mask=ACTION_MASK, spread=0.4):
    """old / behaviour / current log-probs and advantages; behaviour differs from old by noise and
    a few large jumps (so caps, bands and rejections all bite)."""
    rng = np.random.default_rng(seed)
    shape = mask.shape
    old = np.log(rng.uniform(0.05, 0.95, size=shape)).astype(np.float32)
    jumps = rng.choice([0.0, 0.0, 0.0, 1.5, -1.5], size=shape)
    behaviour = (old - spread * rng.normal(size=shape) - jumps).astype(np.float32)
    logprobs = (old + 0.2 * rng.normal(size=shape)).astype(np.float32)
    advantages = rng.normal(size=shape).astype(np.float32)
    return dict(old=old, behaviour=behaviour, logprobs=logprobs, advantages=advantages, mask=mask)


@pytest.fixture(scope="module")
def batch():
    return make_batch()


def between(values, q):
    """A threshold at quantile ``q`` of ``values`` placed halfway between two neighbours, so no
    value lies near it (float32 vs float64 cannot disagree on which side a value falls)."""
    v = np.unique(np.asarray(values, np.float64))
    i = min(max(int(q * len(v)), 1), len(v) - 1)
    return float((v[i - 1] + v[i]) / 2)


def assert_close(actual, expected, atol=2e-6, rtol=2e-5):
    actual = np.asarray(actual, np.float64)
    assert np.all(np.isfinite(actual)), actual
    np.testing.assert_allclose(actual, np.asarray(expected, np.float64), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- float64 NumPy loops


def np_action_log_w(old, behaviour, mask, b):
    return [float(old[b, t]) - float(behaviour[b, t]) for t in range(mask.shape[1]) if mask[b, t]]


def np_log_weights(old, behaviour, mask, level):
    out = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        row = np_action_log_w(old, behaviour, mask, b)
        for t in range(mask.shape[1]):
            if level == "token":
                out[b, t] = float(old[b, t]) - float(behaviour[b, t]) if mask[b, t] else 0.0
            elif level == "sequence":
                out[b, t] = sum(row)
            else:
                out[b, t] = sum(row) / len(row) if row else 0.0
    return out


def np_weights(old, behaviour, mask, level):
    return np.where(mask != 0, np.exp(np_log_weights(old, behaviour, mask, level)), 0.0)


def np_kl(d, kind):
    return {"k1": -d, "k2": d * d / 2, "k3": math.exp(d) - d - 1}[kind]


def np_reject_keep(old, behaviour, mask, threshold, kind, agg):
    keep = np.zeros(mask.shape, bool)
    for b in range(mask.shape[0]):
        per_token = {
            t: np_kl(float(old[b, t]) - float(behaviour[b, t]), kind) for t in range(mask.shape[1]) if mask[b, t]
        }
        if agg != "token":
            values = list(per_token.values())
            if not values:
                row = 0.0
            elif agg == "sum":
                row = sum(values)
            elif agg == "mean":
                row = sum(values) / len(values)
            else:
                row = max(values)
        for t, value in per_token.items():
            stat = value if agg == "token" else row
            keep[b, t] = (abs(stat) if kind == "k1" else stat) <= threshold
    return keep


def np_metrics(old, behaviour, mask):
    d = [x for b in range(mask.shape[0]) for x in np_action_log_w(old, behaviour, mask, b)]
    n = len(d)
    rows = [b for b in range(mask.shape[0]) if mask[b].any()]
    ppl_diff = [
        np.mean([float(behaviour[b, t]) for t in range(mask.shape[1]) if mask[b, t]])
        - np.mean([float(old[b, t]) for t in range(mask.shape[1]) if mask[b, t]])
        for b in rows
    ]
    return {
        "mismatch_k1": sum(-x for x in d) / n,
        "mismatch_k3": sum(math.exp(x) - x - 1 for x in d) / n,
        "mismatch_abs_mean": sum(abs(x) for x in d) / n,
        "mismatch_abs_max": max(abs(x) for x in d),
        "mismatch_log_ppl_diff": float(np.mean(ppl_diff)),
        "mismatch_chi2": sum(math.exp(2 * x) for x in d) / n - 1,
    }


def np_apply(old, behaviour, mask, c, is_cap, mask_low, mask_high, reject_threshold):
    """The correction as its docstring defines it, token by token in float64."""
    valid = mask != 0
    ones = np.ones(mask.shape)
    if c.weight is None:
        value, clipped = ones, np.zeros(mask.shape, bool)
    else:
        raw = np_weights(old, behaviour, mask, c.weight)
        value = np.minimum(raw, is_cap) if c.truncate else raw
        clipped = valid & (raw > is_cap) if c.truncate else np.zeros(mask.shape, bool)
    band_out = np.zeros(mask.shape, bool)
    if c.mask is not None:
        level_w = np_weights(old, behaviour, mask, c.mask)
        band_out = valid & ~((level_w >= mask_low) & (level_w <= mask_high))
    kept = valid.copy()
    if c.reject is not None:
        kept = np_reject_keep(old, behaviour, mask, reject_threshold, c.reject, c.reject_agg)
    rejected = valid & ~kept
    weights = np.where(valid & ~band_out & ~rejected, value, 0.0)
    n = valid.sum()
    rows = valid.any(axis=1)
    stats = np_metrics(old, behaviour, mask)
    stats.update(
        is_weight_mean=weights[valid].mean(),
        is_weight_min=weights[valid].min(),
        is_weight_max=weights[valid].max(),
        is_ess=weights[valid].sum() ** 2 / (n * (weights[valid] ** 2).sum()),
        is_clipfrac=clipped[valid].mean(),
        is_maskfrac=band_out[valid].mean(),
        is_mask_seqfrac=band_out.any(axis=1)[rows].mean(),
        reject_frac=rejected[valid].mean(),
        reject_seqfrac=rejected.any(axis=1)[rows].mean(),
    )
    return weights, mask * kept, stats


def np_ppo_token_loss(logprobs, old, advantages, eps_low, eps_high, dual_clip=None):
    ratio = np.exp(logprobs.astype(np.float64) - old)
    a = advantages.astype(np.float64)
    pg = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - eps_low, 1 + eps_high))
    if dual_clip is not None:
        pg = np.where(a < 0, np.minimum(pg, -a * dual_clip), pg)
    return pg


def np_aggregate(loss, mask, agg):
    valid = mask != 0
    if agg == "token-mean":
        return loss[valid].sum() / valid.sum()
    rows = [b for b in range(mask.shape[0]) if valid[b].any()]
    per_row = [loss[b][valid[b]].sum() / (valid[b].sum() if agg == "seq-mean-token-mean" else 1) for b in rows]
    if agg == "seq-mean-token-sum-norm":
        per_row = [x / mask.shape[1] for x in per_row]
    return float(np.mean(per_row))


# ----------------------------------------------------------------------------- against NumPy


@pytest.mark.parametrize("level", core.CORRECTION_LEVELS)
def test_weights_match_numpy(batch, level):
    args = (batch["old"], batch["behaviour"], batch["mask"])
    assert_close(core.log_correction_weights(*args, level), np_log_weights(*args, level))
    expected = np_weights(*args, level)
    assert_close(core.correction_weights(*args, level), expected)
    cap = between(expected[batch["mask"] != 0], 0.6)
    assert_close(core.truncated_correction_weights(*args, cap, level), np.minimum(expected, cap))
    valid_w = expected[batch["mask"] != 0]
    low, high = between(valid_w, 0.2), between(valid_w, 0.8)
    keep = (batch["mask"] != 0) & (expected >= low) & (expected <= high)
    np.testing.assert_array_equal(core.correction_band_mask(*args, low, high, level), batch["mask"] * keep)


@pytest.mark.parametrize("kind", core.MISMATCH_KINDS)
@pytest.mark.parametrize("agg", core.REJECTION_AGGS)
def test_rejection_matches_numpy(batch, kind, agg):
    if kind == "k1" and agg == "max":
        with pytest.raises(ValueError, match="k1"):
            core.mismatch_rejection_mask(batch["old"], batch["behaviour"], batch["mask"], 0.1, kind, agg)
        return
    args = (batch["old"], batch["behaviour"], batch["mask"])
    # The threshold: the median of the statistics this rule compares.
    stats = []
    for b in NO_EMPTY_ROW:
        per_token = [np_kl(x, kind) for x in np_action_log_w(*args, b)]
        if agg == "token":
            stats += [abs(x) if kind == "k1" else x for x in per_token]
        else:
            row = {"sum": sum(per_token), "mean": np.mean(per_token), "max": max(per_token)}[agg]
            stats.append(abs(row) if kind == "k1" else row)
    threshold = between(stats, 0.5)
    keep = np_reject_keep(*args, threshold, kind, agg)
    assert 0 < keep.sum() < (batch["mask"] != 0).sum()
    np.testing.assert_array_equal(core.mismatch_rejection_mask(*args, threshold, kind, agg), batch["mask"] * keep)


def test_off_policy_sequence_mask_matches_numpy(batch):
    mask = batch["mask"]
    mean_k1 = {
        b: np.mean([float(batch["behaviour"][b, t]) - float(batch["logprobs"][b, t]) for t in range(T) if mask[b, t]])
        for b in NO_EMPTY_ROW
    }
    threshold = between(list(mean_k1.values()), 0.5)
    expected = np.zeros((B, T))
    for b, k1 in mean_k1.items():
        for t in range(T):
            expected[b, t] = mask[b, t] * (batch["advantages"][b, t] >= 0 or k1 <= threshold)
    actual = core.off_policy_sequence_mask(batch["logprobs"], batch["behaviour"], batch["advantages"], mask, threshold)
    np.testing.assert_array_equal(actual, expected)


def test_mismatch_metrics_match_numpy(batch):
    args = (batch["old"], batch["behaviour"], batch["mask"])
    actual = core.mismatch_metrics(*args)
    expected = np_metrics(*args)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert_close(actual[key], value, rtol=5e-5)


CUSTOM_CORRECTIONS = {
    "geo-tis+k2-token": core.RolloutCorrection(weight="geometric", mask=None, reject="k2", reject_agg="token"),
    "token-tis+seq-band+k3-max": core.RolloutCorrection(weight="token", mask="sequence", reject="k3", reject_agg="max"),
    "band-only": core.RolloutCorrection(weight=None, mask="token"),
    "seq-tis+k1-sum": core.RolloutCorrection(weight="sequence", reject="k1", reject_agg="sum"),
}


def _numbers(batch, c):
    """Numbers for correction ``c`` that make every part bite on ``batch``, none near a value."""
    args = (batch["old"], batch["behaviour"], batch["mask"])
    valid = batch["mask"] != 0
    numbers = dict(is_cap=2.0, mask_low=0.5, mask_high=5.0, reject_threshold=0.01)
    if c.weight is not None:
        numbers["is_cap"] = max(1.0, between(np_weights(*args, c.weight)[valid], 0.7))
    if c.mask is not None:
        level_w = np_weights(*args, c.mask)[valid]
        numbers["mask_low"] = min(1.0, between(level_w, 0.15))
        numbers["mask_high"] = max(1.0, between(level_w, 0.85))
    if c.reject is not None:
        stats = []
        for b in range(len(batch["mask"])):
            per_token = [np_kl(x, c.reject) for x in np_action_log_w(*args, b)]
            if not per_token:
                continue
            if c.reject_agg == "token":
                values = per_token
            else:
                values = [{"sum": sum, "mean": np.mean, "max": max}[c.reject_agg](per_token)]
            stats += [abs(v) if c.reject == "k1" else v for v in values]
        numbers["reject_threshold"] = between(stats, 0.6)
    return numbers


ALL_CORRECTIONS = {**core.ROLLOUT_CORRECTIONS, **CUSTOM_CORRECTIONS}


@pytest.mark.parametrize("name", list(ALL_CORRECTIONS))
def test_apply_matches_numpy(batch, name):
    c = ALL_CORRECTIONS[name]
    numbers = _numbers(batch, c)
    args = (batch["old"], batch["behaviour"], batch["mask"])
    weights, mask_out, stats = core.apply_rollout_correction(*args, c, **numbers)
    expected_weights, expected_mask, expected_stats = np_apply(*args, c, **numbers)
    assert_close(weights, expected_weights)
    np.testing.assert_array_equal(mask_out, expected_mask)
    assert mask_out.dtype == batch["mask"].dtype and weights.dtype == jnp.float32
    assert stats.keys() == expected_stats.keys()
    for key, value in expected_stats.items():
        assert_close(stats[key], value, rtol=5e-5)
    # every part of the correction did something here (the test would not see a part that never bites)
    if c.weight is not None and c.truncate:
        assert stats["is_clipfrac"] > 0
    if c.mask is not None:
        assert stats["is_maskfrac"] > 0
    if c.reject is not None:
        assert 0 < stats["reject_frac"] < 1


@pytest.mark.parametrize("agg", core.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("cap_mode", [None, "mask", "truncate"])
def test_decoupled_loss_matches_numpy(batch, agg, cap_mode):
    old, behaviour, mask = batch["old"], batch["behaviour"], batch["mask"]
    raw = np_weights(old, behaviour, mask, "token")
    cap = None if cap_mode is None else between(raw[mask != 0], 0.7)
    if cap_mode == "mask":
        weights = np.where(raw > cap, 0.0, raw)
    elif cap_mode == "truncate":
        weights = np.minimum(raw, cap)
    else:
        weights = raw
    pg = np_ppo_token_loss(batch["logprobs"], old, batch["advantages"], 0.2, 0.28, dual_clip=3.0)
    expected = np_aggregate(weights * pg, mask, agg)
    loss, stats = core.decoupled_ppo_policy_loss(
        batch["logprobs"],
        old,
        behaviour,
        batch["advantages"],
        mask,
        clip_eps=0.2,
        clip_eps_high=0.28,
        behaviour_weight_cap=cap,
        cap_mode=cap_mode or "mask",
        agg=agg,
        dual_clip=3.0,
    )
    assert_close(loss, expected)
    assert_close(stats["behaviour_weight_mean"], weights[mask != 0].mean())
    assert_close(stats["behaviour_weight_max"], weights[mask != 0].max())
    assert_close(stats["behaviour_capfrac"], 0.0 if cap is None else (raw[mask != 0] > cap).mean())
    # The PPO statistics are plain PPO's (unweighted).
    _, plain = core.ppo_policy_loss(batch["logprobs"], old, batch["advantages"], mask, 0.2, 0.28, agg, dual_clip=3.0)
    for key in plain:
        if key != "pg_loss":
            np.testing.assert_array_equal(stats[key], plain[key])


# ----------------------------------------------------------------------------- hand-worked numbers


def test_hand_worked_numbers():
    # Row 0: log w = (ln 2, 0, -ln 2): w = (2, 1, 1/2), W = 1, G = 1, mean k3 = 1/6.
    # Row 1 (action mask 1 0 1; the middle token is an observation): log w = (ln 3, -, 0):
    # W = 3, G = sqrt(3), k3 = (2 - ln 3, 0): mean (2 - ln 3) / 2 = 0.4507.
    old = jnp.array([[math.log(2), 0.0, -math.log(2)], [math.log(3), 5.0, 0.0]]) - 1.0
    behaviour = jnp.full((2, 3), -1.0)
    mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    np.testing.assert_allclose(core.correction_weights(old, behaviour, mask), [[2, 1, 0.5], [3, 0, 1]], rtol=1e-6)
    np.testing.assert_allclose(
        core.correction_weights(old, behaviour, mask, "sequence"), [[1, 1, 1], [3, 0, 3]], rtol=1e-6
    )
    sqrt3 = math.sqrt(3)
    np.testing.assert_allclose(
        core.correction_weights(old, behaviour, mask, "geometric"), [[1, 1, 1], [sqrt3, 0, sqrt3]], rtol=1e-6
    )
    np.testing.assert_allclose(
        core.truncated_correction_weights(old, behaviour, mask, 1.5), [[1.5, 1, 0.5], [1.5, 0, 1]], rtol=1e-6
    )
    np.testing.assert_array_equal(core.correction_band_mask(old, behaviour, mask, 0.6, 1.8), [[0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(
        core.correction_band_mask(old, behaviour, mask, 0.6, 1.8, "geometric"), [[1, 1, 1], [1, 0, 1]]
    )
    np.testing.assert_array_equal(core.mismatch_rejection_mask(old, behaviour, mask, 0.2), [[1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(core.mismatch_rejection_mask(old, behaviour, mask, 0.5), [[1, 1, 1], [1, 0, 1]])
    # k1: |sum| = (0, ln 3 = 1.0986); |mean| = (0, 0.5493).
    np.testing.assert_array_equal(
        core.mismatch_rejection_mask(old, behaviour, mask, 1.0, "k1", "sum"), [[1, 1, 1], [0, 0, 0]]
    )
    np.testing.assert_array_equal(
        core.mismatch_rejection_mask(old, behaviour, mask, 1.0, "k1", "mean"), [[1, 1, 1], [1, 0, 1]]
    )
    stats = core.mismatch_metrics(old, behaviour, mask)
    # k1 over 5 action tokens: -(ln 2 + 0 - ln 2 + ln 3 + 0) / 5; k3: (1/6 * 3 + 2 - ln 3) / 5.
    np.testing.assert_allclose(stats["mismatch_k1"], -math.log(3) / 5, rtol=1e-6)
    np.testing.assert_allclose(stats["mismatch_k3"], (0.5 + 2 - math.log(3)) / 5, rtol=1e-6)
    np.testing.assert_allclose(stats["mismatch_abs_max"], math.log(3), rtol=1e-6)
    np.testing.assert_allclose(stats["mismatch_chi2"], (4 + 1 + 0.25 + 9 + 1) / 5 - 1, rtol=1e-6)

    # "k3-rs-tis" with C = 1.5, threshold 0.2: row 1 rejected, row 0 truncated.
    weights, mask_out, stats = core.apply_rollout_correction(
        old, behaviour, mask, "k3-rs-tis", is_cap=1.5, reject_threshold=0.2
    )
    np.testing.assert_allclose(weights, [[1.5, 1, 0.5], [0, 0, 0]], rtol=1e-6)
    np.testing.assert_array_equal(mask_out, [[1, 1, 1], [0, 0, 0]])
    np.testing.assert_allclose(stats["is_clipfrac"], 2 / 5, rtol=1e-6)  # w = 2 and w = 3 exceed 1.5
    np.testing.assert_allclose(stats["reject_frac"], 2 / 5, rtol=1e-6)
    np.testing.assert_allclose(stats["reject_seqfrac"], 1 / 2, rtol=1e-6)
    np.testing.assert_allclose(stats["is_weight_mean"], 3 / 5, rtol=1e-6)
    # ESS of the weights (1.5, 1, 0.5, 0, 0): 3^2 / (5 * 3.5).
    np.testing.assert_allclose(stats["is_ess"], 9 / 17.5, rtol=1e-6)

    # Decoupled PPO, A = 1 everywhere, current = old + ln 1.1 (inside the clip): pg = -1.1 w.
    loss, _ = core.decoupled_ppo_policy_loss(old + math.log(1.1), old, behaviour, jnp.ones((2, 3)), mask)
    np.testing.assert_allclose(loss, -1.1 * (2 + 1 + 0.5 + 3 + 1) / 5, rtol=1e-6)
    loss, stats = core.decoupled_ppo_policy_loss(
        old + math.log(1.1), old, behaviour, jnp.ones((2, 3)), mask, behaviour_weight_cap=2.5
    )
    np.testing.assert_allclose(loss, -1.1 * (2 + 1 + 0.5 + 0 + 1) / 5, rtol=1e-6)  # w = 3 dropped
    np.testing.assert_allclose(stats["behaviour_capfrac"], 1 / 5, rtol=1e-6)


# ----------------------------------------------------------------------------- the identity


@pytest.mark.parametrize("name", list(ALL_CORRECTIONS))
def test_identity_when_behaviour_equals_old(batch, name):
    c = ALL_CORRECTIONS[name]
    numbers = _numbers(batch, c)
    old, mask = batch["old"], batch["mask"]
    weights, mask_out, stats = core.apply_rollout_correction(old, old, mask, c, **numbers)
    np.testing.assert_array_equal(weights, mask)  # exactly 1.0 on every action token
    np.testing.assert_array_equal(mask_out, mask)
    for key in ("mismatch_k1", "mismatch_k3", "mismatch_abs_max", "mismatch_chi2", "reject_frac", "is_clipfrac"):
        assert stats[key] == 0, key
    assert stats["is_ess"] == 1 and stats["is_weight_mean"] == 1
    for agg in core.LOSS_AGGREGATIONS:
        args = (batch["logprobs"], old, batch["advantages"])
        plain, _ = core.ppo_policy_loss(*args, mask, agg=agg)
        corrected, _ = core.ppo_policy_loss(*args, mask_out, agg=agg, weights=weights)
        assert corrected == plain, agg
        decoupled, _ = core.decoupled_ppo_policy_loss(
            batch["logprobs"], old, old, batch["advantages"], mask, agg=agg, behaviour_weight_cap=1.0
        )
        assert decoupled == plain, agg


def test_identity_keeps_mask_dtype(batch):
    for dtype in (jnp.bool_, jnp.int32, jnp.float32):
        mask = jnp.asarray(batch["mask"]).astype(dtype)
        weights, mask_out, _ = core.apply_rollout_correction(batch["old"], batch["old"], mask, "k3-rs-tis")
        assert mask_out.dtype == dtype
        np.testing.assert_array_equal(mask_out, mask)
        np.testing.assert_array_equal(weights, batch["mask"])


# ----------------------------------------------------------------------------- edge cases


def test_all_zero_mask_and_garbage_outside_the_mask_stay_finite(batch):
    zero = np.zeros((B, T), np.float32)
    for name, c in ALL_CORRECTIONS.items():
        weights, mask_out, stats = core.apply_rollout_correction(batch["old"], batch["behaviour"], zero, c)
        assert not np.any(weights) and not np.any(mask_out)
        for key, value in stats.items():
            assert value == 0, (name, key)
    loss, stats = core.decoupled_ppo_policy_loss(
        batch["logprobs"], batch["old"], batch["behaviour"], batch["advantages"], zero, behaviour_weight_cap=2.0
    )
    assert loss == 0 and all(np.isfinite(v) for v in stats.values())
    # NaN / inf log-probs at non-action positions (a sampler writes anything there) are ignored.
    behaviour = np.where(batch["mask"] != 0, batch["behaviour"], np.nan).astype(np.float32)
    old = np.where(batch["mask"] != 0, batch["old"], -np.inf).astype(np.float32)
    for c in ALL_CORRECTIONS.values():
        numbers = _numbers(batch, c)
        clean = core.apply_rollout_correction(batch["old"], batch["behaviour"], batch["mask"], c, **numbers)
        dirty = core.apply_rollout_correction(old, behaviour, batch["mask"], c, **numbers)
        jax.tree.map(np.testing.assert_array_equal, dirty, clean)


def test_overflowing_sequence_weight_is_truncated_or_masked_not_nan():
    mask = np.ones((2, 50), np.float32)
    old = np.zeros((2, 50), np.float32)
    behaviour = np.full((2, 50), -3.0, np.float32)  # sum log w = 150: W = exp(150) = inf in float32
    assert np.isinf(core.correction_weights(old, behaviour, mask, "sequence")).all()
    weights, _, _ = core.apply_rollout_correction(old, behaviour, mask, "seq-tis", is_cap=2.0)
    np.testing.assert_array_equal(weights, 2.0)
    weights, _, stats = core.apply_rollout_correction(old, behaviour, mask, "seq-mask")
    np.testing.assert_array_equal(weights, 0.0)
    assert stats["is_maskfrac"] == 1 and np.isfinite(stats["is_weight_max"])


def test_bf16_behaviour_logprobs_are_upcast(batch):
    behaviour_bf16 = jnp.asarray(batch["behaviour"], jnp.bfloat16)
    as_f32 = np.asarray(behaviour_bf16.astype(jnp.float32))
    for name in ("tis", "seq-mask", "k3-rs"):
        low = core.apply_rollout_correction(batch["old"], behaviour_bf16, batch["mask"], name)
        high = core.apply_rollout_correction(batch["old"], as_f32, batch["mask"], name)
        assert low[0].dtype == jnp.float32
        jax.tree.map(np.testing.assert_array_equal, low, high)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda a: core.apply_rollout_correction(*a, "nope"), "Unknown rollout correction 'nope'"),
        (lambda a: core.apply_rollout_correction(*a, "tis", is_cap=0.5), "is_cap must be >= 1"),
        (lambda a: core.apply_rollout_correction(*a, "icepop", mask_low=1.5), "mask_low must be in"),
        (lambda a: core.apply_rollout_correction(*a, "icepop", mask_high=0.9), "mask_high must be >= 1"),
        (lambda a: core.apply_rollout_correction(*a, "k3-rs", reject_threshold=-1.0), "reject_threshold must be >= 0"),
        (lambda a: core.RolloutCorrection(weight="tokens"), "Unknown weight level 'tokens'"),
        (lambda a: core.RolloutCorrection(mask="seq"), "Unknown mask level 'seq'"),
        (lambda a: core.RolloutCorrection(reject="k4"), "Unknown mismatch kind 'k4'"),
        (lambda a: core.RolloutCorrection(reject="k1", reject_agg="max"), "k1"),
        (lambda a: core.RolloutCorrection(reject_agg="median"), "Unknown rejection aggregation 'median'"),
        (lambda a: core.correction_weights(*a, "row"), "Unknown level 'row'"),
        (lambda a: core.decoupled_ppo_policy_loss(a[0], *a, a[0], a[2], cap_mode="clip"), "Unknown cap_mode 'clip'"),
        (lambda a: core.decoupled_ppo_policy_loss(a[0], *a, a[0], a[2], behaviour_weight_cap=0.5), "must be >= 1"),
    ],
)
def test_bad_input_is_a_clear_error(batch, call, match):
    with pytest.raises(ValueError, match=match):
        call((batch["old"], batch["behaviour"], batch["mask"]))


def test_shape_mismatch_is_an_error(batch):
    with pytest.raises(AssertionError):
        core.apply_rollout_correction(batch["old"], batch["behaviour"][:, :-1], batch["mask"], "tis")


# ----------------------------------------------------------------------------- gradients


def test_no_gradient_through_the_weights(batch):
    def total(old, behaviour, c):
        weights, _, stats = core.apply_rollout_correction(old, behaviour, batch["mask"], c)
        return jnp.sum(weights) + sum(jnp.sum(v) for v in stats.values())

    for c in ALL_CORRECTIONS.values():
        grads = jax.grad(total, argnums=(0, 1))(batch["old"], batch["behaviour"], c)
        for g in grads:
            np.testing.assert_array_equal(g, 0.0)


def test_decoupled_gradient_is_the_weighted_ppo_gradient(batch):
    """d loss / d logprobs_t = w_t * (-A_t u_t) / n where the unclipped term is taken, 0 where the clip
    is (token-mean); nothing flows into old or behaviour log-probs."""
    old, behaviour, mask, advantages = batch["old"], batch["behaviour"], batch["mask"], batch["advantages"]
    logprobs = batch["logprobs"]
    grads = jax.grad(
        lambda lp, o, b: core.decoupled_ppo_policy_loss(lp, o, b, advantages, mask, 0.2, 0.28)[0], argnums=(0, 1, 2)
    )(logprobs, old, behaviour)
    w = np_weights(old, behaviour, mask, "token")
    u = np.exp(logprobs.astype(np.float64) - old)
    a = advantages.astype(np.float64)
    unclipped_taken = -a * u >= -a * np.clip(u, 0.8, 1.28)
    expected = np.where(unclipped_taken, w * -a * u, 0.0) / (mask != 0).sum()
    assert_close(grads[0], expected * (mask != 0))
    np.testing.assert_array_equal(grads[1], 0.0)
    np.testing.assert_array_equal(grads[2], 0.0)
    # The same through ppo_policy_loss's weights with apply_rollout_correction's weights.
    weights, mask_out, _ = core.apply_rollout_correction(old, behaviour, mask, core.RolloutCorrection(truncate=False))
    grad = jax.grad(lambda lp: core.ppo_policy_loss(lp, old, advantages, mask_out, 0.2, 0.28, weights=weights)[0])
    assert_close(grad(logprobs), grads[0])


# ----------------------------------------------------------------------------- jit / vmap / devices


@pytest.mark.parametrize("name", list(ALL_CORRECTIONS))
def test_jit_with_traced_numbers_equals_eager(batch, name):
    c = ALL_CORRECTIONS[name]
    args = (batch["old"], batch["behaviour"], batch["mask"])
    numbers = _numbers(batch, c)
    eager = core.apply_rollout_correction(*args, c, **numbers)
    jitted = jax.jit(core.apply_rollout_correction, static_argnums=3)(*args, c, **numbers)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), jitted, eager)


def test_vmap_over_runs_equals_one_run_at_a_time():
    runs = [make_batch(seed) for seed in (1, 2, 3)]
    stacked = {k: np.stack([r[k] for r in runs]) for k in ("old", "behaviour", "mask")}
    caps = jnp.array([1.2, 2.0, 3.0])
    thresholds = jnp.array([0.02, 0.05, 0.2])
    c = core.ROLLOUT_CORRECTIONS["k3-rs-tis"]
    fn = lambda o, b, m, cap, thr: core.apply_rollout_correction(o, b, m, c, is_cap=cap, reject_threshold=thr)  # noqa: E731
    vmapped = jax.jit(jax.vmap(fn))(stacked["old"], stacked["behaviour"], stacked["mask"], caps, thresholds)
    for r, run in enumerate(runs):
        one = fn(run["old"], run["behaviour"], run["mask"], float(caps[r]), float(thresholds[r]))
        jax.tree.map(lambda v, o: np.testing.assert_allclose(v[r], o, rtol=1e-6, atol=1e-7), vmapped, one)


def _everything(b, axis_name=None):
    args = (b["old"], b["behaviour"], b["mask"])
    out = {}
    for name in ("seq-mask-tis", "k3-rs-tis", "geo-rs"):
        out[name] = core.apply_rollout_correction(*args, name, reject_threshold=0.05, axis_name=axis_name)
    out["decoupled"] = core.decoupled_ppo_policy_loss(
        b["logprobs"], *args[:2], b["advantages"], b["mask"], behaviour_weight_cap=3.0, axis_name=axis_name
    )
    out["opsm"] = core.off_policy_sequence_mask(b["logprobs"], b["behaviour"], b["advantages"], b["mask"], 0.1)
    return out


def test_shard_map_over_8_devices_equals_one_device(batch):
    """One row per device (the all-zero row on its own device): weights and masks per row, statistics
    and the loss over the whole batch through ``axis_name``."""
    assert jax.device_count() >= 8
    whole = _everything(batch)
    mesh = jax.make_mesh((8,), ("batch",))
    rows = lambda tree: jax.tree.map(lambda x: x.ndim == 2, tree)  # noqa: E731
    out_specs = jax.tree.map(lambda is_row: P("batch") if is_row else P(), rows(whole))
    fn = jax.jit(
        jax.shard_map(
            functools.partial(_everything, axis_name="batch"), mesh=mesh, in_specs=(P("batch"),), out_specs=out_specs
        )
    )
    device_batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, P("batch")))
    sharded = jax.block_until_ready(fn(device_batch))
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-6, atol=1e-7), sharded, whole)
    # Without axis_name each device would report its own row: check that the test can tell.
    local = jax.shard_map(
        lambda b: core.mismatch_metrics(b["old"], b["behaviour"], b["mask"]),
        mesh=mesh,
        in_specs=(P("batch"),),
        out_specs=P(),
        check_vma=False,
    )
    assert not np.allclose(jax.jit(local)(device_batch)["mismatch_k3"], whole["k3-rs-tis"][2]["mismatch_k3"])


# ----------------------------------------------------------------------------- the peers' own functions
# Each peer test runs the peer's code on the same inputs (float64 torch tensors), and skips with
# the reason when the peer is not importable. CI installs them (.ci/run):
#   verl 0.9.1 (--no-deps) and what its import needs (ray: verl.protocol imports it at its top);
#   OpenRLHF 0.11.2 (--no-deps) and deepspeed: openrlhf/models/__init__.py imports the actor
#     (flash_attn, CUDA only), so models/loss.py is loaded by file path; it needs torch and
#     models/utils.py, which imports deepspeed;
#   TRL 1.16.0 (--no-deps): nothing more beyond the test extra.

PEER_BATCH_SEED = 11


@pytest.fixture(scope="module")
def peer_batch():
    """No all-zero row (verl and OpenRLHF divide by a row's token count); non-prefix masks."""
    mask = ACTION_MASK[NO_EMPTY_ROW]
    return make_batch(PEER_BATCH_SEED, mask=mask)


def _torch(x):
    import torch

    return torch.tensor(np.asarray(x, np.float64))


def _import_peer(module, install):
    """``module`` imported, or the test skipped with what is missing and what CI installs."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.skip(f"{module} is not importable ({exc}); CI installs {install} (.ci/run)")


@pytest.fixture(scope="module")
def verl():
    helper = _import_peer("verl.trainer.ppo.rollout_corr_helper", "verl 0.9.1 and the packages its import needs")
    core_algos = _import_peer("verl.trainer.ppo.core_algos", "verl 0.9.1")
    config = _import_peer("verl.workers.config", "verl 0.9.1")
    return types.SimpleNamespace(helper=helper, core_algos=core_algos, ActorConfig=config.ActorConfig)


VERL_IS = [("token", "tis"), ("sequence", "seq-tis"), ("token", "icepop"), ("sequence", "seq-mask")]


@pytest.mark.slow
@pytest.mark.parametrize("level, name", VERL_IS)
def test_verl_rollout_is_weights(verl, peer_batch, level, name):
    c = core.ROLLOUT_CORRECTIONS[name]
    numbers = _numbers(peer_batch, c)
    spec = numbers["is_cap"] if c.mask is None else f"{numbers['mask_low']}_{numbers['mask_high']}"
    old, behaviour, mask = peer_batch["old"], peer_batch["behaviour"], peer_batch["mask"]
    theirs, metrics = verl.helper.compute_rollout_correction_weights(
        _torch(old - behaviour.astype(np.float64)), _torch(mask), rollout_is=level, rollout_is_threshold=spec
    )
    weights, mask_out, stats = core.apply_rollout_correction(old, behaviour, mask, c, **numbers)
    assert_close(weights, theirs.numpy())
    np.testing.assert_array_equal(mask_out, mask)  # verl's IS (unlike its RS) keeps the mask, as here
    assert_close(stats["is_weight_mean"], metrics["rollout_is_mean"])
    assert_close(stats["is_ess"], metrics["rollout_is_eff_sample_size"], rtol=1e-4)
    if level == "token":
        assert_close(stats["is_weight_max"], metrics["rollout_is_max"])
        assert_close(stats["is_weight_min"], metrics["rollout_is_min"])
        if c.mask is None:
            assert_close(stats["is_clipfrac"], metrics["rollout_is_ratio_fraction_high"])
    if c.mask is not None:
        assert_close(stats["is_maskfrac"], metrics["rollout_is_oob_ratio"])
    assert stats["is_maskfrac" if c.mask else "is_clipfrac"] > 0  # the cap or the band bites


VERL_RS = sorted(
    ["token_k1", "token_k2", "token_k3"]
    + [f"seq_{agg}_{kind}" for agg in ("sum", "mean") for kind in ("k1", "k2", "k3")]
    + ["seq_max_k2", "seq_max_k3"]
)


@pytest.mark.slow
@pytest.mark.parametrize("option", VERL_RS)
def test_verl_rollout_rejection(verl, peer_batch, option):
    kind = option[-2:]
    agg = "token" if option.startswith("token") else option.split("_")[1]
    c = core.RolloutCorrection(weight=None, reject=kind, reject_agg=agg)
    threshold = _numbers(peer_batch, c)["reject_threshold"]
    # verl's k1 options take ratio bounds "lo_hi" on -log w; |k1| <= t is "exp(-t)_exp(t)".
    spec = f"{math.exp(-threshold)!r}_{math.exp(threshold)!r}" if kind == "k1" else threshold
    old, behaviour, mask = peer_batch["old"], peer_batch["behaviour"], peer_batch["mask"]
    their_mask, metrics = verl.helper.compute_rollout_rejection_mask(
        _torch(old - behaviour.astype(np.float64)), _torch(mask), rollout_rs=option, rollout_rs_threshold=spec
    )
    weights, mask_out, stats = core.apply_rollout_correction(old, behaviour, mask, c, reject_threshold=threshold)
    np.testing.assert_array_equal(mask_out, their_mask.numpy())
    np.testing.assert_array_equal(weights, their_mask.numpy())
    assert_close(stats["reject_frac"], metrics["rollout_rs_masked_fraction"])
    assert_close(stats["reject_seqfrac"], metrics["rollout_rs_seq_masked_fraction"])
    assert 0 < stats["reject_frac"] < 1


@pytest.mark.slow
def test_verl_offpolicy_metrics(verl, peer_batch):
    old, behaviour, mask = peer_batch["old"], peer_batch["behaviour"], peer_batch["mask"]
    theirs = verl.helper.compute_offpolicy_metrics(_torch(old), _torch(behaviour), _torch(mask))
    ours = core.mismatch_metrics(old, behaviour, mask)
    for mine, their_key in [
        ("mismatch_k1", "kl"),
        ("mismatch_k3", "k3_kl"),
        ("mismatch_log_ppl_diff", "log_ppl_diff"),
        ("mismatch_chi2", "chi2_token"),
    ]:
        assert_close(ours[mine], theirs[their_key], rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("agg", core.LOSS_AGGREGATIONS)
def test_verl_decoupled_pipeline_and_ppo_loss(verl, peer_batch, agg):
    """verl's whole rollout-correction step (sequence TIS + K3 rejection sampling) and its PPO loss
    with those weights, against apply_rollout_correction + ppo_policy_loss(weights=...).
    verl's vanilla loss always has the dual clip (clip_ratio_c = 3)."""
    c = core.RolloutCorrection(weight="sequence", reject="k3", reject_agg="mean")
    numbers = _numbers(peer_batch, c)
    old, behaviour, mask = peer_batch["old"], peer_batch["behaviour"], peer_batch["mask"]
    proto, their_mask, metrics = verl.helper.compute_rollout_correction_and_rejection_mask(
        _torch(old),
        _torch(behaviour),
        _torch(mask),
        rollout_is="sequence",
        rollout_is_threshold=numbers["is_cap"],
        rollout_rs="seq_mean_k3",
        rollout_rs_threshold=numbers["reject_threshold"],
    )
    their_weights = proto.batch["rollout_is_weights"]
    weights, mask_out, stats = core.apply_rollout_correction(old, behaviour, mask, c, **numbers)
    np.testing.assert_array_equal(mask_out, their_mask.numpy())
    assert_close(weights, (their_weights * their_mask).numpy())  # verl leaves weights on rejected tokens
    assert_close(stats["mismatch_k3"], metrics["rollout_corr/k3_kl"], rtol=1e-4)
    config = verl.ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
    )
    their_loss, their_stats = verl.core_algos.compute_policy_loss_vanilla(
        old_log_prob=_torch(old),
        log_prob=_torch(peer_batch["logprobs"]),
        advantages=_torch(peer_batch["advantages"]),
        response_mask=their_mask,
        loss_agg_mode=agg,
        config=config,
        rollout_is_weights=their_weights,
    )
    loss, ppo_stats = core.ppo_policy_loss(
        peer_batch["logprobs"],
        old,
        peer_batch["advantages"],
        mask_out,
        0.2,
        0.28,
        agg,
        dual_clip=3.0,
        weights=weights,
    )
    assert_close(loss, float(their_loss), rtol=1e-5)
    assert_close(ppo_stats["clipfrac"], their_stats["actor/pg_clipfrac"])


def _load_by_path(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def openrlhf_loss():
    """``openrlhf/models/loss.py`` loaded by file path: the package's ``models/__init__.py``
    imports the actor, which needs flash_attn (CUDA only). loss.py itself needs torch and
    ``models/utils.py`` (its ``masked_mean``), which imports deepspeed; both are real OpenRLHF
    modules, registered under their own names while they load and removed afterwards."""
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or spec.origin is None:
        pytest.skip("openrlhf is not installed; CI installs openrlhf 0.11.2 --no-deps (.ci/run)")
    _import_peer("deepspeed", "deepspeed 0.19.8 (OpenRLHF's models/utils.py imports it)")
    models = os.path.join(os.path.dirname(spec.origin), "models")
    names = ("openrlhf.models.utils", "openrlhf.models.loss")
    try:
        _load_by_path(names[0], os.path.join(models, "utils.py"))
        return _load_by_path(names[1], os.path.join(models, "loss.py"))
    finally:
        for name in names:
            sys.modules.pop(name, None)


OPENRLHF = [("tis", "token", "clip"), ("icepop", "token", "mask"), ("seq-mask-tis", "seq", "mask")]


@pytest.mark.slow
@pytest.mark.parametrize("name, level, mode", OPENRLHF)
def test_openrlhf_policy_loss(openrlhf_loss, peer_batch, name, level, mode):
    c = core.ROLLOUT_CORRECTIONS[name]
    numbers = _numbers(peer_batch, c)
    bounds = (0.0, numbers["is_cap"]) if mode == "clip" else (numbers["mask_low"], numbers["mask_high"])
    policy_loss = openrlhf_loss.PolicyLoss(
        clip_eps_low=0.2,
        clip_eps_high=0.28,
        is_correction_level=level,
        is_correction_mode=mode,
        is_correction_gating="ratio",
        is_correction_threshold=bounds,
    )
    b = peer_batch
    their_loss, their_clip, _, their_vllm_kl, their_filtered = policy_loss(
        _torch(b["logprobs"]), _torch(b["old"]), _torch(b["advantages"]), _torch(b["mask"]), _torch(b["behaviour"])
    )
    weights, mask_out, stats = core.apply_rollout_correction(b["old"], b["behaviour"], b["mask"], c, **numbers)
    loss, ppo_stats = core.ppo_policy_loss(
        b["logprobs"], b["old"], b["advantages"], mask_out, 0.2, 0.28, weights=weights
    )
    assert_close(loss, float(their_loss))
    assert_close(ppo_stats["clipfrac"], float(their_clip))
    assert_close(stats["mismatch_k1"], float(their_vllm_kl))
    filtered = {"tis": "is_clipfrac", "icepop": "is_maskfrac", "seq-mask-tis": "is_mask_seqfrac"}[name]
    assert_close(stats[filtered], float(their_filtered))
    assert 0 < stats[filtered] < 1


@pytest.fixture(scope="module")
def trl_grpo():
    return _import_peer("trl.trainer.grpo_trainer", "trl 1.16.0 --no-deps").GRPOTrainer


def _trl_vllm_is_block(trainer_cls):
    """TRL computes its vLLM importance-sampling ratio inline in
    ``GRPOTrainer._generate_and_score_completions`` (no function of its own): the ``if`` block that
    assigns ``vllm_importance_sampling_ratio``, taken from the installed source and run as is."""
    source = textwrap.dedent(inspect.getsource(trainer_cls._generate_and_score_completions))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If) and any(
            isinstance(stmt, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "vllm_importance_sampling_ratio" for t in stmt.targets)
            for stmt in node.body
        ):
            return compile(ast.Module(body=node.body, type_ignores=[]), "<trl GRPOTrainer vLLM IS block>", "exec")
    pytest.fail("TRL's GRPOTrainer no longer computes vllm_importance_sampling_ratio in an if block")


TRL_MODES = [
    ("token_truncate", "tis"),
    ("token_mask", "icepop"),
    ("sequence_truncate", "seq-tis"),
    ("sequence_mask", "seq-mask"),
]


@pytest.mark.slow
@pytest.mark.parametrize("mode, name", TRL_MODES)
def test_trl_vllm_importance_sampling(trl_grpo, peer_batch, mode, name):
    import torch

    c = core.ROLLOUT_CORRECTIONS[name]
    numbers = _numbers(peer_batch, c)
    truncate = mode.endswith("truncate")
    b = peer_batch
    namespace = {
        "self": types.SimpleNamespace(
            vllm_importance_sampling_mode=mode,
            vllm_importance_sampling_clip_min=None if truncate else numbers["mask_low"],
            vllm_importance_sampling_clip_max=numbers["is_cap"] if truncate else numbers["mask_high"],
        ),
        "completion_mask": _torch(b["mask"]),
        "tool_mask": None,
        "old_per_token_logps": _torch(b["old"]),
        "sampling_per_token_logps": _torch(b["behaviour"]),
        "torch": torch,
        "math": math,
    }
    exec(_trl_vllm_is_block(trl_grpo), namespace)
    theirs = np.broadcast_to(namespace["vllm_importance_sampling_ratio"].numpy(), b["mask"].shape) * b["mask"]
    weights, _, stats = core.apply_rollout_correction(b["old"], b["behaviour"], b["mask"], c, **numbers)
    assert_close(weights, theirs)
    assert stats["is_clipfrac" if truncate else "is_maskfrac"] > 0


@pytest.mark.slow
def test_trl_off_policy_sequence_mask(trl_grpo, peer_batch):
    b = peer_batch
    row_advantage = b["advantages"][:, :1]  # TRL's advantages are one per row, (B, 1)
    advantages = np.broadcast_to(row_advantage, b["mask"].shape)
    mean_k1 = [
        np.mean([float(b["behaviour"][i, t]) - float(b["logprobs"][i, t]) for t in range(T) if b["mask"][i, t]])
        for i in range(len(b["mask"]))
    ]
    threshold = between(mean_k1, 0.5)
    theirs = trl_grpo.get_off_policy_mask(
        advantages=_torch(row_advantage),
        per_token_logps=_torch(b["logprobs"]),
        sampling_per_token_logps=_torch(b["behaviour"]),
        mask=_torch(b["mask"]),
        off_policy_threshold=threshold,
    ).numpy()
    ours = core.off_policy_sequence_mask(b["logprobs"], b["behaviour"], advantages, b["mask"], threshold)
    np.testing.assert_array_equal(ours, np.broadcast_to(theirs, b["mask"].shape) * b["mask"])
    assert 0 < np.asarray(ours).sum() < b["mask"].sum()
