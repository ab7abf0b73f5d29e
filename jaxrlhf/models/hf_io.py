"""Hugging Face checkpoints in and out: `config.json` + `*.safetensors` (+ index) + tokenizer files.

Name and layout mapping (HF -> ours), per layer i:

| HF (Llama family)                         | HF (GPT-2)                     | jaxrlhf                    |
| ----------------------------------------- | ------------------------------ | -------------------------- |
| model.embed_tokens.weight [V, D]          | wte.weight [V, D]              | embed/embedding            |
|                                           | wpe.weight [P, D]              | pos_embed/embedding        |
| layers.i.input_layernorm.weight           | h.i.ln_1.{weight,bias}         | layer_i/attn_norm          |
| layers.i.self_attn.{q,k,v}_proj (out, in) | h.i.attn.c_attn (in, 3 out)    | layer_i/attn/{q,k,v} (in, out) |
| layers.i.self_attn.o_proj (out, in)       | h.i.attn.c_proj (in, out)      | layer_i/attn/o             |
| layers.i.self_attn.{q,k}_norm (Qwen3)     |                                | layer_i/attn/{q,k}_norm    |
| layers.i.post_attention_layernorm         | h.i.ln_2                       | layer_i/mlp_norm           |
| layers.i.mlp.{gate,up,down}_proj (out, in)| h.i.mlp.{c_fc,c_proj} (in, out)| layer_i/mlp/{gate,up,down} |
| model.norm.weight                         | ln_f                           | final_norm                 |
| lm_head.weight [V, D] (untied only)       | (tied)                         | lm_head [D, V]             |

PyTorch `nn.Linear` stores (out, in) and is transposed; GPT-2's `Conv1D` already stores (in, out).

A scanned model (`ModelConfig.scan_layers`) keeps the layers stacked in memory (`layers/...`,
leaves `[num_layers, ...]`); on disk the layout is always HF's per-layer one: `params_from_hf`
stacks after converting and `hf_from_params` unstacks before (`transformer.stack_layers`).

Hub ids (`"org/name"`) resolve through `huggingface_hub.snapshot_download` (`resolve_hub_id`).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.models.config import FULL, GEMMA_FAMILY, SLIDING, ModelConfig, UnsupportedModelError
from jaxrlhf.models.lm import LanguageModel, Pretrained
from jaxrlhf.models.moe import EXPERT_PROJECTIONS
from jaxrlhf.models.transformer import stack_layers, unstack_layers


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not match the model's config."""


# ----------------------------------------------------------------------------------------------
# State-dict <-> parameter tree


def _linear(w_outxin):
    return np.asarray(w_outxin).T


