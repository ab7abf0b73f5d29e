"""Packed experience and update passes: the forwards skip the padding (``max_tokens_per_microbatch``).

Without packing, every forward of the experience pass (policy, reference, critic) and of the
update runs over ``[B, P + N]``: left padding of short prompts and everything after each
response's end included. With long-tailed response lengths that is most of the compute. With
``PPOConfig.max_tokens_per_microbatch = M`` each row's real tokens (its prompt's, then its
response's: one contiguous span) are packed by `jaxrlhf.packing` into packs of ``T = P + N``
tokens (any row fits one), ``R = M // T`` packs per micro-batch:

    experience   for each micro-batch in use: a forward over [R, T] -> per-position next-token
                 log-probs, entropies, values -> unpacked to [B, N]     (lax.while_loop)
    update       per minibatch (the optimizer step is unchanged): for each micro-batch in use,
                 the gradient of the minibatch loss restricted to its rows, weighted by their
                 share of the loss's normaliser (as `grad_accum_steps` weights its micro-batches),
                 summed                                                  (lax.while_loop)

Shapes are static (one compile whatever the lengths); the number of micro-batches a batch needs
is data, so the passes cost what the real tokens cost (rounded up to whole micro-batches). The
results equal the unpacked passes' up to float rounding: the forward per row is the same
function (attention blocked across rows, positions restarting per row), and the summed weighted
gradients equal the minibatch's gradient. Batch statistics inside a policy loss (Clip-Cov's and
KL-Cov's covariance, their token budget) are per micro-batch, as with gradient accumulation.

Where the vocabulary head runs: at the response positions only. The trunk's forward stops at the
final hidden states (``logits_positions=slice(0, 0)``); `response_head` gathers the positions
whose next token is a response token into a compact buffer and applies the output layer
(`LanguageModel.output_layer`), temperature, log-softmax and entropy there, in chunks of
``ceil(R T / HEAD_CHUNKS)`` positions, as many as the micro-batch's response tokens need (data:
exact whatever the mix, no token dropped); the results go back to their positions and then to
``[B, N]``. So the head costs the batch's response tokens (rounded up to a chunk per micro-batch),
not the packed prompt tokens, nor the unpacked pass's ``B * N`` response slots. The critic's value
head (``[D] -> 1``, cheap) still reads every packed position; a MoE policy's router losses come
from the trunk's forward as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxrlhf import packing
from jaxrlhf.core.logprobs import entropy_from_logits, token_logprobs
from jaxrlhf.core.sequences import concat_prompt_response
from jaxrlhf.models.moe import router_loss_terms
from jaxrlhf.models.value import value_head_apply


class Geometry(NamedTuple):
    """Static shape of the packed passes: packs of ``pack_len`` tokens, ``packs_per_micro`` of them
    per micro-batch, ``num_packs`` packs in all (room for every row in its own pack)."""

    pack_len: int
    packs_per_micro: int
    num_packs: int


def geometry(max_tokens: int, prompt_len: int, num_new: int, batch: int, divisor: int = 1) -> Geometry:
    """``T = P + N``; ``R = max_tokens // T`` rounded down to a multiple of ``divisor`` (the
    data-parallel shards, so a micro-batch splits into whole packs per device), at least
    ``divisor``; room for ``batch`` packs rounded up to whole micro-batches."""
    pack_len = prompt_len + num_new
    per_micro = max(divisor, (max_tokens // pack_len) // divisor * divisor)
    per_micro = min(per_micro, -(-batch // divisor) * divisor)
    return Geometry(pack_len, per_micro, -(-batch // per_micro) * per_micro)


def row_spans(prompt_mask_BxP, response_mask_BxN):
    """Each row's real tokens in the ``[B, P + N]`` concatenation: from ``P - prompt length`` for
    ``prompt length + response length`` tokens (a left-padded prompt; the response's mask is a
    prefix: everything the model attends to). A row without response tokens needs no forward
    (nothing of it is read): length 0."""
    prompt_len_B = jnp.sum(prompt_mask_BxP, axis=1).astype(jnp.int32)
    response_len_B = jnp.sum(response_mask_BxN, axis=1).astype(jnp.int32)
    start_B = prompt_mask_BxP.shape[1] - prompt_len_B
    return start_B, jnp.where(response_len_B > 0, prompt_len_B + response_len_B, 0)


class Packed(NamedTuple):
    """A batch's packing: its layout and its token ids in packs (``[num_packs, T]``)."""

    layout: packing.PackLayout
    ids_KxT: jax.Array
    prompt_len: int
    num_new: int
    geometry: Geometry

    @property
    def num_micro(self) -> jax.Array:
        """Micro-batches in use (data): ``ceil(packs needed / R)``."""
        R = self.geometry.packs_per_micro
        return (self.layout.num_packs + R - 1) // R

    def micro(self, index):
        """``(ids, positions, segment_ids)`` ``[R, T]`` of micro-batch ``index`` (traced)."""
        R = self.geometry.packs_per_micro
        take = lambda x: lax.dynamic_slice_in_dim(x, index * R, R, axis=0)  # noqa: E731
        return take(self.ids_KxT), take(self.layout.position_KxT), take(self.layout.segment_KxT)

    def response_window(self, y_RxT, index, fill=0.0):
        """Per-position outputs of micro-batch ``index`` -> ``[B, N]`` at each row's response
        window (the positions ``P - 1 .. P + N - 2`` that predict and value response tokens), for
        the rows of this micro-batch; ``fill`` for the others."""
        layout, R = self.layout, self.geometry.packs_per_micro
        P, N = self.prompt_len, self.num_new
        column_N = P - 1 + jnp.arange(N, dtype=jnp.int32)
        within_BxN = column_N[None, :] - layout.start_B[:, None]
        local_pack_B = layout.pack_B - index * R
        in_micro_B = (local_pack_B >= 0) & (local_pack_B < R) & (layout.length_B > 0)
        valid_BxN = in_micro_B[:, None] & (within_BxN >= 0) & (within_BxN < layout.length_B[:, None])
        pack_BxN = jnp.broadcast_to(jnp.clip(local_pack_B, 0, R - 1)[:, None], within_BxN.shape)
        position_BxN = jnp.clip(layout.offset_B[:, None] + within_BxN, 0, y_RxT.shape[1] - 1)
        return jnp.where(valid_BxN, y_RxT[pack_BxN, position_BxN], fill)

    def response_targets(self, index) -> jax.Array:
        """``[R, T]`` bool: the positions of micro-batch ``index`` whose next token is a response
        token of the same row (the only positions whose log-prob and entropy are read)."""
        R, P = self.geometry.packs_per_micro, self.prompt_len
        take = lambda x: lax.dynamic_slice_in_dim(x, index * R, R, axis=0)  # noqa: E731
        segment_RxT, column_RxT = take(self.layout.segment_KxT), take(self.layout.column_KxT)
        return (segment_RxT > 0) & (next_ids(segment_RxT) == segment_RxT) & (next_ids(column_RxT) >= P)

    def rows_in_micro(self, index) -> jax.Array:
        """``[B]`` bool: the rows packed into micro-batch ``index``."""
        local_pack_B = self.layout.pack_B - index * self.geometry.packs_per_micro
        return (local_pack_B >= 0) & (local_pack_B < self.geometry.packs_per_micro) & (self.layout.length_B > 0)


