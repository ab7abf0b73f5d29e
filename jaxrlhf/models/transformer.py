"""A decoder-only transformer in Flax Linen covering GPT-2 and the Llama family.

Why Linen: `module.apply(variables, ...)` *is* the pure function the trainer and sampler need
(parameters in, logits out), with no object graph to walk on every call.

Shapes use suffixes: B batch, L new tokens, S key/value slots, D width, H query heads,
K key/value heads, G = H // K query heads per key/value head, E head dim, V vocabulary.

One forward handles both training and decoding:
- without a cache, the L tokens attend causally to each other, masked by `attention_mask [B, L]`;
- with a cache (`init_cache`), the L tokens are written into slots `[cache_index, cache_index + L)`
  of a preallocated per-layer key/value buffer (`[B, K, S, E]`) and attend to every earlier slot whose
  `attention_mask [B, S]` entry is 1. Prefill is L = prompt length, decoding is L = 1.
- per-row cache writes (the rollout engine, `jaxrlhf.engine`): `cache_index` may be a `[B]` vector,
  row b writing its tokens at slots `[cache_index[b], cache_index[b] + L)` and its token l seeing
  the slots `<= cache_index[b] + l` (the causal rule per row). With `valid_lengths [B]` only the
  first `valid_lengths[b]` tokens of row b are written (the rest are padding: not stored, their
  outputs unspecified); writes past the cache's last slot are dropped. A scalar `cache_index`
  keeps the one-slice write (`dynamic_update_slice`), a vector one scatters (`_write_rows`).
Positions come from the mask (`cumsum(mask) - 1`), so left-padded rows get positions 0, 1, ...
from their first real token, exactly as Hugging Face computes them from `attention_mask`.

Layer execution (`ModelConfig.scan_layers`, `ModelConfig.remat`): by default the blocks are
unrolled (`params["layer_i"]`, one compiled copy per layer). With `scan_layers` one block body runs
under `nn.scan` over stacked parameters (`params["layers"]`, leaves `[num_layers, ...]`) and a
stacked cache (`{"k", "v"}` of `[num_layers, B, K, S, E]`), so compile time does not grow with
depth; `stack_layers` / `unstack_layers` convert between the layouts. `remat` wraps each block in
`nn.remat` with a named `jax.checkpoint_policies` policy. Neither changes the computation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core.scope import CollectionFilter, PRNGSequenceFilter
from flax.typing import InOutScanAxis

from jaxrlhf.models.config import ACTIVATIONS, ModelConfig
from jaxrlhf.models.lora import LoraDense
from jaxrlhf.models.moe import MoE
from jaxrlhf.tuning import Tuning

Array = jax.Array
_MASKED = -1e30  # finite, so a row with no visible key gives a uniform softmax, not NaN


class ModelOutput(NamedTuple):
    logits: Array  # [B, L, V] float32 ([B, n, V] at the n positions of a `logits_positions` slice)
    hidden: Array  # [B, L, D] final (normalised) hidden states, for value heads
    cache: Any  # tuple of per-layer {"k", "v"} buffers (scanned: one stacked dict), or None
    # Mixture-of-experts models (`LanguageModel.forward`): `{"router_logits": [N, B, L, E],
    # "router_aux_loss": (), "router_z_loss": ()}` over the N MoE layers and the real tokens of
    # this call (`jaxrlhf.models.moe.router_losses`); None for dense models.
    aux: Any = None


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None):
    """Zeroed key/value buffers: one `{"k", "v"}` dict of `[B, K, S, E]` arrays per layer.

    Heads before slots: the attention dots then have their batch dimensions (B, K) leading, which
    XLA needs; a `[B, S, K, E]` buffer would be transposed (copied whole) at every decoding step.
    A scanned model (`config.scan_layers`) keeps one stacked dict `{"k", "v"}` of
    `[num_layers, B, K, S, E]` arrays instead, scanned over with the stacked parameters.
    """
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    if config.scan_layers:
        stacked = (config.num_layers,) + shape
        return {"k": jnp.zeros(stacked, dtype), "v": jnp.zeros(stacked, dtype)}
    return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_layers))


def grow_cache(cache, max_len: int):
    """The same cache with empty slots appended up to `max_len` (decoding in segments).

    Works on either layout: the slot axis is the second to last (`[..., S, E]`).
    """

    def grow(buffer_xSxE):
        pad = [(0, 0)] * buffer_xSxE.ndim
        pad[-2] = (0, max_len - buffer_xSxE.shape[-2])
        return jnp.pad(buffer_xSxE, pad)

    return jax.tree.map(grow, cache)


def cache_batch_axis(buffer_xBxKxSxE: Array) -> int:
    """The row axis of a cache buffer: 0 per layer (`[B, K, S, E]`), 1 stacked (`[layers, B, K, S, E]`)."""
    return buffer_xBxKxSxE.ndim - 4


def take_cache_rows(cache, rows: Array):
    """The cache of rows `rows` (`[R]` indices into the batch): row r is a copy of row `rows[r]`.

    Works on either layout. `generate` shares one prompt's prefill with its G responses this way.
    """
    return jax.tree.map(lambda buffer: jnp.take(buffer, rows, axis=cache_batch_axis(buffer)), cache)


def put_cache_prefix(cache, prefix, which: Array):
    """`cache` whose rows with `which[b]` true hold `prefix` in their first slots.

    `prefix` is a cache of the same rows and layout with `n <= S` slots; slots `[0, n)` of the
    chosen rows are replaced, every other slot and row is kept. The rollout engine inserts a
    waiting row's prompt into a freed decode slot this way.
    """

    def put(buffer, prefix_buffer):
        axis = cache_batch_axis(buffer)
        chosen = jnp.reshape(which, which.shape + (1,) * (buffer.ndim - axis - 1))
        old = jax.lax.slice_in_dim(buffer, 0, prefix_buffer.shape[-2], axis=buffer.ndim - 2)
        new = jnp.where(chosen, prefix_buffer.astype(buffer.dtype), old)
        return jax.lax.dynamic_update_slice_in_dim(buffer, new, 0, axis=buffer.ndim - 2)

    return jax.tree.map(put, cache, prefix)


def positions_from_mask(attention_mask: Array) -> Array:
    """Position of each slot counted over real tokens only: `cumsum(mask) - 1`, clipped at 0."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class Norm(nn.Module):
    """RMSNorm `x / sqrt(mean(x^2) + eps) * (offset + scale)` or LayerNorm, computed in float32
    (Gemma stores its RMSNorm weight w as `1 + w`: `offset=1`)."""

    kind: str
    eps: float
    param_dtype: Any = jnp.float32
    offset: float = 0.0

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        x32 = x.astype(jnp.float32)
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (dim,), self.param_dtype).astype(jnp.float32) + self.offset
        if self.kind == "rmsnorm":
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps) * scale
        else:
            mean = jnp.mean(x32, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
            bias = self.param("bias", nn.initializers.zeros, (dim,), self.param_dtype).astype(jnp.float32)
            y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(x.dtype)


def _dense(features, use_bias, cfg: ModelConfig, name, std=0.02):
    # `nn.Dense` plus a quantised kernel and LoRA adapters when given (`jaxrlhf.models.lora`).
    return LoraDense(
        features,
        use_bias=use_bias,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.initializers.normal(std),
        lora=cfg.lora,
        name=name,
    )


def apply_rope(x_BxLxHxE: Array, positions_BxL: Array, inv_freq, scale: float = 1.0) -> Array:
    """Rotary embedding, HF "rotate half" layout: `x * cos + rotate_half(x) * sin` on the first
    `2 * R/2` dims of each head (all of them unless the rotary embedding is partial, as in
    Phi-4-mini), the rest passed through; cos and sin are multiplied by `scale` (LongRoPE's
    attention factor). `inv_freq`: `[R/2]`, or `[B, L, R/2]` per token (LongRoPE)."""
    angles = positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, L, R/2]
    cos = jnp.cos(angles)[:, :, None, :] * scale
    sin = jnp.sin(angles)[:, :, None, :] * scale
    x = x_BxLxHxE.astype(jnp.float32)
    rotary = 2 * angles.shape[-1]
    x1, x2 = jnp.split(x[..., :rotary], 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rotary:]], axis=-1)
    return rotated.astype(x_BxLxHxE.dtype)