def _hf_layer_map(config: ModelConfig, i: int) -> list[tuple[str, tuple[str, ...], bool]]:
    """(HF name, our path, transpose?) for every tensor of layer i (GPT-2's fused qkv excluded)."""
    if config.model_type == "gpt2":
        p = f"h.{i}."
        rows = [
            (p + "ln_1.weight", ("attn_norm", "scale"), False),
            (p + "ln_1.bias", ("attn_norm", "bias"), False),
            (p + "attn.c_proj.weight", ("attn", "o", "kernel"), False),
            (p + "attn.c_proj.bias", ("attn", "o", "bias"), False),
            (p + "ln_2.weight", ("mlp_norm", "scale"), False),
            (p + "ln_2.bias", ("mlp_norm", "bias"), False),
            (p + "mlp.c_fc.weight", ("mlp", "up", "kernel"), False),
            (p + "mlp.c_fc.bias", ("mlp", "up", "bias"), False),
            (p + "mlp.c_proj.weight", ("mlp", "down", "kernel"), False),
            (p + "mlp.c_proj.bias", ("mlp", "down", "bias"), False),
        ]
        return rows
    p = f"model.layers.{i}."
    rows: list[tuple[str, tuple[str, ...], bool]] = [(p + "input_layernorm.weight", ("attn_norm", "scale"), False)]
    if config.sandwich_norms:  # Gemma 2/3: HF's post_attention_layernorm is the norm *after* attention
        rows += [
            (p + "post_attention_layernorm.weight", ("post_attn_norm", "scale"), False),
            (p + "pre_feedforward_layernorm.weight", ("mlp_norm", "scale"), False),
            (p + "post_feedforward_layernorm.weight", ("post_mlp_norm", "scale"), False),
        ]
    else:
        rows.append((p + "post_attention_layernorm.weight", ("mlp_norm", "scale"), False))
    attention = ("o",) if config.model_type in FUSED_FAMILIES else ("q", "k", "v", "o")
    for ours in attention:
        theirs = f"{ours}_proj"
        rows.append((p + f"self_attn.{theirs}.weight", ("attn", ours, "kernel"), True))
        has_bias = config.qkv_bias if ours != "o" else config.o_bias
        if has_bias:
            rows.append((p + f"self_attn.{theirs}.bias", ("attn", ours, "bias"), False))
    if config.qk_norm:
        rows.append((p + "self_attn.q_norm.weight", ("attn", "q_norm", "scale"), False))
        rows.append((p + "self_attn.k_norm.weight", ("attn", "k_norm", "scale"), False))
    if config.is_moe_layer(i):  # the router; the experts are stacked by `_expert_tensors`
        rows.append((f"{p}{_moe_prefix(config)}.gate.weight", ("mlp", "router", "kernel"), True))
        return rows
    names = ("gate", "up", "down") if config.mlp == "gated" else ("up", "down")
    if config.model_type in FUSED_FAMILIES:
        names = ("down",)  # gate and up: the fused gate_up_proj (`_fused_tensors`)
    for ours in names:
        rows.append((p + f"mlp.{ours}_proj.weight", ("mlp", ours, "kernel"), True))
        if config.mlp_bias:
            rows.append((p + f"mlp.{ours}_proj.bias", ("mlp", ours, "bias"), False))
    return rows


# Families whose checkpoints fuse projections that we keep apart: Phi-3's `qkv_proj` ([q; k; v]
# rows) and `gate_up_proj` ([gate; up] rows), split on load and concatenated on save.
FUSED_FAMILIES = ("phi3",)


def _fused_tensors(config: ModelConfig, i: int) -> list[tuple[str, list[tuple[tuple[str, ...], int]]]]:
    """`(HF name, [(our kernel path, rows), ...])` of layer i's fused `(out, in)` weights, whose
    row blocks are our projections in order."""
    if config.model_type not in FUSED_FAMILIES:
        return []
    p = f"model.layers.{i}."
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return [
        (p + "self_attn.qkv_proj.weight", [(("attn", n, "kernel"), w) for n, w in (("q", q), ("k", kv), ("v", kv))]),
        (
            p + "mlp.gate_up_proj.weight",
            [(("mlp", n, "kernel"), config.intermediate_size) for n in ("gate", "up")],
        ),
    ]


def _moe_prefix(config: ModelConfig) -> str:
    """Mixtral keeps its MoE under `block_sparse_moe`, Qwen3-MoE and OLMoE under `mlp`."""
    return "block_sparse_moe" if config.model_type == "mixtral" else "mlp"


# Our expert projection -> the per-expert HF module name (Mixtral: w1 gate, w3 up, w2 down).
_EXPERT_NAMES = {"mixtral": {"gate": "w1", "up": "w3", "down": "w2"}}
_DEFAULT_EXPERT_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _expert_tensor_name(config: ModelConfig, layer: int, expert: int, proj: str) -> str:
    names = _EXPERT_NAMES.get(config.model_type, _DEFAULT_EXPERT_NAMES)
    return f"model.layers.{layer}.{_moe_prefix(config)}.experts.{expert}.{names[proj]}.weight"


