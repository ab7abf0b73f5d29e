"""Autoregressive sampling with a preallocated KV cache, as one traceable JAX function.

A language model is a policy; sampling is running it. For a left-padded prompt batch
(`prompt_ids [B, P]`, `prompt_mask [B, P]`) `generate` returns `N = max_new_tokens` response
tokens per row, their log-probabilities and a mask:

1. **Prefill.** One forward pass over the P prompt tokens writes their keys/values into slots
   `[0, P)` of a cache with `S = P + N` slots and gives the logits of the first response token.
2. **Decode.** A `lax.while_loop` feeds back one token per step: step i writes slot `P + i - 1`
   and samples response token i. The loop stops when every row has emitted an EOS token (or after
   N tokens). No Python runs per token.

The attention mask over the S slots is `[prompt_mask, 1, ..., 1]` from the start: the causal rule
of the cached forward (a query at slot s sees slots <= s) already hides slots not yet written, so
the mask never changes inside the loop. Positions are `sum(prompt_mask) + i` for response token i,
the same numbers `cumsum(mask) - 1` gives over the whole sequence (and Hugging Face derives from
`attention_mask`).

Sampling one token from logits `l` (a `[V]` vector per row), with temperature `T`:

- `T == 0`: greedy, `argmax_v l_v`.
- otherwise `z = l / T`, then optionally
  - **top-k** (`top_k = k > 0`): keep the k largest `z_v`, set the others to `-inf`;
  - **top-p** (nucleus, `top_p = p < 1`): with `q = softmax(z)` sorted in decreasing order
    `q_(1) >= q_(2) >= ...`, keep the smallest prefix `{(1), ..., (m)}` whose mass
    `q_(1) + ... + q_(m) >= p`, i.e. keep token `(j)` iff the mass strictly before it,
    `q_(1) + ... + q_(j-1)`, is `< p`. The most likely token is always kept;
  - draw `a ~ softmax(z')` from the filtered logits `z'` (Gumbel-max, `jax.random.categorical`).
  top-k runs before top-p, and top-p sees the renormalised top-k distribution, as in Hugging Face.

Reported log-probabilities are those of the **unfiltered** tempered distribution,
`log softmax(l / T)[a]` (T = 1 when greedy), i.e. before top-k/top-p, as TRL reports them and as
`jaxrlhf.core.logprobs.token_logprobs` recomputes them from a full forward pass.

Randomness: response token i draws from `jax.random.fold_in(key, i)`. With jax's partitionable
threefry (`jax_threefry_partitionable`, on by default) the random bits of a `[B, V]` draw do not
depend on how the batch is sharded, so a mesh of 8 devices gives the same samples as one device.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Array = jax.Array


class SampleOutput(NamedTuple):
    """Response tokens, their log-probs (unfiltered, tempered) and validity mask, all `[B, N]`."""

    tokens: Array  # int32; pad_token_id after the first EOS
    logprobs: Array  # float32; 0 where mask is 0
    mask: Array  # int32; 1 up to and including the first EOS, 0 after


# ----------------------------------------------------------------------------------------------
# Filtering and drawing one token


def top_k_filter(logits: Array, k: int) -> Array:
    """Keeps the `k` largest logits of the last axis, sets the rest to `-inf` (k <= 0: no-op).

    Ties with the k-th largest value are all kept. Uses `lax.top_k` (a partial selection), not a
    full sort over the vocabulary.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth_largest, logits, -jnp.inf)


def top_p_filter(logits: Array, p) -> Array:
    """Nucleus filter: keeps the smallest most-likely set of tokens with probability mass >= p.

    With `q = softmax(logits)` sorted decreasingly, token `(j)` is kept iff
    `q_(1) + ... + q_(j-1) < p` (the mass strictly before it), so the kept set is the shortest
    prefix of the sorted distribution reaching mass p, and the top token is always kept. Tokens
    tied with the least likely kept token are kept too. `p >= 1` keeps everything (and is free
    when `p` is a Python number).
    """
    if isinstance(p, (int, float)) and p >= 1.0:
        return logits
    sorted_logits = jax.lax.top_k(logits, logits.shape[-1])[0]  # decreasing
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < p
    keep_sorted = keep_sorted.at[..., 0].set(True)
    # The kept set is a prefix of the sorted order: its smallest logit is a threshold.
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def _is_greedy(temperature) -> bool:
    return isinstance(temperature, (int, float)) and temperature == 0


