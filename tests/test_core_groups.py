"""Critic-free group estimators, GSPO, dual clip, the KL loss and the DAPO pieces.

Each function is checked against an independent float64 NumPy version written as plain loops (on
ragged masks with an all-zero row and an all-equal group), on a group of 4 worked out by hand,
under jit / vmap, and (for the batch-wide reductions) under pmap / shard_map with ``axis_name``
on the 8 simulated CPU devices of conftest.py.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrlhf import core

G = 4
T = 6
# Three groups of four; row 2 and row 11 are all-zero.
ROW_LENGTHS = [6, 3, 0, 5, 1, 6, 2, 4, 3, 3, 6, 0]
B = len(ROW_LENGTHS)
# Group 1 is all-equal (0.7 is not exact in binary: r - mean(r) need not cancel on its own).
SCORES = np.array([0.3, -1.2, 0.8, 2.0, 0.7, 0.7, 0.7, 0.7, 1.0, 0.0, 1.0, -0.5], np.float32)


def ragged_mask(lengths=ROW_LENGTHS, t=T):
    mask = np.zeros((len(lengths), t), np.float32)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1.0
    return mask


def assert_finite_close(actual, expected, atol=1e-5, rtol=1e-5):
    actual = np.asarray(actual, np.float64)
    assert np.all(np.isfinite(actual)), actual
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_logprobs(rng, shape=(B, T), noise=0.3):
    old = -rng.exponential(size=shape).astype(np.float32)
    new = (old + rng.normal(size=shape) * noise).astype(np.float32)
    return new, old


# ----------------------------------------------------------------------------- NumPy references


def np_groups(scores, group_size):
    return [[float(s) for s in scores[g : g + group_size]] for g in range(0, len(scores), group_size)]


def np_grpo(scores, group_size, eps=1e-6):
    out = []
    for group in np_groups(scores, group_size):
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        out += [0.0 if max(group) == min(group) else (r - mean) / (std + eps) for r in group]
    return np.array(out)


def np_drgrpo(scores, group_size):
    out = []
    for group in np_groups(scores, group_size):
        mean = sum(group) / len(group)
        out += [0.0 if max(group) == min(group) else r - mean for r in group]
    return np.array(out)


def np_rloo(scores, group_size):
    out = []
    for group in np_groups(scores, group_size):
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            out.append(0.0 if max(group) == min(group) else r - sum(others) / len(others))
    return np.array(out)


def np_kl(lp, ref, kind):
    d = float(ref) - float(lp)
    return {"k1": -d, "k2": d * d / 2, "k3": math.exp(d) - d - 1, "abs": abs(d)}[kind]


def np_reinforce_pp(scores, logprobs, ref_logprobs, mask, kl_coef, kind, gamma, baseline_group_size=None):
    if baseline_group_size is not None:
        scores = np_drgrpo(scores, baseline_group_size)
    n_rows, n_t = mask.shape
    returns = np.zeros((n_rows, n_t))
    for b in range(n_rows):
        valid = [t for t in range(n_t) if mask[b, t]]
        rewards = {t: -kl_coef * np_kl(logprobs[b, t], ref_logprobs[b, t], kind) for t in valid}
        if valid:
            rewards[valid[-1]] += float(scores[b])
        running = 0.0
        for t in reversed(valid):
            running = rewards[t] + gamma * running
            returns[b, t] = running
    values = [returns[b, t] for b in range(n_rows) for t in range(n_t) if mask[b, t]]
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    out = np.zeros((n_rows, n_t))
    for b in range(n_rows):
        for t in range(n_t):
            if mask[b, t]:
                out[b, t] = (returns[b, t] - mean) / math.sqrt(var + 1e-8)
    return out


def np_overlong(lengths, max_len, buffer):
    out = []
    for n in lengths:
        if n <= max_len - buffer:
            out.append(0.0)
        elif n <= max_len:
            out.append((max_len - buffer - n) / buffer)
        else:
            out.append(-1.0)
    return np.array(out)


def np_ppo_per_token(ratio, a, eps_low, eps_high, dual_clip=None):
    pg = max(-a * ratio, -a * min(max(ratio, 1 - eps_low), 1 + eps_high))
    if dual_clip is not None and a < 0:
        pg = min(pg, -a * dual_clip)
    return pg


def np_aggregate(per_token, mask, agg, max_len=None):
    rows = [b for b in range(mask.shape[0]) if mask[b].sum() > 0]
    if agg == "token-mean":
        n = mask.sum()
        return sum(per_token[b, t] for b, t in np.ndindex(mask.shape) if mask[b, t]) / max(n, 1)
    per_row = []
    for b in rows:
        total = sum(per_token[b, t] for t in range(mask.shape[1]) if mask[b, t])
        if agg == "seq-mean-token-mean":
            per_row.append(total / mask[b].sum())
        elif agg == "seq-mean-token-sum":
            per_row.append(total)
        else:
            per_row.append(total / (mask.shape[1] if max_len is None else max_len))
    return sum(per_row) / max(len(per_row), 1)


def np_seq_ratios(logprobs, old_logprobs, mask):
    out = []
    for b in range(mask.shape[0]):
        valid = [t for t in range(mask.shape[1]) if mask[b, t]]
        log_ratio = sum(float(logprobs[b, t]) - float(old_logprobs[b, t]) for t in valid) / max(len(valid), 1)
        out.append(math.exp(log_ratio))
    return out


def np_gspo_loss(logprobs, old_logprobs, advantages, mask, eps_low, eps_high, agg="seq-mean-token-mean"):
    seq_ratio = np_seq_ratios(logprobs, old_logprobs, mask)
    per_token = np.zeros(mask.shape)
    for b, t in np.ndindex(mask.shape):
        per_token[b, t] = np_ppo_per_token(seq_ratio[b], float(advantages[b, t]), eps_low, eps_high)
    return np_aggregate(per_token, mask, agg)


# ----------------------------------------------------------------------------- outcome advantages


@pytest.mark.parametrize(
    "fn, reference",
    [(core.grpo_advantages, np_grpo), (core.drgrpo_advantages, np_drgrpo), (core.rloo_advantages, np_rloo)],
)
def test_group_advantages_match_numpy(fn, reference):
    advantages = fn(SCORES, G)
    assert advantages.shape == (B,)
    assert_finite_close(advantages, reference(SCORES, G))
    np.testing.assert_array_equal(np.asarray(advantages)[4:8], 0.0)  # the all-equal group: exactly 0


@pytest.mark.parametrize("fn", [core.grpo_advantages, core.drgrpo_advantages, core.rloo_advantages])
@pytest.mark.parametrize("value", [0.1, 0.7, 1.0 / 3.0, 0.0, -2.5])
def test_all_equal_group_is_exactly_zero(fn, value):
    scores = jnp.full((2 * G,), value, jnp.float32)
    advantages = np.asarray(fn(scores, G))
    assert np.all(advantages == 0.0), advantages


def test_remax_matches_numpy(rng):
    greedy_P = rng.normal(size=(B // G,)).astype(np.float32)
    expected = [float(SCORES[b]) - float(greedy_P[b // G]) for b in range(B)]
    assert_finite_close(core.remax_advantages(SCORES, greedy_P, G), expected)
    # One sample per prompt (the paper's setting): the baseline is per row.
    greedy_B = rng.normal(size=(B,)).astype(np.float32)
    assert_finite_close(core.remax_advantages(SCORES, greedy_B), SCORES.astype(np.float64) - greedy_B)


def test_broadcast_over_tokens_matches_numpy():
    mask = ragged_mask()
    expected = np.zeros((B, T))
    for b, t in np.ndindex(mask.shape):
        if mask[b, t]:
            expected[b, t] = SCORES[b]
    got = core.broadcast_over_tokens(SCORES, mask)
    assert_finite_close(got, expected)
    np.testing.assert_array_equal(np.asarray(got)[2], 0.0)


@pytest.mark.parametrize("kind", ["k1", "k3"])
@pytest.mark.parametrize("baseline", [None, G])
def test_reinforce_pp_matches_numpy(rng, kind, baseline):
    logprobs, ref_logprobs = random_logprobs(rng)
    mask = ragged_mask()
    got = core.reinforce_pp_advantages(
        SCORES, logprobs, ref_logprobs, mask, 0.1, kind, gamma=0.9, baseline_group_size=baseline
    )
    expected = np_reinforce_pp(SCORES, logprobs, ref_logprobs, mask, 0.1, kind, 0.9, baseline)
    assert_finite_close(got, expected)
    np.testing.assert_array_equal(np.asarray(got)[[2, 11]], 0.0)


def test_reinforce_pp_all_zero_mask_and_all_equal_scores_are_finite(rng):
    logprobs, ref_logprobs = random_logprobs(rng)
    zeros = np.zeros((B, T), np.float32)
    for baseline in (None, G):
        got = core.reinforce_pp_advantages(SCORES, logprobs, ref_logprobs, zeros, 0.1, baseline_group_size=baseline)
        np.testing.assert_array_equal(got, 0.0)
        flat = core.reinforce_pp_advantages(
            jnp.full((B,), 0.7), logprobs, logprobs, ragged_mask(), 0.0, baseline_group_size=baseline
        )
        if baseline:
            np.testing.assert_array_equal(flat, 0.0)  # centred scores are exactly 0, and so are their returns
        else:
            # All returns equal 0.7: float32 rounding of the mean (~1e-8) over sqrt(0 + 1e-8) leaves
            # O(1e-3) noise; masked_whiten's epsilon, not a NaN.
            assert_finite_close(flat, 0.0, atol=5e-3)


# ----------------------------------------------------------------------------- hand-worked group

GROUP = jnp.array([1.0, 0.0, 0.0, 1.0])  # four responses to one prompt: right, wrong, wrong, right


def test_group_of_four_by_hand():
    # GRPO: mean = 0.5; deviations +-0.5; Bessel variance = (4 * 0.25) / 3 = 1/3, std = 0.577350;
    #   A = +-0.5 / (0.577350 + 1e-6) = +-0.866024
    np.testing.assert_allclose(core.grpo_advantages(GROUP, 4), [0.866024, -0.866024, -0.866024, 0.866024], atol=1e-6)
    # Dr. GRPO: A = r - 0.5
    np.testing.assert_allclose(core.drgrpo_advantages(GROUP, 4), [0.5, -0.5, -0.5, 0.5], atol=1e-7)
    # RLOO: a right answer's other three are [0, 0, 1], mean 1/3: A = 1 - 1/3 = 2/3;
    #       a wrong answer's other three are [1, 0, 1], mean 2/3: A = 0 - 2/3 = -2/3.
    #       (= 4/3 * Dr. GRPO)
    np.testing.assert_allclose(core.rloo_advantages(GROUP, 4), [2 / 3, -2 / 3, -2 / 3, 2 / 3], atol=1e-6)
    # ReMax: the greedy answer was right (score 1): A = r - 1; had it been wrong (0): A = r.
    np.testing.assert_allclose(core.remax_advantages(GROUP, jnp.array([1.0]), 4), [0.0, -1.0, -1.0, 0.0])
    np.testing.assert_allclose(core.remax_advantages(GROUP, jnp.array([0.0]), 4), [1.0, 0.0, 0.0, 1.0])


def test_reinforce_pp_group_of_four_by_hand():
    # Responses of 2, 1, 3 and 2 tokens, no KL penalty (beta = 0), gamma = 1: every token's return
    # is its response's score. The valid tokens' returns are [1, 1 | 0 | 0, 0, 0 | 1, 1]:
    #   n = 8, mean = 4/8 = 0.5, Bessel variance = 8 * 0.25 / 7 = 2/7,
    #   A = +-0.5 / sqrt(2/7 + 1e-8) = +-0.5 * 1.870829 = +-0.935414
    # (the whitening counts tokens, so it is not GRPO's +-0.866 of one number per response).
    mask = ragged_mask([2, 1, 3, 2], t=3)
    zeros = jnp.zeros((4, 3))
    a = 0.935414
    expected = [[a, a, 0], [-a, 0, 0], [-a, -a, -a], [a, a, 0]]
    np.testing.assert_allclose(core.reinforce_pp_advantages(GROUP, zeros, zeros, mask, 0.0), expected, atol=1e-6)
    # REINFORCE++-baseline: scores minus the group mean first, [0.5, -0.5, -0.5, 0.5]; the token
    # values are [.5, .5 | -.5 | -.5, -.5, -.5 | .5, .5], mean 0, the same variance 2/7: the same
    # advantages (with one group the whitening absorbs the shift).
    got = core.reinforce_pp_advantages(GROUP, zeros, zeros, mask, 0.0, baseline_group_size=4)
    np.testing.assert_allclose(got, expected, atol=1e-6)


# ----------------------------------------------------------------------------- DAPO pieces


def test_overlong_reward_shaping_by_hand():
    # L_max = 20, L_c = 5: no penalty up to 15 tokens, then -1/5 per extra token, -1 at 20.
    lengths = jnp.array([10, 15, 16, 18, 20, 25])
    expected = [0.0, 0.0, -0.2, -0.6, -1.0, -1.0]
    np.testing.assert_allclose(core.overlong_reward_shaping(lengths, 20, 5), expected, atol=1e-7)
    np.testing.assert_allclose(np_overlong([10, 15, 16, 18, 20, 25], 20, 5), expected)


def test_overlong_reward_shaping_matches_numpy_under_jit(rng):
    lengths = rng.integers(0, 33, size=(17,))
    fn = jax.jit(core.overlong_reward_shaping)  # L_max and L_c traced: hyper-parameters are data
    assert_finite_close(fn(lengths, 32.0, 8.0), np_overlong(lengths, 32, 8))
    mask = ragged_mask()
    lengths_from_mask = core.masked_count(mask, axis=-1)
    assert_finite_close(core.overlong_reward_shaping(lengths_from_mask, 6, 2), np_overlong(ROW_LENGTHS, 6, 2))


def test_dynamic_sampling_by_hand():
    # Five groups of two: [1, 1] no signal, [0, 1] signal, [0, 0] no, [1, 0] signal, [.5, .5] no.
    scores = jnp.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.5, 0.5])
    np.testing.assert_array_equal(core.group_has_signal(scores, 2), [False, True, False, True, False])
    np.testing.assert_allclose(core.group_signal_fraction(scores, 2), 2 / 5)
    # K = 2: the two groups with signal, in batch order, rows [2, 3] and [6, 7]; both valid.
    sel = core.select_groups_with_signal(scores, 2, 2)
    np.testing.assert_array_equal(sel.group_indices_K, [1, 3])
    np.testing.assert_array_equal(sel.row_indices_R, [2, 3, 6, 7])
    np.testing.assert_array_equal(sel.group_valid_K, [True, True])
    np.testing.assert_array_equal(sel.row_valid_R, [True] * 4)
    np.testing.assert_allclose(sel.signal_fraction, 0.4)
    # K = 4: only two have signal; the first two signal-less groups (0 and 2) fill in, masked.
    sel = core.select_groups_with_signal(scores, 2, 4)
    np.testing.assert_array_equal(sel.group_indices_K, [1, 3, 0, 2])
    np.testing.assert_array_equal(sel.row_indices_R, [2, 3, 6, 7, 0, 1, 4, 5])
    np.testing.assert_array_equal(sel.group_valid_K, [True, True, False, False])
    np.testing.assert_array_equal(sel.row_valid_R, [True] * 4 + [False] * 4)


def test_dynamic_sampling_matches_numpy_and_jit(rng):
    group_size, n_groups, keep = 3, 11, 5
    scores = rng.integers(0, 2, size=(n_groups * group_size,)).astype(np.float32)
    groups = np_groups(scores, group_size)
    signal = [max(g) != min(g) for g in groups]
    order = [p for p in range(n_groups) if signal[p]] + [p for p in range(n_groups) if not signal[p]]
    fn = jax.jit(core.select_groups_with_signal, static_argnums=(1, 2))
    sel = fn(scores, group_size, keep)
    np.testing.assert_array_equal(sel.group_indices_K, order[:keep])
    np.testing.assert_array_equal(sel.group_valid_K, [signal[p] for p in order[:keep]])
    np.testing.assert_array_equal(sel.row_indices_R, [p * group_size + i for p in order[:keep] for i in range(3)])
    np.testing.assert_allclose(sel.signal_fraction, sum(signal) / n_groups, rtol=1e-6)
    # The kept rows' scores are the selected groups' scores.
    np.testing.assert_array_equal(scores[np.asarray(sel.row_indices_R)], [s for p in order[:keep] for s in groups[p]])


# ----------------------------------------------------------------------------- losses


def test_dual_clip_by_hand():
    # eps = 0.2, c = 3; four tokens (ratio = e^(logp - old_logp)):
    #   A = -1, ratio e^1.5 = 4.4817: PPO max(4.4817, 1.2) = 4.4817; dual clip min(4.4817, 3) = 3
    #   A = -1, ratio e^ln2 = 2:      PPO max(2, 1.2) = 2;            below the bound 3: stays 2
    #   A = +1, ratio 4.4817:         PPO max(-4.4817, -1.2) = -1.2;  A > 0: no dual clip
    #   A = -2, ratio e^ln0.5 = 0.5:  PPO max(1.0, 1.6) = 1.6;        bound 6: stays 1.6
    #   token-mean = (3 + 2 - 1.2 + 1.6) / 4 = 1.35; one token of four dual-clipped.
    logprobs = jnp.array([[1.5, math.log(2.0), 1.5, math.log(0.5)]])
    old = jnp.zeros((1, 4))
    advantages = jnp.array([[-1.0, -1.0, 1.0, -2.0]])
    mask = jnp.ones((1, 4))
    loss, stats = core.ppo_policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, dual_clip=3.0)
    np.testing.assert_allclose(loss, 1.35, atol=1e-6)
    np.testing.assert_allclose(stats["dual_clipfrac"], 0.25)
    plain, plain_stats = core.ppo_policy_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    np.testing.assert_allclose(plain, (4.481689 + 2 - 1.2 + 1.6) / 4, atol=1e-6)
    assert "dual_clipfrac" not in plain_stats  # default: unchanged PPO, unchanged stats
    # Gradients: the dual-clipped token and the clipped ones get none; token 1: -A * ratio / 4 = 0.5.
    dual_loss = lambda lp: core.ppo_policy_loss(lp, old, advantages, mask, clip_eps=0.2, dual_clip=3.0)[0]  # noqa: E731
    grad = jax.grad(dual_loss)(logprobs)
    np.testing.assert_allclose(grad, [[0.0, 0.5, 0.0, 0.0]], atol=1e-6)
    # c may be traced (it lives in the train state): same numbers under jit.
    jitted = jax.jit(lambda c: core.ppo_policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, dual_clip=c)[0])
    np.testing.assert_allclose(jitted(3.0), 1.35, atol=1e-6)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_dual_clip_matches_numpy(rng, agg):
    logprobs, old = random_logprobs(rng, noise=1.0)
    advantages = rng.normal(size=(B, T)).astype(np.float32)
    mask = ragged_mask()
    loss, stats = core.ppo_policy_loss(logprobs, old, advantages, mask, 0.2, 0.28, agg=agg, dual_clip=2.0)
    per_token = np.zeros((B, T))
    dual = 0
    for b, t in np.ndindex(mask.shape):
        ratio = math.exp(float(logprobs[b, t]) - float(old[b, t]))
        per_token[b, t] = np_ppo_per_token(ratio, float(advantages[b, t]), 0.2, 0.28, 2.0)
        dual += mask[b, t] and per_token[b, t] < np_ppo_per_token(ratio, float(advantages[b, t]), 0.2, 0.28)
    assert dual > 0
    assert_finite_close(loss, np_aggregate(per_token, mask, agg))
    assert_finite_close(stats["dual_clipfrac"], dual / mask.sum())


@pytest.mark.parametrize("max_len", [None, 10.0])
def test_seq_mean_token_sum_norm_matches_numpy(rng, max_len):
    x = rng.normal(size=(B, T)).astype(np.float32)
    mask = ragged_mask()
    got = core.aggregate_loss(x, mask, "seq-mean-token-sum-norm", max_len=max_len)
    assert_finite_close(got, np_aggregate(x, mask, "seq-mean-token-sum-norm", max_len))
    # = seq-mean-token-sum / max_len, the constant normaliser of Dr. GRPO.
    sum_agg = core.aggregate_loss(x, mask, "seq-mean-token-sum")
    assert_finite_close(got, float(sum_agg) / (T if max_len is None else max_len))
    assert float(core.aggregate_loss(x, np.zeros_like(mask), "seq-mean-token-sum-norm")) == 0.0
    assert "seq-mean-token-sum-norm" in core.LOSS_AGGREGATIONS


@pytest.mark.parametrize("variant", ["seq", "token"])
@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_gspo_matches_numpy(rng, variant, agg):
    logprobs, old = random_logprobs(rng, noise=0.05)
    mask = ragged_mask()
    advantages = np.asarray(core.broadcast_over_tokens(core.grpo_advantages(SCORES, G), mask))
    loss, stats = core.gspo_policy_loss(logprobs, old, advantages, mask, 0.01, 0.02, variant=variant, agg=agg)
    assert_finite_close(loss, np_gspo_loss(logprobs, old, advantages, mask, 0.01, 0.02, agg))
    seq_ratio = [r for b, r in enumerate(np_seq_ratios(logprobs, old, mask)) if ROW_LENGTHS[b]]
    assert_finite_close(stats["seq_ratio_mean"], np.mean(seq_ratio))
    assert_finite_close(stats["seq_ratio_max"], max(seq_ratio))
    assert_finite_close(stats["seq_ratio_min"], min(seq_ratio))
    assert 0 < float(stats["clipfrac"]) < 1
    assert all(np.isfinite(v) for v in stats.values())


def test_gspo_all_zero_mask_is_finite(rng):
    logprobs, old = random_logprobs(rng)
    zeros = np.zeros((B, T), np.float32)
    for variant in core.GSPO_VARIANTS:
        loss, stats = core.gspo_policy_loss(logprobs, old, np.ones((B, T), np.float32), zeros, variant=variant)
        assert float(loss) == 0.0 and all(np.isfinite(v) for v in stats.values())
        ones = np.ones((B, T), np.float32)
        grad = jax.grad(lambda lp: core.gspo_policy_loss(lp, old, ones, zeros, variant=variant)[0])(
            jnp.asarray(logprobs)
        )
        np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("variant", ["seq", "token"])
def test_gspo_with_one_token_per_response_is_token_level_ppo(rng, variant):
    # One valid token per row (at different positions; row 3 empty): s_i is that token's ratio.
    logprobs, old = random_logprobs(rng, shape=(6, 5), noise=0.4)
    advantages = rng.normal(size=(6, 5)).astype(np.float32)
    mask = np.zeros((6, 5), np.float32)
    for b, t in enumerate([0, 4, 2, None, 1, 3]):
        if t is not None:
            mask[b, t] = 1.0

    def gspo(lp):
        return core.gspo_policy_loss(lp, old, advantages, mask, 0.2, 0.28, variant=variant)

    def ppo(lp):
        return core.ppo_policy_loss(lp, old, advantages, mask, 0.2, 0.28)

    (g_loss, g_stats), (p_loss, p_stats) = gspo(logprobs), ppo(logprobs)
    np.testing.assert_allclose(g_loss, p_loss, rtol=1e-6)
    np.testing.assert_allclose(g_stats["clipfrac"], p_stats["clipfrac"])
    assert 0 < float(p_stats["clipfrac"]) < 1
    grad_of = lambda f: jax.grad(lambda lp: f(lp)[0])(jnp.asarray(logprobs))  # noqa: E731
    np.testing.assert_allclose(grad_of(gspo), grad_of(ppo), atol=1e-7)
    # And with T = 1 arrays.
    one = lambda a: a[:, :1]  # noqa: E731
    g1 = core.gspo_policy_loss(one(logprobs), one(old), one(advantages), np.ones((6, 1)), 0.2, 0.28, variant=variant)
    p1 = core.ppo_policy_loss(one(logprobs), one(old), one(advantages), np.ones((6, 1)), 0.2, 0.28)
    np.testing.assert_allclose(g1[0], p1[0], rtol=1e-6)


def reference_gspo_objective(logprobs, old_logprobs, advantages_B, lengths, eps_low, eps_high):
    """The paper's formula, written per sequence in jnp (float64 under x64):
    loss = -1/N sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i), N = non-empty rows."""
    terms = []
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        s_i = jnp.exp(jnp.sum(logprobs[i, :n] - old_logprobs[i, :n]) / n)
        terms.append(jnp.minimum(s_i * advantages_B[i], jnp.clip(s_i, 1 - eps_low, 1 + eps_high) * advantages_B[i]))
    return -sum(terms) / len(terms)


def np_gspo_token_grad(logprobs, old_logprobs, advantages, mask, eps_low, eps_high):
    """GSPO-token's gradient (paper, eq. for s_it): -1/N * s_i / |y_i| * A_it per unclipped token."""
    seq_ratio = np_seq_ratios(logprobs, old_logprobs, mask)
    n_rows = sum(1 for row in mask if row.sum() > 0)
    grad = np.zeros(mask.shape)
    for b, t in np.ndindex(mask.shape):
        if not mask[b, t]:
            continue
        s, a = seq_ratio[b], float(advantages[b, t])
        clipped_wins = -a * min(max(s, 1 - eps_low), 1 + eps_high) > -a * s
        grad[b, t] = 0.0 if clipped_wins else -a * s / (mask[b].sum() * n_rows)
    return grad


