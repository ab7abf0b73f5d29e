"""Named presets: each algorithm's paper settings as a `PPOConfig` built from a base config.

    config = preset("grpo", base_config)                    # base with GRPO's settings
    config = preset("dapo", base_config, num_generations=16)  # ... and any field overridden

A preset sets only the fields that define its algorithm (estimator, policy loss, group size, KL
placement / estimator / coefficient, clip ranges, loss aggregation, dual clip, greedy baseline,
overlong shaping, and the update epochs where the paper fixes them); everything else (lengths,
batch sizes, learning rates, the seed, logging) comes from ``base``. Every preset sets all of those
algorithm fields but ``ppo_epochs`` (set only where the paper fixes it), so
``preset("ppo", preset("dapo", c))`` is PPO again up to the epochs. Learning rates are left to the
base: the papers' values (1e-6 for 7B-scale models) are model-specific.

Group size G: ``base.num_generations`` when it is > 1, else `DEFAULT_GROUP_SIZE` (the papers use 16
to 64 responses per prompt; G must divide ``batch_size``, which counts responses).

| preset | paper | settings |
| --- | --- | --- |
| ``ppo`` | Ouyang et al. 2022 (InstructGPT); Ziegler et al. 2019 | critic + GAE, token clip 0.2, k1 KL in the reward |
| ``grpo`` | Shao et al. 2024 (DeepSeekMath) | group mean/std, k3 KL in the loss, beta 0.04, clip 0.2, seq-mean-token-mean, 1 epoch |
| ``dr_grpo`` | Liu et al. 2025 (Understanding R1-Zero-Like Training) | group mean only, seq-mean-token-sum-norm, no KL |
| ``dapo`` | Yu et al. 2025 (DAPO) | group mean/std, clip-higher 0.2/0.28, token-mean, no KL, overlong buffer = max_new_tokens / 5 |
| ``gspo`` | Zheng et al. 2025 (GSPO) | group mean/std, sequence ratio clipped to [1 - 3e-4, 1 + 4e-4], seq-mean-token-mean, no KL |
| ``rloo`` | Ahmadian et al. 2024 (Back to Basics) | leave-one-out baseline, sequence-level k1 KL in the reward (beta 0.05), seq-mean-token-sum, 1 epoch |
| ``reinforce_pp`` | Hu 2025 (REINFORCE++) | batch-whitened returns, token-level k1 KL in the reward (beta 0.01), clip 0.2, G = 1 |
| ``reinforce_pp_baseline`` | Hu 2025 (REINFORCE++-baseline) | group mean first, then batch whitening; k2 KL in the loss (beta 1e-3) |
| ``remax`` | Li et al. 2023 (ReMax) | greedy response's score as baseline, one sample per prompt, k1 KL in the reward, seq-mean-token-sum, 1 epoch |

Sources: DeepSeekMath (GRPO objective with the k3 "unbiased estimator" of the KL,
beta = 0.04, one policy update per exploration stage); Dr. GRPO (no std, a constant
normaliser instead of 1/|o_i|; its recipe trains without a KL term); DAPO (clip-higher
eps_low 0.2 / eps_high 0.28, token-level policy gradient loss, KL removed, soft overlong punishment
with L_cache 4096 of L_max 20480); GSPO (sequence-level ratio, clip 3e-4 / 4e-4); RLOO
(REINFORCE with the leave-one-out baseline on the full sequence reward ``r - beta * KL``);
REINFORCE++ (token-level KL penalty in the reward, global batch advantage normalisation, PPO's
clip); its "-baseline" variant as the authors run it in OpenRLHF (k2 KL loss, beta 1e-3); ReMax
Algorithm 1 (REINFORCE with the greedy response's reward as baseline). DAPO's dynamic sampling
samples more responses per step, so the preset keeps the base's ``dynamic_sampling_oversample``
(1 = off; the trainer logs ``group_signal_fraction`` either way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxrlhf.training.config import PPOConfig

DEFAULT_GROUP_SIZE = 8

_DEFAULTS = PPOConfig()


def _algorithm(**settings) -> dict[str, Any]:
    """Every algorithm field, PPOConfig's default unless given."""
    fields = dict(
        advantage_estimator=_DEFAULTS.advantage_estimator,
        policy_loss=_DEFAULTS.policy_loss,
        num_generations=1,
        kl_placement=_DEFAULTS.kl_placement,
        kl_estimator=_DEFAULTS.kl_estimator,
        kl_coef=_DEFAULTS.kl_coef,
        adaptive_kl=_DEFAULTS.adaptive_kl,
        clip_eps=_DEFAULTS.clip_eps,
        clip_eps_high=_DEFAULTS.clip_eps_high,
        loss_agg=_DEFAULTS.loss_agg,
        dual_clip=_DEFAULTS.dual_clip,
        greedy_rollout=_DEFAULTS.greedy_rollout,
        overlong_buffer=_DEFAULTS.overlong_buffer,
        whiten_advantages=_DEFAULTS.whiten_advantages,
        shared_trunk=False,
        dynamic_sampling_oversample=_DEFAULTS.dynamic_sampling_oversample,
    )
    fields.update(settings)
    return fields


def _group_size(base: PPOConfig) -> int:
    return base.num_generations if base.num_generations > 1 else DEFAULT_GROUP_SIZE


def ppo(base: PPOConfig) -> dict[str, Any]:
    """PPO with a critic and GAE (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022,
    InstructGPT): token-level clip 0.2, k1 KL penalty in the reward. The trainer's defaults."""
    return _algorithm(shared_trunk=base.shared_trunk)


