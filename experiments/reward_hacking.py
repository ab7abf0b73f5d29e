"""Reward hacking in miniature: SFT -> reward model -> PPO at several KL coefficients.

The whole RLHF pipeline on a synthetic language whose "true" reward we know
(``tasks.synthetic_language``: sentences ``the [ADJ [ADJ]] NOUN VERB a [ADJ [ADJ]] NOUN .``,
true score = #positive - #negative adjectives if the sentence is well formed, else -4):

1. **SFT.** A tiny GPT-2 learns the reference distribution from scratch (word-level vocabulary).
2. **Reward model.** A smaller transformer with a scalar head is trained with the Bradley-Terry loss
   (``jaxrlhf.core.reward_model_loss``) on a few pairs of reference sentences labelled by the true
   score. Every sentence it sees is well formed, so it learns "more positive adjectives is better"
   and nothing about the grammar; its pairwise accuracy on held-out pairs is reported.
3. **PPO** against that reward model (the proxy), one run per ``kl_coef``, all trained together as
   one sweep (`jaxrlhf.training.train_sweep`: one compiled step). Every ``eval_every`` steps
   a fixed batch of prompts is sampled and scored by the proxy and by the true rule, and the
   KL(policy || SFT) of the samples is measured (sum over response tokens, in nats).

The picture to expect (Gao et al., 2022, "Scaling laws for reward model overoptimization"):
without a KL penalty the proxy score climbs while the true score falls, as the policy leaves the
grammar (often repeating one adjective); with a suitable KL penalty the policy stays near the SFT
model and the true score rises with the proxy.

    python experiments/reward_hacking.py                    # defaults: a few minutes on 2 CPU cores
    python experiments/reward_hacking.py --help             # every knob
    python experiments/reward_hacking.py --kl_coefs 0 0.1 --ppo_steps 100 --out_dir runs/rh_small

Outputs in ``out_dir``: config.json, metrics.jsonl + TensorBoard events (SFT, reward model and the
evaluations), ``ppo/`` (the sweep: checkpoints, ``run_<i>/metrics.jsonl`` per kl_coef,
sweep_summary.json), reward_hacking.png
(proxy and true score against KL, per kl_coef), reward_hacking_steps.png (against PPO step),
summary.json (per kl_coef: final proxy/true score, KL, samples; the RM's held-out accuracy).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrlhf.config import parse_config, refuse_unknown_fields, save_config
from jaxrlhf.core import concat_prompt_response, last_valid_index, reward_model_loss, token_logprobs
from jaxrlhf.metrics_log import MetricsLogger
from jaxrlhf.models import LanguageModel, ValueModel, check_positions, gpt2_config
from jaxrlhf.plotting import plot_curves
from jaxrlhf.sampling import generate
from jaxrlhf.training import PPOConfig, RewardModel, sft, train_sweep
from tasks import synthetic_language as lang


@refuse_unknown_fields
@dataclasses.dataclass(frozen=True)
class Config:
    """Reward hacking: PPO against an imperfect learned reward model, with and without a KL penalty."""

    out_dir: str = "runs/reward_hacking"
    """Directory for config.json, metrics.jsonl, TensorBoard events, PNG plots and summary.json."""
    seed: int = 0
    """Seed of every random key in the run."""

    # --- policy / SFT ---
    policy_width: int = 64
    """Hidden size of the policy GPT-2."""
    policy_layers: int = 2
    """Transformer blocks of the policy."""
    sft_examples: int = 4096
    """Reference sentences in the SFT data set."""
    sft_steps: int = 600
    """SFT updates."""
    sft_batch_size: int = 64
    """Sentences per SFT update."""
    sft_lr: float = 3e-3
    """Peak AdamW learning rate of SFT."""

    # --- reward model ---
    rm_width: int = 32
    """Hidden size of the reward model (a small transformer + scalar head on the last token)."""
    rm_layers: int = 1
    """Transformer blocks of the reward model."""
    rm_pairs: int = 512
    """Preference pairs the reward model is trained on (few: it should be imperfect)."""
    rm_eval_pairs: int = 1024
    """Held-out pairs for the reward model's pairwise accuracy."""
    rm_steps: int = 200
    """Reward-model updates."""
    rm_batch_size: int = 64
    """Pairs per reward-model update."""
    rm_lr: float = 1e-3
    """AdamW learning rate of the reward model."""

    # --- PPO ---
    kl_coefs: tuple[float, ...] = (0.0, 0.02, 0.1, 0.5)
    """KL coefficients beta of the per-token penalty, one PPO run each (0 = no penalty)."""
    ppo_steps: int = 120
    """PPO iterations per kl_coef."""
    ppo_batch_size: int = 64
    """Prompts (rollouts) per PPO iteration."""
    ppo_minibatch_size: int = 32
    """Rollouts per PPO update."""
    ppo_epochs: int = 2
    """Passes over each batch of rollouts."""
    ppo_lr: float = 2e-4
    """Policy learning rate."""
    critic_lr: float = 1e-3
    """Value-model learning rate."""
    max_new_tokens: int = 12
    """Response budget (a well-formed sentence needs at most 9 after its prompt '<bos> DET')."""

    # --- evaluation ---
    eval_every: int = 5
    """Evaluate the policy (proxy score, true score, KL from SFT) every this many PPO steps."""
    eval_batch_size: int = 256
    """Samples per evaluation."""
    num_samples_shown: int = 6
    """Decoded samples per kl_coef kept in summary.json and printed."""