class LongRopePositions(NamedTuple):
    """A LongRoPE model's positions (`Transformer` passes these to its blocks instead of `[B, L]`
    positions): each token's position, and whether the sequence it belongs to is longer than the
    original context (`long_rope_flags`)."""

    positions: Array  # [B, L] int
    long: Array  # [B, L] bool


def long_rope_flags(original: int, positions_BxL: Array, segment_ids=None) -> Array:
    """`[B, L]`: whether each token is rotated with LongRoPE's long factors, per row.

    Phi-3 switches to the long factors once a sequence is longer than the original context
    (`length > original`). transformers decides this once per forward call for the whole batch
    (`max(position_ids) + 1`) and, when generation crosses the boundary, drops its KV cache and
    recomputes the whole sequence with the long factors. jaxrlhf decides it per sequence, so a
    row's outputs do not depend on the other rows of its batch (nor on packing or micro-batching):
    - without a cache: the row's length, `max_l positions[b, l] + 1` (per packed segment with
      `segment_ids`): the whole row uses one set of factors, as a forward of that row alone in
      transformers does;
    - with a cache (decoding): the length so far, `max_l positions[b, l] + 1` over this call's
      tokens (packed segments have no cache). The sampler recomputes a row's cache with the
      long factors at the step its length reaches `original + 1` (`jaxrlhf.sampling.generate`),
      which is transformers' reset done per row.
    """
    positions_BxL = jnp.asarray(positions_BxL)
    if segment_ids is not None:
        same_BxLxL = segment_ids[:, :, None] == segment_ids[:, None, :]
        length_BxL = jnp.max(jnp.where(same_BxLxL, positions_BxL[:, None, :], 0), axis=-1) + 1
    else:
        length_BxL = jnp.broadcast_to(jnp.max(positions_BxL, axis=1, keepdims=True) + 1, positions_BxL.shape)
    return length_BxL > original