def _global_map(config: ModelConfig) -> list[tuple[str, tuple[str, ...], bool]]:
    if config.model_type == "gpt2":
        rows: list[tuple[str, tuple[str, ...], bool]] = [
            ("wte.weight", ("embed", "embedding"), False),
            ("wpe.weight", ("pos_embed", "embedding"), False),
            ("ln_f.weight", ("final_norm", "scale"), False),
            ("ln_f.bias", ("final_norm", "bias"), False),
        ]
    else:
        rows = [
            ("model.embed_tokens.weight", ("embed", "embedding"), False),
            ("model.norm.weight", ("final_norm", "scale"), False),
        ]
    if not config.tie_word_embeddings:
        rows.append(("lm_head.weight", ("lm_head",), True))
    return rows


def _tensor_map(config: ModelConfig) -> list[tuple[str, tuple[str, ...], bool]]:
    """(HF name, our path, transpose?) for every tensor of the model (GPT-2's fused qkv excluded)."""
    rows = list(_global_map(config))
    for i in range(config.num_layers):
        rows += [(n, (f"layer_{i}",) + p, t) for n, p, t in _hf_layer_map(config, i)]
    return rows


def _normalise_keys(config: ModelConfig, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """GPT-2 checkpoints come with or without the `transformer.` prefix; drop it. Mixtral's
    `block_sparse_moe` is `mlp` in transformers 5's in-memory names; use the file's."""
    if config.model_type == "mixtral":
        return {re.sub(r"\.mlp\.(gate|experts)\.", r".block_sparse_moe.\1.", k): v for k, v in state_dict.items()}
    if config.model_type != "gpt2":
        return dict(state_dict)
    out = {}
    for k, v in state_dict.items():
        out[k[len("transformer.") :] if k.startswith("transformer.") else k] = v
    return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def params_from_hf(config: ModelConfig, state_dict: Mapping[str, Any], dtype=None) -> dict:
    """Converts an HF-named state dict (numpy/jax arrays in HF layout) into our parameter tree.

    Every expected tensor must be present with the shape the config implies; otherwise a
    `CheckpointError` names the tensor, the expected and the found shape.
    """
    dtype = jnp.dtype(dtype or config.param_dtype)
    sd = _normalise_keys(config, state_dict)
    # Shapes per layer (the file's layout), whatever the model's layer execution.
    expected = jax.eval_shape(
        LanguageModel(config.replace(scan_layers=False, remat=None)).init_params, jax.random.key(0)
    )
    params: dict = {}

    def take(name):
        if name not in sd:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
        return np.asarray(sd[name])

    def put(name, path, value, transpose=False):
        want = tuple(_get(expected, path).shape)
        if transpose:
            want = want[::-1]
        if tuple(value.shape) != want:
            # Shapes in the checkpoint's (HF) layout, so the message matches what the file holds.
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(value.shape)}, expected {want} "
                f"(for {'/'.join(path)} of a {config.model_type} model)"
            )
        value = value.T if transpose else value
        _set(params, path, jnp.asarray(value.astype(np.float32) if value.dtype != dtype else value, dtype=dtype))

    rows = _tensor_map(config)
    for name, path, transpose in rows:
        put(name, path, take(name), transpose)
    for i in range(config.num_layers):
        for name, parts in _fused_tensors(config, i):
            fused = take(name)
            want = (sum(rows for _, rows in parts), config.hidden_size)
            if fused.shape != want:
                raise CheckpointError(f"tensor {name!r} has shape {fused.shape}, expected {want}")
            start = 0
            for path, rows in parts:
                put(name, (f"layer_{i}",) + path, fused[start : start + rows], transpose=True)
                start += rows
        if config.is_moe_layer(i):
            for proj, stacked_name, stacked in _read_experts(config, i, sd):
                put(stacked_name, (f"layer_{i}", "mlp", "experts", proj, "kernel"), stacked)
    if config.model_type == "gpt2":
        D = config.hidden_size
        for i in range(config.num_layers):
            name = f"h.{i}.attn.c_attn"
            w, b = take(name + ".weight"), take(name + ".bias")
            if w.shape != (D, 3 * D):
                raise CheckpointError(f"tensor {name + '.weight'!r} has shape {w.shape}, expected {(D, 3 * D)}")
            for j, ours in enumerate("qkv"):
                put(name + ".weight", (f"layer_{i}", "attn", ours, "kernel"), w[:, j * D : (j + 1) * D])
                put(name + ".bias", (f"layer_{i}", "attn", ours, "bias"), b[j * D : (j + 1) * D])
    return stack_layers(params) if config.scan_layers else params


