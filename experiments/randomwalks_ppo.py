"""Random walks, step 2: PPO teaches the SFT policy to walk to the goal by the shortest path.

trlx's ``randomwalks`` PPO benchmark. The policy (trained on random walks by
``experiments/randomwalks_sft.py``) gets a start letter as its prompt (``<bos> s``) and writes the
rest of a walk, then ``<eos>``. Its reward is the walk's optimality ``(max_length - L) /
(max_length - L_opt)`` (1 for a shortest path, 0 for an invalid walk; see
``experiments/tasks/randomwalks.py``), computed on token ids by a JAX function inside the jitted PPO
step: no text, no host round-trip. A per-token KL penalty to the SFT policy (adaptive coefficient)
keeps the policy close to it.

    python experiments/randomwalks_sft.py                      # the SFT policy first
    python experiments/randomwalks_ppo.py                      # PPO, seed 0
    python experiments/randomwalks_ppo.py --seeds 0 1 2        # three seeds as one sweep: mean and spread
    python experiments/randomwalks_ppo.py --help

Without a finished SFT run in ``sft_dir`` the script runs the SFT script first (``--no-run_sft_if_missing``
makes it stop and say what to run instead; ``--sft_num_steps`` shortens it); with one, it says it uses it.

    python experiments/randomwalks_ppo.py --sft_num_steps 20 --ppo.total_steps 2 --out_dir /tmp/rw_ppo \\
        --sft_dir /tmp/rw_sft                                  # a one-minute check of an install

The seeds train together as one sweep (`jaxrlhf.training.train_sweep`): one compiled step trains
every seed's policy, each with its own sampling key and prompt order.

Writes to ``out_dir``: ``config.json``; ``checkpoints/`` (Orbax, the whole sweep); per seed
``run_<i>/`` (i-th entry of ``seeds``) with ``metrics.jsonl`` (training and ``eval/`` metrics),
TensorBoard events and ``policy/`` (final policy, Hugging Face format); ``sweep_summary.json``;
``randomwalks_ppo.png`` (reward, optimality and KL curves of every seed); ``summary.json``
(before/after evaluation per seed, mean and std over seeds); ``results.md`` (the SFT vs PPO table
of docs/randomwalks.md).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

import sft_policy
from jaxrlhf.config import parse_config, refuse_unknown_fields, save_config
from jaxrlhf.metrics_log import read_metrics
from jaxrlhf.plotting import plot_curves
from jaxrlhf.training import PPOConfig
from jaxrlhf.training.evaluation import train_seeds
from tasks import randomwalks as rw


@refuse_unknown_fields
@dataclasses.dataclass(frozen=True)
class Config:
    """Random walks: PPO from the SFT policy with the optimality reward (trlx's benchmark)."""

    out_dir: str = "runs/randomwalks_ppo"
    """Directory for config.json, run_<i>/ run directories, randomwalks_ppo.png, summary.json."""
    sft_dir: str = "runs/randomwalks_sft"
    """Output directory of experiments/randomwalks_sft.py; the policy is read from <sft_dir>/model."""
    run_sft_if_missing: bool = True
    """When <sft_dir>/model does not exist, run the SFT script (defaults, out_dir=sft_dir) first;
    otherwise stop with a message saying what to run."""
    sft_num_steps: int | None = None
    """When the SFT script runs first: its ``num_steps`` (None: its default, 1000). A few steps make a
    quick end-to-end check of an install (``--sft_num_steps 20 --ppo.total_steps 2``)."""
    seeds: tuple[int, ...] = (0,)
    """PPO runs, one per seed, trained together as one sweep; the summary gives mean and std."""
    task_seed: int = 1002
    """Seed of the graph (must match the SFT run's)."""
    n_nodes: int = 21
    """Nodes of the graph (must match the SFT run's)."""
    p_edge: float = 0.1
    """Edge probability (must match the SFT run's)."""
    max_length: int = 10
    """Most nodes in a walk; the response budget is max_length tokens (max_length - 1 nodes + EOS)."""
    ppo: PPOConfig = PPOConfig(
        total_steps=50,
        batch_size=128,
        minibatch_size=64,
        ppo_epochs=4,
        max_prompt_len=2,
        max_new_tokens=10,
        temperature=1.0,
        top_k=None,
        top_p=1.0,
        kl_coef=0.05,
        adaptive_kl=True,
        target_kl=6.0,
        kl_horizon=10000.0,
        gamma=1.0,
        gae_lambda=0.95,
        clip_eps=0.2,
        value_clip_eps=0.2,
        vf_coef=1.2,
        learning_rate=5e-5,
        critic_learning_rate=5e-5,
        adam_b1=0.9,
        adam_b2=0.95,
        weight_decay=1e-6,
        shared_trunk=True,
        save_every=50,
    )
    """PPO settings: trlx's randomwalks values (128 rollouts per step, 4 PPO epochs, adaptive KL
    from 0.05 with target 6 and horizon 10000, gamma 1, lambda 0.95, clip 0.2, value clip 0.2,
    vf_coef 1.2, value head on the policy's trunk as trlx's), except the learning rate: 5e-5
    instead of 3e-4, which diverged here (1e-4 drifted late in one seed of three; see
    docs/randomwalks.md), and minibatches of 64
    (trlx: 100, which does not divide 128). ``--ppo.total_steps 100`` etc.; ``ppo.seed`` is
    replaced by each entry of ``seeds``."""
    eval_every: int = 10
    """Evaluate (greedy and sampled optimality, KL to SFT) every this many PPO steps."""
    eval_samples: int = 8
    """Sampled walks per start node in each evaluation (temperature 1)."""
    target_optimality: float = 0.95
    """Report the first evaluation step (and wall-clock) at which sampled optimality reaches this."""
    progress: bool = True
    """Show the trainer's progress bar."""


GRAPH_FIELDS = ("task_seed", "n_nodes", "p_edge", "max_length")


def load_sft_policy(config: Config):
    """The SFT policy from ``<sft_dir>/model`` (running randomwalks_sft.py first if allowed), after
    checking that it was trained on the same graph."""
    graph = {k: getattr(config, k) for k in GRAPH_FIELDS}
    overrides = {} if config.sft_num_steps is None else {"num_steps": config.sft_num_steps}
    return sft_policy.load_sft_policy(
        config.sft_dir, "randomwalks_sft", graph, config.run_sft_if_missing, "graph", overrides
    )


def check_sft_graph(config: Config) -> None:
    """Stop when ``<sft_dir>/config.json`` names another graph than ``config``: a policy trained on
    one graph's walks scored on another's edges would learn from a meaningless reward."""
    sft_policy.check_task_settings(config.sft_dir, {k: getattr(config, k) for k in GRAPH_FIELDS}, "graph")


def run_seeds(config: Config, sft, task, reward_fn, evaluator) -> tuple[list[dict], dict]:
    """All seeds as one sweep; returns each run's before/after evaluation, and the sweep's timings."""
    ppo_config = config.ppo.replace(eos_token_id=sft.tokenizer.eos_token_id, pad_token_id=sft.tokenizer.pad_token_id)
    runs, timings, result = train_seeds(
        sft,
        reward_fn,
        rw.encode_prompts(task.prompts, sft.tokenizer),
        ppo_config,
        config.out_dir,
        config.seeds,
        lambda params, key: evaluator(params, sft.params, key),
        target=("sampled/optimality", config.target_optimality),
        ref_params=sft.params,
        eval_every=config.eval_every,
        progress=config.progress,
    )
    for run, history in zip(runs, result.histories):
        kl_coefs = [m["kl_coef"] for m in history if "kl_coef" in m]
        run["final_kl_coef"] = kl_coefs[-1] if kl_coefs else None
    return runs, timings


def plot(config: Config, runs: list[dict], out_png: str) -> None:
    panels = {
        "training reward (mean optimality of rollouts)": {},
        "evaluation optimality (T=1 samples)": {},
        "KL to SFT per sequence": {},
        "KL coefficient": {},
    }
    for run in runs:
        seed = run["seed"]
        records = [r for r in read_metrics(run["run_dir"]) if "score" in r]
        evals = [r for r in read_metrics(run["run_dir"]) if "eval/sampled/optimality" in r]
        steps = [r["step"] + 1 for r in records]
        panels["training reward (mean optimality of rollouts)"][f"seed {seed}"] = (steps, [r["score"] for r in records])
        panels["KL to SFT per sequence"][f"seed {seed}"] = (steps, [r["kl"] for r in records])
        panels["KL coefficient"][f"seed {seed}"] = (steps, [r["kl_coef"] for r in records])
        eval_steps = [0] + [e["step"] + 1 for e in evals]
        panels["evaluation optimality (T=1 samples)"][f"seed {seed}"] = (
            eval_steps,
            [run["before"]["sampled/optimality"]] + [e["eval/sampled/optimality"] for e in evals],
        )
    plot_curves(
        panels, out_png, title="randomwalks PPO", ncols=2, ylims={"evaluation optimality (T=1 samples)": (0.0, 1.02)}
    )


def summarize(runs: list[dict]) -> dict:
    """Mean and std over seeds of every before/after metric."""
    out = {}
    for when in ("before", "after"):
        for key in runs[0][when]:
            values = np.asarray([run[when][key] for run in runs])
            out[f"{when}/{key}"] = {"mean": float(values.mean()), "std": float(values.std()), "values": values.tolist()}
    return out


def results_table(summary: dict, sft_summary: dict | None = None) -> str:
    """The SFT vs PPO table of docs/randomwalks.md (markdown), mean ± std over seeds."""
    over, runs = summary["over_seeds"], summary["runs"]

    def cell(key):
        return f"{over[key]['mean']:.3f} ± {over[key]['std']:.3f}"

    def seconds(key):
        timings = summary.get("sweep_timings", {})
        return f"{timings[key]:.0f} s for the sweep of {len(runs)}" if key in timings else "not recorded"

    reached = [r["target_reached_at"] for r in runs]
    if all(reached):
        steps = np.asarray([r["step"] for r in reached])
        times = np.asarray([r["wall_clock_s"] for r in reached])
        target = f"step {steps.mean():.0f} ± {steps.std():.0f}, {times.mean():.0f} ± {times.std():.0f} s"
    else:
        target = f"{sum(bool(r) for r in reached)} of {len(runs)} seeds"
    sft_time = f"{sft_summary['wall_clock_s']:.0f} s" if sft_summary else "n/a"
    lines = [
        f"| policy ({len(runs)} seeds) | greedy optimality | sampled optimality (T=1) | invalid walks (sampled) "
        "| KL to SFT (nats/walk) | wall-clock | CPU time |",
        "|---|---|---|---|---|---|---|",
        f"| SFT | {cell('before/greedy/optimality')} | {cell('before/sampled/optimality')} | "
        f"{cell('before/sampled/invalid')} | {cell('before/sampled/kl_to_ref')} | {sft_time} (SFT run) | |",
        f"| PPO, {runs[0]['steps']} steps | {cell('after/greedy/optimality')} | {cell('after/sampled/optimality')} | "
        f"{cell('after/sampled/invalid')} | {cell('after/sampled/kl_to_ref')} | {seconds('wall_clock_s')} "
        f"| {seconds('cpu_time_s')} |",
        "",
        f"First evaluation with sampled optimality >= target: {target} (wall-clock from the start of the run, "
        "compilation included).",
    ]
    return "\n".join(lines)


def main(config: Config) -> dict:
    os.makedirs(config.out_dir, exist_ok=True)
    save_config(config, os.path.join(config.out_dir, "config.json"))
    sft = load_sft_policy(config)
    task = rw.make_task(config.task_seed, config.n_nodes, config.p_edge, config.max_length)
    if config.ppo.max_new_tokens < config.max_length:
        print(
            f"warning: ppo.max_new_tokens={config.ppo.max_new_tokens} cannot hold a full walk "
            f"({config.max_length - 1} nodes + EOS)"
        )
    reward_fn = rw.make_reward_fn(task, sft.tokenizer)
    evaluator = rw.make_evaluator(sft.model, task, sft.tokenizer, samples_per_prompt=config.eval_samples)

    runs, timings = run_seeds(config, sft, task, reward_fn, evaluator)
    for run in runs:
        b, a = run["before"], run["after"]
        print(
            f"seed {run['seed']}: sampled optimality {b['sampled/optimality']:.3f} -> {a['sampled/optimality']:.3f}, "
            f"greedy {b['greedy/optimality']:.3f} -> {a['greedy/optimality']:.3f}, "
            f"invalid {b['sampled/invalid']:.3f} -> {a['sampled/invalid']:.3f}, "
            f"KL to SFT {a['sampled/kl_to_ref']:.3f}; target reached at {run['target_reached_at']}"
        )

    summary = {"runs": runs, "over_seeds": summarize(runs), "sweep_timings": timings}
    plot(config, runs, os.path.join(config.out_dir, "randomwalks_ppo.png"))
    with open(os.path.join(config.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    sft_summary_path = os.path.join(config.sft_dir, "summary.json")
    sft_summary = json.load(open(sft_summary_path)) if os.path.isfile(sft_summary_path) else None
    with open(os.path.join(config.out_dir, "results.md"), "w") as f:
        f.write(results_table(summary, sft_summary) + "\n")
    over = summary["over_seeds"]
    print("over seeds (mean ± std):")
    for key in ("greedy/optimality", "sampled/optimality", "sampled/invalid", "sampled/kl_to_ref"):
        print(
            f"  {key:22s} SFT {over['before/' + key]['mean']:.3f} ± {over['before/' + key]['std']:.3f}   "
            f"PPO {over['after/' + key]['mean']:.3f} ± {over['after/' + key]['std']:.3f}"
        )
    print(
        f"  wall-clock of the sweep of {len(runs)} runs: {timings['wall_clock_s']:.0f} s "
        f"(CPU {timings['cpu_time_s']:.0f} s)"
    )
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
