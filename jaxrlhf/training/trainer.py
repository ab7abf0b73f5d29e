"""The PPO driver: prompts in, a trained policy out, with logging, checkpoints and resume.

    result = train(policy, reward, prompts, config, out_dir)

runs ``config.total_steps`` PPO iterations (or ``num_steps`` more), each one jitted step
(`PPO.train_step`, or rollout -> host scoring -> update for a `TextReward`), and

- logs every step's metrics to ``out_dir/metrics.jsonl``, TensorBoard and a progress bar;
- checkpoints the `TrainState` to ``out_dir/checkpoints`` every ``save_every`` steps and at the end
  (Orbax, asynchronous, last ``keep_checkpoints`` kept);
- resumes from the latest checkpoint in ``out_dir`` when there is one (after checking that it was
  written with a compatible config); the prompt order is a function of (seed, step), so a resumed
  run sees the same batches as an uninterrupted one;
- exports the policy with `save_pretrained` to ``out_dir/policy`` at the end.

Each step's result is fetched before the next is dispatched: the NaN check needs it, and on CPU
with several simulated devices many queued multi-device steps can trip XLA's rendezvous timeout.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from jaxrlhf.metrics_log import MetricsLogger
from jaxrlhf.models.hf_io import save_pretrained
from jaxrlhf.models.lm import LanguageModel, Pretrained
from jaxrlhf.models.value import ValueModel
from jaxrlhf.training import parallel
from jaxrlhf.training.checkpoint import Checkpointer
from jaxrlhf.training.config import PPOConfig
from jaxrlhf.training.ppo import PPO, PromptTooLongError
from jaxrlhf.training.rewards import NonFiniteError, TextReward
from jaxrlhf.training.state import FrozenParams, TrainState

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

    def batch(self, step: int, batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
        index = self.indices_for_step(step, batch_size)
        return self.ids[index], self.mask[index]


def prepare_prompts(prompts, max_prompt_len: int, pad_token_id: int = 0, tokenizer=None, seed: int = 0) -> PromptDataset:
    """Prompts as a `PromptDataset`, checked against ``max_prompt_len`` before any work starts.

    Accepts a list of strings (encoded with ``tokenizer``), a list of token-id sequences, or a
    pair ``(ids [N, P], mask [N, P])`` of left-padded arrays. A prompt longer than
    ``max_prompt_len`` raises `PromptTooLongError` (prompts are never silently truncated).
    """
    if isinstance(prompts, PromptDataset):
        return prompts
    if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2:
        ids, mask = np.asarray(prompts[0]), np.asarray(prompts[1])
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
            sequences = [list(np.asarray(p).reshape(-1).tolist()) for p in prompts]
    lengths = np.array([len(s) for s in sequences])
    too_long = np.flatnonzero(lengths > max_prompt_len)
    if too_long.size:
        first = int(too_long[0])
        raise PromptTooLongError(
            f"{too_long.size} prompt(s) are longer than max_prompt_len={max_prompt_len}; the first is "
            f"prompt {first} with {lengths[first]} tokens. Raise max_prompt_len or shorten the prompts.")
    if np.any(lengths == 0):
        raise ValueError(f"prompt {int(np.flatnonzero(lengths == 0)[0])} is empty")
    ids = np.full((len(sequences), max_prompt_len), pad_token_id, np.int32)
    mask = np.zeros((len(sequences), max_prompt_len), np.int32)
    for row, seq in enumerate(sequences):
        ids[row, max_prompt_len - len(seq):] = seq
        mask[row, max_prompt_len - len(seq):] = 1
    return PromptDataset(ids, mask, seed)


# ----------------------------------------------------------------------------------------------
# Host-side scoring (TextReward)


def _decode_rows(tokenizer, ids: np.ndarray, mask: np.ndarray) -> List[str]:
    return [tokenizer.decode(row[m != 0].tolist(), skip_special_tokens=True) for row, m in zip(ids, mask)]


def host_scores(reward: TextReward, tokenizer, batch_ids, batch_mask, rollout) -> np.ndarray:
    """Decode prompts and responses on the host and call the text reward; ``[B]`` float32."""
    tokenizer = reward.tokenizer or tokenizer
    if tokenizer is None:
        raise ValueError("a TextReward needs a tokenizer (TextReward(fn, tokenizer) or the policy's)")
    response_ids, response_mask = parallel.to_host((rollout.tokens, rollout.mask))
    prompts_text = _decode_rows(tokenizer, np.asarray(batch_ids), np.asarray(batch_mask))
    responses_text = _decode_rows(tokenizer, np.asarray(response_ids), np.asarray(response_mask))
    return np.asarray(reward.fn(prompts_text, responses_text), np.float32)


# ----------------------------------------------------------------------------------------------
# The driver


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the final state, the setup, and the metrics this call logged."""

    state: TrainState
    ppo: PPO
    frozen: FrozenParams
    history: List[Dict[str, float]]
    out_dir: str
    policy_dir: Optional[str]


