"""Sequence packing: the real tokens of many rows in few fixed-length sequences, under static shapes.

A batch of rows ``[B, L]`` where each row's real tokens are one contiguous span (a left-padded
prompt followed by its response: columns ``[start_b, start_b + length_b)``) wastes the padding's
compute in every forward. Packing copies the spans, one after another, into ``K`` sequences of
``T`` tokens ("packs"):

    pack k:  [row 3's tokens | row 4's tokens | row 5's tokens | padding]
    segment:  1 1 1 1 1 1 1   2 2 2 2 2 2       3 3 3 3           0 0 0
    position: 0 1 2 3 4 5 6   0 1 2 3 4 5       0 1 2 3           0 0 0

``segment_ids`` (1, 2, ... within a pack; 0 for padding) block attention across rows and
``positions`` restart at 0 for every row, so a causal forward over a pack computes, for each
row, what a forward over that row alone computes (up to float rounding: the attention sums run
over other lengths). Rows are placed by *next fit* in row order: row b goes into the current pack
if it fits, else it opens the next one. Every row fits one pack when ``T >= max_b length_b``.

Shapes are static (``K``, ``T``); how many packs a batch needs (``num_packs``) is data, so a
caller loops over the packs in use (a `lax.while_loop` of micro-batches) or takes ``K`` large
enough for every batch. Everything here is pure and jit-compatible.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax import lax


class PackLayout(NamedTuple):
    """Where each row went and what each packed position holds (all int32).

    Attributes:
      pack_B: ``[B]`` the pack of row b (K or more if it did not fit in K packs; see ``num_packs``).
      offset_B: ``[B]`` the pack position of row b's first real token.
      start_B: ``[B]`` the column of row b's first real token in the source array.
      length_B: ``[B]`` row b's real tokens.
      row_KxT: ``[K, T]`` the source row of each packed position (0 where ``segment == 0``).
      column_KxT: ``[K, T]`` its source column (0 where ``segment == 0``).
      segment_KxT: ``[K, T]`` 1 + the row's rank within its pack; 0 for padding.
      position_KxT: ``[K, T]`` the token's position within its row (0, 1, ...; 0 for padding).
      num_packs: scalar, packs the batch needs (may exceed K: then rows ``pack_B >= K`` are lost).
    """

    pack_B: jax.Array
    offset_B: jax.Array
    start_B: jax.Array
    length_B: jax.Array
    row_KxT: jax.Array
    column_KxT: jax.Array
    segment_KxT: jax.Array
    position_KxT: jax.Array
    num_packs: jax.Array


def next_fit(length_B: chex.Array, pack_len: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Next-fit placement of rows of ``length_B`` tokens, in order, into packs of ``pack_len``.

    Returns ``(pack_B, offset_B, num_packs)``: row b opens a new pack when it does not fit behind
    the rows already in the current one. An empty row (length 0) takes no room.
    """
    chex.assert_rank(length_B, 1)
    length_B = jnp.asarray(length_B, jnp.int32)

    def place(carry, length):
        pack, used = carry
        opens = (used + length > pack_len) & (used > 0)
        pack = jnp.where(opens, pack + 1, pack)
        offset = jnp.where(opens, 0, used)
        return (pack, offset + length), (pack, offset)

    (last_pack, last_used), (pack_B, offset_B) = lax.scan(place, (jnp.int32(0), jnp.int32(0)), length_B)
    num_packs = jnp.where(last_used > 0, last_pack + 1, last_pack)
    return pack_B, offset_B, num_packs