def _read_experts(config: ModelConfig, layer: int, sd: Mapping[str, Any]):
    """`(projection, name for errors, stacked [E, in, out] kernel)` of layer `layer`'s experts, from
    per-expert tensors (the Hub layout, which transformers also saves) or from transformers 5's
    in-memory fused `experts.gate_up_proj [E, 2F, D]` / `experts.down_proj [E, D, F]`."""
    prefix = f"model.layers.{layer}.{_moe_prefix(config)}.experts."
    F = config.moe_intermediate_size
    if prefix + "gate_up_proj" in sd or prefix + "down_proj" in sd:
        for name in ("gate_up_proj", "down_proj"):
            if prefix + name not in sd:
                raise CheckpointError(f"tensor {prefix + name!r} is missing from the checkpoint")
        gate_up = np.asarray(sd[prefix + "gate_up_proj"])
        down = np.asarray(sd[prefix + "down_proj"])
        if gate_up.ndim != 3 or gate_up.shape[1] != 2 * F:
            name = prefix + "gate_up_proj"
            raise CheckpointError(f"tensor {name!r} has shape {gate_up.shape}, expected (E, {2 * F}, D)")
        yield "gate", prefix + "gate_up_proj", np.swapaxes(gate_up[:, :F], 1, 2)
        yield "up", prefix + "gate_up_proj", np.swapaxes(gate_up[:, F:], 1, 2)
        yield "down", prefix + "down_proj", np.swapaxes(down, 1, 2)
        return
    for proj in EXPERT_PROJECTIONS:
        names = [_expert_tensor_name(config, layer, e, proj) for e in range(config.num_experts)]
        tensors = []
        for name in names:
            if name not in sd:
                raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
            tensors.append(np.asarray(sd[name]).T)
        shapes = {t.shape for t in tensors}
        if len(shapes) != 1:
            raise CheckpointError(f"the experts of {prefix}*.{proj} have different shapes {sorted(shapes)}")
        yield proj, names[0], np.stack(tensors)


def hf_from_params(config: ModelConfig, params) -> dict[str, np.ndarray]:
    """Inverse of `params_from_hf`: HF names and layouts (GPT-2 without the `transformer.` prefix).

    Stacked (scanned) parameters are split back into per-layer tensors."""
    params = jax.device_get(params)
    params = unstack_layers(params)
    sd: dict[str, np.ndarray] = {}
    rows = _tensor_map(config)
    for name, path, transpose in rows:
        value = np.asarray(_get(params, path))
        sd[name] = np.ascontiguousarray(value.T if transpose else value)
    for i in range(config.num_layers):
        layer = params[f"layer_{i}"]
        for name, parts in _fused_tensors(config, i):
            sd[name] = np.ascontiguousarray(np.concatenate([np.asarray(_get(layer, path)).T for path, _ in parts]))
        if config.is_moe_layer(i):
            for proj in EXPERT_PROJECTIONS:
                stacked = np.asarray(layer["mlp"]["experts"][proj]["kernel"])
                for e in range(config.num_experts):
                    sd[_expert_tensor_name(config, i, e, proj)] = np.ascontiguousarray(stacked[e].T)
    if config.model_type == "gpt2":
        for i in range(config.num_layers):
            attn = params[f"layer_{i}"]["attn"]
            sd[f"h.{i}.attn.c_attn.weight"] = np.concatenate([np.asarray(attn[n]["kernel"]) for n in "qkv"], axis=1)
            sd[f"h.{i}.attn.c_attn.bias"] = np.concatenate([np.asarray(attn[n]["bias"]) for n in "qkv"])
    return sd