# ------------------------------------------------------------------------------------------------
# Reward model: a transformer trunk + scalar head, score read at the last valid token.
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def rm_score(rm: ValueModel, rm_params, ids, mask) -> jax.Array:
    """``[B]`` reward-model scores of whole sequences (any padding layout)."""
    return RewardModel(rm)(rm_params, ids, mask, jnp.maximum(last_valid_index(mask), 0))


def normalize_reward_model(rm: ValueModel, rm_params, ids, mask):
    """Rescales the head so reference sentences score mean 0, std 1 (as InstructGPT centres its RM).

    Bradley-Terry fixes only score differences, and their scale is whatever training reached; this
    makes kl_coef values comparable across reward models. Returns ``(params, (mean, std))``.
    """
    scores = rm_score(rm, rm_params, ids, mask)
    mean, std = jnp.mean(scores), jnp.std(scores) + 1e-6
    head = rm_params["head"]
    head = {"kernel": head["kernel"] / std, "bias": (head["bias"] - mean) / std}
    return {**rm_params, "head": head}, (float(mean), float(std))


def train_reward_model(rm: ValueModel, rm_params, pairs: lang.PreferencePairs, key, config: Config, logger):
    """Bradley-Terry training on ``pairs``; returns the trained parameters."""
    for mask in (pairs.chosen_mask, pairs.rejected_mask):  # within the reward model's position table
        check_positions(rm, mask, where="train_reward_model")
    optimizer = optax.adamw(config.rm_lr, weight_decay=0.01)
    opt_state = optimizer.init(rm_params)

    def loss_fn(params, batch):
        chosen = rm_score(rm, params, batch["chosen_ids"], batch["chosen_mask"])
        rejected = rm_score(rm, params, batch["rejected_ids"], batch["rejected_mask"])
        return reward_model_loss(chosen, rejected)

    @jax.jit
    def update(params, opt_state, batch):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, **stats}

    data = pairs._asdict()
    for step, batch in enumerate(sft.iterate_minibatches(key, data, config.rm_batch_size, config.rm_steps)):
        rm_params, opt_state, stats = update(rm_params, opt_state, batch)
        if step % 20 == 0 or step == config.rm_steps - 1:
            logger.log(config.sft_steps + step, {"rm": stats})
    return rm_params


def rm_accuracy(rm: ValueModel, rm_params, pairs: lang.PreferencePairs) -> float:
    chosen = rm_score(rm, rm_params, pairs.chosen_ids, pairs.chosen_mask)
    rejected = rm_score(rm, rm_params, pairs.rejected_ids, pairs.rejected_mask)
    return float(jnp.mean(chosen > rejected))


# ------------------------------------------------------------------------------------------------
# Evaluation of a policy: proxy score, true score and KL from the SFT model on fresh samples.
# ------------------------------------------------------------------------------------------------


