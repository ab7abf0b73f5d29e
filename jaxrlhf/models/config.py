"""One config for every decoder family we support, built from a Hugging Face `config.json`.

GPT-2 and the Llama family (Llama 2/3, Qwen2/2.5, Qwen3, Mistral) differ in a handful of switches:
learned vs rotary positions, LayerNorm vs RMSNorm, GELU MLP vs gated SiLU MLP, which projections
carry biases, per-head q/k norms, tied embeddings. Gemma 2/3 add a few more (`(1 + w)` norms,
scaled embeddings, norms after attention and MLP, soft-capped logits, sliding-window layers
alternating with global ones), Phi-3/4 partial rotary dimensions and LongRoPE, and the
mixture-of-experts families (Qwen3-MoE, Mixtral, OLMoE) a routed MLP (`jaxrlhf.models.moe`).
`ModelConfig` names those switches once, so the Flax model in `transformer.py` has a single code
path.
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
GEMMA_FAMILY = ("gemma2", "gemma3_text")
MOE_FAMILY = ("qwen3_moe", "mixtral", "olmoe")
SUPPORTED_MODEL_TYPES = ("gpt2",) + LLAMA_FAMILY + GEMMA_FAMILY + ("phi3",) + MOE_FAMILY

# `ModelConfig.layer_types` entries (Hugging Face's names).
SLIDING, FULL = "sliding_attention", "full_attention"

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
    # Gemma 2/3. RMSNorm scale is `norm_weight_offset + weight` (Gemma stores w with 1 + w applied);
    # `embed_scale`: embeddings times sqrt(hidden_size); `sandwich_norms`: the attention and MLP
    # outputs are normalised again before the residual add (`post_attn_norm`, `post_mlp_norm`);
    # `query_pre_attn_scalar`: attention scores scaled by its -1/2 power instead of head_dim's;
    # soft-capping `cap * tanh(x / cap)` of attention scores and of the final logits.
    norm_weight_offset: float = 0.0
    embed_scale: bool = False
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Per-layer attention kind, `SLIDING` or `FULL` (HF's `layer_types`); None: every layer alike,
    # with `sliding_window` (if set) on all of them (Mistral). Sliding layers rotate with
    # `local_rope_theta` and no scaling when it is set (Gemma 3), else like the full layers.
    layer_types: tuple | None = None
    local_rope_theta: float | None = None
    # Phi-3/4: rotary embedding on the first `partial_rotary_factor * head_dim` dims of each head.
    partial_rotary_factor: float = 1.0
    # OLMoE: q/k RMSNorm over the whole projection (`qk_norm_per_head=False`), and q/k/v clipped
    # to [-clip_qkv, clip_qkv].
    qk_norm_per_head: bool = True
    clip_qkv: float | None = None
    # Mixture of experts (`jaxrlhf.models.moe`): `num_experts` > 0 replaces the MLP of every layer
    # not in `dense_layers` by `num_experts` gated experts of width `moe_intermediate_size`, of
    # which a softmax router picks `num_experts_per_tok` per token (weights renormalised to sum 1
    # when `norm_topk_prob`). `moe_capacity_factor`: None is dropless (every routed token is
    # computed, as in transformers); a number c gives each expert ceil(c * tokens * k / experts)
    # slots and drops what does not fit. `router_aux_loss_coef` is the checkpoint's suggested
    # weight of the load-balancing loss (`ModelOutput.aux`); the forward does not use it.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    dense_layers: tuple = ()
    moe_capacity_factor: float | None = None
    router_aux_loss_coef: float = 0.0
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
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            bad = [t for t in self.layer_types if t not in (SLIDING, FULL)]
            if bad or len(self.layer_types) != self.num_layers:
                raise ValueError(
                    f"layer_types must list {SLIDING!r} or {FULL!r} for each of the {self.num_layers} "
                    f"layers, got {self.layer_types!r}"
                )
            if SLIDING in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is None")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts or self.moe_intermediate_size < 1:
                raise ValueError(
                    f"a mixture of experts needs 1 <= num_experts_per_tok <= num_experts and "
                    f"moe_intermediate_size >= 1, got num_experts_per_tok={self.num_experts_per_tok}, "
                    f"num_experts={self.num_experts}, moe_intermediate_size={self.moe_intermediate_size}"
                )
            if self.moe_capacity_factor is not None and not self.moe_capacity_factor > 0:
                raise ValueError(f"moe_capacity_factor must be > 0 or None, got {self.moe_capacity_factor!r}")
            if self.scan_layers and self.dense_layers:
                raise ValueError(
                    f"scan_layers=True needs every layer alike, but dense_layers={self.dense_layers} mixes "
                    f"dense and mixture-of-experts layers; use scan_layers=False"
                )

    @property
    def is_llama_family(self) -> bool:
        return self.model_type in LLAMA_FAMILY

    @property
    def is_moe(self) -> bool:
        """Whether some layer's MLP is a mixture of experts."""
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: does it attend through the sliding window?"""
        if self.layer_types is None:
            return (self.sliding_window is not None,) * self.num_layers
        return tuple(t == SLIDING for t in self.layer_types)

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head the rotary embedding turns (even)."""
        return int(self.head_dim * self.partial_rotary_factor) // 2 * 2

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def rope_inv_freq(self, sliding: bool = False, long: bool = False) -> np.ndarray:
        """Inverse frequencies of the rotary embedding (`rotary_dim / 2` of them), with the
        configured scaling: Llama-3 / linear, or LongRoPE's short (`long=False`) or long factors.
        `sliding=True`: those of the sliding-window layers (`local_rope_theta`, unscaled, when set)."""
        dim = self.rotary_dim
        local = sliding and self.local_rope_theta is not None
        theta = float(self.local_rope_theta if local and self.local_rope_theta else self.rope_theta)
        dims = np.arange(0, dim, 2, dtype=np.float64) / dim
        inv_freq = 1.0 / (theta**dims)
        scaling = None if local else self.rope_scaling
        if scaling is None:
            return inv_freq.astype(np.float32)
        rope_type, factor, low_ff, high_ff, original_max = scaling
        if rope_type == "linear":
            return (inv_freq / factor).astype(np.float32)
        if rope_type == "longrope":
            # Phi-3 (Ding et al. 2024): per-frequency rescaling factors, the long set once a
            # sequence is longer than the original context (`low_ff` / `high_ff` hold the short /
            # long factor lists, `factor` the attention factor, see `_rope_from_hf`).
            ext = np.asarray(high_ff if long else low_ff, np.float64)
            return (inv_freq / ext).astype(np.float32)
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

    @property
    def is_longrope(self) -> bool:
        return self.rope_scaling is not None and self.rope_scaling[0] == "longrope"

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any] | Any, **overrides) -> ModelConfig:
        """Builds a config from an HF `config.json` dict (or a `transformers.PretrainedConfig`)."""
        if not isinstance(hf, Mapping):
            hf = hf.to_dict()
        model_type = hf.get("model_type")
        if model_type == "gemma3":  # Gemma3ForConditionalGeneration: text_config + vision_config
            raise UnsupportedModelError(
                "model_type 'gemma3' is the multimodal Gemma 3 (vision_config: a SigLIP vision tower), "
                "which is not supported; the text model (model_type 'gemma3_text', Gemma3ForCausalLM) is"
            )
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        eos = hf.get("eos_token_id")
        common: dict[str, Any] = dict(  # the fields every model type reads the same way
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type in ("gpt2",) + GEMMA_FAMILY)),
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
            cfg = cls(**_decoder_fields(hf, model_type), **common)
        if cfg.activation not in ACTIVATIONS:
            raise UnsupportedModelError(f"activation {cfg.activation!r} is not supported")
        return cfg.replace(**overrides)


