"""The rollout engine: per-row decode state in S refilled slots (continuous batching), in one jit.

`jaxrlhf.sampling.generate` decodes a static batch: all B rows step together until the longest
one stops, so with long-tailed response lengths most row-steps compute padding. Here S decode
slots serve B >= S rows. Each slot holds one row in its own state (`SlotState`: token index,
position, cache write slot, done); a step feeds every slot's last token at that slot's own cache
index and samples its next token; when a slot's row ends (EOS or the budget N) the slot takes the
next waiting row, until all B rows are done. Shapes are static (S slots, B rows, N tokens), so it
is one `lax.while_loop`, inside any jit, the fused PPO step and a sweep's vmap.

**Prefill once per prompt, up front.** The `B / G` distinct prompts are prefilled in one batched
forward before the loop (`generate`), the G rows of a prompt share that cache, and a row entering
a slot gets its prompt's cache copied into the slot's first `P - 1` cache slots
(`put_cache_prefix`). The alternative, prefilling a waiting row's prompt in chunks interleaved with
the others' decoding, would make every decoding step as wide as a chunk for every slot (static
shapes) and compute each row's prompt attention in a different order than the static sampler;
the up-front prefill is the most efficient shape for the prompt tokens (one large matrix product)
and gives the very arithmetic of the static sampler. Its cost: the `B / G` prompt caches are held
beside the S slots' caches for the whole loop.

**The same samples as the static sampler.** Each row keeps the layout it has in the static
batch: its left-padded prompt at slots `[0, P - 1)`, response token t's input at slot `P - 1 + t`,
its positions and attention mask unchanged. Randomness is addressed by (row, token index), never
by slot or step: token t of row b uses `uniforms[t, b]` of the call's one up-front draw. So a
row's tokens, log-probs and mask do not depend on which slot served it, when, or beside which
rows, as far as the backend's arithmetic for one row does not depend on the batch around it
(docs/sampling.md "The rollout engine" says where XLA:CPU's does).

**Groups of slots.** With `slot_groups = D` (the data-parallel devices) the rows and the slots
are cut into D contiguous groups and a group's slots serve only the group's rows, so on a mesh
every refill reads its rows, its prompt caches and writes its outputs on its own device (the
bookkeeping runs `vmap`ped over the groups, which GSPMD splits along the batch).

Per-row state is also the basis of multi-turn episodes: a slot may feed `L > 1` tokens at once
(`LanguageModel.forward` with a `[B]` `cache_index` and `valid_lengths`), e.g. an action's last
token followed by an environment's observation, written after it in the same row's cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxrlhf.models.transformer import cache_batch_axis

Array = jax.Array


class SlotState(NamedTuple):
    """Per-row decode state of S slots (every field `[S, ...]`): slot s holds row `row[s]`.

    Row `row[s]` next feeds `last_token[s]` (its response token `token_index - 1`, or its last
    prompt token when `token_index == 0`) at cache slot `P - 1 + token_index` and position
    `last_prompt_position + token_index`, and samples its response token `token_index`.
    """

    row: Array  # [S] int32: the row the slot serves (meaningless while done)
    token_index: Array  # [S] int32: t, the response token sampled next
    last_token: Array  # [S] int32: the token fed next
    last_prompt_position: Array  # [S] int32: position of the row's last prompt token (real length - 1)
    key_mask: Array  # [S, P - 1 + N] int32: the row's prompt mask, then 1s (causality hides unwritten slots)
    done: Array  # [S] bool: the slot's row has ended (or it never got one): it waits for a refill
    cache: Any  # the model's KV cache, S rows of P - 1 + N slots


class RowPrompts(NamedTuple):
    """What a row needs when it enters a slot, per row (`[B, ...]`)."""

    prompt_index: Array  # [B] int32: its prompt's row in the prompt cache (row // G)
    last_token: Array  # [B] int32: the last prompt token
    last_prompt_position: Array  # [B] int32
    key_mask: Array  # [B, P - 1 + N] int32


def row_prompts(prompt_ids: Array, prompt_mask: Array, num_generations: int, num_new: int) -> RowPrompts:
    """`RowPrompts` of the `B = B' * G` rows of `B'` left-padded prompts, G consecutive rows each."""
    num_prompts, prompt_len = prompt_ids.shape
    prompt_index = jnp.arange(num_prompts * num_generations, dtype=jnp.int32) // num_generations
    mask = jnp.take(prompt_mask, prompt_index, axis=0)
    key_mask = jnp.concatenate([mask, jnp.ones((mask.shape[0], num_new - 1), jnp.int32)], axis=1)
    return RowPrompts(
        prompt_index=prompt_index,
        last_token=jnp.take(prompt_ids[:, -1], prompt_index),
        last_prompt_position=jnp.maximum(jnp.sum(mask, axis=1) - 1, 0),
        key_mask=key_mask,
    )


def _grouped(fn: Callable, groups: int, *arrays):
    """`fn` applied to each of `groups` contiguous groups of `arrays` (split along axis 0), the
    results concatenated back; `fn` sees its group index and the group's arrays.

    With one group `fn` runs on the whole arrays; otherwise it is `vmap`ped over the groups, so
    its gathers and scatters are batched over the group axis and stay on each device of a mesh.
    """
    if groups == 1:
        return fn(jnp.int32(0), *arrays)
    split = [x.reshape((groups, x.shape[0] // groups) + x.shape[1:]) for x in arrays]
    out = jax.vmap(fn)(jnp.arange(groups, dtype=jnp.int32), *split)
    return jax.tree.map(lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), out)


def _take_prompt_caches(model, prompt_cache, prompt_index: Array, groups: int):
    """The prompt caches of `prompt_index [S]` (slot s's prompt), one cache row per slot.

    When the prompts split evenly over the groups, slot group g only reads group g's prompts
    (rows of a group belong to the group's prompts), so the gather runs per group.
    """
    first = jax.tree.leaves(prompt_cache)[0]
    num_prompts = first.shape[cache_batch_axis(first)]
    if groups == 1 or num_prompts % groups:
        return model.take_cache_rows(prompt_cache, prompt_index)
    per_group = num_prompts // groups
    local = prompt_index.reshape(groups, -1) % per_group

    def take(buffer):
        axis = cache_batch_axis(buffer)
        split = buffer.reshape(buffer.shape[:axis] + (groups, per_group) + buffer.shape[axis + 1 :])
        taken = jax.vmap(lambda b, i: jnp.take(b, i, axis=axis), in_axes=(axis, 0), out_axes=axis)(split, local)
        return taken.reshape(buffer.shape[:axis] + (prompt_index.shape[0],) + buffer.shape[axis + 1 :])

    return jax.tree.map(take, prompt_cache)


def _refill(model, state: SlotState, next_row: Array, rows: RowPrompts, prompt_cache, groups: int):
    """Every done slot takes the next waiting row of its group (in row order), if any.

    In a group with rows `[0, R)` and `next_row` waiting first, the k-th done slot (slot order)
    takes row `next_row + k` while that is `< R`. A taken row starts at token 0 with its prompt's
    cache in the slot's first `P - 1` cache slots; the slot's later cache slots keep the previous
    row's keys, which its causal rule never reads before overwriting them.
    """
    num_rows = rows.prompt_index.shape[0]
    rows_per_group = num_rows // groups

    def assign(group, done, next_local):  # next_local: [1], this group's first waiting row
        free_before = jnp.cumsum(done.astype(jnp.int32)) - done.astype(jnp.int32)
        candidate = next_local + free_before
        takes = done & (candidate < rows_per_group)
        new_row = group * rows_per_group + jnp.minimum(candidate, rows_per_group - 1)
        return new_row, takes, next_local + jnp.sum(takes.astype(jnp.int32))

    new_row, takes, next_row = _grouped(assign, groups, state.done, next_row)

    def gather(table, index, g):  # table [B, ...] of rows; `index` global row ids of this group
        return jnp.take(table, index - g * rows_per_group, axis=0)

    def per_row(table):
        return _grouped(lambda g, t, i: gather(t, i, g), groups, table, new_row)

    def pick(new, old):
        return jnp.where(takes.reshape(takes.shape + (1,) * (old.ndim - 1)), new, old)

    cache = state.cache
    if prompt_cache is not None:
        prompt_caches = _take_prompt_caches(model, prompt_cache, per_row(rows.prompt_index), groups)
        cache = model.put_cache_prefix(cache, prompt_caches, takes)
    state = SlotState(
        row=jnp.where(takes, new_row, state.row),
        token_index=jnp.where(takes, 0, state.token_index),
        last_token=pick(per_row(rows.last_token), state.last_token),
        last_prompt_position=pick(per_row(rows.last_prompt_position), state.last_prompt_position),
        key_mask=pick(per_row(rows.key_mask), state.key_mask),
        done=state.done & ~takes,
        cache=cache,
    )
    return state, next_row


def long_rope_switch(model, prompt_len: int, num_new: int) -> int | None:
    """LongRoPE's original context L0 when some row of this call may grow past it, else None.

    A LongRoPE model (Phi-3) rotates a sequence longer than L0 with other factors than a shorter
    one (`jaxrlhf.models.transformer.long_rope_flags`), so the step at which a row's length
    reaches `L0 + 1` recomputes that row's cache (`recompute_cache_rows`). The longest row's last
    fed token is at position `P + N - 2`.
    """
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "is_longrope", False):
        return None
    original = int(config.rope_scaling[4])
    return original if prompt_len + num_new - 2 >= original else None


def recompute_cache_rows(
    model, params, cache, rows_B: Array, any_over_axis, history_ids: Callable[[], Array], key_mask_BxS: Array, fed_slot
):
    """`cache` with the rows where `rows_B` is true recomputed from their history, the other rows
    unchanged: one forward (no output layer) of each row's slots up to and including `fed_slot`
    (the slot of the token fed now: a scalar, or `[B]`), masked by `key_mask_BxS`, in a
    `lax.cond` that only the steps where some row crosses LongRoPE's boundary take (under a
    sweep's `vmap` the predicate is reduced over the runs by `any_over_axis`, so the cond stays a
    cond). `history_ids() -> [B, >= S]`, every slot's token, is called inside that branch only, so
    the other steps do not build it.
    """

    def recompute(cache):
        num_slots = key_mask_BxS.shape[1]
        seen_BxS = jnp.arange(num_slots)[None, :] <= jnp.reshape(fed_slot, (-1, 1))
        ids_BxS = history_ids()[:, :num_slots]
        fresh = model.forward(
            params, ids_BxS, key_mask_BxS * seen_BxS, cache_size=num_slots, logits_positions=slice(0, 0)
        )

        def pick(new, old):
            axis = cache_batch_axis(old)
            which = rows_B.reshape((1,) * axis + rows_B.shape + (1,) * (old.ndim - axis - 1))
            return jnp.where(which, new.astype(old.dtype), old)

        return jax.tree.map(pick, fresh.cache, cache)

    return jax.lax.cond(any_over_axis(jnp.any(rows_B)), recompute, lambda cache: cache, cache)


def decode_in_slots(
    model,
    params,
    prompt_cache,
    rows: RowPrompts,
    uniforms_NxB: Array,
    *,
    num_slots: int,
    num_new: int,
    prompt_len: int,
    sample: Callable[[Array, Array], tuple[Array, Array]],
    is_stop: Callable[[Array], Array],
    pad_token_id: int,
    any_over_axis: Callable[[Array], Array],
    slot_groups: int = 1,
    constrain: Callable[[Array, int], Array] | None = None,
    prompt_ids: Array | None = None,
    rope_switch: int | None = None,
) -> tuple[Array, Array, Array]:
    """Decodes B rows through `num_slots` refilled slots; returns `(tokens, logprobs, mask)`, `[B, N]`.

    Args:
      model: the decoder (`forward` with a per-row `cache_index`, `init_cache`,
        `take_cache_rows`, `put_cache_prefix`); `params` its (decoding) parameters.
      prompt_cache: the `B'` distinct prompts' caches of their first `P - 1` tokens (None when
        `P == 1`): row b's prompt is `rows.prompt_index[b]`.
      rows: `RowPrompts` of the B rows.
      uniforms_NxB: the call's uniforms; token t of row b is drawn with `uniforms_NxB[t, b]`.
      num_slots: S, decode slots (static), dividing into `slot_groups` equal groups.
      num_new, prompt_len: N and P (static).
      sample: `(logits [S, V], uniforms [S]) -> (tokens [S], logprobs [S])`.
      is_stop: `tokens [S] -> bool [S]`, whether a token ends its row (EOS).
      pad_token_id: the token of a row's positions after its end.
      any_over_axis: `any_alive -> any_alive` over the vmapped axes the caller runs under (a
        sweep's runs), so the loop and the refills run while any member needs them (see
        `generate`'s `stop_axis_name`).
      slot_groups: D; rows and slots are cut into D contiguous groups, each group's slots serving
        its rows only (the data-parallel devices, so each device's bookkeeping stays local).
      constrain: `(array, row axis) -> array`, applied to the loop state each step (a sharding
      constraint: the mesh's batch sharding on that axis), or None.
      prompt_ids, rope_switch: the `[B', P]` prompts and LongRoPE's original context
        (`long_rope_switch`), or None: a slot whose row's length reaches `rope_switch + 1`
        recomputes its cache from the row's prompt and tokens so far (`recompute_cache_rows`).
    """
    num_rows = rows.prompt_index.shape[0]
    total_slots = prompt_len - 1 + num_new
    if constrain is None:
        keep_on_mesh = lambda state: state  # noqa: E731
    else:

        def keep_on_mesh(state: SlotState) -> SlotState:
            cache = jax.tree.map(lambda b: constrain(b, cache_batch_axis(b)), state.cache)
            return SlotState(*(constrain(x, 0) for x in state[:-1]), cache=cache)

    rows_per_group = num_rows // slot_groups
    empty = SlotState(
        row=jnp.zeros((num_slots,), jnp.int32),
        token_index=jnp.zeros((num_slots,), jnp.int32),
        last_token=jnp.zeros((num_slots,), jnp.int32),
        last_prompt_position=jnp.zeros((num_slots,), jnp.int32),
        key_mask=jnp.zeros((num_slots, total_slots), jnp.int32),
        done=jnp.ones((num_slots,), bool),
        cache=model.init_cache(num_slots, total_slots),
    )
    state, next_row = _refill(model, empty, jnp.zeros((slot_groups,), jnp.int32), rows, prompt_cache, slot_groups)
    uniforms_BxN = uniforms_NxB.T
    outputs = (
        jnp.full((num_rows, num_new), pad_token_id, jnp.int32),
        jnp.zeros((num_rows, num_new), jnp.float32),
        jnp.zeros((num_rows, num_new), jnp.int32),
    )

    def step(carry):
        state, next_row, outputs = carry
        active = ~state.done
        t = state.token_index
        positions = state.last_prompt_position + t
        cache = state.cache
        if rope_switch is not None and prompt_ids is not None:
            prompts = prompt_ids  # narrowed to an Array for the closure

            def history_ids():  # the slots' rows: their prompts, then their tokens so far
                row_prompts = jnp.take(prompts, jnp.take(rows.prompt_index, state.row), axis=0)
                return jnp.concatenate([row_prompts, jnp.take(outputs[0], state.row, axis=0)], axis=1)

            cache = recompute_cache_rows(
                model,
                params,
                cache,
                active & (positions == rope_switch),
                any_over_axis,
                history_ids,
                state.key_mask,
                prompt_len - 1 + t,
            )
        out = model.forward(
            params,
            state.last_token[:, None],
            state.key_mask,
            positions=positions[:, None],
            cache=cache,
            # A done slot writes nowhere (past the last slot: dropped).
            cache_index=jnp.where(active, prompt_len - 1 + t, total_slots),
        )
        t_read = jnp.minimum(t, num_new - 1)
        uniform = _grouped(
            lambda g, u, r, i: u[r - g * rows_per_group, i], slot_groups, uniforms_BxN, state.row, t_read
        )
        tokens, logprobs = sample(out.logits[:, 0, :], uniform)

        def record(g, tok_o, lp_o, mask_o, r, i, tok, lp, act):
            local = jnp.where(act, r - g * rows_per_group, rows_per_group)  # inactive: dropped
            return (
                tok_o.at[local, i].set(tok, mode="drop"),
                lp_o.at[local, i].set(lp, mode="drop"),
                mask_o.at[local, i].set(jnp.ones_like(tok), mode="drop"),
            )

        outputs = _grouped(record, slot_groups, *outputs, state.row, t_read, tokens, logprobs, active)
        ended = active & (is_stop(tokens) | (t + 1 >= num_new))
        state = state._replace(token_index=t + 1, last_token=tokens, cache=out.cache, done=state.done | ended)
        waiting = jnp.repeat(next_row < rows_per_group, num_slots // slot_groups)
        state, next_row = jax.lax.cond(
            any_over_axis(jnp.any(state.done & waiting)),
            lambda s, n: _refill(model, s, n, rows, prompt_cache, slot_groups),
            lambda s, n: (s, n),
            state,
            next_row,
        )
        return keep_on_mesh(state), next_row, outputs

    state, _, outputs = jax.lax.while_loop(
        lambda carry: any_over_axis(jnp.any(~carry[0].done)), step, (keep_on_mesh(state), next_row, outputs)
    )
    return outputs
