"""Sequence packing (jaxrlhf.packing): next-fit placement, pack/unpack round trips, the segment
attention mask, all under jit with static shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import packing


def _spans(seed, B=9, L=12):
    rng = np.random.default_rng(seed)
    start = rng.integers(0, 5, B)
    length = np.minimum(rng.integers(0, 9, B), L - start)
    length[2] = 0  # an empty row
    return start, length


def _next_fit_reference(length, pack_len):
    pack, used, packs, offsets = 0, 0, [], []
    for n in length:
        if used + n > pack_len and used > 0:
            pack, used = pack + 1, 0
        packs.append(pack)
        offsets.append(used)
        used += n
    return packs, offsets, pack + (used > 0)


@pytest.mark.parametrize("seed", range(4))
def test_next_fit_matches_a_python_loop(seed):
    _, length = _spans(seed)
    pack_B, offset_B, num_packs = jax.jit(packing.next_fit, static_argnums=1)(jnp.asarray(length), 10)
    packs, offsets, needed = _next_fit_reference(length, 10)
    assert np.asarray(pack_B).tolist() == packs and np.asarray(offset_B).tolist() == offsets
    assert int(num_packs) == needed


@pytest.mark.parametrize("seed", range(4))
def test_pack_then_unpack_restores_every_real_token(seed):
    start, length = _spans(seed)
    B, L = len(start), 12
    layout = jax.jit(packing.pack_layout, static_argnums=(2, 3))(jnp.asarray(start), jnp.asarray(length), 8, 10)
    x = jnp.asarray(np.random.default_rng(seed).integers(1, 1000, (B, L)))
    packed = packing.pack(x, layout)
    restored = packing.unpack(packed, layout, L, fill=-1)
    span = (np.arange(L)[None] >= start[:, None]) & (np.arange(L)[None] < (start + length)[:, None])
    np.testing.assert_array_equal(np.asarray(restored), np.where(span, np.asarray(x), -1))
    # Packed tokens: the real ones (counted once each), padding elsewhere; positions restart per row.
    segment = np.asarray(layout.segment_KxT)
    assert (segment > 0).sum() == length.sum()
    assert np.all(np.asarray(packed)[segment == 0] == 0)
    for b in range(B):
        if length[b]:
            k, o = int(layout.pack_B[b]), int(layout.offset_B[b])
            np.testing.assert_array_equal(np.asarray(layout.position_KxT)[k, o : o + length[b]], np.arange(length[b]))
            np.testing.assert_array_equal(
                np.asarray(packed)[k, o : o + length[b]], np.asarray(x)[b, start[b] : start[b] + length[b]]
            )


def test_trailing_feature_axes_pack_and_unpack():
    start, length = _spans(7)
    layout = packing.pack_layout(jnp.asarray(start), jnp.asarray(length), 8, 10)
    x = jnp.arange(len(start) * 12 * 3, dtype=jnp.float32).reshape(len(start), 12, 3)
    restored = packing.unpack(packing.pack(x, layout), layout, 12)
    span = (np.arange(12)[None] >= start[:, None]) & (np.arange(12)[None] < (start + length)[:, None])
    np.testing.assert_array_equal(np.asarray(restored), np.where(span[..., None], np.asarray(x), 0))


def test_segment_mask_is_causal_within_a_row_and_blocks_across_rows():
    segment = jnp.asarray([[1, 1, 2, 2, 2, 0]])
    allowed = np.asarray(packing.segment_attention_mask(segment))[0]
    expected = np.zeros((6, 6), bool)
    expected[0, 0] = expected[1, :2] = True
    expected[2, 2] = expected[3, 2:4] = expected[4, 2:5] = True
    np.testing.assert_array_equal(allowed, expected)


def test_rows_that_do_not_fit_are_reported_not_silently_packed():
    length = jnp.asarray([6, 6, 6, 6])
    layout = packing.pack_layout(jnp.zeros(4, jnp.int32), length, 2, 10)  # needs 4 packs, has 2
    assert int(layout.num_packs) == 4
    restored = packing.unpack(packing.pack(jnp.ones((4, 6), jnp.int32), layout), layout, 6, fill=0)
    np.testing.assert_array_equal(np.asarray(restored).sum(1), [6, 6, 0, 0])