def sample_token(logits: Array, key: Array, temperature=1.0, top_k: int = 0, top_p=1.0) -> tuple[Array, Array]:
    """Draws one token per row from `[B, V]` logits; returns `(tokens [B] int32, logprobs [B] f32)`.

    `logprobs` is `log softmax(logits / T)` at the chosen token, before top-k/top-p filtering
    (T = 1 when greedy). `temperature` and `top_p` may be traced; a Python 0 temperature selects
    greedy decoding statically. A traced temperature of 0 also gives the argmax (and T = 1 for
    the log-probs).
    """
    logits = logits.astype(jnp.float32)
    if _is_greedy(temperature):
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        scaled = logits
    elif isinstance(temperature, (int, float)):
        scaled = logits / temperature if temperature != 1 else logits
        filtered = top_p_filter(top_k_filter(scaled, top_k), top_p)
        tokens = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    else:  # traced temperature: 0 still means greedy, decided per call at run time
        temperature = jnp.asarray(temperature, jnp.float32)
        traced_zero = temperature == 0
        scaled = logits / jnp.where(traced_zero, 1.0, temperature)
        filtered = top_p_filter(top_k_filter(scaled, top_k), top_p)
        sampled = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
        tokens = jnp.where(traced_zero, jnp.argmax(logits, axis=-1).astype(jnp.int32), sampled)
    log_normaliser = jax.nn.logsumexp(scaled, axis=-1)
    chosen = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen - log_normaliser


def _eos_tuple(eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, (list, tuple)):
        return tuple(int(e) for e in eos_token_id)
    return (int(eos_token_id),)


def _is_eos(tokens: Array, eos_ids: tuple[int, ...]) -> Array:
    hit = jnp.zeros(tokens.shape, bool)
    for eos in eos_ids:
        hit |= tokens == eos
    return hit


# ----------------------------------------------------------------------------------------------
# generate


class _DecodeState(NamedTuple):
    step: Array  # index i of the next response token to sample
    last_tokens: Array  # [B] token sampled at step i - 1 (fed to the model now)
    cache: Any
    done: Array  # [B] bool: row has emitted EOS at a step < i
    tokens: Array  # [B, N]
    logprobs: Array  # [B, N]
    mask: Array  # [B, N]


def generate(
    model,
    params,
    prompt_ids: Array,
    prompt_mask: Array,
    key: Array,
    *,
    max_new_tokens: int,
    temperature=1.0,
    top_k: int = 0,
    top_p=1.0,
    eos_token_id=None,
    pad_token_id: int = 0,
) -> SampleOutput:
    """Samples `max_new_tokens` tokens after each (left-padded) prompt; traceable and jit-safe.

    Args:
      model: a `LanguageModel` (static: anything with `forward(params, ids, mask, positions,
        cache, cache_index)` and `init_cache(batch, max_len)`).
      params: its parameter pytree.
      prompt_ids: `[B, P]` int token ids, left-padded.
      prompt_mask: `[B, P]` 1 for real prompt tokens, 0 for left padding.
      key: a `jax.random` key; response token i uses `fold_in(key, i)`.
      max_new_tokens: N (static).
      temperature: T; 0 means greedy (may be traced; a Python 0 compiles a greedy-only loop).
      top_k: keep the k most likely tokens (static; 0 = off).
      top_p: nucleus mass (may be traced; a Python 1.0 = off and compiles no sort).
      eos_token_id: an int, a tuple of ints, or None (static).
      pad_token_id: written after the first EOS (static).

    Returns:
      `SampleOutput(tokens, logprobs, mask)`, each `[B, N]`. `logprobs` are
      `log softmax(logits / T)` of the chosen tokens before top-k/top-p filtering (T = 1 when
      greedy), 0 where `mask` is 0. `mask` is 1 up to and including each row's first EOS and 0
      after it; tokens after it are `pad_token_id`. A row without EOS has mask 1 everywhere.
    """
    batch, prompt_len = prompt_ids.shape
    num_new = int(max_new_tokens)
    if num_new < 1:
        raise ValueError("max_new_tokens must be >= 1")
    eos_ids = _eos_tuple(eos_token_id)
    prompt_ids = prompt_ids.astype(jnp.int32)
    prompt_mask = prompt_mask.astype(jnp.int32)
    num_slots = prompt_len + num_new

    # Every response slot is marked visible up front; causality hides the unwritten ones.
    slot_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, num_new), jnp.int32)], axis=1)
    prompt_lengths = jnp.sum(prompt_mask, axis=1)  # position of response token 0

    prefill = model.forward(params, prompt_ids, slot_mask, cache=model.init_cache(batch, num_slots), cache_index=0)
    first_logits = prefill.logits[:, -1, :]

    def sample(logits, step):
        return sample_token(logits, jax.random.fold_in(key, step), temperature, top_k, top_p)

    def record(state_tokens, state_logprobs, state_mask, done, step, tokens, logprobs):
        """Writes response token `step` (masked after EOS) and returns the new buffers and done."""
        valid = ~done
        tokens = jnp.where(valid, tokens, pad_token_id)
        logprobs = jnp.where(valid, logprobs, 0.0)
        state_tokens = jax.lax.dynamic_update_slice_in_dim(state_tokens, tokens[:, None], step, axis=1)
        state_logprobs = jax.lax.dynamic_update_slice_in_dim(state_logprobs, logprobs[:, None], step, axis=1)
        state_mask = jax.lax.dynamic_update_slice_in_dim(state_mask, valid.astype(jnp.int32)[:, None], step, axis=1)
        return state_tokens, state_logprobs, state_mask, done | _is_eos(tokens, eos_ids)

    tokens0, logprobs0 = sample(first_logits, 0)
    buffers = (
        jnp.full((batch, num_new), pad_token_id, jnp.int32),
        jnp.zeros((batch, num_new), jnp.float32),
        jnp.zeros((batch, num_new), jnp.int32),
    )
    *buffers, done = record(*buffers, jnp.zeros((batch,), bool), 0, tokens0, logprobs0)
    state = _DecodeState(jnp.int32(1), tokens0, prefill.cache, done, *buffers)

    def keep_going(state: _DecodeState):
        return (state.step < num_new) & ~jnp.all(state.done)

    def decode_step(state: _DecodeState) -> _DecodeState:
        slot = prompt_len + state.step - 1  # where last_tokens goes
        positions = (prompt_lengths + state.step - 1)[:, None]
        out = model.forward(params, state.last_tokens[:, None], slot_mask, positions=positions,
                            cache=state.cache, cache_index=slot)
        tokens, logprobs = sample(out.logits[:, 0, :], state.step)
        *buffers, done = record(state.tokens, state.logprobs, state.mask, state.done, state.step, tokens, logprobs)
        return _DecodeState(state.step + 1, tokens, out.cache, done, *buffers)

    final = jax.lax.while_loop(keep_going, decode_step, state)
    return SampleOutput(final.tokens, final.logprobs, final.mask)


