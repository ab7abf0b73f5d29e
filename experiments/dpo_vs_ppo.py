"""DPO vs PPO on one data set: which method gets more true reward for the same KL from the SFT model?

The synthetic language of ``reward_hacking.py`` (``tasks.synthetic_language``: true score =
#positive - #negative adjectives of a well-formed sentence, -4 otherwise), per seed:

1. **SFT**: a tiny GPT-2 learns the reference distribution (as in ``reward_hacking.py``).
2. **The preference pairs**: ``rm_pairs`` pairs of reference sentences labelled by the true score.
3. **PPO**: a Bradley-Terry reward model trained on *those* pairs, then PPO against it, one run per
   ``kl_coef`` (one sweep, as in ``reward_hacking.py``).
4. **Offline methods on the same pairs**: DPO, IPO, SimPO and KTO (the pairs as desirable /
   undesirable rows) from the SFT policy, one run per ``beta`` (`jaxrlhf.training.train_preference`,
   reference log-probs precomputed from the SFT model; prompt ``<bos>``, response the sentence).

Every final policy is sampled on the same prompts (``<bos> the`` / ``<bos> a``) and scored by the
true rule; KL(policy || SFT) is measured on the samples (sum over response tokens, nats). The
reward-KL frontier (true score against KL, one curve per method over its beta / kl_coef, mean over
seeds) goes to ``dpo_vs_ppo.png``, and the table to ``summary.json`` and ``summary.md``.

    python experiments/dpo_vs_ppo.py                       # 3 seeds; tens of minutes on 2 CPU cores
    python experiments/dpo_vs_ppo.py --seeds 0 --pref_steps 50 --ppo_steps 30 --out_dir runs/dvp_small
    python experiments/dpo_vs_ppo.py --help
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np
import reward_hacking as rh  # experiments/ is the script's directory, so it is on sys.path

from jaxrlhf.config import parse_config, refuse_unknown_fields, save_config
from jaxrlhf.metrics_log import MetricsLogger
from jaxrlhf.models import LanguageModel, ValueModel, gpt2_config
from jaxrlhf.plotting import plot_curves
from jaxrlhf.training import PPOConfig, RewardModel, sft, train_sweep
from jaxrlhf.training.preference import PreferenceConfig, train_preference
from jaxrlhf.training.preference_data import pairs_from_arrays
from tasks import synthetic_language as lang


@refuse_unknown_fields
@dataclasses.dataclass(frozen=True)
class Config:
    """DPO / IPO / SimPO / KTO vs PPO on the same preference pairs: true score against KL from SFT."""

    out_dir: str = "runs/dpo_vs_ppo"
    """Directory for config.json, metrics.jsonl, dpo_vs_ppo.png, summary.json and summary.md."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One whole pipeline (SFT, pairs, RM, PPO, offline runs) per seed."""

    # --- policy / SFT (as reward_hacking.py) ---
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

    # --- the preference pairs and the reward model ---
    rm_pairs: int = 512
    """Preference pairs: they train the reward model (for PPO) and every offline method."""
    rm_eval_pairs: int = 1024
    """Held-out pairs: the reward model's accuracy and the offline methods' implicit-reward accuracy."""
    rm_width: int = 32
    """Hidden size of the reward model."""
    rm_layers: int = 1
    """Transformer blocks of the reward model."""
    rm_steps: int = 200
    """Reward-model updates."""
    rm_batch_size: int = 64
    """Pairs per reward-model update."""
    rm_lr: float = 1e-3
    """AdamW learning rate of the reward model."""

    # --- PPO (as reward_hacking.py) ---
    kl_coefs: tuple[float, ...] = (0.0, 0.02, 0.1, 0.5)
    """KL coefficients of PPO's per-token penalty, one run each."""
    ppo_steps: int = 120
    """PPO iterations per kl_coef."""
    ppo_batch_size: int = 64
    """Prompts per PPO iteration."""
    ppo_minibatch_size: int = 32
    """Rollouts per PPO update."""
    ppo_epochs: int = 2
    """Passes over each batch of rollouts."""
    ppo_lr: float = 2e-4
    """Policy learning rate."""
    critic_lr: float = 1e-3
    """Value-model learning rate."""
    max_new_tokens: int = 12
    """Response budget of sampling."""

    # --- offline preference methods ---
    losses: tuple[str, ...] = ("dpo", "ipo", "simpo", "kto")
    """Offline methods to run (any of dpo, cdpo, ipo, simpo, kto)."""
    dpo_betas: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
    """beta of DPO (and cDPO) runs."""
    ipo_betas: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
    """beta (tau) of IPO runs."""
    simpo_betas: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    """beta of SimPO runs (gamma = simpo_gamma_ratio * beta)."""
    simpo_gamma_ratio: float = 0.5
    """SimPO's gamma / beta (the paper's 0.5)."""
    kto_betas: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
    """beta of KTO runs."""
    pref_steps: int = 200
    """Updates per offline run."""
    pref_batch_size: int = 32
    """Pairs (KTO: rows) per offline update."""
    pref_lr: float = 1e-4
    """AdamW learning rate of the offline runs."""

    # --- evaluation ---
    eval_batch_size: int = 256
    """Samples per evaluation of a final policy."""
    num_samples_shown: int = 3
    """Decoded samples per run kept in summary.json."""

    def betas(self, loss: str) -> tuple[float, ...]:
        return {
            "dpo": self.dpo_betas,
            "cdpo": self.dpo_betas,
            "ipo": self.ipo_betas,
            "simpo": self.simpo_betas,
            "kto": self.kto_betas,
        }[loss]