@pytest.mark.slow
def test_gspo_gradient_equals_float64_reference(rng):
    eps_low, eps_high = 0.01, 0.02
    logprobs, old = (a.astype(np.float64) for a in random_logprobs(rng, noise=0.05))
    mask = ragged_mask().astype(np.float64)
    adv_B = np.asarray(core.grpo_advantages(SCORES, G), np.float64)
    adv_BxT = adv_B[:, None] * mask
    ratios = np_seq_ratios(logprobs, old, mask)
    clipped = [
        -a * min(max(r, 1 - eps_low), 1 + eps_high) > -a * r for r, a, n in zip(ratios, adv_B, ROW_LENGTHS) if n and a
    ]
    assert any(clipped) and not all(clipped)  # rows with and without gradient

    def ours(lp, dtype, variant, adv=adv_BxT):
        cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
        return core.gspo_policy_loss(lp, cast(old), cast(adv), cast(mask), eps_low, eps_high, variant=variant)[0]

    with jax.enable_x64(True):
        lp64 = jnp.asarray(logprobs, jnp.float64)
        ref_args = (jnp.asarray(old), jnp.asarray(adv_B), ROW_LENGTHS, eps_low, eps_high)
        ref_loss = reference_gspo_objective(lp64, *ref_args)
        ref_grad = jax.grad(reference_gspo_objective)(lp64, *ref_args)
        assert np.count_nonzero(ref_grad) > 0
        for variant in core.GSPO_VARIANTS:
            np.testing.assert_allclose(ours(lp64, jnp.float64, variant), ref_loss, atol=1e-12)
            np.testing.assert_allclose(jax.grad(ours)(lp64, jnp.float64, variant), ref_grad, atol=1e-12)
        # GSPO-token with per-token advantages: the paper's gradient, s_i / |y_i| * A_it per token.
        adv_tok = rng.normal(size=(B, T)) * mask
        expected = np_gspo_token_grad(logprobs, old, adv_tok, mask, eps_low, eps_high)
        np.testing.assert_allclose(jax.grad(ours)(lp64, jnp.float64, "token", adv_tok), expected, atol=1e-12)
    lp32 = jnp.asarray(logprobs, jnp.float32)
    for variant in core.GSPO_VARIANTS:
        np.testing.assert_allclose(jax.grad(ours)(lp32, jnp.float32, variant), ref_grad, atol=1e-6)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_kl_loss_matches_numpy(rng, kind, agg):
    logprobs, ref = random_logprobs(rng)
    mask = ragged_mask()
    per_token = np.zeros((B, T))
    for b, t in np.ndindex(mask.shape):
        per_token[b, t] = np_kl(logprobs[b, t], ref[b, t], kind)
    loss, stats = core.kl_loss(logprobs, ref, mask, kind, agg)
    assert_finite_close(loss, np_aggregate(per_token, mask, agg))
    assert_finite_close(stats["kl_loss"], float(loss))


