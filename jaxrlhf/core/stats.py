"""Masked reductions over ``[B, T]`` arrays, optionally across devices.

All reductions count only positions where ``mask != 0`` (values at masked positions are ignored,
even NaN/inf ones) and divide by ``max(count, 1)``, so an all-zero mask gives 0, never NaN.

When ``axis_name`` is given, the partial sums and counts are also ``lax.psum``-ed over that named
device axis (``pmap``/``shard_map``), so every device gets the number one device would compute on
the whole, concatenated batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
from jax import lax

Axis = int | Sequence[int] | None

WHITEN_EPS = 1e-8


def compute_dtype(*arrays: chex.Array):
    """The dtype core math runs in: float32 for low-precision (bf16, f16) or integer inputs, the
    widest input dtype when it is wider (float64 under x64)."""
    return jnp.result_type(jnp.float32, *(jnp.asarray(a).dtype for a in arrays))


def at_least_float32(*arrays: chex.Array) -> tuple:
    """``arrays`` cast to their common `compute_dtype`, so that ratios, squares and sums of bf16
    inputs are computed in float32."""
    dtype = compute_dtype(*arrays)
    return tuple(jnp.asarray(a, dtype) for a in arrays)


def _psum(x, axis_name):
    return x if axis_name is None else lax.psum(x, axis_name)


def masked_sum(x: chex.Array, mask: chex.Array, axis: Axis = None, axis_name=None) -> jax.Array:
    """``sum(x * mask)`` over ``axis`` (all axes if None), and over devices if ``axis_name``."""
    chex.assert_equal_shape([x, mask])
    dtype = compute_dtype(x)
    mask = jnp.asarray(mask).astype(dtype)
    weighted_x = jnp.where(mask != 0, jnp.asarray(x, dtype), 0) * mask
    return _psum(jnp.sum(weighted_x, axis=axis), axis_name)


def masked_count(mask: chex.Array, axis: Axis = None, axis_name=None, dtype=jnp.float32) -> jax.Array:
    """``sum(mask)`` over ``axis`` (and devices), i.e. the number of valid positions."""
    return _psum(jnp.sum(jnp.asarray(mask).astype(dtype), axis=axis), axis_name)


def masked_mean(x: chex.Array, mask: chex.Array, axis: Axis = None, axis_name=None) -> jax.Array:
    """``sum(x * mask) / max(sum(mask), 1)`` over ``axis`` (and devices if ``axis_name``)."""
    chex.assert_equal_shape([x, mask])
    dtype = compute_dtype(x)
    total = masked_sum(x, mask, axis=axis, axis_name=axis_name)
    count = masked_count(mask, axis=axis, axis_name=axis_name, dtype=dtype)
    return total / jnp.maximum(count, 1)


def masked_var(x: chex.Array, mask: chex.Array, unbiased: bool = True, axis_name=None) -> jax.Array:
    """Variance of the valid entries of ``x`` (over all axes, and devices if ``axis_name``).

    ``mu = masked_mean(x)``, ``var = sum(mask * (x - mu)**2) / n`` with ``n = sum(mask)``; with
    ``unbiased`` Bessel's correction multiplies by ``n / (n - 1)`` (skipped when ``n <= 1``, where
    the variance is 0 anyway).
    """
    chex.assert_equal_shape([x, mask])
    dtype = compute_dtype(x)
    mean = masked_mean(x, mask, axis_name=axis_name)
    count = masked_count(mask, axis_name=axis_name, dtype=dtype)
    centered = jnp.asarray(x, dtype) - mean
    var = masked_sum(jnp.square(centered), mask, axis_name=axis_name) / jnp.maximum(count, 1)
    if unbiased:
        var = var * count / jnp.maximum(count - 1, 1)
    return var


def masked_whiten(x: chex.Array, mask: chex.Array, shift_mean: bool = True, axis_name=None) -> jax.Array:
    """Normalise the valid entries of ``x`` to zero mean, unit variance.

    ``(x - mu) / sqrt(var + 1e-8)`` with the masked mean ``mu`` and the Bessel-corrected masked
    variance ``var`` (over all axes, and devices if ``axis_name``); with ``shift_mean=False`` the
    mean is added back: ``(x - mu) / sqrt(var + 1e-8) + mu``. Masked positions are set to 0.
    """
    chex.assert_equal_shape([x, mask])
    dtype = compute_dtype(x)
    x = jnp.asarray(x, dtype)
    mean = masked_mean(x, mask, axis_name=axis_name)
    var = masked_var(x, mask, unbiased=True, axis_name=axis_name)
    whitened = (x - mean) * lax.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask != 0, whitened, 0)