def pack_batch(prompt_ids, prompt_mask, response_ids, response_mask, max_tokens: int, divisor: int = 1) -> Packed:
    """`Packed` of a batch of prompts (left-padded) and responses (``response_mask``: what the
    model attends to, a prefix per row)."""
    P, N = prompt_ids.shape[1], response_ids.shape[1]
    geo = geometry(max_tokens, P, N, prompt_ids.shape[0], divisor)
    ids_BxL, _ = concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)
    start_B, length_B = row_spans(prompt_mask, response_mask)
    layout = packing.pack_layout(start_B, length_B, geo.num_packs, geo.pack_len)
    return Packed(layout, packing.pack(ids_BxL, layout), P, N, geo)


HEAD_CHUNKS = 8
"""The response head's chunks per micro-batch (`response_head`): its cost is the micro-batch's
response positions rounded up to a multiple of ``ceil(R T / HEAD_CHUNKS)``, so at most an eighth of
a head at every position is wasted, for at most 8 loop steps of a still large matmul."""


def next_ids(ids_RxT):
    """The entry after each packed position, ``x[:, t + 1]`` (``0`` after a pack's last
    position): the next token of ids, and likewise the next segment id or column."""
    return jnp.concatenate([ids_RxT[:, 1:], jnp.zeros_like(ids_RxT[:, :1])], axis=1)