def rope_frequencies(cfg: ModelConfig, positions, sliding) -> Array:
    """The inverse frequencies of one layer: the sliding layers' own (Gemma 3's local theta) where
    `sliding` (a Python bool, or a traced one in a scanned model), and per token LongRoPE's long
    factors where `positions` (`LongRopePositions`) says so (`[B, L, R/2]` then)."""
    inv_freq = jnp.asarray(cfg.rope_inv_freq())
    if isinstance(positions, LongRopePositions):
        inv_freq = jnp.where(positions.long[..., None], cfg.rope_inv_freq(long=True), inv_freq)
    if cfg.local_rope_theta is not None and sliding is not False:
        inv_freq = jnp.where(sliding, cfg.rope_inv_freq(sliding=True), inv_freq)
    return inv_freq


def sliding_window_mask(cache_index, L: int, S: int, window: int) -> Array:
    """`[L, S]`: query slot `cache_index + l` may see key slot s when `query - s < window`."""
    q_slots = cache_index + jnp.arange(L)
    return q_slots[:, None] - jnp.arange(S)[None, :] < window


def softcap(x: Array, cap: float | None) -> Array:
    """Gemma's soft-capping `cap * tanh(x / cap)` (identity when `cap` is None)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


class Attention(nn.Module):
    config: ModelConfig
    tuning: Tuning = Tuning()

    @nn.compact
    def __call__(
        self,
        x_BxLxD,
        positions_BxL,
        allowed_BxLxS,
        layer_cache,
        cache_index,
        cache_size=None,
        layer_index=None,
        sliding: Any = False,
    ):
        """`sliding`: whether this layer attends through `config.sliding_window` when the config
        has per-layer `layer_types` (a Python bool, or traced in a scanned model)."""
        cfg = self.config
        B, L, _ = x_BxLxD.shape
        H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = _dense(H * E, cfg.qkv_bias, cfg, "q")(x_BxLxD)
        k = _dense(K * E, cfg.qkv_bias, cfg, "k")(x_BxLxD)
        v = _dense(K * E, cfg.qkv_bias, cfg, "v")(x_BxLxD)
        q, k, v = _olmo_qkv(cfg, q, k, v)
        q, k, v = q.reshape(B, L, H, E), k.reshape(B, L, K, E), v.reshape(B, L, K, E)
        if cfg.qk_norm and cfg.qk_norm_per_head:  # Qwen3, Gemma 3: RMSNorm over each head's vector before rotary.
            q = Norm("rmsnorm", cfg.norm_eps, jnp.dtype(cfg.param_dtype), cfg.norm_weight_offset, name="q_norm")(q)
            k = Norm("rmsnorm", cfg.norm_eps, jnp.dtype(cfg.param_dtype), cfg.norm_weight_offset, name="k_norm")(k)
        if cfg.positions == "rope":
            inv_freq = rope_frequencies(cfg, positions_BxL, sliding)
            scale = cfg.rope_scaling[1] if cfg.is_longrope else 1.0  # pyright: ignore[reportOptionalSubscript]
            if isinstance(positions_BxL, LongRopePositions):
                positions_BxL = positions_BxL.positions
            q = apply_rope(q, positions_BxL, inv_freq, scale)
            k = apply_rope(k, positions_BxL, inv_freq, scale)
        if cfg.layer_types is not None and sliding is not False:  # this layer's window (Gemma 2/3)
            S, window_size = allowed_BxLxS.shape[-1], int(cfg.sliding_window or 0)
            if jnp.ndim(cache_index) == 2:  # per-row slots [B, L] (see `Transformer`)
                window = cache_index[:, :, None] - jnp.arange(S)[None, None, :] < window_size
            else:
                window = sliding_window_mask(cache_index, L, S, window_size)[None]
            allowed_BxLxS = allowed_BxLxS & (window | jnp.logical_not(sliding))

        new_keys_BxLxKxE, new_values_BxLxKxE = k, v
        # Keys and values as [B, K, S, E] (the cache layout, see `init_cache`).
        k = jnp.swapaxes(k, 1, 2)
        v = jnp.swapaxes(v, 1, 2)
        new_cache = None
        if layer_cache is not None and jnp.ndim(cache_index) == 2:
            # Per-row slots `cache_index [B, L]` (see `Transformer`): scatter, then read as below.
            new_cache = {
                "k": _write_rows(layer_cache["k"], new_keys_BxLxKxE, cache_index, layer_index),
                "v": _write_rows(layer_cache["v"], new_values_BxLxKxE, cache_index, layer_index),
            }
            if layer_index is not None:
                k = jax.lax.dynamic_index_in_dim(new_cache["k"], layer_index, 0, keepdims=False).astype(q.dtype)
                v = jax.lax.dynamic_index_in_dim(new_cache["v"], layer_index, 0, keepdims=False).astype(q.dtype)
            else:
                k, v = new_cache["k"].astype(q.dtype), new_cache["v"].astype(q.dtype)
        elif layer_cache is not None and layer_index is not None:
            # A scanned model's whole stacked cache [layers, B, K, S, E], carried through the scan:
            # write this layer's new slots in place, then read this layer's buffer.
            start = (layer_index, 0, 0, cache_index, 0)
            k_all = jax.lax.dynamic_update_slice(layer_cache["k"], k[None].astype(layer_cache["k"].dtype), start)
            v_all = jax.lax.dynamic_update_slice(layer_cache["v"], v[None].astype(layer_cache["v"].dtype), start)
            new_cache = {"k": k_all, "v": v_all}
            k = jax.lax.dynamic_index_in_dim(k_all, layer_index, 0, keepdims=False).astype(q.dtype)
            v = jax.lax.dynamic_index_in_dim(v_all, layer_index, 0, keepdims=False).astype(q.dtype)
        elif layer_cache is not None:
            start = (0, 0, cache_index, 0)
            k_all = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), start)
            v_all = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), start)
            new_cache = {"k": k_all, "v": v_all}
            k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
        elif cache_size is not None:  # prefill: a fresh cache holding these L tokens in slots [0, L)
            new_cache = grow_cache({"k": k, "v": v}, cache_size)

        # Grouped-query attention without repeating K/V: split H into K groups of G.
        G = H // K
        scores = dict(scale=_score_scale(cfg), cap=cfg.attn_logit_softcap)
        if L == 1 and G > 1 and self.tuning.decode_attention == "per_head":  # see `jaxrlhf.tuning`
            out = jnp.stack([_attend(q[:, :, g::G], k, v, allowed_BxLxS, **scores) for g in range(G)], axis=3)
        else:
            out = _attend(q.reshape(B, L, K, G, E), k, v, allowed_BxLxS, **scores)
        return _dense(cfg.hidden_size, cfg.o_bias, cfg, "o")(out.reshape(B, L, H * E)), new_cache


def _write_rows(buffer, new_BxLxKxE: Array, slots_BxL: Array, layer_index=None):
    """`buffer` (`[B, K, S, E]`, or a scanned model's `[layers, B, K, S, E]` at `layer_index`) with
    row b's token l written at slot `slots_BxL[b, l]`; slots outside `[0, S)` are not written.

    One scatter, updating the decode loop's carry in place as `dynamic_update_slice` does for a
    shared index. Per layer it is batched over the rows (`vmap`: a mesh that splits the rows splits
    the scatter, no communication). The stacked buffer takes explicit (layer, row, slot) indices:
    batching over its row axis 1 made XLA transpose the whole buffer at every layer, and slicing
    the layer out and back in copied it (a clearly slower step); there a mesh gathers each
    layer's new keys and values of all rows (small: L tokens per row).
    """
    new = new_BxLxKxE.astype(buffer.dtype)
    if layer_index is not None:
        rows = jnp.arange(slots_BxL.shape[0])[:, None]
        # Advanced indices split by a slice: the update's leading dimensions are theirs, [B, L].
        return buffer.at[layer_index, rows, :, slots_BxL, :].set(new, mode="drop")

    def write_row(row_KxSxE, new_LxKxE, slots_L):
        return row_KxSxE.at[:, slots_L, :].set(jnp.swapaxes(new_LxKxE, 0, 1), mode="drop")

    return jax.vmap(write_row)(buffer, new, slots_BxL)


def _olmo_qkv(cfg: ModelConfig, q, k, v):
    """OLMoE's RMSNorm over the whole q and k projections, and the q/k/v clipping to
    `[-clip_qkv, clip_qkv]`; the projections unchanged for every other family."""
    if cfg.qk_norm and not cfg.qk_norm_per_head:
        q = Norm("rmsnorm", cfg.norm_eps, jnp.dtype(cfg.param_dtype), cfg.norm_weight_offset, name="q_norm")(q)
        k = Norm("rmsnorm", cfg.norm_eps, jnp.dtype(cfg.param_dtype), cfg.norm_weight_offset, name="k_norm")(k)
    if cfg.clip_qkv is not None:
        q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    return q, k, v


def _score_scale(cfg: ModelConfig) -> float | None:
    """The attention scores' scale: `query_pre_attn_scalar ** -0.5` (Gemma), else None (1/sqrt(E))."""
    return None if cfg.query_pre_attn_scalar is None else float(cfg.query_pre_attn_scalar) ** -0.5


def _attend(
    q_BxLxKxGxE: Array,
    k_BxKxSxE: Array,
    v_BxKxSxE: Array,
    allowed_BxLxS: Array,
    scale: float | None = None,
    cap: float | None = None,
) -> Array:
    """`softmax(softcap(q k^T * scale) + mask) v` per key/value head and group member:
    `[B, L, K, G, E]`; `scale` defaults to 1/sqrt(E), `cap` (Gemma 2) to no soft-capping.

    A `[B, L, K, E]` query (one member per group) is accepted too and gives `[B, L, K, E]`.
    """
    grouped = q_BxLxKxGxE.ndim == 5
    q = q_BxLxKxGxE if grouped else q_BxLxKxGxE[..., None, :]
    scores = jnp.einsum("blkge,bkse->bkgls", q, k_BxKxSxE, preferred_element_type=jnp.float32)
    if scale is None:
        scores = scores / np.sqrt(q.shape[-1]).astype(np.float32)
    else:
        scores = scores * np.float32(scale)
    scores = softcap(scores, cap)
    scores = jnp.where(allowed_BxLxS[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxKxSxE.dtype)
    out = jnp.einsum("bkgls,bkse->blkge", probs, v_BxKxSxE)
    return out if grouped else out[..., 0, :]


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        act = ACTIVATIONS[cfg.activation]
        if cfg.mlp == "gated":
            gate = _dense(cfg.intermediate_size, cfg.mlp_bias, cfg, "gate")(x)
            up = _dense(cfg.intermediate_size, cfg.mlp_bias, cfg, "up")(x)
            return _dense(cfg.hidden_size, cfg.mlp_bias, cfg, "down")(act(gate) * up)
        hidden = act(_dense(cfg.intermediate_size, cfg.mlp_bias, cfg, "up")(x))
        return _dense(cfg.hidden_size, cfg.mlp_bias, cfg, "down")(hidden)


class Block(nn.Module):
    """One decoder block. `cache_size` is an attribute (not a call argument) so that the block can
    be wrapped in `nn.scan` / `nn.remat`, whose call arguments are all traced."""

    config: ModelConfig
    cache_size: int | None = None
    tuning: Tuning = Tuning()
    layer: int | None = None  # this block's layer number when unrolled (scanned: `layer_index`)

    @nn.compact
    def __call__(self, x, positions, allowed, layer_cache, cache_index, layer_index=None):
        """`layer_cache`: this layer's `{"k", "v"}` `[B, K, S, E]` buffers, or with `layer_index` the
        stacked `[layers, B, K, S, E]` ones of a scanned model (updated at that layer). A scanned
        block without a cache gets `layer_index` too (its layer type, see `_layer_is_sliding`)."""
        cfg = self.config
        pdt = jnp.dtype(cfg.param_dtype)
        attn_out, new_cache = Attention(cfg, self.tuning, name="attn")(
            Norm(cfg.norm, cfg.norm_eps, pdt, cfg.norm_weight_offset, name="attn_norm")(x),
            positions,
            allowed,
            layer_cache,
            cache_index,
            self.cache_size,
            layer_index,
            _layer_is_sliding(cfg, self.layer, layer_index),
        )
        if cfg.sandwich_norms:  # Gemma 2/3: the sublayer's output is normalised before the residual add
            attn_out = Norm(cfg.norm, cfg.norm_eps, pdt, cfg.norm_weight_offset, name="post_attn_norm")(attn_out)
        x = x + attn_out
        h = Norm(cfg.norm, cfg.norm_eps, pdt, cfg.norm_weight_offset, name="mlp_norm")(x)
        if cfg.is_moe and (self.layer is None or cfg.is_moe_layer(self.layer)):
            h = MoE(cfg, name="mlp")(h, _query_token_mask(allowed, cache_index))
        else:
            h = MLP(cfg, name="mlp")(h)
        if cfg.sandwich_norms:
            h = Norm(cfg.norm, cfg.norm_eps, pdt, cfg.norm_weight_offset, name="post_mlp_norm")(h)
        return x + h, new_cache


def _layer_is_sliding(cfg: ModelConfig, layer: int | None, layer_index):
    """Whether a layer attends through the sliding window, for configs with per-layer
    `layer_types`: a Python bool when the layer is known statically (unrolled, or every layer of
    one type), else traced from the scanned `layer_index`. False without `layer_types`."""
    if cfg.layer_types is None:
        return False
    flags = cfg.sliding_layers
    if len(set(flags)) == 1:
        return flags[0]
    if layer is not None:
        return flags[layer]
    if layer_index is None:
        raise ValueError("a scanned block with alternating layer types needs its layer_index")
    return jnp.asarray(flags)[layer_index]


def _query_token_mask(allowed_BxLxS: Array, cache_index) -> Array:
    """`[B, L]`: 1 for the real (not padding) tokens among the L queries, read off the attention
    mask at each query's own slot (a query always sees itself unless its slot is padding). With
    per-row slots (`cache_index [B, L]`, see `Transformer`) a padding token's slot is past the end."""
    B, L, S = allowed_BxLxS.shape
    if jnp.ndim(cache_index) == 2:
        slots_BxL = cache_index
    else:
        slots_BxL = jnp.broadcast_to(cache_index + jnp.arange(L), (B, L))
    seen = jnp.take_along_axis(allowed_BxLxS, jnp.clip(slots_BxL, 0, S - 1)[..., None], axis=2)[..., 0]
    return seen & (slots_BxL < S)


SCANNED_LAYERS = "layers"  # params key of the stacked blocks of a scanned model
# Scanned over the layer axis: the parameters and the LoRA adapters (leaves [num_layers, ...]);
# each layer draws its own adapter-dropout mask.
_SCANNED_COLLECTIONS: Mapping[CollectionFilter, InOutScanAxis] = {"params": 0, "lora": 0, "intermediates": 0}
_SCANNED_RNGS: Mapping[PRNGSequenceFilter, bool] = {"params": True, "lora_dropout": True}


def _remat_policy(name: str):
    return None if name == "full" else getattr(jax.checkpoint_policies, name)


def block_class(config: ModelConfig, scanned: bool = False):
    """`Block`, wrapped in `nn.remat` with the configured policy when `config.remat` is set."""
    if config.remat is None:
        return Block
    # Inside a scan the loop boundary already keeps XLA from merging the recomputation back into
    # the forward, so common-subexpression prevention (extra barriers) is not needed there.
    return nn.remat(Block, policy=_remat_policy(config.remat), prevent_cse=not scanned)


class Transformer(nn.Module):
    """Decoder-only LM. See the module docstring for the cache protocol; `tuning` holds the
    backend's speed-only choices (`jaxrlhf.tuning`), none of which changes the result."""

    config: ModelConfig
    tuning: Tuning = Tuning()

    @nn.compact
    def __call__(
        self,
        input_ids_BxL,
        attention_mask,
        positions_BxL=None,
        cache=None,
        cache_index=None,
        cache_size=None,
        logits_positions=None,
        valid_lengths=None,
        segment_ids=None,
    ):
        """`logits_positions`: a static `slice` of the L positions at which to apply the output
        layer (None: all). The `[B, L, V]` head matmul is often most of a short model's forward;
        a trainer that scores only the response needs it at those positions alone. `hidden` is
        returned at all L positions either way.

        `cache_index`: the first cache slot of the L tokens, a scalar (every row) or a `[B]` vector
        (row b's own slot: per-row decoding); `valid_lengths [B]` (vector `cache_index` only): row
        b writes only its first `valid_lengths[b]` tokens into the cache (module docstring).

        `segment_ids` (`[B, L]` int, no cache): packed rows (`jaxrlhf.packing`): a token attends
        only to earlier tokens of its own segment (id > 0); pass each token's `positions` within
        its segment too."""
        cfg = self.config
        B, L = input_ids_BxL.shape
        dtype, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        per_row = cache is not None and cache_index is not None and jnp.ndim(cache_index) == 1
        if valid_lengths is not None and not per_row:
            raise ValueError("valid_lengths needs a cache and a per-row cache_index ([B] vector)")
        if cache is None:
            cache_index = 0
            q_slots = jnp.arange(L)
        elif cache_index is None:
            raise ValueError("a forward with a cache needs cache_index, the first cache slot of these tokens")
        elif not per_row:
            q_slots = cache_index + jnp.arange(L)
        S = attention_mask.shape[1]
        key_mask = attention_mask.astype(bool)
        # Slot order equals position order for left-padded rows, so slot distance is token distance.
        k_slots = jnp.arange(S)
        if per_row:
            q_slots_BxL = jnp.asarray(cache_index, jnp.int32)[:, None] + jnp.arange(L, dtype=jnp.int32)
            if positions_BxL is None:
                slots = jnp.clip(q_slots_BxL, 0, S - 1)
                positions_BxL = jnp.take_along_axis(positions_from_mask(attention_mask), slots, axis=1)
            allowed_BxLxS = k_slots[None, None, :] <= q_slots_BxL[:, :, None]
            if cfg.sliding_window is not None and cfg.layer_types is None:  # per-layer windows: see `Attention`
                allowed_BxLxS &= q_slots_BxL[:, :, None] - k_slots[None, None, :] < cfg.sliding_window
            allowed_BxLxS &= key_mask[:, None, :]
            # The attention layers scatter token l of row b to slot q_slots_BxL[b, l]; padding
            # tokens (l >= valid_lengths[b]) get distinct slots past the end, which are dropped.
            if valid_lengths is not None:
                padding = jnp.arange(L)[None, :] >= jnp.asarray(valid_lengths)[:, None]
                q_slots_BxL = jnp.where(padding, S + jnp.arange(L, dtype=jnp.int32)[None, :], q_slots_BxL)
            cache_index = q_slots_BxL
        else:
            if positions_BxL is None:
                positions_BxL = jax.lax.dynamic_slice_in_dim(
                    positions_from_mask(attention_mask), cache_index, L, axis=1
                )
            allowed_LxS = k_slots[None, :] <= q_slots[:, None]
            if cfg.sliding_window is not None and cfg.layer_types is None:  # per-layer windows: see `Attention`
                allowed_LxS &= q_slots[:, None] - k_slots[None, :] < cfg.sliding_window
            allowed_BxLxS = allowed_LxS[None] & key_mask[:, None, :]
        if segment_ids is not None:  # packed rows: no attention across segments
            if cache is not None:
                raise ValueError("segment_ids (packed rows) are for a forward without a cache")
            allowed_BxLxS &= (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=pdt,
            embedding_init=nn.initializers.normal(0.02),
            name="embed",
        )
        x = embed(input_ids_BxL)
        if cfg.embed_scale:  # Gemma: embeddings times sqrt(D), the factor rounded to the weights' dtype
            x = x * jnp.asarray(np.sqrt(cfg.hidden_size), pdt).astype(dtype)
        if cfg.positions == "learned":
            pos_embed = nn.Embed(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                dtype=dtype,
                param_dtype=pdt,
                embedding_init=nn.initializers.normal(0.01),
                name="pos_embed",
            )
            x = x + pos_embed(jnp.minimum(positions_BxL, cfg.max_position_embeddings - 1))

        block_positions = positions_BxL
        if cfg.is_longrope and cfg.rope_scaling is not None:  # per-row short/long factors (`long_rope_flags`)
            long_BxL = long_rope_flags(cfg.rope_scaling[4], positions_BxL, segment_ids)
            block_positions = LongRopePositions(positions_BxL, long_BxL)

        if cfg.scan_layers and cache is None:
            # One block body scanned over `params["layers"]` (leaves [num_layers, ...]); the hidden
            # state is the carry, and a prefill's fresh per-layer caches stack up as the outputs.
            scanned = nn.scan(
                block_class(cfg, scanned=True),
                variable_axes=_SCANNED_COLLECTIONS,
                split_rngs=_SCANNED_RNGS,
                # flax leaves `in_axes` unannotated, so its default 0 types it as int; a tuple is valid.
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, 0),  # pyright: ignore[reportArgumentType]
                length=cfg.num_layers,
            )
            x, new_cache = scanned(cfg, cache_size, self.tuning, name=SCANNED_LAYERS)(
                x, block_positions, allowed_BxLxS, cache, cache_index, jnp.arange(cfg.num_layers)
            )
        elif cfg.scan_layers:
            # Decoding: the whole stacked cache rides in the carry and each layer updates its new
            # slots in place (scanning over it as inputs/outputs would copy it every step).
            def body(block, carry, layer_index, positions, allowed, index):
                h, stacked = carry
                h, stacked = block(h, positions, allowed, stacked, index, layer_index)
                return (h, stacked), None

            scanned = nn.scan(
                body,
                variable_axes=_SCANNED_COLLECTIONS,
                split_rngs=_SCANNED_RNGS,
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),  # pyright: ignore[reportArgumentType] (as above)
                length=cfg.num_layers,
            )
            block = block_class(cfg, scanned=True)(cfg, cache_size, self.tuning, name=SCANNED_LAYERS)
            (x, new_cache), _ = scanned(
                block, (x, cache), jnp.arange(cfg.num_layers), block_positions, allowed_BxLxS, cache_index
            )
        else:
            block = block_class(cfg)
            new_cache = []
            for i in range(cfg.num_layers):
                layer_cache = None if cache is None else cache[i]
                x, layer_new_cache = block(cfg, cache_size, self.tuning, layer=i, name=f"layer_{i}")(
                    x, block_positions, allowed_BxLxS, layer_cache, cache_index
                )
                new_cache.append(layer_new_cache)
            new_cache = tuple(new_cache)
        hidden = Norm(cfg.norm, cfg.norm_eps, pdt, cfg.norm_weight_offset, name="final_norm")(x)
        head_input = hidden if logits_positions is None else hidden[:, logits_positions]

        if cfg.tie_word_embeddings and not self.has_variable("params", DECODE_HEAD):
            logits = head_logits(cfg, head_input, embed.embedding, vocab_first=True)
        elif cfg.tie_word_embeddings:  # the embedding's [D, V] copy made by `decoding_params`
            logits = head_logits(cfg, head_input, self.get_variable("params", DECODE_HEAD), vocab_first=False)
        else:
            head_DxV = self.param("lm_head", nn.initializers.normal(0.02), (cfg.hidden_size, cfg.vocab_size), pdt)
            logits = head_logits(cfg, head_input, head_DxV, vocab_first=False)
        return ModelOutput(logits, hidden, None if cache is None and cache_size is None else new_cache)


