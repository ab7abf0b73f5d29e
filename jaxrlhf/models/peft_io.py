"""LoRA adapters in and out as Hugging Face PEFT adapter directories.

A PEFT LoRA adapter is `adapter_config.json` (r, lora_alpha, target modules, ...) plus
`adapter_model.safetensors` whose keys name the adapted module of the transformers model:

| ours (`jaxrlhf.models.lora`)        | PEFT key (Llama family)                                          | shape     |
| ----------------------------------- | ---------------------------------------------------------------- | --------- |
| layer_i/attn/q/lora_A [in, r]       | base_model.model.model.layers.i.self_attn.q_proj.lora_A.weight    | (r, in)   |
| layer_i/attn/q/lora_B [r, out]      | base_model.model.model.layers.i.self_attn.q_proj.lora_B.weight    | (out, r)  |
| layer_i/mlp/{gate,up,down}          | ...model.layers.i.mlp.{gate,up,down}_proj.lora_{A,B}.weight        |           |

GPT-2 (`transformer.h.i.` + `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`): its `Conv1D`
stores weights (in, out), so the config says `fan_in_fan_out: true` (PEFT's lora_A / lora_B
shapes stay (r, in) / (out, r)). GPT-2 fuses q, k, v into one `c_attn`; our separate q, k, v
adapters (ranks r_q, r_k, r_v) are written as one exact `c_attn` adapter of rank
R = r_q + r_k + r_v: `A = [A_q A_k A_v]` and a block-diagonal `B`, with `rank_pattern` R and
`alpha_pattern` (alpha / r) R so that PEFT's scale `alpha / r` is unchanged. Read back, a `c_attn`
adapter of rank R gives each of q, k, v the whole `A` and its third of `B` (rank R each: the same
function, not the same shapes).

PEFT's scale is `lora_alpha / r` per module (`rank_pattern`, `alpha_pattern`; `use_rslora`:
`alpha / sqrt(r)`). On reading, a module whose scale differs from the file's global
`lora_alpha / r` gets the ratio folded into its `B`, so one `LoraConfig` describes the result.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import jax
import numpy as np

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.lora import LoraConfig, adapter_paths, merge_lora
from jaxrlhf.models.transformer import stack_layers, unstack_layers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LLAMA_NAMES = {
    ("attn", "q"): "self_attn.q_proj",
    ("attn", "k"): "self_attn.k_proj",
    ("attn", "v"): "self_attn.v_proj",
    ("attn", "o"): "self_attn.o_proj",
    ("mlp", "gate"): "mlp.gate_proj",
    ("mlp", "up"): "mlp.up_proj",
    ("mlp", "down"): "mlp.down_proj",
}
_GPT2_NAMES = {("attn", "o"): "attn.c_proj", ("mlp", "up"): "mlp.c_fc", ("mlp", "down"): "mlp.c_proj"}


class AdapterError(ValueError):
    """A PEFT adapter directory is missing, of another kind, or does not fit the model."""


def _fused_module(config: ModelConfig, layer: int, block: str, proj: str) -> tuple[str, dict[str, int]] | None:
    """`(module, {projection: output width} in row order)` when our projection is a block of a
    fused transformers module (GPT-2's `c_attn`, Phi-3's `qkv_proj` / `gate_up_proj`), else None."""
    q, kv, f = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.intermediate_size
    if block == "attn" and proj in "qkv" and config.model_type in ("gpt2", "phi3"):
        prefix = f"transformer.h.{layer}.attn.c_attn" if config.model_type == "gpt2" else None
        return prefix or f"model.layers.{layer}.self_attn.qkv_proj", {"q": q, "k": kv, "v": kv}
    if block == "mlp" and proj in ("gate", "up") and config.model_type == "phi3":
        return f"model.layers.{layer}.mlp.gate_up_proj", {"gate": f, "up": f}
    return None


def _module_name(config: ModelConfig, layer: int, block: str, proj: str) -> str:
    """The transformers module name of our projection (fused ones: the fused module)."""
    fused = _fused_module(config, layer, block, proj)
    if fused is not None:
        return fused[0]
    if config.model_type == "gpt2":
        return f"transformer.h.{layer}.{_GPT2_NAMES[(block, proj)]}"
    return f"model.layers.{layer}.{_LLAMA_NAMES[(block, proj)]}"


def _layer_index(name: str) -> int:
    return int(name[len("layer_") :])


def _fuse(parts: dict, widths: dict[str, int], in_dim: int, lead: tuple[int, ...] = ()):
    """One exact adapter for a fused module from our per-projection adapters: `A = [A_1 ... A_n]`
    (`[..., in, R]`, R the sum of their ranks) and a block-diagonal `B` (`[..., R, sum of
    widths]`): block i's rank rows feed block i's columns only. Projections without an adapter
    are empty blocks (rank 0)."""
    a_blocks, b_blocks = [], []
    for proj, width in widths.items():
        if proj in parts:
            a_inxr, b_rxout = parts[proj]
        else:
            a_inxr, b_rxout = np.zeros((*lead, in_dim, 0), np.float32), np.zeros((*lead, 0, width), np.float32)
        a_blocks.append(a_inxr)
        b_blocks.append(b_rxout)
    a_inxR = np.concatenate(a_blocks, axis=-1)
    b_Rxout = np.zeros((*lead, a_inxR.shape[-1], sum(widths.values())), np.float32)
    row = col = 0
    for b_rxout in b_blocks:
        b_Rxout[..., row : row + b_rxout.shape[-2], col : col + b_rxout.shape[-1]] = b_rxout
        row, col = row + b_rxout.shape[-2], col + b_rxout.shape[-1]
    return a_inxR, b_Rxout


# transformers' stacked expert tensors (`mlp.experts.<param>`, `[E, out, in]`) in the order PEFT
# wraps them (their definition order): with both targeted, `gate_up_proj`'s adapter is the inner
# one, saved under `experts.base_layer.lora_*`, and `down_proj`'s under `experts.lora_*`.
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def _expert_module(layer: int) -> str:
    return f"model.layers.{layer}.mlp.experts"


def _peft_expert_weights(a_ExinxR, b_ExRxout) -> tuple[np.ndarray, np.ndarray]:
    """Our `[E, in, R]` / `[E, R, out]` expert adapters -> PEFT's `lora_A [E*R, in]` (row e*R + j)
    and `lora_B [out, R*E]` (column j*E + e)."""
    E, _, R = a_ExinxR.shape
    a = np.swapaxes(a_ExinxR, 1, 2).reshape(E * R, -1)
    b = np.transpose(b_ExRxout, (2, 1, 0)).reshape(b_ExRxout.shape[2], R * E)
    return a, b


def _our_expert_weights(a_ERxin, b_outxRE, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `_peft_expert_weights`."""
    E = num_experts
    R = a_ERxin.shape[0] // E
    a = np.swapaxes(a_ERxin.reshape(E, R, -1), 1, 2)
    b = np.transpose(b_outxRE.reshape(-1, R, E), (2, 1, 0))
    return a, b