def grpo(base: PPOConfig) -> dict[str, Any]:
    """GRPO (Shao et al. 2024, "DeepSeekMath"): ``A_i = (r_i - mean_g r) / std_g r``, KL to the
    reference as a k3 loss term with beta 0.04, clip 0.2, each response's token mean averaged over
    responses ("seq-mean-token-mean"), one update per batch of rollouts."""
    return _algorithm(
        advantage_estimator="grpo",
        num_generations=_group_size(base),
        kl_placement="loss",
        kl_estimator="k3",
        kl_coef=0.04,
        loss_agg="seq-mean-token-mean",
        ppo_epochs=1,
    )


def dr_grpo(base: PPOConfig) -> dict[str, Any]:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"):
    ``A_i = r_i - mean_g r`` (no std), each response's token sum over the constant max_new_tokens
    ("seq-mean-token-sum-norm"), no KL term; otherwise GRPO's."""
    return _algorithm(
        advantage_estimator="drgrpo",
        num_generations=_group_size(base),
        kl_placement="loss",
        kl_estimator="k3",
        kl_coef=0.0,
        loss_agg="seq-mean-token-sum-norm",
        ppo_epochs=1,
    )


def dapo(base: PPOConfig) -> dict[str, Any]:
    """DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"):
    GRPO's group advantages with clip-higher (eps_low 0.2, eps_high 0.28), the token-level loss
    ("token-mean" over the batch), no KL term, and the soft overlong punishment with a buffer of
    a fifth of max_new_tokens (the paper: 4096 of 20480). Dynamic sampling samples more responses
    per step, so it is kept from the base: pass ``dynamic_sampling_oversample=2`` (or more) for it."""
    return _algorithm(
        advantage_estimator="grpo",
        num_generations=_group_size(base),
        kl_placement="loss",
        kl_estimator="k3",
        kl_coef=0.0,
        clip_eps=0.2,
        clip_eps_high=0.28,
        loss_agg="token-mean",
        overlong_buffer=max(1, base.max_new_tokens // 5),
        dynamic_sampling_oversample=base.dynamic_sampling_oversample,
    )


def gspo(base: PPOConfig) -> dict[str, Any]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): GRPO's group advantages with
    the length-normalised sequence ratio, clipped to [1 - 3e-4, 1 + 4e-4], "seq-mean-token-mean",
    no KL term."""
    return _algorithm(
        advantage_estimator="grpo",
        policy_loss="gspo",
        num_generations=_group_size(base),
        kl_placement="loss",
        kl_estimator="k3",
        kl_coef=0.0,
        clip_eps=3e-4,
        clip_eps_high=4e-4,
        loss_agg="seq-mean-token-mean",
    )


def rloo(base: PPOConfig) -> dict[str, Any]:
    """RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs"): ``A_i = r_i - mean of the other G - 1``, on the
    sequence reward ``r - beta * sum_t k1_t`` (beta 0.05); the whole response is one action, so
    its token log-probs are summed ("seq-mean-token-sum"); one update per batch."""
    return _algorithm(
        advantage_estimator="rloo",
        num_generations=_group_size(base),
        kl_placement="reward",
        kl_estimator="k1",
        kl_coef=0.05,
        loss_agg="seq-mean-token-sum",
        ppo_epochs=1,
    )


def reinforce_pp(base: PPOConfig) -> dict[str, Any]:
    """REINFORCE++ (Hu 2025, "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both
    Prompt and Reward Models"): discounted returns of the token-level KL-penalised rewards (k1,
    beta 0.01), whitened over the global batch, PPO's clip 0.2, one response per prompt."""
    del base
    return _algorithm(advantage_estimator="reinforce++", kl_placement="reward", kl_estimator="k1", kl_coef=0.01)


def reinforce_pp_baseline(base: PPOConfig) -> dict[str, Any]:
    """REINFORCE++-baseline (Hu 2025): the group mean subtracted from each score, then REINFORCE++'s
    batch whitening; KL as a k2 loss term with beta 1e-3 (the authors' OpenRLHF recipe)."""
    return _algorithm(
        advantage_estimator="reinforce++-baseline",
        num_generations=_group_size(base),
        kl_placement="loss",
        kl_estimator="k2",
        kl_coef=1e-3,
    )


def remax(base: PPOConfig) -> dict[str, Any]:
    """ReMax (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning
    Method for Aligning Large Language Models"): REINFORCE with the greedy response's score as
    baseline, one sampled response per prompt, the sequence reward ``r - beta * sum_t k1_t``, the
    response's token log-probs summed ("seq-mean-token-sum"), one update per batch."""
    del base
    return _algorithm(
        advantage_estimator="remax",
        greedy_rollout=True,
        kl_placement="reward",
        kl_estimator="k1",
        loss_agg="seq-mean-token-sum",
        ppo_epochs=1,
        score_norm=None,
    )


PRESETS: dict[str, Callable[[PPOConfig], dict[str, Any]]] = {
    "ppo": ppo,
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "dapo": dapo,
    "gspo": gspo,
    "rloo": rloo,
    "reinforce_pp": reinforce_pp,
    "reinforce_pp_baseline": reinforce_pp_baseline,
    "remax": remax,
}


def preset_overrides(name: str, base: PPOConfig) -> dict[str, Any]:
    """The fields preset ``name`` sets on ``base`` (a dict of `PPOConfig` replacements)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name](base)


def preset(name: str, base: PPOConfig | None = None, **overrides) -> PPOConfig:
    """``base`` (default `PPOConfig()`) with preset ``name``'s settings, then ``overrides``."""
    base = PPOConfig() if base is None else base
    return base.replace(**{**preset_overrides(name, base), **overrides})
