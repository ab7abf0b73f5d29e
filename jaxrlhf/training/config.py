"""`PPOConfig`: every switch of the PPO trainer, with its default and meaning.

A frozen (hashable) dataclass, so it can be a static argument of `jax.jit` and a field of an
experiment's own config (``--ppo.clip_eps 0.1`` on the command line, see `jaxrlhf.config`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from jaxrlhf.config import refuse_unknown_fields
from jaxrlhf.core.losses import LOSS_AGGREGATIONS
from jaxrlhf.core.offpolicy import ROLLOUT_CORRECTIONS
from jaxrlhf.metrics_log import LOGGERS
from jaxrlhf.training import plugins

KL_PLACEMENTS = ("reward", "loss")
SCORE_NORMS = ("batch", "running")  # or None: scores used as they are
LR_SCHEDULES = ("constant", "linear", "cosine")
ROLLOUT_DTYPES = ("bfloat16", "float16", "float32")  # or None: sample with the policy's own dtypes


# The plug-in fields hold registered names (what the command line and JSON files give). In Python
# they also take the plug-in itself (or a plain function), which the config registers and stores by
# name; `plugin_numbers` also takes a dict. The annotations say what is stored.
def registered_advantage_estimators() -> tuple[str, ...]:
    """The names ``advantage_estimator`` accepts (built-ins and registered plug-ins)."""
    return plugins.registered(plugins.AdvantageEstimator)


def registered_policy_losses() -> tuple[str, ...]:
    """The names ``policy_loss`` accepts."""
    return plugins.registered(plugins.PolicyLoss)


def registered_kl_estimators() -> tuple[str, ...]:
    """The names ``kl_estimator`` accepts."""
    return plugins.registered(plugins.KLEstimator)


# Fields that may differ between a checkpoint and the run that resumes from it: they change how
# often things are written, not what a step computes. (`total_steps` joins them when the learning
# rate schedule does not depend on it, i.e. for "constant".)
RESUME_MUTABLE_FIELDS: tuple[str, ...] = ("save_every", "keep_checkpoints", "loggers", "wandb_project")


@refuse_unknown_fields
@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Hyper-parameters of PPO for language models (defaults follow DESIGN.md and TRL)."""

    # --- run length and data ---
    total_steps: int = 1000
    """Number of PPO iterations (rollout + update) of the whole run; also the horizon of the
    learning-rate schedule."""
    batch_size: int = 64
    """Responses per PPO iteration (global, over all devices and hosts): ``batch_size /
    num_generations`` prompts, each sampled ``num_generations`` times."""
    num_generations: int = 1
    """G, responses sampled per prompt. The step takes ``batch_size // G`` prompts and samples each
    G times inside the jit, as consecutive rows (row b belongs to group b // G), every row sampled
    with its own randomness and the prompt prefilled once for its G rows; must divide batch_size.
    Group estimators need G >= 2."""
    minibatch_size: int = 16
    """Rollouts per optimizer update; must divide batch_size."""
    ppo_epochs: int = 4
    """Passes over the batch of rollouts per iteration (each with a fresh minibatch permutation)."""
    max_tokens_per_microbatch: int | None = None
    """Pack the real tokens of whole rows (prompt + response, no padding) into micro-batches of at
    most this many tokens for the experience forwards and the update's gradients
    (`jaxrlhf.training.packed`): the cost follows the real tokens, not ``B * (P + N)``. The
    optimizer step stays one per minibatch (the micro-batch gradients, weighted by their share of
    the loss normalisers, sum to the minibatch's). Must hold one row: >= max_prompt_len +
    max_new_tokens. None = off (every forward over [rows, P + N]); replaces grad_accum_steps."""
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
    top_k: int | None = None
    """Sample among the k most likely tokens (None = no limit)."""
    top_p: float = 1.0
    """Nucleus sampling threshold; 1.0 keeps every token (a number, so it may be swept: it is no
    switch, the identity of the filter)."""
    eos_token_id: int | None = None
    """End-of-sequence token; None takes the policy's `ModelConfig.eos_token_id` (every id of it, if
    it is a tuple); -1 means no EOS (every response runs to max_new_tokens)."""
    pad_token_id: int = 0
    """Token written in padding positions (left of prompts, after EOS)."""
    old_logprobs_from_sampler: bool = False
    """Take the PPO ratio's old log-probs from the sampler (``log softmax(logits / T)`` of each
    sampled token, before top-k/top-p: the temperature-scaled log-probs the loss uses) instead of
    recomputing them with a policy forward in the experience pass, which is then skipped. The first
    minibatch's ratio is then 1 only up to the cached decode's rounding (docs/training.md)."""
    rollout_slots: int | None = None
    """None: the rollout decodes its rows as one static batch (until the longest response ends).
    An int S: the rollout engine (`jaxrlhf.engine`) serves the rollout's rows through S decode
    slots, a slot whose response ends taking the next waiting row: with long-tailed response
    lengths far fewer padded steps, at the decode-cache memory of S rows. The same samples (same
    rows, same random draws; docs/sampling.md). 1 <= S <= batch_size *
    dynamic_sampling_oversample; on a mesh a multiple of the data-parallel devices."""

    # --- episodes (with an environment: `jaxrlhf.episodes`, PPO(environment=...)) ---
    max_turns: int = 1
    """With an environment: the most turns (environment steps) of an episode; the episode also
    ends when the environment says done, at EOS, or when max_new_tokens (the whole episode's
    budget: actions and observations) is spent."""
    max_turn_tokens: int | None = None
    """With an environment: one turn's action budget (a turn also ends at one of the
    environment's stop tokens, or at EOS); None = max_new_tokens."""

    # --- off-policy: the sampler is not the trainer (docs/offpolicy.md) ---
    rollout_correction: str | None = None
    """Correct the policy loss for the sampler not being the trainer: the name of a rollout
    correction of `jaxrlhf.core.ROLLOUT_CORRECTIONS` ("tis", "seq-tis", "icepop", "seq-mask",
    "seq-mask-tis", "geo-rs", "k3-rs", "k3-rs-tis"), computed once per batch from the sampler's
    (behaviour) and the recomputed (old) log-probs: per-token loss weights and, for the rejecting
    ones, a reduced mask of the policy loss. None = off. With the old log-probs from the sampler
    every correction is the identity."""
    rollout_is_cap: float = 2.0
    """C of truncated importance sampling, ``min(w, C)`` (>= 1; "tis", "seq-tis", "k3-rs-tis")."""
    rollout_mask_low: float = 0.5
    """Lower end of the band ``[lo, hi]`` outside which a weight is masked (in [0, 1]; "icepop",
    "seq-mask", "seq-mask-tis")."""
    rollout_mask_high: float = 5.0
    """Upper end of that band (>= 1)."""
    rollout_reject_threshold: float = 0.01
    """Mismatch (K1 / K3 statistic) above which a row is rejected (>= 0; "geo-rs", "k3-rs",
    "k3-rs-tis")."""
    rollout_dtype: str | None = None
    """Sample with a copy of the policy's parameters in this dtype ("bfloat16", "float16",
    "float32") and a model computing in it, cast once per step inside the jitted step (with LoRA:
    the base and the adapters), while the trainer keeps its own (e.g. float32) parameters: the
    low-precision sampler of production systems, whose mismatch the metrics measure and
    rollout_correction corrects. None = the policy's own dtypes."""
    max_staleness: int = 0
    """k >= 0: train on rollouts sampled with parameters k updates old. The state holds a queue of
    k in-flight rollouts: each step samples one with the current parameters, pushes it, and trains
    on the oldest. Step 0 first fills the queue with k batches sampled by the initial parameters,
    so the staleness of the trained batch is min(step, k). 0 = the synchronous trainer."""

    # --- reward ---
    score_clip: float | None = None
    """Clip scores to [-score_clip, score_clip] before use (None = no clipping)."""
    score_norm: str | None = None
    """Score normalisation before it enters the step rewards: None (scores as they are); "batch"
    (whiten over the batch); "running" (divide by the running std of all scores seen, mean kept in
    the state)."""
    score_norm_shift_mean: bool = False
    """With score_norm, also subtract the (batch or running) mean, not just divide by the std."""
    missing_eos_penalty: float | None = None
    """When set, the score of a response that never emitted EOS is replaced by this value."""

    # --- KL penalty ---
    kl_estimator: str = "k1"
    """Per-token KL estimator: "k1" (-d), "k2" (d^2/2), "k3" (e^d - d - 1), "abs" (|d|), with
    d = ref_logprobs - logprobs; or a registered plug-in's name, or the plug-in itself
    (`jaxrlhf.training.plugins`; stored by name)."""
    kl_placement: str = "reward"
    """"reward": -kl_coef * KL is added to each step reward (Ziegler et al., InstructGPT);
    "loss": kl_coef * mean KL(policy || ref) is added to the policy loss (GRPO style)."""
    kl_coef: float = 0.05
    """Initial (or fixed) KL coefficient beta; 0 turns the penalty off."""
    adaptive_kl: bool = False
    """Adapt beta towards target_kl with the controller of Ziegler et al. (2019)."""
    target_kl: float = 6.0
    """Target of the adaptive controller: KL per sequence (sum over response tokens), in nats."""
    kl_horizon: float = 10000.0
    """Adaptive controller horizon, in samples (beta changes by e * batch_size / horizon per step)."""

    # --- advantages ---
    advantage_estimator: str = "gae"
    """"gae" (PPO with a critic, the default), or a critic-free estimator (no value model, no
    value loss): "grpo" (group mean and std), "drgrpo" (group mean), "rloo" (leave-one-out
    mean), "reinforce++" (batch-whitened returns of the KL-penalised rewards),
    "reinforce++-baseline" (the same after subtracting the group mean), "remax" (the greedy
    response's score as baseline; needs greedy_rollout), "opo" (length-weighted group mean),
    "gpg" (GPG's rescaled group mean), "grpo-passk" (the group's best response only); or a
    registered plug-in's name, or the plug-in itself (`jaxrlhf.training.plugins`; stored by
    name). Formulas: `jaxrlhf.training.estimators`, `jaxrlhf.core.groups`."""
    greedy_rollout: bool = False
    """Also decode each prompt greedily (temperature 0) every step and score it with the reward:
    ReMax's baseline (required by advantage_estimator="remax"); its mean is logged as
    greedy_score. Needs a JAX reward (function or reward model)."""
    dynamic_sampling_oversample: int = 1
    """DAPO's dynamic sampling under static shapes (Yu et al. 2025), factor f: each step samples f
    times more prompts (f * batch_size / G, each G times), then trains on the first
    batch_size / G groups whose scores are not all equal (batch order, which is random). When
    fewer have signal, the batch is filled with signal-less groups whose rows are masked out of
    the losses (their advantage is 0 anyway; the losses' normalisers count only the kept rows).
    1 = off. Needs a group estimator; logged: group_signal_fraction (of the sampled groups) and
    kept_group_fraction."""
    overlong_buffer: int | None = None
    """DAPO's soft overlong punishment (Yu et al. 2025): with L_c = overlong_buffer and
    L_max = max_new_tokens, a response of length L > L_max - L_c gets (L_max - L_c - L) / L_c
    added to its raw score (from 0 down to -1). None = off."""
    gamma: float = 1.0
    """Discount factor over response tokens (1.0 for text)."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch's valid tokens (mean 0, std 1). "gae" only: the
    critic-free estimators normalise as their papers do (and Dr. GRPO deliberately does not)."""

    # --- losses ---
    policy_loss: str = "ppo"
    """"ppo" (token-level ratio clip), "gspo" (GSPO's sequence-level ratio, Zheng et al. 2025)
    or "gspo-token" (GSPO-token: the sequence ratio's value, each token's own gradient), "cispo"
    (clipped IS weight, MiniMax-M1), "clip-cov" / "kl-cov" (entropy-preserving, Cui et al. 2025),
    "gmpo" (geometric-mean ratio), "sapo" (smooth gate); or a registered plug-in's name, or the
    plug-in itself (`jaxrlhf.training.plugins`; stored by name). GSPO clips the sequence ratio
    with clip_eps / clip_eps_high (the paper uses 3e-4 / 4e-4). Formulas:
    `jaxrlhf.training.policy_losses`."""
    dual_clip: float | None = None
    """Dual-clip PPO constant c > 1 (Ye et al. 2020): for negative advantages the token loss is
    also capped at -A * c. None = off. "ppo" policy loss only."""
    clip_eps: float = 0.2
    """PPO ratio clip epsilon (lower side, and upper side unless clip_eps_high is set)."""
    clip_eps_high: float | None = None
    """Upper ratio clip epsilon (DAPO's "clip-higher"); None = clip_eps."""
    value_clip_eps: float | None = 0.2
    """Value clip around the rollout values; None disables value clipping."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (loss -= entropy_coef * entropy)."""
    router_aux_loss_coef: float = 0.0
    """A mixture-of-experts policy: weight of its routers' load-balancing loss in the policy loss
    (the checkpoint's own suggestion is `ModelConfig.router_aux_loss_coef`, e.g. 0.001 for
    Qwen3-MoE); 0 = off. The loss is logged as router_aux_loss either way."""
    router_z_loss_coef: float = 0.0
    """A mixture-of-experts policy: weight of the routers' z-loss (mean squared logsumexp of the
    router logits); 0 = off. Logged as router_z_loss."""
    loss_agg: str = "token-mean"
    """Aggregation of per-token policy losses: "token-mean", "seq-mean-token-mean",
    "seq-mean-token-sum", "seq-mean-token-sum-norm" (token sum / max_new_tokens, Dr. GRPO); the
    value loss is always token-mean."""

    plugin_numbers: tuple[tuple[str, float], ...] = ()
    """Values of the numbers the plug-ins above declare (e.g. ``{"clip_cov_ratio": 1e-3}``; on the
    command line ``--plugin_numbers clip_cov_ratio 1e-3``), over their declared defaults. Data in
    the train state like every number: sweepable by name (``grid(clip_cov_ratio=[...])``), no
    recompile. Stored as sorted (name, value) pairs."""

    # --- optimisation ---
    learning_rate: float = 1e-5
    """Peak AdamW learning rate of the policy."""
    critic_learning_rate: float = 1e-5
    """Peak AdamW learning rate of the value model (or value head with a shared trunk)."""
    warmup_steps: int = 0
    """Linear warm-up from 0, counted in optimizer updates."""
    lr_schedule: str = "constant"
    """After warm-up: "constant", "linear" (to 0) or "cosine" (to 0) over all updates of the run."""
    max_grad_norm: float | None = 1.0
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
    loggers: tuple[str, ...] = ("jsonl", "tensorboard")
    """Where each step's metrics go: "jsonl" (``out_dir/metrics.jsonl``), "tensorboard" (event files
    in ``out_dir``), "wandb" (a Weights & Biases run named after ``out_dir``; a sweep's runs are
    grouped under its directory's name; ``pip install "jaxrlhf[wandb]"``; ``WANDB_MODE=offline``
    and the other ``WANDB_*`` variables as wandb documents them). See `jaxrlhf.metrics_log`."""
    wandb_project: str = "jaxrlhf"
    """W&B project of the runs (with "wandb" in loggers)."""

    def __post_init__(self):
        def need(condition, message):
            if not condition:
                raise ValueError(f"PPOConfig: {message}")

        need(self.batch_size > 0 and self.minibatch_size > 0, "batch_size and minibatch_size must be positive")
        need(
            self.batch_size % self.minibatch_size == 0,
            f"minibatch_size ({self.minibatch_size}) must divide batch_size ({self.batch_size})",
        )
        need(
            self.grad_accum_steps > 0 and self.minibatch_size % self.grad_accum_steps == 0,
            f"grad_accum_steps ({self.grad_accum_steps}) must divide minibatch_size ({self.minibatch_size})",
        )
        need(self.ppo_epochs > 0, "ppo_epochs must be positive")
        M = self.max_tokens_per_microbatch
        need(
            M is None or (isinstance(M, int) and M >= self.max_prompt_len + self.max_new_tokens),
            f"max_tokens_per_microbatch must hold one whole row, >= max_prompt_len + max_new_tokens = "
            f"{self.max_prompt_len + self.max_new_tokens}, or be None; got {M!r}",
        )
        need(
            M is None or self.grad_accum_steps == 1,
            "max_tokens_per_microbatch splits each minibatch into packed micro-batches itself: leave "
            f"grad_accum_steps at 1 (got {self.grad_accum_steps})",
        )
        need(self.max_new_tokens > 0 and self.max_prompt_len > 0, "max_new_tokens and max_prompt_len must be positive")
        need(self.temperature > 0, "temperature must be positive")
        need(
            isinstance(self.max_turns, int) and not isinstance(self.max_turns, bool) and self.max_turns >= 1,
            f"max_turns must be an int >= 1, got {self.max_turns!r}",
        )
        need(
            self.max_turn_tokens is None or 1 <= self.max_turn_tokens <= self.max_new_tokens,
            f"max_turn_tokens must be None or in [1, max_new_tokens={self.max_new_tokens}], "
            f"got {self.max_turn_tokens!r}",
        )
        # Plug-ins: given as names, plug-ins or functions; stored as registered names.
        for field, kind in (
            ("advantage_estimator", plugins.AdvantageEstimator),
            ("kl_estimator", plugins.KLEstimator),
            ("policy_loss", plugins.PolicyLoss),
        ):
            value = getattr(self, field)
            if isinstance(value, str) and value not in plugins.registered(kind):
                raise plugins.PluginError(
                    f"PPOConfig: {field} must be one of the registered names {plugins.registered(kind)}, got "
                    f"{value!r}. A plug-in of your own registers when the module defining it is imported; see "
                    f"{plugins.PROTOCOL_DOC}"
                )
            object.__setattr__(self, field, plugins.as_name(kind, value))
        estimator, loss_fn, _ = plugins.plugins_of(self)
        object.__setattr__(self, "plugin_numbers", _normalise_numbers(self.plugin_numbers))
        declared = plugins.declared_numbers(self)
        for name, _ in self.plugin_numbers:
            need(
                name in declared,
                f"plugin_numbers sets {name!r}, which none of advantage_estimator={self.advantage_estimator!r}, "
                f"policy_loss={self.policy_loss!r}, kl_estimator={self.kl_estimator!r} declares (they declare "
                f"{sorted(declared) or 'no numbers'})",
            )
        need(
            self.kl_placement in KL_PLACEMENTS,
            f"kl_placement must be one of {KL_PLACEMENTS}, got {self.kl_placement!r}",
        )
        need(
            self.score_norm is None or self.score_norm in SCORE_NORMS,
            f"score_norm must be None (off) or one of {SCORE_NORMS}, got {self.score_norm!r}",
        )
        need(
            self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 1),
            f"top_k must be None (off) or an int >= 1, got {self.top_k!r}",
        )
        need(self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        need(self.loss_agg in LOSS_AGGREGATIONS, f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {self.loss_agg!r}")
        need(self.kl_coef >= 0, "kl_coef must be >= 0")
        need(
            not self.adaptive_kl or (self.target_kl > 0 and self.kl_horizon > 0),
            "adaptive_kl needs target_kl > 0 and kl_horizon > 0",
        )
        need(self.score_clip is None or self.score_clip > 0, "score_clip must be positive or None")
        need(self.save_every > 0 and self.keep_checkpoints > 0, "save_every and keep_checkpoints must be positive")
        need(not isinstance(self.loggers, str), f"loggers is a tuple of names, got the string {self.loggers!r}")
        object.__setattr__(self, "loggers", tuple(self.loggers))  # hashable, also when given a list
        need(all(name in LOGGERS for name in self.loggers), f"loggers must be among {LOGGERS}, got {self.loggers!r}")
        # --- groups and critic-free estimators ---
        G = self.num_generations
        need(
            isinstance(G, int) and not isinstance(G, bool) and G >= 1, f"num_generations must be an int >= 1, got {G!r}"
        )
        need(
            self.batch_size % G == 0,
            f"batch_size ({self.batch_size}) counts responses and must be a multiple of num_generations "
            f"({G}): each of the batch_size / num_generations prompts is sampled num_generations times",
        )
        need(
            G >= estimator.min_group_size,
            f"advantage_estimator={self.advantage_estimator!r} compares the responses to one prompt, so it needs "
            f"num_generations >= {estimator.min_group_size} (got {G}): a group of one response has no baseline",
        )
        need(
            not estimator.needs_greedy or self.greedy_rollout,
            f"advantage_estimator={self.advantage_estimator!r} uses the greedy response's score as baseline: set "
            "greedy_rollout=True",
        )
        need(
            not self.shared_trunk or self.uses_critic,
            f"shared_trunk puts a value head on the policy, but advantage_estimator={self.advantage_estimator!r} "
            "trains no critic",
        )
        need(
            not estimator.needs_greedy or self.score_norm is None,
            f"advantage_estimator={self.advantage_estimator!r} compares each score with the greedy response's: "
            "score_norm must be None",
        )
        f = self.dynamic_sampling_oversample
        need(
            isinstance(f, int) and not isinstance(f, bool) and f >= 1,
            f"dynamic_sampling_oversample must be an int >= 1, got {f!r}",
        )
        group_estimators = tuple(
            name
            for name in plugins.registered(plugins.AdvantageEstimator)
            if plugins.lookup(plugins.AdvantageEstimator, name).min_group_size >= 2
        )
        need(
            f == 1 or estimator.min_group_size >= 2,
            f"dynamic_sampling_oversample > 1 keeps groups with signal: it needs a group estimator "
            f"{group_estimators}, got {self.advantage_estimator!r}",
        )
        need(self.dual_clip is None or self.dual_clip > 1, f"dual_clip must be > 1 or None, got {self.dual_clip!r}")
        dual_clip_losses = " or ".join(
            f'"{name}"'
            for name in plugins.registered(plugins.PolicyLoss)
            if plugins.lookup(plugins.PolicyLoss, name).supports_dual_clip
        )
        need(
            self.dual_clip is None or loss_fn.supports_dual_clip,
            f"dual_clip applies to policy_loss={dual_clip_losses} only, got policy_loss={self.policy_loss!r}",
        )
        need(
            self.overlong_buffer is None or 0 < self.overlong_buffer <= self.max_new_tokens,
            f"overlong_buffer must be in [1, max_new_tokens={self.max_new_tokens}] or None, "
            f"got {self.overlong_buffer!r}",
        )
        S = self.rollout_slots
        need(
            S is None or (isinstance(S, int) and not isinstance(S, bool) and 1 <= S <= self.rollout_size),
            f"rollout_slots must be None (static batch) or an int in [1, {self.rollout_size}] (the rollout's "
            f"rows: batch_size * dynamic_sampling_oversample), got {S!r}",
        )

        # --- off-policy ---
        need(
            self.rollout_correction is None or self.rollout_correction in ROLLOUT_CORRECTIONS,
            f"rollout_correction must be None (off) or one of {tuple(ROLLOUT_CORRECTIONS)}, got "
            f"{self.rollout_correction!r}",
        )
        need(self.rollout_is_cap >= 1, f"rollout_is_cap must be >= 1, got {self.rollout_is_cap!r}")
        need(
            0 <= self.rollout_mask_low <= 1 <= self.rollout_mask_high,
            f"the band needs 0 <= rollout_mask_low <= 1 <= rollout_mask_high, got "
            f"[{self.rollout_mask_low!r}, {self.rollout_mask_high!r}]",
        )
        need(
            self.rollout_reject_threshold >= 0,
            f"rollout_reject_threshold must be >= 0, got {self.rollout_reject_threshold!r}",
        )
        need(
            self.rollout_dtype is None or self.rollout_dtype in ROLLOUT_DTYPES,
            f"rollout_dtype must be None or one of {ROLLOUT_DTYPES}, got {self.rollout_dtype!r}",
        )
        k = self.max_staleness
        need(
            isinstance(k, int) and not isinstance(k, bool) and k >= 0,
            f"max_staleness must be an int >= 0, got {k!r}",
        )

    @property
    def prompts_per_step(self) -> int:
        """Prompts per iteration: ``batch_size // num_generations`` (each repeated G times), times
        ``dynamic_sampling_oversample``."""
        return self.rollout_size // self.num_generations

    @property
    def rollout_size(self) -> int:
        """Responses sampled per iteration: ``batch_size * dynamic_sampling_oversample``."""
        return self.batch_size * self.dynamic_sampling_oversample

    @property
    def uses_critic(self) -> bool:
        """Whether the trainer has a value model (the estimator declares ``uses_critic``: "gae")."""
        return plugins.lookup(plugins.AdvantageEstimator, self.advantage_estimator).uses_critic

    @property
    def sampler_differs(self) -> bool:
        """Whether the sampler is configured to differ from the trainer (``rollout_dtype`` or
        ``max_staleness > 0``): the experience pass then logs the mismatch metrics."""
        return self.rollout_dtype is not None or self.max_staleness > 0

    @property
    def num_minibatches(self) -> int:
        return self.batch_size // self.minibatch_size

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per PPO iteration."""
        return self.ppo_epochs * self.num_minibatches

    def replace(self, **changes) -> PPOConfig:
        return dataclasses.replace(self, **changes)


def _normalise_numbers(values) -> tuple[tuple[str, float], ...]:
    """``plugin_numbers`` as sorted ``(name, float)`` pairs (hashable), from a mapping or pairs."""
    if isinstance(values, Mapping):
        items = list(values.items())
    else:
        items = [tuple(item) for item in values]
        if any(len(item) != 2 for item in items):
            raise ValueError(f"PPOConfig: plugin_numbers takes a dict of name -> number, got {values!r}")
    for name, value in items:
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise ValueError(f"PPOConfig: plugin_numbers takes a dict of name -> number, got {name!r}: {value!r}")
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"PPOConfig: plugin_numbers names a number twice: {names}")
    return tuple(sorted((name, float(value)) for name, value in items))
