"""jaxrlhf: RLHF for language models as pure, jit-compiled JAX functions."""

__version__ = "0.1.0"

# First: quiets transformers' no-PyTorch notice before any module imports transformers.
import jaxrlhf._transformers_notice  # noqa: F401, I001

# Public API. Each block is added when its module lands; keep the blocks in this order.
# --- core math ---
from jaxrlhf.core import (
    KL_KINDS,
    LOSS_AGGREGATIONS,
    KLController,
    KLControllerState,
    adaptive_kl_controller,
    aggregate_loss,
    discounted_returns,
    entropy_from_logits,
    entropy_loss,
    fixed_kl_controller,
    gae_advantages,
    kl_estimate,
    kl_penalized_rewards,
    last_valid_index,
    masked_count,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    reward_model_loss,
    token_logprobs,
)

# --- models ---
from jaxrlhf.models import (
    CheckpointError,
    LanguageModel,
    LoraConfig,
    LoraParams,
    ModelConfig,
    Pretrained,
    UnsupportedModelError,
    load_peft_adapter,
    load_pretrained,
    save_peft_adapter,
    save_pretrained,
    with_lora,
)

# --- sampling ---
from jaxrlhf.sampling import SampleOutput, Sampler, generate, make_sampler

# --- devices: meshes and shardings, backend tuning ---
from jaxrlhf.sharding import make_mesh

# --- training ---
from jaxrlhf.training import (
    PPO,
    CheckpointMismatchError,
    FrozenParams,
    NonFiniteError,
    PPOConfig,
    PromptTooLongError,
    RewardModel,
    RewardShapeError,
    TextReward,
    TrainResult,
    TrainState,
    train,
)
from jaxrlhf.tuning import Tuning
