"""Countdown, step 2: RL from a verifiable reward lifts the SFT policy's held-out accuracy.

The SFT policy of ``experiments/countdown_sft.py`` writes well-formed answers that use the prompt's
digits but hit the target only part of the time. Here it is trained with a critic-free preset
(GRPO by default; any of `jaxrlhf.training.presets`) on the **training** problems only, with the
checker of ``experiments/tasks/countdown.py`` as the reward: 1 for a correct answer, 0 otherwise,
computed on token ids inside the jitted step. Accuracy is measured on the held-out problems, which
neither SFT nor RL ever sees, greedy and sampled (temperature 1), together with the KL of the
sampled answers to the SFT policy.

    python experiments/countdown_sft.py                      # the SFT policy first (or it runs it)
    python experiments/countdown_rl.py                       # GRPO, seed 0
    python experiments/countdown_rl.py --preset dapo --seeds 0 1 2

The seeds train together as one sweep (`jaxrlhf.training.train_sweep`).

Writes to ``out_dir``: ``config.json``; ``checkpoints/`` (the sweep); per seed ``run_<i>/``
(``metrics.jsonl`` with ``eval/`` held-out metrics, TensorBoard events, ``policy/``);
``summary.json`` (SFT and final evaluation per seed, steps to ``target_accuracy``);
``countdown_rl.png`` (held-out accuracy and KL against sampled tokens).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

import sft_policy
from jaxrlhf.config import parse_config, refuse_unknown_fields, save_config
from jaxrlhf.metrics_log import sampled_token_curve
from jaxrlhf.plotting import plot_curves
from jaxrlhf.training import PPOConfig
from jaxrlhf.training.evaluation import train_seeds
from jaxrlhf.training.presets import PRESETS, preset
from tasks import countdown as cd

# The SFT run's settings that define the problem set; RL must use the same ones.
TASK_FIELDS = ("task_seed", "num_problems", "ops", "ordered")


@refuse_unknown_fields
@dataclasses.dataclass(frozen=True)
class Config:
    """Countdown: critic-free RL (a preset) from the SFT policy with the checker's reward."""

    out_dir: str = "runs/countdown_rl"
    """Directory for config.json, run_<i>/ run directories, summary.json and the plot."""
    sft_dir: str = "runs/countdown_sft"
    """Output directory of experiments/countdown_sft.py (the policy in <sft_dir>/model)."""
    run_sft_if_missing: bool = True
    """Run the SFT script (its defaults, out_dir=sft_dir) when <sft_dir>/model is missing."""
    preset: str = "grpo"
    """The algorithm (`jaxrlhf.training.presets`)."""
    seeds: tuple[int, ...] = (0,)
    """RL runs, one per seed, trained together as one sweep."""
    task_seed: int = 0
    """Seed of the problem set (must match the SFT run's)."""
    num_problems: int = 20000
    """Problems drawn (must match the SFT run's)."""
    ops: str = "+-"
    """Operators (must match the SFT run's)."""
    ordered: bool = True
    """Targets from the digits in the prompt's order (must match the SFT run's)."""
    ppo: PPOConfig = PPOConfig(
        total_steps=150,
        batch_size=256,
        minibatch_size=128,
        num_generations=8,
        max_prompt_len=cd.PROMPT_LEN,
        max_new_tokens=cd.ANSWER_LEN + 2,
        temperature=1.0,
        top_k=None,
        top_p=1.0,
        learning_rate=1e-4,
        critic_learning_rate=1e-4,
        adam_b1=0.9,
        adam_b2=0.99,
        weight_decay=0.0,
        shared_trunk=True,
        save_every=150,
    )
    """Base trainer settings; the preset's algorithm fields go on top (``ppo.seed`` is replaced by
    each entry of ``seeds``). 256 responses per step = 32 training problems x G 8."""
    eval_every: int = 10
    """Evaluate on the held-out problems every this many steps."""
    eval_samples: int = 4
    """Sampled answers per held-out problem in each evaluation (temperature 1)."""
    target_accuracy: float = 0.85
    """Report the first evaluation step at which held-out greedy accuracy reaches this."""
    progress: bool = True
    """Show the trainer's progress bar."""


