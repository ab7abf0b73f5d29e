"""GGUF files of the newer families: Gemma 2, Gemma 3, Phi-3 (LongRoPE), Qwen3-MoE, OLMoE, Mixtral.

Each tiny file is written from a random transformers model the way llama.cpp's converter writes
that architecture (written here, independently of `jaxrlhf.models.gguf`): Gemma's norms as
`1 + w`, the experts of a MoE layer stacked into `ffn_{gate,up,down}_exps`, Phi-3's fused
projections kept and its LongRoPE factors as tensors, Mixtral as `llama` with its q/k rows
permuted. `read_gguf` must give back the original state dict, the loaded model transformers'
logits, and, where transformers reads the architecture from GGUF, its parameters.
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_models import SMALL, batch, build, jit_forward, max_diff, reference_logits  # noqa: E402

import jaxrlhf  # noqa: E402
from jaxrlhf.models.gguf import read_gguf  # noqa: E402

_SMALL = SMALL
_PHI3_ROPE = {
    "rope_type": "longrope",
    "rope_theta": 1e4,
    "short_factor": [1.0, 1.5, 2.0, 2.5],
    "long_factor": [2.0, 3.0, 4.0, 5.0],
    "original_max_position_embeddings": 8,
}
_GEMMA = dict(_SMALL, head_dim=16, intermediate_size=48, sliding_window=4, query_pre_attn_scalar=16)
# (HF model_type, config fields, GGUF architecture, does transformers read it from GGUF?)
FAMILIES = {
    "gemma2": ("gemma2", dict(_GEMMA, attn_logit_softcapping=2.0, final_logit_softcapping=3.0), "gemma2", True),
    "gemma3": ("gemma3_text", dict(_GEMMA, num_hidden_layers=3, sliding_window_pattern=3), "gemma3", True),
    "phi3": (
        "phi3",
        dict(_SMALL, intermediate_size=48, original_max_position_embeddings=8, rope_parameters=_PHI3_ROPE),
        "phi3",
        False,
    ),
    # transformers' GGUF loader does not read expert_feed_forward_length (it keeps Qwen3-MoE's
    # default 768), so the experts have that width here.
    "qwen3_moe": (
        "qwen3_moe",
        dict(
            _SMALL,
            head_dim=8,
            intermediate_size=48,
            moe_intermediate_size=768,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        ),  # fmt: skip
        "qwen3moe",
        True,
    ),
    "olmoe": ("olmoe", dict(_SMALL, intermediate_size=16, num_experts=4, num_experts_per_tok=2), "olmoe", False),
    "mixtral": (
        "mixtral",
        dict(_SMALL, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
        "llama",
        False,
    ),
}
_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "self_attn.qkv_proj": "attn_qkv",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "block_sparse_moe.gate": "ffn_gate_inp",
}
_GEMMA_BLOCK = {
    **_BLOCK,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_GLOBALS = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
_EXPERTS = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def _permute(w, heads):
    """convert_hf_to_gguf's rotary permutation of the llama arch's q / k rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write(path, arch, model, state):
    """`state` (HF names, the Hub layout) as llama.cpp writes `arch`: F32 tensors and metadata."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    writer.add_rope_freq_base(rope["rope_theta"])
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(cfg.sliding_window)
        if arch == "gemma2":
            writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
            writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
        else:
            writer.add_uint32(f"{arch}.attention.sliding_window_pattern", 3)
    if arch == "phi3":
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        writer.add_sliding_window(0)
        writer.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))
        writer.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
        writer.add_expert_feed_forward_length(width)
    writer.add_feed_forward_length(cfg.intermediate_size)
    table = _GEMMA_BLOCK if arch.startswith("gemma") else _BLOCK
    stacks: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, value in state.items():
        value = value.astype(np.float32)
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            value = value + 1  # llama.cpp stores Gemma's (1 + w)
        globals_ = {
            "model.embed_tokens.weight": "token_embd",
            "model.norm.weight": "output_norm",
            "lm_head.weight": "output",
        }
        if name in globals_:
            writer.add_tensor(f"{globals_[name]}.weight", value)
            continue
        parts = name.split(".")
        layer, module = parts[2], ".".join(parts[3:-1])
        if ".experts." in name:  # model.layers.i.<mlp|block_sparse_moe>.experts.j.<proj>.weight
            stacks.setdefault((layer, _EXPERTS[parts[-2]]), {})[int(parts[-3])] = value
            continue
        gguf_module = table[module]
        if arch == "llama" and gguf_module in ("attn_q", "attn_k"):
            value = _permute(value, cfg.num_attention_heads if gguf_module == "attn_q" else cfg.num_key_value_heads)
        writer.add_tensor(f"blk.{layer}.{gguf_module}.weight", value)
    for (layer, proj), per_expert in stacks.items():  # [E, out, in], as torch.stack of HF's (out, in)
        writer.add_tensor(f"blk.{layer}.ffn_{proj}_exps.weight", np.stack([per_expert[e] for e in sorted(per_expert)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


FAST = ("phi3", "mixtral")  # the others take 4-25 s each on 2 cores (compiles, transformers' GGUF loader)


@pytest.mark.parametrize("family", [f if f in FAST else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_gguf_reads_back_the_model(family, tmp_path):
    from safetensors.numpy import load_file

    model_type, fields, arch, transformers_reads_it = FAMILIES[family]
    model = build(model_type, fields)
    model.save_pretrained(str(tmp_path / "hf"))
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))  # the Hub layout (per-expert)
    path = tmp_path / f"tiny-{family}.gguf"
    _write(path, arch, model, state)

    checkpoint = read_gguf(path, load_tokenizer=False)
    assert checkpoint.config["model_type"] == model_type
    expected = {k: v for k, v in state.items() if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    assert set(checkpoint.state_dict) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(checkpoint.state_dict[name], value, rtol=0, atol=1e-6, err_msg=name)

    pre = jaxrlhf.load_pretrained(str(path))
    ids, mask = batch()
    assert (
        max_diff(jit_forward(pre.model, pre.params, ids, mask).logits, reference_logits(model, ids, mask), mask) < 1e-4
    )
    if transformers_reads_it:  # the same parameters as transformers' own GGUF loader
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file=path.name, dtype=torch.float32
        )
        for name, value in theirs.state_dict().items():
            if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                continue  # transformers 5's fused in-memory experts; the per-expert tensors are compared above
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            np.testing.assert_allclose(value.numpy(), state[name], rtol=0, atol=1e-6, err_msg=name)