def _decoder_fields(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """`ModelConfig` fields of a rotary decoder (every family but GPT-2) from its HF config."""
    heads = hf["num_attention_heads"]
    attention_bias = bool(hf.get("attention_bias", False))
    fields: dict[str, Any] = dict(
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
        activation=hf.get("hidden_act", "silu"),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias and model_type != "qwen2",
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe", "olmoe"),
    )
    if model_type in ("mistral", "mixtral", "phi3"):  # the window applies to every layer
        fields["sliding_window"] = hf.get("sliding_window")
    elif model_type in ("qwen2", "qwen3", "qwen3_moe") and hf.get("use_sliding_window"):
        raise UnsupportedModelError(f"{model_type} with use_sliding_window=True is not supported")
    if model_type in GEMMA_FAMILY:
        fields.update(_gemma_fields(hf, model_type))
    else:
        fields["rope_theta"], fields["rope_scaling"] = _rope_from_hf(hf, _rope_parameters(hf))
    if model_type == "phi3":
        fields["partial_rotary_factor"] = float(
            _rope_parameters(hf).get("partial_rotary_factor", hf.get("partial_rotary_factor")) or 1.0
        )
        fields["rope_theta"], fields["rope_scaling"] = _rope_from_hf(
            hf, _rope_parameters(hf), head_dim=int(fields["head_dim"] * fields["partial_rotary_factor"])
        )
    if model_type in MOE_FAMILY:
        fields.update(_moe_fields(hf, model_type))
    return fields


def _gemma_fields(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """Gemma 2 / Gemma 3 (text): HF's defaults for the fields a config.json may leave out."""
    gemma3 = model_type == "gemma3_text"
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError("use_bidirectional_attention=True (an encoder-style Gemma) is not supported")
    layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None:  # HF's default pattern: every `period`-th layer global, the rest sliding
        period = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)) if gemma3 else 2
        layer_types = [SLIDING if (i + 1) % period else FULL for i in range(layers)]
    rope = _rope_parameters(hf)
    if gemma3:
        full = dict(rope.get(FULL) or {}) if FULL in rope or SLIDING in rope else dict(rope)
        local = dict(rope.get(SLIDING) or {})
        full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
        theta, scaling = _rope_from_hf(hf, full)
        if local.get("rope_type", "default") != "default":
            raise UnsupportedModelError(
                f"rope_parameters.sliding_attention.rope_type {local['rope_type']!r} is not supported (default is)"
            )
        local_theta = float(local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0)))
    else:
        theta, scaling = _rope_from_hf(hf, rope)
        local_theta = None
    softcap_default = 50.0 if not gemma3 else None
    final_default = 30.0 if not gemma3 else None
    return dict(
        head_dim=hf.get("head_dim") or 256,
        activation=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
        max_position_embeddings=hf.get("max_position_embeddings", 131_072 if gemma3 else 8192),
        qk_norm=gemma3,
        norm_weight_offset=1.0,
        embed_scale=True,
        sandwich_norms=True,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
        attn_logit_softcap=_optional_float(hf.get("attn_logit_softcapping", softcap_default)),
        final_logit_softcap=_optional_float(hf.get("final_logit_softcapping", final_default)),
        sliding_window=hf.get("sliding_window", 4096),
        layer_types=tuple(layer_types),
        rope_theta=theta,
        rope_scaling=scaling,
        local_rope_theta=local_theta,
    )


