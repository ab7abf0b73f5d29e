"""Per-token estimators of KL(policy || reference) from sampled-token log-probabilities.

With ``d = ref_logprobs - logprobs`` for a token sampled from the policy (Schulman, "Approximating
KL divergence", 2020):

* ``k1 = -d``               unbiased, high variance, can be negative per token;
* ``k2 = d**2 / 2``         biased, low variance, non-negative;
* ``k3 = exp(d) - d - 1``   unbiased, low variance, non-negative;
* ``abs = |d|``             non-negative, used by some RLHF codes.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

KL_KINDS = ("k1", "k2", "k3", "abs")


def kl_estimate(logprobs: chex.Array, ref_logprobs: chex.Array, kind: str = "k1") -> jax.Array:
    """Per-token KL estimate; see the module docstring for the formulas.

    Args:
      logprobs: log-probabilities of the sampled tokens under the policy, any shape.
      ref_logprobs: the same tokens under the reference model, same shape.
      kind: one of ``"k1"``, ``"k2"``, ``"k3"``, ``"abs"``.

    Returns:
      An array of the same shape with the per-token estimate.
    """
    chex.assert_equal_shape([logprobs, ref_logprobs])
    if kind not in KL_KINDS:
        raise ValueError(f"Unknown KL estimator kind {kind!r}; valid kinds are {KL_KINDS}.")
    log_ratio_ref_over_policy = ref_logprobs - logprobs  # d
    if kind == "k1":
        return -log_ratio_ref_over_policy
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio_ref_over_policy)
    if kind == "k3":
        # expm1 keeps precision when d is tiny: exp(d) - 1 - d.
        return jnp.expm1(log_ratio_ref_over_policy) - log_ratio_ref_over_policy
    return jnp.abs(log_ratio_ref_over_policy)
