"""LoRA adapters and QLoRA's quantised frozen base for the decoder in `transformer.py`.

LoRA (Hu et al. 2021): a frozen projection `y = W x` gets a trainable low-rank update

    y = W x + (alpha / r) B A dropout(x)        A: [in, r], B: [r, out] (our `x @ kernel` layout)

with `A` drawn like PEFT's default (kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)))
and `B = 0`, so a fresh adapter leaves the model exactly as it was. QLoRA (Dettmers et al. 2023)
stores the frozen `W` as 4-bit NormalFloat codes with one float scale per block of 64 input rows
and dequantises it inside the forward.

How it fits the pure `apply(params, ...)` design:
- the adapters are a pytree of their own that mirrors the parameter paths,
  `{"layer_0": {"attn": {"q": {"lora_A": [in, r], "lora_B": [r, out]}, ...}, ...}, ...}` (scanned
  models: `{"layers": {...}}` with a leading `[num_layers]` axis, like the parameters). They go into
  the Flax module as the `"lora"` collection next to `"params"`; `LoraDense` adds the low-rank path
  wherever that collection has an entry, so one module serves the base (no adapters) and the
  adapted model. A `LanguageModel` is called with `LoraParams(base, adapters)` in place of its
  parameters; the plain base parameters give the base model, and that *is* the PPO reference
  policy: no second copy of the weights.
- `ModelConfig.lora` (a `LoraConfig`) carries the structure: rank, alpha, dropout rate, target
  projections. alpha is compiled in like the rank: it is part of what an adapter means (PEFT saves
  it in `adapter_config.json`), so it is not a training hyper-parameter in the state.
- gradients and optimizer states exist for the adapters only: the trainer keeps the adapters in
  `TrainState.policy_params` and the base in `FrozenParams.ref_params`, which a sweep shares.

Why not qwix's `LoraProvider` (Google's quantisation/LoRA library, used by Tunix): for a Linen model
it intercepts `dot_general` calls during `apply` and creates the adapters as extra entries
(`kernel_lora_a`, `kernel_lora_b`) inside the model's own `"params"` collection, and its QLoRA base
is a tree of `WithAux[QArray]` objects made by `quantize_params` against an abstract quantised
model. Here the adapters must be a separate pytree (optimizer state for them only, a frozen base
shared by every run of a vmapped sweep, the base alone as reference), and parameters must stay
plain array pytrees that the checkpoint, sharding and HF code already handle; splitting qwix's
tree back apart on every call would be the same code as this module plus a global interception.
What qwix is good for here is the numerics: `quantize_params` uses its public `qwix.quantize` /
`qwix.dequantize` (NF4 buckets, int8 / int4 absmax) on plain arrays, and stores the result as plain
arrays `kernel_q` (codes) + `kernel_scale` in place of `kernel`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from jaxrlhf.config import refuse_unknown_fields

Array = jax.Array

# Our projection names; an adapter's target is the last path element of a `LoraDense`.
ATTENTION_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
# Hugging Face (Llama family) module names accepted as targets too.
HF_TARGET_NAMES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}
QUANT_TYPES = ("nf4", "int8", "int4")
# Storage dtype of each quantisation type's codes (qwix keeps NF4 bucket indices as uint4).
_CODE_DTYPES = {"nf4": jnp.uint4, "int8": jnp.int8, "int4": jnp.int4}
QUANTIZED_KERNEL, KERNEL_SCALE = "kernel_q", "kernel_scale"


@refuse_unknown_fields
@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Structure of the adapters (hashable: part of `ModelConfig`, hence of the compiled program).

    Attributes:
      rank: r, the adapters' inner dimension.
      alpha: the scale numerator: the update is `(alpha / rank) B A x` (PEFT's `lora_alpha`).
      dropout: dropout rate on the adapter's input (training forwards that pass a key only).
      target_modules: which projections get adapters: our names ("q", "k", "v", "o", "gate",
        "up", "down") or the Llama family's HF names ("q_proj", ...).
      experts: in a mixture-of-experts model, also adapt each expert's `gate` / `up` / `down`
        (those of them in `target_modules`): one `lora_A [E, in, r]`, `lora_B [E, r, out]` per
        projection, every expert its own rank-r update (PEFT's `target_parameters` on
        transformers' expert tensors). False: attention (and dense MLPs) only; the router is never
        adapted. Needs dropout 0, as in PEFT.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple = ALL_TARGETS
    experts: bool = False

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoraConfig: rank must be an int >= 1, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig: dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        names = []
        for name in self.target_modules:
            ours = HF_TARGET_NAMES.get(name, name)
            if ours not in ALL_TARGETS:
                raise ValueError(
                    f"LoraConfig: unknown target module {name!r}; use some of {ALL_TARGETS} "
                    f"(or their HF names {tuple(HF_TARGET_NAMES)})"
                )
            if ours not in names:
                names.append(ours)
        if not names:
            raise ValueError("LoraConfig: target_modules is empty")
        if self.experts and self.dropout > 0:
            raise ValueError(f"LoraConfig: experts=True needs dropout 0 (as PEFT), got dropout={self.dropout!r}")
        object.__setattr__(self, "target_modules", tuple(names))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def replace(self, **changes) -> LoraConfig:
        return dataclasses.replace(self, **changes)


class LoraParams(NamedTuple):
    """What a LoRA `LanguageModel` is called with: the frozen base parameters (plain or quantised)
    and the adapters; `dropout_key` turns adapter dropout on for this call (training forwards)."""

    base: Any
    adapters: Any
    dropout_key: Array | None = None


def model_variables(params) -> tuple[dict, dict]:
    """`(variables, rngs)` for `Transformer.apply` from plain parameters or `LoraParams`."""
    if isinstance(params, LoraParams):
        rngs = {} if params.dropout_key is None else {"lora_dropout": params.dropout_key}
        return {"params": params.base, "lora": params.adapters}, rngs
    return {"params": params}, {}


def base_params(params):
    """The frozen base of `LoraParams` (plain parameters are returned as they are)."""
    return params.base if isinstance(params, LoraParams) else params


# ----------------------------------------------------------------------------------------------
# The layer


def dequantize_kernel(codes, scale, dtype=jnp.float32) -> Array:
    """`codes * scale` (NF4: `nf4_bucket[codes] * scale`), scale broadcast over its blocks of rows.

    Works on one kernel `[in, out]` with `scale [in / block, out]`, or on stacked ones with the
    same leading axes. The quantisation type follows from the codes' dtype.
    """
    import qwix

    qtype = {jnp.dtype(v): k for k, v in _CODE_DTYPES.items()}[jnp.dtype(codes.dtype)]
    qtype = qtype if qtype == "nf4" else jnp.dtype(codes.dtype)
    return qwix.dequantize(qwix.QArray(codes, scale, None, qtype)).astype(dtype)


def quantized_kernel(module: nn.Module, dtype) -> Array | None:
    """The float kernel of a module whose parameters hold a quantised one (`kernel_q` +
    `kernel_scale`, see `quantize_params`), or None when it holds a plain `kernel`."""
    if not module.has_variable("params", QUANTIZED_KERNEL):
        return None
    codes, scale = module.get_variable("params", QUANTIZED_KERNEL), module.get_variable("params", KERNEL_SCALE)
    return dequantize_kernel(codes, scale, dtype)


def adapter_factors(module: nn.Module, lora: LoraConfig | None) -> tuple[Array, Array] | None:
    """`(lora_A, lora_B)` of a module the `"lora"` collection holds adapters for, else None; an
    error when adapters come for a model built without `ModelConfig.lora`."""
    if not module.has_variable("lora", "lora_A"):
        return None
    if lora is None:
        raise ValueError(
            "adapters were passed for a model without ModelConfig.lora: build it with with_lora(model, LoraConfig(...))"
        )
    return module.get_variable("lora", "lora_A"), module.get_variable("lora", "lora_B")


class LoraDense(nn.Dense):
    """`nn.Dense` (same parameters, same numbers) that also reads a quantised kernel
    (`kernel_q` + `kernel_scale`, see `quantize_params`) and adds `(alpha / r) B A dropout(x)`
    when the `"lora"` collection holds `lora_A [in, r]` and `lora_B [r, out]` for it."""

    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, inputs):
        kernel = quantized_kernel(self, self.param_dtype)
        if kernel is not None:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
            x, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
            y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
            if bias is not None:
                y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        else:
            y = super().__call__(inputs)
        factors = adapter_factors(self, self.lora)
        if factors is None:
            return y
        lora_a, lora_b = factors
        assert self.lora is not None  # adapter_factors checked it
        h = inputs
        if self.lora.dropout > 0 and self.has_rng("lora_dropout"):
            keep = 1.0 - self.lora.dropout
            kept = jax.random.bernoulli(self.make_rng("lora_dropout"), keep, h.shape)
            h = jnp.where(kept, h / keep, 0).astype(inputs.dtype)
        dtype = self.dtype or inputs.dtype
        delta = (h.astype(dtype) @ lora_a.astype(dtype)) @ lora_b.astype(dtype)
        return y + (self.lora.scale * delta).astype(y.dtype)


# ----------------------------------------------------------------------------------------------
# Adapters: init, merge


def _is_dense(node) -> bool:
    return isinstance(node, dict) and ("kernel" in node or QUANTIZED_KERNEL in node)


def _kernel_shape(node) -> tuple:
    return tuple((node["kernel"] if "kernel" in node else node[QUANTIZED_KERNEL]).shape)


def _target_paths(params, targets, experts: bool = False) -> list[tuple[str, ...]]:
    """Paths of the targeted projections (dicts holding a kernel) under layer entries; with
    `experts`, the stacked expert projections (`mlp/experts/<name>`) too."""
    out = []

    def walk(node, path):
        if _is_dense(node):
            if len(path) >= 2 and path[-2] in ("attn", "mlp") and path[-1] in targets:
                out.append(path)
            elif experts and len(path) >= 3 and path[-3:-1] == ("mlp", "experts") and path[-1] in targets:
                out.append(path)
            return
        if isinstance(node, dict):
            for name in sorted(node):
                walk(node[name], path + (name,))

    walk(params, ())
    return out


def _get(tree, path):
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: dict, path, value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def init_lora(lora: LoraConfig, params, key: Array, dtype=jnp.float32) -> dict:
    """Fresh adapters for `params` (plain, quantised or abstract): `A ~ U(-1/sqrt(in), 1/sqrt(in))`
    (PEFT's kaiming-uniform, a = sqrt(5)), `B = 0`; stacked (scanned) kernels get stacked adapters."""
    paths = _target_paths(params, lora.target_modules, lora.experts)
    if not paths:
        raise ValueError(f"no projection {lora.target_modules} found in the parameters to adapt")
    adapters: dict = {}
    for i, path in enumerate(paths):
        *lead, fan_in, fan_out = _kernel_shape(_get(params, path))
        bound = 1.0 / math.sqrt(fan_in)
        lora_a = jax.random.uniform(jax.random.fold_in(key, i), (*lead, fan_in, lora.rank), dtype, -bound, bound)
        _set(adapters, path, {"lora_A": lora_a, "lora_B": jnp.zeros((*lead, lora.rank, fan_out), dtype)})
    return adapters


def adapter_paths(adapters) -> list[tuple[str, ...]]:
    """Paths of the projections that have an adapter."""
    out = []

    def walk(node, path):
        if isinstance(node, dict) and "lora_A" in node:
            out.append(path)
        elif isinstance(node, dict):
            for name in sorted(node):
                walk(node[name], path + (name,))

    walk(adapters, ())
    return out


def merge_lora(lora: LoraConfig, params, adapters) -> dict:
    """Full parameters with each adapter folded in: `W' = W + (alpha / r) A B` (quantised kernels
    are dequantised first, so the result is a plain float model, e.g. for `save_pretrained`)."""
    merged = dequantize_params(params)  # new dicts all the way down: written into below
    for path in adapter_paths(adapters):
        node = _get(merged, path)
        ad = _get(adapters, path)
        kernel = node["kernel"]
        update = lora.scale * jnp.matmul(ad["lora_A"].astype(jnp.float32), ad["lora_B"].astype(jnp.float32))
        node["kernel"] = (kernel.astype(jnp.float32) + update).astype(kernel.dtype)
    return merged


# ----------------------------------------------------------------------------------------------
# QLoRA: quantised frozen base


def quantize_params(
    params, qtype: str = "nf4", block_size: int = 64, targets=ALL_TARGETS, experts: bool = True
) -> dict:
    """The base with every targeted projection kernel quantised (embeddings, norms, biases, the
    output layer and MoE routers stay float, as in QLoRA; the experts' stacked projections are
    quantised too unless `experts=False`). A kernel `[..., in, out]` becomes `kernel_q` (codes,
    same shape: uint4 for NF4, int8 / int4) and `kernel_scale [..., in / block, out]`: one absmax
    scale per block of `block_size` input rows and output column (`gcd(in, block_size)` rows when
    `block_size` does not divide `in`). Computed with qwix's `quantize`."""
    import qwix

    if qtype not in QUANT_TYPES:
        raise ValueError(f"qtype must be one of {QUANT_TYPES}, got {qtype!r}")
    targets = tuple(HF_TARGET_NAMES.get(t, t) for t in targets)
    out = jax.tree.map(lambda x: x, params)
    for path in _target_paths(params, targets, experts):
        node = dict(_get(out, path))
        if "kernel" not in node:
            continue  # already quantised
        kernel = node.pop("kernel")
        fan_in_axis = kernel.ndim - 2
        block = math.gcd(kernel.shape[fan_in_axis], block_size)
        channelwise = tuple(a for a in range(kernel.ndim) if a != fan_in_axis)
        q = qwix.quantize(
            jnp.asarray(kernel, jnp.float32),
            qtype if qtype == "nf4" else jnp.dtype(qtype),
            channelwise_axes=channelwise,
            tiled_axes={fan_in_axis: block},
        )
        node[QUANTIZED_KERNEL] = q.qvalue
        node[KERNEL_SCALE] = q.scale.astype(jnp.dtype(kernel.dtype))
        _set(out, path, node)
    return out


def is_quantized(params) -> bool:
    """Whether any kernel of `params` is stored quantised."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if QUANTIZED_KERNEL in node:
                found.append(True)
            for value in node.values():
                walk(value)

    walk(params)
    return bool(found)


def dequantize_params(params) -> dict:
    """Plain float parameters from (partly) quantised ones (`kernel = dequantize_kernel(...)`)."""

    def walk(node):
        if not isinstance(node, dict):
            return node
        if QUANTIZED_KERNEL in node:
            node = dict(node)
            codes, scale = node.pop(QUANTIZED_KERNEL), node.pop(KERNEL_SCALE)
            node["kernel"] = dequantize_kernel(codes, scale, scale.dtype)
            return node
        return {name: walk(value) for name, value in node.items()}

    return walk(params)


# ----------------------------------------------------------------------------------------------
# Models


def with_lora(model, lora: LoraConfig):
    """The same `LanguageModel` (or `Pretrained`) with adapters of structure `lora`; call it with
    `LoraParams(base, adapters)`. Its plain parameters still give the base model."""
    from jaxrlhf.models.lm import LanguageModel, Pretrained

    if isinstance(model, Pretrained):
        return Pretrained(with_lora(model.model, lora), model.params, model.tokenizer)
    if not isinstance(model, LanguageModel):
        raise TypeError(f"with_lora takes a LanguageModel or Pretrained, got {type(model).__name__}")
    return dataclasses.replace(model, config=model.config.replace(lora=lora))


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


__all__ = [
    "ALL_TARGETS",
    "ATTENTION_TARGETS",
    "LoraConfig",
    "LoraDense",
    "LoraParams",
    "MLP_TARGETS",
    "QUANT_TYPES",
    "adapter_factors",
    "adapter_paths",
    "base_params",
    "count_params",
    "dequantize_kernel",
    "dequantize_params",
    "init_lora",
    "is_quantized",
    "merge_lora",
    "model_variables",
    "quantize_params",
    "quantized_kernel",
    "with_lora",
]
