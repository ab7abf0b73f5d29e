"""Models against the reference PyTorch implementation in `transformers`, and checkpoint I/O.

Each family gets a tiny random model built by `transformers` from a config, with norms and biases
pushed away from their init values (so a wrong mapping of a norm or a bias shows up in the logits),
saved to disk, loaded with `jaxrlhf.load_pretrained` and compared on a left-padded batch.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxrlhf  # noqa: E402
from jaxrlhf.core.logprobs import token_logprobs  # noqa: E402
from jaxrlhf.models import CheckpointError, LanguageModel, UnsupportedModelError  # noqa: E402
from jaxrlhf.models.value import ValueModel, value_head_apply  # noqa: E402

VOCAB = 96
# Llama-family defaults: width 32, 4 query heads, 2 layers.
_LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    initializer_range=0.15,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = {
    "gpt2": (
        "gpt2",
        dict(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            initializer_range=0.15,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "gpt2_untied": (
        "gpt2",
        dict(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            initializer_range=0.15,
            tie_word_embeddings=False,
            activation_function="gelu",
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "llama_gqa": ("llama", dict(_LLAMA, num_key_value_heads=2)),
    "llama_tied": ("llama", dict(_LLAMA, tie_word_embeddings=True)),
    # Llama 3.1 rope scaling with a short original context, so that all three frequency bands
    # (kept, interpolated, divided by `factor`) occur at head_dim 16 and show up within 12 tokens.
    "llama3_rope": (
        "llama",
        dict(
            _LLAMA,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=4.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "qwen2": ("qwen2", dict(_LLAMA, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(_LLAMA, num_key_value_heads=2, head_dim=16)),  # head_dim != width / heads
    "qwen3_bias": ("qwen3", dict(_LLAMA, num_attention_heads=2, num_key_value_heads=2, attention_bias=True)),
    "mistral": ("mistral", dict(_LLAMA, num_key_value_heads=1, sliding_window=4)),
}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Norm weights and biases start at 1 / 0 in transformers; move them so they matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            if name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def _build(family: str, seed: int = 0) -> torch.nn.Module:
    model_type, kwargs = FAMILIES[family]
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    _perturb(model, seed)
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    return model


def _batch(seed: int = 0, batch: int = 3, length: int = 12):
    """Left-padded ids and mask: row 0 full, the others with 3 and 7 pads (and one-token row)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for row, pads in zip(range(1, batch), (3, 7, length - 1)):
        mask[row, :pads] = 0
        ids[row, :pads] = 0
    return ids, mask


def _positions(mask):
    return np.clip(np.cumsum(mask, -1) - 1, 0, None)


def _torch_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(_positions(mask), dtype=torch.long),
        )
    return out.logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(model, params, ids, mask):
    return model.forward(params, ids, mask)


def _logits(pre, ids, mask):
    """Jitted logits; the compile cache is shared by every test of the same config."""
    return _jit_forward(pre.model, pre.params, ids, mask).logits


def _hidden(pre, ids, mask):
    return _jit_forward(pre.model, pre.params, ids, mask).hidden


def _max_diff(a, b, mask) -> float:
    keep = mask.astype(bool)
    return float(np.max(np.abs(np.asarray(a, np.float64)[keep] - np.asarray(b, np.float64)[keep])))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (directory, torch model, torch logits on `_batch()`), built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            model = _build(family)
            path = str(tmp_path_factory.mktemp(family))
            model.save_pretrained(path)
            ids, mask = _batch()
            cache[family] = (path, model, _torch_logits(model, ids, mask))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


# ----------------------------------------------------------------------------------------------
# Logits against transformers


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family, checkpoints):
    path, torch_model, ref = checkpoints(family)
    pre = jaxrlhf.load_pretrained(path)
    cfg = pre.config
    hf = torch_model.config
    assert cfg.tie_word_embeddings == bool(hf.tie_word_embeddings)
    assert ("lm_head" in pre.params) == (not cfg.tie_word_embeddings)
    ids, mask = _batch()
    logits = _logits(pre, ids, mask)
    assert logits.dtype == jnp.float32 and logits.shape == ref.shape
    diff = _max_diff(logits, ref, mask)
    assert diff < 1e-4, f"{family}: max |logit diff| = {diff:.2e}"
    assert np.abs(ref[mask.astype(bool)]).max() > 0.5  # logits are not trivially small