def peft_state_dict(config: ModelConfig, lora: LoraConfig, adapters) -> tuple[dict[str, np.ndarray], dict]:
    """`(state_dict, adapter_config)` of our adapters in PEFT's names and layouts."""
    adapters = unstack_layers(jax.device_get(adapters))
    modules: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # HF module -> (A [r, in], B [out, r])
    fused: dict[str, dict] = {}  # fused HF module -> {projection: (A [in, r], B [r, out])}
    experts: dict[int, dict] = {}  # layer -> {projection: (A [E, in, r], B [E, r, out])}
    widths: dict[str, dict[str, int]] = {}
    for path in adapter_paths(adapters):
        node = adapters[path[0]]
        for name in path[1:]:
            node = node[name]
        a_inxr, b_rxout = np.asarray(node["lora_A"], np.float32), np.asarray(node["lora_B"], np.float32)
        layer = _layer_index(path[0])
        if path[1:3] == ("mlp", "experts"):
            experts.setdefault(layer, {})[path[3]] = (a_inxr, b_rxout)
            continue
        block, proj = path[1], path[2]
        fused_module = _fused_module(config, layer, block, proj)
        if fused_module is not None:
            fused.setdefault(fused_module[0], {})[proj] = (a_inxr, b_rxout)
            widths[fused_module[0]] = fused_module[1]
        else:
            modules[_module_name(config, layer, block, proj)] = (a_inxr.T, b_rxout.T)
    for name, parts in fused.items():
        a_inxR, b_Rxout = _fuse(parts, widths[name], config.hidden_size)
        modules[name] = (a_inxR.T, b_Rxout.T)
    state_dict, rank_pattern, alpha_pattern = {}, {}, {}

    def add(key, name, a_rxin, b_outxr, rank):
        state_dict[f"{_PREFIX}{key}.lora_A.weight"] = np.ascontiguousarray(a_rxin)
        state_dict[f"{_PREFIX}{key}.lora_B.weight"] = np.ascontiguousarray(b_outxr)
        if rank != lora.rank:
            rank_pattern[name] = rank
            alpha_pattern[name] = lora.scale * rank

    for name, (a_rxin, b_outxr) in sorted(modules.items()):
        add(name, name, a_rxin, b_outxr, a_rxin.shape[0])
    target_parameters = set()
    F = config.moe_intermediate_size
    for layer, parts in sorted(experts.items()):
        params = {}
        if "gate" in parts or "up" in parts:
            lead = (config.num_experts,)
            params["gate_up_proj"] = _fuse(parts, {"gate": F, "up": F}, config.hidden_size, lead)
        if "down" in parts:
            params["down_proj"] = parts["down"]
        present = [p for p in EXPERT_PARAMS if p in params]
        for k, param in enumerate(present):
            a, b = _peft_expert_weights(*params[param])
            key = _expert_module(layer) + ".base_layer" * (len(present) - 1 - k)
            add(key, f"{_expert_module(layer)}.{param}", a, b, params[param][0].shape[-1])
            target_parameters.add(f"mlp.experts.{param}")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(modules),
        "target_parameters": sorted(target_parameters) or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": config.model_type == "gpt2",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return state_dict, adapter_config


