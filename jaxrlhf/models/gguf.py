"""Read a llama.cpp GGUF file as an HF-style checkpoint: config dict, state dict, tokenizer.

A GGUF file holds three things that an HF model directory spreads over several files:

* the config, as metadata under llama.cpp's key names (``llama.embedding_length``, ...);
* the weights, under llama.cpp's tensor names (``blk.0.attn_q.weight``), possibly quantized in
  blocks (Q8_0, Q4_1, K-quants, ...), and with a few layout changes made by llama.cpp's converter;
* the tokenizer, as metadata (``tokenizer.ggml.tokens``, ``.merges``, ...).

``read_gguf`` turns them back into what ``jaxrlhf.load_pretrained`` eats: an HF ``config.json``-style
dict, an HF-named float32 state dict in HF layout, and a ``transformers`` tokenizer.

Covered architectures (``general.architecture``): ``llama`` (and Mistral files, which llama.cpp
writes as ``llama``, and Mixtral: ``llama`` with experts), ``qwen2``, ``qwen3``, ``gpt2``,
``gemma2``, ``gemma3`` (text), ``phi3`` (Phi-3/3.5/4, LongRoPE factors as the
``rope_factors_{short,long}`` tensors), ``qwen3moe`` and ``olmoe``. llama.cpp's changes undone
besides the rotary permutation: Gemma's norms are stored as ``1 + w`` (1 is subtracted), the
experts of a MoE layer are stacked in ``ffn_{gate,up,down}_exps`` (split back into the Hub's
per-expert tensors), and a few hyper-parameters llama.cpp derives rather than stores get its rule
(Gemma's ``query_pre_attn_scalar``: the head dim, or hidden / heads for the 27B models; Gemma 3's
local rope base 10000 and pattern 6 unless the file says; Qwen3-MoE's ``norm_topk_prob`` true).
Tensor types: whatever ``gguf.dequantize`` supports (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
Q2_K..Q6_K, IQ*, TQ*, MXFP4); anything else
(e.g. integer tensors, Q8_1, Q8_K) raises a ``ValueError`` naming the tensor and its type.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["GGUFCheckpoint", "read_gguf", "unpermute_rotary_rows", "SUPPORTED_ARCHITECTURES"]


@dataclass(frozen=True)
class GGUFCheckpoint:
    """What a GGUF file holds, in HF terms.

    config: an HF ``config.json``-style dict (``model_type``, ``hidden_size``, ...).
    state_dict: HF parameter name -> float32 array in HF layout (``(out, in)`` for ``nn.Linear``,
        ``(in, out)`` for GPT-2's ``Conv1D``), exactly what ``model.state_dict()`` would hold.
    tokenizer: the ``transformers`` tokenizer that ``AutoTokenizer.from_pretrained(..., gguf_file=)``
        builds from the file, or ``None`` when the file has no tokenizer or it was not asked for.
    """

    config: dict
    state_dict: dict[str, np.ndarray]
    tokenizer: Any


# --------------------------------------------------------------------------------------------
# Tensor names: llama.cpp -> HF
# --------------------------------------------------------------------------------------------

# Llama-style decoders (llama, mistral, qwen2, qwen3) share one naming scheme.
_LLAMA_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LLAMA_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # qwen3's per-head RMSNorm on queries
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_GPT2_GLOBAL_NAMES = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
_GPT2_BLOCK_NAMES = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
# GPT-2's HF checkpoint stores these as Conv1D weights, shaped (in, out); llama.cpp transposes
# them to (out, in) like every other matrix, so they are transposed back here.
_GPT2_CONV1D = {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}

# Gemma 2/3: four norms per block (llama.cpp's ffn_norm is HF's pre_feedforward_layernorm).
_GEMMA_BLOCK_NAMES = {
    **_LLAMA_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3 keeps its fused projections: attn_qkv = qkv_proj, ffn_up = gate_up_proj.
_PHI3_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}
# Mixture of experts: the router; the stacked experts (`_EXPERT_TENSORS`) are split per expert.
_MOE_BLOCK_NAMES = {**_LLAMA_BLOCK_NAMES, "ffn_gate_inp": "mlp.gate"}
_MIXTRAL_BLOCK_NAMES = {**_LLAMA_BLOCK_NAMES, "ffn_gate_inp": "block_sparse_moe.gate"}
_EXPERT_TENSORS = {"ffn_gate_exps": "gate", "ffn_up_exps": "up", "ffn_down_exps": "down"}
# HF's per-expert module names: `{prefix}.experts.{j}.{name}.weight`.
_EXPERT_HF_NAMES = {
    "mixtral": ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}),
    "default": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
}
_ROPE_FACTOR_TENSORS = ("rope_factors_short.weight", "rope_factors_long.weight")  # Phi-3 LongRoPE

_NAME_TABLES = {
    "llama": (_LLAMA_GLOBAL_NAMES, _LLAMA_BLOCK_NAMES, "model.layers"),
    "qwen2": (_LLAMA_GLOBAL_NAMES, _LLAMA_BLOCK_NAMES, "model.layers"),
    "qwen3": (_LLAMA_GLOBAL_NAMES, _LLAMA_BLOCK_NAMES, "model.layers"),
    "gpt2": (_GPT2_GLOBAL_NAMES, _GPT2_BLOCK_NAMES, "transformer.h"),
    "gemma2": (_LLAMA_GLOBAL_NAMES, _GEMMA_BLOCK_NAMES, "model.layers"),
    "gemma3": (_LLAMA_GLOBAL_NAMES, _GEMMA_BLOCK_NAMES, "model.layers"),
    "phi3": (_LLAMA_GLOBAL_NAMES, _PHI3_BLOCK_NAMES, "model.layers"),
    "qwen3moe": (_LLAMA_GLOBAL_NAMES, _MOE_BLOCK_NAMES, "model.layers"),
    "olmoe": (_LLAMA_GLOBAL_NAMES, _MOE_BLOCK_NAMES, "model.layers"),
}
SUPPORTED_ARCHITECTURES = tuple(_NAME_TABLES)

_BLOCK_TENSOR = re.compile(r"^blk\.(?P<layer>\d+)\.(?P<module>[a-z0-9_]+)\.(?P<kind>weight|bias)$")
_GLOBAL_TENSOR = re.compile(r"^(?P<module>[a-z0-9_]+)\.(?P<kind>weight|bias)$")


def _hf_name(arch: str, gguf_name: str, model_type: str | None = None) -> str | None:
    """HF parameter name for a llama.cpp tensor name, or None for tensors HF has no slot for."""
    global_names, block_names, layers_prefix = _NAME_TABLES[arch]
    if model_type == "mixtral":
        block_names = _MIXTRAL_BLOCK_NAMES
    if m := _BLOCK_TENSOR.match(gguf_name):
        module = block_names.get(m["module"])
        return None if module is None else f"{layers_prefix}.{m['layer']}.{module}.{m['kind']}"
    if m := _GLOBAL_TENSOR.match(gguf_name):
        module = global_names.get(m["module"])
        return None if module is None else f"{module}.{m['kind']}"
    return None


# --------------------------------------------------------------------------------------------
# Layout: undo llama.cpp's rotary permutation
# --------------------------------------------------------------------------------------------


def unpermute_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of ``convert_hf_to_gguf``'s ``permute`` on a q/k projection (weight or bias).

    HF's rotary embedding rotates the pair (i, i + d/2) of each head (``rotate_half``); llama.cpp's
    "normal" rope rotates adjacent pairs (2i, 2i + 1). The converter therefore reorders each head's
    rows from [first half | second half] to interleaved [x0, x_{d/2}, x1, x_{d/2+1}, ...]:
    ``w.reshape(h, 2, d/2, ...).swapaxes(1, 2)``. Undoing it views rows as (h, d/2, 2, ...) and
    swaps back. ``n_heads`` is the number of heads the tensor holds (the KV heads for k).
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot un-permute {rows} rotary rows into {n_heads} heads")
    per_head_half = rows // n_heads // 2
    return weight.reshape(n_heads, per_head_half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# --------------------------------------------------------------------------------------------
# Metadata -> HF config
# --------------------------------------------------------------------------------------------


def _as_float32_literal(value: float) -> float:
    """GGUF stores floats as float32; give back the shortest decimal of that float32
    (9.999999747378752e-06 -> 1e-05), which is what the original config.json said."""
    return float(str(np.float32(value)))


def _read_metadata(reader) -> dict[str, Any]:
    """All key/value pairs of the file as plain Python values (strings, numbers, lists)."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _token_ids(meta: dict) -> dict:
    ids = {
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    return {key: value for key, value in ids.items() if value is not None}


def _vocab_size(meta: dict, arch: str, tensor_shapes: dict, path: str) -> int:
    if f"{arch}.vocab_size" in meta:
        return int(meta[f"{arch}.vocab_size"])
    if "token_embd.weight" in tensor_shapes:
        return int(tensor_shapes["token_embd.weight"][0])
    if "tokenizer.ggml.tokens" in meta:
        return len(meta["tokenizer.ggml.tokens"])
    raise ValueError(f"{path}: cannot tell the vocabulary size (no vocab_size, token_embd or tokens)")


def _require(meta: dict, key: str, path: str):
    if key not in meta:
        raise ValueError(f"{path}: GGUF metadata lacks required key {key!r}")
    return meta[key]


def _llama_family_config(meta: dict, arch: str, tensor_shapes: dict, path: str) -> dict:
    """Config for llama / mistral / qwen2 / qwen3 from ``{arch}.*`` metadata keys."""
    key = lambda name: _require(meta, f"{arch}.{name}", path)  # noqa: E731
    n_heads = int(key("attention.head_count"))
    n_kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", n_heads))
    hidden = int(key("embedding_length"))
    # head_dim: stated as key_length when it differs from hidden / heads (e.g. Qwen3); otherwise the
    # q projection's rows tell it, which is always right.
    if f"{arch}.attention.key_length" in meta:
        head_dim = int(meta[f"{arch}.attention.key_length"])
    elif "blk.0.attn_q.weight" in tensor_shapes:
        head_dim = int(tensor_shapes["blk.0.attn_q.weight"][0]) // n_heads
    else:
        head_dim = hidden // n_heads

    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    linear_ok = arch == "gemma3" and scaling == "linear"  # Gemma 3 4B+: linear on the global layers
    if (scaling not in ("none", None) and not linear_ok) or "rope_freqs.weight" in tensor_shapes:
        raise NotImplementedError(
            f"{path}: rope scaling ({scaling!r}"
            f"{', rope_freqs tensor' if 'rope_freqs.weight' in tensor_shapes else ''}) is not supported yet"
        )

    model_type = _MODEL_TYPES.get(arch, arch)
    # llama.cpp writes Mistral and Mixtral checkpoints as "llama"; transformers tells Mistral apart by name.
    if arch == "llama" and f"{arch}.expert_count" in meta:
        model_type = "mixtral"
    elif arch == "llama" and "mistral" in str(meta.get("general.name", "")).lower():
        model_type = "mistral"
    class_prefix = _CLASS_PREFIXES[model_type]

    config = {
        "model_type": model_type,
        "architectures": [f"{class_prefix}ForCausalLM"],
        "vocab_size": _vocab_size(meta, arch, tensor_shapes, path),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": _as_float32_literal(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _as_float32_literal(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        # llama.cpp writes the output projection only when it is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        **_token_ids(meta),
    }
    if model_type in ("llama", "mistral"):
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_shapes
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_shapes
    if model_type in ("qwen3", "qwen3_moe", "olmoe", "gemma2", "gemma3_text"):
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_shapes
    if model_type in ("gemma2", "gemma3_text"):
        config.update(_gemma_config(meta, arch, config, path))
    if model_type == "phi3":
        config.update(_phi3_config(meta, arch, config, tensor_shapes))
    if model_type in ("qwen3_moe", "olmoe", "mixtral"):
        config.update(_moe_config(meta, arch, model_type, tensor_shapes))
    return config


_MODEL_TYPES = {"gemma3": "gemma3_text", "qwen3moe": "qwen3_moe"}
_CLASS_PREFIXES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "mixtral": "Mixtral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma2": "Gemma2",
    "gemma3_text": "Gemma3",
    "phi3": "Phi3",
    "qwen3_moe": "Qwen3Moe",
    "olmoe": "Olmoe",
}
# The 27B Gemma models scale attention scores by (hidden / heads) ** -0.5, the others by the head
# dim's: llama.cpp tells them by depth (Gemma 2 27B: 46 layers, Gemma 3 27B: 62).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma_config(meta: dict, arch: str, config: dict, path: str) -> dict:
    """Gemma 2 / 3 fields: soft-capping, the window and its layer pattern, Gemma 3's rope."""
    layers, window = config["num_hidden_layers"], meta.get(f"{arch}.attention.sliding_window")
    big = layers == _GEMMA_27B_LAYERS[arch]
    out: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": int(_require(meta, f"{arch}.attention.sliding_window", path))
        if window is None
        else int(window),
        "query_pre_attn_scalar": config["hidden_size"] // config["num_attention_heads"] if big else config["head_dim"],
        "attn_logit_softcapping": _optional_float32(meta.get(f"{arch}.attn_logit_softcapping")),
        "final_logit_softcapping": _optional_float32(meta.get(f"{arch}.final_logit_softcapping")),
    }
    if arch == "gemma2":
        out["layer_types"] = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
        return out
    period = int(meta.get(f"{arch}.attention.sliding_window_pattern", 6))
    out["layer_types"] = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(layers)]
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        full.update(rope_type="linear", factor=_as_float32_literal(meta[f"{arch}.rope.scaling.factor"]))
    local = _as_float32_literal(meta.get(f"{arch}.rope.freq_base_swa", 10000.0))
    out["rope_parameters"] = {
        "full_attention": full,
        "sliding_attention": {"rope_type": "default", "rope_theta": local},
    }
    return out