# ----------------------------------------------------------------------------------------------
# HF config.json for models we created ourselves


def hf_config_from_config(config: ModelConfig) -> dict:
    """A `config.json` dict that `transformers.AutoConfig` reads back into the same architecture."""
    common = dict(
        vocab_size=config.vocab_size,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id,
        pad_token_id=config.pad_token_id,
        model_type=config.model_type,
    )
    if config.model_type == "gpt2":
        return dict(
            architectures=["GPT2LMHeadModel"],
            n_embd=config.hidden_size,
            n_layer=config.num_layers,
            n_head=config.num_heads,
            n_inner=config.intermediate_size,
            n_positions=config.max_position_embeddings,
            layer_norm_epsilon=config.norm_eps,
            activation_function=config.activation,
            **common,
        )
    arch = ARCHITECTURES[config.model_type]
    rope = _hf_rope(config, sliding=False)
    out = dict(
        architectures=[arch],
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.norm_eps,
        hidden_act=config.activation,
        rope_theta=config.rope_theta,
        rope_parameters=rope,
        **common,
    )
    if config.rope_scaling is not None:
        out["rope_scaling"] = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if config.model_type in ("llama", "mistral"):
        out.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    if config.model_type in ("qwen3", "qwen3_moe", "olmoe") + GEMMA_FAMILY:
        out.update(attention_bias=config.qkv_bias)  # q/k/v and o biases together
    if config.model_type in ("mistral", "mixtral", "phi3"):
        out["sliding_window"] = config.sliding_window
    if config.model_type in GEMMA_FAMILY:
        out.update(
            hidden_activation=config.activation,
            query_pre_attn_scalar=_int_if_integral(config.query_pre_attn_scalar),
            attn_logit_softcapping=config.attn_logit_softcap,
            final_logit_softcapping=config.final_logit_softcap,
            sliding_window=config.sliding_window,
            layer_types=list(config.layer_types or ()),
        )
        if config.model_type == "gemma3_text":
            out["rope_parameters"] = {FULL: rope, SLIDING: _hf_rope(config, sliding=True)}
            out["rope_local_base_freq"] = _hf_rope(config, sliding=True)["rope_theta"]
    if config.model_type == "phi3":
        original = config.rope_scaling[4] if config.is_longrope else config.max_position_embeddings  # pyright: ignore[reportOptionalSubscript]
        out.update(original_max_position_embeddings=original, partial_rotary_factor=config.partial_rotary_factor)
    if config.is_moe:
        out.update(num_experts_per_tok=config.num_experts_per_tok, router_aux_loss_coef=config.router_aux_loss_coef)
        if config.model_type == "mixtral":
            out.update(num_local_experts=config.num_experts, intermediate_size=config.moe_intermediate_size)
        elif config.model_type == "olmoe":
            out.update(
                num_experts=config.num_experts,
                intermediate_size=config.moe_intermediate_size,
                norm_topk_prob=config.norm_topk_prob,
                clip_qkv=config.clip_qkv,
            )
        else:  # qwen3_moe: dense layers keep intermediate_size
            out.update(
                num_experts=config.num_experts,
                moe_intermediate_size=config.moe_intermediate_size,
                norm_topk_prob=config.norm_topk_prob,
                decoder_sparse_step=1,
                mlp_only_layers=list(config.dense_layers),
            )
    return out


def _int_if_integral(value):
    """transformers' strict configs type some fields as int (Gemma's query_pre_attn_scalar)."""
    return int(value) if value is not None and float(value).is_integer() else value


ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}


