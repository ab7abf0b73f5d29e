"""Every RL preset on the randomwalks task, seeds as one sweep each: which learns, how fast, at what KL.

The presets of `jaxrlhf.training.presets` (PPO with a critic, GRPO, Dr. GRPO, DAPO, GSPO, RLOO,
REINFORCE++ and its group-baseline variant, ReMax), each on the same SFT policy, graph, learning
rate, batch of sampled responses per step and number of steps, so every run samples about the same
number of tokens (`batch_size` counts responses: a group preset samples batch_size / G prompts G
times). The seeds of a preset train together as one sweep (`train_sweep`). The reward is the walk's
optimality inside the jit (see experiments/randomwalks_ppo.py, whose evaluation this reuses:
greedy and sampled optimality on every start node, KL to the SFT model).

    python experiments/randomwalks_sft.py                     # the SFT policy first (or it runs it)
    python experiments/compare_algorithms.py                  # all presets, 3 seeds
    python experiments/compare_algorithms.py --presets ppo grpo --seeds 0 --steps 20

Writes to ``out_dir``: ``config.json``; per preset ``<preset>/`` (the sweep: checkpoint,
``run_<i>/metrics.jsonl``); ``summary.json``; ``results.md`` (final sampled optimality mean ± std,
greedy optimality, KL to SFT, steps to reach ``target_optimality``, tokens sampled, wall-clock);
``compare_algorithms.png`` (sampled optimality against tokens sampled, mean over seeds).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling script, also when imported
import randomwalks_ppo as rwp  # noqa: E402

from jaxrlhf.config import parse_config, save_config  # noqa: E402
from jaxrlhf.metrics_log import read_metrics  # noqa: E402
from jaxrlhf.plotting import plot_curves  # noqa: E402
from jaxrlhf.training.presets import PRESETS, preset  # noqa: E402
from tasks import randomwalks as rw  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    """Every preset on randomwalks, the same budget of sampled responses each."""

    out_dir: str = "runs/compare_algorithms"
    """Directory for config.json, one sweep directory per preset, summary.json, results.md and the plot."""
    sft_dir: str = "runs/randomwalks_sft"
    """experiments/randomwalks_sft.py output (run first when missing)."""
    presets: tuple[str, ...] = tuple(PRESETS)
    """Presets to run (`jaxrlhf.training.presets`)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of every preset, trained together as one sweep."""
    steps: int = 50
    """RL steps of every run."""
    batch_size: int = 128
    """Sampled responses per step, every preset (randomwalks_ppo's 128)."""
    minibatch_size: int = 64
    """Responses per optimizer update."""
    group_size: int = 8
    """Responses per prompt for the group presets (G; must divide batch_size)."""
    learning_rate: float = 5e-5
    """Policy (and critic) learning rate of every preset (randomwalks_ppo's tuned PPO value)."""
    eval_every: int = 10
    """Evaluate every this many steps."""
    eval_samples: int = 8
    """Sampled walks per start node in each evaluation."""
    target_optimality: float = 0.95
    """Report the first evaluation at which sampled optimality reaches this."""
    progress: bool = False
    """Show the trainer's progress bar."""


def run_preset(config: Config, name: str, sft, task, reward_fn, evaluator) -> dict:
    base = rwp.Config().ppo.replace(
        total_steps=config.steps,
        batch_size=config.batch_size,
        minibatch_size=config.minibatch_size,
        learning_rate=config.learning_rate,
        critic_learning_rate=config.learning_rate,
        num_generations=config.group_size,
        save_every=config.steps,
    )
    ppo_config = preset(name, base)
    run_config = rwp.Config(
        out_dir=os.path.join(config.out_dir, name),
        sft_dir=config.sft_dir,
        seeds=config.seeds,
        eval_every=config.eval_every,
        eval_samples=config.eval_samples,
        target_optimality=config.target_optimality,
        progress=config.progress,
        ppo=ppo_config,
    )
    start = time.perf_counter()
    runs, timings = rwp.run_seeds(run_config, sft, task, reward_fn, evaluator)
    curves, tokens = [], []
    for run in runs:
        records = read_metrics(run["run_dir"])
        steps = [r for r in records if "score" in r]
        sampled = np.cumsum([r.get("num_sampled_tokens", r["num_response_tokens"]) for r in steps])
        tokens.append(float(sampled[-1]) if len(sampled) else 0.0)
        evals = [r for r in records if "eval/sampled/optimality" in r]
        curves.append(
            (
                [0.0] + [float(sampled[e["step"]]) for e in evals],
                [run["before"]["sampled/optimality"]] + [e["eval/sampled/optimality"] for e in evals],
            )
        )
    after = {
        key: [run["after"][key] for run in runs]
        for key in ("sampled/optimality", "greedy/optimality", "sampled/kl_to_ref", "sampled/invalid")
    }
    reached = [run["target_reached_at"]["step"] if run["target_reached_at"] else None for run in runs]
    return {
        "preset": name,
        "before": runs[0]["before"],
        "settings": {
            k: getattr(ppo_config, k)
            for k in (
                "advantage_estimator",
                "policy_loss",
                "num_generations",
                "kl_placement",
                "kl_estimator",
                "kl_coef",
                "loss_agg",
                "ppo_epochs",
                "clip_eps",
                "clip_eps_high",
            )
        },
        "after": {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": v} for k, v in after.items()},
        "steps_to_target": reached,
        "tokens_sampled": tokens,
        "wall_clock_s": time.perf_counter() - start,
        "sweep_timings": timings,
        "failed": [run["failed"] for run in runs],
        "curves": curves,
    }


def results_table(results: list[dict], sft_before: dict, target: float) -> str:
    lines = [
        f"| preset | sampled optimality (T=1) | greedy optimality | KL to SFT (nats/walk) | steps to {target} "
        "| tokens sampled per run | wall-clock (sweep of all seeds) |",
        "|---|---|---|---|---|---|---|",
        f"| SFT | {sft_before['sampled/optimality']:.3f} | {sft_before['greedy/optimality']:.3f} | 0 | | | |",
    ]
    for r in results:
        a = r["after"]
        reached = [s for s in r["steps_to_target"] if s is not None]
        steps = (
            f"{np.mean(reached):.0f} ({len(reached)}/{len(r['steps_to_target'])} seeds)"
            if reached
            else f"not reached (0/{len(r['steps_to_target'])})"
        )
        lines.append(
            f"| {r['preset']} | {a['sampled/optimality']['mean']:.3f} ± {a['sampled/optimality']['std']:.3f} "
            f"| {a['greedy/optimality']['mean']:.3f} ± {a['greedy/optimality']['std']:.3f} "
            f"| {a['sampled/kl_to_ref']['mean']:.2f} ± {a['sampled/kl_to_ref']['std']:.2f} | {steps} "
            f"| {np.mean(r['tokens_sampled']):.0f} | {r['wall_clock_s']:.0f} s |"
        )
    return "\n".join(lines)


def plot(results: list[dict], out_png: str) -> None:
    panel = {}
    for r in results:
        xs = np.mean([c[0] for c in r["curves"]], axis=0)
        ys = np.mean([c[1] for c in r["curves"]], axis=0)
        panel[r["preset"]] = (xs.tolist(), ys.tolist())
    plot_curves(
        {"sampled optimality (mean over seeds)": panel},
        out_png,
        title="randomwalks: every preset",
        xlabel="response tokens sampled per run",
        ylims={"sampled optimality (mean over seeds)": (0.75, 1.01)},
        ncols=1,
    )


def main(config: Config) -> dict:
    unknown = [p for p in config.presets if p not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown presets {unknown}; known: {', '.join(PRESETS)}")
    os.makedirs(config.out_dir, exist_ok=True)
    save_config(config, os.path.join(config.out_dir, "config.json"))
    sft = rwp.load_sft_policy(rwp.Config(sft_dir=config.sft_dir))
    task = rw.make_task(1002, 21, 0.1, 10)
    reward_fn = rw.make_reward_fn(task, sft.tokenizer)
    evaluator = rw.make_evaluator(sft.model, task, sft.tokenizer, samples_per_prompt=config.eval_samples)
    results = []
    for name in config.presets:
        result = run_preset(config, name, sft, task, reward_fn, evaluator)
        results.append(result)
        a = result["after"]
        print(
            f"{name}: sampled optimality {a['sampled/optimality']['mean']:.3f} ± {a['sampled/optimality']['std']:.3f}, "
            f"KL {a['sampled/kl_to_ref']['mean']:.2f}, {result['wall_clock_s']:.0f} s",
            flush=True,
        )
    sft_before = results[0]["before"]
    table = results_table(results, sft_before, config.target_optimality)
    with open(os.path.join(config.out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(config.out_dir, "summary.json"), "w") as f:
        json.dump({"results": results, "sft": sft_before}, f, indent=2)
    plot(results, os.path.join(config.out_dir, "compare_algorithms.png"))
    print(table)
    return {"results": results, "sft": sft_before}


if __name__ == "__main__":
    main(parse_config(Config))
