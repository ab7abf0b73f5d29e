"""Autoregressive sampling with a preallocated KV cache, as one traceable JAX function.

A language model is a policy; sampling is running it. For a left-padded prompt batch
(`prompt_ids [B, P]`, `prompt_mask [B, P]`) `generate` returns `N = max_new_tokens` response
tokens per row, their log-probabilities and a mask:

1. **Prefill.** One causal forward pass over the first P - 1 prompt tokens (attending among
   themselves only) returns their keys/values in slots `[0, P - 1)` of a fresh cache. Its logits
   are not used, so XLA never computes the `[B, P, V]` output layer.
2. **Decode.** A `lax.while_loop` step i feeds one token (the last prompt token when i = 0, else
   response token i - 1) into slot `P - 1 + i` and samples response token i from its logits. The
   loop stops when every row has emitted an EOS token (or after N tokens). No Python runs per
   token, and the cache is updated in place (`dynamic_update_slice` on the loop carry).
3. **Segments.** Attention reads every slot of the cache it is given, so the N steps run as
   `cache_segments` consecutive loops, each with a cache just long enough for its last step
   (`P - 1 + end` slots; the full `S = P + N - 1` in the last one); between loops the cache is
   padded with empty slots. Early steps then read a short cache (4 segments: about 30% fewer
   cache bytes when N = 4P) at the price of one compiled loop body per segment.

The attention mask over the S slots is `[prompt_mask, 1, ..., 1]` from the start: the causal rule
of the cached forward (a query at slot s sees slots <= s) already hides slots not yet written, so
the mask never changes inside the loop. Response token i - 1 sits at position
`sum(prompt_mask) + i - 1`, the number `cumsum(mask) - 1` gives over the whole sequence (and
Hugging Face derives from `attention_mask`).

Groups and slots (the rollout engine, `jaxrlhf.engine`): with `num_generations=G` each prompt is
prefilled once and its cache shared by its G consecutive output rows; with `slots=S` the rows
decode through S refilled slots (per-row decode state: a slot whose row ends takes the next
waiting row) instead of one static batch. Each row keeps its cache layout, positions, mask and
random draws, so the samples are those of the static batch of repeated prompts
(docs/sampling.md, "The rollout engine").

Sampling one token from logits `l` (a `[V]` vector per row), with temperature `T`:

- `T == 0`: greedy, `argmax_v l_v`.
- otherwise `z = l / T`, then optionally
  - **top-k** (`top_k = k`, an integer >= 1; None = off): keep the k largest `z_v`, set the others to `-inf`;
  - **top-p** (nucleus, `top_p = p < 1`): with `q = softmax(z)` sorted in decreasing order
    `q_(1) >= q_(2) >= ...`, keep the smallest prefix `{(1), ..., (m)}` whose mass
    `q_(1) + ... + q_(m) >= p`, i.e. keep token `(j)` iff the mass strictly before it,
    `q_(1) + ... + q_(j-1)`, is `< p`. The most likely token is always kept;
  - draw `a ~ softmax(z')` from the filtered logits `z'` by inverse CDF: with one uniform
    `u ~ U[0, 1)`, `a` is the first token whose cumulative probability exceeds `u`.
  top-k runs before top-p, and top-p sees the renormalised top-k distribution, as in Hugging Face.

Reported log-probabilities are those of the **unfiltered** tempered distribution,
`log softmax(l / T)[a]` (T = 1 when greedy), i.e. before top-k/top-p, as TRL reports them and as
`jaxrlhf.core.logprobs.token_logprobs` recomputes them from a full forward pass.

Randomness: all of a call's uniforms are drawn up front, `uniforms = uniform(key, [N, B])`, and
response token i of row b uses `uniforms[i, b]`. With jax's partitionable threefry
(`jax_threefry_partitionable`, on by default since jax 0.5) the numbers of a sharded draw do not
depend on how the batch is split, so a mesh of 8 devices gives the same samples as one device.

Argument checks: `generate` and `Sampler` validate their arguments before anything is traced
(`check_sampling_options`, `check_prompts`), so the decoding loop pays nothing for them. Shapes,
dtypes and Python (or NumPy, or concrete jax) values are checked; values that are traced (a
`generate` called inside the caller's `jax.jit` with traced prompts or a traced temperature) can
not be, and their behaviour is documented at `generate`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.core  # `jax.core.Tracer`, named explicitly for the type checker
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrlhf import engine
from jaxrlhf.models.positions import concrete_or_none as _concrete
from jaxrlhf.models.transformer import cache_batch_axis
from jaxrlhf.sharding import batch_sharding, batch_size_divisor, replicated
from jaxrlhf.tuning import Tuning, model_width, resolve_tuning
from jaxrlhf.typing import Scalar

Array = jax.Array


class SampleOutput(NamedTuple):
    """Response tokens, their log-probs (unfiltered, tempered) and validity mask, all `[B, N]`."""

    tokens: Array  # int32; pad_token_id after the first EOS
    logprobs: Array  # float32; 0 where mask is 0
    mask: Array  # int32; 1 up to and including the first EOS, 0 after


# ----------------------------------------------------------------------------------------------
# Filtering and drawing one token


def top_k_filter(logits: Array, k: int | None) -> Array:
    """Keeps the `k` largest logits of the last axis, sets the rest to `-inf` (k None: no-op).

    Ties with the k-th largest value are all kept. Uses `lax.top_k` (a partial selection), not a
    full sort over the vocabulary.
    """
    if k is None or k >= logits.shape[-1]:
        return logits
    kth_largest = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth_largest, logits, -jnp.inf)


def top_p_filter(logits: Array, p: Scalar) -> Array:
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


_CDF_BLOCK = 128  # vocabulary block of the two-level inverse-CDF search


def _last_positive_index(weights: Array) -> Array:
    """Index of the last entry > 0 along the last axis (0 if none)."""
    size = weights.shape[-1]
    return size - 1 - jnp.argmax(weights[..., ::-1] > 0, axis=-1).astype(jnp.int32)


def _inverse_cdf_small(weights: Array, target: Array) -> Array:
    """First index whose cumulative weight exceeds `target`, clipped to the last positive weight."""
    index = jnp.sum(jnp.cumsum(weights, axis=-1) <= target[..., None], axis=-1).astype(jnp.int32)
    return jnp.minimum(index, _last_positive_index(weights))


def inverse_cdf_sample(weights: Array, uniform: Array) -> Array:
    """Draws `a ~ weights / sum(weights)` per row from one uniform number `u` in [0, 1) per row.

    `a` is the first index with `w_0 + ... + w_a > u * sum(w)`: an entry of weight 0 is never
    chosen. For a large last axis the search is two-level (blocks of 128, then within the chosen
    block), so the work is O(V) rather than the O(V log V) of a full-length prefix sum.

    Args:
      weights: `[B, V]` non-negative, unnormalised probabilities (at least one > 0 per row).
      uniform: `[B]` uniform numbers in [0, 1).

    Returns:
      `[B]` int32 indices.
    """
    batch, size = weights.shape
    if size <= 2 * _CDF_BLOCK:
        return _inverse_cdf_small(weights, uniform * jnp.sum(weights, axis=-1))
    num_blocks = -(-size // _CDF_BLOCK)
    blocks = jnp.pad(weights, ((0, 0), (0, num_blocks * _CDF_BLOCK - size))).reshape(batch, num_blocks, _CDF_BLOCK)
    block_mass = jnp.sum(blocks, axis=-1)
    mass_through_block = jnp.cumsum(block_mass, axis=-1)
    target = uniform * mass_through_block[:, -1]
    block = jnp.sum(mass_through_block <= target[:, None], axis=-1).astype(jnp.int32)
    block = jnp.minimum(block, _last_positive_index(block_mass))
    mass_before_block = jnp.take_along_axis(mass_through_block - block_mass, block[:, None], axis=1)[:, 0]
    chosen_block = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
    return block * _CDF_BLOCK + _inverse_cdf_small(chosen_block, target - mass_before_block)


def sample_from_uniform(
    logits: Array, uniform: Array, temperature: Scalar = 1.0, top_k: int | None = None, top_p: Scalar = 1.0
) -> tuple[Array, Array]:
    """`sample_token` with the randomness given as one uniform number in [0, 1) per row.

    This is what `generate` runs per token: all uniforms of a call are drawn before the decoding
    loop (one `[N, B]` draw), so no random bits are generated per step and only one number per row
    and token is needed, whatever the vocabulary size (Gumbel-max would need `[B, V]`).
    """
    logits = logits.astype(jnp.float32)
    if _is_greedy(temperature):
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tokens, _chosen_logprob(logits, tokens)
    if isinstance(temperature, (int, float)):
        scaled = logits / temperature if temperature != 1 else logits
        traced_zero = None
    else:  # traced temperature: 0 still means greedy, decided at run time
        temperature = jnp.asarray(temperature, jnp.float32)
        traced_zero = temperature == 0
        scaled = logits / jnp.where(traced_zero, 1.0, temperature)

    filter_top_p = not (isinstance(top_p, (int, float)) and top_p >= 1.0)
    if top_k is not None and top_k < logits.shape[-1]:
        # Only the k largest survive: draw among them (already sorted, so top-p needs no sort).
        top_logits, top_indices = jax.lax.top_k(scaled, top_k)
        if filter_top_p:
            top_logits = top_p_filter(top_logits, top_p)
        weights = jnp.exp(top_logits - top_logits[:, :1])
        picked = _inverse_cdf_small(weights, uniform * jnp.sum(weights, axis=-1))
        tokens = jnp.take_along_axis(top_indices, picked[:, None], axis=1)[:, 0].astype(jnp.int32)
    else:
        filtered = top_p_filter(scaled, top_p) if filter_top_p else scaled
        weights = jnp.exp(filtered - jnp.max(filtered, axis=-1, keepdims=True))
        tokens = inverse_cdf_sample(weights, uniform)
    if traced_zero is not None:
        tokens = jnp.where(traced_zero, jnp.argmax(logits, axis=-1).astype(jnp.int32), tokens)
    return tokens, _chosen_logprob(scaled, tokens)


def _chosen_logprob(scaled_logits: Array, tokens: Array) -> Array:
    """`log softmax(scaled_logits)[token]` per row."""
    chosen = jnp.take_along_axis(scaled_logits, tokens[:, None], axis=-1)[:, 0]
    return chosen - jax.nn.logsumexp(scaled_logits, axis=-1)


def sample_token(
    logits: Array, key: Array, temperature: Scalar = 1.0, top_k: int | None = None, top_p: Scalar = 1.0
) -> tuple[Array, Array]:
    """Draws one token per row from `[B, V]` logits; returns `(tokens [B] int32, logprobs [B] f32)`.

    `logprobs` is `log softmax(logits / T)` at the chosen token, before top-k/top-p filtering
    (T = 1 when greedy). `temperature` and `top_p` may be traced; a Python 0 temperature selects
    greedy decoding statically, and a traced 0 gives the argmax too (with T = 1 for the log-probs).
    The draw is by inverse CDF from one uniform number per row (`sample_from_uniform`).
    """
    uniform = jax.random.uniform(key, logits.shape[:1], jnp.float32)
    return sample_from_uniform(logits, uniform, temperature, top_k, top_p)


def eos_tuple(eos_token_id) -> tuple[int, ...]:
    """Every way an EOS is given (None, one id, a tuple or list of ids) as a tuple of ids; None
    gives ``()`` (no EOS: responses run to ``max_new_tokens``)."""
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, (list, tuple, np.ndarray)):
        return tuple(_as_index(e, "eos_token_id") for e in np.asarray(eos_token_id, dtype=object).reshape(-1))
    return (_as_index(eos_token_id, "eos_token_id"),)


def is_eos(tokens: Array, eos_token_id) -> Array:
    """``tokens`` (any shape) equal to one of the EOS ids (`eos_tuple`), as bools."""
    hit = jnp.zeros(tokens.shape, bool)
    for eos in eos_tuple(eos_token_id):
        hit |= tokens == eos
    return hit


# ----------------------------------------------------------------------------------------------
# Argument checks: on shapes, dtypes and concrete values, at the Python boundary before tracing


def _any_over_axis(flag: Array, axis_name: str | None) -> Array:
    """A scalar bool flag (e.g. "some row is still decoding"), or-ed over the members of the vmapped
    axis ``axis_name`` when given (an unbatched scalar there: see `generate`'s stop_axis_name)."""
    if axis_name is None:
        return flag
    return jax.lax.psum(flag.astype(jnp.int32), axis_name) > 0


def _as_index(value, name: str) -> int:
    """`value` as a Python int when it is an integer (Python, NumPy or a 0-d integer array)."""
    if not isinstance(value, (bool, np.bool_)):
        try:
            return operator.index(value)
        except TypeError:
            concrete = _concrete(value)
            if concrete is not None and concrete.ndim == 0 and np.issubdtype(concrete.dtype, np.integer):
                return int(concrete)
    raise ValueError(f"{name} must be an integer, got {value!r}")


def _concrete_scalar(value, name: str, where: str) -> float | None:
    """A concrete real scalar as a float, None when traced; ValueError for non-scalars."""
    if np.ndim(value) != 0:
        raise ValueError(f"{where}: {name} must be a scalar, got shape {np.shape(value)}")
    concrete = _concrete(value)
    if concrete is None:
        return None
    if not (np.issubdtype(concrete.dtype, np.number) or concrete.dtype == np.bool_):
        raise ValueError(f"{where}: {name} must be a number, got {value!r}")
    return float(concrete)


def model_limits(model) -> tuple[int | None, int | None]:
    """`(vocab_size, max_position_embeddings)` from `model.config`, None where the model has none."""
    config = getattr(model, "config", None)

    def read(name):
        value = getattr(config, name, None)
        return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else None

    return read("vocab_size"), read("max_position_embeddings")


def check_sampling_options(
    *,
    max_new_tokens,
    temperature: Scalar | np.number = 1.0,
    top_k=None,
    top_p: Scalar | np.number = 1.0,
    eos_token_id=None,
    pad_token_id=0,
    vocab_size: int | None = None,
    where: str = "generate",
) -> tuple[int, tuple[int, ...]]:
    """Validates the sampling arguments of `generate`; returns `(max_new_tokens, eos_ids)`.

    Valid values (ValueError otherwise, naming the argument and the value):

    - `max_new_tokens`: an integer >= 1.
    - `temperature`: a finite number >= 0 (0 = greedy). Checked when concrete (Python, NumPy or a
      concrete jax scalar); a traced temperature is not checked (see `generate`).
    - `top_k`: None (off) or an integer >= 1; k >= vocabulary size keeps every token.
    - `top_p`: a number in (0, 1]; 1 = off. Checked when concrete.
    - `eos_token_id`: None, an integer or a sequence of integers, each in [0, vocab_size).
    - `pad_token_id`: an integer in [0, vocab_size) (it is fed back to the model after EOS).

    Without `vocab_size` (a model with no `config.vocab_size`) ids are only checked to be >= 0.
    """
    num_new = _as_index(max_new_tokens, f"{where}: max_new_tokens")
    if num_new < 1:
        raise ValueError(f"{where}: max_new_tokens must be >= 1, got {num_new}")
    t = _concrete_scalar(temperature, "temperature", where)
    if t is not None and not (math.isfinite(t) and t >= 0):
        raise ValueError(f"{where}: temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None:
        k = _as_index(top_k, f"{where}: top_k")
        if k < 1:
            raise ValueError(f"{where}: top_k must be None (off) or >= 1, got {k}")
    p = _concrete_scalar(top_p, "top_p", where)
    if p is not None and not (0.0 < p <= 1.0):
        raise ValueError(f"{where}: top_p must be in (0, 1] (1 = off), got {top_p!r}")
    eos_ids = eos_tuple(eos_token_id)
    upper = f"{vocab_size}" if vocab_size is not None else "inf"
    for eos in eos_ids:
        if eos < 0 or (vocab_size is not None and eos >= vocab_size):
            raise ValueError(
                f"{where}: eos_token_id {eos} is outside the vocabulary [0, {upper}): the model can "
                f"never emit it, so generation would never stop at it"
            )
    pad = _as_index(pad_token_id, f"{where}: pad_token_id")
    if pad < 0 or (vocab_size is not None and pad >= vocab_size):
        raise ValueError(f"{where}: pad_token_id {pad} is outside the vocabulary [0, {upper})")
    return num_new, eos_ids


def check_engine_options(
    num_prompts: int | None,
    *,
    num_generations=1,
    slots=None,
    mesh: Mesh | None = None,
    cache_segments=None,
    where: str = "generate",
) -> tuple[int, int | None, int]:
    """Validates `generate`'s engine arguments; returns `(G, S or None, batch shards)`.

    - `num_generations`: an integer G >= 1;
    - `slots`: None or an integer S with `1 <= S <= num_prompts * G` (the rows it serves; no
      upper bound when `num_prompts` is None, i.e. not known yet); not with `cache_segments`;
    - with a `mesh` and G > 1 or `slots`: `num_prompts * G` (and S) must be multiples of the
      mesh's batch shards (`jaxrlhf.sharding.batch_size_divisor`), so every device holds whole
      rows and slots.
    """
    group = _as_index(num_generations, f"{where}: num_generations")
    if group < 1:
        raise ValueError(f"{where}: num_generations must be >= 1, got {group}")
    rows = None if num_prompts is None else num_prompts * group
    num_slots = None
    if slots is not None:
        num_slots = _as_index(slots, f"{where}: slots")
        if num_slots < 1:
            raise ValueError(f"{where}: slots must be None (static batch) or >= 1, got {num_slots}")
        if rows is not None and num_slots > rows:
            raise ValueError(
                f"{where}: slots must be at most the rows they serve, {rows} ({num_prompts} prompts x "
                f"num_generations={group}), got {num_slots}"
            )
        if cache_segments is not None:
            raise ValueError(
                f"{where}: cache_segments applies to the static batch (slots=None); refilled slots decode "
                f"rows at different steps with one full-length cache, got cache_segments={cache_segments!r}"
            )
    shards = 1 if mesh is None else batch_size_divisor(mesh)
    if rows is not None and shards > 1 and (group > 1 or num_slots is not None):
        if rows % shards:
            raise ValueError(
                f"{where}: the {rows} rows ({num_prompts} prompts x num_generations={group}) must be a "
                f"multiple of the mesh's {shards} batch shards"
            )
        if num_slots is not None and num_slots % shards:
            raise ValueError(
                f"{where}: slots={num_slots} must be a multiple of the mesh's {shards} batch shards "
                f"(every device serves its own rows with its own slots)"
            )
    return group, num_slots, shards


def _dtype_of(array) -> np.dtype:
    """The dtype of an array or tracer (without reading its values), or of a list's NumPy copy."""
    dtype = getattr(array, "dtype", None)
    return np.dtype(dtype if dtype is not None else np.asarray(array).dtype)


def _first_bad(bad: np.ndarray) -> tuple[int, int, int]:
    """(row, column, count) of the first True entry of a `[B, P]` bool array."""
    rows, cols = np.nonzero(bad)
    return int(rows[0]), int(cols[0]), int(rows.size)


def check_prompts(
    prompt_ids,
    prompt_mask,
    *,
    vocab_size: int | None = None,
    max_new_tokens: int | None = None,
    max_positions: int | None = None,
    where: str = "generate",
) -> None:
    """Validates a left-padded prompt batch; errors name the row (and column) and the value.

    Always (shapes and dtypes are static, known even under `jax.jit`):

    - `prompt_ids` and `prompt_mask` are both `[B, P]` with the same shape, P >= 1;
    - `prompt_ids` has an integer dtype (float ids would be truncated), `prompt_mask` an integer,
      bool or float dtype.

    When the values are concrete (NumPy, lists, or jax arrays outside a trace; a traced array is
    skipped, see `generate`):

    - every id, padding included, is in [0, vocab_size) (negative ids would wrap around to other
      tokens, ids >= vocab_size give NaN embeddings);
    - the mask holds only 0 and 1, no row is all zeros (an empty prompt), and the last column is 1
      in every row (left padding: the last prompt token is real);
    - the longest prompt plus `max_new_tokens` fits the position table:
      `max_b sum(prompt_mask[b]) + max_new_tokens <= max_positions` (learned positions beyond the
      table would be clamped; rotary models are configured up to `max_position_embeddings`).
    """
    id_shape, mask_shape = tuple(np.shape(prompt_ids)), tuple(np.shape(prompt_mask))
    if len(id_shape) != 2:
        raise ValueError(f"{where}: prompt_ids must be a [batch, width] array, got shape {id_shape}")
    if mask_shape != id_shape:
        raise ValueError(
            f"{where}: prompt_ids and prompt_mask must have the same shape, got {id_shape} and {mask_shape}"
        )
    if id_shape[1] < 1:
        raise ValueError(f"{where}: prompts must have at least one column, got shape {id_shape}")
    id_dtype = _dtype_of(prompt_ids)
    if not np.issubdtype(id_dtype, np.integer):
        raise ValueError(f"{where}: prompt_ids must be an integer array, got dtype {id_dtype}")
    mask_dtype = _dtype_of(prompt_mask)
    if not (np.issubdtype(mask_dtype, np.number) or mask_dtype == np.bool_):
        raise ValueError(f"{where}: prompt_mask must be a 0/1 array, got dtype {mask_dtype}")

    mask = _concrete(prompt_mask)
    if mask is not None:
        bad = (mask != 0) & (mask != 1)
        if bad.any():
            row, col, count = _first_bad(bad)
            raise ValueError(
                f"{where}: prompt_mask must hold only 0 and 1; row {row}, column {col} is "
                f"{mask[row, col].item()!r} ({count} such entries)"
            )
        lengths = mask.astype(np.int64).sum(axis=1)
        empty = np.flatnonzero(lengths == 0)
        if empty.size:
            raise ValueError(
                f"{where}: prompt_mask row {int(empty[0])} is all zeros, an empty prompt "
                f"({empty.size} such rows): every row needs at least one real token"
            )
        not_left_padded = np.flatnonzero(mask[:, -1] == 0)
        if not_left_padded.size:
            raise ValueError(
                f"{where}: prompt_mask row {int(not_left_padded[0])} is 0 in the last column "
                f"({not_left_padded.size} such rows): prompts must be left-padded (the last "
                f"token of every row real)"
            )
        if max_new_tokens is not None and max_positions is not None:
            row = int(np.argmax(lengths))
            if lengths[row] + max_new_tokens > max_positions:
                raise ValueError(
                    f"{where}: prompt row {row} has {int(lengths[row])} tokens; with max_new_tokens="
                    f"{max_new_tokens} prompt and response need {int(lengths[row]) + max_new_tokens} positions, "
                    f"more than the model's max_position_embeddings={max_positions}: shorten the prompts or "
                    f"max_new_tokens"
                )
    ids = _concrete(prompt_ids)
    if ids is not None:
        bad = (ids < 0) | (ids >= vocab_size) if vocab_size is not None else ids < 0
        if bad.any():
            row, col, count = _first_bad(bad)
            upper = vocab_size if vocab_size is not None else "inf"
            raise ValueError(
                f"{where}: prompt_ids row {row}, column {col} is {int(ids[row, col])}, outside the "
                f"vocabulary [0, {upper}) ({count} such ids; padding must be a valid id too, "
                f"e.g. pad_token_id)"
            )


# ----------------------------------------------------------------------------------------------
# generate


class _DecodeState(NamedTuple):
    step: Array  # index i of the next response token to sample
    last_tokens: Array  # [B] the token before response token i (last prompt token when i = 0)
    cache: Any
    done: Array  # [B] bool: row has emitted EOS at a step < i
    tokens: Array  # [B, N]
    logprobs: Array  # [B, N]
    mask: Array  # [B, N]


def segment_ends(max_new_tokens: int, cache_segments: int | None = None) -> tuple[int, ...]:
    """Response steps at which each decode segment ends (exclusive), as equal as possible.

    `cache_segments=None` picks `min(4, max(1, N // 16))`: segments of at least 16 steps, at most
    4 loops to compile.
    """
    num_new = int(max_new_tokens)
    if cache_segments is None:
        cache_segments = min(4, max(1, num_new // 16))
    if int(cache_segments) < 1:
        raise ValueError(f"cache_segments must be >= 1, got {cache_segments}")
    count = min(int(cache_segments), num_new)
    return tuple(-(-num_new * (j + 1) // count) for j in range(count))


def generate(
    model,
    params,
    prompt_ids: Array,
    prompt_mask: Array,
    key: Array,
    *,
    max_new_tokens: int,
    temperature: Scalar = 1.0,
    top_k: int | None = None,
    top_p: Scalar = 1.0,
    eos_token_id=None,
    pad_token_id: int = 0,
    cache_segments: int | None = None,
    stop_axis_name: str | None = None,
    num_generations: int = 1,
    slots: int | None = None,
    mesh: Mesh | None = None,
) -> SampleOutput:
    """Samples `max_new_tokens` tokens after each (left-padded) prompt; traceable and jit-safe.

    Args:
      model: a `LanguageModel` (static: anything with `forward(params, ids, mask, positions,
        cache, cache_index, cache_size)`, `init_cache(batch, max_len)` and
        `grow_cache(cache, max_len)`; an optional `decoding_params(params)` is applied once
        before the loop; with `num_generations > 1` also `take_cache_rows(cache, rows)`, with
        `slots` also `put_cache_prefix(cache, prefix, which)` and a `[B]` `cache_index`). Its
        `config.vocab_size` and `config.max_position_embeddings`, when it has them, bound the ids
        and the lengths below.
      params: its parameter pytree.
      prompt_ids: `[B, P]` integer token ids in [0, vocab_size), left-padded (padding included).
      prompt_mask: `[B, P]` 0/1 (int, bool or float), 1 for real prompt tokens, 0 for the left
        padding; every row has at least one real token and a real last token.
      key: a `jax.random` key (one `[N, B]` uniform draw per call).
      max_new_tokens: N >= 1 (static). The longest prompt plus N must fit the position table:
        `max_b sum(prompt_mask[b]) + N <= config.max_position_embeddings`.
      temperature: T, a finite number >= 0; 0 means greedy (may be traced; a Python 0 compiles
        a greedy-only loop).
      top_k: keep the k most likely tokens, an integer >= 1 (static; None = off; k >= V keeps all).
      top_p: nucleus mass in (0, 1] (may be traced; 1 = off, and a Python 1.0 compiles no sort).
      eos_token_id: an int, a tuple of ints, or None (static); each in [0, vocab_size).
      pad_token_id: written after the first EOS (static), in [0, vocab_size).
      cache_segments: number of decode loops with growing caches (static; None: see
        `segment_ends`). Changes only speed and compile time, not the samples' distribution.
      stop_axis_name: the name of a `jax.vmap` axis this call runs under (a sweep's runs), or
        None. The loop's early stop then waits until every row of every member of that axis is
        done: `any_over_axis(any_b ~done[b])`, a reduction over the named axis. Under `vmap` a
        per-member stop is a batched predicate, which JAX lowers by running the loop until all
        members stop anyway while selecting, in every step, each carry (the whole KV cache
        included) between its old and new value; naming the axis keeps that trip count with an
        unbatched predicate and no selects. Rows that are done only write `pad_token_id`, log-prob
        0 and mask 0, so tokens, log-probs and mask are identical either way. Outside a `vmap`
        (or `shard_map`) binding that name, tracing fails with an unbound axis name. With `slots`
        the refills wait for the same reduction (every member refills when one needs it).
      num_generations: G >= 1 (static): each prompt row is sampled G times, as G consecutive
        output rows (row b is a response to prompt b // G, every row with its own draws), and
        its prompt is prefilled once for its G rows. The output is `[B * G, N]` for `[B, P]`
        prompts, the same as for the prompts repeated G times (`jnp.repeat(prompt_ids, G, 0)`)
        with G = 1.
      slots: None (static batch: every row decodes in one batch until the last one ends) or S
        (static), the rollout engine (`jaxrlhf.engine`): S decode slots serve the `B * G` rows,
        a slot whose row ends taking the next waiting row, until all are done. The rows and their
        random draws are those of the static batch; the loop's steps are about the rows'
        summed lengths divided by S instead of the longest row's length. `1 <= S <= B * G`;
        not with `cache_segments` (the slots' rows are at different steps: one full-length cache).
      mesh: the mesh the rows are split over (its batch axes, `jaxrlhf.sharding.batch_sharding`),
        or None. The rows of a shared prefill and the engine's slots are kept on it (sharding
        constraints), and with `slots` every device's slots serve its own rows (S and B * G must
        be multiples of the number of batch shards). Changes where things are computed, not the
        samples.

    Argument checks. Everything above is validated before tracing (`check_sampling_options`,
    `check_prompts`), so the decoding loop pays nothing; a violation raises ValueError naming the
    argument, the row (and column) and the value. Shapes, dtypes and the static arguments are
    always checked. Values are checked when concrete: Python or NumPy values, and jax arrays when
    `generate` is called outside a trace (or closed over as constants). Under the caller's
    `jax.jit` with traced arguments their values can not be read and are not checked:

    - traced `prompt_ids` / `prompt_mask`: ids outside [0, V) read wrapped (negative) or NaN
      (>= V) embeddings, an all-zero mask row samples from an empty prompt, and positions past
      a learned table are clamped to its last entry. Check such prompts once on the host with
      `check_prompts` (`Sampler` does this on every call).
    - traced `temperature`: 0 gives greedy tokens (log-probs at T = 1), T > 0 samples; a negative
      T samples from `softmax(l / T)`, which favours the least likely tokens, and NaN gives
      arbitrary tokens with NaN log-probs.
    - traced `top_p`: p <= 0 or NaN keeps only the most likely token (greedy among the top-k),
      p >= 1 keeps every token.

    LongRoPE models (Phi-3): a row whose length reaches the original context + 1 has its cache
    recomputed with the long factors at that step, as transformers' `generate` does
    (`engine.recompute_cache_rows`, docs/sampling.md).

    Returns:
      `SampleOutput(tokens, logprobs, mask)`, each `[B, N]`. `logprobs` are
      `log softmax(logits / T)` of the chosen tokens before top-k/top-p filtering (T = 1 when
      greedy), 0 where `mask` is 0. `mask` is 1 up to and including each row's first EOS and 0
      after it; tokens after it are `pad_token_id`. A row without EOS has mask 1 everywhere.
    """
    vocab_size, max_positions = model_limits(model)
    num_new, eos_ids = check_sampling_options(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        vocab_size=vocab_size,
    )
    check_prompts(prompt_ids, prompt_mask, vocab_size=vocab_size, max_new_tokens=num_new, max_positions=max_positions)
    pad_token_id = _as_index(pad_token_id, "pad_token_id")
    num_prompts, prompt_len = np.shape(prompt_ids)
    group, num_slots, shards = check_engine_options(
        num_prompts, num_generations=num_generations, slots=slots, mesh=mesh, cache_segments=cache_segments
    )
    batch = num_prompts * group
    prompt_ids = jnp.asarray(prompt_ids).astype(jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask).astype(jnp.int32)
    if hasattr(model, "decoding_params"):  # e.g. a transposed copy of a tied output layer, made once
        params = model.decoding_params(params)
    # All randomness of the call in one draw; token i of row b uses uniforms[i, b].
    uniforms = jax.random.uniform(key, (num_new, batch), jnp.float32)

    def constrain(x, axis: int = 0):  # keep a [.., B, ..] array split over the mesh's batch shards
        return x if mesh is None else jax.lax.with_sharding_constraint(x, batch_sharding(mesh, axis))

    if group > 1 and shards > 1 and num_prompts % shards and group < shards:
        # The prompts cannot be split over the shards: a shared prefill would run all of them on
        # every device, more than the rows each device prefills after repeating them.
        prompt_ids, prompt_mask = (constrain(jnp.repeat(x, group, axis=0)) for x in (prompt_ids, prompt_mask))
        num_prompts, group = batch, 1

    def prefill(cache_size):  # the distinct prompts' first P - 1 tokens, into a fresh cache
        # The last prompt token is the first token the loop feeds, so the prefill's logits are
        # unused (XLA drops their computation: no [B, P, V] head matmul).
        if prompt_len > 1:
            return model.forward(params, prompt_ids[:, :-1], prompt_mask[:, :-1], cache_size=cache_size).cache
        return model.init_cache(num_prompts, cache_size)

    def sample(logits, uniform):
        return sample_from_uniform(logits, uniform, temperature, top_k, top_p)

    if num_slots is not None:
        prompt_cache = prefill(prompt_len - 1) if prompt_len > 1 else None
        rows = engine.row_prompts(prompt_ids, prompt_mask, group, num_new)

        tokens, logprobs, mask = engine.decode_in_slots(
            model,
            params,
            prompt_cache,
            rows,
            uniforms,
            num_slots=num_slots,
            num_new=num_new,
            prompt_len=prompt_len,
            sample=sample,
            is_stop=lambda tokens: is_eos(tokens, eos_ids),
            pad_token_id=pad_token_id,
            any_over_axis=lambda alive: _any_over_axis(alive, stop_axis_name),
            slot_groups=shards,
            constrain=None if mesh is None else constrain,
            prompt_ids=prompt_ids,
            rope_switch=engine.long_rope_switch(model, prompt_len, num_new),
        )
        return SampleOutput(tokens, logprobs, mask)

    ends = segment_ends(num_new, cache_segments)

    def slots_until(end):  # steps < end write slots < P - 1 + end
        return prompt_len - 1 + end

    # Prefill all prompt tokens but the last, once per distinct prompt (shared by its G rows).
    cache = prefill(slots_until(ends[0]))
    if group > 1:
        prompt_of_row = jnp.arange(batch, dtype=jnp.int32) // group
        cache = model.take_cache_rows(cache, prompt_of_row)
        cache = jax.tree.map(lambda b: constrain(b, cache_batch_axis(b)), cache)
        prompt_ids, prompt_mask = (constrain(jnp.take(x, prompt_of_row, axis=0)) for x in (prompt_ids, prompt_mask))
    # Every response slot is marked visible up front; causality hides the unwritten ones.
    slot_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, num_new - 1), jnp.int32)], axis=1)
    last_prompt_position = jnp.maximum(jnp.sum(prompt_mask, axis=1) - 1, 0)

    state = _DecodeState(
        step=jnp.int32(0),
        last_tokens=prompt_ids[:, -1],
        cache=cache,
        done=jnp.zeros((batch,), bool),
        tokens=jnp.full((batch, num_new), pad_token_id, jnp.int32),
        logprobs=jnp.zeros((batch, num_new), jnp.float32),
        mask=jnp.zeros((batch, num_new), jnp.int32),
    )

    rope_switch = engine.long_rope_switch(model, prompt_len, num_new)

    def decode_step(state: _DecodeState, segment_mask: Array) -> _DecodeState:
        """Feeds `last_tokens` at slot P - 1 + i and samples response token i."""
        step = state.step
        positions = last_prompt_position + step
        cache = state.cache
        if rope_switch is not None:  # LongRoPE: a row whose length passes the original context now
            cache = engine.recompute_cache_rows(
                model,
                params,
                cache,
                ~state.done & (positions == rope_switch),
                lambda flag: _any_over_axis(flag, stop_axis_name),
                lambda: jnp.concatenate([prompt_ids, state.tokens], axis=1),
                segment_mask,
                prompt_len - 1 + step,
            )
        out = model.forward(
            params,
            state.last_tokens[:, None],
            segment_mask,
            positions=positions[:, None],
            cache=cache,
            cache_index=prompt_len - 1 + step,
        )
        uniform = jax.lax.dynamic_index_in_dim(uniforms, step, axis=0, keepdims=False)
        tokens, logprobs = sample(out.logits[:, 0, :], uniform)
        valid = ~state.done
        tokens = jnp.where(valid, tokens, pad_token_id)

        def put(buffer, column):
            return jax.lax.dynamic_update_slice_in_dim(buffer, column[:, None], step, axis=1)

        return _DecodeState(
            step=step + 1,
            last_tokens=tokens,
            cache=out.cache,
            done=state.done | is_eos(tokens, eos_ids),
            tokens=put(state.tokens, tokens),
            logprobs=put(state.logprobs, jnp.where(valid, logprobs, 0.0)),
            mask=put(state.mask, valid.astype(jnp.int32)),
        )

    for segment, end in enumerate(ends):
        num_segment_slots = slots_until(end)
        if segment > 0:
            state = state._replace(cache=model.grow_cache(state.cache, num_segment_slots))
        segment_mask = slot_mask[:, :num_segment_slots]
        state = jax.lax.while_loop(
            lambda s, end=end: (s.step < end) & _any_over_axis(~jnp.all(s.done), stop_axis_name),
            lambda s, segment_mask=segment_mask: decode_step(s, segment_mask),
            state,
        )
    return SampleOutput(state.tokens, state.logprobs, state.mask)


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
    return (
        np.pad(prompt_ids.astype(np.int32), widths, constant_values=pad_token_id),
        np.pad(prompt_mask.astype(np.int32), widths, constant_values=0),
    )


class Sampler:
    """`generate` compiled once per (batch, prompt bucket): call it as `sampler(params, ids, mask, key)`.

    Prompts are left-padded on the host up to the next length in `prompt_buckets`, so a new prompt
    length reuses the compiled program of its bucket. With a `mesh`, the batch is split over its
    batch axes (`jaxrlhf.sharding.batch_sharding`: data parallel; parameters keep their own
    sharding, replicated if unsharded) and the outputs come back sharded the same way.
    `trace_count` counts how often `generate` was traced (compiled), for tests.

    `tuning` (`jaxrlhf.tuning`): `"auto"` (default) compiles each batch size with
    `Tuning.for_backend` for its rows per device and the model's width, i.e. the backend's fast
    path, model-level choices and XLA compiler options included; a `Tuning` is used for every
    call; None is `Tuning()` (portable, no compiler options). The model decodes with that tuning
    (`model.with_tuning`), whatever its own.

    The sampling arguments are checked once here, and every call's prompts on the host before
    padding (as in `generate`: ids in [0, vocab_size), 0/1 masks without empty rows, left padding,
    the longest prompt plus `max_new_tokens` within the position table), so the checks cost no
    device time and the jitted program has none.

    `num_generations` (G) and `slots` (S) are `generate`'s: each prompt is sampled G times (one
    shared prefill; the output has G consecutive rows per prompt), and with S the rows decode
    through S refilled slots (the rollout engine). With a `mesh` the rows and the slots are split
    over its batch shards (prompts that do not split evenly are replicated).
    """

    def __init__(
        self,
        model,
        *,
        max_new_tokens: int,
        temperature=1.0,
        top_k: int | None = None,
        top_p=1.0,
        eos_token_id=None,
        pad_token_id: int = 0,
        prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
        mesh: Mesh | None = None,
        tuning: Tuning | str | None = "auto",
        cache_segments: int | None = None,
        num_generations: int = 1,
        slots: int | None = None,
    ):
        self.vocab_size, self.max_positions = model_limits(model)
        self.max_new_tokens, _ = check_sampling_options(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            vocab_size=self.vocab_size,
            where="Sampler",
        )
        if not (tuning is None or tuning == "auto" or isinstance(tuning, Tuning)):
            raise ValueError(f"Sampler: tuning must be a Tuning, 'auto' or None, got {tuning!r}")
        # Checked here without the rows, and against each call's rows in `__call__`.
        self.num_generations, self.slots, _ = check_engine_options(
            None, num_generations=num_generations, slots=slots, cache_segments=cache_segments, where="Sampler"
        )
        self.model = model
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self.pad_token_id = pad_token_id
        self.mesh = mesh
        self.tuning = tuning
        self.trace_count = 0
        self._options: dict[str, Any] = dict(  # `generate`'s keyword arguments
            max_new_tokens=self.max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            cache_segments=cache_segments,
            num_generations=self.num_generations,
            slots=self.slots,
            mesh=mesh,
        )
        # No donation: the only per-call inputs are the small prompt arrays, and no output has their
        # shape, so XLA could not reuse them (the cache is created inside and updated in place).
        self._jit_kwargs: dict = {}
        if mesh is not None:
            self._input_sharding = batch_sharding(mesh)
            self._replicated = replicated(mesh)
            # One sharding for the whole output (a pytree prefix): every field is batch-sharded.
            self._jit_kwargs.update(out_shardings=self._input_sharding)
        self._programs: dict[Tuning, Any] = {}  # one jitted `generate` per tuning (jit caches the shapes)

    def tuning_for(self, batch: int) -> Tuning:
        """The `Tuning` a call with `batch` prompt rows compiles with (for the rows a decoding step
        feeds: `batch * num_generations`, or the slots)."""
        decode_rows = batch * self.num_generations if self.slots is None else self.slots
        rows_per_device = decode_rows // (1 if self.mesh is None else batch_size_divisor(self.mesh))
        return resolve_tuning(self.tuning, rows_per_device=rows_per_device, width=model_width(self.model))

    def _program(self, tuning: Tuning):
        if tuning not in self._programs:
            model = self.model.with_tuning(tuning) if hasattr(self.model, "with_tuning") else self.model

            def run(params, prompt_ids, prompt_mask, key):
                self.trace_count += 1
                return generate(model, params, prompt_ids, prompt_mask, key, **self._options)

            self._programs[tuning] = tuning.jit(run, **self._jit_kwargs)
        return self._programs[tuning]

    def __call__(self, params, prompt_ids, prompt_mask, key) -> SampleOutput:
        # The prompts are concrete here (inside the jitted program generate sees them traced).
        check_prompts(
            prompt_ids,
            prompt_mask,
            vocab_size=self.vocab_size,
            max_new_tokens=self.max_new_tokens,
            max_positions=self.max_positions,
            where="Sampler",
        )
        check_engine_options(
            np.shape(prompt_ids)[0],
            num_generations=self.num_generations,
            slots=self.slots,
            mesh=self.mesh,
            where="Sampler",
        )
        width = bucket_length(np.shape(prompt_ids)[1], self.prompt_buckets)
        prompt_ids, prompt_mask = left_pad(prompt_ids, prompt_mask, width, self.pad_token_id)
        if self.mesh is not None:
            split = prompt_ids.shape[0] % batch_size_divisor(self.mesh) == 0
            sharding = self._input_sharding if split else self._replicated
            prompt_ids = jax.device_put(prompt_ids, sharding)
            prompt_mask = jax.device_put(prompt_mask, sharding)
            key = jax.device_put(key, self._replicated)
        else:
            prompt_ids, prompt_mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
        return self._program(self.tuning_for(prompt_ids.shape[0]))(params, prompt_ids, prompt_mask, key)


def make_sampler(model, **kwargs) -> Sampler:
    """A jitted, bucketed `Sampler` for `model`; keyword arguments as in `Sampler`."""
    return Sampler(model, **kwargs)
