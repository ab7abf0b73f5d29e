"""Guess the number: multi-turn RL beats the best single-turn policy (which cannot read a reply).

The game (``experiments/tasks/guess_number.py``): a secret in 1..M, drawn by the JAX-native
environment; each turn the policy guesses (two digits) and the environment replies ``<`` or
``>``; a right guess ends the episode with reward 1, and ``max_turns`` guesses end it with 0.
With M = 31 and 5 turns, binary search finds every secret (return 1); a policy that cannot see
the replies (one turn holding all its guesses) finds at most 5 / 31 of them (return 0.161).

1. SFT on games of a sloppy player, who reads the replies only half of the time (a random
   number inside the interval they leave open; otherwise a random number not guessed yet) and
   never bisects on purpose: the policy learns the format and some use of the replies.
2. RL (GRPO without its KL term: the reference is a random guesser, nothing to stay close to),
   ``seeds`` as one sweep, the environment inside the jitted step; the reward is the game's.

The evaluation is exact for the greedy policy: one episode per secret 1..M (``greedy/return`` is
its expected return for a uniform secret); ``sampled/`` plays ``eval_samples`` episodes per secret
at T = 1. ``consistent`` is the fraction of guesses inside the interval the replies so far left
open: 1 for a policy that reads every reply.

    python experiments/guess_number.py
    python experiments/guess_number.py --max_number 15 --max_turns 4
    python experiments/guess_number.py --quick          # a smoke run (a tiny model, 2 steps)

Writes to ``out_dir``: ``config.json``; ``sft/`` (``metrics.jsonl``, ``model/``); ``rl/`` (the
sweep: checkpoint, ``run_<i>/metrics.jsonl``, TensorBoard events, ``policy/``); ``summary.json``;
``results.md`` (the table below); ``guess_number.png`` (return, guesses and consistency against RL
steps).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from jaxrlhf.config import parse_config, refuse_unknown_fields, save_config
from jaxrlhf.metrics_log import MetricsLogger, read_metrics
from jaxrlhf.models import LanguageModel, gpt2_config, save_pretrained
from jaxrlhf.plotting import plot_curves
from jaxrlhf.training import PPOConfig
from jaxrlhf.training.evaluation import train_seeds
from jaxrlhf.training.presets import preset
from jaxrlhf.training.sft import SFTConfig, train_sft
from tasks import guess_number as gn

REPORTED = ("greedy/return", "sampled/return", "sampled/guesses", "sampled/consistent")


@refuse_unknown_fields
@dataclasses.dataclass(frozen=True)
class Config:
    """Guess the number: SFT on a sloppy player, then multi-turn RL, against the best single-turn return."""

    out_dir: str = "runs/guess_number"
    """Directory for config.json, sft/, rl/, summary.json, results.md and the plot."""
    max_number: int = 31
    """Secrets are 1..max_number (at most 99: two-digit guesses)."""
    max_turns: int = 5
    """Guesses per episode."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """RL runs, trained together as one sweep."""
    n_layer: int = 3
    """Transformer blocks."""
    n_embd: int = 96
    """Width."""
    n_head: int = 4
    """Attention heads."""
    sft_games: int = 8192
    """Demonstration games of the sloppy player."""
    sft_consistent: float = 0.5
    """Probability that the sloppy player's guess reads the replies (`guess_number.demonstrations`)."""
    sft_steps: int = 600
    """SFT updates."""
    sft: SFTConfig = SFTConfig(learning_rate=1e-3, warmup_steps=30, decay_to=0.1, weight_decay=0.01)
    """SFT optimiser settings (128 games per update)."""
    preset: str = "grpo"
    """The RL algorithm (`jaxrlhf.training.presets`); its KL coefficient is set to 0 here."""
    ppo: PPOConfig = PPOConfig(
        total_steps=150,
        batch_size=256,
        minibatch_size=256,
        num_generations=8,
        temperature=1.0,
        top_k=None,
        top_p=1.0,
        learning_rate=3e-4,
        critic_learning_rate=3e-4,
        adam_b1=0.9,
        adam_b2=0.99,
        weight_decay=0.0,
        shared_trunk=True,
        save_every=50,
    )
    """RL trainer settings; the preset's algorithm fields go on top, then ``kl_coef=0``."""
    eval_every: int = 10
    """Evaluate every this many RL steps."""
    eval_samples: int = 8
    """Sampled episodes per secret in each evaluation (T = 1)."""
    quick: bool = False
    """A smoke run: a tiny model, 3 SFT steps and 2 RL steps, 2 seeds."""
    progress: bool = True
    """Show the trainer's progress bar."""


def quick_config(config: Config) -> Config:
    return dataclasses.replace(
        config,
        seeds=config.seeds[:2],
        n_layer=1,
        n_embd=16,
        n_head=2,
        sft_games=64,
        sft_steps=3,
        eval_every=1,
        eval_samples=1,
        ppo=config.ppo.replace(total_steps=2, batch_size=16, minibatch_size=16, save_every=2),
    )


