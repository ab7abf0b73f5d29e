"""Off-policy RL on countdown: does staleness hurt, and does the rollout correction repair it?

GRPO (by default; any preset) from the countdown SFT policy (experiments/countdown_rl.py's task,
reward and held-out evaluation), in variants that differ only in how off-policy the sampler is:

    sync-fp32   today's trainer: float32 sampler, synchronous                  (the reference)
    k0          bf16 rollouts (a bf16 copy of the float32 parameters samples)
    k0-tis      ... corrected with ``correction`` (token TIS by default)
    k1, k1-tis  bf16 rollouts one update old (max_staleness = 1), without / with the correction
    k2, k2-tis  two updates old

Every variant trains ``seeds`` as one sweep on the same problems, batches (batch t holds the
prompts of step t in every variant) and evaluation keys, and is evaluated on the held-out problems
every ``eval_every`` steps. The table gives the final held-out accuracy (mean ± std over seeds),
the steps and the training wall-clock (the summed step times, the first step's compile excluded)
to reach ``target_accuracy``, and what the metrics measured: the sampler/trainer mismatch
(``mismatch_k3``), the staleness of the trained batches and the fraction of weights the correction
truncated. The plot: accuracy against steps and against that wall-clock.

Wall-clock here is this process's, on its devices: a stale run on one device does the work of a
synchronous one per step (it only reorders it), so staleness buys time only when rollout and
update run on separate devices at once (`jaxrlhf.training.asynchronous.SplitMeshPPO`; its expected
gain from measured phase times: benchmarks/async_timeline.py). bf16 rollouts are cheaper on
accelerators with bf16 matrix units, not on CPU.

    python experiments/countdown_sft.py                       # the SFT policy first (or it runs it)
    python experiments/offpolicy_countdown.py                 # every variant, 3 seeds each
    python experiments/offpolicy_countdown.py --variants sync-fp32 k2 k2-tis --seeds 0
    python experiments/offpolicy_countdown.py --quick         # a smoke run: tiny SFT, 2 steps

Writes to ``out_dir``: ``config.json``; per variant ``<variant>/`` (the sweep: checkpoint,
``run_<i>/metrics.jsonl``); ``summary.json``; ``results.md`` (the table and, per staleness, how the
uncorrected and corrected runs compare with the reference); ``offpolicy_countdown.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling scripts, also when imported
import countdown_rl as crl  # noqa: E402

from jaxrlhf.config import parse_config, refuse_unknown_fields, save_config  # noqa: E402
from jaxrlhf.core import ROLLOUT_CORRECTIONS  # noqa: E402
from jaxrlhf.metrics_log import read_metrics  # noqa: E402
from jaxrlhf.plotting import plot_curves  # noqa: E402
from jaxrlhf.training import PPOConfig  # noqa: E402
from jaxrlhf.training.presets import PRESETS, preset  # noqa: E402
from tasks import countdown as cd  # noqa: E402

# name -> (max_staleness, corrected, bf16 rollouts)
VARIANTS: dict[str, tuple[int, bool, bool]] = {
    "sync-fp32": (0, False, False),
    "k0": (0, False, True),
    "k0-tis": (0, True, True),
    "k1": (1, False, True),
    "k1-tis": (1, True, True),
    "k2": (2, False, True),
    "k2-tis": (2, True, True),
}
METRIC = "greedy/accuracy"


@refuse_unknown_fields
@dataclasses.dataclass(frozen=True)
class Config:
    """Countdown with stale and low-precision rollouts, with and without a rollout correction."""

    out_dir: str = "runs/offpolicy_countdown"
    """Directory for config.json, one sweep per variant, summary.json, results.md and the plot."""
    sft_dir: str = "runs/countdown_sft"
    """Output directory of experiments/countdown_sft.py (run first when it has no model)."""
    preset: str = "grpo"
    """The algorithm (`jaxrlhf.training.presets`)."""
    variants: tuple[str, ...] = tuple(VARIANTS)
    """Which variants to run (see the module docstring)."""
    correction: str = "tis"
    """The rollout correction of the "-tis" variants (a name of `jaxrlhf.core.ROLLOUT_CORRECTIONS`)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of every variant, trained together as one sweep."""
    task_seed: int = 0
    """Seed of the problem set (must match the SFT run's)."""
    num_problems: int = 20000
    """Problems drawn (must match the SFT run's)."""
    ops: str = "+-"
    """Operators (must match the SFT run's)."""
    ordered: bool = True
    """Targets from the digits in the prompt's order (must match the SFT run's)."""
    ppo: PPOConfig = crl.Config().ppo
    """Base trainer settings (countdown_rl's); the preset goes on top, then each variant's fields."""
    eval_every: int = 10
    """Evaluate on the held-out problems every this many steps."""
    eval_samples: int = 4
    """Sampled answers per held-out problem in each evaluation."""
    target_accuracy: float = 0.85
    """Report the first evaluation at which held-out greedy accuracy reaches this."""
    quick: bool = False
    """A smoke run: a tiny SFT policy (trained here if missing) on 400 problems, 2 steps of 16
    responses, 2 seeds, three variants (unless ``variants`` is given otherwise)."""
    progress: bool = False
    """Show the trainer's progress bar."""


def resolve(config: Config) -> Config:
    """The settings of a ``--quick`` run, and the checks that need no work."""
    unknown = [v for v in config.variants if v not in VARIANTS]
    if unknown or not config.variants:
        raise SystemExit(f"unknown variants {unknown or 'none given'}; known: {', '.join(VARIANTS)}")
    if config.preset not in PRESETS:
        raise SystemExit(f"unknown preset {config.preset!r}; known: {', '.join(PRESETS)}")
    if config.correction not in ROLLOUT_CORRECTIONS:
        raise SystemExit(f"unknown correction {config.correction!r}; known: {', '.join(ROLLOUT_CORRECTIONS)}")
    if not config.quick:
        return config
    variants = ("sync-fp32", "k1-tis", "k2") if config.variants == tuple(VARIANTS) else config.variants
    return dataclasses.replace(
        config,
        out_dir=config.out_dir + "_quick" if config.out_dir == Config.out_dir else config.out_dir,
        sft_dir=config.sft_dir + "_quick" if config.sft_dir == Config.sft_dir else config.sft_dir,
        num_problems=400,
        variants=variants,
        seeds=config.seeds[:2],
        eval_every=1,
        eval_samples=1,
        ppo=config.ppo.replace(total_steps=2, batch_size=16, minibatch_size=16, num_generations=4, save_every=2),
    )


def ensure_quick_sft(config: Config) -> None:
    """A tiny SFT policy for a quick run, trained here when ``sft_dir`` has none."""
    if os.path.isfile(os.path.join(config.sft_dir, "model", "config.json")):
        return
    import countdown_sft

    from jaxrlhf.training.sft import SFTConfig

    countdown_sft.main(
        countdown_sft.Config(
            out_dir=config.sft_dir,
            task_seed=config.task_seed,
            num_problems=config.num_problems,
            ops=config.ops,
            ordered=config.ordered,
            n_layer=1,
            n_embd=16,
            n_head=2,
            num_steps=3,
            batch_size=16,
            eval_every=3,
            sft=SFTConfig(learning_rate=1e-3),
        )
    )


def variant_config(config: Config, name: str) -> PPOConfig:
    staleness, corrected, bf16 = VARIANTS[name]
    return preset(config.preset, config.ppo).replace(
        max_staleness=staleness,
        rollout_correction=config.correction if corrected else None,
        rollout_dtype="bfloat16" if bf16 else None,
    )


def run_curve(run_dir: str, before: float) -> dict:
    """One run's held-out accuracy at each evaluation (the SFT's first, at step 0 and 0 s), against
    steps and against the summed step times since the first step (which compiles)."""
    rows = read_metrics(run_dir)
    steps = [row for row in rows if "step_time" in row]  # the training rows (evaluations have their own)
    elapsed, seconds = 0.0, {}
    for row in steps:
        if row["step"] > 0:
            elapsed += row["step_time"]
        seconds[row["step"]] = elapsed
    evals = [row for row in rows if f"eval/{METRIC}" in row]
    mean_of = lambda name, absent: _finite_mean([row.get(name, absent) for row in steps])  # noqa: E731
    return {
        "steps": [0] + [row["step"] + 1 for row in evals],
        "seconds": [0.0] + [seconds[row["step"]] for row in evals],
        "accuracy": [before] + [row[f"eval/{METRIC}"] for row in evals],
        "mismatch_k3": mean_of("mismatch_k3", np.nan),
        "staleness": mean_of("staleness_mean", 0.0),
        "is_clipfrac": mean_of("is_clipfrac", np.nan),
    }


def first_reaching(curve: dict, target: float) -> tuple[int | None, float | None]:
    for step, seconds, accuracy in zip(curve["steps"][1:], curve["seconds"][1:], curve["accuracy"][1:]):
        if accuracy >= target:
            return step, seconds
    return None, None


def run_variant(config: Config, name: str, sft, task) -> dict:
    ppo_config = variant_config(config, name)
    run_config = crl.Config(
        out_dir=os.path.join(config.out_dir, name),
        sft_dir=config.sft_dir,
        preset=config.preset,
        seeds=config.seeds,
        task_seed=config.task_seed,
        num_problems=config.num_problems,
        ops=config.ops,
        ordered=config.ordered,
        ppo=ppo_config,
        eval_every=config.eval_every,
        eval_samples=config.eval_samples,
        target_accuracy=config.target_accuracy,
        progress=config.progress,
    )
    runs, timings = crl.run_seeds(run_config, sft, task)
    curves = [run_curve(run["run_dir"], run["before"][METRIC]) for run in runs]
    reached = [first_reaching(curve, config.target_accuracy) for curve in curves]
    final = [run["after"] for run in runs]
    staleness, corrected, bf16 = VARIANTS[name]
    return {
        "variant": name,
        "max_staleness": staleness,
        "correction": config.correction if corrected else None,
        "rollout_dtype": "bfloat16" if bf16 else "float32",
        "final": {
            key: {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": v}
            for key in final[0]
            for v in [[f[key] for f in final]]
        },
        "sft": runs[0]["before"],
        "steps_to_target": [r[0] for r in reached],
        "seconds_to_target": [r[1] for r in reached],
        "curves": curves,
        "sweep_timings": timings,
        "failed": [run["failed"] for run in runs],
    }


def _mean_or_dash(values, fmt: str) -> str:
    present = [v for v in values if v is not None and np.isfinite(v)]
    if not present:
        return f"- (0/{len(values)})"
    return f"{np.mean(present):{fmt}} ({len(present)}/{len(values)})"


def _finite_mean(values) -> float:
    """The mean of the finite values (NaN when there are none: a metric the variant does not log)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def results_table(results: list[dict], target: float) -> str:
    lines = [
        f"| variant | k | correction | rollouts | held-out greedy accuracy | sampled accuracy (T=1) | KL to SFT "
        f"| steps to {target} | step time to {target} (s) | total step time (s) | mismatch k3 | staleness "
        "| truncated by TIS |",
        "|---" * 13 + "|",
    ]
    for r in results:
        f = r["final"]
        total = np.mean([c["seconds"][-1] for c in r["curves"]])
        lines.append(
            f"| {r['variant']} | {r['max_staleness']} | {r['correction'] or '-'} | {r['rollout_dtype']} "
            f"| {f[METRIC]['mean']:.3f} ± {f[METRIC]['std']:.3f} "
            f"| {f['sampled/accuracy']['mean']:.3f} ± {f['sampled/accuracy']['std']:.3f} "
            f"| {f['sampled/kl_to_ref']['mean']:.2f} "
            f"| {_mean_or_dash(r['steps_to_target'], '.0f')} | {_mean_or_dash(r['seconds_to_target'], '.1f')} "
            f"| {total:.1f} | {_finite_mean([c['mismatch_k3'] for c in r['curves']]):.2e} "
            f"| {np.mean([c['staleness'] for c in r['curves']]):.2f} "
            f"| {_finite_mean([c['is_clipfrac'] for c in r['curves']]):.3f} |"
        )
    return "\n".join(lines).replace("| nan |", "| - |").replace("| nan |", "| - |")


def verdicts(results: list[dict]) -> list[str]:
    """Per staleness, the final accuracy of the uncorrected and corrected runs against the
    reference (sync-fp32, else k0), in units of the seeds' spread: what the table says, in words."""
    by_name = {r["variant"]: r for r in results}
    reference = by_name.get("sync-fp32") or by_name.get("k0")
    if reference is None:
        return []
    ref = reference["final"][METRIC]
    lines = []
    for k in (0, 1, 2):
        for name in (f"k{k}", f"k{k}-tis"):
            if name not in by_name or by_name[name] is reference:
                continue
            got = by_name[name]["final"][METRIC]
            delta = got["mean"] - ref["mean"]
            spread = float(np.hypot(got["std"], ref["std"])) or 1e-9
            judged = "within the seeds' spread" if abs(delta) <= spread else ("better" if delta > 0 else "worse")
            lines.append(
                f"- {name}: {got['mean']:.3f} vs {reference['variant']} {ref['mean']:.3f} "
                f"(difference {delta:+.3f}, seeds' spread {spread:.3f}): {judged}"
            )
    return lines


def plot(results: list[dict], out_png: str) -> None:
    panels: dict[str, dict] = {"held-out greedy accuracy vs steps": {}, "held-out greedy accuracy vs step time (s)": {}}
    for r in results:
        steps = np.mean([c["steps"] for c in r["curves"]], axis=0)
        seconds = np.mean([c["seconds"] for c in r["curves"]], axis=0)
        accuracy = np.mean([c["accuracy"] for c in r["curves"]], axis=0)
        panels["held-out greedy accuracy vs steps"][r["variant"]] = (steps.tolist(), accuracy.tolist())
        panels["held-out greedy accuracy vs step time (s)"][r["variant"]] = (seconds.tolist(), accuracy.tolist())
    plot_curves(
        panels,
        out_png,
        title="countdown: stale and bf16 rollouts, with and without correction (mean over seeds)",
        xlabel="steps (left); summed step time, s (right)",
        ncols=2,
    )


def main(config: Config) -> dict:
    config = resolve(config)
    if config.quick:
        ensure_quick_sft(config)
    os.makedirs(config.out_dir, exist_ok=True)
    save_config(config, os.path.join(config.out_dir, "config.json"))
    rl_config = crl.Config(
        sft_dir=config.sft_dir,
        task_seed=config.task_seed,
        num_problems=config.num_problems,
        ops=config.ops,
        ordered=config.ordered,
    )
    sft = crl.load_sft_policy(rl_config)
    task = cd.make_task(config.task_seed, config.num_problems, config.ops, ordered=config.ordered)
    print(f"countdown: {len(task.train)} training problems, {len(task.held_out)} held out", flush=True)
    results = []
    for name in config.variants:
        result = run_variant(config, name, sft, task)
        results.append(result)
        final = result["final"][METRIC]
        print(f"{name}: held-out greedy accuracy {final['mean']:.3f} ± {final['std']:.3f}", flush=True)
        table = results_table(results, config.target_accuracy)  # written after every variant
        text = table + "\n\n" + "\n".join(verdicts(results)) + "\n"
        with open(os.path.join(config.out_dir, "results.md"), "w") as f:
            f.write(text)
        with open(os.path.join(config.out_dir, "summary.json"), "w") as f:
            json.dump({"preset": config.preset, "results": results}, f, indent=2)
        plot(results, os.path.join(config.out_dir, "offpolicy_countdown.png"))
    print(text)
    return {"preset": config.preset, "results": results}


if __name__ == "__main__":
    main(parse_config(Config))
