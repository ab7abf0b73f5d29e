"""The trainer's state pytree, its optimizers and the running score statistics.

Everything that changes during training lives in one `TrainState` (a pytree of arrays), so a step
is a pure function `state -> state` and a checkpoint is that pytree. What does not change (the
reference policy, a reward model's parameters) travels beside it as `FrozenParams`: it is not
checkpointed, because the run can always rebuild it from the checkpoints it started from.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxrlhf.core.kl_control import KLControllerState
from jaxrlhf.training.config import PPOConfig
from jaxrlhf.training.hparams import HyperParams, optimizer_numbers


class ScoreStats(NamedTuple):
    """Running moments of all scores seen (for ``score_norm="running"``).

    Merged batch by batch with Chan et al.'s parallel update:
    ``delta = mean_b - mean``, ``n' = n + n_b``, ``mean' = mean + delta * n_b / n'``,
    ``M2' = M2 + M2_b + delta^2 * n * n_b / n'``, ``var = M2 / (n - 1)``.
    """

    count: jax.Array  # float32 scalar (float: counts above 2^24 lose precision gracefully, not wrap)
    mean: jax.Array
    m2: jax.Array  # sum of squared deviations from the mean

    @classmethod
    def zeros(cls) -> ScoreStats:
        zero = jnp.zeros((), jnp.float32)
        return cls(zero, zero, zero)

    def update(self, scores_B: jax.Array) -> ScoreStats:
        scores_B = scores_B.astype(jnp.float32)
        batch_count = jnp.asarray(scores_B.shape[0], jnp.float32)
        batch_mean = jnp.mean(scores_B)
        batch_m2 = jnp.sum(jnp.square(scores_B - batch_mean))
        count = self.count + batch_count
        delta = batch_mean - self.mean
        mean = self.mean + delta * batch_count / count
        m2 = self.m2 + batch_m2 + jnp.square(delta) * self.count * batch_count / count
        return ScoreStats(count, mean, m2)

    @property
    def std(self) -> jax.Array:
        return jnp.sqrt(self.m2 / jnp.maximum(self.count - 1.0, 1.0))


@flax.struct.dataclass
class TrainState:
    """All mutable training state (a pytree; checkpointed as a whole).

    Attributes:
      step: int32 scalar, PPO iterations done.
      policy_params: the policy LM's parameters.
      value_params: the critic's parameters (``{"trunk", "head"}``), or only the value head's
        parameters when the critic shares the policy's trunk.
      policy_opt_state, value_opt_state: optax states of the two AdamW optimizers.
      kl_ctl: `KLControllerState` (the current KL coefficient beta).
      score_stats: `ScoreStats`, running moments of the raw scores.
      hparams: `HyperParams`, the numbers the step reads (clip ranges, gamma, temperature, ...);
        the learning rates and AdamW's constants are in the optimizer states' ``hyperparams``.
      key: the run's PRNG key (raw uint32[2]); split every step, so resuming is exact.
      pipeline: with ``max_staleness = k > 0``, the k rollouts in flight (`jaxrlhf.training.pipeline.InFlight`,
        every leaf ``[k, ...]``, oldest first), so a checkpoint holds them and resuming trains
        each exactly once; None (no leaves) for the synchronous trainer.
    """

    step: jax.Array
    policy_params: Any
    value_params: Any
    policy_opt_state: Any
    value_opt_state: Any
    kl_ctl: KLControllerState
    score_stats: ScoreStats
    hparams: HyperParams
    key: jax.Array
    pipeline: Any = None


class FrozenParams(NamedTuple):
    """Parameters read but never trained: the reference policy and an optional reward model."""

    ref_params: Any
    reward_params: Any = None


def schedule_multiplier(
    total_updates: int, warmup_steps: int, lr_schedule: str, end_fraction: float = 0.0
) -> optax.Schedule:
    """The shape of a learning-rate schedule, peak 1 (structure: it depends on lengths only).

    Linear warm-up from 0 over ``warmup_steps`` updates, then ``lr_schedule`` ("constant", or
    "linear" / "cosine" decay to ``end_fraction`` of the peak at update ``total_updates``). The
    learning rate of update n is ``peak_lr * multiplier(n)``, with ``peak_lr`` in the optimizer
    state. One schedule for every trainer (PPO, preference, SFT).
    """
    total_updates = max(total_updates, 1)
    warmup = min(warmup_steps, total_updates)
    decay_steps = max(total_updates - warmup, 1)
    if lr_schedule == "constant":
        after = optax.constant_schedule(1.0)
    elif lr_schedule == "linear":
        after = optax.linear_schedule(1.0, end_fraction, decay_steps)
    else:
        after = optax.cosine_decay_schedule(1.0, decay_steps, alpha=end_fraction)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), after], [warmup])


def learning_rate_multiplier(config: PPOConfig) -> optax.Schedule:
    """The PPO run's schedule shape over all its optimizer updates (`schedule_multiplier`)."""
    return schedule_multiplier(config.total_steps * config.updates_per_step, config.warmup_steps, config.lr_schedule)


def _clipped_adamw(learning_rate, b1, b2, eps, weight_decay, max_grad_norm=None, *, multiplier):
    """``clip_by_global_norm`` (if ``max_grad_norm`` is given), then AdamW with learning rate
    ``learning_rate * multiplier(update)``: optax's adamw written out so that every number may be
    an array from the optimizer state (`optax.inject_hyperparams`)."""
    clip = [] if max_grad_norm is None else [optax.clip_by_global_norm(max_grad_norm)]
    return optax.chain(
        *clip,
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_schedule(lambda count: -learning_rate * multiplier(count)),
    )


def injected_adamw(numbers: dict, multiplier: optax.Schedule) -> optax.GradientTransformation:
    """Clipped AdamW whose ``numbers`` (``learning_rate``, ``b1``, ``b2``, ``eps``,
    ``weight_decay`` and optionally ``max_grad_norm``) live in its state's ``hyperparams``
    (`optax.inject_hyperparams`); the schedule's shape ``multiplier`` is static."""
    factory = optax.inject_hyperparams(_clipped_adamw, static_args=("multiplier",), hyperparam_dtype=jnp.float32)
    return factory(**numbers, multiplier=multiplier)


def make_optimizer(config: PPOConfig, which: str = "policy") -> optax.GradientTransformation:
    """The ``"policy"`` or ``"value"`` optimizer: `injected_adamw` with the numbers of ``config``
    (peak learning rate, b1, b2, eps, weight decay, clip norm) and the run's schedule shape."""
    return injected_adamw(optimizer_numbers(config, which), learning_rate_multiplier(config))


def init_optimizer_state(optimizer: optax.GradientTransformation, params, numbers: dict):
    """``optimizer.init(params)`` with its injected numbers replaced by ``numbers`` (arrays, e.g.
    from `initial_numbers`), so one optimizer serves runs with different numbers."""
    opt_state = optimizer.init(params)
    return opt_state._replace(hyperparams={**opt_state.hyperparams, **numbers})
