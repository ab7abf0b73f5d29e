"""Gradients of the PPO losses against float64 references.

Two independent references: the analytic gradient written out in NumPy, and central finite
differences of a plain float64 NumPy loss. The jaxrlhf losses are differentiated both in float32
(to 1e-5) and, under ``jax.enable_x64``, in float64 (to 1e-9).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import core

B, T = 5, 6
LENGTHS = [6, 2, 0, 4, 1]
EPS_LOW, EPS_HIGH = 0.2, 0.28


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(2)
    mask = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.float64)
    old_logprobs = -rng.exponential(size=(B, T))
    return dict(
        mask=mask,
        old_logprobs=old_logprobs,
        logprobs=old_logprobs + rng.normal(size=(B, T)) * 0.3,
        advantages=rng.normal(size=(B, T)),
        old_values=rng.normal(size=(B, T)),
        values=rng.normal(size=(B, T)),
        returns=rng.normal(size=(B, T)),
    )


def token_weights(mask, agg):
    """d(aggregate)/d(per-token loss), per token."""
    n_rows = sum(1 for row in mask if row.sum() > 0)
    weights = np.zeros(mask.shape)
    for b, t in np.ndindex(mask.shape):
        if not mask[b, t]:
            continue
        if agg == "token-mean":
            weights[b, t] = 1.0 / mask.sum()
        elif agg == "seq-mean-token-mean":
            weights[b, t] = 1.0 / (mask[b].sum() * n_rows)
        else:
            weights[b, t] = 1.0 / n_rows
    return weights


def np_policy_loss(logprobs, old_logprobs, advantages, mask, agg):
    weights = token_weights(mask, agg)
    total = 0.0
    for b, t in np.ndindex(mask.shape):
        ratio = math.exp(logprobs[b, t] - old_logprobs[b, t])
        a = advantages[b, t]
        total += weights[b, t] * max(-a * ratio, -a * min(max(ratio, 1 - EPS_LOW), 1 + EPS_HIGH))
    return total


def np_policy_grad(logprobs, old_logprobs, advantages, mask, agg):
    """Where the unclipped term is the max its slope is -A * ratio; where clipping wins, 0."""
    weights = token_weights(mask, agg)
    grad = np.zeros(mask.shape)
    for b, t in np.ndindex(mask.shape):
        ratio = math.exp(logprobs[b, t] - old_logprobs[b, t])
        a = advantages[b, t]
        clipped_wins = -a * min(max(ratio, 1 - EPS_LOW), 1 + EPS_HIGH) > -a * ratio
        grad[b, t] = 0.0 if clipped_wins else weights[b, t] * (-a * ratio)
    return grad


def np_value_loss(values, old_values, returns, mask, eps=0.2):
    weights = token_weights(mask, "token-mean")
    total = 0.0
    for b, t in np.ndindex(mask.shape):
        v_clipped = min(max(values[b, t], old_values[b, t] - eps), old_values[b, t] + eps)
        total += weights[b, t] * 0.5 * max((values[b, t] - returns[b, t]) ** 2, (v_clipped - returns[b, t]) ** 2)
    return total


def np_value_grad(values, old_values, returns, mask, eps=0.2):
    weights = token_weights(mask, "token-mean")
    grad = np.zeros(mask.shape)
    for b, t in np.ndindex(mask.shape):
        v_clipped = min(max(values[b, t], old_values[b, t] - eps), old_values[b, t] + eps)
        clipped_wins = (v_clipped - returns[b, t]) ** 2 > (values[b, t] - returns[b, t]) ** 2
        grad[b, t] = 0.0 if clipped_wins else weights[b, t] * (values[b, t] - returns[b, t])
    return grad


def finite_difference(loss_fn, x, h=1e-6):
    grad = np.zeros(x.shape)
    for idx in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += h
        minus[idx] -= h
        grad[idx] = (loss_fn(plus) - loss_fn(minus)) / (2 * h)
    return grad


def jax_policy_grad(d, agg, dtype):
    def loss(logprobs):
        cast = lambda k: jnp.asarray(d[k], dtype)
        value, _ = core.ppo_policy_loss(
            logprobs,
            cast("old_logprobs"),
            cast("advantages"),
            cast("mask"),
            clip_eps=EPS_LOW,
            clip_eps_high=EPS_HIGH,
            agg=agg,
        )
        return value

    return np.asarray(jax.grad(loss)(jnp.asarray(d["logprobs"], dtype)), np.float64)


def jax_value_grad(d, dtype):
    def loss(values):
        cast = lambda k: jnp.asarray(d[k], dtype)
        value, _ = core.ppo_value_loss(values, cast("old_values"), cast("returns"), cast("mask"), value_clip_eps=0.2)
        return value

    return np.asarray(jax.grad(loss)(jnp.asarray(d["values"], dtype)), np.float64)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_policy_loss_gradient(inputs, agg):
    d = inputs
    analytic = np_policy_grad(d["logprobs"], d["old_logprobs"], d["advantages"], d["mask"], agg)
    numeric = finite_difference(
        lambda lp: np_policy_loss(lp, d["old_logprobs"], d["advantages"], d["mask"], agg), d["logprobs"]
    )
    np.testing.assert_allclose(analytic, numeric, atol=1e-8)  # the reference agrees with itself
    assert np.count_nonzero(analytic) > 0 and np.count_nonzero(d["mask"] * (analytic == 0)) > 0  # both cases hit

    np.testing.assert_allclose(jax_policy_grad(d, agg, jnp.float32), analytic, atol=1e-5)
    with jax.enable_x64(True):
        np.testing.assert_allclose(jax_policy_grad(d, agg, jnp.float64), analytic, atol=1e-9)


def test_value_loss_gradient(inputs):
    d = inputs
    analytic = np_value_grad(d["values"], d["old_values"], d["returns"], d["mask"])
    numeric = finite_difference(lambda v: np_value_loss(v, d["old_values"], d["returns"], d["mask"]), d["values"])
    np.testing.assert_allclose(analytic, numeric, atol=1e-8)
    assert np.count_nonzero(d["mask"] * (analytic == 0)) > 0  # some tokens are clipped

    np.testing.assert_allclose(jax_value_grad(d, jnp.float32), analytic, atol=1e-5)
    with jax.enable_x64(True):
        np.testing.assert_allclose(jax_value_grad(d, jnp.float64), analytic, atol=1e-9)


def test_policy_loss_gradient_zero_mask_is_zero_not_nan(inputs):
    d = dict(inputs, mask=np.zeros((B, T)))
    for agg in core.LOSS_AGGREGATIONS:
        grad = jax_policy_grad(d, agg, jnp.float32)
        np.testing.assert_array_equal(grad, 0.0)
