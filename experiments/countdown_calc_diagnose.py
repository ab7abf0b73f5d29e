"""Countdown with a calculator: what a tool policy does after its last check (a diagnosis).

Runs a policy's greedy episodes on held-out problems (the `Calculator` inside the jitted rollout,
the RL run's turn settings) and counts them by what happened before the answer: did the last
call's reply match the target, and did the policy answer that call's expression? A policy that
compares replies with the target answers the matching call and keeps searching after a miss; the
table shows where it does not (`countdown_calc.episode_outcome`).

    python experiments/countdown_calc_diagnose.py --model_dir runs/countdown_calc_sft/tool/model
    python experiments/countdown_calc_diagnose.py --model_dir runs/countdown_calc_rl/tool/policy --problems 256

Prints the table and writes it, with the call statistics, to ``<model_dir>/../diagnosis.json``
unless ``--out`` names another file.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import jax
import numpy as np

from jaxrlhf.config import parse_config, refuse_unknown_fields
from tasks import countdown_calc as cc


@refuse_unknown_fields
@dataclasses.dataclass(frozen=True)
class Config:
    """Greedy episodes of a calculator policy, counted by its last check and its answer."""

    model_dir: str = "runs/countdown_calc_sft/tool/model"
    """The policy: a saved model directory (the SFT run's model/, or an RL run's policy/)."""
    task_seed: int = 0
    """The problem set's seed (as in countdown_calc_sft.py / countdown_calc_rl.py)."""
    num_problems: int = 20000
    """Problems in the task (as in countdown_calc_sft.py)."""
    problems: int = 512
    """Problems to run (the first of the split)."""
    split: str = "held_out"
    """Which problems: "held_out" (neither SFT nor RL trains on them) or "train" (a policy that
    follows its training episodes there but not held out has memorised them)."""
    demos: cc.DemoSettings = cc.DemoSettings()
    """The demonstration settings the policy was trained with (its turn limit: max_calls + 1)."""
    out: str = ""
    """Where to write the JSON (default: diagnosis.json beside model_dir)."""


def diagnose(config: Config) -> dict:
    import jaxrlhf

    pre = jaxrlhf.load_pretrained(config.model_dir)
    tok = pre.tokenizer
    task = cc.make_task(config.task_seed, config.num_problems)
    if config.split not in ("held_out", "train"):
        raise SystemExit(f"split must be 'held_out' or 'train', got {config.split!r}")
    problems = getattr(task, config.split)[: config.problems]
    episodes = cc.make_episodes(
        pre.model, tok, problems, max_turns=config.demos.max_calls + 1, max_new_tokens=cc.max_demo_tokens(config.demos)
    )
    greedy_episodes = jax.jit(lambda params: episodes(params, jax.random.key(0), 0.0))

    out = greedy_episodes(pre.params)
    texts = tok.batch_decode(np.asarray(out.tokens) * np.asarray(out.mask), skip_special_tokens=True)
    outcomes = [cc.episode_outcome(p, t, task.ops) for p, t in zip(problems, texts)]

    groups = collections.defaultdict(list)
    for o in outcomes:
        groups[(o.last_check, o.answer_is_last_call)].append(o.correct)
    table = [
        {"last_check": check, "answers_last_call": same, "episodes": len(v), "accuracy": float(np.mean(v))}
        for (check, same), v in sorted(groups.items())
    ]
    missed = [o for o in outcomes if o.last_check == "missed"]
    # Per reply: does the policy answer next, or call again? (Only replies after which another call
    # was allowed: the turn limit forces an answer after the last one.)
    after = {"matched": [0, 0], "missed": [0, 0]}  # [answered next, called again]
    for o in outcomes:
        for i, match in enumerate(o.matches[: config.demos.max_calls - 1]):
            after["matched" if match else "missed"][0 if i == len(o.calls) - 1 else 1] += 1
    calls = sum(len(o.calls) for o in outcomes)
    return {
        "model_dir": config.model_dir,
        "split": config.split,
        "episodes": len(outcomes),
        "accuracy": float(np.mean([o.correct for o in outcomes])),
        "table": table,
        "calls_per_episode_after_a_miss": dict(sorted(collections.Counter(len(o.calls) for o in missed).items())),
        "answers_next_after_reply": {k: a / max(a + c, 1) for k, (a, c) in after.items()},
        "replies_with_a_call_allowed": {k: a + c for k, (a, c) in after.items()},
        "repeated_call_fraction": 1 - sum(len(set(o.calls)) for o in outcomes) / max(calls, 1),
    }


def main(config: Config) -> dict:
    result = diagnose(config)
    print(f"{config.model_dir}: {result['episodes']} greedy {config.split} episodes, accuracy {result['accuracy']:.3f}")
    print("| last check | answers the last call | episodes | accuracy |\n|---|---|---:|---:|")
    for row in result["table"]:
        print(f"| {row['last_check']} | {row['answers_last_call']} | {row['episodes']} | {row['accuracy']:.3f} |")
    print(f"calls per episode whose last check missed: {result['calls_per_episode_after_a_miss']}")
    for kind in ("matched", "missed"):
        print(
            f"after a reply that {kind} the target (another call allowed): answers next "
            f"{result['answers_next_after_reply'][kind]:.2f} of {result['replies_with_a_call_allowed'][kind]}"
        )
    print(f"repeated calls (an expression called again in its episode): {result['repeated_call_fraction']:.2f}")
    out = config.out or os.path.join(os.path.dirname(os.path.abspath(config.model_dir)), "diagnosis.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(parse_config(Config))
