"""The built-in advantage estimators, registered as plug-ins (`jaxrlhf.training.plugins`).

Each is a few lines around a `jaxrlhf.core` function (where the formula and its paper live):

    name                  formula (A per token; "outcome": one A_i per response, broadcast)   core
    gae                   A = GAE(r, V), returns = A + V, whitened if whiten_advantages        gae_advantages
    reinforce++           A = whiten(discounted_returns(r))                                    discounted_returns
    reinforce++-baseline  the same with s_i - mean_g s in place of s_i                         drgrpo_advantages
    grpo                  outcome: (s_i - mean_g s) / (std_g s + 1e-6)                          grpo_advantages
    drgrpo                outcome: s_i - mean_g s                                              drgrpo_advantages
    rloo                  outcome: s_i - mean of the other G - 1                               rloo_advantages
    remax                 outcome: s_i - s(greedy response to the same prompt)                 remax_advantages
    opo                   outcome: s_i - length-weighted mean_g s                              opo_advantages
    gpg                   outcome: (B / #nonzero s) * (s_i - mean_g s) / gpg_f_norm            gpg_advantages
    grpo-passk            outcome: the group's best gets (s_max - s_second) / (std_g s + 1e-6)  grpo_passk_advantages

``r`` are DESIGN.md's step rewards (``x.step_rewards()``: the KL penalty with beta when
``kl_placement="reward"``, the score on the last action token); outcome estimators compare
``s_i = x.sequence_scores()``, the score minus beta times the response's summed KL (the
sequence-level form of the same penalty; just the score with ``kl_placement="loss"``).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxrlhf.core import groups
from jaxrlhf.core.advantages import gae_advantages
from jaxrlhf.core.rewards import discounted_returns, step_rewards
from jaxrlhf.core.stats import masked_count, masked_whiten
from jaxrlhf.training.plugins import AdvantageInputs, Advantages, advantage_estimator


@advantage_estimator("gae", uses_critic=True)
def gae(x: AdvantageInputs) -> Advantages:
    """PPO's GAE with a critic (Schulman et al. 2016): ``delta_t = r_t + gamma V_{t+1} - V_t``,
    ``A_t = delta_t + gamma lambda A_{t+1}``, ``returns = A + V``; ``A`` whitened over the batch's
    action tokens when ``config.whiten_advantages``."""
    assert x.values is not None  # uses_critic: the trainer passes the critic's values
    rewards_BxN = x.step_rewards()
    advantages_BxN, returns_BxN = gae_advantages(
        rewards_BxN, x.values, x.mask, x.numbers["gamma"], x.numbers["gae_lambda"]
    )
    if x.config.whiten_advantages:
        advantages_BxN = masked_whiten(advantages_BxN, x.mask, axis_name=x.axis_name)
    return Advantages(advantages_BxN, returns_BxN, rewards_BxN)


def _reinforce_pp(x: AdvantageInputs, scores_B) -> Advantages:
    rewards_BxN = x.step_rewards(scores_B)
    returns_BxN = discounted_returns(rewards_BxN, x.mask, x.numbers["gamma"])
    advantages_BxN = masked_whiten(returns_BxN, x.mask, shift_mean=True, axis_name=x.axis_name)
    return Advantages(advantages_BxN, rewards=x.step_rewards())


@advantage_estimator("reinforce++")
def reinforce_pp(x: AdvantageInputs) -> Advantages:
    """REINFORCE++ (Hu 2025): returns of the KL-penalised step rewards, whitened over every action
    token of the batch (`jaxrlhf.core.groups.reinforce_pp_advantages`)."""
    return _reinforce_pp(x, x.scores)


@advantage_estimator("reinforce++-baseline", min_group_size=2)
def reinforce_pp_baseline(x: AdvantageInputs) -> Advantages:
    """REINFORCE++-baseline: the scores minus their group mean first, then REINFORCE++."""
    return _reinforce_pp(x, groups.drgrpo_advantages(x.scores, x.group_size))


def _outcome(x: AdvantageInputs, sequence_scores_B, advantages_B) -> Advantages:
    """One advantage per response, broadcast over its action tokens. The logged step rewards put
    the sequence score (the KL already inside it) on the last action token."""
    advantages_BxN = groups.broadcast_over_tokens(advantages_B, x.mask)
    rewards_BxN = step_rewards(sequence_scores_B, x.kl, x.mask, jnp.zeros_like(x.reward_kl_coef))
    return Advantages(advantages_BxN, rewards=rewards_BxN)


@advantage_estimator("grpo", min_group_size=2)
def grpo(x: AdvantageInputs) -> Advantages:
    """GRPO (Shao et al. 2024): ``A_i = (s_i - mean_g s) / (std_g s + 1e-6)``."""
    scores_B = x.sequence_scores()
    return _outcome(x, scores_B, groups.grpo_advantages(scores_B, x.group_size))


@advantage_estimator("drgrpo", min_group_size=2)
def drgrpo(x: AdvantageInputs) -> Advantages:
    """Dr. GRPO (Liu et al. 2025): ``A_i = s_i - mean_g s``."""
    scores_B = x.sequence_scores()
    return _outcome(x, scores_B, groups.drgrpo_advantages(scores_B, x.group_size))


@advantage_estimator("rloo", min_group_size=2)
def rloo(x: AdvantageInputs) -> Advantages:
    """RLOO (Ahmadian et al. 2024): ``A_i = s_i - (sum_g s - s_i) / (G - 1)``."""
    scores_B = x.sequence_scores()
    return _outcome(x, scores_B, groups.rloo_advantages(scores_B, x.group_size))


@advantage_estimator("remax", needs_greedy=True)
def remax(x: AdvantageInputs) -> Advantages:
    """ReMax (Li et al. 2023): ``A_i = s_i - s(greedy response to the same prompt)``."""
    assert x.greedy_scores is not None  # needs_greedy: the trainer passes them
    scores_B = x.sequence_scores()
    return _outcome(x, scores_B, groups.remax_advantages(scores_B, x.greedy_scores, x.group_size))


@advantage_estimator("opo")
def opo(x: AdvantageInputs) -> Advantages:
    """OPO (Hao et al. 2025, "On-Policy RL with Optimal reward baseline"): the group's mean score
    weighted by response length, ``A_i = s_i - sum_g(L_g s_g) / sum_g L_g`` (0 for a group of one)."""
    scores_B = x.sequence_scores()
    lengths_B = masked_count(x.mask, axis=-1)
    return _outcome(x, scores_B, groups.opo_advantages(scores_B, lengths_B, x.group_size))


@advantage_estimator("gpg", numbers={"gpg_f_norm": 1.0})
def gpg(x: AdvantageInputs) -> Advantages:
    """GPG (Chu et al. 2025, "GPG: A Simple and Strong Reinforcement Learning Baseline"):
    ``A_i = alpha (s_i - mean_g s) / F_norm`` with ``alpha = B / #(s != 0)`` over the batch."""
    scores_B = x.sequence_scores()
    advantages_B = groups.gpg_advantages(scores_B, x.group_size, x.numbers["gpg_f_norm"], axis_name=x.axis_name)
    return _outcome(x, scores_B, advantages_B)


@advantage_estimator("grpo-passk", min_group_size=2)
def grpo_passk(x: AdvantageInputs) -> Advantages:
    """GRPO for pass@k (Chen et al. 2025, arXiv 2503.19595): only each group's best response gets
    an advantage, ``(s_max - s_second) / (std_g s + 1e-6)``."""
    scores_B = x.sequence_scores()
    return _outcome(x, scores_B, groups.grpo_passk_advantages(scores_B, x.group_size))