def _hf_rope(config: ModelConfig, sliding: bool) -> dict[str, Any]:
    """HF's `rope_parameters` of the full (or sliding, Gemma 3) layers."""
    if sliding:
        return {"rope_theta": config.local_rope_theta, "rope_type": "default"}
    rope: dict[str, Any] = {"rope_theta": config.rope_theta, "rope_type": "default"}
    if config.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = config.partial_rotary_factor
    if config.rope_scaling is not None:
        kind, factor, low, high, original = config.rope_scaling
        rope.update(rope_type=kind)
        if kind == "longrope":
            rope.update(
                attention_factor=factor,
                short_factor=list(low),
                long_factor=list(high),
                original_max_position_embeddings=original,
            )
        else:
            rope.update(factor=factor)
        if kind == "llama3":
            rope.update(low_freq_factor=low, high_freq_factor=high, original_max_position_embeddings=original)
    return rope


# ----------------------------------------------------------------------------------------------
# Files


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"missing file {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def _weight_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(directory, name)):
                raise CheckpointError(f"shard {name} listed in {index} is missing")
        return [os.path.join(directory, name) for name in files]
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(directory)):
        raise CheckpointError(f"{directory} has only PyTorch pickle weights; convert them to safetensors")
    raise CheckpointError(f"no weights in {directory}: expected model.safetensors or model.safetensors.index.json")


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
    """All tensors of a (possibly sharded) safetensors checkpoint, as numpy arrays (bf16 kept)."""
    from safetensors import SafetensorError
    from safetensors.flax import load_file

    state_dict: dict[str, np.ndarray] = {}
    for path in _weight_files(directory):
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from e
        state_dict.update({k: np.asarray(v) for k, v in tensors.items()})
    return state_dict


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_TOKENIZER_JSON_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "added_tokens.json",
)


def load_tokenizer(directory: str):
    """`AutoTokenizer` from the directory, or None when it holds no tokenizer files.

    A tokenizer file that is not valid JSON, or that `transformers` cannot read, raises a
    `CheckpointError` naming the file (or the directory).
    """
    if not any(os.path.isfile(os.path.join(directory, n)) for n in TOKENIZER_FILES):
        return None
    for name in _TOKENIZER_JSON_FILES:  # a clear error naming the file, not a bare JSONDecodeError
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(
                    f"tokenizer file {path} is not valid JSON ({e}); fix or remove it "
                    f"(without tokenizer files the model loads with tokenizer=None)"
                ) from e
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # transformers and tokenizers raise many types; name the directory
        raise CheckpointError(f"cannot load the tokenizer in {directory}: {type(e).__name__}: {e}") from e


