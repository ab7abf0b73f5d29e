"""read_gguf against transformers' own GGUF loader, on tiny files written here (the real
SmolLM2 file is read in tests/test_gguf_generation.py, which loads it once for all its checks).

Each tiny file is written from a random transformers model the way llama.cpp's converter would
(llama.cpp tensor names, rotary rows permuted for the llama arch, GPT-2's Conv1D weights
transposed), so read_gguf must give back the original HF state dict, and agree with what
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` loads from the same file.
"""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from jaxrlhf.models.gguf import read_gguf, unpermute_rotary_rows  # noqa: E402

Q = gguf.GGMLQuantizationType

# ---------------------------------------------------------------------------------------------
# A tiny byte-level BPE vocabulary: the 256 byte symbols, a few merges and one control token.
# ---------------------------------------------------------------------------------------------
_MERGES = ["h e", "l l", "Ġ t", "Ġt he", "o r", "Ġ w", "Ġw or", "l d"]
_SPECIAL = "<|endoftext|>"


def _tiny_vocab():
    tokens = [_SPECIAL] + sorted(set(bytes_to_unicode().values()))
    tokens += ["".join(merge.split(" ")) for merge in _MERGES]
    token_types = [3] + [1] * (len(tokens) - 1)  # 3: control, 1: normal
    return tokens, token_types


VOCAB_SIZE = len(_tiny_vocab()[0])


def _write_tokenizer(writer):
    tokens, token_types = _tiny_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(_MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)


# ---------------------------------------------------------------------------------------------
# HF -> llama.cpp, written independently of the module under test.
# ---------------------------------------------------------------------------------------------
_LLAMA_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GPT2_TO_GGUF = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}


def _gguf_name(arch, hf_name):
    globals_ = {
        "model.embed_tokens": "token_embd",
        "model.norm": "output_norm",
        "lm_head": "output",
        "transformer.wte": "token_embd",
        "transformer.wpe": "position_embd",
        "transformer.ln_f": "output_norm",
    }
    stem, kind = hf_name.rsplit(".", 1)
    if stem in globals_:
        return f"{globals_[stem]}.{kind}"
    parts = stem.split(".")
    layer, module = parts[2], ".".join(parts[3:])
    table = _GPT2_TO_GGUF if arch == "gpt2" else _LLAMA_TO_GGUF
    return f"blk.{layer}.{table[module]}.{kind}"


