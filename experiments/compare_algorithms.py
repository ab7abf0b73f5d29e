"""Every RL preset on randomwalks or countdown, seeds as one sweep each: which learns, how fast, at what KL.

``--task countdown`` runs them on the verifiable-reward arithmetic task instead (the SFT policy of
experiments/countdown_sft.py, held-out accuracy, experiments/countdown_rl.py's evaluation; its
defaults in `TASK_DEFAULTS`); what follows describes randomwalks, the default.

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
    python experiments/compare_algorithms.py --task_seed 9 --steps 100   # another graph

The graph is ``tasks.randomwalks.make_task(task_seed, n_nodes, p_edge, max_length)``, trlx's by
default (seed 1002). The SFT policy must be trained on the same graph: by default ``sft_dir`` and
``out_dir`` are named after it (``runs/randomwalks_sft`` and ``runs/compare_algorithms`` for trlx's
graph, ``runs/randomwalks_sft_seed9`` and ``runs/compare_algorithms_seed9`` for seed 9), the SFT
script runs first when that directory has no model, and an SFT run of another graph is refused.

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
from collections.abc import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling script, also when imported
import countdown_rl as crl  # noqa: E402
import randomwalks_ppo as rwp  # noqa: E402

import sft_policy  # noqa: E402
from jaxrlhf.config import config_to_dict, parse_config, refuse_unknown_fields, save_config  # noqa: E402
from jaxrlhf.metrics_log import sampled_token_curve  # noqa: E402
from jaxrlhf.plotting import plot_curves  # noqa: E402
from jaxrlhf.training import PPOConfig  # noqa: E402
from jaxrlhf.training.presets import PRESETS, preset  # noqa: E402
from tasks import countdown as cd  # noqa: E402
from tasks import randomwalks as rw  # noqa: E402


@refuse_unknown_fields
@dataclasses.dataclass(frozen=True)
class Config:
    """Every preset on one task (randomwalks or countdown), the same budget of sampled responses each."""

    task: str = "randomwalks"
    """"randomwalks" (shortest paths, reward = optimality) or "countdown" (arithmetic, reward = the
    checker's 1 or 0, accuracy on held-out problems)."""
    out_dir: str | None = None
    """Directory for config.json, one sweep directory per preset, summary.json, results.md and the plot
    (None: ``runs/compare_algorithms`` plus the graph's suffix, see `graph_suffix`, or
    ``runs/compare_algorithms_countdown``)."""
    sft_dir: str | None = None
    """The SFT script's output, run first when missing (None: ``runs/randomwalks_sft`` plus the
    graph's suffix, or ``runs/countdown_sft``)."""
    task_seed: int | None = None
    """Seed of the graph and walks (None: trlx's 1002) or of the countdown problem set (None: 0); the
    SFT policy must have been trained on the same."""
    n_nodes: int = 21
    """randomwalks: nodes of the graph."""
    p_edge: float = 0.1
    """randomwalks: probability of each directed edge."""
    max_length: int = 10
    """randomwalks: most nodes in a walk; also the response budget in tokens (max_length - 1 nodes + EOS)."""
    presets: tuple[str, ...] = tuple(PRESETS)
    """Presets to run (`jaxrlhf.training.presets`)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of every preset, trained together as one sweep."""
    steps: int | None = None
    """RL steps of every run (None: the task's, see `TASK_DEFAULTS`)."""
    batch_size: int | None = None
    """Sampled responses per step, every preset (None: the task's)."""
    minibatch_size: int | None = None
    """Responses per optimizer update (None: the task's)."""
    group_size: int = 8
    """Responses per prompt for the group presets (G; must divide batch_size)."""
    learning_rate: float | None = None
    """Policy (and critic) learning rate of every preset (None: the task's)."""
    eval_every: int = 10
    """Evaluate every this many steps."""
    eval_samples: int | None = None
    """Sampled responses per evaluation prompt (None: the task's)."""
    target: float | None = None
    """Report the first evaluation at which the task's main metric reaches this (None: the task's)."""
    progress: bool = False
    """Show the trainer's progress bar."""


TASK_DEFAULTS = {
    # randomwalks_ppo's settings: its 128 responses per step and tuned PPO learning rate.
    "randomwalks": dict(
        task_seed=1002, steps=50, batch_size=128, minibatch_size=64, learning_rate=5e-5, eval_samples=8, target=0.95
    ),
    # countdown_rl's: 32 training problems x G 8 per step.
    "countdown": dict(
        task_seed=0, steps=150, batch_size=256, minibatch_size=128, learning_rate=1e-4, eval_samples=4, target=0.85
    ),
}
"""What the None fields of `Config` become, per task."""
MAIN_METRIC = {"randomwalks": "sampled/optimality", "countdown": "greedy/accuracy"}
"""Per task, the metric of the target, the plot and the printed line."""


TRLX_GRAPH = (1002, 21, 0.1, 10)  # (task_seed, n_nodes, p_edge, max_length) of trlx's randomwalks


def graph_suffix(task_seed: int, n_nodes: int, p_edge: float, max_length: int) -> str:
    """Suffix of the default run directories of a graph: "" for trlx's, else ``_seed<k>`` (and
    ``_n<nodes>``, ``_p<p_edge>``, ``_len<max_length>`` for the settings that differ from trlx's)."""
    if (task_seed, n_nodes, p_edge, max_length) == TRLX_GRAPH:
        return ""
    suffix = f"_seed{task_seed}"
    if n_nodes != TRLX_GRAPH[1]:
        suffix += f"_n{n_nodes}"
    if p_edge != TRLX_GRAPH[2]:
        suffix += f"_p{p_edge:g}"
    if max_length != TRLX_GRAPH[3]:
        suffix += f"_len{max_length}"
    return suffix


def resolve(config: Config) -> Config:
    """``config`` with every None field filled in: the task's defaults, and out_dir and sft_dir
    from the graph (randomwalks) or the task's name (countdown)."""
    if config.task not in TASK_DEFAULTS:
        raise SystemExit(f"unknown task {config.task!r}; known: {', '.join(TASK_DEFAULTS)}")
    filled = {k: v for k, v in TASK_DEFAULTS[config.task].items() if getattr(config, k) is None}
    config = dataclasses.replace(config, **filled)
    if config.task == "countdown":
        suffix = "_countdown" if config.task_seed == 0 else f"_countdown_seed{config.task_seed}"
        sft_dir = "runs/countdown_sft" if config.task_seed == 0 else f"runs/countdown_sft_seed{config.task_seed}"
    else:
        assert config.task_seed is not None
        suffix = graph_suffix(config.task_seed, config.n_nodes, config.p_edge, config.max_length)
        sft_dir = f"runs/randomwalks_sft{suffix}"
    return dataclasses.replace(
        config,
        out_dir=config.out_dir if config.out_dir is not None else f"runs/compare_algorithms{suffix}",
        sft_dir=config.sft_dir if config.sft_dir is not None else sft_dir,
    )


def graph_summary(task: rw.RandomWalks) -> dict:
    """What makes a graph easy or hard: start nodes per shortest-path length, and the data's score."""
    lengths = task.shortest[list(task.start_nodes)]
    data = rw.optimality_reference(task, task.walks)
    return {
        "start_nodes": len(task.start_nodes),
        "start_nodes_per_shortest_path_nodes": {
            int(n): int(c) for n, c in zip(*np.unique(lengths, return_counts=True), strict=True)
        },
        "longest_shortest_path_nodes": int(lengths.max()),
        "data_optimality": float(data["optimality"].mean()),
        "data_walks_reaching_goal": float(1.0 - data["invalid"].mean()),
    }


def run_preset(config: Config, name: str, base: PPOConfig, run_seeds: Callable) -> dict:
    """One preset, every seed as one sweep: ``run_seeds(out_dir, ppo_config) -> (runs, timings)``
    (the task's, see `randomwalks_seeds` and `countdown_seeds`) trains them. Returns the result dict
    that `results_table` and `plot` read:

    ``preset``; ``before`` and ``after`` (``{metric: {"mean", "std", "values"}}`` over seeds; ``before``
    is the first seed's SFT evaluation); ``steps_to_target`` (per seed, None if never reached);
    ``tokens_sampled`` (per seed); ``wall_clock_s`` and ``load_average`` (1, 5, 15-minute averages at
    the start and the end); ``curves`` (per seed ``(tokens sampled, main metric)`` at each evaluation,
    the SFT's first at 0 tokens).
    """
    assert config.steps is not None and config.learning_rate is not None and config.out_dir is not None
    base = base.replace(
        total_steps=config.steps,
        batch_size=config.batch_size,
        minibatch_size=config.minibatch_size,
        learning_rate=config.learning_rate,
        critic_learning_rate=config.learning_rate,
        num_generations=config.group_size,
        save_every=config.steps,
    )
    ppo_config = preset(name, base)
    metric = MAIN_METRIC[config.task]
    load_start = os.getloadavg()
    start = time.perf_counter()
    runs, timings = run_seeds(os.path.join(config.out_dir, name), ppo_config)
    wall_clock_s = time.perf_counter() - start
    curves, tokens = [], []
    for run in runs:
        *curve, total = sampled_token_curve(run["run_dir"], metric, run["before"][metric])
        curves.append(tuple(curve))
        tokens.append(total)

    def over_seeds(when: str) -> dict:
        return {
            key: {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": v}
            for key in runs[0][when]
            for v in [[run[when][key] for run in runs]]
        }

    reached = [run["target_reached_at"]["step"] if run["target_reached_at"] else None for run in runs]
    return {
        "preset": name,
        "before": over_seeds("before"),
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
        "after": over_seeds("after"),
        "steps_to_target": reached,
        "tokens_sampled": tokens,
        "wall_clock_s": wall_clock_s,
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "sweep_timings": timings,
        "failed": [run["failed"] for run in runs],
        "curves": curves,
    }


RANDOMWALKS_COLUMNS = (
    ("sampled/optimality", "sampled optimality (T=1)", 3),
    ("greedy/optimality", "greedy optimality", 3),
    ("sampled/kl_to_ref", "KL to SFT (nats/walk)", 2),
)
"""The table's metric columns: (key in a result's ``before``/``after``, header, decimals)."""


def steps_to_target_cell(steps: list[int | None]) -> str:
    """``"<mean> (<k>/<n> seeds: s1, s2, ...)"`` over the seeds that reached it, "-" for those that did not."""
    reached = [s for s in steps if s is not None]
    per_seed = ", ".join("-" if s is None else str(s) for s in steps)
    if not reached:
        return f"not reached (0/{len(steps)})"
    return f"{np.mean(reached):.0f} ({len(reached)}/{len(steps)} seeds: {per_seed})"


def results_table(
    results: list[dict], sft_before: dict, target: float, columns: tuple = RANDOMWALKS_COLUMNS, base: str = "SFT"
) -> str:
    """Markdown table, one row per result of `run_preset` (mean ± std over seeds), the SFT row first.

    ``sft_before`` maps each column's key to the SFT's value. The wall-clock is the sweep of all seeds,
    compilation included, with the 5-minute load average of the machine at its end (this run included)
    and the CPU time of this process over the sweep, which other processes on the machine inflate less.
    """
    headers = [label for _, label, _ in columns]
    lines = [
        "| preset | " + " | ".join(headers) + f" | steps to {target} | tokens sampled per run "
        "| wall-clock of the sweep of all seeds (5-min load avg at its end; CPU time) |",
        "|---" * (len(columns) + 4) + "|",
        f"| {base} | " + " | ".join(f"{sft_before[key]:.{digits}f}" for key, _, digits in columns) + " | | | |",
    ]
    for r in results:
        cells = [
            f"{r['after'][key]['mean']:.{digits}f} ± {r['after'][key]['std']:.{digits}f}" for key, _, digits in columns
        ]
        load = r.get("load_average", {}).get("end")
        cpu = r.get("sweep_timings", {}).get("cpu_time_s")
        under = ([f"load {load[1]:.1f}"] if load else []) + ([f"CPU {cpu:.0f} s"] if cpu is not None else [])
        wall = f"{r['wall_clock_s']:.0f} s" + (f" ({'; '.join(under)})" if under else "")
        lines.append(
            f"| {r['preset']} | "
            + " | ".join(cells)
            + f" | {steps_to_target_cell(r['steps_to_target'])} | {np.mean(r['tokens_sampled']):.0f} | {wall} |"
        )
    return "\n".join(lines)


def plot(
    results: list[dict],
    out_png: str,
    title: str = "randomwalks: every preset",
    ylabel: str = "sampled optimality (mean over seeds)",
) -> None:
    """The metric against tokens sampled, mean over seeds, one line per preset (curves of `run_preset`)."""
    panel = {}
    for r in results:
        xs = np.mean([c[0] for c in r["curves"]], axis=0)
        ys = np.mean([c[1] for c in r["curves"]], axis=0)
        panel[r["preset"]] = (xs.tolist(), ys.tolist())
    lowest = min(min(ys) for _, ys in panel.values())
    plot_curves(
        {ylabel: panel},
        out_png,
        title=title,
        xlabel="response tokens sampled per run",
        ylims={ylabel: (max(0.0, np.floor(lowest * 20) / 20 - 0.05), 1.01)},  # a 0.05 grid below the lowest
        ncols=1,
    )


COUNTDOWN_COLUMNS = (
    ("greedy/accuracy", "held-out greedy accuracy", 3),
    ("sampled/accuracy", "held-out sampled accuracy (T=1)", 3),
    ("sampled/kl_to_ref", "KL to SFT (nats/answer)", 2),
)


@dataclasses.dataclass(frozen=True)
class TaskSetup:
    """What `main` needs of a task: the base trainer settings, how to train a preset's seeds, and
    how to report them."""

    base: PPOConfig
    run_seeds: Callable[[str, PPOConfig], tuple[list[dict], dict]]
    description: dict
    title: str
    ylabel: str
    columns: tuple


def randomwalks_setup(config: Config) -> TaskSetup:
    assert config.task_seed is not None and config.eval_samples is not None and config.target is not None
    task = rw.make_task(config.task_seed, config.n_nodes, config.p_edge, config.max_length)
    if not task.start_nodes:
        raise SystemExit(f"graph seed {config.task_seed}: no node reaches the goal in < {config.max_length} nodes")
    graph = graph_summary(task)
    print(f"graph seed {config.task_seed} ({config.n_nodes} nodes, p_edge {config.p_edge}): {graph}", flush=True)
    task_fields = dict(task_seed=config.task_seed, n_nodes=config.n_nodes, p_edge=config.p_edge)
    task_fields.update(max_length=config.max_length)
    sft = rwp.load_sft_policy(rwp.Config(sft_dir=config.sft_dir, **task_fields))
    reward_fn = rw.make_reward_fn(task, sft.tokenizer)
    evaluator = rw.make_evaluator(sft.model, task, sft.tokenizer, samples_per_prompt=config.eval_samples)

    def run_seeds(out_dir: str, ppo_config: PPOConfig):
        run_config = rwp.Config(
            out_dir=out_dir,
            sft_dir=config.sft_dir,
            seeds=config.seeds,
            eval_every=config.eval_every,
            eval_samples=config.eval_samples,
            target_optimality=config.target,
            progress=config.progress,
            ppo=ppo_config,
            **task_fields,
        )
        return rwp.run_seeds(run_config, sft, task, reward_fn, evaluator)

    on_trlx_graph = (config.task_seed, config.n_nodes, config.p_edge, config.max_length) == TRLX_GRAPH
    return TaskSetup(
        base=rwp.Config().ppo.replace(max_new_tokens=config.max_length),
        run_seeds=run_seeds,
        description={"graph": graph},
        title="randomwalks: every preset" + ("" if on_trlx_graph else f" (graph seed {config.task_seed})"),
        ylabel="sampled optimality (mean over seeds)",
        columns=RANDOMWALKS_COLUMNS,
    )


def countdown_setup(config: Config) -> TaskSetup:
    assert config.task_seed is not None and config.sft_dir is not None and config.target is not None
    # The problem set is the SFT run's (its config.json), else countdown_rl's defaults (SFT runs with them).
    saved = sft_policy.sft_run_config(config.sft_dir)
    sft_task = {k: v for k, v in saved.items() if k in crl.TASK_FIELDS and k != "task_seed"}
    rl_config = crl.Config(
        sft_dir=config.sft_dir,
        task_seed=config.task_seed,
        **sft_task,
        eval_every=config.eval_every,
        eval_samples=config.eval_samples,
        target_accuracy=config.target,
        progress=config.progress,
        seeds=config.seeds,
    )
    sft = crl.load_sft_policy(rl_config)
    task = cd.make_task(rl_config.task_seed, rl_config.num_problems, rl_config.ops, ordered=rl_config.ordered)
    print(f"countdown: {len(task.train)} training problems, {len(task.held_out)} held out", flush=True)

    def run_seeds(out_dir: str, ppo_config: PPOConfig):
        run_config = dataclasses.replace(rl_config, out_dir=out_dir, ppo=ppo_config)  # trained as given
        return crl.run_seeds(run_config, sft, task)

    problems = {"train": len(task.train), "held_out": len(task.held_out), "ops": task.ops, "ordered": task.ordered}
    return TaskSetup(
        base=rl_config.ppo,
        run_seeds=run_seeds,
        description={"problems": problems},
        title="countdown: every preset",
        ylabel="held-out greedy accuracy (mean over seeds)",
        columns=COUNTDOWN_COLUMNS,
    )


def finished_presets(config: Config) -> dict[str, dict]:
    """The results an earlier run of this same comparison (the same config.json, the list of presets
    aside) left in ``out_dir/summary.json``, by preset. A comparison cut short is rerun with the same
    command: the presets it finished are taken as they are (their steps to target and wall-clock
    are those of the run that trained them); an unfinished preset's sweep resumes from its checkpoint."""
    assert config.out_dir is not None
    config_path, summary_path = (os.path.join(config.out_dir, name) for name in ("config.json", "summary.json"))
    if not (os.path.isfile(config_path) and os.path.isfile(summary_path)):
        return {}
    with open(config_path) as f:
        before = json.load(f)
    now = json.loads(json.dumps(config_to_dict(config)))
    before.pop("presets", None)
    now.pop("presets", None)
    if before != now:
        return {}
    with open(summary_path) as f:
        return {result["preset"]: result for result in json.load(f)["results"]}


def main(config: Config) -> dict:
    unknown = [p for p in config.presets if p not in PRESETS]
    if unknown or not config.presets:
        raise SystemExit(f"unknown presets {unknown or 'none given'}; known: {', '.join(PRESETS)}")
    config = resolve(config)
    assert config.batch_size is not None and config.out_dir is not None
    if config.batch_size % config.group_size:
        raise SystemExit(f"group_size {config.group_size} must divide batch_size {config.batch_size}")
    setup = countdown_setup(config) if config.task == "countdown" else randomwalks_setup(config)
    finished = finished_presets(config)
    os.makedirs(config.out_dir, exist_ok=True)
    save_config(config, os.path.join(config.out_dir, "config.json"))
    metric = MAIN_METRIC[config.task]
    results = []
    for name in config.presets:
        if name in finished:
            print(f"{name}: finished by an earlier run of this comparison (its summary.json), not trained again")
        result = finished.get(name) or run_preset(config, name, setup.base, setup.run_seeds)
        results.append(result)
        a = result["after"]
        print(
            f"{name}: {metric} {a[metric]['mean']:.3f} ± {a[metric]['std']:.3f}, "
            f"KL {a['sampled/kl_to_ref']['mean']:.2f}, steps to target {result['steps_to_target']}, "
            f"{result['wall_clock_s']:.0f} s (load {result['load_average']['end'][1]:.1f})",
            flush=True,
        )
        # Written after every preset, so that a long comparison cut short keeps what it finished.
        summary, table = write_results(config, results, setup)
    print(table)
    return summary


def write_results(config: Config, results: list[dict], setup: TaskSetup) -> tuple[dict, str]:
    """results.md, summary.json and the plot of the presets done so far; returns the summary and the table."""
    assert config.out_dir is not None and config.target is not None
    sft_before = {key: value["mean"] for key, value in results[0]["before"].items()}
    table = results_table(results, sft_before, config.target, setup.columns)
    with open(os.path.join(config.out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    summary = {"task": config.task, "results": results, "sft": sft_before, **setup.description}
    with open(os.path.join(config.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot(results, os.path.join(config.out_dir, "compare_algorithms.png"), title=setup.title, ylabel=setup.ylabel)
    return summary, table


if __name__ == "__main__":
    main(parse_config(Config))