def head_logits(config: ModelConfig, hidden_xD: Array, head: Array, vocab_first: bool) -> Array:
    """The output layer: float32 logits `[..., V]` of final hidden states `[..., D]` and a head
    matrix (`[V, D]` when `vocab_first`: the tied embedding table; else `[D, V]`), soft-capped
    (Gemma 2: `cap * tanh(logits / cap)`). In float32 whatever the compute dtype: log-probs and the
    PPO ratio need them exact."""
    spec = "...d,vd->...v" if vocab_first else "...d,dv->...v"
    logits = jnp.einsum(spec, hidden_xD, head.astype(jnp.dtype(config.dtype)), preferred_element_type=jnp.float32)
    return softcap(logits, config.final_logit_softcap)


def output_layer(config: ModelConfig, params: Mapping, hidden_xD: Array) -> Array:
    """The forward's output layer alone, from its parameters: `Transformer`'s logits at hidden
    states `[..., D]` (`ModelOutput.hidden`, e.g. a subset of positions gathered by a caller that
    needs the head at those only). `params` are the plain parameters (either layer layout, with or
    without `decoding_params`' transposed tied head)."""
    if config.tie_word_embeddings and DECODE_HEAD not in params:
        return head_logits(config, hidden_xD, params["embed"]["embedding"], vocab_first=True)
    head_DxV = params[DECODE_HEAD] if config.tie_word_embeddings else params["lm_head"]
    return head_logits(config, hidden_xD, head_DxV, vocab_first=False)