def _permute_like_llama_cpp(w, n_head):
    """convert_hf_to_gguf's `permute`: per head, [half0 | half1] rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


SMALL = dict(hidden=64, heads=4, kv_heads=2, ffn=128, layers=2, ctx=128)
# transformers' GGUF loader reads neither n_inner nor n_positions for gpt2 and falls back to
# GPT-2's defaults (4 * n_embd, 1024), so the gpt2 file must have those to load there.
SMALL_GPT2 = dict(SMALL, ffn=4 * SMALL["hidden"], ctx=1024)


def _sizes(arch):
    return SMALL_GPT2 if arch == "gpt2" else SMALL


def _hf_model(arch, tie):
    torch.manual_seed(0)
    s = _sizes(arch)
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB_SIZE,
            n_embd=s["hidden"],
            n_layer=s["layers"],
            n_head=s["heads"],
            n_inner=s["ffn"],
            n_positions=s["ctx"],
            tie_word_embeddings=tie,
        )
        return transformers.GPT2LMHeadModel(config)
    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    config = cls[0](
        vocab_size=VOCAB_SIZE,
        hidden_size=s["hidden"],
        intermediate_size=s["ffn"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=s["ctx"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
    )
    model = cls[1](config)
    with torch.no_grad():  # norms start at 1: make them random so a mix-up would show
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_()
    return model


def _write_gguf(path, arch, hf_state, tie, quant):
    """Write `hf_state` as llama.cpp would: matrices quantized to `quant`, vectors in F32."""
    s = _sizes(arch)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(s["ctx"])
    writer.add_embedding_length(s["hidden"])
    writer.add_block_count(s["layers"])
    writer.add_feed_forward_length(s["ffn"])
    writer.add_head_count(s["heads"])
    if arch == "gpt2":
        writer.add_layer_norm_eps(1e-5)
    else:
        writer.add_head_count_kv(s["kv_heads"])
        writer.add_rope_dimension_count(s["hidden"] // s["heads"])
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
    _write_tokenizer(writer)
    for hf_name, value in hf_state.items():
        if tie and hf_name == "lm_head.weight":
            continue
        value = value.astype(np.float32)
        name = _gguf_name(arch, hf_name)
        if arch == "llama" and ".attn_q." in name:
            value = _permute_like_llama_cpp(value, s["heads"])
        if arch == "llama" and ".attn_k." in name:
            value = _permute_like_llama_cpp(value, s["kv_heads"])
        if (
            arch == "gpt2"
            and name.endswith(".weight")
            and name.split(".")[-2] in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
        ):
            value = np.ascontiguousarray(value.T)  # Conv1D (in, out) -> (out, in)
        if quant == Q.F32 or value.ndim == 1:
            writer.add_tensor(name, value)
        else:
            writer.add_tensor(name, gguf.quantize(value, quant), raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _transformers_load(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model, {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _hf_state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


CASES = [
    ("llama", False, Q.F32),
    ("llama", True, Q.Q8_0),
    ("qwen2", True, Q.F32),
    ("gpt2", True, Q.F32),
]


@pytest.mark.parametrize(
    "arch,tie,quant", CASES, ids=[f"{a}-{q.name}-{'tied' if t else 'untied'}" for a, t, q in CASES]
)
def test_tiny_gguf_matches_transformers(tmp_path, arch, tie, quant):
    source = _hf_model(arch, tie)
    original = _hf_state(source)
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(path, arch, original, tie, quant)

    checkpoint = read_gguf(path)
    hf_model, hf_loaded = _transformers_load(path)

    # Same parameters as transformers loads, value for value. A tied lm_head is left out, as in an
    # HF safetensors file; the config says to tie it.
    expected = {k: v for k, v in hf_loaded.items() if not (tie and k == "lm_head.weight")}
    expected = {k: v for k, v in expected.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert set(checkpoint.state_dict) == set(expected)
    for name, value in expected.items():
        got = checkpoint.state_dict[name]
        assert got.dtype == np.float32 and got.shape == value.shape, name
        np.testing.assert_allclose(got, value, rtol=0, atol=1e-6, err_msg=name)

    # ... and, for F32, exactly the weights the file was written from (permutation undone).
    if quant == Q.F32:
        for name in expected:
            np.testing.assert_array_equal(checkpoint.state_dict[name], original[name], err_msg=name)
    else:  # Q8_0 keeps ~8 bits: close to the original, not equal
        for name in expected:
            np.testing.assert_allclose(checkpoint.state_dict[name], original[name], atol=0.02, err_msg=name)

    # The config rebuilds the model the file was written from (transformers' own GGUF config
    # misses some gpt2 fields, e.g. n_inner and the token ids, so the source model is the reference).
    config = checkpoint.config
    assert config["model_type"] == hf_model.config.model_type == arch
    assert config["tie_word_embeddings"] is tie
    assert config["vocab_size"] == VOCAB_SIZE
    rebuilt = transformers.AutoConfig.for_model(**config)
    fields = (
        ["n_embd", "n_layer", "n_head", "n_inner", "n_positions", "vocab_size"]
        if arch == "gpt2"
        else [
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "vocab_size",
        ]
    )
    for field in fields:
        expected_value = getattr(source.config, field, None)
        if field == "head_dim" and expected_value is None:  # Qwen2Config derives it
            expected_value = source.config.hidden_size // source.config.num_attention_heads
        assert getattr(rebuilt, field) == expected_value, field
    eps = "layer_norm_epsilon" if arch == "gpt2" else "rms_norm_eps"
    assert getattr(rebuilt, eps) == pytest.approx(getattr(source.config, eps), rel=1e-6)
    assert config[eps] == 1e-5  # the float32 in the file, read back as the decimal it was
    if arch != "gpt2":
        assert rebuilt.rope_parameters["rope_theta"] == source.config.rope_parameters["rope_theta"]
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in checkpoint.state_dict

    # The tokenizer is transformers' GGUF tokenizer: same ids on text that uses the merges.
    text = "hello world, the world"
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert checkpoint.tokenizer(text)["input_ids"] == reference(text)["input_ids"]


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for heads, shape in [(4, (64, 8)), (2, (32, 8)), (3, (48,))]:
        w = rng.normal(size=shape).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rotary_rows(_permute_like_llama_cpp(w, heads), heads), w)


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    path = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in [
        ("context_length", 16),
        ("embedding_length", 8),
        ("block_count", 1),
        ("feed_forward_length", 16),
    ]:
        getattr(writer, f"add_{key}")(value)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), np.int32))  # I32: no dequantizer
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight.*I32"):
        read_gguf(path, load_tokenizer=False)


def test_unsupported_architecture_and_missing_file(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(NotImplementedError, match="mamba"):
        read_gguf(path)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")
