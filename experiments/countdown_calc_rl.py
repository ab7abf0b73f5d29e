"""Countdown with a calculator, step 2: RL with the tool against RL without it, from their SFT policies.

Two conditions, each from its own SFT policy (``experiments/countdown_calc_sft.py``, run first when
missing) on the same problems, model size, RL preset, steps and episodes per step:

- ``tool``: multi-turn episodes with the JAX-native `countdown_calc.Calculator` inside the jitted
  step: up to ``demos.max_calls`` calls, then the answer; every reward from the environment (1 for
  a correct final answer).
- ``no_tool``: countdown as today, one turn: the answer, scored by the same checker
  (`countdown.make_reward_fn`).

Each condition trains ``seeds`` as one sweep (`jaxrlhf.training.train_sweep`) on the training
problems; held-out accuracy (greedy, and sampled at T = 1), tool use (calls per episode, the
fraction of answers whose expression the calculator checked, and how often the policy answers
right after a reply that matched the target / missed it) and the KL to the SFT policy are
measured every ``eval_every`` steps on held-out problems neither SFT nor RL sees.

    python experiments/countdown_calc_rl.py                          # both conditions, 3 seeds each
    python experiments/countdown_calc_rl.py --conditions tool --seeds 0
    python experiments/countdown_calc_rl.py --quick                  # a smoke run (a tiny model, 2 steps)

Writes to ``out_dir``: ``config.json``; per condition ``<condition>/`` (the sweep's checkpoint,
``run_<i>/metrics.jsonl``, TensorBoard events, ``policy/``); ``summary.json``; ``results.md``
(held-out accuracy of the SFT start and after RL, mean ± std over seeds, tool use, KL);
``countdown_calc_rl.png`` (the curves against RL steps).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

import sft_policy
from jaxrlhf.config import config_to_dict, parse_config, refuse_unknown_fields, save_config
from jaxrlhf.metrics_log import read_metrics
from jaxrlhf.plotting import plot_curves
from jaxrlhf.training import PPOConfig
from jaxrlhf.training.evaluation import train_seeds
from jaxrlhf.training.presets import PRESETS, preset
from tasks import countdown as cd
from tasks import countdown_calc as cc

CONDITIONS = ("tool", "no_tool")
# The SFT run's settings that define the problem set; RL must use the same ones.
TASK_FIELDS = ("task_seed", "num_problems")
REPORTED = (
    "greedy/accuracy",
    "sampled/accuracy",
    "sampled/tool_calls",
    "sampled/checked",
    "sampled/answers_after_match",
    "sampled/answers_after_miss",
    "sampled/kl_to_ref",
)


@refuse_unknown_fields
@dataclasses.dataclass(frozen=True)
class Config:
    """Countdown with a calculator: RL with the tool vs without it, from their SFT policies."""

    out_dir: str = "runs/countdown_calc_rl"
    """Directory for config.json, one sweep directory per condition, summary.json, results.md, the plot."""
    sft_root: str = "runs/countdown_calc_sft"
    """The SFT policies: <sft_root>/tool and <sft_root>/no_tool (experiments/countdown_calc_sft.py)."""
    run_sft_if_missing: bool = True
    """Run the SFT script (its defaults and this run's task settings) when a policy is missing."""
    conditions: tuple[str, ...] = CONDITIONS
    """Which conditions to train: "tool" (multi-turn, the calculator) and/or "no_tool" (one turn)."""
    preset: str = "grpo"
    """The algorithm (`jaxrlhf.training.presets`), the same for both conditions."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """RL runs per condition, trained together as one sweep."""
    task_seed: int = 0
    """Seed of the problem set and demonstrations (must match the SFT runs')."""
    num_problems: int = 20000
    """Problems drawn (must match the SFT runs')."""
    demos: cc.DemoSettings = cc.DemoSettings()
    """The SFT demonstrations (must match the SFT runs'); ``max_calls`` + 1 is the tool episodes' turn limit."""
    ppo: PPOConfig = PPOConfig(
        total_steps=250,
        batch_size=128,
        minibatch_size=128,
        num_generations=8,
        max_prompt_len=cd.PROMPT_LEN,
        temperature=1.0,
        top_k=None,
        top_p=1.0,
        learning_rate=1e-4,
        critic_learning_rate=1e-4,
        adam_b1=0.9,
        adam_b2=0.99,
        weight_decay=0.0,
        shared_trunk=True,
        save_every=50,
    )
    """Trainer settings of both conditions; the preset's algorithm fields go on top, and each
    condition its episode shape (`condition_config`). 128 episodes per step = 16 problems x G 8."""
    eval_every: int = 50
    """Evaluate on the held-out problems every this many steps (an evaluation of 3 seeds costs
    about as much as 12 training steps' rollouts)."""
    eval_problems: int = 512
    """Held-out problems evaluated (the first of the fixed held-out split)."""
    eval_samples: int = 2
    """Sampled episodes per held-out problem in each evaluation (temperature 1)."""
    quick: bool = False
    """A smoke run: tiny SFT policies (1 layer, 3 steps) and 2 RL steps on 400 problems, 2 seeds."""
    progress: bool = True
    """Show the trainer's progress bar."""


def quick_config(config: Config) -> Config:
    return dataclasses.replace(
        config,
        seeds=config.seeds[:2],
        num_problems=400,
        eval_every=1,
        eval_problems=16,
        eval_samples=1,
        ppo=config.ppo.replace(total_steps=2, batch_size=16, minibatch_size=16, save_every=2),
    )


QUICK_SFT = dict(n_layer=1, n_embd=16, n_head=2, num_steps=3, batch_size=16, eval_every=3, eval_problems=16)


def sft_dir(config: Config, condition: str) -> str:
    return os.path.join(config.sft_root, condition)


def load_sft_policy(config: Config, condition: str):
    """The condition's SFT policy (trained first if missing), checked against this run's problems
    and demonstrations."""
    directory = sft_dir(config, condition)
    task_settings = {**{k: getattr(config, k) for k in TASK_FIELDS}, "tool": condition == "tool"}
    overrides = {"demos": config.demos, **(QUICK_SFT if config.quick else {})}
    policy = sft_policy.load_sft_policy(
        directory, "countdown_calc_sft", task_settings, config.run_sft_if_missing, "problem set", overrides
    )
    saved = sft_policy.sft_run_config(directory).get("demos")
    if saved is not None and saved != config_to_dict(config.demos):
        raise SystemExit(f"the SFT policy in {directory} learnt from other demonstrations ({saved}): pass its --demos")
    return policy


def condition_config(config: Config, condition: str, tok) -> PPOConfig:
    """The trainer settings of a condition: the tool's episodes (calls, then the answer) or one turn."""
    ppo = config.ppo.replace(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if condition == "tool":
        return ppo.replace(
            max_new_tokens=cc.max_demo_tokens(config.demos),
            max_turns=config.demos.max_calls + 1,
            max_turn_tokens=cc.CALL_LEN + 1,
        )
    return ppo.replace(max_new_tokens=cd.ANSWER_LEN + 2, max_turns=1, max_turn_tokens=None)


def run_condition(config: Config, condition: str, task: cd.CountdownTask) -> dict:
    """One condition's seeds as one sweep, evaluated on the held-out problems."""
    sft = load_sft_policy(config, condition)
    tool = condition == "tool"
    ppo = condition_config(config, condition, sft.tokenizer)
    evaluator = cc.make_evaluator(
        sft.model,
        sft.tokenizer,
        task.held_out[: config.eval_problems],
        max_turns=ppo.max_turns if tool else 1,
        max_new_tokens=cc.max_demo_tokens(config.demos),
        samples_per_problem=config.eval_samples,
    )
    runs, timings, _ = train_seeds(
        sft,
        None if tool else cd.make_reward_fn(sft.tokenizer),
        cd.encode_prompts(task.train, sft.tokenizer),
        ppo,
        os.path.join(config.out_dir, condition),
        config.seeds,
        lambda params, key: evaluator(params, key, sft.params),
        ref_params=sft.params,
        eval_every=config.eval_every,
        progress=config.progress,
        environment=cc.Calculator(cc.calc_ids(sft.tokenizer)) if tool else None,
    )
    return {"condition": condition, "runs": runs, "mean": summarize(runs), "timings": timings}


def summarize(runs: list[dict]) -> dict:
    return {
        key: {
            "before": float(np.mean([r["before"][key] for r in runs])),
            "mean": float(np.mean([r["after"][key] for r in runs])),
            "std": float(np.std([r["after"][key] for r in runs])),
        }
        for key in runs[0]["after"]
    }


def _cells(mean: dict, which: str) -> list[str]:
    """The table's cells of one row: ``which`` is "before" (the SFT start) or "mean" (± std after RL)."""

    def cell(key):
        return f"{mean[key][which]:.3f}" + (f" ± {mean[key]['std']:.3f}" if which == "mean" else "")

    after_match, after_miss = "sampled/answers_after_match", "sampled/answers_after_miss"
    return [
        f"{cell(after_match)} / {cell(after_miss)}" if key == after_match else cell(key)
        for key in REPORTED
        if key != after_miss
    ]


def results_table(results: list[dict]) -> str:
    """Markdown: the SFT start and RL (mean ± std over seeds) of each condition."""
    header = (
        "| policy | held-out greedy accuracy | held-out sampled accuracy (T=1) | tool calls per episode (sampled) "
        "| answers checked with the tool (sampled) | answers next after a match / after a miss (sampled) "
        "| KL to SFT (nats/episode) |\n|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for result in results:
        name = result["condition"].replace("_", " ")
        mean = result["mean"]
        lines.append(f"| SFT, {name} | " + " | ".join(_cells(mean, "before")) + " |")
    for result in results:
        name = result["condition"].replace("_", " ")
        mean = result["mean"]
        lines.append(f"| RL ({len(result['runs'])} seeds), {name} | " + " | ".join(_cells(mean, "mean")) + " |")
    return header + "\n".join(lines) + "\n"


TOOL_ONLY = ("sampled/tool_calls", "sampled/checked", "sampled/answers_after_miss")


def plot(config: Config, results: list[dict]) -> str:
    titles = {
        "greedy/accuracy": "held-out greedy accuracy",
        "sampled/accuracy": "held-out sampled accuracy (T=1)",
        "sampled/tool_calls": "tool calls per episode (sampled)",
        "sampled/checked": "answers checked with the tool",
        "sampled/answers_after_miss": "answers next after a missed check",
    }
    panels: dict[str, dict] = {title: {} for title in titles.values()}
    for result in results:
        for run in result["runs"]:
            evals = [r for r in read_metrics(run["run_dir"]) if "eval/greedy/accuracy" in r]
            steps = [0] + [r["step"] for r in evals]
            for metric, title in titles.items():
                if result["condition"] == "no_tool" and metric in TOOL_ONLY:
                    continue  # no calls, no replies: a flat 0
                values = [run["before"][metric]] + [r[f"eval/{metric}"] for r in evals]
                panels[title][f"{result['condition'].replace('_', ' ')}, seed {run['seed']}"] = (steps, values)
    return plot_curves(
        panels,
        os.path.join(config.out_dir, "countdown_calc_rl.png"),
        title=f"countdown with a calculator: {config.preset} with and without the tool",
        xlabel="RL step",
        ncols=5,
    )


def main(config: Config) -> dict:
    if config.preset not in PRESETS:
        raise SystemExit(f"unknown preset {config.preset!r}; known: {', '.join(PRESETS)}")
    unknown = set(config.conditions) - set(CONDITIONS)
    if unknown or not config.conditions:
        raise SystemExit(f"conditions must be some of {CONDITIONS}, got {config.conditions}")
    if config.quick:
        config = quick_config(config)
    config = dataclasses.replace(config, ppo=preset(config.preset, config.ppo))
    os.makedirs(config.out_dir, exist_ok=True)
    save_config(config, os.path.join(config.out_dir, "config.json"))
    task = cc.make_task(config.task_seed, config.num_problems)
    print(f"countdown_calc: RL on {len(task.train)} training problems, held-out evaluation on "
          f"{min(config.eval_problems, len(task.held_out))}")  # fmt: skip
    results = [run_condition(config, condition, task) for condition in config.conditions]
    summary = {"preset": config.preset, "results": results}
    with open(os.path.join(config.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = results_table(results)
    with open(os.path.join(config.out_dir, "results.md"), "w") as f:
        f.write(f"# countdown with a calculator: {config.preset}, {config.ppo.total_steps} steps\n\n{table}")
    plot(config, results)
    print(table)
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
