"""Evaluation helpers shared by the experiments: how far a policy has moved from its reference,
and seeds trained as one sweep with a held-out evaluation along the way.

`sequence_kl` is the KL between the policy's and the reference's distributions over responses,
measured on responses sampled from the policy. Per token it takes the exact KL between the two
next-token distributions (a sum over the vocabulary) rather than a sampled estimator such as
``log pi(y_t) - log ref(y_t)``: same expectation, much lower variance for a small evaluation batch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxrlhf.core.sequences import concat_prompt_response
from jaxrlhf.training.config import PPOConfig
from jaxrlhf.training.trainer import SweepResult, train_sweep

EVAL_KEY_SALT = 12345
"""Evaluation keys are ``fold_in(fold_in(key(seed), EVAL_KEY_SALT), step)``: apart from training's."""


def sequence_kl(
    model, params, ref_params, prompt_ids, prompt_mask, response_ids, response_mask, action_mask=None
) -> jax.Array:
    """Per-sequence KL(policy || reference) ``[B]``:

        KL_b = sum_t mask_bt * sum_v pi(v | s_bt) * (log pi(v | s_bt) - log ref(v | s_bt))

    where ``s_bt`` is prompt ``b`` followed by the first ``t`` response tokens. On responses sampled
    from the policy, the batch mean is an unbiased estimate of the KL between the two sequence
    distributions. ``prompt_* [B, P]`` (left-padded), ``response_* [B, T]``; ``model.apply(params,
    ids, mask) -> logits [B, P + T, V]``. For episodes (`jaxrlhf.episodes`), ``response_mask`` is
    every token the model attends to and ``action_mask`` the tokens the policy sampled: the sum
    then runs over the action tokens only (an observation is the environment's, not a choice).
    """
    P = prompt_ids.shape[1]
    T = response_ids.shape[1]
    ids_BxL, mask_BxL = concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)

    def response_logp(p):
        # The logits at position P - 1 + t predict response token t.
        logits_BxTxV = model.apply(p, ids_BxL, mask_BxL)[:, P - 1 : P - 1 + T]
        return jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)

    logp_BxTxV, ref_logp_BxTxV = response_logp(params), response_logp(ref_params)
    kl_BxT = jnp.sum(jnp.exp(logp_BxTxV) * (logp_BxTxV - ref_logp_BxTxV), axis=-1)
    return jnp.sum(kl_BxT * (response_mask if action_mask is None else action_mask), axis=1)


def train_seeds(
    policy,
    reward_fn,
    prompts,
    config: PPOConfig,
    out_dir: str | os.PathLike,
    seeds: Sequence[int],
    evaluate: Callable[[Any, jax.Array], Mapping[str, Any]],
    *,
    target: tuple[str, float] | None = None,
    ref_params=None,
    eval_every: int = 10,
    progress: bool = True,
    environment=None,
) -> tuple[list[dict[str, Any]], dict[str, float], SweepResult]:
    """One run per seed, trained together as one sweep (`train_sweep`), each evaluated by
    ``evaluate(params, key) -> {metric: value}`` on the starting policy, every ``eval_every`` steps
    (logged as ``eval/<metric>`` in each run's metrics) and at the end.

    ``target = (metric, threshold)``: record per run the first evaluation step (and wall-clock
    seconds since training started) at which ``metric >= threshold``.

    ``environment``: a JAX-native `jaxrlhf.episodes.Environment` (multi-turn episodes, as in
    `train_sweep`); ``reward_fn`` may then be None.

    Returns ``(runs, timings, result)``: per run a dict with ``seed``, ``run_dir``, ``before`` and
    ``after`` (evaluations), ``steps``, ``failed``, ``target_reached_at`` (``{"step",
    "wall_clock_s"}`` or None) and ``policy_dir``; the sweep's ``wall_clock_s``, ``cpu_time_s``,
    ``train_step_time_s`` (run 0's summed step times) and ``num_runs``; and the `SweepResult`.
    """
    policy_params = policy.params if hasattr(policy, "params") else policy[1]
    eval_keys = [jax.random.fold_in(jax.random.key(seed), EVAL_KEY_SALT) for seed in seeds]

    def evaluate_run(params, run: int, step: int) -> dict[str, float]:
        result = evaluate(params, jax.random.fold_in(eval_keys[run], step))
        return {k: float(v) for k, v in result.items()}

    befores = [evaluate_run(policy_params, run, 0) for run in range(len(seeds))]
    reached: list[dict[str, float]] = [{} for _ in seeds]
    start, cpu_start = time.perf_counter(), time.process_time()

    def evaluate_sweep(step, sweep_state):
        results = []
        for run in range(len(seeds)):
            result = evaluate_run(jax.tree.map(lambda x: x[run], sweep_state.runs.policy_params), run, step)
            if target is not None and not reached[run] and result[target[0]] >= target[1]:
                reached[run].update(step=step, wall_clock_s=time.perf_counter() - start)
            results.append(result)
        return results

    result = train_sweep(
        policy,
        reward_fn,
        prompts,
        config,
        out_dir,
        runs=[{"seed": seed} for seed in seeds],
        ref_params=ref_params,
        progress=progress,
        evaluate=evaluate_sweep,
        eval_every=eval_every,
        environment=environment,
    )
    timings = {
        "wall_clock_s": time.perf_counter() - start,
        "cpu_time_s": time.process_time() - cpu_start,
        "train_step_time_s": sum(m.get("step_time", 0.0) for m in result.histories[0]),
        "num_runs": len(seeds),
    }
    runs = [
        {
            "seed": seed,
            "run_dir": os.path.join(os.fspath(out_dir), f"run_{run}"),
            "before": befores[run],
            "after": evaluate_run(result.state.run(run).policy_params, run, config.total_steps + 1),
            "steps": int(result.state.runs.step[run]),
            "failed": result.summary["runs"][run]["failed"],
            "target_reached_at": reached[run] or None,
            "policy_dir": result.policy_dirs[run],
        }
        for run, seed in enumerate(seeds)
    ]
    return runs, timings, result
