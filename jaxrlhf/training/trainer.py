"""The PPO driver: prompts in, a trained policy out, with logging, checkpoints and resume.

    result = train(policy, reward, prompts, config, out_dir)
    sweep = train_sweep(policy, reward, prompts, config, out_dir, runs=grid(seed=[0, 1, 2]))

`train` runs ``config.total_steps`` PPO iterations (or ``num_steps`` more), each one jitted step
(`PPO.train_step`, or rollout -> host scoring -> update for a `TextReward`), and

- logs every step's metrics to ``out_dir/metrics.jsonl``, TensorBoard and a progress bar;
- checkpoints the `TrainState` to ``out_dir/checkpoints`` every ``save_every`` steps and at the end
  (Orbax, asynchronous, last ``keep_checkpoints`` kept);
- resumes from the latest checkpoint in ``out_dir`` when there is one (after checking that it was
  written with a compatible config); the prompt order is a function of (seed, step), so a resumed
  run sees the same batches as an uninterrupted one;
- exports the policy with `save_pretrained` to ``out_dir/policy`` at the end (a LoRA policy: its
  adapters, as a PEFT adapter directory).

`train_sweep` does the same for R runs in one jitted step (`jaxrlhf.training.sweep`): one
checkpoint of the whole sweep, ``run_<i>/`` with each run's metrics, TensorBoard events and final
policy, and ``sweep_summary.json``. Both go through one loop (`_run_loop`), with the same hooks:
``on_step(step, metrics, state)`` after every step and ``evaluate(step, state) -> metrics`` every
``eval_every`` steps (its metrics are logged under ``eval/``).

Each step's result is fetched before the next is dispatched: the NaN check needs it, and on CPU
with several simulated devices many queued multi-device steps can trip XLA's rendezvous timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxrlhf.metrics_log import MetricsLogger, logger_options
from jaxrlhf.models.lm import LanguageModel, Pretrained
from jaxrlhf.models.peft_io import export_policy
from jaxrlhf.models.positions import check_positions
from jaxrlhf.models.value import ValueModel
from jaxrlhf.sampling import check_prompts, model_limits
from jaxrlhf.sharding import to_host
from jaxrlhf.training.checkpoint import Checkpointer, prompts_fingerprint
from jaxrlhf.training.config import PPOConfig
from jaxrlhf.training.ppo import PPO, PromptTooLongError
from jaxrlhf.training.rewards import NonFiniteError, RewardModel, TextReward, decode_responses
from jaxrlhf.training.state import FrozenParams, TrainState
from jaxrlhf.training.sweep import Sweep, SweepState, split_metrics

PROGRESS_KEYS = ("score", "kl", "kl_coef", "entropy")
# Metrics that measure the machine, not the math: excluded when comparing runs.
TIMING_METRICS = ("step_time", "tokens_per_s")


# ----------------------------------------------------------------------------------------------
# Prompts


@dataclasses.dataclass(frozen=True)
class PromptDataset:
    """All prompts, left-padded to ``max_prompt_len``: ``ids, mask [num_prompts, max_prompt_len]``.

    The batch of step s is a pure function of (seed, s): prompts are visited in a fresh random
    order each pass over the dataset, so resuming at step s sees the same batches.
    """

    ids: np.ndarray
    mask: np.ndarray
    seed: int = 0

    def __len__(self) -> int:
        return self.ids.shape[0]

    def indices_for_step(self, step: int, batch_size: int) -> np.ndarray:
        flat = np.arange(step * batch_size, (step + 1) * batch_size)
        epochs, positions = flat // len(self), flat % len(self)
        orders = {e: np.random.default_rng([self.seed, int(e)]).permutation(len(self)) for e in np.unique(epochs)}
        return np.array([orders[e][p] for e, p in zip(epochs, positions)])

    def batch(self, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        index = self.indices_for_step(step, batch_size)
        return self.ids[index], self.mask[index]


def _check_integer_ids(ids: np.ndarray, what: str) -> None:
    """Token ids must be integers: float ids would be truncated to other tokens without a word."""
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what}: token ids must be integers, got dtype {ids.dtype}")


def check_prompt_set(data: PromptDataset, model: LanguageModel, config: PPOConfig, *scorers) -> None:
    """The prompts fit the model before any work: ids in its vocabulary (padding included, so
    ``pad_token_id`` too) and prompt + ``max_new_tokens`` within its position table; and within the
    learned position table of each of ``scorers`` (a `RewardModel`'s model, a separate critic)
    that reads prompt + response too."""
    vocab_size, max_positions = model_limits(model)
    check_prompts(
        data.ids,
        data.mask,
        vocab_size=vocab_size,
        max_new_tokens=config.max_new_tokens,
        max_positions=max_positions,
        where="train",
    )
    for scorer in scorers:
        scorer = scorer.model if isinstance(scorer, RewardModel) else scorer
        if scorer is not None:
            check_positions(scorer, data.mask, extra_positions=config.max_new_tokens, where="train", what="prompt")


def prepare_prompts(
    prompts, max_prompt_len: int, pad_token_id: int = 0, tokenizer=None, seed: int = 0
) -> PromptDataset:
    """Prompts as a `PromptDataset`, checked against ``max_prompt_len`` before any work starts.

    Accepts a list of strings (encoded with ``tokenizer``), a list of token-id sequences, or a
    pair ``(ids [N, P], mask [N, P])`` of left-padded arrays. A prompt longer than
    ``max_prompt_len`` raises `PromptTooLongError` (prompts are never silently truncated).
    """
    if isinstance(prompts, PromptDataset):
        return prompts
    if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2:
        ids, mask = np.asarray(prompts[0]), np.asarray(prompts[1])
        if ids.shape != mask.shape:
            raise ValueError(f"prompt ids and mask must have the same shape, got {ids.shape} and {mask.shape}")
        _check_integer_ids(ids, "prompt ids")
        sequences = [row[m != 0].tolist() for row, m in zip(ids, mask)]
    else:
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if isinstance(prompts[0], str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer (the policy's Pretrained.tokenizer or tokenizer=)")
            sequences = [list(tokenizer(p)["input_ids"]) for p in prompts]
        else:
            arrays = [np.asarray(p).reshape(-1) for p in prompts]
            for index, array in enumerate(arrays):
                _check_integer_ids(array, f"prompt {index}")
            sequences = [array.tolist() for array in arrays]
    lengths = np.array([len(s) for s in sequences])
    too_long = np.flatnonzero(lengths > max_prompt_len)
    if too_long.size:
        first = int(too_long[0])
        raise PromptTooLongError(
            f"{too_long.size} prompt(s) are longer than max_prompt_len={max_prompt_len}; the first is "
            f"prompt {first} with {lengths[first]} tokens. Raise max_prompt_len or shorten the prompts."
        )
    if np.any(lengths == 0):
        raise ValueError(f"prompt {int(np.flatnonzero(lengths == 0)[0])} is empty")
    ids = np.full((len(sequences), max_prompt_len), pad_token_id, np.int32)
    mask = np.zeros((len(sequences), max_prompt_len), np.int32)
    for row, seq in enumerate(sequences):
        ids[row, max_prompt_len - len(seq) :] = seq
        mask[row, max_prompt_len - len(seq) :] = 1
    return PromptDataset(ids, mask, seed)


# ----------------------------------------------------------------------------------------------
# Host-side scoring (TextReward)


def host_scores(reward: TextReward, tokenizer, batch_ids, batch_mask, rollout) -> np.ndarray:
    """Decode prompts and responses on the host and call the text reward; ``[B]`` float32."""
    return host_scores_and_metrics(reward, tokenizer, batch_ids, batch_mask, rollout)[0]


def host_scores_and_metrics(reward: TextReward, tokenizer, batch_ids, batch_mask, rollout):
    """``(scores [B] float32, extra metrics)``: the text reward's scores and, if it has a
    ``metrics_fn``, what that computes from the same texts (logged with the step)."""
    tokenizer = reward.tokenizer or tokenizer
    if tokenizer is None:
        raise ValueError("a TextReward needs a tokenizer (TextReward(fn, tokenizer) or the policy's)")
    response_ids, response_mask = to_host((rollout.tokens, rollout.mask))
    group = len(response_ids) // max(len(batch_ids), 1)
    if group > 1:  # num_generations: the batch holds distinct prompts, the rollout G responses to each
        batch_ids, batch_mask = np.repeat(np.asarray(batch_ids), group, 0), np.repeat(np.asarray(batch_mask), group, 0)
    prompts_text = decode_responses(tokenizer, np.asarray(batch_ids), np.asarray(batch_mask))
    responses_text = decode_responses(tokenizer, np.asarray(response_ids), np.asarray(response_mask))
    scores = np.asarray(reward.fn(prompts_text, responses_text), np.float32)
    extra = {} if reward.metrics_fn is None else dict(reward.metrics_fn(prompts_text, responses_text))
    return scores, extra


def sweep_host_scores(reward: TextReward, tokenizer, ids_RxBxP, mask_RxBxP, rollout):
    """`host_scores_and_metrics` for each run of a sweep's rollout (every leaf ``[R, ...]``):
    ``(scores [R, B] float32, one extra-metrics dict per run)``."""
    rollout = jax.device_get(rollout)
    per_run = [
        host_scores_and_metrics(reward, tokenizer, ids_RxBxP[r], mask_RxBxP[r], jax.tree.map(lambda x: x[r], rollout))
        for r in range(len(ids_RxBxP))
    ]
    return np.stack([scores for scores, _ in per_run]), [extra for _, extra in per_run]


# ----------------------------------------------------------------------------------------------
# The driver: one loop for single runs and sweeps


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the final state, the setup, and the metrics this call logged."""

    state: TrainState
    ppo: PPO
    frozen: FrozenParams
    history: list[dict[str, float]]
    out_dir: str
    policy_dir: str | None


@dataclasses.dataclass
class SweepResult:
    """What `train_sweep` returns: the sweep state (every leaf ``[R, ...]``), the setup, each run's
    logged metrics, the summary written to ``sweep_summary.json``, and the exported policies."""

    state: SweepState
    sweep: Sweep
    frozen: FrozenParams
    histories: list[list[dict[str, float]]]
    summary: dict[str, Any]
    out_dir: str
    policy_dirs: list[str | None]


def _unpack_policy(policy) -> tuple[LanguageModel, Any, Any]:
    if isinstance(policy, Pretrained):
        return policy.model, policy.params, policy.tokenizer
    if isinstance(policy, tuple) and len(policy) == 2 and isinstance(policy[0], LanguageModel):
        return policy[0], policy[1], None
    raise TypeError("policy must be a Pretrained (from load_pretrained) or a (LanguageModel, params) pair")


class _SingleRun:
    """What the loop needs to know about one run: its batches, its step, what a failure does."""

    def __init__(self, ppo: PPO, frozen: FrozenParams, data: PromptDataset, reward, tokenizer):
        self.trainer, self.frozen, self.data, self.reward, self.tokenizer = ppo, frozen, data, reward, tokenizer
        self.num_runs = 1

    def start(self, state: TrainState, step: int) -> TrainState:
        """``state`` ready for ``step``: with ``max_staleness = k`` its queue filled with the prompts of
        steps ``step .. step + k - 1`` when it has empty slots (a fresh run)."""
        if not self.trainer.needs_fill(state):
            return state
        k = self.trainer.config.max_staleness
        host = [self.data.batch(step + i, self.trainer.config.prompts_per_step) for i in range(k)]
        batches = self.trainer.prompt_batches(np.stack([b[0] for b in host]), np.stack([b[1] for b in host]))
        return self.trainer.fill_step(state, self.frozen, batches)

    def step(self, state: TrainState, step: int):
        config = self.trainer.config
        # With max_staleness = k the step samples the prompts of step + k (and trains on those of step).
        batch_ids, batch_mask = self.data.batch(step + config.max_staleness, config.prompts_per_step)
        batch = self.trainer.prompt_batch(batch_ids, batch_mask)
        extra = {}
        if self.trainer.uses_host_rollout:  # a text reward, or an environment on the host
            rollout_out = self.trainer.rollout_step(state, self.frozen, batch)
            if self.trainer.uses_host_reward:
                scores, extra = host_scores_and_metrics(self.reward, self.tokenizer, batch_ids, batch_mask, rollout_out)
            else:
                scores = self.trainer.score_step(self.frozen, batch, rollout_out)
            new_state, metrics = self.trainer.update_step(state, self.frozen, batch, rollout_out, scores)
        else:
            new_state, metrics = self.trainer.train_step(state, self.frozen, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # blocks on the step
        return new_state, [{**metrics, **extra}]

    def on_failure(self, step: int, state: TrainState, metrics: dict[str, float], checkpointer) -> None:
        # The new state is discarded; the last good one is made durable before raising.
        checkpointer.save(state, force=True)
        checkpointer.wait()
        raise NonFiniteError(
            f"step {step} produced non-finite values; the state before it (step {int(state.step)}) is "
            f"checkpointed in {checkpointer.directory}.\n" + diagnose_non_finite(metrics)
        )


# What went non-finite first, read from a step's metrics, in the order the step computes them, with
# the likely causes of each.
_NON_FINITE_STAGES = (
    (
        "scores",
        ("score", "score_std"),
        "the reward returned NaN/inf for some response: check it on edge cases (empty or EOS-less responses, "
        "divisions by zero, log of 0)",
    ),
    (
        "log-probs",
        ("kl", "kl_per_token", "entropy"),
        "the policy or reference forward gave non-finite log-probs: NaN/inf in the weights (a damaged "
        "checkpoint), token ids outside the vocabulary, or overflow in a low-precision dtype",
    ),
    (
        "values and advantages",
        ("value_mean", "returns_mean", "advantages_mean", "score_used"),
        "the critic or the advantages blew up: very large scores (try score_clip or score_norm) or a "
        "diverged critic (lower critic_learning_rate)",
    ),
    (
        "losses and gradients",
        ("pg_loss", "vf_loss", "loss", "policy_grad_norm", "value_grad_norm", "approx_kl"),
        "the update diverged: learning rate too high, max_grad_norm=None, or extreme importance ratios",
    ),
)


def diagnose_non_finite(metrics: dict[str, float]) -> str:
    """Names the first stage of the step whose metrics are non-finite, and its likely causes."""
    for stage, names, causes in _NON_FINITE_STAGES:
        bad = [n for n in names if n in metrics and not np.isfinite(metrics[n])]
        if bad:
            return f"First non-finite: {stage} ({', '.join(bad)}). Likely cause: {causes}."
    return (
        "First non-finite: the parameters after the update (every metric is finite). Likely cause: an "
        "update too large for the parameters' dtype (learning rate far too high) or non-finite optimizer "
        "state (a damaged checkpoint)."
    )


class _SweepRuns:
    def __init__(self, sweep: Sweep, frozen: FrozenParams, data: Sequence[PromptDataset], reward, tokenizer):
        self.trainer, self.frozen, self.data, self.reward, self.tokenizer = sweep, frozen, data, reward, tokenizer
        self.num_runs = sweep.num_runs

    def start(self, state: SweepState, step: int) -> SweepState:
        """As `_SingleRun.start`, every run with its own prompt order."""
        if not self.trainer.needs_fill(state):
            return state
        config = self.trainer.ppo.config
        host = [[d.batch(step + i, config.prompts_per_step) for i in range(config.max_staleness)] for d in self.data]
        ids = np.stack([np.stack([b[0] for b in run]) for run in host])
        mask = np.stack([np.stack([b[1] for b in run]) for run in host])
        return self.trainer.fill_step(state, self.frozen, self.trainer.prompt_batches(ids, mask))

    def step(self, state: SweepState, step: int):
        config = self.trainer.ppo.config
        host = [d.batch(step + config.max_staleness, config.prompts_per_step) for d in self.data]
        ids_RxBxP, mask_RxBxP = np.stack([b[0] for b in host]), np.stack([b[1] for b in host])
        batch = self.trainer.prompt_batch(ids_RxBxP, mask_RxBxP)
        extras: list[dict] = [{} for _ in self.data]
        if self.trainer.uses_host_reward:
            rollout_out = jax.device_get(self.trainer.rollout_step(state, self.frozen, batch))
            scores_RxB, extras = sweep_host_scores(self.reward, self.tokenizer, ids_RxBxP, mask_RxBxP, rollout_out)
            new_state, metrics = self.trainer.update_step(state, self.frozen, batch, rollout_out, scores_RxB)
        else:
            new_state, metrics = self.trainer.train_step(state, self.frozen, batch)
        per_run = split_metrics(metrics, self.num_runs)
        was_active = np.asarray(jax.device_get(state.active))
        for r, m in enumerate(per_run):
            m.update(extras[r])
            if not was_active[r]:
                m["all_finite"] = 1.0  # a frozen run reports nothing new
                m["frozen"] = 1.0
        return new_state, per_run


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM arrived during training (raised after the last committed state was checkpointed)."""


@contextlib.contextmanager
def _sigterm_raises():
    """While training, SIGTERM raises `TrainingInterrupted` (like Ctrl-C raises KeyboardInterrupt),
    so the loop's handler checkpoints before the process ends. Installed once per call, not per
    step; only in the main thread (where Python delivers signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise TrainingInterrupted(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_loop(runner, state, start: int, end: int, loggers, checkpointer, **hooks):
    """The one training loop; on Ctrl-C, SIGTERM or an exception from the host side of a step (a
    text reward, a hook) the last committed state is checkpointed, synchronously, before the
    exception goes on. Returns ``(state, histories)``."""
    if start < end:
        state = runner.start(state, start)  # fills the queue of rollouts in flight (max_staleness)
    last_committed = [state]
    with _sigterm_raises():
        try:
            return _steps(runner, state, start, end, loggers, checkpointer, last_committed, **hooks)
        except BaseException:
            checkpointer.save(last_committed[0], force=True)  # no-op if that step is saved already
            checkpointer.wait()
            raise


def _steps(
    runner,
    state,
    start: int,
    end: int,
    loggers,
    checkpointer,
    last_committed,
    *,
    on_step=None,
    evaluate=None,
    eval_every: int = 0,
):
    histories: list[list[dict[str, float]]] = [[] for _ in range(runner.num_runs)]
    frozen_runs: set = set()
    for step in range(start, end):
        t0 = time.perf_counter()
        new_state, per_run = runner.step(state, step)
        jax.block_until_ready(new_state)
        step_time = time.perf_counter() - t0
        for r, metrics in enumerate(per_run):
            finite = metrics.pop("all_finite")
            if not finite and runner.num_runs == 1:
                runner.on_failure(step, state, metrics, checkpointer)
            if metrics.pop("frozen", 0.0) or r in frozen_runs:
                continue
            metrics.pop("active", None)
            if not finite:  # a sweep's run that just failed: flagged in its metrics, then silent
                frozen_runs.add(r)
                bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
                metrics = {
                    "non_finite": 1.0,
                    "non_finite_metrics": ", ".join(bad) or "parameters",
                    "diagnosis": diagnose_non_finite(metrics),
                }
            else:
                metrics["step_time"] = step_time
                metrics["tokens_per_s"] = metrics["num_response_tokens"] / step_time
            histories[r].append(metrics)
            if loggers[r] is not None:
                loggers[r].log(step, {k: v for k, v in metrics.items() if not isinstance(v, str)})
        state = last_committed[0] = new_state
        if evaluate is not None and eval_every > 0 and ((step + 1) % eval_every == 0 or step + 1 == end):
            evaluated = evaluate(step + 1, state)
            evaluated = evaluated if isinstance(evaluated, list) else [evaluated]
            for r, eval_metrics in enumerate(evaluated):
                if r in frozen_runs or not histories[r]:
                    continue
                scalars = {f"eval/{k}": float(v) for k, v in eval_metrics.items() if np.ndim(v) == 0}
                histories[r][-1].update(scalars)
                if loggers[r] is not None:
                    loggers[r].log(step, scalars)
        checkpointer.save(state)
        if on_step is not None:
            on_step(step, per_run[0] if runner.num_runs == 1 else per_run, state)
    checkpointer.save(state, force=True)
    checkpointer.wait()
    return state, histories


def _start_and_end(state_step: int, config: PPOConfig, num_steps: int | None) -> tuple[int, int]:
    if state_step > config.total_steps:
        warnings.warn(
            f"the checkpoint is at step {state_step}, past total_steps={config.total_steps}: "
            "nothing to train (raise total_steps to train on)",
            stacklevel=3,
        )
    end = config.total_steps if num_steps is None else min(config.total_steps, state_step + num_steps)
    return state_step, max(end, state_step)


def _check_lora_reference(policy_model, ref_params) -> None:
    """A LoRA policy's frozen base is also its reference: there is no room for another one."""
    if getattr(policy_model.config, "lora", None) is not None and ref_params is not None:
        raise ValueError("a LoRA policy's reference is its frozen base (adapters off): pass no ref_params")


def train(
    policy: Pretrained | tuple[LanguageModel, Any],
    reward,
    prompts,
    config: PPOConfig,
    out_dir: str | os.PathLike,
    *,
    value_model: ValueModel | None = None,
    value_params=None,
    reward_params=None,
    ref_params=None,
    tokenizer=None,
    mesh=None,
    num_steps: int | None = None,
    export: bool = True,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float], TrainState], None] | None = None,
    evaluate: Callable[[int, TrainState], dict[str, float]] | None = None,
    eval_every: int = 0,
    initial_state: TrainState | None = None,
    trainer: PPO | None = None,
    fallback_to_intact: bool = False,
    allow_different_prompts: bool = False,
    environment=None,
) -> TrainResult:
    """Train ``policy`` with PPO against ``reward`` on ``prompts``; see the module docstring.

    Args:
      policy: a `Pretrained` (model, params, tokenizer) or a ``(LanguageModel, params)`` pair. Its
        parameters start the policy and, unless ``ref_params`` is given, are the KL reference.
      reward: a JAX function ``(prompt_ids, prompt_mask, response_ids, response_mask) -> [B]``, a
        `RewardModel` (with ``reward_params``) or a `TextReward` (host-side, on decoded text).
      prompts: strings (needs a tokenizer), token-id sequences, or ``(ids, mask)`` arrays.
      config: the `PPOConfig`.
      out_dir: run directory: ``metrics.jsonl``, TensorBoard events, ``checkpoints/``, ``policy/``.
        If it holds checkpoints, training resumes from the latest one.
      value_model, value_params: the critic (default: a copy of the policy with a zero value head;
        with ``config.shared_trunk`` a zero head on the policy itself).
      reward_params: parameters of a `RewardModel`.
      ref_params: reference policy parameters (default: the policy's initial parameters).
      tokenizer: overrides the policy's tokenizer (text prompts, TextReward, export).
      mesh: device mesh with axis ``"data"`` (and optionally ``"fsdp"``); None = one device.
      num_steps: run at most this many steps in this call (default: until ``total_steps``).
      export: write the final policy with `save_pretrained` to ``out_dir/policy`` (with LoRA: the
        adapters as a PEFT adapter directory, `jaxrlhf.models.peft_io.export_policy`).
      progress: show the progress bar.
      on_step: called as ``on_step(step, metrics, state)`` after each committed step.
      evaluate: called as ``evaluate(step, state) -> {name: scalar}`` every ``eval_every`` steps
        and after the last one; logged under ``eval/`` (and added to the history).
      initial_state: start from this `TrainState` instead of `PPO.init_state` (ignored when
        resuming from a checkpoint).
      trainer: a `PPO` built earlier for this config's structure (its compiled steps are reused;
        ``config`` then only gives the numbers of a fresh state and the run length).
      fallback_to_intact: when the latest checkpoint is damaged (its checksums fail), move it aside
        (``<step>.corrupt``) and resume from the newest intact one, with a warning, instead of
        raising `CheckpointCorruptError`.
      allow_different_prompts: resume although the prompt set differs from the one the checkpoint
        was trained on (its fingerprint is in the checkpoint), with a warning.
      environment: a `jaxrlhf.episodes.Environment`: the rollout is multi-turn episodes
        (``config.max_turns``, ``max_turn_tokens``); ``reward`` may then be None (every reward
        from the environment). A JAX-native one runs inside the fused step; one on the host
        between jitted turns (an exception from it checkpoints the last committed state first).

    Returns:
      A `TrainResult`. Raises `NonFiniteError` (after checkpointing the last good state) when a
      step produces NaN/inf, `PromptTooLongError` for over-long prompts, ValueError for prompts
      that do not fit the model (ids outside the vocabulary, prompt + max_new_tokens past the
      position table, float ids, mismatched ids/mask), `RewardShapeError` for a reward of the
      wrong shape, `CheckpointMismatchError` for an incompatible ``out_dir``. On Ctrl-C, SIGTERM
      (`TrainingInterrupted`) or an exception from a text reward or a hook, the last committed
      state is checkpointed first: a rerun resumes there.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    log_options = logger_options(
        config.loggers,
        wandb_project=config.wandb_project,
        name=os.path.basename(out_dir),
        run_config=dataclasses.asdict(config),
    )  # before any compile: checks wandb is there
    policy_model, policy_params, policy_tokenizer = _unpack_policy(policy)
    tokenizer = tokenizer if tokenizer is not None else policy_tokenizer
    data = prepare_prompts(prompts, config.max_prompt_len, config.pad_token_id, tokenizer, config.seed)
    check_prompt_set(data, policy_model, config, reward, value_model)
    if trainer is None:
        ppo = PPO(config, policy_model, reward, critic=value_model, mesh=mesh, environment=environment)
    else:
        trainer.check_config(config)
        ppo = trainer
    is_main = jax.process_index() == 0

    checkpointer = Checkpointer(
        os.path.join(out_dir, "checkpoints"),
        ppo,
        config=config,
        fallback_to_intact=fallback_to_intact,
        prompts_fingerprint=prompts_fingerprint(data.ids, data.mask),
        allow_different_prompts=allow_different_prompts,
    )
    latest = checkpointer.latest_step()
    if latest is not None:
        state = checkpointer.restore(latest)  # checks the config first
    elif initial_state is not None:
        state = initial_state
    else:
        state = ppo.init_state(policy_params, value_params, config=config)
    _check_lora_reference(policy_model, ref_params)
    frozen = ppo.frozen_params(policy_params if ref_params is None else ref_params, reward_params)

    start, end = _start_and_end(int(state.step), config, num_steps)
    logger = None
    if is_main:  # rows past the restored step (a run killed before its checkpoint) are dropped
        logger = MetricsLogger(
            out_dir,
            total_steps=config.total_steps,
            progress_keys=PROGRESS_KEYS,
            resume_step=start - 1,
            progress=progress,
            **log_options,
        )
    try:
        state, histories = _run_loop(
            _SingleRun(ppo, frozen, data, reward, tokenizer),
            state,
            start,
            end,
            [logger],
            checkpointer,
            on_step=on_step,
            evaluate=evaluate,
            eval_every=eval_every,
        )
    finally:
        checkpointer.close()
        if logger is not None:
            logger.close()

    policy_dir = None
    if export:
        policy_dir = os.path.join(out_dir, "policy")
        host_params = to_host(state.policy_params)
        if is_main:
            export_policy(policy_dir, policy_model, host_params, tokenizer)
    return TrainResult(state, ppo, frozen, histories[0], out_dir, policy_dir)


def train_sweep(
    policy: Pretrained | tuple[LanguageModel, Any],
    reward,
    prompts,
    config: PPOConfig,
    out_dir: str | os.PathLike,
    runs: Sequence[dict[str, Any]],
    *,
    value_model: ValueModel | None = None,
    value_params=None,
    reward_params=None,
    ref_params=None,
    tokenizer=None,
    mesh=None,
    num_steps: int | None = None,
    export: bool = True,
    progress: bool = True,
    on_step: Callable[[int, list[dict[str, float]], SweepState], None] | None = None,
    evaluate: Callable[[int, SweepState], list[dict[str, float]]] | None = None,
    eval_every: int = 0,
    fallback_to_intact: bool = False,
    allow_different_prompts: bool = False,
    environment=None,
) -> SweepResult:
    """Train R runs (``runs``: per-run overrides, e.g. ``grid(seed=[0, 1, 2], kl_coef=[0, 0.1])``)
    as one program; arguments as in `train`, except:

    - ``runs`` are checked (unknown or static fields, wrong types, changed structure) before
      anything is compiled (`jaxrlhf.training.hparams.run_configs`);
    - every run starts from the same ``policy`` (and ``value_params``); the reference and reward
      model are shared; run r's prompt order follows run r's seed;
    - ``out_dir/checkpoints`` holds the whole sweep (resumed exactly); ``out_dir/run_<r>/`` each
      run's ``metrics.jsonl``, TensorBoard events and exported ``policy/``; ``sweep_summary.json``
      each run's overrides, final metrics and whether it failed (non-finite) and when;
    - ``evaluate(step, sweep_state)`` returns one metrics dict per run (a list), ``on_step``
      receives the list of the runs' metrics;
    - an ``environment`` must be JAX-native: it is vmapped over the runs inside the one step.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    logger_options(config.loggers)  # before any compile: checks wandb is there
    policy_model, policy_params, policy_tokenizer = _unpack_policy(policy)
    tokenizer = tokenizer if tokenizer is not None else policy_tokenizer
    sweep = Sweep(config, policy_model, reward, runs, critic=value_model, mesh=mesh, environment=environment)
    base = prepare_prompts(prompts, config.max_prompt_len, config.pad_token_id, tokenizer, config.seed)
    check_prompt_set(base, policy_model, config, reward, value_model)
    data = [PromptDataset(base.ids, base.mask, c.seed) for c in sweep.run_configs]
    is_main = jax.process_index() == 0

    checkpointer = Checkpointer(
        os.path.join(out_dir, "checkpoints"),
        sweep,
        fallback_to_intact=fallback_to_intact,
        prompts_fingerprint=prompts_fingerprint(base.ids, base.mask),
        allow_different_prompts=allow_different_prompts,
    )
    latest = checkpointer.latest_step()
    state = checkpointer.restore(latest) if latest is not None else sweep.init_state(policy_params, value_params)
    _check_lora_reference(policy_model, ref_params)
    frozen = sweep.frozen_params(policy_params if ref_params is None else ref_params, reward_params)

    start, end = _start_and_end(int(state.step), config, num_steps)
    loggers: list[MetricsLogger | None] = [None] * sweep.num_runs
    if is_main:
        # W&B: one run per sweep member, grouped by the sweep (its directory's name).
        sweep_name = os.path.basename(out_dir)
        loggers = [
            MetricsLogger(
                os.path.join(out_dir, f"run_{r}"),
                total_steps=config.total_steps,
                progress_keys=PROGRESS_KEYS,
                resume_step=start - 1,
                progress=progress and r == 0,
                **logger_options(
                    config.loggers,
                    wandb_project=config.wandb_project,
                    name=f"{sweep_name}/run_{r}",
                    group=sweep_name,
                    run_config={**dataclasses.asdict(run_config), "sweep_run": r},
                ),
            )
            for r, run_config in enumerate(sweep.run_configs)
        ]
    try:
        state, histories = _run_loop(
            _SweepRuns(sweep, frozen, data, reward, tokenizer),
            state,
            start,
            end,
            loggers,
            checkpointer,
            on_step=on_step,
            evaluate=evaluate,
            eval_every=eval_every,
        )
    finally:
        checkpointer.close()
        for logger in loggers:
            if logger is not None:
                logger.close()

    active = np.asarray(jax.device_get(state.active))
    failed_step = np.asarray(jax.device_get(state.failed_step))
    summary = {"num_runs": sweep.num_runs, "steps": int(state.step), "runs": []}
    policy_dirs: list[str | None] = []
    for r, overrides in enumerate(sweep.overrides):
        good = [m for m in histories[r] if "non_finite" not in m]
        flagged = next((m for m in histories[r] if "non_finite" in m), {})
        summary["runs"].append(
            {
                "run": r,
                "overrides": overrides,
                "failed": not bool(active[r]),
                "failed_at_step": None if active[r] else int(failed_step[r]),
                "diagnosis": flagged.get("diagnosis"),
                "final": {k: v for k, v in (good[-1] if good else {}).items() if k not in TIMING_METRICS},
            }
        )
        policy_dir = None
        if export:
            policy_dir = os.path.join(out_dir, f"run_{r}", "policy")
            host_params = to_host(jax.tree.map(lambda x: x[r], state.runs.policy_params))
            if is_main:
                export_policy(policy_dir, policy_model, host_params, tokenizer)
        policy_dirs.append(policy_dir)
    if is_main:
        with open(os.path.join(out_dir, "sweep_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return SweepResult(state, sweep, frozen, histories, summary, out_dir, policy_dirs)
