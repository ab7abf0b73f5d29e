"""The model object the rest of jaxrlhf uses: a hashable config plus pure apply functions.

`LanguageModel` holds no parameters, only its `ModelConfig`, so it can be closed over or passed as a
static argument to `jax.jit`; parameters travel separately as a pytree. `Pretrained` bundles a
model with loaded parameters and its tokenizer (what `load_pretrained` returns).
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import jax
import jax.numpy as jnp

from jaxrlhf.models import positions as position_table
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.lora import LoraParams, base_params, model_variables
from jaxrlhf.models.moe import collect_router_logits, router_losses
from jaxrlhf.models.transformer import (
    ModelOutput,
    Transformer,
    decoding_params,
    grow_cache,
    init_cache,
    init_params,
    output_layer,
    put_cache_prefix,
    stack_layers,
    take_cache_rows,
    unstack_layers,
)
from jaxrlhf.tuning import Tuning

_KEEP = object()  # `with_layers`: leave `remat` as it is


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """Pure functions of a decoder LM; `config` fully determines the computation.

    `tuning` (`jaxrlhf.tuning.Tuning`) holds speed-only choices of decoding that do not change the
    numbers: by default the current backend's (`Tuning.for_backend()`, chosen once, when the model
    is built). `make_sampler` and the PPO trainer pick the tuning for their own batch shape.

    `apply` / `forward` outside a trace, with a concrete `attention_mask` (or `positions`) whose
    rows need positions past a learned position table, raise ValueError
    (`jaxrlhf.models.positions.check_positions`); a traced mask is not read (free inside `jit`,
    where the lookup would clamp: check the data first, as the trainers do).
    """

    config: ModelConfig
    tuning: Tuning = dataclasses.field(default_factory=Tuning.for_backend)

    @property
    def module(self) -> Transformer:
        return Transformer(self.config, self.tuning)

    def apply(self, params, input_ids_BxL, attention_mask_BxL) -> jax.Array:
        """Logits `[B, L, V]` (float32) for a (left-padded) batch."""
        return self.forward(params, input_ids_BxL, attention_mask_BxL).logits

    def forward(
        self,
        params,
        input_ids,
        attention_mask,
        positions=None,
        cache=None,
        cache_index=None,
        cache_size=None,
        logits_positions: slice | None = None,
        valid_lengths=None,
        segment_ids=None,
    ) -> ModelOutput:
        """Full output: logits, final hidden states and, in cache mode, the updated KV cache.

        With `cache_size` (and no `cache`) this is a prefill: the tokens attend to each other as
        without a cache, and the returned cache has `cache_size` slots, the first L holding them.
        `logits_positions` (a static `slice` of the L positions) computes the output layer there
        only: `logits` is then `[B, n, V]` for the slice's n positions (`slice(0, 0)`: none, for a
        caller that needs `hidden` alone), while `hidden` keeps all L. `segment_ids` (`[B, L]`,
        with `positions`): packed rows that do not attend to each other (`jaxrlhf.packing`).

        With a cache, `cache_index` is the first slot the L tokens are written to: a scalar for
        every row, or a `[B]` vector for per-row decoding (row b at its own slot, the causal rule
        per row); `valid_lengths [B]` then writes only row b's first `valid_lengths[b]` tokens
        (the rest are padding). See `jaxrlhf.models.transformer`.
        """
        if self.config.positions == "learned":  # rows past the table: see the class docstring
            position_table.check_positions(self, attention_mask, positions=positions, where="LanguageModel.forward")
        variables, rngs = model_variables(params)  # plain parameters, or `LoraParams(base, adapters)`
        args = (
            input_ids,
            attention_mask,
            positions,
            cache,
            cache_index,
            cache_size,
            logits_positions,
            valid_lengths,
            segment_ids,
        )
        if not self.config.is_moe:
            output = self.module.apply(variables, *args, rngs=rngs)
            return cast(ModelOutput, output)  # without `mutable`, Linen's apply returns the module's output alone
        # A mixture of experts: each MoE layer sows its router logits; the router losses are
        # taken over the real tokens of this call.
        output, state = self.module.apply(variables, *args, rngs=rngs, mutable=["intermediates"])
        output = cast(ModelOutput, output)
        L = input_ids.shape[1]
        mask = jnp.asarray(attention_mask)
        if cache is not None and cache_index is not None and jnp.ndim(cache_index) == 1:  # per-row slots
            slots_BxL = jnp.asarray(cache_index)[:, None] + jnp.arange(L)[None, :]
            valid_BxL = jnp.take_along_axis(mask, jnp.clip(slots_BxL, 0, mask.shape[1] - 1), axis=1)
            if valid_lengths is not None:
                valid_BxL = valid_BxL * (jnp.arange(L)[None, :] < jnp.asarray(valid_lengths)[:, None])
        else:
            start = 0 if cache is None or cache_index is None else cache_index
            valid_BxL = jax.lax.dynamic_slice_in_dim(mask, start, L, axis=1)
        router_logits = collect_router_logits(state["intermediates"])
        losses = router_losses(router_logits, valid_BxL, self.config.num_experts_per_tok)
        aux = {"router_logits": router_logits, **losses}
        return output._replace(aux=aux)

    def hidden_states(self, params, input_ids_BxL, attention_mask_BxL) -> jax.Array:
        """Final (normalised) hidden states `[B, L, D]` without the output layer (e.g. a critic's trunk)."""
        return self.forward(params, input_ids_BxL, attention_mask_BxL, logits_positions=slice(0, 0)).hidden

    def output_layer(self, params, hidden_xD) -> jax.Array:
        """The output layer alone: float32 logits `[..., V]` of final hidden states `[..., D]`
        (`forward(...).hidden`, any leading shape), equal to the forward's logits there (tied or
        untied head, Gemma 2's final soft-capping, `decoding_params`' transposed copy). For a
        caller that needs the head at a subset of positions it gathers itself, e.g. the packed
        passes' response positions (`jaxrlhf.training.packed`). With `LoraParams` the base's head
        (adapters never touch the output layer)."""
        return output_layer(self.config, base_params(params), hidden_xD)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return init_cache(self.config, batch, max_len, dtype)

    def decoding_params(self, params):
        """`params` prepared for a decoding loop (see `transformer.decoding_params`)."""
        if isinstance(params, LoraParams):  # the base gets the copy; adapters stay as they are
            return params._replace(base=self.decoding_params(params.base))
        return decoding_params(self.config, params, self.tuning)

    def grow_cache(self, cache, max_len: int):
        return grow_cache(cache, max_len)

    def take_cache_rows(self, cache, rows):
        """The cache of batch rows `rows` (`transformer.take_cache_rows`)."""
        return take_cache_rows(cache, rows)

    def put_cache_prefix(self, cache, prefix, which):
        """`cache` with `prefix`'s slots written first in the rows where `which` is true
        (`transformer.put_cache_prefix`)."""
        return put_cache_prefix(cache, prefix, which)

    def init_params(self, key: jax.Array):
        return init_params(self.config, key)

    def layout_params(self, params):
        """`params` in this model's layer layout: stacked (`params["layers"]`, leaves
        `[num_layers, ...]`) when `config.scan_layers`, else per layer (`layer_0`, ...). Either
        layout is accepted (see `transformer.stack_layers` / `unstack_layers`); `LoraParams` get
        both their base and their adapters converted."""
        if isinstance(params, LoraParams):
            return params._replace(base=self.layout_params(params.base), adapters=self.layout_params(params.adapters))
        return stack_layers(params) if self.config.scan_layers else unstack_layers(params)

    def with_layers(self, scan_layers: bool | None = None, remat: Any = _KEEP) -> LanguageModel:
        """The same model with another layer execution (`scan_layers`, `remat`); convert the
        parameters with the new model's `layout_params`."""
        changes = {}
        if scan_layers is not None:
            changes["scan_layers"] = bool(scan_layers)
        if remat is not _KEEP:
            changes["remat"] = remat
        return LanguageModel(self.config.replace(**changes), self.tuning)

    def with_tuning(self, tuning: Tuning) -> LanguageModel:
        """The same model decoding with `tuning` (same parameters, same numbers)."""
        return dataclasses.replace(self, tuning=tuning)

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

    def with_layers(self, scan_layers: bool | None = None, remat: Any = _KEEP) -> Pretrained:
        """The same checkpoint run with scanned and/or rematerialised layers (parameters converted
        to the matching layout), e.g. `pre.with_layers(scan_layers=True, remat="dots_saveable")`."""
        model = self.model.with_layers(scan_layers, remat)
        return Pretrained(model, model.layout_params(self.params), self.tokenizer)

    @property
    def forward(self):
        return self.model.forward
