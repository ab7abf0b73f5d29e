"""Supervised fine-tuning (SFT): masked next-token cross-entropy, AdamW, one jitted step.

The loss of a batch is the mean, over the target tokens of the whole batch, of the negative
log-likelihood of each target given the tokens before it::

    loss = - sum_{b,t} m[b,t] * log p(x[b,t] | x[b,<t]) / max(1, sum_{b,t} m[b,t])

where ``m = loss_mask`` marks which tokens are targets (for a prompt/response pair: the response
tokens). ``m[:, 0]`` is ignored: the first token has nothing before it.

Usage::

    optimizer = make_optimizer(SFTConfig(learning_rate=1e-3), total_steps=2000)
    state = init_state(params, optimizer)
    step = make_train_step(model.apply, optimizer)          # jitted
    for batch in ...:                                        # dict of [B, L] int arrays
        state, metrics = step(state, batch)

or the whole loop with ``train_sft`` (epoch-wise shuffling from an explicit key, optional logger).
Everything is a pure function of its inputs; the model is any ``apply(params, ids, mask) -> logits``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrlhf.config import refuse_unknown_fields
from jaxrlhf.core.logprobs import token_logprobs
from jaxrlhf.models.positions import check_positions
from jaxrlhf.training.state import injected_adamw, schedule_multiplier

__all__ = [
    "SFTConfig",
    "SFTState",
    "make_optimizer",
    "init_state",
    "sft_loss",
    "make_train_step",
    "train_sft",
    "iterate_minibatches",
]

ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


@refuse_unknown_fields
@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Optimiser settings of an SFT run."""

    learning_rate: float = 1e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to the peak learning rate."""
    decay_to: float = 0.1
    """Cosine decay to this fraction of the peak by the last step (1.0: constant after warm-up)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (applied to every parameter)."""
    adam_b1: float = 0.9
    """AdamW beta1."""
    adam_b2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float | None = 1.0
    """Global gradient-norm clipping (None: off)."""

    def __post_init__(self):
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"SFTConfig.max_grad_norm must be > 0 or None (off), got {self.max_grad_norm!r}")


class SFTState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: updates done


def make_optimizer(config: SFTConfig, total_steps: int) -> optax.GradientTransformation:
    """The trainers' one AdamW (`jaxrlhf.training.state.injected_adamw`: optional global-norm
    clipping, numbers in the optimizer state) with warm-up, then cosine decay to ``decay_to`` of the
    peak at ``total_steps``."""
    numbers = {
        "learning_rate": config.learning_rate,
        "b1": config.adam_b1,
        "b2": config.adam_b2,
        "eps": config.adam_eps,
        "weight_decay": config.weight_decay,
    }
    if config.max_grad_norm is not None:
        numbers["max_grad_norm"] = config.max_grad_norm
    multiplier = schedule_multiplier(max(int(total_steps), 1), config.warmup_steps, "cosine", config.decay_to)
    return injected_adamw(numbers, multiplier)


def init_state(params, optimizer: optax.GradientTransformation) -> SFTState:
    return SFTState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


def sft_loss(apply_fn: ApplyFn, params, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """Masked next-token cross-entropy (see the module docstring) and its metrics.

    Args:
      apply_fn: ``apply(params, input_ids, attention_mask) -> logits [B, L, V]``.
      params: the model parameters.
      batch: ``input_ids``, ``attention_mask`` and optionally ``loss_mask`` (default: the attention
        mask), each ``[B, L]``.

    Returns:
      ``(loss, {"loss", "accuracy", "tokens"})``: ``accuracy`` is the fraction of target tokens that
      are the argmax of the logits. A batch without targets gives loss 0.
    """
    ids, attention = batch["input_ids"], batch["attention_mask"]
    loss_mask = batch.get("loss_mask", attention)
    logits_BxLxV = apply_fn(params, ids, attention)
    targets_BxT = ids[:, 1:]
    weights_BxT = (loss_mask[:, 1:] * attention[:, 1:]).astype(jnp.float32)
    logp_BxT = token_logprobs(logits_BxLxV[:, :-1], targets_BxT)
    count = jnp.sum(weights_BxT)
    denominator = jnp.maximum(count, 1.0)
    loss = -jnp.sum(logp_BxT * weights_BxT) / denominator
    correct = (jnp.argmax(logits_BxLxV[:, :-1], axis=-1) == targets_BxT).astype(jnp.float32)
    accuracy = jnp.sum(correct * weights_BxT) / denominator
    return loss, {"loss": loss, "accuracy": accuracy, "tokens": count}


def make_train_step(apply_fn: ApplyFn, optimizer: optax.GradientTransformation, *, jit: bool = True):
    """``step(state, batch) -> (state, metrics)``: one AdamW update on ``sft_loss``."""

    def step(state: SFTState, batch) -> tuple[SFTState, dict]:
        grad_fn = jax.grad(lambda p: sft_loss(apply_fn, p, batch), has_aux=True)
        grads, metrics = grad_fn(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
        return SFTState(params, opt_state, state.step + 1), metrics

    return jax.jit(step) if jit else step


def iterate_minibatches(key: jax.Array, data: Mapping[str, np.ndarray], batch_size: int, num_steps: int):
    """Yields ``num_steps`` minibatches, shuffling ``data`` anew each epoch from ``key``.

    Every minibatch has exactly ``batch_size`` rows (the tail of an epoch that does not fill one is
    dropped), so the jitted step compiles once. ``batch_size`` larger than the data set is clipped.
    """
    n = len(next(iter(data.values())))
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    epoch, step = 0, 0
    while step < num_steps:
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
        for i in range(per_epoch):
            if step >= num_steps:
                return
            rows = order[i * batch_size : (i + 1) * batch_size]
            yield {k: v[rows] for k, v in data.items()}
            step += 1
        epoch += 1


def train_sft(
    apply_fn: ApplyFn,
    params,
    data: Mapping[str, np.ndarray],
    key: jax.Array,
    *,
    config: SFTConfig = SFTConfig(),
    num_steps: int,
    batch_size: int,
    logger=None,
    log_every: int = 10,
    eval_fn: Callable[[Any, int], Mapping[str, Any]] | None = None,
    eval_every: int = 0,
):
    """Trains ``params`` on ``data`` for ``num_steps`` updates; returns ``(params, last_metrics)``.

    Args:
      apply_fn: the model's ``apply(params, ids, mask) -> logits``. When it is a model's bound
        ``apply`` (``model.apply``), rows longer than the model's learned position table are a
        ValueError before any work (`jaxrlhf.models.positions.check_positions`).
      params: initial parameters.
      data: ``input_ids``, ``attention_mask`` (and optionally ``loss_mask``) as ``[N, L]`` arrays.
      key: shuffling key.
      config: optimiser settings.
      num_steps, batch_size: updates and rows per update.
      logger: optional ``jaxrlhf.metrics_log.MetricsLogger`` (``log(step, metrics)``).
      log_every: log the training metrics every this many steps (and at the last step).
      eval_fn: optional ``eval_fn(params, step) -> metrics``, called every ``eval_every`` steps and
        at the end, logged under ``eval/``.
    """
    # `apply_fn` = `model.apply` names its model: rows past a learned position table are refused
    # here, before any work (the jitted step could not see them).
    check_positions(apply_fn, data["attention_mask"], where="train_sft")
    optimizer = make_optimizer(config, num_steps)
    state = init_state(params, optimizer)
    step_fn = make_train_step(apply_fn, optimizer)
    metrics: dict = {}
    for step, batch in enumerate(iterate_minibatches(key, data, batch_size, num_steps)):
        state, metrics = step_fn(state, batch)
        last = step == num_steps - 1
        record = {}
        if logger is not None and (step % log_every == 0 or last):
            record.update({k: float(v) for k, v in metrics.items()})
        if eval_fn is not None and ((eval_every and step % eval_every == 0) or last):
            record["eval"] = dict(eval_fn(state.params, step))
        if logger is not None and record:
            logger.log(step, record)
    metrics = {k: float(v) for k, v in metrics.items()}
    return state.params, metrics