# Router options of other MoE families (DeepSeek, Qwen2-MoE, ...) that none of ours has: a
# checkpoint that sets one to something else than the value listed is refused.
_ROUTER_FIELDS = {
    "scoring_func": ("softmax",),
    "topk_method": ("greedy",),
    "router_type": ("topk", "softmax"),
    "n_group": (1,),
    "topk_group": (1,),
    "n_shared_experts": (0,),
    "shared_expert_intermediate_size": (0,),
}


def _moe_fields(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """Mixture-of-experts fields of Qwen3-MoE, Mixtral and OLMoE."""
    for field, allowed in _ROUTER_FIELDS.items():
        if hf.get(field) is not None and hf[field] not in allowed:
            raise UnsupportedModelError(
                f"{field}={hf[field]!r} (a router or expert variant of another MoE family) is not supported "
                f"for {model_type}; supported: {field} in {allowed} (or absent)"
            )
    if hf.get("router_jitter_noise"):
        raise UnsupportedModelError(
            f"router_jitter_noise={hf['router_jitter_noise']!r} is not supported (only 0: no noise on the router input)"
        )
    layers = hf["num_hidden_layers"]
    # transformers 5 writes `num_local_experts` for all three; Hub configs say `num_experts`
    # (Qwen3-MoE, OLMoE) or `num_local_experts` (Mixtral).
    experts = hf["num_local_experts"] if "num_local_experts" in hf else hf["num_experts"]
    if model_type == "qwen3_moe":
        width = hf["moe_intermediate_size"]
        step, only_dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
        dense = tuple(i for i in range(layers) if i in only_dense or experts == 0 or (i + 1) % step)
        norm_topk = bool(hf.get("norm_topk_prob", False))
        coef = hf.get("router_aux_loss_coef", 0.001)
    elif model_type == "mixtral":
        width, dense, norm_topk = hf["intermediate_size"], (), True
        coef = hf.get("router_aux_loss_coef", 0.001)
    else:  # olmoe
        width, dense = hf["intermediate_size"], ()
        norm_topk = bool(hf.get("norm_topk_prob", False))
        coef = hf.get("router_aux_loss_coef", 0.01)
    fields: dict[str, Any] = dict(
        num_experts=int(experts),
        num_experts_per_tok=int(hf["num_experts_per_tok"]),
        moe_intermediate_size=int(width),
        norm_topk_prob=norm_topk,
        dense_layers=dense,
        router_aux_loss_coef=float(coef),
    )
    if model_type == "olmoe":
        fields.update(qk_norm_per_head=False, clip_qkv=_optional_float(hf.get("clip_qkv")))
    return fields


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


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


def _rope_parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The rope settings as one dict: `rope_parameters` (transformers 5) over the older
    `rope_theta` + `rope_scaling` fields (Gemma 3 keeps one dict per layer type in it)."""
    params = dict(hf.get("rope_parameters") or {})
    if FULL in params or SLIDING in params:
        return params
    legacy = dict(hf.get("rope_scaling") or {})
    return {**legacy, **params}


def _rope_from_hf(hf: Mapping[str, Any], params: Mapping[str, Any], head_dim: int | None = None):
    """`(rope_theta, rope_scaling)` from one layer type's rope settings (see `_rope_parameters`)."""
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type == "linear":
        return float(theta), ("linear", float(params["factor"]), 0.0, 0.0, 0)
    if rope_type == "llama3":
        return float(theta), (
            "llama3",
            float(params["factor"]),
            float(params["low_freq_factor"]),
            float(params["high_freq_factor"]),
            int(params["original_max_position_embeddings"]),
        )
    if rope_type in ("longrope", "su"):
        original = params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
        if not original:
            raise UnsupportedModelError("longrope needs original_max_position_embeddings")
        original = int(original)
        factor = params.get("factor") or hf.get("max_position_embeddings", original) / original
        attention_factor = params.get("attention_factor")
        if attention_factor is None:  # HF's default: sqrt(1 + ln(factor) / ln(original context))
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        short, long = tuple(float(f) for f in params["short_factor"]), tuple(float(f) for f in params["long_factor"])
        if head_dim is not None and not len(short) == len(long) == (head_dim + 1) // 2:
            raise UnsupportedModelError(
                f"longrope short_factor / long_factor need {(head_dim + 1) // 2} entries (rotary dim / 2), "
                f"got {len(short)} and {len(long)}"
            )
        return float(theta), ("longrope", float(attention_factor), short, long, original)
    raise UnsupportedModelError(
        f"rope scaling type {rope_type!r} is not supported (default, linear, llama3, longrope are)"
    )
