"""A Flax BERT encoder with sentence-transformers pooling, loaded from a local HF directory.

Used as a frozen sentence encoder, e.g. as a reward model that scores a response by how close its
embedding is to a target text's (``experiments/tasks/style_reward.py``). Everything is a pure function of
``params``, so it runs inside a jitted training step.

The network is HF's ``BertModel`` without the pooler head:

    h0 = LayerNorm(word_emb[ids] + pos_emb[0..L-1] + type_emb[token_type_ids])
    per layer:  a = LayerNorm(h + Dense(MultiHeadAttention(h, mask)))
                h = LayerNorm(a + Dense(act(Dense(a))))

and a sentence embedding is, as in all-MiniLM-L6-v2's pipeline (modules.json: Transformer ->
Pooling(mean) -> Normalize):

    e = sum_t mask_t h_t / max(sum_t mask_t, 1e-9),   e <- e / max(||e||_2, 1e-12).

A directory with a sentence-transformers pooling config (``1_Pooling/config.json``) may ask for CLS
pooling instead; without one, mean pooling + L2 normalisation is used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.models.config import ACTIVATIONS

__all__ = ["BertConfig", "BertEncoder", "BertModule", "load_bert_encoder"]


@dataclass(frozen=True)
class BertConfig:
    """The fields of an HF ``BertConfig`` the encoder needs (hashable: a Flax module attribute)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str = "gelu"

    @classmethod
    def from_hf_dict(cls, config: dict, source: str = "config.json") -> BertConfig:
        if config.get("model_type") != "bert":
            raise ValueError(f"{source}: model_type {config.get('model_type')!r} is not supported; expected 'bert'")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"{source}: position_embedding_type {config['position_embedding_type']!r} is not supported"
            )
        if config.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise ValueError(f"{source}: hidden_act {config['hidden_act']!r} is not supported")
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            max_position_embeddings=config["max_position_embeddings"],
            type_vocab_size=config.get("type_vocab_size", 2),
            layer_norm_eps=config.get("layer_norm_eps", 1e-12),
            hidden_act=config.get("hidden_act", "gelu"),
        )


# --------------------------------------------------------------------------------------------
# The network. Submodule names follow HF's, so the weight mapping below is a plain rename.
# --------------------------------------------------------------------------------------------


class BertSelfAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, attention_mask):
        cfg = self.config
        heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        split = lambda x: x.reshape(*x.shape[:2], heads, head_dim)  # noqa: E731  [B, L, H, Dh]
        query = split(nn.Dense(cfg.hidden_size, dtype=self.dtype, name="query")(hidden))
        key = split(nn.Dense(cfg.hidden_size, dtype=self.dtype, name="key")(hidden))
        value = split(nn.Dense(cfg.hidden_size, dtype=self.dtype, name="value")(hidden))
        # softmax(q k^T / sqrt(Dh) + mask) in float32; padded keys get the most negative float.
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) / np.sqrt(head_dim)
        keep = attention_mask[:, None, None, :].astype(bool)
        scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        context = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        return context.reshape(*hidden.shape[:2], cfg.hidden_size)


class BertLayer(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, attention_mask):
        cfg = self.config
        layer_norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        context = BertSelfAttention(cfg, self.dtype, name="attention_self")(hidden, attention_mask)
        attended = layer_norm("attention_output_LayerNorm")(
            hidden + nn.Dense(cfg.hidden_size, dtype=self.dtype, name="attention_output_dense")(context)
        )
        inner = ACTIVATIONS[cfg.hidden_act](
            nn.Dense(cfg.intermediate_size, dtype=self.dtype, name="intermediate_dense")(attended)
        )
        return layer_norm("output_LayerNorm")(
            attended + nn.Dense(cfg.hidden_size, dtype=self.dtype, name="output_dense")(inner)
        )


class BertModule(nn.Module):
    """HF ``BertModel`` minus the pooler: token ids -> last hidden states ``[B, L, D]``."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        cfg = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        positions = jnp.arange(input_ids.shape[1])[None, :]
        embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=self.dtype, name=name)  # noqa: E731
        hidden = (
            embed(cfg.vocab_size, "word_embeddings")(input_ids)
            + embed(cfg.max_position_embeddings, "position_embeddings")(positions)
            + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
        )
        hidden = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="embeddings_LayerNorm")(hidden)
        for index in range(cfg.num_hidden_layers):
            hidden = BertLayer(cfg, self.dtype, name=f"layer_{index}")(hidden, attention_mask)
        return hidden


# --------------------------------------------------------------------------------------------
# Pooling and the encoder object
# --------------------------------------------------------------------------------------------


def mean_pool(hidden, attention_mask):
    """Masked mean over time: sum_t m_t h_t / max(sum_t m_t, 1e-9) (0 for an all-padding row)."""
    mask = attention_mask.astype(jnp.float32)[..., None]
    return (hidden.astype(jnp.float32) * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1e-9)


def l2_normalize(x, eps=1e-12):
    """x / max(||x||, eps), as torch.nn.functional.normalize."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@dataclass(frozen=True, eq=False)  # identity hash: bound methods go into jax.jit as they are