def test_config_switches(checkpoints):
    """The config picks up the options the families differ in."""
    cfg = jaxrlhf.load_pretrained(checkpoints("qwen3")[0]).config
    assert cfg.qk_norm and cfg.head_dim == 16 and not cfg.qkv_bias and cfg.num_kv_heads == 2
    cfg = jaxrlhf.load_pretrained(checkpoints("qwen2")[0]).config
    assert cfg.qkv_bias and not cfg.o_bias and cfg.tie_word_embeddings
    cfg = jaxrlhf.load_pretrained(checkpoints("mistral")[0]).config
    assert cfg.sliding_window == 4 and cfg.num_kv_heads == 1
    cfg = jaxrlhf.load_pretrained(checkpoints("gpt2")[0]).config
    assert cfg.positions == "learned" and cfg.norm == "layernorm" and cfg.tie_word_embeddings


def test_llama3_rope_frequencies_match_transformers(checkpoints):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    path, torch_model, _ = checkpoints("llama3_rope")
    cfg = jaxrlhf.load_pretrained(path).config
    assert cfg.rope_scaling is not None and cfg.rope_scaling[0] == "llama3"
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](torch_model.config, "cpu")
    ours = cfg.rope_inv_freq()
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
    plain = cfg.replace(rope_scaling=None).rope_inv_freq()
    changed = ~np.isclose(ours, plain)
    kept = np.isclose(ours, plain)
    divided = np.isclose(ours, plain / 4.0)
    assert kept.any() and divided.any() and (changed & ~divided).any()  # all three bands occur


# ----------------------------------------------------------------------------------------------
# Save -> transformers, shards, tokenizer


@pytest.mark.parametrize(
    "family", ["gpt2", "gpt2_untied", "llama_gqa", "llama3_rope", "qwen2", "qwen3", "qwen3_bias", "mistral"]
)
def test_round_trip_through_transformers(family, checkpoints, tmp_path):
    path, torch_model, ref = checkpoints(family)
    pre = jaxrlhf.load_pretrained(path)
    out = str(tmp_path / "saved")
    jaxrlhf.save_pretrained(out, pre)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded) is type(torch_model)
    # The saved weights are the original ones, bit for bit (tied copies included) ...
    original = torch_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), original[name].numpy(), err_msg=f"{family}: {name}")
    # ... so the logits agree up to torch's own kernel choices (its threading can reorder sums).
    ids, mask = _batch()
    diff = _max_diff(_torch_logits(reloaded, ids, mask), ref, mask)
    assert diff < 1e-4, f"{family}: {diff:.2e}"
    # And back into jaxrlhf: identical parameters.
    again = jaxrlhf.load_pretrained(out)
    assert again.config == pre.config
    jax.tree.map(np.testing.assert_array_equal, again.params, pre.params)


def test_sharded_save_and_load(checkpoints, tmp_path):
    path, _, ref = checkpoints("llama_gqa")
    pre = jaxrlhf.load_pretrained(path)
    out = tmp_path / "sharded"
    jaxrlhf.save_pretrained(str(out), pre, max_shard_bytes=8_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    again = jaxrlhf.load_pretrained(str(out))
    jax.tree.map(np.testing.assert_array_equal, again.params, pre.params)
    # transformers reads our shards too.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    ids, mask = _batch()
    assert _max_diff(_torch_logits(reloaded, ids, mask), ref, mask) < 1e-6


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_load_checkpoint_sharded_by_transformers(family, checkpoints, tmp_path):
    _, torch_model, ref = checkpoints(family)
    out = tmp_path / "hf_sharded"
    torch_model.save_pretrained(str(out), max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("*.safetensors"))) > 1
    pre = jaxrlhf.load_pretrained(str(out))
    ids, mask = _batch()
    assert _max_diff(_logits(pre, ids, mask), ref, mask) < 1e-4


