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
# The sizes every family test starts from (then overrides per family).
SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.15,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


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


def checkpoint_cache(tmp_path_factory, families: dict, reference):
    """`get(family) -> (directory, torch model, reference(torch model))`, each family built
    (`families[family][:2]` = model_type, fields) and saved once per test module."""
    cache = {}

    def get(family):
        if family not in cache:
            model_type, fields = families[family][:2]
            model = build(model_type, fields)
            path = str(tmp_path_factory.mktemp(family))
            model.save_pretrained(path)
            cache[family] = (path, model, reference(model))
        return cache[family]

    return get


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


def is_longrope(torch_model) -> bool:
    rope = getattr(torch_model.config, "rope_parameters", None) or {}
    return rope.get("rope_type") == "longrope"


def reference_logits(torch_model, ids, mask):
    """transformers' logits on the batch; for LongRoPE, each row's alone (unpadded), as jaxrlhf
    decides short or long factors per row (`transformer.long_rope_flags`) where transformers
    decides them for the whole batch."""
    if not is_longrope(torch_model):
        return torch_logits(torch_model, ids, mask)
    out = np.zeros(ids.shape + (torch_model.config.vocab_size,), np.float32)
    for row in range(ids.shape[0]):
        keep = mask[row].astype(bool)
        out[row, keep] = torch_logits(torch_model, ids[row : row + 1, keep], mask[row : row + 1, keep])[0]
    return out


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


def assert_greedy_generation_matches(torch_model, pre, new_tokens: int = 10) -> None:
    """jaxrlhf's `generate` at temperature 0 equals transformers' greedy `generate` token for token,
    on left-padded prompts of 6, 4 and 2 tokens (so a window of 4 is passed within 10 tokens)."""
    import jax.numpy as jnp

    from jaxrlhf.sampling import generate

    ids = np.random.default_rng(1).integers(3, VOCAB, size=(3, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2], mask[2, :4] = 0, 0
    ids = ids * mask
    want = torch_greedy(torch_model, ids, mask, new_tokens)
    got = generate(pre.model, pre.params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0),
                   max_new_tokens=new_tokens, temperature=0.0, eos_token_id=None)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got.tokens), want)


@functools.partial(jax.jit, static_argnums=0)
def jit_forward(model, params, ids, mask):
    return model.forward(params, ids, mask)


def max_diff(a, b, mask) -> float:
    keep = np.asarray(mask).astype(bool)
    return float(np.max(np.abs(np.asarray(a, np.float64)[keep] - np.asarray(b, np.float64)[keep])))


def peft_round_trips(pre, lora, checkpoint_dir: str, tmp_path, peft_config: dict) -> None:
    """LoRA adapters against `peft` on the transformers model, both ways:

    - ours (random, B != 0) -> `save_peft_adapter` -> `PeftModel.from_pretrained` on the
      checkpoint: the same logits; read back with `load_peft_adapter`: the same logits; merged with
      `save_merged`: a plain checkpoint transformers loads with the PEFT model's logits;
    - an adapter made by `peft.get_peft_model(peft.LoraConfig(**peft_config))` with random A and B
      and saved by peft -> `load_peft_adapter`: the PEFT model's logits.
    """
    import peft

    from jaxrlhf.models.lora import LoraParams, init_lora, with_lora
    from jaxrlhf.models.peft_io import load_peft_adapter, save_merged, save_peft_adapter

    model = with_lora(pre.model, lora)
    adapters = init_lora(lora, pre.params, jax.random.key(1))
    noise = jax.random.key(2)
    adapters = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(noise, x.shape), adapters)
    ids, mask = batch()
    ours = np.asarray(jit_forward(model, LoraParams(pre.params, adapters), ids, mask).logits)
    assert max_diff(ours, jit_forward(pre.model, pre.params, ids, mask).logits, mask) > 1e-2  # adapters matter

    save_peft_adapter(str(tmp_path / "ours"), model, adapters)
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, attn_implementation="eager").eval()
    theirs = torch_logits(peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval(), ids, mask)
    assert max_diff(theirs, ours, mask) < 1e-3
    loaded_model, loaded = load_peft_adapter(str(tmp_path / "ours"), pre.model)
    assert max_diff(jit_forward(loaded_model, LoraParams(pre.params, loaded), ids, mask).logits, ours, mask) < 1e-5
    save_merged(str(tmp_path / "merged"), model, pre.params, adapters)
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), attn_implementation="eager")
    assert max_diff(torch_logits(merged.eval(), ids, mask), theirs, mask) < 1e-3

    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, attn_implementation="eager").eval()
    torch.manual_seed(3)
    made_by_peft = peft.get_peft_model(hf, peft.LoraConfig(init_lora_weights=False, **peft_config)).eval()
    made_by_peft.save_pretrained(str(tmp_path / "peft"))
    want = torch_logits(made_by_peft, ids, mask)
    read_model, read = load_peft_adapter(str(tmp_path / "peft"), pre.model)
    assert max_diff(jit_forward(read_model, LoraParams(pre.params, read), ids, mask).logits, want, mask) < 1e-3