def _looks_like_hub_id(path: str) -> bool:
    """`"gpt2"` or `"org/name"`: a Hugging Face Hub repository id rather than a local path."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", path)) and not path.endswith(".gguf")


# Files a checkpoint directory may need: the weights (single or sharded), the config and the
# tokenizer; nothing else of the repository (PyTorch .bin weights, ONNX exports, ...) is fetched.
HUB_CHECKPOINT_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    *_TOKENIZER_JSON_FILES,
    "tokenizer.model",
    "merges.txt",
)


def _hub_offline() -> bool:
    """`HF_HUB_OFFLINE` as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_cache_dir(cache_dir) -> str:
    """`cache_dir`, else `HF_HUB_CACHE` (or `HF_HOME/hub`) as set now, else huggingface_hub's default."""
    from huggingface_hub import constants

    if cache_dir is not None:
        return os.fspath(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def resolve_hub_id(repo_id: str, revision: str | None = None, cache_dir=None, allow_patterns=None) -> str:
    """The local snapshot directory of a Hub model repository, downloaded if needed.

    Goes through `huggingface_hub.snapshot_download` (only the checkpoint's files,
    `HUB_CHECKPOINT_PATTERNS`, unless `allow_patterns` says otherwise), so the local cache is used
    and filled as usual. With `HF_HUB_OFFLINE=1` nothing is downloaded (`local_files_only=True`):
    the revision (branch, tag or commit; default `main`) must be in the cache. A revision or
    repository that cannot be found raises `CheckpointError` naming the id, the revision, the
    cache directory and how to fix it.
    """
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency of transformers
        raise CheckpointError(
            f"{repo_id!r} is not a local path and looks like a Hugging Face Hub id; loading "
            f"hub ids needs the huggingface_hub package ({e})"
        ) from e
    offline = _hub_offline()
    cache = _hub_cache_dir(cache_dir)
    rev = revision or "main"
    where = f"{repo_id!r} is not a local directory and looks like a Hugging Face Hub id"
    fetch = (
        f"`huggingface_hub.snapshot_download({repo_id!r}"
        + (f", revision={revision!r}" if revision else "")
        + f")` or `hf download {repo_id}"
        + (f" --revision {revision}" if revision else "")
        + "`"
    )
    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            local_files_only=offline,
            allow_patterns=list(allow_patterns or HUB_CHECKPOINT_PATTERNS),
        )
    except LocalEntryNotFoundError as e:
        if offline:
            raise CheckpointError(
                f"{where}, but revision {rev!r} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE=1 "
                f"forbids downloading it. Fix: download it once with network access ({fetch}), point "
                f"`cache_dir=` or HF_HUB_CACHE at a cache that holds it, or unset HF_HUB_OFFLINE"
            ) from e
        raise CheckpointError(
            f"{where}, but revision {rev!r} could not be downloaded and is not in the Hugging Face cache {cache} "
            f"({type(e).__name__}: {e}). Fix: check the network and the id, fetch it elsewhere ({fetch}) into "
            f"that cache, or pass a local checkpoint directory"
        ) from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"{where}, but the Hub has no revision {rev!r} (branch, tag or commit) of it") from e
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise CheckpointError(
            f"{where}, but the Hub has no accessible repository of that name (private or gated "
            f"repositories need `hf auth login`): {e}"
        ) from e
    except HfHubHTTPError as e:
        raise CheckpointError(f"{where}, but downloading it failed: {e}") from e


def load_pretrained(
    path: str,
    dtype=None,
    compute_dtype=None,
    gguf_file: str | None = None,
    *,
    revision: str | None = None,
    cache_dir=None,
    scan_layers: bool = False,
    remat: str | None = None,
) -> Pretrained:
    """Loads an HF checkpoint (a local directory, a Hub id or a `.gguf` file) into a `Pretrained` model.

    Args:
      path: a local directory with `config.json`, `model.safetensors` (or shards + index) and
        tokenizer files; or a `.gguf` file / a directory plus `gguf_file`; or a Hub id
        (`"org/name"`, `"gpt2"`) that is not an existing local path, resolved through
        `huggingface_hub.snapshot_download` (see `resolve_hub_id`: the local cache is used,
        `HF_HUB_OFFLINE=1` forbids downloads; with `gguf_file`, only that file is fetched). Without
        tokenizer files the result's `tokenizer` is None and a warning names the directory;
        unreadable tokenizer files raise `CheckpointError` naming the file.
      dtype: parameter storage dtype (default float32); e.g. `jnp.bfloat16`.
      compute_dtype: activation dtype (default: same as `dtype`). Logits are always float32.
      revision: Hub branch, tag or commit hash (default `main`); only for Hub ids.
      cache_dir: the Hugging Face cache directory for Hub ids (default: `HF_HUB_CACHE`).
      scan_layers, remat: layer execution of the returned model (`ModelConfig.scan_layers`,
        `ModelConfig.remat`); with `scan_layers` the parameters come stacked (`params["layers"]`).
    """
    path = os.fspath(path)
    if not os.path.exists(path) and _looks_like_hub_id(path):
        path = resolve_hub_id(path, revision, cache_dir, allow_patterns=[gguf_file] if gguf_file else None)
    elif revision is not None:
        raise ValueError(f"revision={revision!r} is only for Hub ids; {path!r} is a local path")
    if gguf_file is not None or str(path).endswith(".gguf"):
        from jaxrlhf.models.gguf import read_gguf

        gguf_path = os.path.join(path, gguf_file) if gguf_file else path
        if not os.path.isfile(gguf_path):
            raise CheckpointError(f"missing file {gguf_path}")
        ckpt = read_gguf(gguf_path)
        hf_config, state_dict, tokenizer = ckpt.config, ckpt.state_dict, ckpt.tokenizer
        if tokenizer is None:
            warnings.warn(
                f"{gguf_path} has no tokenizer metadata: the model is loaded with tokenizer=None", stacklevel=2
            )
    else:
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint directory {path} does not exist")
        if not os.path.isdir(path):
            raise CheckpointError(
                f"{path} is not a directory: expected a checkpoint directory (config.json, "
                f"*.safetensors, tokenizer files) or a .gguf file"
            )
        config_path = os.path.join(path, "config.json")
        hf_config = _read_json(config_path)
        try:  # fail on an unsupported architecture before reading weights
            ModelConfig.from_hf(hf_config)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{config_path}: {e}") from e
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{config_path}: missing or malformed field {e}") from e
        state_dict = read_safetensors(path)
        tokenizer = load_tokenizer(path)
        if tokenizer is None:
            warnings.warn(
                f"{path} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}): the model is "
                f"loaded with tokenizer=None; pass token ids directly or load a tokenizer yourself",
                stacklevel=2,
            )
    try:
        return pretrained_from_hf(
            hf_config,
            state_dict,
            tokenizer,
            dtype=dtype,
            compute_dtype=compute_dtype,
            scan_layers=scan_layers,
            remat=remat,
        )
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e