def test_kl_loss_expected_gradients_are_what_the_docstring_says():
    """E_{a ~ pi}[grad of the per-token estimate], summed exactly over a 5-token vocabulary."""
    with jax.enable_x64(True):
        theta = jnp.array([0.3, -1.0, 0.8, 0.0, -0.4])
        ref_logprobs = jax.nn.log_softmax(jnp.array([0.0, 0.5, -0.5, 1.0, -1.2]))
        pi = jax.nn.softmax(theta)

        def expected_grad(kind):
            def per_sample_loss(th, a):
                lp = jax.nn.log_softmax(th)[a]
                return core.kl_loss(lp[None, None], ref_logprobs[a][None, None], jnp.ones((1, 1)), kind)[0]

            return sum(pi[a] * jax.grad(per_sample_loss)(theta, a) for a in range(5))

        def reverse_kl(th):
            logp = jax.nn.log_softmax(th)
            return jnp.sum(jnp.exp(logp) * (logp - ref_logprobs))

        def forward_kl(th):
            return jnp.sum(jnp.exp(ref_logprobs) * (ref_logprobs - jax.nn.log_softmax(th)))

        def total_variation(th):
            return 0.5 * jnp.sum(jnp.abs(jax.nn.softmax(th) - jnp.exp(ref_logprobs)))

        np.testing.assert_allclose(expected_grad("k1"), 0.0, atol=1e-12)
        np.testing.assert_allclose(expected_grad("k2"), jax.grad(reverse_kl)(theta), atol=1e-12)
        np.testing.assert_allclose(expected_grad("k3"), jax.grad(forward_kl)(theta), atol=1e-12)
        np.testing.assert_allclose(expected_grad("abs"), 2 * jax.grad(total_variation)(theta), atol=1e-12)
        assert not np.allclose(jax.grad(forward_kl)(theta), jax.grad(reverse_kl)(theta), atol=1e-3)  # k3 is biased