def _phi3_config(meta: dict, arch: str, config: dict, tensor_shapes: dict) -> dict:
    """Phi-3 fields: partial rotary dims, the window (0: none, Phi-4), LongRoPE's original
    context; its factors are read from the rope_factors tensors by `read_gguf`."""
    rotary = int(meta.get(f"{arch}.rope.dimension_count", config["head_dim"]))
    window = int(meta.get(f"{arch}.attention.sliding_window", 0)) or None
    original = int(meta.get(f"{arch}.rope.scaling.original_context_length", config["max_position_embeddings"]))
    out: dict[str, Any] = {
        "sliding_window": window,
        "original_max_position_embeddings": original,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": config["rope_theta"],
            "partial_rotary_factor": rotary / config["head_dim"],
        },
    }
    if _ROPE_FACTOR_TENSORS[0] in tensor_shapes:
        out["rope_parameters"].update(rope_type="longrope", original_max_position_embeddings=original)
        if f"{arch}.rope.scaling.attn_factor" in meta:
            out["rope_parameters"]["attention_factor"] = _as_float32_literal(meta[f"{arch}.rope.scaling.attn_factor"])
    return out


def _moe_config(meta: dict, arch: str, model_type: str, tensor_shapes: dict) -> dict:
    """Experts, top-k and the expert width (the stacked `ffn_gate_exps` tells it)."""
    experts = int(meta[f"{arch}.expert_count"])
    width = int(meta.get(f"{arch}.expert_feed_forward_length", tensor_shapes["blk.0.ffn_gate_exps.weight"][1]))
    out: dict[str, Any] = {"num_experts_per_tok": int(meta[f"{arch}.expert_used_count"])}
    if model_type == "mixtral":
        return {**out, "num_local_experts": experts, "intermediate_size": width}
    out.update(num_experts=experts, norm_topk_prob=model_type == "qwen3_moe")
    if model_type == "qwen3_moe":
        return {**out, "moe_intermediate_size": width}
    return {**out, "intermediate_size": width, "clip_qkv": _optional_float32(meta.get(f"{arch}.attention.clamp_kqv"))}


