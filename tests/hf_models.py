"""Helpers of the model-family tests: tiny random `transformers` models saved to disk, a
left-padded batch, and the reference logits and greedy tokens of `transformers` on it.

Each family test builds its model with `AutoConfig.for_model(model_type, **fields)` and the
`transformers` class that config selects, moves norms and biases off their init values (so a
wrong mapping of one shows in the logits) and saves it with `save_pretrained`: exactly the
files a researcher brings.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import torch
import transformers

VOCAB = 96


def build(model_type: str, fields: dict, seed: int = 0) -> torch.nn.Module:
    """A float32 eval-mode `transformers` causal LM of `model_type` (eager attention)."""
    config = transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB, **fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=gen))
            if name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def batch(seed: int = 0, batch: int = 3, length: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and mask: row 0 full, rows 1 and 2 with 3 and 7 pads."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for row, pads in zip(range(1, batch), (3, 7)):
        mask[row, :pads] = 0
    return ids * mask, mask


def positions(mask: np.ndarray) -> np.ndarray:
    """What jaxrlhf derives from the mask (transformers' raw forward counts slots instead)."""
    return np.clip(np.cumsum(mask, -1) - 1, 0, None)


def torch_forward(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions(mask), dtype=torch.long),
            **kwargs,
        )


def torch_logits(model, ids, mask) -> np.ndarray:
    return torch_forward(model, ids, mask).logits.float().numpy()


def torch_greedy(model, ids, mask, max_new_tokens: int) -> np.ndarray:
    """`generate(do_sample=False)` of transformers (its KV cache, left padding, no EOS stop)."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out[:, ids.shape[1] :].numpy()


@functools.partial(jax.jit, static_argnums=0)
def jit_forward(model, params, ids, mask):
    return model.forward(params, ids, mask)


def max_diff(a, b, mask) -> float:
    keep = np.asarray(mask).astype(bool)
    return float(np.max(np.abs(np.asarray(a, np.float64)[keep] - np.asarray(b, np.float64)[keep])))