def response_head(
    model, params, hidden_RxTxD, ids_RxT, targets_RxT, temperature, with_entropy: bool, chunks: int = HEAD_CHUNKS
):
    """Per packed position t of ``targets`` (its next token is a response token): the log-prob of
    the token at t + 1 under ``softmax(logits_t / temperature)`` and, optionally, the entropy of
    that distribution; ``0`` elsewhere. The vocabulary head (`LanguageModel.output_layer`) runs
    at the target positions only, not at all ``R T``.

    The targets' hidden states are gathered, in order, into a compact buffer of ``chunks * C >= R T``
    rows (after the targets: unused) in ``chunks`` chunks of ``C = ceil(R T / chunks)``; chunk j runs the
    head (logits, temperature, log-softmax, entropy) only when the micro-batch has more than
    ``j C`` targets (`lax.cond` in a `lax.scan`: static shapes, differentiable), and the results
    are gathered back to their positions. So the head costs the ``n`` targets rounded up to a
    whole chunk, ``ceil(n / C) C < n + C``, and never drops one: no static bound on ``n`` is
    needed, and none short of ``R (T - 1)`` would be exact (packs of short rows hold many
    responses; next fit bounds the tokens of a pack, not their split between prompt and
    response). Under a sweep's `vmap` the condition is per member, so every chunk runs (the cost
    of a head at every position, as without this function).
    """
    R, T, D = hidden_RxTxD.shape
    width = -(-(R * T) // chunks)
    targets = targets_RxT.reshape(R * T)
    count = jnp.sum(targets.astype(jnp.int32))
    slot = jnp.cumsum(targets.astype(jnp.int32)) - 1  # a target's row in the compact buffer
    source = jnp.zeros(chunks * width, jnp.int32)
    source = source.at[jnp.where(targets, slot, chunks * width)].set(jnp.arange(R * T, dtype=jnp.int32), mode="drop")
    hidden_JxCxD = hidden_RxTxD.reshape(R * T, D)[source].reshape(chunks, width, D)
    tokens_JxC = next_ids(ids_RxT).reshape(R * T)[source].reshape(chunks, width)

    def chunk(_, inputs):
        j, hidden_CxD, tokens_C = inputs

        def head():
            logits_1xCxV = model.output_layer(params, hidden_CxD[None])
            logprobs = token_logprobs(logits_1xCxV, tokens_C[None], temperature)[0]
            entropy = entropy_from_logits(logits_1xCxV, temperature)[0] if with_entropy else jnp.zeros_like(logprobs)
            return logprobs, entropy

        def skip():
            return jnp.zeros((width,), jnp.float32), jnp.zeros((width,), jnp.float32)

        return None, lax.cond(j * width < count, head, skip)

    _, (logprobs_JxC, entropy_JxC) = lax.scan(chunk, None, (jnp.arange(chunks), hidden_JxCxD, tokens_JxC))
    back = lambda y_JxC: jnp.where(targets, y_JxC.reshape(-1)[jnp.maximum(slot, 0)], 0.0).reshape(R, T)  # noqa: E731
    return back(logprobs_JxC), (back(entropy_JxC) if with_entropy else None)


def micro_forward(
    models,
    policy_params,
    value_params,
    packed: Packed,
    index,
    temperature,
    *,
    with_logprobs=True,
    with_entropy=False,
    with_router_losses=False,
    constrain: Callable = lambda x: x,
):
    """The policy's (and critic's) outputs on micro-batch ``index``, at the response windows:
    ``(logprobs [B, N] or None, values [B, N] or None, entropy [B, N] or None, router losses or
    None)``, 0 outside the micro-batch's rows (log-probs and entropies: 0 off the response
    tokens too). What `jaxrlhf.training.experience.policy_and_values` computes, for these rows,
    with the vocabulary head at the response tokens only (`response_head`); the router losses (a
    MoE policy, ``with_router_losses``) are means over the micro-batch's real tokens."""
    ids, positions, segments = (constrain(x) for x in packed.micro(index))
    attention = segments > 0
    logprobs = entropy = values = None
    out = None
    if with_logprobs or (models.has_value and models.critic is None):  # the policy's trunk is needed
        out = models.policy.forward(
            policy_params, ids, attention, positions=positions, segment_ids=segments, logits_positions=slice(0, 0)
        )  # hidden states only: the vocabulary head runs at the response positions (`response_head`)
    if with_logprobs:
        assert out is not None
        targets = constrain(packed.response_targets(index))
        lp_RxT, ent_RxT = response_head(
            models.policy, policy_params, out.hidden, ids, targets, temperature, with_entropy
        )
        logprobs = packed.response_window(lp_RxT, index)
        entropy = None if ent_RxT is None else packed.response_window(ent_RxT, index)
    if models.has_value:
        if models.critic is None:  # shared trunk: the value head reads the policy's hidden states
            assert out is not None
            values_RxT = value_head_apply(value_params, out.hidden)
        else:
            hidden = models.critic.trunk.forward(
                value_params["trunk"],
                ids,
                attention,
                positions=positions,
                segment_ids=segments,
                logits_positions=slice(0, 0),
            ).hidden
            values_RxT = value_head_apply(value_params["head"], hidden)
        values = packed.response_window(values_RxT.astype(jnp.float32), index)
    router = None
    if with_router_losses:
        assert out is not None and out.aux is not None, "router losses come from a MoE policy's forward"
        router = router_loss_terms(out.aux)
    return logprobs, values, entropy, router


def accumulate_over_micro(packed: Packed, step: Callable[[Any, jax.Array], Any], init):
    """``carry = step(carry, i)`` for each micro-batch ``i`` in use (a `lax.while_loop`: the count
    is data, the shapes static)."""

    def body(state):
        i, carry = state
        return i + 1, step(carry, i)

    _, carry = lax.while_loop(lambda s: s[0] < packed.num_micro, body, (jnp.int32(0), init))
    return carry


def packed_policy_and_values(
    models,
    policy_params,
    value_params,
    packed: Packed,
    temperature,
    *,
    with_entropy=False,
    with_logprobs=True,
    constrain: Callable = lambda x: x,
):
    """`jaxrlhf.training.experience.policy_and_values` over a packed batch (no gradient through
    the loop: the experience pass)."""
    batch, N = packed.layout.length_B.shape[0], packed.num_new
    zeros = jnp.zeros((batch, N), jnp.float32)
    init = (
        zeros if with_logprobs else None,
        zeros if models.has_value else None,
        zeros if (with_logprobs and with_entropy) else None,
    )

    def step(carry, i):
        outputs = micro_forward(
            models,
            policy_params,
            value_params,
            packed,
            i,
            temperature,
            with_logprobs=with_logprobs,
            with_entropy=with_entropy,
            constrain=constrain,
        )
        return tuple(None if c is None else c + o for c, o in zip(carry, outputs[:3]))  # rows are disjoint

    return accumulate_over_micro(packed, step, init)


def packed_reference_logprobs(
    models, ref_params, packed: Packed, temperature, constrain: Callable = lambda x: x
) -> jax.Array:
    """The reference policy's response log-probs over a packed batch."""
    ref_models = models.__class__(models.policy, None, has_value=False)
    logprobs, _, _ = packed_policy_and_values(ref_models, ref_params, None, packed, temperature, constrain=constrain)
    assert logprobs is not None  # with_logprobs: the default
    return logprobs