def _optional_float32(value):
    return None if value is None else _as_float32_literal(value)


def _gpt2_config(meta: dict, tensor_shapes: dict, path: str) -> dict:
    key = lambda name: _require(meta, f"gpt2.{name}", path)  # noqa: E731
    context = int(key("context_length"))
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": _vocab_size(meta, "gpt2", tensor_shapes, path),
        "n_embd": int(key("embedding_length")),
        "n_layer": int(key("block_count")),
        "n_head": int(key("attention.head_count")),
        "n_inner": int(key("feed_forward_length")),
        "n_positions": context,
        "n_ctx": context,
        "layer_norm_epsilon": _as_float32_literal(key("attention.layer_norm_epsilon")),
        "activation_function": "gelu_new",
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        **_token_ids(meta),
    }


def _config_from_metadata(meta: dict, tensor_shapes: dict, path: str) -> dict:
    arch = meta["general.architecture"]
    if arch == "gpt2":
        return _gpt2_config(meta, tensor_shapes, path)
    return _llama_family_config(meta, arch, tensor_shapes, path)


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def _dequantize(tensor, path: str) -> np.ndarray:
    """The tensor's values as a float32 array in numpy (row-major, HF) order, in its own memory."""
    import gguf

    try:
        values = gguf.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
        raise ValueError(
            f"{path}: tensor {tensor.name!r} has GGML type {tensor.tensor_type.name}, which cannot be "
            f"dequantized ({err})"
        ) from None
    # ggml lists dimensions fastest-first; numpy the other way round.
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.array(values, dtype=np.float32).reshape(shape)