DECODE_HEAD = "decode_head"


_PORTABLE_TUNING = Tuning()


def decoding_params(config: ModelConfig, params: dict, tuning: Tuning = _PORTABLE_TUNING) -> dict:
    """Parameters for a decoding loop: with `tuning.decode_head == "transposed"` a tied output
    layer gets a `[D, V]` copy of the `[V, D]` embedding table.

    `generate` makes this copy once per call, outside its loop (XLA:CPU multiplies a few rows by
    the `[D, V]` layout 1.2-2.4x faster, see `jaxrlhf.tuning`). Otherwise (or untied) the
    parameters are returned as they are.
    """
    if not config.tie_word_embeddings or tuning.decode_head != "transposed" or DECODE_HEAD in params:
        return params
    return {**params, DECODE_HEAD: jnp.transpose(params["embed"]["embedding"])}


def init_params(config: ModelConfig, key: Array) -> dict:
    """Random parameters (GPT-2-style normal(0.02) init) for training a model from scratch."""
    ids = jnp.zeros((1, 2), jnp.int32)
    variables = Transformer(config).init(key, ids, jnp.ones((1, 2), jnp.int32))
    return cast(dict, variables["params"])  # Linen returns plain dicts (flax's frozen dicts are off by default)


# ----------------------------------------------------------------------------------------------
# Per-layer <-> stacked parameter layouts