def test_tokenizer_loaded_and_saved(checkpoints, tiny_tokenizer, tmp_path):
    path, _, _ = checkpoints("llama_gqa")
    ckpt = tmp_path / "with_tok"
    jaxrlhf.save_pretrained(str(ckpt), jaxrlhf.load_pretrained(path), tokenizer=tiny_tokenizer)
    assert (ckpt / "tokenizer.json").exists()
    text = "w1 w5 w17 nope"
    want = tiny_tokenizer(text)["input_ids"]
    pre = jaxrlhf.load_pretrained(str(ckpt))
    assert pre.tokenizer is not None
    assert pre.tokenizer(text)["input_ids"] == want == [5, 9, 21, 3]
    assert pre.tokenizer.pad_token_id == 0 and pre.tokenizer.eos_token_id == 2
    out = tmp_path / "resaved"
    jaxrlhf.save_pretrained(str(out), pre)  # the tokenizer travels with the Pretrained
    again = jaxrlhf.load_pretrained(str(out))
    assert again.tokenizer(text)["input_ids"] == want
    assert again.tokenizer.decode(want) == tiny_tokenizer.decode(want)
    assert again.tokenizer.padding_side == "left"
    # Without tokenizer files there is none.
    assert jaxrlhf.load_pretrained(path).tokenizer is None


# ----------------------------------------------------------------------------------------------
# Bad inputs: each a clear error naming the file or tensor