def _to_hf_tensor(arch: str, config: dict, gguf_name: str, values: np.ndarray) -> np.ndarray:
    """Undo the layout changes llama.cpp's converter made to this tensor."""
    module = gguf_name.split(".")[-2]
    if arch in ("gemma2", "gemma3") and module.endswith("norm"):
        return values - np.float32(1.0)  # llama.cpp stores Gemma's `1 + w`
    if arch == "llama" and module in ("attn_q", "attn_k"):
        # Only the llama arch uses llama.cpp's "normal" (adjacent-pair) rope; qwen2/qwen3 use the
        # NEOX (half-split) rope, like HF, and are stored unpermuted.
        heads = config["num_attention_heads"] if module == "attn_q" else config["num_key_value_heads"]
        return unpermute_rotary_rows(values, heads)
    if arch == "gpt2" and module in _GPT2_CONV1D and gguf_name.endswith(".weight"):
        return np.ascontiguousarray(values.T)
    return values


def _expert_tensors(model_type: str, match, stacked_ExOxI: np.ndarray) -> dict[str, np.ndarray]:
    """llama.cpp's stacked `ffn_{gate,up,down}_exps` (`[E, out, in]`) as HF's per-expert tensors."""
    prefix, names = _EXPERT_HF_NAMES.get(model_type, _EXPERT_HF_NAMES["default"])
    proj = names[_EXPERT_TENSORS[match["module"]]]
    layer = f"model.layers.{match['layer']}.{prefix}.experts"
    return {f"{layer}.{e}.{proj}.weight": np.ascontiguousarray(w) for e, w in enumerate(stacked_ExOxI)}


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    directory, filename = os.path.split(os.path.abspath(path))
    return AutoTokenizer.from_pretrained(directory, gguf_file=filename)


