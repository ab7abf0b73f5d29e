"""Core RLHF math: pure JAX functions on ``[batch, time]`` arrays (see DESIGN.md)."""
from jaxrlhf.core.advantages import gae_advantages
from jaxrlhf.core.kl import KL_KINDS, kl_estimate
from jaxrlhf.core.kl_control import (
    KLController,
    KLControllerState,
    adaptive_kl_controller,
    fixed_kl_controller,
)
from jaxrlhf.core.logprobs import entropy_from_logits, token_logprobs
from jaxrlhf.core.losses import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    entropy_loss,
    ppo_policy_loss,
    ppo_value_loss,
    reward_model_loss,
)
from jaxrlhf.core.rewards import discounted_returns, kl_penalized_rewards, last_valid_index
from jaxrlhf.core.stats import masked_count, masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "KL_KINDS",
    "KLController",
    "KLControllerState",
    "LOSS_AGGREGATIONS",
    "adaptive_kl_controller",
    "aggregate_loss",
    "discounted_returns",
    "entropy_from_logits",
    "entropy_loss",
    "fixed_kl_controller",
    "gae_advantages",
    "kl_estimate",
    "kl_penalized_rewards",
    "last_valid_index",
    "masked_count",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reward_model_loss",
    "token_logprobs",
]