# ----------------------------------------------------------------------------- jit / vmap


def _everything(b):
    mask = b["mask"]
    grpo = core.grpo_advantages(b["scores"], G)
    return {
        "grpo": grpo,
        "drgrpo": core.drgrpo_advantages(b["scores"], G),
        "rloo": core.rloo_advantages(b["scores"], G),
        "remax": core.remax_advantages(b["scores"], b["greedy"], G),
        "broadcast": core.broadcast_over_tokens(grpo, mask),
        "reinforce_pp": core.reinforce_pp_advantages(b["scores"], b["logprobs"], b["old"], mask, 0.1, "k3", 0.9),
        "reinforce_pp_baseline": core.reinforce_pp_advantages(
            b["scores"], b["logprobs"], b["old"], mask, 0.1, baseline_group_size=G
        ),
        "overlong": core.overlong_reward_shaping(core.masked_count(mask, axis=-1), 6, 2),
        "signal": core.group_has_signal(b["scores"], G),
        "signal_fraction": core.group_signal_fraction(b["scores"], G),
        "selection": core.select_groups_with_signal(b["scores"], G, 2),
        "gspo": core.gspo_policy_loss(
            b["logprobs"], b["old"], core.broadcast_over_tokens(grpo, mask), mask, 0.01, 0.02
        ),
        "gspo_token": core.gspo_policy_loss(b["logprobs"], b["old"], b["adv"], mask, 0.01, 0.02, variant="token"),
        "dual_clip": core.ppo_policy_loss(b["logprobs"], b["old"], b["adv"], mask, dual_clip=2.0),
        "norm_agg": core.aggregate_loss(b["adv"], mask, "seq-mean-token-sum-norm"),
        "kl_loss": core.kl_loss(b["logprobs"], b["old"], mask),
    }


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(3)
    logprobs, old = random_logprobs(rng, noise=0.05)
    return dict(
        scores=SCORES,
        greedy=rng.normal(size=(B // G,)).astype(np.float32),
        logprobs=logprobs,
        old=old,
        adv=rng.normal(size=(B, T)).astype(np.float32),
        mask=ragged_mask(),
    )


def _assert_trees_close(actual, expected, atol=1e-6):
    flat_a, tree_a = jax.tree.flatten(actual)
    flat_e, tree_e = jax.tree.flatten(expected)
    assert tree_a == tree_e
    for a, e in zip(flat_a, flat_e):
        assert np.all(np.isfinite(np.asarray(a, np.float64)))
        np.testing.assert_allclose(a, e, atol=atol, rtol=1e-6)


def test_jit_matches_eager(batch):
    _assert_trees_close(jax.jit(_everything)(batch), _everything(batch))


def test_vmap_over_stacked_batches_matches_loop(batch):
    # A leading run axis: three copies of the batch with different scores and log-probs.
    rng = np.random.default_rng(4)
    stacked = {k: np.stack([v] * 3) for k, v in batch.items()}
    stacked["scores"] = stacked["scores"] + rng.integers(0, 2, size=(3, B)).astype(np.float32)
    stacked["logprobs"] = stacked["logprobs"] + 0.01 * rng.normal(size=(3, B, T)).astype(np.float32)
    vmapped = jax.jit(jax.vmap(_everything))(stacked)
    jitted = jax.jit(_everything)
    looped = [jitted(jax.tree.map(lambda a: a[i], stacked)) for i in range(3)]
    _assert_trees_close(vmapped, jax.tree.map(lambda *xs: jnp.stack(xs), *looped))


# ----------------------------------------------------------------------------- devices

N_DEV = 8
G_DEV = 2  # one group of two rows per device
B_DEV = N_DEV * G_DEV


@pytest.fixture(scope="module")
def device_batch():
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, T + 1, size=B_DEV)
    lengths[3] = 0  # an all-zero row
    lengths[8:10] = 0  # a device whose rows are all empty
    scores = rng.integers(0, 3, size=B_DEV).astype(np.float32)
    scores[4:6] = 1.0  # an all-equal group
    logprobs, old = random_logprobs(rng, shape=(B_DEV, T), noise=0.05)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    adv = rng.normal(size=(B_DEV, T)).astype(np.float32)
    return dict(scores=scores, logprobs=logprobs, old=old, mask=mask, adv=adv)


def _batch_wide(b, axis_name=None, with_scan=True):
    mask = b["mask"]
    grpo_BxT = core.broadcast_over_tokens(core.grpo_advantages(b["scores"], G_DEV), mask)
    per_row = {"grpo": grpo_BxT}
    if with_scan:
        per_row["reinforce_pp"] = core.reinforce_pp_advantages(
            b["scores"], b["logprobs"], b["old"], mask, 0.1, "k3", 0.9, axis_name=axis_name
        )
        per_row["reinforce_pp_baseline"] = core.reinforce_pp_advantages(
            b["scores"], b["logprobs"], b["old"], mask, 0.1, baseline_group_size=G_DEV, axis_name=axis_name
        )
    scalars = {
        "signal_fraction": core.group_signal_fraction(b["scores"], G_DEV, axis_name=axis_name),
        "gspo": core.gspo_policy_loss(b["logprobs"], b["old"], grpo_BxT, mask, 0.01, 0.02, axis_name=axis_name),
        "gspo_token": core.gspo_policy_loss(
            b["logprobs"], b["old"], b["adv"], mask, 0.01, 0.02, variant="token", axis_name=axis_name
        ),
        "dual_clip": core.ppo_policy_loss(b["logprobs"], b["old"], b["adv"], mask, dual_clip=2.0, axis_name=axis_name),
        "norm_agg": core.aggregate_loss(b["adv"], mask, "seq-mean-token-sum-norm", axis_name=axis_name),
        "kl_loss": core.kl_loss(b["logprobs"], b["old"], mask, axis_name=axis_name),
    }
    return per_row, scalars


@pytest.mark.slow
def test_pmap_with_axis_name_equals_one_device(device_batch):
    assert jax.device_count() >= N_DEV
    whole_rows, whole_scalars = _batch_wide(device_batch)
    sharded = jax.tree.map(lambda a: a.reshape((N_DEV, G_DEV) + a.shape[1:]), device_batch)
    fn = jax.pmap(functools.partial(_batch_wide, axis_name="batch"), axis_name="batch")
    rows, scalars = jax.block_until_ready(fn(sharded))
    _assert_trees_close(jax.tree.map(lambda a: a.reshape((B_DEV,) + a.shape[2:]), rows), whole_rows)
    _assert_trees_close(scalars, jax.tree.map(lambda v: np.broadcast_to(v, (N_DEV,)), whole_scalars))
    # Without axis_name the whitening would be per device: check that the test can tell.
    local = jax.block_until_ready(jax.pmap(_batch_wide)(sharded))[0]["reinforce_pp"].reshape(B_DEV, T)
    assert not np.allclose(local, whole_rows["reinforce_pp"], atol=1e-3)


def _shard_mapped(fn, check_vma):
    mesh = jax.make_mesh((N_DEV,), ("batch",))
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=(P("batch"),), out_specs=(P("batch"), P()), check_vma=check_vma)
    return jax.jit(mapped), jax.sharding.NamedSharding(mesh, P("batch"))