def pair_data(pairs: lang.PreferencePairs):
    """Sentences as prompt ``<bos>`` + response (the rest, ending with the '.' EOS)."""
    c, cm, r, rm_ = (np.asarray(x) for x in pairs)
    return pairs_from_arrays(
        c[:, :1],
        cm[:, :1],
        c[:, 1:],
        cm[:, 1:],
        r[:, 1:],
        rm_[:, 1:],
        max_prompt_len=1,
        max_response_len=lang.MAX_SENTENCE_LEN - 1,
        pad_id=lang.PAD_ID,
    )


def run_seed(config: Config, seed: int, logger: MetricsLogger) -> dict[str, Any]:
    """The whole pipeline for one seed; returns ``{"sft": metrics, "rm_accuracy", "runs": [...]}``."""
    start = time.time()
    key = jax.random.key(seed)
    k_data, k_pairs, k_eval_pairs, k_policy, k_rm, k_sft, k_rm_train, k_ppo, k_prompts = jax.random.split(key, 9)
    out_dir = os.path.join(config.out_dir, f"seed_{seed}")
    policy = LanguageModel(
        gpt2_config(lang.VOCAB_SIZE, config.policy_width, config.policy_layers, **lang.SPECIAL_TOKEN_IDS)
    )
    rm = ValueModel(
        gpt2_config(lang.VOCAB_SIZE, config.rm_width, config.rm_layers, num_heads=2, **lang.SPECIAL_TOKEN_IDS)
    )

    # 1. SFT.
    ids, mask = lang.sample_sentences(k_data, config.sft_examples)
    sft_params, sft_metrics = sft.train_sft(
        policy.apply,
        policy.init_params(k_policy),
        {"input_ids": np.asarray(ids), "attention_mask": np.asarray(mask)},
        k_sft,
        config=sft.SFTConfig(learning_rate=config.sft_lr, warmup_steps=20),
        num_steps=config.sft_steps,
        batch_size=config.sft_batch_size,
    )
    logger.write(f"[seed {seed}] SFT loss {sft_metrics['loss']:.3f} ({time.time() - start:.0f} s)")

    # 2. The pairs, and the reward model trained on them.
    train_pairs = lang.preference_pairs(k_pairs, config.rm_pairs)
    eval_pairs = lang.preference_pairs(k_eval_pairs, config.rm_eval_pairs)
    rm_logger = _Null()
    rm_params = rh.train_reward_model(
        rm, rm.init_params(k_rm, head_scale=1.0), train_pairs, k_rm_train, config, rm_logger
    )
    rm_params, _ = rh.normalize_reward_model(rm, rm_params, ids, mask)
    rm_acc = rh.rm_accuracy(rm, rm_params, eval_pairs)
    logger.write(f"[seed {seed}] reward model held-out accuracy {rm_acc:.3f}")

    evaluate_fn = rh.make_evaluate(policy, rm, config)
    eval_prompts = lang.sample_prompts(k_prompts, config.eval_batch_size)
    k_eval = jax.random.fold_in(k_prompts, 1)

    def evaluate(params) -> dict[str, Any]:
        metrics, samples = evaluate_fn(params, sft_params, rm_params, *eval_prompts, k_eval)
        return {
            **{k: float(v) for k, v in metrics.items()},
            "samples": rh.show_samples(*samples, config.num_samples_shown),
        }

    runs: list[dict[str, Any]] = []
    sft_eval = evaluate(sft_params)

    # 3. PPO against the reward model, one run per kl_coef (one sweep).
    ppo_config = PPOConfig(
        total_steps=config.ppo_steps,
        batch_size=config.ppo_batch_size,
        minibatch_size=config.ppo_minibatch_size,
        ppo_epochs=config.ppo_epochs,
        max_prompt_len=2,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=lang.EOS_ID,
        pad_token_id=lang.PAD_ID,
        learning_rate=config.ppo_lr,
        critic_learning_rate=config.critic_lr,
        seed=seed,
        save_every=max(config.ppo_steps, 1),
    )
    prompt_pool = lang.sample_prompts(k_ppo, config.ppo_batch_size * 16)
    result = train_sweep(
        (policy, sft_params),
        RewardModel(rm),
        tuple(np.asarray(x) for x in prompt_pool),
        ppo_config,
        os.path.join(out_dir, "ppo"),
        [{"kl_coef": float(c)} for c in config.kl_coefs],
        reward_params=rm_params,
        export=False,
        progress=False,
    )
    for run, kl_coef in enumerate(config.kl_coefs):
        params = jax.tree.map(lambda x: x[run], result.state.runs.policy_params)
        runs.append({"method": "ppo", "knob": "kl_coef", "value": float(kl_coef), **evaluate(params)})
    logger.write(f"[seed {seed}] PPO done ({time.time() - start:.0f} s)")

    # 4. The offline methods on the same pairs (reference: the SFT model, log-probs precomputed).
    train_data, held_out = pair_data(train_pairs), pair_data(eval_pairs)
    for loss in config.losses:
        for beta in config.betas(loss):
            overrides = dict(beta=beta)
            if loss == "simpo":
                overrides["simpo_gamma"] = config.simpo_gamma_ratio * beta
            pref_config = PreferenceConfig.preset(
                loss,
                **overrides,
                learning_rate=config.pref_lr,
                total_steps=config.pref_steps,
                batch_size=config.pref_batch_size,
                max_prompt_len=1,
                max_response_len=lang.MAX_SENTENCE_LEN - 1,
                seed=seed,
                save_every=max(config.pref_steps, 1),
            )
            res = train_preference(
                (policy, sft_params),
                train_data,
                pref_config,
                eval_data=held_out,
                progress=False,
                tensorboard=False,
                export=False,
            )
            final = res.evals[-1]
            runs.append(
                {
                    "method": loss,
                    "knob": "beta",
                    "value": float(beta),
                    **evaluate(res.params),
                    "implicit_accuracy": final["accuracy"],
                    "train_loss": res.history[-1]["loss"],
                }
            )
        logger.write(f"[seed {seed}] {loss} done ({time.time() - start:.0f} s)")
    return {"seed": seed, "sft": sft_eval, "rm_accuracy": rm_acc, "runs": runs, "seconds": time.time() - start}


