"""The reward protocol: three ways to score a response, and what is done to scores before use.

1. A **JAX function** ``reward_fn(prompt_ids, prompt_mask, response_ids, response_mask) -> [B]``
   (any plain callable). It is traced inside the jitted train step; the fast path.
2. A **reward model**, `RewardModel(model)`: a scalar head on a transformer (a `ValueModel`, e.g.
   loaded from a reward-model checkpoint). The score is the head's output at the last valid token
   of prompt + response. Its parameters are passed as ``FrozenParams.reward_params``; it also runs
   inside the jitted step.
3. A **Python function on text**, `TextReward(fn)`: ``fn(prompts: list[str], responses: list[str])
   -> sequence of B floats``. It cannot be traced, so the step is split: jitted rollout -> decode
   and score on the host -> jitted update. Slower (a host round-trip per step), but any code works.

Scores then go through `postprocess_scores`: missing-EOS penalty, clipping, normalisation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.core.rewards import last_valid_index
from jaxrlhf.core.sequences import concat_prompt_response
from jaxrlhf.models.value import ValueModel
from jaxrlhf.sampling import is_eos
from jaxrlhf.training.config import PPOConfig
from jaxrlhf.training.hparams import HyperParams
from jaxrlhf.training.state import ScoreStats

# Below this standard deviation scores have no spread to normalise by and are left unscaled.
MIN_SCORE_STD = 1e-6

JaxRewardFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


class RewardShapeError(ValueError):
    """A reward function returned something other than one float score per response."""


class RewardTraceError(TypeError):
    """A JAX reward function could not be traced: it used the values of traced arrays in Python
    (``int(ids[b, 0])``, ``if score > 0:``, ``np.asarray(ids)``). The JAX error is its ``__cause__``."""


# What tracing raises when Python needs a traced array's value (bool / int conversion, NumPy).
TRACE_VALUE_ERRORS = (
    jax.errors.ConcretizationTypeError,  # TracerBoolConversionError is one
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerArrayConversionError,
)


@contextlib.contextmanager
def explain_trace_errors(what: str):
    """Re-raise a tracing failure of user code (a JAX reward, an environment) inside the jitted step
    as a `RewardTraceError`: a short message that points to `TextReward`, the original error chained."""
    try:
        yield
    except TRACE_VALUE_ERRORS as error:
        raise RewardTraceError(
            f"the {what} cannot run inside the jitted step: it reads a traced array's value in Python "
            f"({type(error).__name__}; e.g. `int(ids[b, 0]) == 3`, `if x > 0:`, `np.asarray(ids)`). Inside "
            "jax.jit the arrays have no values yet: write it with jnp operations (`jnp.where` for `if`), or "
            "score on the host with `jaxrlhf.training.TextReward(fn)`, fn(prompts, responses) -> floats on "
            "decoded text (docs/training.md, 'Reward protocol'). The JAX error is chained above."
        ) from error


class NonFiniteError(FloatingPointError):
    """A step produced NaN or inf (scores, losses or parameters); its state was not committed."""


@dataclasses.dataclass(frozen=True)
class RewardModel:
    """A reward model: ``score = head(trunk(prompt + response))`` at the response's last valid token.

    ``model`` is anything with ``apply(params, ids [B, L], mask [B, L]) -> [B, L]`` per-token
    scalars, e.g. a `jaxrlhf.models.ValueModel`. Its parameters go in ``FrozenParams.reward_params``.
    """

    model: ValueModel

    def __call__(self, params, ids_BxL: jax.Array, mask_BxL: jax.Array, last_index_B: jax.Array) -> jax.Array:
        values_BxL = self.model.apply(params, ids_BxL, mask_BxL)
        return jnp.take_along_axis(values_BxL, last_index_B[:, None], axis=1)[:, 0].astype(jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)  # tokenizers are not hashable: identity is equality
class TextReward:
    """A host-side reward on decoded text: ``fn(prompts, responses) -> B floats``.

    Args:
      fn: the scoring function (plain Python; runs outside jit).
      tokenizer: decodes token ids (``decode(ids, skip_special_tokens=True)``); None takes the
        policy's tokenizer in `jaxrlhf.training.train`.
      metrics_fn: optional ``metrics_fn(prompts, responses) -> {name: float}`` on the same texts
        (e.g. diversity), logged with the step's metrics by `train`.
    """

    fn: Callable[[Sequence[str], Sequence[str]], Sequence[float]]
    tokenizer: Any = None
    metrics_fn: Callable[[Sequence[str], Sequence[str]], Mapping[str, float]] | None = None


def decode_responses(tokenizer, ids_BxN, mask_BxN) -> list[str]:
    """Token ids -> one text per row: the tokens where ``mask != 0``, decoded with special tokens
    dropped (an EOS ends a response but is not part of its text). Works for prompts too."""
    ids_BxN, mask_BxN = np.asarray(ids_BxN), np.asarray(mask_BxN)
    return [tokenizer.decode(row[keep != 0].tolist(), skip_special_tokens=True) for row, keep in zip(ids_BxN, mask_BxN)]


def is_host_reward(reward) -> bool:
    return isinstance(reward, TextReward)


def check_scores(scores, batch_size: int, where: str = "reward function") -> jax.Array:
    """Trace-time check: one floating-point score per response, shape ``[B]``."""
    shape = getattr(scores, "shape", None)
    if shape != (batch_size,):
        raise RewardShapeError(
            f"the {where} must return one score per response, an array of shape ({batch_size},); "
            f"it returned {type(scores).__name__} with shape {shape}"
        )
    dtype = jnp.asarray(scores).dtype
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_):
        raise RewardShapeError(f"the {where} must return numeric scores, got dtype {dtype}")
    return jnp.asarray(scores).astype(jnp.float32)


def score_in_jit(reward, reward_params, prompt_ids, prompt_mask, response_ids, response_mask) -> jax.Array:
    """Raw scores ``[B]`` from a JAX reward function or a `RewardModel`, inside the jitted step."""
    batch_size = prompt_ids.shape[0]
    if isinstance(reward, RewardModel):
        ids_BxL, mask_BxL = concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)
        # Last valid token of the response; the last prompt slot when the response is empty.
        last_index_B = prompt_ids.shape[1] + last_valid_index(response_mask)
        scores = reward(reward_params, ids_BxL, mask_BxL, last_index_B)
        return check_scores(scores, batch_size, "reward model")
    if is_host_reward(reward):
        raise TypeError("a TextReward runs on the host; use the split step (rollout_fn + update_fn)")
    with explain_trace_errors(f"reward function {getattr(reward, '__name__', type(reward).__name__)!r}"):
        scores = reward(prompt_ids, prompt_mask, response_ids, response_mask)
    return check_scores(scores, batch_size)


def has_eos(response_ids: jax.Array, response_mask: jax.Array, eos_token_id) -> jax.Array:
    """``[B]`` bool: the response emitted an EOS token (in a valid position)."""
    return jnp.any(is_eos(response_ids, eos_token_id) & (response_mask != 0), axis=1)


def postprocess_scores(config: PPOConfig, raw_scores_B, eos_found_B, score_stats: ScoreStats, hparams: HyperParams):
    """Scores as they enter the step rewards, and the updated running statistics.

    In order: a response without EOS gets ``missing_eos_penalty`` (if set); then clipping to
    ``[-score_clip, score_clip]``; then normalisation:
    ``"batch"``: ``s / std_batch`` (``(s - mean) / std`` with shift_mean), std with Bessel's
    correction; ``"running"``: the same with the running moments, updated with this batch first.
    When there is no spread to divide by (a batch of one score, a first running batch of one, or
    all scores equal: ``std <= MIN_SCORE_STD``) the scores are not scaled (only centred with
    shift_mean), instead of becoming NaN or blowing up. Which steps apply is ``config``'s
    structure; the penalty and clip values come from ``hparams``.
    """
    scores_B = raw_scores_B
    if config.missing_eos_penalty is not None:
        scores_B = jnp.where(eos_found_B, scores_B, hparams.missing_eos_penalty)
    if config.score_clip is not None:
        scores_B = jnp.clip(scores_B, -hparams.score_clip, hparams.score_clip)
    # Running moments track the scores after penalty and clipping: what normalisation divides.
    new_stats = score_stats.update(scores_B)
    if config.score_norm == "batch":
        # Bessel's correction with a guard: jnp.std(ddof=1) of a single score is 0 / 0 = NaN.
        mean = jnp.mean(scores_B)
        num = scores_B.shape[0]
        std = jnp.sqrt(jnp.sum(jnp.square(scores_B - mean)) / max(num - 1, 1))
    elif config.score_norm == "running":
        mean, std = new_stats.mean, new_stats.std
    else:
        return scores_B, new_stats
    centre = mean if config.score_norm_shift_mean else 0.0
    scale = jnp.where(std > MIN_SCORE_STD, std, 1.0)
    return (scores_B - centre) / scale, new_stats