def test_shard_map_with_axis_name_equals_one_device(device_batch):
    whole_rows, whole_scalars = _batch_wide(device_batch)
    # shard_map's default check_vma=True: the reverse scans' carries vary per device like the rows.
    fn, sharding = _shard_mapped(functools.partial(_batch_wide, axis_name="batch"), check_vma=True)
    rows, scalars = jax.block_until_ready(fn(jax.device_put(device_batch, sharding)))
    _assert_trees_close(rows, whole_rows)
    _assert_trees_close(scalars, whole_scalars)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn", [core.grpo_advantages, core.drgrpo_advantages, core.rloo_advantages])
def test_group_of_one_is_a_clear_error(fn):
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        fn(jnp.zeros((8,)), 1)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        core.reinforce_pp_advantages(
            jnp.zeros((8,)), jnp.zeros((8, 3)), jnp.zeros((8, 3)), jnp.ones((8, 3)), 0.1, baseline_group_size=1
        )


@pytest.mark.parametrize(
    "call",
    [
        lambda s: core.grpo_advantages(s, 4),
        lambda s: core.drgrpo_advantages(s, 4),
        lambda s: core.rloo_advantages(s, 4),
        lambda s: core.remax_advantages(s, jnp.zeros((1,)), 4),
        lambda s: core.group_has_signal(s, 4),
        lambda s: core.select_groups_with_signal(s, 4, 1),
    ],
)
def test_batch_not_divisible_by_group_size_is_a_clear_error(call):
    with pytest.raises(ValueError, match="not a whole number of groups of 4"):
        call(jnp.zeros((6,)))