def aggregate(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of each (method, knob value)."""
    table: dict[tuple, list[dict[str, Any]]] = {}
    for seed_result in per_seed:
        for run in seed_result["runs"]:
            table.setdefault((run["method"], run["value"]), []).append(run)
    rows = []
    for (method, value), runs in table.items():
        row = {"method": method, "knob": runs[0]["knob"], "value": value, "seeds": len(runs)}
        for key in ("true_score", "kl", "proxy_score", "well_formed", "implicit_accuracy"):
            if key in runs[0]:
                values = np.asarray([r[key] for r in runs], np.float64)
                row[key], row[f"{key}_std"] = float(values.mean()), float(values.std())
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]], sft: dict[str, float]) -> str:
    lines = [
        "| method | knob | true score | KL (nats) | well formed | proxy (RM) | held-out implicit acc. |",
        "|---|---|---|---|---|---|---|",
        f"| SFT | - | {sft['true_score']:.2f} | 0 | {sft['well_formed']:.2f} | {sft['proxy_score']:.2f} | - |",
    ]
    for r in rows:
        acc = f"{r['implicit_accuracy']:.3f}" if "implicit_accuracy" in r else "-"
        lines.append(
            f"| {r['method']} | {r['knob']}={r['value']:g} | {r['true_score']:.2f} ± {r['true_score_std']:.2f} "
            f"| {r['kl']:.2f} ± {r['kl_std']:.2f} | {r['well_formed']:.2f} | {r['proxy_score']:.2f} | {acc} |"
        )
    return "\n".join(lines) + "\n"


def main(config: Config) -> dict[str, Any]:
    os.makedirs(config.out_dir, exist_ok=True)
    save_config(config, os.path.join(config.out_dir, "config.json"))
    logger = MetricsLogger(config.out_dir, total_steps=len(config.seeds), progress=False, tensorboard=False)
    per_seed = []
    for i, seed in enumerate(config.seeds):
        per_seed.append(run_seed(config, seed, logger))
        logger.log(i, {"seed": seed, "seconds": per_seed[-1]["seconds"]})
    logger.close()
    rows = aggregate(per_seed)
    sft_mean = {
        k: float(np.mean([s["sft"][k] for s in per_seed])) for k in ("true_score", "well_formed", "proxy_score")
    }
    summary = {"rows": rows, "sft": sft_mean, "per_seed": per_seed, "rm_accuracy": [s["rm_accuracy"] for s in per_seed]}
    with open(os.path.join(config.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = markdown_table(rows, sft_mean)
    with open(os.path.join(config.out_dir, "summary.md"), "w") as f:
        f.write(table)
    print(table)
    plot_frontier(rows, sft_mean, config.out_dir)
    return summary


def plot_frontier(rows, sft, out_dir) -> None:
    """dpo_vs_ppo.png: true score against sqrt KL (one curve per method over its knob, seed means)."""
    series = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kl"])
        series[method] = (
            [0.0] + [float(np.sqrt(max(r["kl"], 0.0))) for r in points],
            [sft["true_score"]] + [r["true_score"] for r in points],
        )
    plot_curves(
        {"true score": series},
        os.path.join(out_dir, "dpo_vs_ppo.png"),
        title="True score vs KL on the same pairs",
        xlabel="sqrt KL(policy || SFT)   (KL in nats per sentence)",
        ylims={"true score": (lang.MIN_TRUE_SCORE - 0.2, lang.MAX_TRUE_SCORE + 0.2)},
        ncols=1,
    )


class _Null:
    def log(self, *args, **kwargs):
        pass


if __name__ == "__main__":
    main(parse_config(Config))
