"""Core math against independent float64 NumPy versions, written as plain loops.

Inputs are random with ragged masks: rows of different lengths and one all-zero row.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import core

B, T, V = 6, 7, 11
ROW_LENGTHS = [7, 3, 0, 5, 1, 6]  # row 2 is all-zero


def ragged_mask(lengths=ROW_LENGTHS, t=T):
    mask = np.zeros((len(lengths), t), np.float32)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1.0
    return mask


def valid_positions(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t] != 0]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def assert_finite_close(actual, expected, atol=1e-5, rtol=1e-5):
    actual = np.asarray(actual, np.float64)
    assert np.all(np.isfinite(actual)), actual
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- log-probs


def np_token_logprobs(logits, tokens, temperature):
    out = np.zeros(tokens.shape)
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            z = [float(v) / temperature for v in logits[b, t]]
            top = max(z)
            log_normalizer = top + math.log(sum(math.exp(v - top) for v in z))
            out[b, t] = z[tokens[b, t]] - log_normalizer
    return out


def np_entropy(logits, temperature):
    out = np.zeros(logits.shape[:2])
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            z = [float(v) / temperature for v in logits[b, t]]
            top = max(z)
            total = sum(math.exp(v - top) for v in z)
            probs = [math.exp(v - top) / total for v in z]
            out[b, t] = -sum(p * math.log(p) for p in probs if p > 0)
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_and_entropy_match_numpy(rng, temperature):
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
    assert_finite_close(
        core.token_logprobs(logits, tokens, temperature), np_token_logprobs(logits, tokens, temperature)
    )
    assert_finite_close(core.entropy_from_logits(logits, temperature), np_entropy(logits, temperature))


def test_token_logprobs_bf16_computes_in_float32(rng):
    logits_bf16 = jnp.asarray(rng.normal(size=(B, T, V)) * 3, jnp.bfloat16)
    tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
    logprobs = core.token_logprobs(logits_bf16, tokens)
    entropy = core.entropy_from_logits(logits_bf16)
    assert logprobs.dtype == jnp.float32 and entropy.dtype == jnp.float32
    exact_inputs = np.asarray(logits_bf16.astype(jnp.float32), np.float64)  # the bf16 values, exactly
    assert_finite_close(logprobs, np_token_logprobs(exact_inputs, tokens, 1.0))
    assert_finite_close(entropy, np_entropy(exact_inputs, 1.0))


def test_token_logprobs_builds_no_vocab_sized_one_hot_and_no_float64():
    import jax

    jaxpr = jax.make_jaxpr(core.token_logprobs)(jnp.zeros((2, 3, 1000), jnp.bfloat16), jnp.zeros((2, 3), jnp.int32))
    for eqn in jaxpr.jaxpr.eqns:
        for var in eqn.outvars:
            assert var.aval.dtype != jnp.float64
            if var.aval.shape[-1:] == (1000,):
                # Only the (upcast / scaled) logits themselves may be vocabulary-sized.
                assert var.aval.dtype == jnp.float32, eqn


# ----------------------------------------------------------------------------- KL


def np_kl(logprobs, ref_logprobs, kind):
    out = np.zeros(logprobs.shape)
    for idx in np.ndindex(logprobs.shape):
        d = float(ref_logprobs[idx]) - float(logprobs[idx])
        out[idx] = {"k1": -d, "k2": d * d / 2, "k3": math.exp(d) - d - 1, "abs": abs(d)}[kind]
    return out


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs"])
def test_kl_estimate_matches_numpy(rng, kind):
    logprobs = -rng.exponential(size=(B, T)).astype(np.float32)
    ref_logprobs = -rng.exponential(size=(B, T)).astype(np.float32)
    assert_finite_close(core.kl_estimate(logprobs, ref_logprobs, kind), np_kl(logprobs, ref_logprobs, kind))


def test_kl_k3_nonnegative_and_zero_for_equal_inputs(rng):
    logprobs = -rng.exponential(size=(B, T)).astype(np.float32)
    assert np.all(np.asarray(core.kl_estimate(logprobs, logprobs[::-1], "k3")) >= 0)
    np.testing.assert_array_equal(core.kl_estimate(logprobs, logprobs, "k3"), 0.0)


# ----------------------------------------------------------------------------- stats


def np_masked_stats(x, mask):
    values = [float(x[b, t]) for b, t in valid_positions(mask)]
    n = len(values)
    mean = sum(values) / n if n else 0.0
    biased_var = sum((v - mean) ** 2 for v in values) / n if n else 0.0
    unbiased_var = biased_var * n / (n - 1) if n > 1 else biased_var
    return mean, biased_var, unbiased_var


@pytest.mark.parametrize("lengths", [ROW_LENGTHS, [0] * B, [1, 0, 0, 0, 0, 0]])
def test_masked_stats_match_numpy(rng, lengths):
    x = rng.normal(size=(B, T)).astype(np.float32) * 2 + 1
    mask = ragged_mask(lengths)
    mean, biased_var, unbiased_var = np_masked_stats(x, mask)
    assert_finite_close(core.masked_sum(x, mask), sum(float(x[p]) for p in valid_positions(mask)))
    assert_finite_close(core.masked_mean(x, mask), mean)
    assert_finite_close(core.masked_var(x, mask), unbiased_var)
    assert_finite_close(core.masked_var(x, mask, unbiased=False), biased_var)

    whitened = np.zeros((B, T))
    unshifted = np.zeros((B, T))
    for b, t in valid_positions(mask):
        whitened[b, t] = (x[b, t] - mean) / math.sqrt(unbiased_var + 1e-8)
        unshifted[b, t] = whitened[b, t] + mean
    assert_finite_close(core.masked_whiten(x, mask), whitened, atol=1e-4)
    assert_finite_close(core.masked_whiten(x, mask, shift_mean=False), unshifted, atol=1e-4)


def test_masked_mean_along_axis_matches_numpy(rng):
    x = rng.normal(size=(B, T)).astype(np.float32)
    mask = ragged_mask()
    per_row = [np.mean(x[b, :n]) if n else 0.0 for b, n in enumerate(ROW_LENGTHS)]
    assert_finite_close(core.masked_mean(x, mask, axis=1), per_row)


def test_masked_stats_ignore_nonfinite_values_at_masked_positions(rng):
    x = rng.normal(size=(B, T)).astype(np.float32)
    mask = ragged_mask()
    poisoned = np.where(mask == 0, np.float32(np.nan), x)
    poisoned[0, 0] = x[0, 0]
    poisoned[1, -1] = np.inf  # masked
    for fn in (core.masked_mean, core.masked_var, core.masked_whiten):
        np.testing.assert_allclose(fn(poisoned, mask), fn(x, mask), rtol=1e-6)


# ----------------------------------------------------------------------------- rewards and returns


def np_step_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kind):
    kl = np_kl(logprobs, ref_logprobs, kind)
    rewards = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        last = None
        for t in range(mask.shape[1]):
            if mask[b, t]:
                rewards[b, t] = -kl_coef * kl[b, t]
                last = t
        if last is not None:
            rewards[b, last] += scores[b]
    return rewards


def np_discounted_returns(rewards, mask, gamma):
    returns = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        running = 0.0
        for t in reversed(range(mask.shape[1])):
            if mask[b, t]:
                running = rewards[b, t] + gamma * running
                returns[b, t] = running
    return returns


def np_gae(rewards, values, mask, gamma, gae_lambda):
    advantages = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        valid = [t for t in range(mask.shape[1]) if mask[b, t]]
        next_value, next_advantage = 0.0, 0.0
        for t in reversed(valid):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            advantages[b, t] = delta + gamma * gae_lambda * next_advantage
            next_value, next_advantage = values[b, t], advantages[b, t]
    returns = np.where(mask != 0, advantages + values, 0.0)
    return advantages, returns


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_kl_penalized_rewards_match_numpy(rng, kind):
    scores = rng.normal(size=(B,)).astype(np.float32)
    logprobs = -rng.exponential(size=(B, T)).astype(np.float32)
    ref_logprobs = -rng.exponential(size=(B, T)).astype(np.float32)
    mask = ragged_mask()
    rewards = core.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, 0.05, kind)
    assert_finite_close(rewards, np_step_rewards(scores, logprobs, ref_logprobs, mask, 0.05, kind))
    np.testing.assert_array_equal(rewards[2], 0.0)  # the all-zero row gets no score


def test_last_valid_index(rng):
    mask = ragged_mask()
    mask[3, 1] = 0.0  # a hole does not move the last index
    np.testing.assert_array_equal(core.last_valid_index(mask), [6, 2, -1, 4, 0, 5])


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_match_numpy(rng, gamma):
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    mask = ragged_mask()
    assert_finite_close(core.discounted_returns(rewards, mask, gamma), np_discounted_returns(rewards, mask, gamma))


@pytest.mark.parametrize("gamma,gae_lambda", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_numpy(rng, gamma, gae_lambda):
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    mask = ragged_mask()
    advantages, returns = core.gae_advantages(rewards, values, mask, gamma, gae_lambda)
    expected_advantages, expected_returns = np_gae(rewards, values, mask, gamma, gae_lambda)
    assert_finite_close(advantages, expected_advantages)
    assert_finite_close(returns, expected_returns)


def test_gae_with_lambda_one_gives_discounted_returns(rng):
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    mask = ragged_mask()
    _, returns = core.gae_advantages(rewards, values, mask, 0.9, 1.0)
    np.testing.assert_allclose(returns, core.discounted_returns(rewards, mask, 0.9), atol=1e-5)


# ----------------------------------------------------------------------------- losses


def np_aggregate(loss_per_token, mask, agg):
    if agg == "token-mean":
        values = [loss_per_token[p] for p in valid_positions(mask)]
        return sum(values) / max(len(values), 1)
    row_values = []
    for b in range(mask.shape[0]):
        row = [loss_per_token[b, t] for t in range(mask.shape[1]) if mask[b, t]]
        if row:
            row_values.append(sum(row) / len(row) if agg == "seq-mean-token-mean" else sum(row))
    return sum(row_values) / max(len(row_values), 1)


def np_ppo_policy_loss(logprobs, old_logprobs, advantages, mask, eps_low, eps_high, agg):
    per_token = np.zeros(mask.shape)
    clipped = np.zeros(mask.shape)
    approx_kl = np.zeros(mask.shape)
    ratios = np.zeros(mask.shape)
    for b, t in np.ndindex(mask.shape):
        ratio = math.exp(float(logprobs[b, t]) - float(old_logprobs[b, t]))
        a = float(advantages[b, t])
        unclipped_term = -a * ratio
        clipped_term = -a * min(max(ratio, 1 - eps_low), 1 + eps_high)
        per_token[b, t] = max(unclipped_term, clipped_term)
        clipped[b, t] = float(clipped_term > unclipped_term)
        d = float(old_logprobs[b, t]) - float(logprobs[b, t])
        approx_kl[b, t] = math.exp(d) - d - 1
        ratios[b, t] = ratio
    stats = {
        "clipfrac": np_aggregate(clipped, mask, "token-mean"),
        "approx_kl": np_aggregate(approx_kl, mask, "token-mean"),
        "ratio_mean": np_aggregate(ratios, mask, "token-mean"),
    }
    return np_aggregate(per_token, mask, agg), stats


def random_policy_inputs(rng, shape=(B, T)):
    old_logprobs = -rng.exponential(size=shape).astype(np.float32)
    logprobs = (old_logprobs + rng.normal(size=shape) * 0.3).astype(np.float32)
    advantages = rng.normal(size=shape).astype(np.float32)
    return logprobs, old_logprobs, advantages


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("clip_eps_high", [None, 0.28])
def test_ppo_policy_loss_matches_numpy(rng, agg, clip_eps_high):
    logprobs, old_logprobs, advantages = random_policy_inputs(rng)
    mask = ragged_mask()
    loss, stats = core.ppo_policy_loss(
        logprobs, old_logprobs, advantages, mask, clip_eps=0.2, clip_eps_high=clip_eps_high, agg=agg
    )
    eps_high = 0.2 if clip_eps_high is None else clip_eps_high
    expected_loss, expected_stats = np_ppo_policy_loss(logprobs, old_logprobs, advantages, mask, 0.2, eps_high, agg)
    assert_finite_close(loss, expected_loss)
    for name, value in expected_stats.items():
        assert_finite_close(stats[name], value)
    assert 0 < float(stats["clipfrac"]) < 1
    for value in stats.values():
        assert np.isfinite(value)


def test_ppo_policy_loss_all_zero_mask_is_finite(rng):
    logprobs, old_logprobs, advantages = random_policy_inputs(rng)
    mask = np.zeros((B, T), np.float32)
    for agg in core.LOSS_AGGREGATIONS:
        loss, stats = core.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, agg=agg)
        assert float(loss) == 0.0
        assert all(np.isfinite(v) for v in stats.values())


def np_value_loss(values, old_values, returns, mask, eps):
    per_token = np.zeros(mask.shape)
    clipped = np.zeros(mask.shape)
    for b, t in np.ndindex(mask.shape):
        v, v_old, ret = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
        unclipped_error = (v - ret) ** 2
        if eps is None:
            per_token[b, t] = unclipped_error
            continue
        v_clipped = min(max(v, v_old - eps), v_old + eps)
        clipped_error = (v_clipped - ret) ** 2
        per_token[b, t] = max(unclipped_error, clipped_error)
        clipped[b, t] = float(clipped_error > unclipped_error)
    return 0.5 * np_aggregate(per_token, mask, "token-mean"), np_aggregate(clipped, mask, "token-mean")


@pytest.mark.parametrize("value_clip_eps", [0.2, None])
def test_ppo_value_loss_matches_numpy(rng, value_clip_eps):
    old_values = rng.normal(size=(B, T)).astype(np.float32)
    values = (old_values + rng.normal(size=(B, T)) * 0.3).astype(np.float32)
    returns = rng.normal(size=(B, T)).astype(np.float32)
    mask = ragged_mask()
    loss, stats = core.ppo_value_loss(values, old_values, returns, mask, value_clip_eps=value_clip_eps)
    expected_loss, expected_clipfrac = np_value_loss(values, old_values, returns, mask, value_clip_eps)
    assert_finite_close(loss, expected_loss)
    assert_finite_close(stats["vf_clipfrac"], expected_clipfrac)
    if value_clip_eps is not None:
        assert 0 < expected_clipfrac < 1


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_entropy_loss_matches_numpy(rng, agg):
    entropy = rng.exponential(size=(B, T)).astype(np.float32)
    mask = ragged_mask()
    loss, stats = core.entropy_loss(entropy, mask, agg)
    assert_finite_close(loss, -np_aggregate(entropy, mask, agg))
    assert_finite_close(stats["entropy"], np_aggregate(entropy, mask, agg))


@pytest.mark.parametrize("margin", [None, 0.5])
def test_reward_model_loss_matches_numpy(rng, margin):
    chosen = rng.normal(size=(9,)).astype(np.float32)
    rejected = rng.normal(size=(9,)).astype(np.float32)
    loss, stats = core.reward_model_loss(chosen, rejected, margin=margin)
    m = 0.0 if margin is None else margin
    expected = sum(math.log1p(math.exp(-(float(c) - float(r) - m))) for c, r in zip(chosen, rejected)) / 9
    assert_finite_close(loss, expected)
    assert_finite_close(stats["accuracy"], sum(float(c > r) for c, r in zip(chosen, rejected)) / 9)
    assert_finite_close(stats["reward_margin"], float(np.mean(chosen.astype(np.float64) - rejected)))


def test_ppo_losses_compute_in_float32_for_bf16_inputs(rng):
    logprobs, old_logprobs, advantages = (jnp.asarray(a, jnp.bfloat16) for a in random_policy_inputs(rng))
    mask = ragged_mask()
    loss, stats = core.ppo_policy_loss(logprobs, old_logprobs, advantages, mask)
    assert loss.dtype == jnp.float32 and stats["approx_kl"].dtype == jnp.float32
    exact = [np.asarray(a.astype(jnp.float32), np.float64) for a in (logprobs, old_logprobs, advantages)]
    expected_loss, _ = np_ppo_policy_loss(*exact, mask, 0.2, 0.2, "token-mean")
    assert_finite_close(loss, expected_loss)
    value_loss, _ = core.ppo_value_loss(advantages, advantages, logprobs, mask)
    assert value_loss.dtype == jnp.float32
