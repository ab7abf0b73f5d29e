"""`sequence_kl`: the exact per-sequence KL of a policy to its reference, on sampled responses."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.core import concat_prompt_response
from jaxrlhf.models import LanguageModel, gpt2_config
from jaxrlhf.training.evaluation import sequence_kl


def _model_and_batch():
    model = LanguageModel(gpt2_config(11, hidden_size=16, num_layers=1, num_heads=2, max_len=16))
    params = model.init_params(jax.random.key(0))
    ref_params = model.init_params(jax.random.key(1))
    prompt_ids = jnp.array([[0, 3, 4], [5, 6, 7]], jnp.int32)
    prompt_mask = jnp.array([[0, 1, 1], [1, 1, 1]], jnp.int32)  # left padding in row 0
    response_ids = jnp.array([[8, 9, 2, 0], [1, 2, 3, 4]], jnp.int32)
    response_mask = jnp.array([[1, 1, 1, 0], [0, 0, 0, 0]], jnp.int32)  # row 1: an empty response
    return model, params, ref_params, (prompt_ids, prompt_mask, response_ids, response_mask)


def test_sequence_kl_matches_float64_numpy_and_is_zero_at_the_reference():
    model, params, ref_params, batch = _model_and_batch()
    prompt_ids, prompt_mask, response_ids, response_mask = batch
    kl_B = np.asarray(sequence_kl(model, params, ref_params, *batch))

    ids, mask = concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)
    P, T = prompt_ids.shape[1], response_ids.shape[1]

    apply = jax.jit(model.apply)  # the reference computation's forward: jitted, only the maths below is NumPy

    def logp(p):
        z = np.asarray(apply(p, ids, mask), np.float64)[:, P - 1 : P - 1 + T]
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, ref_lp = logp(params), logp(ref_params)
    expected = ((np.exp(lp) * (lp - ref_lp)).sum(-1) * np.asarray(response_mask)).sum(1)
    np.testing.assert_allclose(kl_B, expected, rtol=1e-4, atol=1e-6)
    assert kl_B[0] > 0 and kl_B[1] == 0.0  # the empty response carries no KL
    jitted_kl = jax.jit(sequence_kl, static_argnums=0)
    np.testing.assert_allclose(np.asarray(jitted_kl(model, params, params, *batch)), 0.0, atol=1e-6)
    jitted = jitted_kl(model, params, ref_params, *batch)
    np.testing.assert_allclose(np.asarray(jitted), kl_B, rtol=1e-5, atol=1e-7)


def test_sequence_kl_of_an_episode_sums_over_its_action_tokens_only():
    """Observation tokens are attended to (they shape the next actions' distributions) but are
    not the policy's choices: the KL sums over ``action_mask``."""
    model, params, ref_params, batch = _model_and_batch()
    prompt_ids, prompt_mask, response_ids, response_mask = batch
    action_mask = jnp.array([[1, 0, 1, 0], [0, 0, 0, 0]], jnp.int32)  # token 1 of row 0 is an observation
    kl_B = np.asarray(sequence_kl(model, params, ref_params, *batch, action_mask=action_mask))

    ids, mask = concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)
    P, T = prompt_ids.shape[1], response_ids.shape[1]
    apply = jax.jit(model.apply)

    def logp(p):
        z = np.asarray(apply(p, ids, mask), np.float64)[:, P - 1 : P - 1 + T]
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, ref_lp = logp(params), logp(ref_params)
    per_token = (np.exp(lp) * (lp - ref_lp)).sum(-1)
    np.testing.assert_allclose(kl_B, (per_token * np.asarray(action_mask)).sum(1), rtol=1e-4, atol=1e-6)
    assert kl_B[0] < np.asarray(sequence_kl(model, params, ref_params, *batch))[0]  # the observation's KL is left out
