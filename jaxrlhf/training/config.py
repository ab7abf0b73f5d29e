"""`PPOConfig`: every switch of the PPO trainer, with its default and meaning.

A frozen (hashable) dataclass, so it can be a static argument of `jax.jit` and a field of an
experiment's own config (``--ppo.cliprange 0.1`` on the command line, see `jaxrlhf.config`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from jaxrlhf.core.kl import KL_KINDS
from jaxrlhf.core.losses import LOSS_AGGREGATIONS

KL_PLACEMENTS = ("reward", "loss")
SCORE_NORMS = ("none", "batch", "running")
LR_SCHEDULES = ("constant", "linear", "cosine")

# Fields that may differ between a checkpoint and the run that resumes from it: they change how
# often things are written, not what a step computes. (`total_steps` joins them when the learning
# rate schedule does not depend on it, i.e. for "constant".)
RESUME_MUTABLE_FIELDS = ("save_every", "keep_checkpoints")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Hyper-parameters of PPO for language models (defaults follow DESIGN.md and TRL)."""

    # --- run length and data ---
    total_steps: int = 1000
    """Number of PPO iterations (rollout + update) of the whole run; also the horizon of the
    learning-rate schedule."""
    batch_size: int = 64
    """Prompts per PPO iteration (global, over all devices and hosts)."""
    minibatch_size: int = 16
    """Rollouts per optimizer update; must divide batch_size."""
    ppo_epochs: int = 4
    """Passes over the batch of rollouts per iteration (each with a fresh minibatch permutation)."""
    grad_accum_steps: int = 1
    """Micro-batches per minibatch whose gradients are summed before one optimizer update (same
    update as one big minibatch, less activation memory); must divide minibatch_size."""
    max_prompt_len: int = 64
    """Prompts are left-padded to this many tokens; a longer prompt is an error, not truncated."""
    seed: int = 0
    """Seed of the run's PRNG key (sampling, minibatch order) and of the prompt order."""

    # --- sampling ---
    max_new_tokens: int = 32
    """Response length budget; responses stop earlier at EOS."""
    temperature: float = 1.0
    """Sampling temperature; log-probs for the losses use the same temperature."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = no limit)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    eos_token_id: Optional[int] = None
    """End-of-sequence token; None takes the policy's `ModelConfig.eos_token_id` (first one if it is
    a tuple); -1 means no EOS (every response runs to max_new_tokens)."""
    pad_token_id: int = 0
    """Token written in padding positions (left of prompts, after EOS)."""

    # --- reward ---
    score_clip: Optional[float] = None
    """Clip scores to [-score_clip, score_clip] before use (None = no clipping)."""
    score_norm: str = "none"
    """Score normalisation before it enters the step rewards: "none"; "batch" (whiten over the
    batch); "running" (divide by the running std of all scores seen, mean kept in the state)."""
    score_norm_shift_mean: bool = False
    """With score_norm, also subtract the (batch or running) mean, not just divide by the std."""
    missing_eos_penalty: Optional[float] = None
    """When set, the score of a response that never emitted EOS is replaced by this value."""

    # --- KL penalty ---
    kl_estimator: str = "k1"
    """Per-token KL estimator: "k1" (-d), "k2" (d^2/2), "k3" (e^d - d - 1), "abs" (|d|), with
    d = ref_logprobs - logprobs."""
    kl_placement: str = "reward"
    """"reward": -kl_coef * KL is added to each step reward (Ziegler et al., InstructGPT);
    "loss": kl_coef * mean KL(policy || ref) is added to the policy loss (GRPO style)."""
    init_kl_coef: float = 0.05
    """Initial (or fixed) KL coefficient beta; 0 turns the penalty off."""
    adaptive_kl: bool = False
    """Adapt beta towards target_kl with the controller of Ziegler et al. (2019)."""
    target_kl: float = 6.0
    """Target of the adaptive controller: KL per sequence (sum over response tokens), in nats."""
    kl_horizon: float = 10000.0
    """Adaptive controller horizon, in samples (beta changes by e * batch_size / horizon per step)."""

    # --- advantages ---
    gamma: float = 1.0
    """Discount factor over response tokens (1.0 for text)."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch's valid tokens (mean 0, std 1)."""

    # --- losses ---
    cliprange: float = 0.2
    """PPO ratio clip epsilon (lower side, and upper side unless cliprange_high is set)."""
    cliprange_high: Optional[float] = None
    """Upper ratio clip epsilon (DAPO's "clip-higher"); None = cliprange."""
    cliprange_value: Optional[float] = 0.2
    """Value clip around the rollout values; None disables value clipping."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (loss -= entropy_coef * entropy)."""
    loss_agg: str = "token-mean"
    """Aggregation of per-token policy losses: "token-mean", "seq-mean-token-mean",
    "seq-mean-token-sum" (the value loss is always token-mean)."""

    # --- optimisation ---
    learning_rate: float = 1e-5
    """Peak AdamW learning rate of the policy."""
    critic_learning_rate: float = 1e-5
    """Peak AdamW learning rate of the value model (or value head with a shared trunk)."""
    warmup_steps: int = 0
    """Linear warm-up from 0, counted in optimizer updates."""
    lr_schedule: str = "constant"
    """After warm-up: "constant", "linear" (to 0) or "cosine" (to 0) over all updates of the run."""
    max_grad_norm: Optional[float] = 1.0
    """Clip each model's gradient to this global norm (None = no clipping)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_b1: float = 0.9
    """AdamW beta1."""
    adam_b2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    shared_trunk: bool = False
    """Value head on the policy's own trunk (one forward, the value loss also trains the trunk)
    instead of a separate critic model."""

    # --- checkpoints and logging (driver) ---
    save_every: int = 100
    """Write a checkpoint every this many PPO iterations (and at the end)."""
    keep_checkpoints: int = 3
    """How many recent checkpoints to keep."""

    def __post_init__(self):
        def need(condition, message):
            if not condition:
                raise ValueError(f"PPOConfig: {message}")

        need(self.batch_size > 0 and self.minibatch_size > 0, "batch_size and minibatch_size must be positive")
        need(self.batch_size % self.minibatch_size == 0,
             f"minibatch_size ({self.minibatch_size}) must divide batch_size ({self.batch_size})")
        need(self.grad_accum_steps > 0 and self.minibatch_size % self.grad_accum_steps == 0,
             f"grad_accum_steps ({self.grad_accum_steps}) must divide minibatch_size ({self.minibatch_size})")
        need(self.ppo_epochs > 0, "ppo_epochs must be positive")
        need(self.max_new_tokens > 0 and self.max_prompt_len > 0, "max_new_tokens and max_prompt_len must be positive")
        need(self.temperature > 0, "temperature must be positive")
        need(self.kl_estimator in KL_KINDS, f"kl_estimator must be one of {KL_KINDS}, got {self.kl_estimator!r}")
        need(self.kl_placement in KL_PLACEMENTS, f"kl_placement must be one of {KL_PLACEMENTS}, got {self.kl_placement!r}")
        need(self.score_norm in SCORE_NORMS, f"score_norm must be one of {SCORE_NORMS}, got {self.score_norm!r}")
        need(self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        need(self.loss_agg in LOSS_AGGREGATIONS, f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {self.loss_agg!r}")
        need(self.init_kl_coef >= 0, "init_kl_coef must be >= 0")
        need(not self.adaptive_kl or (self.target_kl > 0 and self.kl_horizon > 0),
             "adaptive_kl needs target_kl > 0 and kl_horizon > 0")
        need(self.score_clip is None or self.score_clip > 0, "score_clip must be positive or None")
        need(self.save_every > 0 and self.keep_checkpoints > 0, "save_every and keep_checkpoints must be positive")

    @property
    def num_minibatches(self) -> int:
        return self.batch_size // self.minibatch_size

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per PPO iteration."""
        return self.ppo_epochs * self.num_minibatches

    def replace(self, **changes) -> "PPOConfig":
        return dataclasses.replace(self, **changes)