def make_model(config: Config, tok) -> LanguageModel:
    return LanguageModel(
        gpt2_config(
            len(tok),
            config.n_embd,
            config.n_layer,
            config.n_head,
            2 + gn.episode_tokens(config.max_turns),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )


def run_sft(config: Config, model, tok, evaluate) -> tuple[object, dict]:
    """SFT on the sloppy player's games; returns the parameters and the final evaluation."""
    out_dir = os.path.join(config.out_dir, "sft")
    games = gn.demonstrations(
        config.max_number, config.max_turns, config.sft_games, config.sft_consistent, seed=config.seeds[0]
    )
    data = gn.encode_demonstrations(games, tok, config.max_turns)
    init_key, data_key, eval_key = jax.random.split(jax.random.key(config.seeds[0]), 3)
    params = model.init_params(init_key)

    def eval_fn(p, step):
        return {k: float(v) for k, v in evaluate(p, jax.random.fold_in(eval_key, step)).items()}

    with MetricsLogger(out_dir, total_steps=config.sft_steps, progress_keys=("loss",)) as logger:
        params, _ = train_sft(
            model.apply, params, data, data_key, config=config.sft, num_steps=config.sft_steps,
            batch_size=min(128, len(games)), logger=logger, log_every=25, eval_fn=eval_fn,
            eval_every=config.sft_steps,
        )  # fmt: skip
    save_pretrained(os.path.join(out_dir, "model"), model, params, tok)
    return params, eval_fn(params, config.sft_steps + 1)


def results_table(config: Config, sft: dict, runs: list[dict]) -> str:
    mean = lambda key: float(np.mean([r["after"][key] for r in runs]))  # noqa: E731
    std = lambda key: float(np.std([r["after"][key] for r in runs]))  # noqa: E731
    blind = gn.best_single_turn_return(config.max_number, config.max_turns)
    search = gn.binary_search_guesses(config.max_number)
    optimum = gn.optimal_return(config.max_number, config.max_turns)
    cell = lambda x: f"{x:.3f}"  # noqa: E731
    rows = [
        f"| best single-turn policy (computed: {min(config.max_turns, config.max_number)} / {config.max_number}) "
        f"| {cell(blind)} | {cell(blind)} | | |",
        f"| binary search (computed) | {cell(optimum)} | {cell(optimum)} | {np.mean(search):.2f} | 1.000 |",
        f"| SFT (a player reading {config.sft_consistent:.0%} of the replies) | "
        + " | ".join(cell(sft[k]) for k in REPORTED)
        + " |",
        f"| multi-turn RL ({len(runs)} seeds) | "
        + " | ".join(f"{mean(k):.3f} ± {std(k):.3f}" for k in REPORTED)
        + " |",
    ]
    return (
        "| policy | return, greedy (every secret once) | return, sampled (T=1) | guesses per episode (sampled) "
        "| consistent guesses (sampled) |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def main(config: Config) -> dict:
    if config.quick:
        config = quick_config(config)
    ppo = preset(config.preset, config.ppo).replace(kl_coef=0.0)
    os.makedirs(config.out_dir, exist_ok=True)
    save_config(config, os.path.join(config.out_dir, "config.json"))
    tok = gn.tokenizer()
    env = gn.GuessNumber(gn.token_ids(tok), config.max_number)
    model = make_model(config, tok)
    evaluate = gn.make_evaluator(model, tok, config.max_number, config.max_turns, config.eval_samples)
    sft_params, sft_eval = run_sft(config, model, tok, evaluate)
    print("SFT:", json.dumps(sft_eval))

    ppo = ppo.replace(
        max_prompt_len=2,
        max_new_tokens=gn.episode_tokens(config.max_turns),
        max_turns=config.max_turns,
        max_turn_tokens=gn.GUESS_LEN,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    runs, timings, _ = train_seeds(
        (model, sft_params),
        None,
        gn.encode_prompts(tok, 64),
        ppo,
        os.path.join(config.out_dir, "rl"),
        config.seeds,
        evaluate,
        eval_every=config.eval_every,
        progress=config.progress,
        environment=env,
    )
    table = results_table(config, sft_eval, runs)
    summary = {
        "best_single_turn_return": gn.best_single_turn_return(config.max_number, config.max_turns),
        "optimal_return": gn.optimal_return(config.max_number, config.max_turns),
        "sft": sft_eval,
        "runs": runs,
        "timings": timings,
    }
    with open(os.path.join(config.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(config.out_dir, "results.md"), "w") as f:
        f.write(f"# guess the number: 1..{config.max_number}, {config.max_turns} guesses\n\n{table}")
    panels: dict[str, dict] = {"return (greedy, every secret)": {}, "guesses per episode": {}, "consistent guesses": {}}
    for run in runs:
        evals = [r for r in read_metrics(run["run_dir"]) if "eval/greedy/return" in r]
        steps = [0] + [r["step"] for r in evals]
        for panel, metric in zip(panels, ("greedy/return", "sampled/guesses", "sampled/consistent")):
            panels[panel][f"seed {run['seed']}"] = (
                steps,
                [run["before"][metric]] + [r[f"eval/{metric}"] for r in evals],
            )
    blind = summary["best_single_turn_return"]
    panels["return (greedy, every secret)"]["best single-turn"] = ([0, ppo.total_steps], [blind, blind])
    title = f"guess the number (1..{config.max_number}, {config.max_turns} guesses): multi-turn {config.preset}"
    plot_curves(panels, os.path.join(config.out_dir, "guess_number.png"), title=title, xlabel="RL step", ncols=3)
    print(table)
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