def load_sft_policy(config: Config):
    """The SFT policy from ``<sft_dir>/model`` (running countdown_sft.py first if allowed), after
    checking that it was trained on the same problem set."""
    problems = {k: getattr(config, k) for k in TASK_FIELDS}
    return sft_policy.load_sft_policy(
        config.sft_dir, "countdown_sft", problems, config.run_sft_if_missing, "problem set"
    )


def run_seeds(config: Config, sft, task: cd.CountdownTask) -> tuple[list[dict], dict]:
    """All seeds as one sweep with the trainer settings ``config.ppo`` as they are (`main` puts the
    preset on them first); returns each run's SFT/final evaluation and the sweep's timings."""
    ppo_config = config.ppo.replace(eos_token_id=sft.tokenizer.eos_token_id, pad_token_id=sft.tokenizer.pad_token_id)
    evaluator = cd.make_evaluator(sft.model, sft.tokenizer, task.held_out, samples_per_problem=config.eval_samples)
    runs, timings, _ = train_seeds(
        sft,
        cd.make_reward_fn(sft.tokenizer),
        cd.encode_prompts(task.train, sft.tokenizer),
        ppo_config,
        config.out_dir,
        config.seeds,
        lambda params, key: evaluator(params, key, sft.params),
        target=("greedy/accuracy", config.target_accuracy),
        ref_params=sft.params,
        eval_every=config.eval_every,
        progress=config.progress,
    )
    return runs, timings


def summarize(runs: list[dict]) -> dict:
    keys = runs[0]["after"].keys()
    return {
        key: {
            "before": float(np.mean([r["before"][key] for r in runs])),
            "mean": float(np.mean([r["after"][key] for r in runs])),
            "std": float(np.std([r["after"][key] for r in runs])),
        }
        for key in keys
    }


def main(config: Config) -> dict:
    if config.preset not in PRESETS:
        raise SystemExit(f"unknown preset {config.preset!r}; known: {', '.join(PRESETS)}")
    config = dataclasses.replace(config, ppo=preset(config.preset, config.ppo))
    os.makedirs(config.out_dir, exist_ok=True)
    save_config(config, os.path.join(config.out_dir, "config.json"))
    sft = load_sft_policy(config)
    task = cd.make_task(config.task_seed, config.num_problems, config.ops, ordered=config.ordered)
    print(f"countdown: RL on {len(task.train)} training problems, held-out accuracy on {len(task.held_out)}")
    runs, timings = run_seeds(config, sft, task)
    summary = {"preset": config.preset, "runs": runs, "mean": summarize(runs), "timings": timings}
    with open(os.path.join(config.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    panels = {"held-out greedy accuracy": {}, "held-out sampled accuracy (T=1)": {}, "KL to SFT (nats/answer)": {}}
    for run in runs:
        for panel, metric in zip(panels, ("greedy/accuracy", "sampled/accuracy", "sampled/kl_to_ref")):
            tokens, values, _ = sampled_token_curve(run["run_dir"], metric, run["before"][metric])
            panels[panel][f"seed {run['seed']}"] = (tokens, values)
    plot_curves(
        panels,
        os.path.join(config.out_dir, "countdown_rl.png"),
        title=f"countdown: {config.preset} from the SFT policy",
        xlabel="response tokens sampled per run",
        ncols=3,
    )
    mean = summary["mean"]
    for key in ("greedy/accuracy", "sampled/accuracy", "sampled/kl_to_ref"):
        print(f"held-out {key}: SFT {mean[key]['before']:.3f} -> {mean[key]['mean']:.3f} ± {mean[key]['std']:.3f}")
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
