"""Bounded staleness: the queue of rollouts in flight (``PPOConfig.max_staleness = k``).

A synchronous step samples a batch with the parameters of version ``t`` (``TrainState.step``) and
trains on it at once. With ``k > 0`` the state holds the k batches sampled but not yet trained
(every leaf ``[k, ...]``, oldest first), and step ``t``

    samples batch t + k with the parameters of version t     (the rollout of a later step)
    trains on the oldest in flight, batch t                   (sampled with version t - k)
    pushes batch t + k, drops batch t                         (the queue keeps its shape)

so once the queue is full every trained episode is exactly k updates old: the schedule of an
asynchronous system whose sampler runs k steps ahead of the learner (NeMo-RL's
``max_trajectory_age_steps``, AReaL's ``max_head_offpolicyness``, TRL's ``max_staleness``), as one
static-shape pipeline. Batch t + k's rollout depends only on version t, so on separate devices it
can run while batch t trains (`jaxrlhf.training.asynchronous`).

**Filling.** Before its first step a run fills the queue with batches 0 .. k - 1 sampled by the
initial parameters (`PPO.fill_pipeline`); step 0 then samples batch k with them too. The trained
batch t is thus ``min(t, k)`` versions old: the staleness ramps 0, 1, .., k over the first k steps
and stays k. Nothing is trained twice or skipped: batch t is trained at step t, by every schedule.

Every episode carries the parameter version that sampled it (``version``) and the prompt batch it
answers (``batch_index``, the driver's step index of its prompts; (batch_index, row) identifies an
episode), and the step logs them for the batch it trains (`staleness_stats`). The queue is part of
the `TrainState`, so a checkpoint holds the episodes in flight and a resumed run trains them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxrlhf.training.experience import PromptBatch, Rollout

# Domain separation of the keys that sample the batches filling the queue from the run's key.
_FILL_SALT = 0x0FF1


class InFlight(NamedTuple):
    """One batch of sampled, scored episodes waiting to be trained on.

    Attributes:
      prompts: the distinct prompts ``[B / G, P]`` (`PromptBatch`; each sampled G times).
      rollout: the responses ``[B, N]`` with the sampler's (behaviour) log-probs.
      raw_scores: ``[B]`` the reward's scores.
      version: ``[B]`` int32, the ``TrainState.step`` of the parameters that sampled each episode.
      batch_index: ``[B]`` int32, the step index of the prompt batch each episode answers.
      greedy: ``(greedy rollout [B / G, N], its raw scores [B / G])`` with ``greedy_rollout``, else
        None (ReMax's baseline, computed with the same parameters).
    """

    prompts: PromptBatch
    rollout: Rollout
    raw_scores: jax.Array
    version: jax.Array
    batch_index: jax.Array
    greedy: tuple[Rollout, jax.Array] | None = None


def empty_queue(k: int, prompts: int, prompt_len: int, rows: int, num_new: int, with_greedy: bool = False) -> InFlight:
    """A queue of ``k`` empty slots (zeros; ``version = batch_index = -1`` marks a slot as empty):
    ``prompts`` distinct prompts of ``prompt_len`` tokens and ``rows`` responses of ``num_new``."""
    zeros = lambda *shape, dtype=jnp.int32: jnp.zeros((k, *shape), dtype)  # noqa: E731
    empty = jnp.full((k, rows), -1, jnp.int32)
    greedy = None
    if with_greedy:
        greedy = (Rollout(zeros(prompts, num_new), zeros(prompts, num_new)), zeros(prompts, dtype=jnp.float32))
    return InFlight(
        prompts=PromptBatch(zeros(prompts, prompt_len), zeros(prompts, prompt_len)),
        rollout=Rollout(zeros(rows, num_new), zeros(rows, num_new), zeros(rows, num_new, dtype=jnp.float32)),
        raw_scores=zeros(rows, dtype=jnp.float32),
        version=empty,
        batch_index=empty,
        greedy=greedy,
    )


def oldest(queue: InFlight) -> InFlight:
    """The batch at the head of the queue (slot 0): the next one to train on."""
    return jax.tree.map(lambda x: x[0], queue)


def push(queue: InFlight, flight: InFlight) -> InFlight:
    """``queue`` without its oldest batch, with ``flight`` appended (in the queue's dtypes)."""
    return jax.tree.map(lambda q, x: jnp.concatenate([q[1:], x[None].astype(q.dtype)]), queue, flight)


def fill_key(key: jax.Array, slot, k: int) -> jax.Array:
    """The PRNG key that samples queue slot ``slot`` of ``k`` when a run fills its queue (a stream
    of its own, apart from the per-step splits of ``key``)."""
    return jax.random.split(jax.random.fold_in(key, _FILL_SALT), k)[slot]


def is_empty(queue: Any) -> bool:
    """Whether a queue (a single run's ``[k, ...]`` or a sweep's ``[R, k, ...]``) has an empty slot
    (read on the host: the driver fills the queue before the first step)."""
    return bool(jnp.any(jax.device_get(queue.version) < 0))


def staleness_stats(step: jax.Array, flight: InFlight) -> dict[str, jax.Array]:
    """The logged provenance of the batch a step trains on: ``episode_version_min`` /
    ``_max`` (the parameter versions that sampled it), ``staleness_max`` / ``_mean`` (``step -
    version``: updates between sampling and training), ``episode_batch_min`` / ``_max`` (the prompt
    batch it answers; equal to ``step`` for every episode when no batch is lost or repeated)."""
    version_B = flight.version.astype(jnp.float32)
    staleness_B = step.astype(jnp.float32) - version_B
    batch_B = flight.batch_index.astype(jnp.float32)
    return {
        "episode_version_min": jnp.min(version_B),
        "episode_version_max": jnp.max(version_B),
        "staleness_max": jnp.max(staleness_B),
        "staleness_mean": jnp.mean(staleness_B),
        "episode_batch_min": jnp.min(batch_B),
        "episode_batch_max": jnp.max(batch_B),
    }
