"""One config for every decoder family we support, built from a Hugging Face `config.json`.

GPT-2 and the Llama family (Llama 2/3, Qwen2/2.5, Qwen3, Mistral) differ in a handful of switches:
learned vs rotary positions, LayerNorm vs RMSNorm, GELU MLP vs gated SiLU MLP, which projections
carry biases, per-head q/k norms, tied embeddings. `ModelConfig` names those switches once, so the
Flax model in `transformer.py` has a single code path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxrlhf.config import refuse_unknown_fields

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_MODEL_TYPES = ("gpt2",) + LLAMA_FAMILY

# Hugging Face activation names (`hidden_act` / `activation_function`) -> the function, for every
# model here (decoders and the BERT encoder). HF's "gelu" is the exact erf form; "gelu_new" and
# "gelu_pytorch_tanh" are the tanh approximation.
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


# `ModelConfig.remat` values: "full" rematerialises everything (jax.checkpoint's default); the
# others name the `jax.checkpoint_policies` attribute of the same name (what may be saved).
REMAT_POLICIES = (
    "full",
    "nothing_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
    "everything_saveable",
)


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented."""


@refuse_unknown_fields
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer (hashable: usable as a static jit arg)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    # Architecture switches.
    positions: str = "rope"  # "rope" | "learned"
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    mlp: str = "gated"  # "gated" (SwiGLU: down(act(gate x) * up x)) | "plain" (proj(act(fc x)))
    activation: str = "silu"  # a key of ACTIVATIONS
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    # (rope_type, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    rope_scaling: tuple | None = None
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple | None = None
    pad_token_id: int | None = None
    # Storage dtype of parameters and compute dtype of activations ("float32" | "bfloat16").
    param_dtype: str = "float32"
    dtype: str = "float32"
    # Layer execution (not part of the checkpoint; see docs/models.md "Scanned and rematerialised
    # layers"). `scan_layers`: the decoder blocks run as one `nn.scan` over stacked parameters
    # (`params["layers"]`, leaves `[num_layers, ...]`) and a stacked KV cache: one compiled block
    # body, so compile time does not grow with depth. `remat`: rematerialise each block in the
    # backward pass (`nn.remat`): "full" (save nothing) or a `jax.checkpoint_policies` name from
    # `REMAT_POLICIES`; None keeps every activation.
    scan_layers: bool = False
    remat: str | None = None
    # LoRA adapters (`jaxrlhf.models.lora.LoraConfig`: rank, alpha, dropout, target projections),
    # not part of the checkpoint either; None = none. The model is then called with
    # `LoraParams(base, adapters)` (docs/models.md, "LoRA and QLoRA").
    lora: Any = None

    def __post_init__(self):
        if self.remat is not None and self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"remat={self.remat!r} is not a known policy; use None or one of {', '.join(REMAT_POLICIES)}"
            )

    @property
    def is_llama_family(self) -> bool:
        return self.model_type in LLAMA_FAMILY

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse frequencies of the rotary embedding, with Llama-3 / linear scaling applied."""
        dims = np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim
        inv_freq = 1.0 / (self.rope_theta**dims)
        if self.rope_scaling is None:
            return inv_freq.astype(np.float32)
        rope_type, factor, low_ff, high_ff, original_max = self.rope_scaling
        if rope_type == "linear":
            return (inv_freq / factor).astype(np.float32)
        if rope_type == "llama3":
            # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, and the band
            # between them interpolated smoothly.
            low_freq_wavelen = original_max / low_ff
            high_freq_wavelen = original_max / high_ff
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
            smooth = (original_max / wavelen - low_ff) / (high_ff - low_ff)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        raise UnsupportedModelError(f"rope scaling type {rope_type!r} is not supported")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any] | Any, **overrides) -> ModelConfig:
        """Builds a config from an HF `config.json` dict (or a `transformers.PretrainedConfig`)."""
        if not isinstance(hf, Mapping):
            hf = hf.to_dict()
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        eos = hf.get("eos_token_id")
        common: dict[str, Any] = dict(  # the fields every model type reads the same way
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type == "gpt2")),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else eos,
            pad_token_id=hf.get("pad_token_id"),
        )
        if model_type == "gpt2":
            act = hf.get("activation_function", "gelu_new")
            if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
                raise UnsupportedModelError("GPT-2 options scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn")
            width = hf["n_embd"]
            cfg = cls(
                hidden_size=width,
                num_layers=hf["n_layer"],
                num_heads=hf["n_head"],
                num_kv_heads=hf["n_head"],
                head_dim=width // hf["n_head"],
                intermediate_size=hf.get("n_inner") or 4 * width,
                max_position_embeddings=hf["n_positions"],
                norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                positions="learned",
                norm="layernorm",
                mlp="plain",
                activation=act,
                qkv_bias=True,
                o_bias=True,
                mlp_bias=True,
                **common,
            )
        else:
            heads = hf["num_attention_heads"]
            act = hf.get("hidden_act", "silu")
            rope_theta, rope_scaling = _rope_from_hf(hf)
            window = None
            if model_type == "mistral":
                window = hf.get("sliding_window")
            elif model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
                raise UnsupportedModelError(f"{model_type} with use_sliding_window=True is not supported")
            cfg = cls(
                hidden_size=hf["hidden_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                intermediate_size=hf["intermediate_size"],
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                norm_eps=hf.get("rms_norm_eps", 1e-6),
                positions="rope",
                norm="rmsnorm",
                mlp="gated",
                activation=act,
                qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
                o_bias=bool(hf.get("attention_bias", False)) and model_type != "qwen2",
                mlp_bias=bool(hf.get("mlp_bias", False)),
                qk_norm=model_type == "qwen3",
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                sliding_window=window,
                **common,
            )
        if cfg.activation not in ACTIVATIONS:
            raise UnsupportedModelError(f"activation {cfg.activation!r} is not supported")
        return cfg.replace(**overrides)


def gpt2_config(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_len: int = 32,
    **token_ids: int | None,
) -> ModelConfig:
    """A small GPT-2 (learned positions, LayerNorm, GELU MLP, tied embeddings), built as from HF's
    ``config.json``; ``token_ids`` are ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``."""
    return ModelConfig.from_hf(
        dict(
            model_type="gpt2",
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_len,
            **token_ids,
        )
    )


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, tuple | None]:
    """Reads rope theta and scaling from either `rope_parameters` (transformers 5) or the older
    `rope_theta` + `rope_scaling` fields."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {**legacy, **{k: v for k, v in params.items() if k != "rope_theta"}}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type == "linear":
        return float(theta), ("linear", float(scaling["factor"]), 0.0, 0.0, 0)
    if rope_type == "llama3":
        return float(theta), (
            "llama3",
            float(scaling["factor"]),
            float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]),
            int(scaling["original_max_position_embeddings"]),
        )
    raise UnsupportedModelError(f"rope scaling type {rope_type!r} is not supported (default, linear, llama3 are)")