class BertEncoder:
    """A loaded encoder. ``apply`` and ``embed`` are pure functions of ``params`` (jit-able).

    pooling: "mean" (masked mean of the last hidden states) or "cls" (the first token's state).
    normalize: L2-normalise the pooled embedding.
    """

    module: BertModule
    params: Any
    config: BertConfig
    tokenizer: Any = None
    pooling: str = "mean"
    normalize: bool = True

    def apply(self, params, input_ids, attention_mask, token_type_ids=None) -> jax.Array:
        """Last hidden states ``[B, L, D]``."""
        hidden = self.module.apply({"params": params}, input_ids, attention_mask, token_type_ids)
        return cast(jax.Array, hidden)  # without `mutable`, Linen's apply returns the module's output alone

    def embed(self, params, input_ids, attention_mask, token_type_ids=None):
        """Sentence embeddings ``[B, D]`` (float32), pooled and (by default) L2-normalised."""
        hidden = self.apply(params, input_ids, attention_mask, token_type_ids)
        if self.pooling == "cls":
            pooled = hidden[:, 0].astype(jnp.float32)
        else:
            pooled = mean_pool(hidden, attention_mask)
        return l2_normalize(pooled) if self.normalize else pooled


# --------------------------------------------------------------------------------------------
# Loading: HF names -> Flax params
# --------------------------------------------------------------------------------------------


def _hf_to_flax_names(config: BertConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    """HF key (without ``bert.``) -> (Flax param path, transpose?). Dense kernels are (in, out),
    HF Linear weights (out, in); LayerNorm weight -> scale; Embedding weight -> embedding."""
    names: dict[str, tuple[tuple[str, ...], bool]] = {}

    def dense(hf, path):
        names[f"{hf}.weight"] = ((*path, "kernel"), True)
        names[f"{hf}.bias"] = ((*path, "bias"), False)

    def layer_norm(hf, path):
        names[f"{hf}.weight"] = ((*path, "scale"), False)
        names[f"{hf}.bias"] = ((*path, "bias"), False)

    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        names[f"embeddings.{table}.weight"] = ((table, "embedding"), False)
    layer_norm("embeddings.LayerNorm", ("embeddings_LayerNorm",))
    for i in range(config.num_hidden_layers):
        hf, flax = f"encoder.layer.{i}", f"layer_{i}"
        for proj in ("query", "key", "value"):
            dense(f"{hf}.attention.self.{proj}", (flax, "attention_self", proj))
        dense(f"{hf}.attention.output.dense", (flax, "attention_output_dense"))
        layer_norm(f"{hf}.attention.output.LayerNorm", (flax, "attention_output_LayerNorm"))
        dense(f"{hf}.intermediate.dense", (flax, "intermediate_dense"))
        dense(f"{hf}.output.dense", (flax, "output_dense"))
        layer_norm(f"{hf}.output.LayerNorm", (flax, "output_LayerNorm"))
    return names


def params_from_hf_state_dict(state_dict: dict[str, np.ndarray], config: BertConfig, source: str = "state dict"):
    """Flax params from an HF BERT state dict, keys with or without the ``bert.`` prefix.

    Keys HF has beyond the encoder (``pooler.*``, ``cls.*`` heads, ``embeddings.position_ids``) are
    ignored; a missing encoder weight raises a KeyError naming it.
    """
    stripped = {key.removeprefix("bert."): value for key, value in state_dict.items()}
    params: dict = {}
    missing = []
    for hf_name, (path, transpose) in _hf_to_flax_names(config).items():
        if hf_name not in stripped:
            missing.append(hf_name)
            continue
        value = np.asarray(stripped[hf_name], dtype=np.float32)
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value.T if transpose else value
    if missing:
        raise KeyError(f"{source}: missing BERT weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return params


def _sentence_transformers_pooling(path: str) -> tuple[str, bool]:
    """(pooling, normalize) from a sentence-transformers directory; ("mean", True) otherwise."""
    modules_file = os.path.join(path, "modules.json")
    if not os.path.isfile(modules_file):
        return "mean", True
    with open(modules_file) as f:
        modules = json.load(f)
    normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    pooling = "mean"
    for module in modules:
        if module.get("type", "").endswith(".Pooling"):
            with open(os.path.join(path, module.get("path", ""), "config.json")) as f:
                pooling_config = json.load(f)
            if pooling_config.get("pooling_mode_mean_tokens"):
                pooling = "mean"
            elif pooling_config.get("pooling_mode_cls_token"):
                pooling = "cls"
            else:
                raise ValueError(f"{path}: unsupported sentence-transformers pooling {pooling_config}")
    return pooling, normalize


_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def load_bert_encoder(path: str | os.PathLike, dtype=jnp.float32) -> BertEncoder:
    """Load a BERT sentence encoder from a local HF directory (config.json + model.safetensors).

    Params are cast to ``dtype`` and the network computes in it (softmax and pooling in float32).
    The tokenizer is loaded with ``AutoTokenizer`` when the directory has tokenizer files
    (``None`` otherwise); pooling/normalisation follow a sentence-transformers ``modules.json``.
    """
    from safetensors.numpy import load_file

    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    weights_file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no config.json in {path}")
    if not os.path.isfile(weights_file):
        raise FileNotFoundError(f"no model.safetensors in {path} (only safetensors weights are read)")
    with open(config_file) as f:
        config = BertConfig.from_hf_dict(json.load(f), source=config_file)

    params = params_from_hf_state_dict(load_file(weights_file), config, source=weights_file)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=dtype), params)

    tokenizer = None
    if any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    pooling, normalize = _sentence_transformers_pooling(path)
    return BertEncoder(
        module=BertModule(config, dtype=dtype),
        params=params,
        config=config,
        tokenizer=tokenizer,
        pooling=pooling,
        normalize=normalize,
    )
