"""The layout of a prompt and its response as one token sequence (docs/design.md, "Arrays").

Prompts are left-padded ``[B, P]`` and responses right-padded ``[B, N]``, so writing them side by
side gives ``[B, P + N]`` rows whose real tokens are contiguous between padding on the left and on
the right: what a causal LM (positions ``cumsum(mask) - 1``), a reward model or a judge reads.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def concat_prompt_response(
    prompt_ids: chex.Array, prompt_mask: chex.Array, response_ids: chex.Array, response_mask: chex.Array
) -> tuple[jax.Array, jax.Array]:
    """``(ids_BxL, mask_BxL)``, int32, ``L = P + N``: each prompt row followed by its response row."""
    chex.assert_rank([prompt_ids, prompt_mask, response_ids, response_mask], 2)
    chex.assert_equal_shape([prompt_ids, prompt_mask])
    chex.assert_equal_shape([response_ids, response_mask])
    ids_BxL = jnp.concatenate([prompt_ids, response_ids], axis=1).astype(jnp.int32)
    mask_BxL = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32)
    return ids_BxL, mask_BxL
