"""Float32 accuracy of `entropy_from_logits` and `token_logprobs` against float64 NumPy.

Language-model logits often sit tens of units away from 0 (offsets of +-20..80 are common);
softmax is shift-invariant, but float32 arithmetic on the unshifted numbers is not. Both functions
shift by the maximum (before dividing by the temperature), so their error stays near 1e-6
whatever the offset.

For reference, the previous entropy formula, `lse - sum(exp(z - lse) * z)` on the unshifted
`z = logits / T`, measured on the same kind of inputs (batch 2, 8 positions, V = 50257, N(0, 1) * scale
plus the offset, float32 vs float64): max |error| 2.4e-5 at +20, 8.8e-5 at +50, 3.2e-4 at +80
(T = 1), and up to 8.7e-4 at +80 with T = 0.7; the shifted formula: at most 1.2e-6 at every offset.
Token log-probs without the shift (`z_a - logsumexp(z)`): 1.1e-6..3.9e-6 at T = 1 and up to
1.2e-5 at +80 with T = 0.7 (dividing unshifted logits by T rounds at the offset's scale);
shifted: below 2.2e-6 (the largest errors on log-probs near -30). On the exact inputs of
`test_gpt2_sized_vocabulary_with_large_offsets` (T = 1) the old entropy is off by 4.3e-5, 1.2e-4
and 2.6e-4 at +20, +50, +80, against the bound of 3e-6 used here; the new one by at most 1.2e-6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.core.logprobs import entropy_from_logits, token_logprobs

ENTROPY_TOL = 3e-6
LOGPROB_TOL = 3e-6


def _reference(logits, tokens, temperature):
    """Entropy and token log-probs in float64, from the same float32 logits."""
    z = np.asarray(logits, np.float64) / temperature
    m = z.max(axis=-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(z - m).sum(axis=-1))
    p = np.exp(z - lse[..., None])
    entropy = lse - (p * z).sum(axis=-1)
    logp = np.take_along_axis(z, np.asarray(tokens)[..., None], axis=-1)[..., 0] - lse
    return entropy, logp


def _logits(shape, offset, scale, seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * scale + offset).astype(np.float32)


@pytest.mark.parametrize("offset", [0.0, 20.0, 50.0, 80.0, -80.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gpt2_sized_vocabulary_with_large_offsets(offset, temperature):
    vocab = 50257
    logits = _logits((2, 4, vocab), offset, scale=2.0, seed=int(abs(offset)))
    tokens = np.random.default_rng(1).integers(0, vocab, size=(2, 4)).astype(np.int32)
    # A few tokens that matter most in RLHF: the most likely ones.
    tokens[:, 0] = logits[:, 0].argmax(-1)
    entropy, logp = _reference(logits, tokens, temperature)
    got_entropy = np.asarray(entropy_from_logits(jnp.asarray(logits), temperature))
    got_logp = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), temperature))
    assert got_entropy.dtype == np.float32 and got_logp.dtype == np.float32
    assert np.abs(got_entropy - entropy).max() < ENTROPY_TOL
    assert np.abs(got_logp - logp).max() < LOGPROB_TOL


@pytest.mark.parametrize("offset", [20.0, 50.0, 80.0])
def test_peaked_and_flat_distributions(offset):
    """Near-deterministic rows (entropy ~ 0) and near-uniform rows (entropy ~ log V)."""
    vocab = 4096
    rng = np.random.default_rng(2)
    peaked = rng.normal(size=(1, 3, vocab)) * 0.5
    peaked[..., 7] += 25.0  # one token with almost all the mass
    flat = rng.normal(size=(1, 3, vocab)) * 1e-3
    logits = (np.concatenate([peaked, flat]) + offset).astype(np.float32)
    tokens = np.full((2, 3), 7, np.int32)
    entropy, logp = _reference(logits, tokens, 1.0)
    got_entropy = np.asarray(entropy_from_logits(jnp.asarray(logits)))
    got_logp = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
    np.testing.assert_allclose(got_entropy, entropy, rtol=0, atol=ENTROPY_TOL)
    np.testing.assert_allclose(got_logp, logp, rtol=0, atol=LOGPROB_TOL)
    assert np.all(entropy[0] < 1e-4) and np.allclose(entropy[1], np.log(vocab), atol=1e-5)


def test_shift_invariance_in_float32():
    """The same distribution offset by 0 and by +80 gives (nearly) the same float32 results."""
    logits = _logits((2, 3, 1000), 0.0, scale=3.0, seed=3)
    tokens = np.random.default_rng(4).integers(0, 1000, size=(2, 3)).astype(np.int32)
    shifted = logits + np.float32(80.0)  # rounds the logits themselves by up to 4e-6
    for temperature in (1.0, 0.5):
        a = np.asarray(entropy_from_logits(jnp.asarray(logits), temperature))
        b = np.asarray(entropy_from_logits(jnp.asarray(shifted), temperature))
        assert np.abs(a - b).max() < 2e-5 / temperature
        a = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), temperature))
        b = np.asarray(token_logprobs(jnp.asarray(shifted), jnp.asarray(tokens), temperature))
        assert np.abs(a - b).max() < 2e-5 / temperature


def test_bf16_logits_are_upcast():
    logits = jnp.asarray(_logits((2, 3, 512), 40.0, scale=2.0, seed=5), jnp.bfloat16)
    tokens = jnp.zeros((2, 3), jnp.int32)
    entropy, logp = _reference(np.asarray(logits.astype(jnp.float32)), np.zeros((2, 3), np.int32), 1.0)
    np.testing.assert_allclose(np.asarray(entropy_from_logits(logits)), entropy, atol=ENTROPY_TOL)
    np.testing.assert_allclose(np.asarray(token_logprobs(logits, tokens)), logp, atol=LOGPROB_TOL)


def test_minus_inf_logits_are_probability_zero():
    """Filtered-out tokens (-inf) contribute nothing: entropy finite (0 * -inf is not NaN), and so
    is its gradient."""
    logits = _logits((1, 2, 16), 30.0, scale=1.0, seed=6)
    logits[..., 8:] = -np.inf
    entropy, _ = _reference(logits[..., :8], np.zeros((1, 2), np.int32), 1.0)
    got = entropy_from_logits(jnp.asarray(logits))
    np.testing.assert_allclose(np.asarray(got), entropy, atol=ENTROPY_TOL)
    grad = jax.grad(lambda x: jnp.sum(entropy_from_logits(jnp.where(jnp.arange(16) < 8, x, -jnp.inf))))(
        jnp.asarray(np.nan_to_num(logits, neginf=0.0))
    )
    assert np.all(np.isfinite(np.asarray(grad)))


def test_entropy_gradient_matches_float64():
    """dH/dz_v = -p_v (z_v - sum_u p_u z_u) / T (the shift by the maximum is a constant)."""
    temperature = 0.8
    logits = _logits((1, 2, 64), 50.0, scale=2.0, seed=7)
    grad = np.asarray(jax.grad(lambda x: jnp.sum(entropy_from_logits(x, temperature)))(jnp.asarray(logits)))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = -p * (z - (p * z).sum(-1, keepdims=True)) / temperature
    np.testing.assert_allclose(grad, expected, atol=2e-6)