def make_evaluate(policy: LanguageModel, rm: ValueModel, config: Config):
    """``evaluate(policy_params, sft_params, rm_params, prompt_ids, prompt_mask, key) -> (metrics, samples)``."""

    @jax.jit
    def evaluate(policy_params, sft_params, rm_params, prompt_ids, prompt_mask, key):
        out = generate(
            policy,
            policy_params,
            prompt_ids,
            prompt_mask,
            key,
            max_new_tokens=config.max_new_tokens,
            eos_token_id=lang.EOS_ID,
            pad_token_id=lang.PAD_ID,
        )
        ids, mask = concat_prompt_response(prompt_ids, prompt_mask, out.tokens, out.mask)
        # Log-probs of the response tokens under the SFT model, from one forward pass.
        prompt_len = prompt_ids.shape[1]
        sft_logits = policy.apply(sft_params, ids, mask)[:, prompt_len - 1 : -1]
        sft_logprobs = token_logprobs(sft_logits, out.tokens)
        response_mask = out.mask.astype(jnp.float32)
        kl_B = jnp.sum((out.logprobs - sft_logprobs) * response_mask, axis=1)  # k1 summed: nats/sequence
        judgement = lang.judge(ids, mask)
        metrics = {
            "proxy_score": jnp.mean(rm_score(rm, rm_params, ids, mask)),
            "true_score": jnp.mean(judgement.score),
            "kl": jnp.mean(kl_B),
            "well_formed": jnp.mean(judgement.well_formed.astype(jnp.float32)),
            "sentiment": jnp.mean(judgement.sentiment),
            "response_len": jnp.mean(jnp.sum(response_mask, axis=1)),
        }
        return metrics, (ids, mask, judgement.score)

    return evaluate


# Hand-written sentences the reward model never saw the like of (and two it did), scored by both.
PROBES = (
    "the good kind cat helps a happy great bird .",  # the true optimum, +4
    "the cat sees a dog .",  # neutral, 0
    "the bad sad cat sees a cold dull dog .",  # the worst well-formed sentence, -4
    "the good good cat sees a happy happy dog .",  # repeated adjectives: ill formed
    "a happy happy the a happy happy cat .",  # what PPO without a KL penalty ends up writing
    "good great happy kind good great happy kind good .",  # adjectives only
)


def score_probes(rm: ValueModel, rm_params) -> list[dict[str, Any]]:
    ids, mask = lang.batch_encode(PROBES, length=lang.MAX_SENTENCE_LEN)
    proxy, true = rm_score(rm, rm_params, ids, mask), lang.true_score(ids, mask)
    return [{"text": t, "proxy_score": float(p), "true_score": float(s)} for t, p, s in zip(PROBES, proxy, true)]


