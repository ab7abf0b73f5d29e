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


def _scaled_float32_logits(logits: chex.Array, temperature) -> jax.Array:
    """Returns ``logits / temperature`` in (at least) float32."""
    compute_dtype = jnp.promote_types(logits.dtype, jnp.float32)
    return logits.astype(compute_dtype) / jnp.asarray(temperature, compute_dtype)


def token_logprobs(logits: chex.Array, tokens: chex.Array, temperature=1.0) -> jax.Array:
    """Log-probability of each given token under ``softmax(logits / temperature)``.

    ``logp[b, t] = z[b, t, tokens[b, t]] - logsumexp_v z[b, t, v]`` with ``z = logits / temperature``.

    Args:
      logits: ``[B, T, V]`` (any float dtype; computed in float32).
      tokens: ``[B, T]`` integer token ids in ``[0, V)``.
      temperature: the sampling temperature the tokens were drawn with (scalar).

    Returns:
      ``[B, T]`` float32 log-probabilities.
    """
    chex.assert_rank(logits, 3)
    chex.assert_rank(tokens, 2)
    chex.assert_equal_shape_prefix([logits, tokens], 2)
    chex.assert_type(tokens, int)
    scaled_logits_BxTxV = _scaled_float32_logits(logits, temperature)
    log_normalizer_BxT = jax.nn.logsumexp(scaled_logits_BxTxV, axis=-1)
    token_logits_BxT = jnp.take_along_axis(
        scaled_logits_BxTxV, tokens[..., None].astype(jnp.int32), axis=-1
    )[..., 0]
    return token_logits_BxT - log_normalizer_BxT


def entropy_from_logits(logits: chex.Array, temperature=1.0) -> jax.Array:
    """Entropy of ``softmax(logits / temperature)`` at each position.

    ``H[b, t] = logsumexp_v z - sum_v softmax(z)_v * z_v`` with ``z = logits[b, t] / temperature``.

    Args:
      logits: ``[B, T, V]`` (any float dtype; computed in float32).
      temperature: scalar temperature.

    Returns:
      ``[B, T]`` float32 entropies (nats).
    """
    chex.assert_rank(logits, 3)
    scaled_logits_BxTxV = _scaled_float32_logits(logits, temperature)
    log_normalizer_BxT = jax.nn.logsumexp(scaled_logits_BxTxV, axis=-1)
    probs_BxTxV = jnp.exp(scaled_logits_BxTxV - log_normalizer_BxT[..., None])
    return log_normalizer_BxT - jnp.sum(probs_BxTxV * scaled_logits_BxTxV, axis=-1)