ZEROS_2x3 = jnp.zeros((2, 3))


def test_other_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="static Python int"):
        core.grpo_advantages(jnp.zeros((8,)), 4.0)
    with pytest.raises(ValueError, match="num_keep"):
        core.select_groups_with_signal(jnp.zeros((8,)), 2, 5)
    with pytest.raises(ValueError, match="num_keep"):
        core.select_groups_with_signal(jnp.zeros((8,)), 2, 0)
    with pytest.raises(ValueError, match="buffer"):
        core.overlong_reward_shaping(jnp.zeros((3,)), 20, 0)
    with pytest.raises(ValueError, match="exceeds"):
        core.overlong_reward_shaping(jnp.zeros((3,)), 20, 30)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        core.ppo_policy_loss(ZEROS_2x3, ZEROS_2x3, ZEROS_2x3, jnp.ones((2, 3)), dual_clip=1.0)
    with pytest.raises(ValueError, match=r"seq.*token"):
        core.gspo_policy_loss(ZEROS_2x3, ZEROS_2x3, ZEROS_2x3, jnp.ones((2, 3)), variant="sequence")
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
        core.aggregate_loss(jnp.zeros((2, 3)), jnp.ones((2, 3)), "sum")
    with pytest.raises(AssertionError):  # greedy baseline of the wrong shape: one per prompt
        core.remax_advantages(jnp.zeros((8,)), jnp.zeros((8,)), 4)
