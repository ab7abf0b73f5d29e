"""`LanguageModel.output_layer`: the output layer alone, applied to final hidden states, gives the
full forward's logits (tied and untied heads, Gemma 2's final soft-capping, the transposed tied
head of `decoding_params`, scanned layers, LoRA parameters), at all positions or at a gathered
subset of them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from jaxrlhf.models import LanguageModel
from jaxrlhf.models.lora import LoraConfig, LoraParams, init_lora, with_lora
from jaxrlhf.tuning import Tuning

CONFIGS = {
    "gpt2-tied": tiny_config("gpt2"),
    "llama-untied": tiny_config("llama"),
    # Gemma-2-like: tied, embeddings times sqrt(D), RMSNorm offset 1, both soft-cappings small
    # enough to bite at these logit scales.
    "gemma2-softcapped": tiny_config(
        "llama",
        tie_word_embeddings=True,
        embed_scale=True,
        norm_weight_offset=1.0,
        attn_logit_softcap=2.0,
        final_logit_softcap=0.5,
    ),
    "llama-scanned-tied": tiny_config("llama", tie_word_embeddings=True, scan_layers=True),
}


def _batch(vocab=64):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, vocab, (3, 7)), jnp.int32)
    mask = jnp.asarray(np.arange(7)[None] >= np.array([[0], [2], [5]]), jnp.int32)  # left-padded
    return ids, mask


def _logits_and_head(model, params, ids, mask):
    """The full forward's logits and the output layer applied to its hidden states."""
    full = model.forward(params, ids, mask)
    hidden = model.forward(params, ids, mask, logits_positions=slice(0, 0)).hidden
    return full.logits, model.output_layer(params, hidden), hidden


@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_layer_equals_the_forwards_logits(name):
    model = LanguageModel(CONFIGS[name])
    params = model.init_params(jax.random.PRNGKey(1))
    ids, mask = _batch()
    logits, head, hidden = jax.jit(_logits_and_head, static_argnums=0)(model, params, ids, mask)
    assert head.dtype == jnp.float32 and head.shape == logits.shape
    np.testing.assert_allclose(np.asarray(head), np.asarray(logits), atol=1e-6, rtol=1e-6)
    if CONFIGS[name].final_logit_softcap is not None:  # the cap is applied: |logits| < cap
        assert float(jnp.max(jnp.abs(logits))) < 0.5
    # A gathered subset of positions (any leading shape): the same logits there.
    rows, cols = jnp.array([0, 1, 2, 2]), jnp.array([6, 3, 5, 6])
    subset = model.output_layer(params, hidden[rows, cols])
    np.testing.assert_allclose(np.asarray(subset), np.asarray(logits[rows, cols]), atol=1e-6, rtol=1e-6)


def test_output_layer_with_the_transposed_tied_head_and_lora():
    model = LanguageModel(CONFIGS["gemma2-softcapped"])
    params = model.init_params(jax.random.PRNGKey(2))
    ids, mask = _batch()
    logits, _, hidden = _logits_and_head(model, params, ids, mask)
    transposed = model.with_tuning(Tuning(decode_head="transposed"))
    decode_params = transposed.decoding_params(params)
    np.testing.assert_allclose(
        np.asarray(transposed.output_layer(decode_params, hidden)), np.asarray(logits), atol=1e-6, rtol=1e-6
    )
    lora_model = with_lora(model, LoraConfig(rank=2))
    adapters = jax.tree.map(lambda a: a + 0.1, init_lora(LoraConfig(rank=2), params, jax.random.PRNGKey(3)))
    lora_params = LoraParams(params, adapters)
    lora_logits, lora_head, _ = _logits_and_head(lora_model, lora_params, ids, mask)
    assert float(jnp.max(jnp.abs(lora_logits - logits))) > 1e-4  # the adapters change the hidden states
    np.testing.assert_allclose(np.asarray(lora_head), np.asarray(lora_logits), atol=1e-6, rtol=1e-6)