def pack_layout(start_B: chex.Array, length_B: chex.Array, num_packs: int, pack_len: int) -> PackLayout:
    """The `PackLayout` of rows whose real tokens are columns ``[start_b, start_b + length_b)``,
    next-fit into ``num_packs`` (K) packs of ``pack_len`` (T) tokens.

    Each packed position finds its row by a search over the rows' global offsets
    (``pack_b * T + offset_b``, non-decreasing in b), so the layout costs ``O(K T log B)``.
    """
    chex.assert_rank([start_B, length_B], 1)
    start_B = jnp.asarray(start_B, jnp.int32)
    length_B = jnp.asarray(length_B, jnp.int32)
    pack_B, offset_B, needed = next_fit(length_B, pack_len)
    flat_start_B = pack_B * pack_len + offset_B  # global position of each row's first token
    flat = jnp.arange(num_packs * pack_len, dtype=jnp.int32)
    # The row holding a position: the last row (with tokens) starting at or before it.
    starts_for_search = jnp.where(length_B > 0, flat_start_B, jnp.iinfo(jnp.int32).max)
    order = jnp.argsort(starts_for_search, stable=True)
    row = order[jnp.clip(jnp.searchsorted(starts_for_search[order], flat, side="right") - 1, 0, None)]
    within = flat - flat_start_B[row]
    valid = (within >= 0) & (within < length_B[row]) & (length_B[row] > 0)
    # Segment ids: 1 + the row's rank among the rows of its pack (rows of a pack are consecutive).
    first_row_of_pack = jnp.searchsorted(pack_B, pack_B, side="left").astype(jnp.int32)
    rank_B = jnp.arange(length_B.shape[0], dtype=jnp.int32) - first_row_of_pack
    shape = (num_packs, pack_len)
    return PackLayout(
        pack_B=pack_B,
        offset_B=offset_B,
        start_B=start_B,
        length_B=length_B,
        row_KxT=jnp.where(valid, row, 0).reshape(shape),
        column_KxT=jnp.where(valid, start_B[row] + within, 0).reshape(shape),
        segment_KxT=jnp.where(valid, rank_B[row] + 1, 0).reshape(shape),
        position_KxT=jnp.where(valid, within, 0).reshape(shape),
        num_packs=needed,
    )


def pack(x_BxL: chex.Array, layout: PackLayout, fill=0) -> jax.Array:
    """``x [B, L, ...]`` -> ``[K, T, ...]``: each packed position holds its source token; ``fill``
    where ``segment == 0``."""
    gathered = x_BxL[layout.row_KxT, layout.column_KxT]
    valid = (layout.segment_KxT > 0).reshape(layout.segment_KxT.shape + (1,) * (gathered.ndim - 2))
    return jnp.where(valid, gathered, jnp.asarray(fill, gathered.dtype))


def unpack(y_KxT: chex.Array, layout: PackLayout, num_columns: int, fill=0) -> jax.Array:
    """The inverse of `pack`: ``y [K, T, ...]`` -> ``[B, L, ...]`` with ``L = num_columns``; each
    source token gets the value at its packed position, ``fill`` outside the rows' spans (and for
    rows that did not fit in the K packs)."""
    batch = layout.length_B.shape[0]
    column_L = jnp.arange(num_columns, dtype=jnp.int32)
    within_BxL = column_L[None, :] - layout.start_B[:, None]
    valid_BxL = (within_BxL >= 0) & (within_BxL < layout.length_B[:, None]) & (layout.pack_B[:, None] < y_KxT.shape[0])
    pack_BxL = jnp.broadcast_to(jnp.minimum(layout.pack_B, y_KxT.shape[0] - 1)[:, None], (batch, num_columns))
    position_BxL = jnp.clip(layout.offset_B[:, None] + within_BxL, 0, y_KxT.shape[1] - 1)
    gathered = y_KxT[pack_BxL, position_BxL]
    valid = valid_BxL.reshape(valid_BxL.shape + (1,) * (gathered.ndim - 2))
    return jnp.where(valid, gathered, jnp.asarray(fill, gathered.dtype))


def segment_attention_mask(segment_KxT: chex.Array) -> jax.Array:
    """``[K, T, T]`` bool: query t may attend to key s iff ``s <= t`` and both are real tokens of
    the same row (``segment[t] == segment[s] > 0``)."""
    T = segment_KxT.shape[-1]
    causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
    same = segment_KxT[:, :, None] == segment_KxT[:, None, :]
    return causal[None] & same & (segment_KxT[:, None, :] > 0)