def pretrained_from_hf(
    hf_config: dict,
    state_dict: dict,
    tokenizer=None,
    *,
    dtype=None,
    compute_dtype=None,
    scan_layers: bool = False,
    remat: str | None = None,
) -> Pretrained:
    """A `Pretrained` model from an HF config dict and state dict already in memory.

    What `load_pretrained` does once it has read a checkpoint: e.g. for the `GGUFCheckpoint` of
    `jaxrlhf.models.gguf.read_gguf`, or a state dict converted from a PyTorch model, without
    reading the files again. Arguments as in `load_pretrained`; `state_dict` maps HF tensor
    names to arrays in HF layout.
    """
    param_dtype = jnp.dtype(dtype or jnp.float32)
    compute = jnp.dtype(compute_dtype or param_dtype)
    config = ModelConfig.from_hf(
        hf_config, param_dtype=param_dtype.name, dtype=compute.name, scan_layers=bool(scan_layers), remat=remat
    )
    params = params_from_hf(config, state_dict, dtype=param_dtype)
    return Pretrained(LanguageModel(config), params, tokenizer)


def save_pretrained(
    directory: str, model: LanguageModel | Pretrained, params=None, tokenizer=None, max_shard_bytes: int = 2 << 30
) -> None:
    """Writes `config.json`, safetensors (sharded with an index above `max_shard_bytes`) and the
    tokenizer, in the layout `transformers.AutoModelForCausalLM.from_pretrained` loads."""
    from safetensors.numpy import save_file

    if isinstance(model, Pretrained):
        params = model.params if params is None else params
        tokenizer = model.tokenizer if tokenizer is None else tokenizer
        model = model.model
    config = model.config
    os.makedirs(directory, exist_ok=True)
    hf_config = hf_config_from_config(config)
    hf_config["dtype"] = jnp.dtype(config.param_dtype).name
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    state_dict = hf_from_params(config, params)
    if config.model_type == "gpt2":  # GPT2LMHeadModel's own naming
        state_dict = {"transformer." + k: v for k, v in state_dict.items()}
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(state_dict):
        nbytes = state_dict[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state_dict[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for j, shard in enumerate(shards):
            fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(directory, fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        total = sum(v.nbytes for v in state_dict.values())
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


__all__ = [
    "CheckpointError",
    "UnsupportedModelError",
    "hf_config_from_config",
    "hf_from_params",
    "load_pretrained",
    "params_from_hf",
    "read_safetensors",
    "resolve_hub_id",
    "save_pretrained",
]
