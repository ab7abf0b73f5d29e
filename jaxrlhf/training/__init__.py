"""PPO for language models: a `TrainState` pytree and pure step functions under one `jax.jit`.

See docs/training.md. The main entry points are `PPOConfig`, `PPO` (static setup + jitted steps),
`train` (the driver: logging, checkpoints, resume, export) and `train_sweep` (R runs of seeds and
hyper-parameters as one compiled program, see `jaxrlhf.training.sweep` and `grid`).
"""

from jaxrlhf.training.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointIntegrityWarning,
    CheckpointMismatchError,
    prompts_fingerprint,
)
from jaxrlhf.training.config import PPOConfig
from jaxrlhf.training.experience import Experience, PromptBatch, Rollout, make_experience, rollout
from jaxrlhf.training.hparams import HyperParams, SweepSpecError, grid, run_configs
from jaxrlhf.training.ppo import PPO, PromptTooLongError
from jaxrlhf.training.preference import (
    PreferenceConfig,
    PreferenceResult,
    PreferenceState,
    PreferenceTrainer,
    train_preference,
)
from jaxrlhf.training.preference_data import PreferenceData, PreferenceDataError, load_preference_data
from jaxrlhf.training.rewards import (
    NonFiniteError,
    RewardModel,
    RewardShapeError,
    RewardTraceError,
    TextReward,
    postprocess_scores,
)
from jaxrlhf.training.state import FrozenParams, ScoreStats, TrainState, make_optimizer
from jaxrlhf.training.sweep import Sweep, SweepState
from jaxrlhf.training.trainer import PromptDataset, SweepResult, TrainResult, prepare_prompts, train, train_sweep
from jaxrlhf.training.update import make_ppo_update

__all__ = [
    "CheckpointCorruptError",
    "CheckpointIntegrityWarning",
    "prompts_fingerprint",
    "PreferenceConfig",
    "PreferenceData",
    "PreferenceDataError",
    "PreferenceResult",
    "PreferenceState",
    "PreferenceTrainer",
    "load_preference_data",
    "train_preference",
    "HyperParams",
    "Sweep",
    "SweepResult",
    "SweepSpecError",
    "SweepState",
    "grid",
    "run_configs",
    "train_sweep",
    "CheckpointMismatchError",
    "Checkpointer",
    "PromptDataset",
    "TrainResult",
    "prepare_prompts",
    "train",
    "Experience",
    "FrozenParams",
    "NonFiniteError",
    "PPO",
    "PPOConfig",
    "PromptBatch",
    "PromptTooLongError",
    "RewardModel",
    "RewardTraceError",
    "RewardShapeError",
    "Rollout",
    "ScoreStats",
    "TextReward",
    "TrainState",
    "make_experience",
    "make_optimizer",
    "make_ppo_update",
    "postprocess_scores",
    "rollout",
]