def save_peft_adapter(directory: str, model, adapters, base_model_name_or_path: str | None = None) -> None:
    """Writes `adapter_config.json` + `adapter_model.safetensors`, which
    `peft.PeftModel.from_pretrained(transformers_model, directory)` loads. `model` is the LoRA
    `LanguageModel` (its `config.lora` gives rank, alpha and dropout)."""
    from safetensors.numpy import save_file

    config = model.config
    if config.lora is None:
        raise AdapterError("the model has no LoRA config (ModelConfig.lora): build it with with_lora")
    state_dict, adapter_config = peft_state_dict(config, config.lora, adapters)
    adapter_config["base_model_name_or_path"] = base_model_name_or_path
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config, f, indent=2)
    save_file(state_dict, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})


_LLAMA_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj$")
_EXPERTS_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts((?:\.base_layer)*)$")
# (model type, fused HF projection) -> our projections in it (`_fused_module` gives the widths).
_FUSED_PARTS = {
    ("gpt2", "c_attn"): ("q", "k", "v"),
    ("phi3", "qkv"): ("q", "k", "v"),
    ("phi3", "gate_up"): ("gate", "up"),
}
_GPT2_KEY = re.compile(r"^(?:transformer\.)?h\.(\d+)\.(attn|mlp)\.(c_attn|c_proj|c_fc)$")


