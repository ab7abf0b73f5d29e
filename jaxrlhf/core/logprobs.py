"""Per-token log-probabilities and entropies from language-model logits.

A language model is a policy: at step t it emits token ``a_t`` with probability
``pi(a_t | s_t) = softmax(logits_t / temperature)[a_t]``. Both functions here work in float32
whatever the logits' dtype (bf16 logits are upcast before ``logsumexp``) and never build a one-hot
array of vocabulary size: the chosen token's logit is gathered with ``take_along_axis``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxrlhf.core.stats import at_least_float32
from jaxrlhf.typing import Scalar


def _shifted_scaled_logits(logits: chex.Array, temperature: Scalar) -> jax.Array:
    """Returns ``z' = (logits - max_v logits) / temperature`` in (at least) float32, so ``max z' = 0``.

    Softmax, log-softmax and entropy are invariant to a shift of the logits, and the shift is
    taken before dividing by the temperature: subtracting the maximum is then exact up to one
    rounding of a number of the size of ``z'`` (not of the logits, which are often +20..+80),
    and everything downstream works with numbers of moderate size. The maximum is a constant for
    differentiation (``stop_gradient``): the result does not depend on it.
    """
    (logits,) = at_least_float32(logits)
    max_logit = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    return (logits - max_logit) / jnp.asarray(temperature, logits.dtype)


def token_logprobs(logits: chex.Array, tokens: chex.Array, temperature: Scalar = 1.0) -> jax.Array:
    """Log-probability of each given token under ``softmax(logits / temperature)``.

    ``logp[b, t] = z[b, t, tokens[b, t]] - logsumexp_v z[b, t, v]`` with ``z = logits / temperature``,
    computed as ``z'_a - log sum_v exp(z'_v)`` with the shifted ``z' = (logits - max logits) / T``
    (the same value; accurate to a few 1e-6 in float32 even for logits offset by +80, where the
    unshifted difference of two numbers near 80 loses up to ~1e-5 to rounding).

    Args:
      logits: ``[B, T, V]`` (any float dtype; computed in float32).
      tokens: ``[B, T]`` integer token ids in ``[0, V)``.
      temperature: the sampling temperature the tokens were drawn with (scalar, > 0).

    Returns:
      ``[B, T]`` float32 log-probabilities.
    """
    chex.assert_rank(logits, 3)
    chex.assert_rank(tokens, 2)
    chex.assert_equal_shape_prefix([logits, tokens], 2)
    chex.assert_type(tokens, int)
    shifted_BxTxV = _shifted_scaled_logits(logits, temperature)
    log_normalizer_BxT = jnp.log(jnp.sum(jnp.exp(shifted_BxTxV), axis=-1))  # the sum is >= 1
    token_logits_BxT = jnp.take_along_axis(shifted_BxTxV, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return token_logits_BxT - log_normalizer_BxT


def entropy_from_logits(logits: chex.Array, temperature: Scalar = 1.0) -> jax.Array:
    """Entropy of ``softmax(logits / temperature)`` at each position.

    ``H[b, t] = logsumexp_v z - sum_v softmax(z)_v * z_v`` with ``z = logits[b, t] / temperature``.
    Both terms are computed on the shifted ``z' = (logits - max logits) / T`` (``max z' = 0``;
    ``H`` is shift-invariant): ``H = log S - sum_v e_v z'_v / S`` with ``e = exp(z')``,
    ``S = sum_v e_v``. Unshifted, the two terms are each near the offset of the logits and their
    difference loses up to ~3e-4 in float32 at offsets of +20..+80; shifted, the error stays near
    1e-6. Entries with ``softmax = 0`` (e.g. ``-inf`` logits) contribute 0, not ``0 * -inf``.

    Args:
      logits: ``[B, T, V]`` (any float dtype; computed in float32).
      temperature: scalar temperature (> 0).

    Returns:
      ``[B, T]`` float32 entropies (nats).
    """
    chex.assert_rank(logits, 3)
    shifted_BxTxV = _shifted_scaled_logits(logits, temperature)
    exp_BxTxV = jnp.exp(shifted_BxTxV)
    normalizer_BxT = jnp.sum(exp_BxTxV, axis=-1)  # >= 1: the maximum contributes exp(0)
    # 0 * -inf would be NaN; the double where also keeps the gradient finite there.
    finite_shifted_BxTxV = jnp.where(exp_BxTxV > 0, shifted_BxTxV, 0.0)
    weighted_BxT = jnp.sum(exp_BxTxV * finite_shifted_BxTxV, axis=-1)
    return jnp.log(normalizer_BxT) - weighted_BxT / normalizer_BxT
