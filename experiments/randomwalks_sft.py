"""Random walks, step 1: supervised training of the reference policy (trlx's ``randomwalks``).

A small GPT-2 with a character-level vocabulary learns, from scratch, to continue 1000 random walks
on a 21-node graph (see ``experiments/tasks/randomwalks.py`` for how the graph and walks are drawn).
The walks wander: the model learns to walk the graph, not to walk it well. It becomes the starting
point and the KL reference of PPO (``experiments/randomwalks_ppo.py``), which then teaches it to
reach the goal ``a`` by the shortest path.

Each row is ``<bos> s w_2 ... w_L <eos>``; the loss is the cross-entropy of the tokens after the
start letter ``s`` (what the policy will generate from a prompt ``<bos> s``).

    python experiments/randomwalks_sft.py                    # about 5 CPU-minutes
    python experiments/randomwalks_sft.py --help
    python experiments/randomwalks_sft.py --num_steps 2000 --out_dir runs/rw_sft_long

Writes to ``out_dir``: ``config.json`` (this run's settings), ``metrics.jsonl``, TensorBoard events,
``model/`` (the policy in Hugging Face format, with its tokenizer), ``sft.png`` and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time

import jax
import numpy as np

import sft_policy
from jaxrlhf.config import parse_config, refuse_unknown_fields, save_config
from jaxrlhf.metrics_log import read_metrics
from jaxrlhf.models import LanguageModel, gpt2_config, load_pretrained
from jaxrlhf.plotting import plot_curves
from jaxrlhf.tokenizers import char_tokenizer
from jaxrlhf.training.sft import SFTConfig
from tasks import randomwalks as rw


@refuse_unknown_fields
@dataclasses.dataclass(frozen=True)
class Config:
    """Random walks: train the SFT / reference policy on random walks."""

    out_dir: str = "runs/randomwalks_sft"
    """Directory for config.json, metrics.jsonl, TensorBoard events, model/, sft.png, summary.json."""
    seed: int = 0
    """Seed of the model initialisation, data order and evaluation samples."""
    # --- task (trlx's defaults) ---
    task_seed: int = 1002
    """Seed of np.random.RandomState that draws the graph, then the walks."""
    n_nodes: int = 21
    """Nodes of the graph (letters a, b, ...; a is the goal)."""
    p_edge: float = 0.1
    """Probability of each directed edge."""
    max_length: int = 10
    """Most nodes in a walk (start and goal included)."""
    n_walks: int = 1000
    """Random walks in the training set."""
    # --- model: a small GPT-2 ---
    n_layer: int = 6
    """Transformer blocks."""
    n_embd: int = 144
    """Width."""
    n_head: int = 6
    """Attention heads (n_embd must be a multiple)."""
    # --- training ---
    num_steps: int = 1000
    """AdamW updates."""
    batch_size: int = 100
    """Walks per update."""
    sft: SFTConfig = SFTConfig(learning_rate=1e-3, warmup_steps=50, decay_to=0.1, weight_decay=0.01)
    """Optimiser settings (``--sft.learning_rate 3e-4`` etc.)."""
    eval_every: int = 100
    """Evaluate (greedy and sampled optimality) every this many updates, and at the end."""
    eval_samples: int = 8
    """Sampled walks per start node in each evaluation."""
    log_every: int = 10
    """Log the training loss every this many updates."""
    verify_hf_load: bool = True
    """At the end, load model/ with transformers.AutoModelForCausalLM (PyTorch) and check that its
    logits match ours; without torch installed, read model/'s files back without it (transformers
    reads config.json and the tokenizer, jaxrlhf the safetensors weights) and say so."""


def make_model(config: Config, tokenizer) -> LanguageModel:
    return LanguageModel(
        gpt2_config(
            len(tokenizer),
            config.n_embd,
            config.n_layer,
            config.n_head,
            config.max_length + 6,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def check_hf_load(model_dir: str, model: LanguageModel, params, data) -> dict:
    """Reads ``model_dir`` back and compares its logits with ours on a few walks.

    With PyTorch installed: ``transformers.AutoModelForCausalLM`` loads it (the reference
    implementation). Without (``pip install -e .`` brings no torch): ``transformers`` reads its
    ``config.json`` and tokenizer, and `jaxrlhf.models.load_pretrained` its safetensors weights.
    Returns ``hf_load_check`` (what was checked) and ``hf_max_abs_logit_diff``."""
    ids, mask = data["input_ids"][:8], data["attention_mask"][:8]
    ours = np.asarray(model.apply(params, ids, mask))
    valid = mask.astype(bool)
    if importlib.util.find_spec("torch") is not None:
        import torch
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
        with torch.no_grad():
            theirs = hf_model(
                input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long)
            ).logits.numpy()
        checked = "transformers.AutoModelForCausalLM (PyTorch) loads model/"
    else:
        from transformers import AutoConfig, AutoTokenizer

        AutoConfig.from_pretrained(model_dir, local_files_only=True)
        AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        reloaded = load_pretrained(model_dir)
        theirs = np.asarray(reloaded.apply(reloaded.params, ids, mask))
        checked = (
            "torch not installed: the transformers (PyTorch) load was skipped; transformers reads "
            "model/'s config.json and tokenizer, jaxrlhf.load_pretrained its safetensors"
        )
        print(f"HF load check: {checked}")
    return {"hf_load_check": checked, "hf_max_abs_logit_diff": float(np.abs(theirs - ours)[valid].max())}


def main(config: Config) -> dict:
    os.makedirs(config.out_dir, exist_ok=True)
    save_config(config, os.path.join(config.out_dir, "config.json"))
    start_time = time.time()

    task = rw.make_task(config.task_seed, config.n_nodes, config.p_edge, config.max_length, config.n_walks)
    tokenizer = char_tokenizer(task.letters, model_max_length=config.max_length + 6)
    data = rw.encode_walks(task, tokenizer)
    data_score = rw.optimality_reference(task, task.walks)
    print(
        f"graph: {config.n_nodes} nodes, {int(task.adjacency.sum()) - 1} edges; "
        f"{len(task.prompts)} start nodes; data optimality {data_score['optimality'].mean():.3f}, "
        f"data walks not reaching the goal {data_score['invalid'].mean():.3f}"
    )

    model = make_model(config, tokenizer)
    key = jax.random.key(config.seed)
    init_key, data_key, eval_key = jax.random.split(key, 3)
    params = model.init_params(init_key)
    initial_params = params
    evaluator = rw.make_evaluator(model, task, tokenizer, samples_per_prompt=config.eval_samples)

    def eval_fn(p, step):
        # KL is measured against the initial (random) model here: only a sanity number.
        metrics = evaluator(p, initial_params, jax.random.fold_in(eval_key, step))
        return {k: float(v) for k, v in metrics.items() if k != "sampled/kl_to_ref"}

    params, last, model_dir = sft_policy.train_and_save(config, model, tokenizer, params, data, data_key, eval_fn)
    train_seconds = time.time() - start_time
    final = eval_fn(params, config.num_steps)
    summary = {
        "final_loss": last["loss"],
        "final_accuracy": last["accuracy"],
        **final,
        "data_optimality": float(data_score["optimality"].mean()),
        "wall_clock_s": train_seconds,
        "model_dir": model_dir,
    }
    if config.verify_hf_load:
        summary.update(check_hf_load(model_dir, model, params, data))
        if summary["hf_max_abs_logit_diff"] > 1e-3:
            raise RuntimeError(f"transformers logits differ from ours by {summary['hf_max_abs_logit_diff']}")

    records = read_metrics(config.out_dir)
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [r for r in records if "eval/sampled/optimality" in r]
    panels = {
        "training loss (response tokens)": {"cross-entropy": tuple(zip(*loss))},
        "optimality": {
            "greedy": ([r["step"] for r in evals], [r["eval/greedy/optimality"] for r in evals]),
            "sampled (T=1)": ([r["step"] for r in evals], [r["eval/sampled/optimality"] for r in evals]),
        },
        "invalid walks": {
            "greedy": ([r["step"] for r in evals], [r["eval/greedy/invalid"] for r in evals]),
            "sampled (T=1)": ([r["step"] for r in evals], [r["eval/sampled/invalid"] for r in evals]),
        },
    }
    plot_curves(panels, os.path.join(config.out_dir, "sft.png"), title="randomwalks SFT")
    with open(os.path.join(config.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