def _copy_checkpoint(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite_weights(directory, edit):
    from safetensors.numpy import load_file, save_file

    f = os.path.join(directory, "model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_error_directory_without_weights(checkpoints, tmp_path):
    d = _copy_checkpoint(checkpoints("llama_gqa")[0], tmp_path / "c")
    os.remove(d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no weights in .*c.*model\.safetensors"):
        jaxrlhf.load_pretrained(str(d))
    (d / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="PyTorch pickle"):
        jaxrlhf.load_pretrained(str(d))


def test_error_missing_directory_and_config(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        jaxrlhf.load_pretrained(str(tmp_path / "nowhere"))
    d = _copy_checkpoint(checkpoints("llama_gqa")[0], tmp_path / "c")
    os.remove(d / "config.json")
    with pytest.raises(CheckpointError, match=r"missing file .*config\.json"):
        jaxrlhf.load_pretrained(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"cannot read .*config\.json"):
        jaxrlhf.load_pretrained(str(d))
    cfg = {k: v for k, v in checkpoints("llama_gqa")[1].config.to_dict().items() if k != "hidden_size"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: missing or malformed field 'hidden_size'"):
        jaxrlhf.load_pretrained(str(d))


def test_error_unsupported_model_type(checkpoints, tmp_path):
    d = _copy_checkpoint(checkpoints("llama_gqa")[0], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"config\.json.*'bert'.*supported: gpt2, llama"):
        jaxrlhf.load_pretrained(str(d))
    cfg["model_type"] = "llama"
    cfg["rope_parameters"] = dict(rope_type="yarn", rope_theta=1e4, factor=2.0)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="yarn"):
        jaxrlhf.load_pretrained(str(d))


def test_error_wrong_shape(checkpoints, tmp_path):
    d = _copy_checkpoint(checkpoints("llama_gqa")[0], tmp_path / "c")
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_weights(d, lambda t: t.__setitem__(name, np.zeros((32, 32), np.float32)))  # 4 kv heads, not 2
    with pytest.raises(CheckpointError, match=rf"c[/\\]*: tensor '{name}' has shape \(32, 32\), expected \(16, 32\)"):
        jaxrlhf.load_pretrained(str(d))


def test_error_wrong_shape_gpt2_fused_qkv(checkpoints, tmp_path):
    d = _copy_checkpoint(checkpoints("gpt2")[0], tmp_path / "c")
    name = "transformer.h.0.attn.c_attn.weight"
    _rewrite_weights(d, lambda t: t.__setitem__(name, np.zeros((32, 64), np.float32)))
    with pytest.raises(CheckpointError, match=r"h\.0\.attn\.c_attn\.weight.*\(32, 64\)"):
        jaxrlhf.load_pretrained(str(d))


def test_error_missing_tensor(checkpoints, tmp_path):
    d = _copy_checkpoint(checkpoints("qwen3")[0], tmp_path / "c")
    name = "model.layers.0.self_attn.k_norm.weight"
    _rewrite_weights(d, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"{name}.*missing"):
        jaxrlhf.load_pretrained(str(d))


def test_error_missing_shard(checkpoints, tmp_path):
    _, torch_model, _ = checkpoints("qwen3")
    torch_model.save_pretrained(str(tmp_path), max_shard_size="20KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[1]
    os.remove(shard)
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*missing"):
        jaxrlhf.load_pretrained(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_error_corrupt_safetensors(damage, checkpoints, tmp_path):
    d = _copy_checkpoint(checkpoints("llama_gqa")[0], tmp_path / "c")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors"):
        jaxrlhf.load_pretrained(str(d))


# ----------------------------------------------------------------------------------------------
# bf16


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_bf16_load_close_to_fp32(family, checkpoints):
    path, _, ref = checkpoints(family)
    fp32 = jaxrlhf.load_pretrained(path)
    bf16 = jaxrlhf.load_pretrained(path, dtype=jnp.bfloat16)
    assert bf16.config.param_dtype == "bfloat16" and bf16.config.dtype == "bfloat16"
    assert {p.dtype for p in jax.tree.leaves(bf16.params)} == {jnp.dtype(jnp.bfloat16)}
    hidden = _hidden(bf16, *_batch())
    assert hidden.dtype == jnp.bfloat16  # compute in bf16 ...
    ids, mask = _batch()
    lo = _logits(bf16, ids, mask)
    assert lo.dtype == jnp.float32  # ... logits in float32
    keep = mask.astype(bool)
    scale = np.abs(ref[keep]).max()
    diff = _max_diff(lo, ref, mask)
    assert diff < 0.05 * scale, (diff, scale)
    agree = (np.argmax(np.asarray(lo), -1) == np.argmax(ref, -1))[keep].mean()
    assert agree >= 0.9, agree
    # Log-probs of the tokens come out float32 and near the fp32 ones.
    targets = jnp.asarray(np.roll(ids, -1, axis=1))
    lp16 = token_logprobs(lo, targets)
    lp32 = token_logprobs(_logits(fp32, ids, mask), targets)
    assert lp16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(lp16 - lp32) * mask)) < 0.1
    # Compute dtype can differ from storage dtype.
    mixed = jaxrlhf.load_pretrained(path, dtype=jnp.bfloat16, compute_dtype=jnp.float32)
    assert mixed.config.dtype == "float32" and _max_diff(_logits(mixed, ids, mask), ref, mask) < 0.05 * scale


def test_bf16_checkpoint_files(tmp_path):
    """A bf16 checkpoint written by transformers loads (upcast) into float32, and a bf16 model
    saves bf16 tensors that transformers and jaxrlhf read back bit for bit."""
    src = tmp_path / "hf_bf16"
    model16 = _build("llama_gqa").to(torch.bfloat16)
    model16.save_pretrained(str(src))
    pre = jaxrlhf.load_pretrained(str(src))
    assert {p.dtype for p in jax.tree.leaves(pre.params)} == {jnp.dtype(jnp.float32)}
    # Reference: transformers loading the same file in float32 (its rotary buffers stay fp32).
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(src), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids, mask = _batch()
    assert _max_diff(_logits(pre, ids, mask), _torch_logits(ref_model, ids, mask), mask) < 1e-4

    pre16 = jaxrlhf.load_pretrained(str(src), dtype=jnp.bfloat16)
    out = tmp_path / "ours_bf16"
    jaxrlhf.save_pretrained(str(out), pre16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    again = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert again.dtype == torch.bfloat16
    for name, p in model16.state_dict().items():
        if name in again.state_dict():
            assert torch.equal(again.state_dict()[name], p), name
    back = jaxrlhf.load_pretrained(str(out), dtype=jnp.bfloat16)
    jax.tree.map(np.testing.assert_array_equal, back.params, pre16.params)


# ----------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "qwen3", "mistral"])
def test_kv_cache_decode_matches_full_forward(family, checkpoints):
    pre = jaxrlhf.load_pretrained(checkpoints(family)[0])
    ids, mask = _batch(seed=1)
    B, T = ids.shape
    prompt, extra = T - 4, 2  # prefill 8 tokens, decode 4, two unused slots at the end
    full = _logits(pre, ids, mask)
    S = T + extra
    mask_S = np.concatenate([mask, np.zeros((B, extra), np.int32)], axis=1)
    forward = jax.jit(pre.forward)
    cache = pre.model.init_cache(B, S)
    out = forward(pre.params, ids[:, :prompt], mask_S, cache=cache, cache_index=0)
    steps = [out.logits]
    cache = out.cache
    for t in range(prompt, T):
        out = forward(pre.params, ids[:, t : t + 1], mask_S, cache=cache, cache_index=t)
        cache = out.cache
        steps.append(out.logits)
    got = np.concatenate(steps, axis=1)
    assert _max_diff(got, full, mask) < 1e-5
    # The cache ([B, K, S, E]) holds the prompt's keys/values in the first slots and nothing after T.
    assert np.all(np.asarray(cache[0]["k"][:, :, T:]) == 0)

    # The sampler's protocol: a prefill that returns a fresh cache of `cache_size` slots (the
    # prompt attends only to itself), decoding, and growing the cache between decode segments.
    prefill = pre.forward(pre.params, ids[:, :prompt], mask[:, :prompt], cache_size=prompt + 2)
    np.testing.assert_allclose(
        np.asarray(prefill.cache[0]["k"]),
        np.asarray(cache[0]["k"][:, :, : prompt + 2]) * (np.arange(prompt + 2) < prompt)[None, None, :, None],
        atol=1e-5,
        rtol=0,
    )
    cache, steps = prefill.cache, [prefill.logits]
    for t in range(prompt, T):
        if t == prompt + 2:
            cache = pre.model.grow_cache(cache, S)
            assert cache[0]["v"].shape[2] == S
        slots = cache[0]["k"].shape[2]
        out = forward(pre.params, ids[:, t : t + 1], mask_S[:, :slots], cache=cache, cache_index=t)
        cache = out.cache
        steps.append(out.logits)
    assert _max_diff(np.concatenate(steps, axis=1), full, mask) < 1e-5


def test_decoding_params_transpose_a_tied_head_only(checkpoints):
    """On CPU `generate` multiplies by a [D, V] copy of a tied embedding: same logits."""
    pre = jaxrlhf.load_pretrained(checkpoints("gpt2")[0])
    ids, mask = _batch()
    decoding = pre.model.decoding_params(pre.params)
    np.testing.assert_array_equal(np.asarray(decoding["decode_head"]), np.asarray(pre.params["embed"]["embedding"]).T)
    np.testing.assert_allclose(
        np.asarray(jax.jit(pre.apply)(decoding, ids, mask)), _logits(pre, ids, mask), atol=1e-5, rtol=0
    )
    untied = jaxrlhf.load_pretrained(checkpoints("llama_gqa")[0])
    assert untied.model.decoding_params(untied.params) is untied.params


# ----------------------------------------------------------------------------------------------
# Value models


def test_value_model_from_pretrained(checkpoints):
    pre = jaxrlhf.load_pretrained(checkpoints("qwen2")[0])
    ids, mask = _batch()
    vm, vparams = ValueModel.from_pretrained(pre, jax.random.key(0))
    values = jax.jit(vm.apply)(vparams, ids, mask)
    assert values.shape == ids.shape and values.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(values), 0.0)
    jax.tree.map(np.testing.assert_array_equal, vparams["trunk"], pre.params)

    vm, vparams = ValueModel.from_pretrained(pre, jax.random.key(1), head_scale=1.0)
    vparams["head"]["bias"] = jnp.array([0.25], jnp.float32)
    hidden = np.asarray(_hidden(pre, ids, mask), np.float64)
    w = np.asarray(vparams["head"]["kernel"], np.float64)
    assert w.shape == (pre.config.hidden_size, 1) and np.abs(w).max() > 0
    want = hidden @ w[:, 0] + 0.25
    np.testing.assert_allclose(np.asarray(jax.jit(vm.apply)(vparams, ids, mask)), want, atol=1e-5)
    # Shared trunk: the policy's hidden states through the same head give the same values.
    shared = value_head_apply(vparams["head"], _hidden(pre, ids, mask))
    np.testing.assert_allclose(np.asarray(shared), want, atol=1e-5)


def test_value_model_bf16_values_are_float32(checkpoints):
    pre = jaxrlhf.load_pretrained(checkpoints("llama_gqa")[0], dtype=jnp.bfloat16)
    vm, vparams = ValueModel.from_pretrained(pre, jax.random.key(0), head_scale=1.0)
    assert jax.eval_shape(vm.apply, vparams, *_batch()).dtype == jnp.float32


def test_init_params_tree_matches_loaded(checkpoints):
    """A from-scratch model has exactly the tree and shapes a checkpoint loads into."""
    for family in ("gpt2", "qwen3"):
        pre = jaxrlhf.load_pretrained(checkpoints(family)[0])
        fresh = jax.eval_shape(LanguageModel(pre.config).init_params, jax.random.key(0))
        assert jax.tree.structure(fresh) == jax.tree.structure(pre.params)
        assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, pre.params)