def _unpack_policy(policy) -> Tuple[LanguageModel, Any, Any]:
    if isinstance(policy, Pretrained):
        return policy.model, policy.params, policy.tokenizer
    if isinstance(policy, tuple) and len(policy) == 2 and isinstance(policy[0], LanguageModel):
        return policy[0], policy[1], None
    raise TypeError("policy must be a Pretrained (from load_pretrained) or a (LanguageModel, params) pair")


def train(
    policy: Union[Pretrained, Tuple[LanguageModel, Any]],
    reward,
    prompts,
    config: PPOConfig,
    out_dir: str | os.PathLike,
    *,
    value_model: Optional[ValueModel] = None,
    value_params=None,
    reward_params=None,
    ref_params=None,
    tokenizer=None,
    mesh=None,
    num_steps: Optional[int] = None,
    export: bool = True,
    progress: bool = True,
    on_step: Optional[Callable[[int, Dict[str, float], TrainState], None]] = None,
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
      export: write the final policy with `save_pretrained` to ``out_dir/policy``.
      progress: show the progress bar.
      on_step: called as ``on_step(step, metrics, state)`` after each committed step.

    Returns:
      A `TrainResult`. Raises `NonFiniteError` (after checkpointing the last good state) when a
      step produces NaN/inf, `PromptTooLongError` for over-long prompts, `RewardShapeError` for a
      reward of the wrong shape, `CheckpointMismatchError` for an incompatible ``out_dir``.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    policy_model, policy_params, policy_tokenizer = _unpack_policy(policy)
    tokenizer = tokenizer if tokenizer is not None else policy_tokenizer
    data = prepare_prompts(prompts, config.max_prompt_len, config.pad_token_id, tokenizer, config.seed)
    ppo = PPO(config, policy_model, reward, critic=value_model, mesh=mesh)
    is_main = jax.process_index() == 0

    checkpointer = Checkpointer(os.path.join(out_dir, "checkpoints"), ppo)
    latest = checkpointer.latest_step()
    if latest is not None:
        state = checkpointer.restore(latest)  # checks the config first
    else:
        state = ppo.init_state(policy_params, value_params)
    frozen = ppo.frozen_params(policy_params if ref_params is None else ref_params, reward_params)

    start = int(state.step)
    end = config.total_steps if num_steps is None else min(config.total_steps, start + num_steps)
    logger = None
    if is_main:
        logger = MetricsLogger(out_dir, total_steps=config.total_steps, progress_keys=PROGRESS_KEYS,
                               resume_step=start - 1 if start > 0 else None, progress=progress)
    history: List[Dict[str, float]] = []
    try:
        for step in range(start, end):
            batch_ids, batch_mask = data.batch(step, config.batch_size)
            batch = ppo.prompt_batch(batch_ids, batch_mask)
            t0 = time.perf_counter()
            if ppo.uses_host_reward:
                rollout_out = ppo.rollout_step(state, frozen, batch)
                scores = host_scores(reward, tokenizer, batch_ids, batch_mask, rollout_out)
                new_state, metrics = ppo.update_step(state, frozen, batch, rollout_out, scores)
            else:
                new_state, metrics = ppo.train_step(state, frozen, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # blocks on the step
            jax.block_until_ready(new_state)
            step_time = time.perf_counter() - t0
            if not metrics.pop("all_finite"):
                # The new state is discarded; the last good one is made durable before raising.
                checkpointer.save(state, force=True)
                checkpointer.wait()
                bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
                raise NonFiniteError(
                    f"step {step} produced non-finite values (metrics: {', '.join(bad) or 'parameters'}); "
                    f"the state before it (step {int(state.step)}) is checkpointed in {checkpointer.directory}. "
                    "Check the reward function for NaN/inf.")
            state = new_state
            metrics["step_time"] = step_time
            metrics["tokens_per_s"] = metrics["num_response_tokens"] / step_time
            history.append(metrics)
            if logger is not None:
                logger.log(step, metrics)
            checkpointer.save(state)
            if on_step is not None:
                on_step(step, metrics, state)
        checkpointer.save(state, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
        if logger is not None:
            logger.close()

    policy_dir = None
    if export:
        policy_dir = os.path.join(out_dir, "policy")
        host_params = parallel.to_host(state.policy_params)
        if is_main:
            save_pretrained(policy_dir, policy_model, host_params, tokenizer)
    return TrainResult(state, ppo, frozen, history, out_dir, policy_dir)