def show_samples(ids, mask, scores, n: int) -> list[str]:
    ids, mask, scores = np.asarray(ids), np.asarray(mask), np.asarray(scores)
    return [f"[true {scores[i]:+.0f}] {lang.decode(ids[i], mask[i])}" for i in range(min(n, len(ids)))]


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def main(config: Config) -> dict[str, Any]:
    os.makedirs(config.out_dir, exist_ok=True)
    save_config(config, os.path.join(config.out_dir, "config.json"))
    start = time.time()
    key = jax.random.key(config.seed)
    k_data, k_pairs, k_eval_pairs, k_policy, k_rm, k_sft, k_rm_train, k_ppo, k_prompts = jax.random.split(key, 9)

    policy = LanguageModel(
        gpt2_config(lang.VOCAB_SIZE, config.policy_width, config.policy_layers, **lang.SPECIAL_TOKEN_IDS)
    )
    rm = ValueModel(
        gpt2_config(lang.VOCAB_SIZE, config.rm_width, config.rm_layers, num_heads=2, **lang.SPECIAL_TOKEN_IDS)
    )
    total = config.sft_steps + config.rm_steps + config.ppo_steps  # the kl_coef runs train together
    logger = MetricsLogger(
        config.out_dir, total_steps=total, progress_keys=("sft/loss", "rm/accuracy", "proxy_score", "true_score", "kl")
    )

    # 1. SFT on the reference distribution.
    ids, mask = lang.sample_sentences(k_data, config.sft_examples)
    sft_data = {"input_ids": np.asarray(ids), "attention_mask": np.asarray(mask)}
    sft_logger = _Prefixed(logger, "sft")
    sft_params, sft_metrics = sft.train_sft(
        policy.apply,
        policy.init_params(k_policy),
        sft_data,
        k_sft,
        config=sft.SFTConfig(learning_rate=config.sft_lr, warmup_steps=20),
        num_steps=config.sft_steps,
        batch_size=config.sft_batch_size,
        logger=sft_logger,
        log_every=20,
    )
    logger.write(
        f"SFT done: loss {sft_metrics['loss']:.3f}, token accuracy {sft_metrics['accuracy']:.3f} "
        f"({time.time() - start:.0f} s)"
    )

    # 2. Reward model on preference pairs labelled by the true score.
    train_pairs = lang.preference_pairs(k_pairs, config.rm_pairs)
    eval_pairs = lang.preference_pairs(k_eval_pairs, config.rm_eval_pairs)
    rm_params = train_reward_model(rm, rm.init_params(k_rm, head_scale=1.0), train_pairs, k_rm_train, config, logger)
    rm_params, (rm_mean, rm_std) = normalize_reward_model(rm, rm_params, ids, mask)
    logger.write(
        f"reward model scores of reference sentences: mean {rm_mean:.2f}, std {rm_std:.2f} (normalised to 0, 1)"
    )
    accuracy = {"train": rm_accuracy(rm, rm_params, train_pairs), "held_out": rm_accuracy(rm, rm_params, eval_pairs)}
    logger.log(config.sft_steps + config.rm_steps - 1, {"rm_accuracy": accuracy})
    logger.write(
        f"reward model: pairwise accuracy {accuracy['train']:.3f} train, {accuracy['held_out']:.3f} held out "
        f"({time.time() - start:.0f} s)"
    )
    probes = score_probes(rm, rm_params)
    logger.write(
        "reward model on hand-written probes:\n"
        + "\n".join(f"  proxy {p['proxy_score']:+.2f}  true {p['true_score']:+.0f}  {p['text']}" for p in probes)
    )

    # 3. PPO against the reward model, one run per kl_coef from the SFT policy, all as one sweep:
    #    the runs share the compiled step, the SFT reference and the reward model, and (one seed)
    #    their prompts and sampling keys (common random numbers).
    ppo_config = PPOConfig(
        total_steps=config.ppo_steps,
        batch_size=config.ppo_batch_size,
        minibatch_size=config.ppo_minibatch_size,
        ppo_epochs=config.ppo_epochs,
        max_prompt_len=2,  # "<bos> DET"
        max_new_tokens=config.max_new_tokens,
        eos_token_id=lang.EOS_ID,
        pad_token_id=lang.PAD_ID,
        learning_rate=config.ppo_lr,
        critic_learning_rate=config.critic_lr,
        seed=config.seed,
        save_every=max(config.ppo_steps, 1),
    )
    runs = [{"kl_coef": float(kl_coef)} for kl_coef in config.kl_coefs]
    names = [f"kl_coef={kl_coef:g}" for kl_coef in config.kl_coefs]
    # Evaluation: the same prompts and sampling key at every evaluation (common random numbers).
    evaluate_fn = make_evaluate(policy, rm, config)
    eval_prompts = lang.sample_prompts(k_prompts, config.eval_batch_size)
    k_eval = jax.random.fold_in(k_prompts, 1)
    sft_eval, sft_samples = evaluate_fn(sft_params, sft_params, rm_params, *eval_prompts, k_eval)
    sft_eval = {k: float(v) for k, v in sft_eval.items()}
    logger.write(f"SFT policy: {_fmt(sft_eval)}")
    summary: dict[str, Any] = {
        "rm_accuracy": accuracy,
        "rm_normalisation": {"mean": rm_mean, "std": rm_std},
        "rm_probes": probes,
        "sft": {**sft_eval, "samples": show_samples(*sft_samples, config.num_samples_shown)},
        "runs": {},
    }
    step0 = config.sft_steps + config.rm_steps
    curves: dict[str, list[dict[str, float]]] = {name: [{"step": 0, **sft_eval}] for name in names}
    last_samples: dict[str, Any] = {}

    def evaluate(step, sweep_state):
        results = []
        for run, name in enumerate(names):
            params = jax.tree.map(lambda x: x[run], sweep_state.runs.policy_params)
            metrics, samples = evaluate_fn(params, sft_params, rm_params, *eval_prompts, k_eval)
            metrics = {k: float(v) for k, v in metrics.items()}
            curves[name].append({"step": step, **metrics})
            last_samples[name] = samples
            results.append(metrics)
        logger.log(step0 + step - 1, {"ppo": dict(zip(names, results))})
        return results

    # A pool of training prompts ("<bos> the" / "<bos> a"), visited in the seed's order.
    prompt_pool = lang.sample_prompts(k_ppo, config.ppo_batch_size * 16)
    result = train_sweep(
        (policy, sft_params),
        RewardModel(rm),
        tuple(np.asarray(x) for x in prompt_pool),
        ppo_config,
        os.path.join(config.out_dir, "ppo"),
        runs,
        reward_params=rm_params,
        export=False,
        progress=False,
        evaluate=evaluate,
        eval_every=config.eval_every,
    )
    for run, (name, kl_coef) in enumerate(zip(names, config.kl_coefs)):
        final = curves[name][-1]
        shown = show_samples(*last_samples[name], config.num_samples_shown)
        summary["runs"][name] = {
            "kl_coef": kl_coef,
            **final,
            "samples": shown,
            "failed": result.summary["runs"][run]["failed"],
        }
        logger.write(f"{name}: {_fmt(final)} ({time.time() - start:.0f} s)\n  " + "\n  ".join(shown))
        logger.log_text(step0 + config.ppo_steps - 1, f"samples/{name}", "\n\n".join(shown))
    logger.close()

    summary["seconds"] = time.time() - start
    with open(os.path.join(config.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_results(curves, summary, config.out_dir)
    return summary


def plot_results(curves: dict[str, list[dict[str, float]]], summary: dict[str, Any], out_dir: str) -> None:
    """reward_hacking.png: proxy and true score against KL from SFT; reward_hacking_steps.png: per step."""

    def series(x_key, y_key):
        return {name: ([p[x_key] for p in points], [p[y_key] for p in points]) for name, points in curves.items()}

    for points in curves.values():  # Gao et al. plot against sqrt(KL), a distance from the SFT model
        for p in points:
            p["sqrt_kl"] = float(np.sqrt(max(p["kl"], 0.0)))
    accuracy = summary["rm_accuracy"]["held_out"]
    plot_curves(
        {"proxy score (reward model)": series("sqrt_kl", "proxy_score"), "true score": series("sqrt_kl", "true_score")},
        os.path.join(out_dir, "reward_hacking.png"),
        title=f"PPO against a learned reward model (held-out pairwise accuracy {accuracy:.3f})",
        xlabel="sqrt KL(policy || SFT)   (KL in nats per sentence)",
        ylims={"true score": (lang.MIN_TRUE_SCORE - 0.2, lang.MAX_TRUE_SCORE + 0.2)},
        ncols=2,
    )
    plot_curves(
        {
            "proxy score (reward model)": series("step", "proxy_score"),
            "true score": series("step", "true_score"),
            "KL(policy || SFT), nats": series("step", "kl"),
            "fraction well formed": series("step", "well_formed"),
        },
        os.path.join(out_dir, "reward_hacking_steps.png"),
        title="Reward hacking, per PPO step",
        xlabel="PPO step",
        ncols=4,
    )


class _Prefixed:
    """A logger view that nests every metric under ``prefix`` (for train_sft's flat metrics)."""

    def __init__(self, logger: MetricsLogger, prefix: str):
        self.logger, self.prefix = logger, prefix

    def log(self, step, metrics):
        return self.logger.log(step, {self.prefix: dict(metrics)})


def _fmt(metrics: dict[str, float]) -> str:
    keys = ("proxy_score", "true_score", "kl", "well_formed")
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)


if __name__ == "__main__":
    main(parse_config(Config))