def _layer_keys(params) -> list[str]:
    keys = [k for k in params if k.startswith("layer_") and k[len("layer_") :].isdigit()]
    return sorted(keys, key=lambda k: int(k[len("layer_") :]))


def is_stacked(params) -> bool:
    """Whether `params` has the scanned layout (`params["layers"]`, leaves `[num_layers, ...]`)."""
    return SCANNED_LAYERS in params


def stack_layers(params) -> dict:
    """Per-layer parameters (`layer_0`, `layer_1`, ...) -> the scanned layout: one `layers` subtree
    whose leaves are the layers' leaves stacked on a new leading axis. Other entries are kept.
    Already stacked parameters are returned unchanged."""
    if is_stacked(params):
        return params
    keys = _layer_keys(params)
    if not keys:
        raise ValueError("no layer_<i> entries to stack")
    if [int(k[len("layer_") :]) for k in keys] != list(range(len(keys))):
        raise ValueError(f"layer entries are not layer_0 .. layer_{len(keys) - 1}: {keys}")
    out = {k: v for k, v in params.items() if k not in keys}
    out[SCANNED_LAYERS] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[params[k] for k in keys])
    return out


def unstack_layers(params) -> dict:
    """Inverse of `stack_layers`: the `layers` subtree split into `layer_0`, `layer_1`, ...
    (the layout of an unscanned model and of HF checkpoints). Per-layer parameters are returned
    unchanged."""
    if not is_stacked(params):
        return params
    stacked = params[SCANNED_LAYERS]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != SCANNED_LAYERS}
    for i in range(num_layers):
        out[f"layer_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
    return out


def unstack_cache(cache) -> tuple:
    """A stacked cache (`{"k", "v"}` of `[L, B, K, S, E]`) as the per-layer tuple layout."""
    if isinstance(cache, tuple):
        return cache
    num_layers = cache["k"].shape[0]
    return tuple({"k": cache["k"][i], "v": cache["v"][i]} for i in range(num_layers))


def stack_cache(cache) -> dict:
    """A per-layer cache tuple as one stacked `{"k", "v"}` dict (the scanned model's layout)."""
    if isinstance(cache, dict):
        return cache
    return {"k": jnp.stack([c["k"] for c in cache]), "v": jnp.stack([c["v"] for c in cache])}
