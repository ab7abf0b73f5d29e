"""Countdown, step 1: a small GPT-2 learns the arithmetic task from demonstrations with a slip.

The task (``experiments/tasks/countdown.py``): three digits and a target, answer an expression that
uses each digit once and evaluates to the target (``865:+019=`` -> ``8+6+5``). The
demonstrations are right only ``correct_fraction`` of the time; otherwise (``noise="slip"``, the
default) they are the correct answer with the last operator slipped to another one (``8+6-5``), a teacher's
systematic mistake, or (``noise="random"``) a random expression of the same digits. With the slip
the SFT policy learns the arithmetic and the mistake together: its held-out accuracy stays low
(0.34 greedy, 0.42 sampled with the defaults), and a verifiable reward (1 if the checker says
correct) lets RL make the correct answers it can already sample its habit
(``experiments/countdown_rl.py``, ``experiments/compare_algorithms.py --task countdown``).

    python experiments/countdown_sft.py
    python experiments/countdown_sft.py --noise random --correct_fraction 0.3 --num_steps 600

Writes to ``out_dir``: ``config.json``, ``metrics.jsonl`` (loss, and ``eval/`` held-out accuracy
greedy and sampled), TensorBoard events, ``model/`` (Hugging Face format with the tokenizer),
``summary.json``.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax

import sft_policy
from jaxrlhf.config import parse_config, refuse_unknown_fields, save_config
from jaxrlhf.models import LanguageModel, gpt2_config
from jaxrlhf.training.sft import SFTConfig
from tasks import countdown as cd


@refuse_unknown_fields
@dataclasses.dataclass(frozen=True)
class Config:
    """Countdown: SFT of the reference policy on noisy demonstrations."""

    out_dir: str = "runs/countdown_sft"
    """Directory for config.json, metrics.jsonl, TensorBoard events, model/, summary.json."""
    seed: int = 0
    """Seed of the model initialisation, data order and evaluation samples."""
    task_seed: int = 0
    """Seed of the problem set (must match the RL run's)."""
    num_problems: int = 20000
    """Problems drawn (duplicates dropped, so about every distinct one; a fifth held out by a fixed hash)."""
    ops: str = "+-"
    """Operators allowed in answers ("+-" or "+-*")."""
    ordered: bool = True
    """Targets made from the digits in the prompt's order (an in-order solution always exists)."""
    correct_fraction: float = 0.4
    """Probability that a demonstration is a correct answer (else a wrong one, see ``noise``)."""
    noise: str = "slip"
    """Wrong demonstrations: "random" (a random expression of the digits) or "slip" (the correct
    answer with its last operator replaced by another one: a systematic mistake)."""
    n_layer: int = 4
    """Transformer blocks."""
    n_embd: int = 128
    """Width."""
    n_head: int = 4
    """Attention heads."""
    num_steps: int = 800
    """AdamW updates."""
    batch_size: int = 128
    """Demonstrations per update."""
    sft: SFTConfig = SFTConfig(learning_rate=1e-3, warmup_steps=50, decay_to=0.1, weight_decay=0.01)
    """Optimiser settings."""
    eval_every: int = 250
    """Evaluate held-out accuracy every this many updates, and at the end."""
    log_every: int = 25
    """Log the training loss every this many updates."""


def make_model(config: Config, tokenizer) -> LanguageModel:
    return LanguageModel(
        gpt2_config(
            len(tokenizer),
            config.n_embd,
            config.n_layer,
            config.n_head,
            cd.PROMPT_LEN + cd.ANSWER_LEN + 4,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def main(config: Config) -> dict:
    os.makedirs(config.out_dir, exist_ok=True)
    save_config(config, os.path.join(config.out_dir, "config.json"))
    start = time.time()
    task = cd.make_task(config.task_seed, config.num_problems, config.ops, ordered=config.ordered)
    tokenizer = cd.tokenizer()
    demos = cd.demonstrations(task, config.correct_fraction, config.seed, config.noise)
    data = cd.encode_demonstrations(demos, tokenizer)
    print(
        f"countdown: {len(task.train)} training problems, {len(task.held_out)} held out; "
        f"{sum(a in cd.solutions(p, task.ops) for p, a in demos) / len(demos):.3f} of demonstrations correct"
    )

    model = make_model(config, tokenizer)
    init_key, data_key, eval_key = jax.random.split(jax.random.key(config.seed), 3)
    params = model.init_params(init_key)
    evaluator = cd.make_evaluator(model, tokenizer, task.held_out)

    def eval_fn(p, step):
        return {k: float(v) for k, v in evaluator(p, jax.random.fold_in(eval_key, step)).items()}

    params, last, model_dir = sft_policy.train_and_save(config, model, tokenizer, params, data, data_key, eval_fn)
    summary = {
        "final_loss": last["loss"],
        **{f"held_out/{k}": v for k, v in eval_fn(params, config.num_steps + 1).items()},
        "num_train_problems": len(task.train),
        "num_held_out_problems": len(task.held_out),
        "wall_clock_s": time.time() - start,
        "model_dir": model_dir,
    }
    return sft_policy.write_summary(config.out_dir, summary)


if __name__ == "__main__":
    main(parse_config(Config))
