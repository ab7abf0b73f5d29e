"""The model object the rest of jaxrlhf uses: a hashable config plus pure apply functions.

`LanguageModel` holds no parameters, only its `ModelConfig`, so it can be closed over or passed as a
static argument to `jax.jit`; parameters travel separately as a pytree. `Pretrained` bundles a
model with loaded parameters and its tokenizer (what `load_pretrained` returns).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.transformer import (ModelOutput, Transformer, decoding_params, grow_cache, init_cache, init_params,
                                        stack_layers, unstack_layers)


_KEEP = object()  # `with_layers`: leave `remat` as it is


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """Pure functions of a decoder LM; `config` fully determines the computation."""

    config: ModelConfig

    @property
    def module(self) -> Transformer:
        return Transformer(self.config)

    def apply(self, params, input_ids_BxL, attention_mask_BxL) -> jax.Array:
        """Logits `[B, L, V]` (float32) for a (left-padded) batch."""
        return self.forward(params, input_ids_BxL, attention_mask_BxL).logits

    def forward(self, params, input_ids, attention_mask, positions=None, cache=None, cache_index=None,
                cache_size=None) -> ModelOutput:
        """Full output: logits, final hidden states and, in cache mode, the updated KV cache.

        With `cache_size` (and no `cache`) this is a prefill: the tokens attend to each other as
        without a cache, and the returned cache has `cache_size` slots, the first L holding them.
        """
        return self.module.apply({"params": params}, input_ids, attention_mask, positions, cache, cache_index,
                                 cache_size)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return init_cache(self.config, batch, max_len, dtype)

    def decoding_params(self, params):
        """`params` prepared for a decoding loop (see `transformer.decoding_params`)."""
        return decoding_params(self.config, params)

    def grow_cache(self, cache, max_len: int):
        return grow_cache(cache, max_len)

    def init_params(self, key: jax.Array):
        return init_params(self.config, key)

    def layout_params(self, params):
        """`params` in this model's layer layout: stacked (`params["layers"]`, leaves
        `[num_layers, ...]`) when `config.scan_layers`, else per layer (`layer_0`, ...). Either
        layout is accepted (see `transformer.stack_layers` / `unstack_layers`)."""
        return stack_layers(params) if self.config.scan_layers else unstack_layers(params)

    def with_layers(self, scan_layers: bool | None = None, remat: Any = _KEEP) -> "LanguageModel":
        """The same model with another layer execution (`scan_layers`, `remat`); convert the
        parameters with the new model's `layout_params`."""
        changes = {}
        if scan_layers is not None:
            changes["scan_layers"] = bool(scan_layers)
        if remat is not _KEEP:
            changes["remat"] = remat
        return LanguageModel(self.config.replace(**changes))

    def cast_params(self, params, dtype):
        """Casts floating-point parameters to `dtype` (e.g. bfloat16 storage)."""
        dtype = jnp.dtype(dtype)
        return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


@dataclasses.dataclass
class Pretrained:
    """A model with its parameters and tokenizer, as loaded from a checkpoint."""

    model: LanguageModel
    params: Any
    tokenizer: Any = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def apply(self):
        return self.model.apply

    def with_layers(self, scan_layers: bool | None = None, remat: Any = _KEEP) -> "Pretrained":
        """The same checkpoint run with scanned and/or rematerialised layers (parameters converted
        to the matching layout), e.g. `pre.with_layers(scan_layers=True, remat="dots_saveable")`."""
        model = self.model.with_layers(scan_layers, remat)
        return Pretrained(model, model.layout_params(self.params), self.tokenizer)

    @property
    def forward(self):
        return self.model.forward