def read_gguf(path: str | os.PathLike, *, load_tokenizer: bool = True) -> GGUFCheckpoint:
    """Read a GGUF file into an HF-style config, float32 state dict and tokenizer.

    Args:
        path: a ``.gguf`` file on local disk.
        load_tokenizer: build the ``transformers`` tokenizer from the file's tokenizer metadata
            (skipped, giving ``None``, when False or when the file has no ``tokenizer.ggml.model``).

    Raises:
        FileNotFoundError: no such file.
        NotImplementedError: an architecture or rope scaling this reader does not cover.
        ValueError: a tensor whose type cannot be dequantized, or missing metadata.
    """
    from gguf import GGUFReader

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    reader = GGUFReader(path)
    meta = _read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in _NAME_TABLES:
        raise NotImplementedError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    tensor_shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    config = _config_from_metadata(meta, tensor_shapes, path)

    state_dict: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        if tensor.name in _ROPE_FACTOR_TENSORS:  # Phi-3's LongRoPE factors belong in the config
            kind = "short_factor" if "short" in tensor.name else "long_factor"
            config["rope_parameters"][kind] = [float(f) for f in _dequantize(tensor, path)]
            continue
        expert = _BLOCK_TENSOR.match(tensor.name)
        if expert is not None and expert["module"] in _EXPERT_TENSORS:
            state_dict.update(_expert_tensors(config["model_type"], expert, _dequantize(tensor, path)))
            continue
        hf_name = _hf_name(arch, tensor.name, config["model_type"])
        if hf_name is None:
            raise NotImplementedError(f"{path}: tensor {tensor.name!r} has no HF counterpart for arch {arch!r}")
        values = _dequantize(tensor, path)
        state_dict[hf_name] = _to_hf_tensor(arch, config, tensor.name, values)

    tokenizer = None
    if load_tokenizer and "tokenizer.ggml.model" in meta:
        tokenizer = _load_tokenizer(path)
    return GGUFCheckpoint(config=config, state_dict=state_dict, tokenizer=tokenizer)
