"""Countdown with a calculator, step 1: SFT on demonstrations that use the tool imperfectly.

The task (``experiments/tasks/countdown_calc.py``): countdown's problems with ``*`` (three digits
in order, a target, answer ``d op d op d``), and a calculator the policy may call before it
answers (``[7*5-3]`` -> ``=+032;``). One demonstration per training problem: some answer without
checking (half of them wrong), the others call the calculator on wrong candidates first (now and
then on a mistyped one), then on the matching one, and answer it (a tenth of them with a slipped
operator anyway). The loss is on what the policy writes (calls, answer, EOS), not on the
calculator's replies.

``--no_tool`` trains the same model on the same problems with each demonstration's final
answer alone: countdown as today, without the tool (the baseline of
``experiments/countdown_calc_rl.py``).

    python experiments/countdown_calc_sft.py --out_dir runs/countdown_calc_sft/tool
    python experiments/countdown_calc_sft.py --no_tool --out_dir runs/countdown_calc_sft/no_tool

Writes to ``out_dir``: ``config.json``, ``metrics.jsonl`` (loss, ``eval/`` held-out accuracy and
tool use, greedy and sampled), TensorBoard events, ``model/`` (Hugging Face format with the
tokenizer), ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import sft_policy
from jaxrlhf.config import parse_config, refuse_unknown_fields, save_config
from jaxrlhf.models import LanguageModel, gpt2_config
from jaxrlhf.training.sft import SFTConfig
from tasks import countdown as cd
from tasks import countdown_calc as cc


@refuse_unknown_fields
@dataclasses.dataclass(frozen=True)
class Config:
    """Countdown with a calculator: SFT of the reference policy on imperfect tool-use demonstrations."""

    out_dir: str = "runs/countdown_calc_sft/tool"
    """Directory for config.json, metrics.jsonl, TensorBoard events, model/, summary.json."""
    tool: bool = True
    """Demonstrations with their calls (else each one's final answer alone: no tool)."""
    seed: int = 0
    """Seed of the model initialisation, data order and evaluation samples."""
    task_seed: int = 0
    """Seed of the problem set and of the demonstrations (must match the RL run's)."""
    num_problems: int = 20000
    """Problems drawn (duplicates dropped; a fifth held out by a fixed hash)."""
    demos: cc.DemoSettings = cc.DemoSettings()
    """How the teacher uses the calculator (`countdown_calc.DemoSettings`)."""
    n_layer: int = 4
    """Transformer blocks."""
    n_embd: int = 128
    """Width."""
    n_head: int = 4
    """Attention heads."""
    num_steps: int = 1500
    """AdamW updates."""
    batch_size: int = 64
    """Demonstrations per update."""
    sft: SFTConfig = SFTConfig(learning_rate=1e-3, warmup_steps=50, decay_to=0.1, weight_decay=0.01)
    """Optimiser settings."""
    eval_every: int = 300
    """Evaluate on the held-out problems every this many updates, and at the end."""
    eval_problems: int = 512
    """Held-out problems evaluated (the first of the fixed held-out split)."""
    log_every: int = 25
    """Log the training loss every this many updates."""
    init_model_dir: str = ""
    """Continue from this saved policy (a model/ directory of an earlier run of this script, same
    task and shape) instead of a fresh initialisation; the optimiser and its schedule start anew."""


def episode_tokens(config: Config) -> int:
    """The episode budget N after the prompt: the longest demonstration (calls, replies, answer)."""
    return cc.max_demo_tokens(config.demos)


def make_model(config: Config, tok) -> LanguageModel:
    return LanguageModel(
        gpt2_config(
            len(tok),
            config.n_embd,
            config.n_layer,
            config.n_head,
            cd.PROMPT_LEN + episode_tokens(config),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )


def make_evaluator(model, tok, problems, config: Config, tool: bool, samples_per_problem: int):
    """Held-out episodes with the calculator (``tool``: up to ``max_calls`` calls, then the
    answer; else one turn: the answer)."""
    return cc.make_evaluator(
        model,
        tok,
        problems,
        max_turns=config.demos.max_calls + 1 if tool else 1,
        max_new_tokens=episode_tokens(config),
        samples_per_problem=samples_per_problem,
    )


def main(config: Config) -> dict:
    os.makedirs(config.out_dir, exist_ok=True)
    save_config(config, os.path.join(config.out_dir, "config.json"))
    start = time.time()
    task = cc.make_task(config.task_seed, config.num_problems)
    tok = cc.tokenizer(episode_tokens(config))
    demos = cc.demonstrations(task, config.demos, config.task_seed)
    correct = np.mean([cc.calculate(demo[-1]) == problem.target for problem, demo in demos])
    calls = np.mean([len(demo) // 2 for _, demo in demos])
    if not config.tool:
        demos = cc.final_answers(demos)
    # Without the tool every row is an answer: rows as wide as one (right padding changes no
    # loss or gradient under causal attention, and costs a quarter of the compute).
    data = cc.encode_demonstrations(demos, tok, episode_tokens(config) if config.tool else cd.ANSWER_LEN)
    print(
        f"countdown_calc: {len(task.train)} training problems, {len(task.held_out)} held out; demonstrations "
        f"{'with' if config.tool else 'without'} the tool: {correct:.3f} of answers correct, "
        f"{calls if config.tool else 0.0:.2f} calls each"
    )

    model = make_model(config, tok)
    init_key, data_key, eval_key = jax.random.split(jax.random.key(config.seed), 3)
    params = model.init_params(init_key)
    if config.init_model_dir:
        from jaxrlhf.models import load_pretrained

        start_from = load_pretrained(config.init_model_dir)
        if jax.tree.map(jnp.shape, start_from.params) != jax.tree.map(jnp.shape, params):
            raise SystemExit(f"{config.init_model_dir} holds another model shape than this run's {model.config}")
        params = start_from.params
    evaluator = make_evaluator(model, tok, task.held_out[: config.eval_problems], config, config.tool, 2)

    def eval_fn(p, step):
        return {k: float(v) for k, v in evaluator(p, jax.random.fold_in(eval_key, step)).items()}

    params, last, model_dir = sft_policy.train_and_save(config, model, tok, params, data, data_key, eval_fn)
    summary = {
        "final_loss": last["loss"],
        **{f"held_out/{k}": v for k, v in eval_fn(params, config.num_steps + 1).items()},
        "demonstrations_correct": float(correct),
        "demonstration_calls": float(calls) if config.tool else 0.0,
        "num_train_problems": len(task.train),
        "num_held_out_problems": len(task.held_out),
        "wall_clock_s": time.time() - start,
        "model_dir": model_dir,
    }
    return sft_policy.write_summary(config.out_dir, summary)


if __name__ == "__main__":
    main(parse_config(Config))