# ----------------------------------------------------------------------------------------------
# A standalone jitted sampler with prompt-length buckets


DEFAULT_PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length; beyond the largest, the next multiple of the largest."""
    for size in sorted(buckets):
        if length <= size:
            return size
    largest = max(buckets)
    return -(-length // largest) * largest


def left_pad(prompt_ids, prompt_mask, length: int, pad_token_id: int = 0):
    """Adds columns of `pad_token_id` (mask 0) on the left so the prompts are `length` wide."""
    prompt_ids = np.asarray(prompt_ids)
    prompt_mask = np.asarray(prompt_mask)
    extra = length - prompt_ids.shape[1]
    if extra < 0:
        raise ValueError(f"prompt of width {prompt_ids.shape[1]} is longer than {length}")
    widths = ((0, 0), (extra, 0))
    return (np.pad(prompt_ids.astype(np.int32), widths, constant_values=pad_token_id),
            np.pad(prompt_mask.astype(np.int32), widths, constant_values=0))


class Sampler:
    """`generate` compiled once per (batch, prompt bucket): call it as `sampler(params, ids, mask, key)`.

    Prompts are left-padded on the host up to the next length in `prompt_buckets`, so a new prompt
    length reuses the compiled program of its bucket. With a `mesh`, the batch is sharded over
    `batch_axis` (data parallel; parameters keep their own sharding, replicated if unsharded) and
    the outputs come back sharded the same way. `trace_count` counts how often `generate` was
    traced (compiled), for tests.
    """

    def __init__(self, model, *, max_new_tokens: int, temperature=1.0, top_k: int = 0, top_p=1.0,
                 eos_token_id=None, pad_token_id: int = 0, prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
                 mesh: Mesh | None = None, batch_axis: str | tuple[str, ...] = "data"):
        self.model = model
        self.max_new_tokens = int(max_new_tokens)
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self.pad_token_id = pad_token_id
        self.mesh = mesh
        self.trace_count = 0
        options = dict(max_new_tokens=self.max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_token_id=eos_token_id, pad_token_id=pad_token_id)

        def run(params, prompt_ids, prompt_mask, key):
            self.trace_count += 1
            return generate(model, params, prompt_ids, prompt_mask, key, **options)

        jit_kwargs: dict = dict(donate_argnums=(1, 2))
        if mesh is not None:
            batch_sharding = NamedSharding(mesh, PartitionSpec(batch_axis))
            replicated = NamedSharding(mesh, PartitionSpec())
            self._input_sharding = batch_sharding
            self._replicated = replicated
            jit_kwargs.update(out_shardings=SampleOutput(batch_sharding, batch_sharding, batch_sharding))
        self._run = jax.jit(run, **jit_kwargs)

    def __call__(self, params, prompt_ids, prompt_mask, key) -> SampleOutput:
        width = bucket_length(np.shape(prompt_ids)[1], self.prompt_buckets)
        prompt_ids, prompt_mask = left_pad(prompt_ids, prompt_mask, width, self.pad_token_id)
        if self.mesh is not None:
            prompt_ids = jax.device_put(prompt_ids, self._input_sharding)
            prompt_mask = jax.device_put(prompt_mask, self._input_sharding)
            key = jax.device_put(key, self._replicated)
        else:
            prompt_ids, prompt_mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
        return self._run(params, prompt_ids, prompt_mask, key)


def make_sampler(model, **kwargs) -> Sampler:
    """A jitted, bucketed `Sampler` for `model`; keyword arguments as in `Sampler`."""
    return Sampler(model, **kwargs)
