"""The SFT loop: masked next-token cross-entropy and that training lowers it."""

import jax
import numpy as np
import pytest

from jaxrlhf.models import LanguageModel, ModelConfig
from jaxrlhf.training import sft


def tiny_model(vocab=12):
    return LanguageModel(
        ModelConfig.from_hf(dict(model_type="gpt2", vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    )


def tiny_data():
    # Two deterministic patterns, right-padded; loss only on tokens after the first.
    ids = np.array([[1, 4, 5, 6, 7, 2, 0, 0], [1, 8, 9, 10, 11, 4, 2, 0]] * 8, np.int32)
    mask = (ids != 0).astype(np.int32)
    mask[:, 0] = 1
    loss_mask = mask.copy()
    loss_mask[:, :2] = 0
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


@pytest.mark.slow
def test_sft_loss_matches_manual_masked_cross_entropy():
    model = tiny_model()
    params = model.init_params(jax.random.key(0))
    data = tiny_data()
    loss, metrics = sft.sft_loss(model.apply, params, data)
    logits = np.asarray(model.apply(params, data["input_ids"], data["attention_mask"]), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = data["input_ids"][:, 1:]
    picked = np.take_along_axis(logp[:, :-1], targets[..., None], -1)[..., 0]
    weights = data["loss_mask"][:, 1:] * data["attention_mask"][:, 1:]
    np.testing.assert_allclose(loss, -(picked * weights).sum() / weights.sum(), rtol=1e-5)
    assert metrics["tokens"] == weights.sum()
    # No target at all: loss 0, finite.
    empty, _ = sft.sft_loss(model.apply, params, {**data, "loss_mask": np.zeros_like(data["loss_mask"])})
    assert float(empty) == 0.0


@pytest.mark.slow
def test_sft_loss_decreases_on_tiny_set():
    model = tiny_model()
    params = model.init_params(jax.random.key(0))
    data = tiny_data()
    initial, _ = sft.sft_loss(model.apply, params, data)
    params, last = sft.train_sft(
        model.apply,
        params,
        data,
        jax.random.key(1),
        num_steps=60,
        batch_size=8,
        config=sft.SFTConfig(learning_rate=3e-3, warmup_steps=5),
    )
    final, metrics = sft.sft_loss(model.apply, params, data)
    assert np.isfinite(last["loss"]) and np.isfinite(float(final))
    assert float(final) < 0.25 * float(initial), (float(initial), float(final))
    assert float(metrics["accuracy"]) > 0.9


def test_iterate_minibatches_covers_each_epoch_once():
    data = {"x": np.arange(10)}
    batches = list(sft.iterate_minibatches(jax.random.key(0), data, batch_size=5, num_steps=4))
    assert len(batches) == 4 and all(b["x"].shape == (5,) for b in batches)
    assert sorted(np.concatenate([b["x"] for b in batches[:2]])) == list(range(10))
    assert sorted(np.concatenate([b["x"] for b in batches[2:]])) == list(range(10))