def _read_adapter(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    config_path, weights_path = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(config_path):
        raise AdapterError(f"{directory} has no {ADAPTER_CONFIG}: not a PEFT adapter directory")
    if not os.path.isfile(weights_path):
        raise AdapterError(f"{directory} has no {ADAPTER_WEIGHTS} (adapters saved as .bin are not read)")
    with open(config_path) as f:
        adapter_config = json.load(f)
    return adapter_config, load_file(weights_path)


def peft_adapters_from_state_dict(config: ModelConfig, adapter_config: dict, state_dict) -> tuple[LoraConfig, dict]:
    """`(LoraConfig, adapters)` from a PEFT LoRA state dict and its config (see the module doc)."""
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"only LoRA adapters are read, this one is {adapter_config.get('peft_type')!r}")
    for unsupported in ("use_dora", "modules_to_save"):
        if adapter_config.get(unsupported):
            raise AdapterError(
                f"adapter_config.json sets {unsupported}={adapter_config[unsupported]!r}, which is not supported"
            )
    if adapter_config.get("bias", "none") != "none":
        raise AdapterError(f"adapters with trained biases (bias={adapter_config['bias']!r}) are not supported")
    rank, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    rslora = bool(adapter_config.get("use_rslora", False))
    rank_pattern = adapter_config.get("rank_pattern") or {}
    alpha_pattern = adapter_config.get("alpha_pattern") or {}

    def pattern(patterns, name, default):
        for key, value in patterns.items():  # PEFT's rule: the key matches a dotted suffix of the name
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        return default

    def scale_of(name):
        r, a = pattern(rank_pattern, name, rank), pattern(alpha_pattern, name, alpha)
        return a / math.sqrt(r) if rslora else a / r

    global_scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    weights: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        match = re.match(r"^(?:base_model\.model\.)?(.*)\.(lora_A|lora_B)(?:\.default)?\.weight$", key)
        if match is None:
            raise AdapterError(f"unexpected tensor {key!r} in the adapter (only lora_A / lora_B weights are read)")
        weights.setdefault(match.group(1), {})[match.group(2)] = np.asarray(value, np.float32)
    adapters: dict = {}
    targets = set()
    gpt2 = config.model_type == "gpt2"
    expert_params = [
        p for p in EXPERT_PARAMS if any(t.endswith(p) for t in adapter_config.get("target_parameters") or ())
    ]

    def put(layer, path, a_inxr, b_rxout):
        node = adapters.setdefault(f"layer_{layer}", {})
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = {"lora_A": np.ascontiguousarray(a_inxr), "lora_B": np.ascontiguousarray(b_rxout)}
        targets.add(path[-1])

    for name, pair in sorted(weights.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterError(f"module {name!r} has {sorted(pair)} but needs lora_A and lora_B")
        expert = _EXPERTS_KEY.match(name)
        if expert is not None:  # PEFT's `target_parameters` on transformers' stacked experts
            layer, nesting = int(expert.group(1)), expert.group(2).count(".base_layer")
            index = len(expert_params) - 1 - nesting
            if layer >= config.num_layers or not config.is_moe_layer(layer) or not 0 <= index < len(expert_params):
                raise AdapterError(
                    f"adapter module {name!r} ({expert_params}) does not fit this {config.model_type} model"
                )
            param = expert_params[index]
            scale = scale_of(f"{_expert_module(layer)}.{param}") / global_scale
            a, b = _our_expert_weights(pair["lora_A"], pair["lora_B"] * scale, config.num_experts)
            if param == "down_proj":
                put(layer, ("mlp", "experts", "down"), a, b)
            else:  # gate_up: one A, B's columns split into gate and up
                F = config.moe_intermediate_size
                put(layer, ("mlp", "experts", "gate"), a, b[..., :F])
                put(layer, ("mlp", "experts", "up"), a, b[..., F:])
            continue
        a_rxin, b_outxr = pair["lora_A"], pair["lora_B"] * (scale_of(name) / global_scale)
        match = (_GPT2_KEY if gpt2 else _LLAMA_KEY).match(name)
        if match is None:
            raise AdapterError(f"adapter module {name!r} is not a projection of this {config.model_type} model")
        layer, block, hf_proj = int(match.group(1)), match.group(2), match.group(3)
        if layer >= config.num_layers:
            raise AdapterError(f"adapter module {name!r} is past the model's {config.num_layers} layers")
        block = "attn" if block in ("attn", "self_attn") else "mlp"
        fused_parts = _FUSED_PARTS.get((config.model_type, hf_proj))
        if fused_parts is not None:  # one A; B's rows split into the fused projections
            fused = _fused_module(config, layer, block, fused_parts[0])
            assert fused is not None
            start = 0
            for proj, width in fused[1].items():
                put(layer, (block, proj), a_rxin.T, b_outxr[start : start + width].T)
                start += width
            continue
        if gpt2:
            proj = {("attn", "c_proj"): "o", ("mlp", "c_fc"): "up", ("mlp", "c_proj"): "down"}[(block, hf_proj)]
        else:
            proj = hf_proj
        put(layer, (block, proj), a_rxin.T, b_outxr.T)
    if not adapters:
        raise AdapterError("the adapter holds no LoRA weights")
    order = [t for t in ("q", "k", "v", "o", "gate", "up", "down") if t in targets]
    lora = LoraConfig(
        rank=rank,
        alpha=alpha if not rslora else global_scale * rank,
        dropout=float(adapter_config.get("lora_dropout", 0.0)),
        target_modules=tuple(order),
        experts=bool(expert_params),
    )
    adapters = jax.tree.map(lambda x: np.asarray(x, np.float32), adapters)
    if config.scan_layers:
        if len(adapters) != config.num_layers:
            raise AdapterError(
                "a scanned model needs adapters on every layer; this adapter has "
                f"{len(adapters)} of {config.num_layers}"
            )
        adapters = stack_layers(adapters)
    return lora, adapters


def load_peft_adapter(directory: str, model) -> tuple[Any, dict]:
    """`(lora_model, adapters)` from a PEFT adapter directory for the base `model` (a
    `LanguageModel` or `Pretrained`): the model with the adapter's `LoraConfig`, and the adapters to
    call it with as `LoraParams(base, adapters)`."""
    from jaxrlhf.models.lora import with_lora

    adapter_config, state_dict = _read_adapter(directory)
    lora, adapters = peft_adapters_from_state_dict(model.config, adapter_config, state_dict)
    return with_lora(model, lora), adapters


def save_merged(directory: str, model, base, adapters, tokenizer=None) -> None:
    """Writes the adapters folded into the base weights (`merge_lora`) as an ordinary Hugging Face
    checkpoint (`save_pretrained`): a model that runs without PEFT."""
    from jaxrlhf.models.hf_io import save_pretrained
    from jaxrlhf.models.lm import LanguageModel

    merged = merge_lora(model.config.lora, base, adapters)
    plain = LanguageModel(model.config.replace(lora=None))
    save_pretrained(directory, plain, jax.device_get(merged), tokenizer)


def export_policy(directory: str, model, params, tokenizer=None) -> None:
    """A trained policy written for Hugging Face: `save_pretrained` of its parameters, or for a
    LoRA model (`model.config.lora`) its adapters (`params`) as a PEFT adapter directory (the base
    is the checkpoint the run started from; `save_merged` writes base + adapters as one model)."""
    from jaxrlhf.models.hf_io import save_pretrained

    if getattr(model.config, "lora", None) is None:
        save_pretrained(directory, model, params, tokenizer)
        return
    save_peft_adapter(directory, model, params)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterError",
    "export_policy",
    "load_peft_adapter",
    "peft_adapters_from_state_dict",
    "peft_state_dict",
    "save_merged",
    "save_peft_adapter",
]
