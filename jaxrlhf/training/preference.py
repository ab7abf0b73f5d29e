"""Offline preference optimisation: DPO, conservative DPO, IPO, SimPO and KTO, with one jitted step.

The losses are the pure functions of `jaxrlhf.core.preference` (formulas and papers in their
docstrings, and in docs/preference.md). This module trains a policy on them:

* `PreferenceConfig`: a frozen dataclass; `PreferenceConfig.preset(loss)` gives each loss the
  paper's default ``beta`` (and SimPO's ``gamma``).
* `PreferenceTrainer`: the static setup (model, config, mesh) and its jitted functions, built once:
  the train step, the evaluation step and the reference log-prob pass.
* `train_preference`: the driver: the reference log-probs (computed once before training by
  default), the data order, Orbax checkpoints with exact resume, JSONL / TensorBoard / progress bar
  (`jaxrlhf.metrics_log.MetricsLogger`), held-out evaluation, and `save_pretrained` of the policy.

**One step.** A batch of ``batch_size`` pairs is split into ``grad_accum_steps`` micro-batches of
``M = batch_size / grad_accum_steps`` pairs (``[A, M, ...]`` arrays) and `jax.lax.scan` runs over
them. In each micro-batch the chosen and the rejected responses go through the model in one
forward pass (`concat_pairs`: ``[2M, P + R]`` sequences, prompt left-padded, response
right-padded), and only the response tokens are scored (`sequence_logprobs_from_logits`). The
gradients of the micro-batches are summed with weights (valid pairs of the micro-batch) / (valid
pairs of the batch), and for the RPO term (tokens of the micro-batch's chosen responses) / (of the
batch's), so the accumulated gradient is the gradient of the whole batch's loss. (KTO's reference
point ``z0`` is estimated per micro-batch, as it is per batch without accumulation.)

**Parallelism.** `jax.jit` with `NamedSharding`: the micro-batch axis is split over the mesh's
``"data"`` (and ``"fsdp"``) axes, the parameters replicated (or FSDP-sharded on an ``"fsdp"`` axis),
so XLA inserts the collectives and the core losses run with ``axis_name=None``; 1 and 8 devices
give the same numbers (to float rounding).

**Numbers as data.** ``beta``, ``label_smoothing``, ``simpo_gamma``, ``rpo_alpha`` and the KTO
weights live in ``PreferenceState.hparams``; the learning rate and AdamW's constants in the
optimizer state (`optax.inject_hyperparams`), as in the PPO trainer. Runs that differ only in
those numbers reuse one compiled step.

**Reference log-probs.** ``reference_logprobs="precomputed"`` (default) scores every row under the
reference model once before training and stores ``ref_chosen_logps`` / ``ref_rejected_logps`` with
the data, so the step never holds the reference model (scored in the train step's own batch layout,
so that a policy equal to the reference gives exact ties: `precompute_reference_logps`);
``"on_the_fly"`` runs the reference forward in every step instead (more compute, the same numbers).
SimPO uses no reference.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrlhf.config import refuse_unknown_fields
from jaxrlhf.core import preference as P
from jaxrlhf.core.sequences import concat_prompt_response
from jaxrlhf.models.positions import check_positions
from jaxrlhf.sharding import (
    batch_sharding,
    batch_size_divisor,
    global_array,
    make_mesh,
    opt_state_shardings,
    param_shardings,
    replicated,
    to_host,
)
from jaxrlhf.training.preference_data import PreferenceData, PreferenceDataError, load_preference_data, pairs_to_kto
from jaxrlhf.training.state import injected_adamw, schedule_multiplier

__all__ = [
    "LOSSES",
    "PRESETS",
    "PreferenceConfig",
    "PreferenceState",
    "PreferenceTrainer",
    "PreferenceResult",
    "precompute_reference_logps",
    "train_preference",
]

LOSSES = ("dpo", "cdpo", "ipo", "simpo", "kto")

# The papers' defaults (and TRL's where the paper has none):
#   DPO  (Rafailov et al. 2023): beta = 0.1.
#   cDPO (Mitchell 2023, TRL `label_smoothing`): DPO's beta with label smoothing e = 0.1.
#   IPO  (Azar et al. 2023): the paper sweeps tau; TRL's default beta (= tau) 0.1.
#   SimPO (Meng et al. 2024): beta 2.0 (2.0-2.5 in the paper), gamma / beta = 0.5, so gamma = 1.0.
#   KTO  (Ethayarajh et al. 2024): beta = 0.1, lambda_D = lambda_U = 1.
PRESETS: dict[str, dict[str, Any]] = {
    "dpo": dict(beta=0.1, label_smoothing=0.0),
    "cdpo": dict(beta=0.1, label_smoothing=0.1),
    "ipo": dict(beta=0.1),
    "simpo": dict(beta=2.0, simpo_gamma=1.0),
    "kto": dict(beta=0.1, kto_desirable_weight=1.0, kto_undesirable_weight=1.0),
}

# Numbers that live in the state (loss numbers) or in the optimizer state: they change no program.
LOSS_NUMBERS = ("beta", "label_smoothing", "simpo_gamma", "rpo_alpha", "kto_desirable_weight", "kto_undesirable_weight")
OPTIMIZER_NUMBERS = {
    "learning_rate": "learning_rate",
    "adam_b1": "b1",
    "adam_b2": "b2",
    "adam_eps": "eps",
    "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm",
}
# Fields that may change when a run resumes from its checkpoints.
RESUME_MUTABLE_FIELDS = ("save_every", "keep_checkpoints")


@refuse_unknown_fields
@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """Settings of an offline preference run (see docs/preference.md for each loss's formula)."""

    loss: str = "dpo"
    """One of ``dpo``, ``cdpo`` (DPO with ``label_smoothing > 0``), ``ipo``, ``simpo``, ``kto``."""
    beta: float = 0.1
    """KL strength (DPO/cDPO/KTO), tau (IPO) or the reward scale (SimPO)."""
    label_smoothing: float = 0.0
    """cDPO's label-flip probability e in [0, 0.5); must be 0 for ``dpo`` and > 0 for ``cdpo``."""
    simpo_gamma: float = 1.0
    """SimPO's target reward margin gamma (in reward units)."""
    rpo_alpha: float | None = None
    """Weight of the per-token NLL term on the chosen responses (RPO); None: off (DPO/cDPO only)."""
    kto_desirable_weight: float = 1.0
    """KTO's lambda_D."""
    kto_undesirable_weight: float = 1.0
    """KTO's lambda_U."""
    learning_rate: float = 5e-7
    """Peak AdamW learning rate (DPO paper: 5e-7 for 7B-scale models; tiny models want far more)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many updates (DPO paper: 150)."""
    lr_schedule: str = "constant"
    """After warm-up: ``constant``, ``linear`` or ``cosine`` decay to 0 at ``total_steps``."""
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    """Global gradient-norm clipping; None: off."""
    total_steps: int = 1000
    """Optimizer updates (each one batch)."""
    batch_size: int = 64
    """Pairs (KTO: rows) per update."""
    grad_accum_steps: int = 1
    """Micro-batches per update; ``batch_size`` must be a multiple."""
    max_prompt_len: int = 256
    """P: prompt tokens (left-padded to it); longer prompts are dropped when tokenising."""
    max_response_len: int = 256
    """R: response tokens (right-padded to it); longer responses are truncated when tokenising."""
    eval_batch_size: int | None = None
    """Pairs per evaluation / reference-scoring batch (default: the micro-batch size)."""
    seed: int = 0
    """Data order (and the KTO KL pairing of pair data)."""
    save_every: int = 100
    """Checkpoint every this many updates (and at the end), when there is an output directory."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk."""
    reference_logprobs: str = "precomputed"
    """``precomputed``: score the data under the reference once before training and store it with
    the data (the reference need not stay in memory); ``on_the_fly``: a reference forward per step."""

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"PreferenceConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.reference_logprobs not in ("precomputed", "on_the_fly"):
            raise ValueError(
                f"reference_logprobs must be 'precomputed' or 'on_the_fly', got {self.reference_logprobs!r}"
            )
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr_schedule must be constant, linear or cosine, got {self.lr_schedule!r}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.loss == "dpo" and self.label_smoothing != 0:
            raise ValueError("loss='dpo' takes label_smoothing=0; use loss='cdpo' for conservative DPO")
        if self.loss == "cdpo" and not 0 < self.label_smoothing < 0.5:
            raise ValueError(f"loss='cdpo' needs 0 < label_smoothing < 0.5, got {self.label_smoothing}")
        if self.rpo_alpha is not None and self.loss not in ("dpo", "cdpo"):
            raise ValueError(f"rpo_alpha (the RPO NLL term) goes with dpo/cdpo, not {self.loss!r}")
        for name in (
            "total_steps",
            "batch_size",
            "grad_accum_steps",
            "max_prompt_len",
            "max_response_len",
            "save_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"PreferenceConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of grad_accum_steps ({self.grad_accum_steps})"
            )
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")

    @classmethod
    def preset(cls, loss: str, **overrides) -> PreferenceConfig:
        """The config of ``loss`` with the paper's default numbers (`PRESETS`), then ``overrides``."""
        if loss not in PRESETS:
            raise ValueError(f"no preset for loss {loss!r}; presets: {sorted(PRESETS)}")
        return cls(loss=loss, **{**PRESETS[loss], **overrides})

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum_steps

    @property
    def uses_reference(self) -> bool:
        return self.loss != "simpo"

    @property
    def data_kind(self) -> str:
        return "kto" if self.loss == "kto" else "pairs"

    def structure(self) -> PreferenceConfig:
        """This config with every number that lives in the state set to a placeholder: what the
        compiled programs depend on (an optional number keeps whether it is set)."""
        numbers: dict[str, Any] = {name: 0.0 for name in LOSS_NUMBERS + tuple(OPTIMIZER_NUMBERS)}
        numbers["rpo_alpha"] = None if self.rpo_alpha is None else 0.0
        numbers["max_grad_norm"] = None if self.max_grad_norm is None else 0.0
        if self.loss == "cdpo":
            numbers["loss"] = "dpo"  # the same program, label_smoothing being data
        if self.lr_schedule == "constant" and self.warmup_steps <= self.total_steps:
            numbers["total_steps"] = max(self.warmup_steps, 1)  # the run's length changes nothing then
        return _Structure(**{**dataclasses.asdict(self), **numbers, "seed": 0, "save_every": 1, "keep_checkpoints": 1})


@dataclasses.dataclass(frozen=True)
class _Structure(PreferenceConfig):
    """A `PreferenceConfig` used only as a cache key (its numbers are placeholders, not validated)."""

    def __post_init__(self):
        pass


@flax.struct.dataclass
class PreferenceState:
    """All mutable training state (a pytree; checkpointed as a whole).

    Attributes:
      step: int32 scalar, updates done.
      params: the policy's parameters.
      opt_state: the AdamW state, its numbers in ``opt_state.hyperparams``.
      hparams: the loss numbers of `LOSS_NUMBERS` as float32 scalars (``rpo_alpha`` 0 when off).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    hparams: dict[str, jax.Array]


class PreferenceResult(NamedTuple):
    """What `train_preference` returns."""

    state: PreferenceState
    params: Any  # the final policy parameters (on the host)
    history: list[dict[str, float]]  # the logged rows of this call (steps run here)
    evals: list[dict[str, float]]  # the held-out evaluations of this call, each with its "step"
    data: PreferenceData  # the training data, with the reference log-probs when precomputed
    data_stats: dict[str, int]


# ----------------------------------------------------------------------------------------------
# Optimizer


def learning_rate_multiplier(config: PreferenceConfig) -> optax.Schedule:
    """Warm-up then constant / linear / cosine decay to 0 at the last update; peak 1."""
    return schedule_multiplier(config.total_steps, config.warmup_steps, config.lr_schedule)


def make_optimizer(config: PreferenceConfig) -> optax.GradientTransformation:
    """Clipped AdamW whose numbers live in its state (`optax.inject_hyperparams`)."""
    numbers = {
        name: getattr(config, field) for field, name in OPTIMIZER_NUMBERS.items() if getattr(config, field) is not None
    }
    return injected_adamw(numbers, learning_rate_multiplier(config))


def loss_numbers(config: PreferenceConfig) -> dict[str, jax.Array]:
    return {
        name: jnp.asarray(0.0 if getattr(config, name) is None else getattr(config, name), jnp.float32)
        for name in LOSS_NUMBERS
    }


# ----------------------------------------------------------------------------------------------
# Log-probs and losses


def response_logps(apply_fn, params, batch) -> tuple:
    """Summed response log-probs and lengths of both responses of each row, in one forward pass.

    Returns ``(chosen_logps, chosen_lengths, rejected_logps, rejected_lengths)``, each ``[M]``.
    """

    def sequences(prefix):
        ids, mask = concat_prompt_response(
            batch["prompt_ids"], batch["prompt_mask"], batch[f"{prefix}_ids"], batch[f"{prefix}_mask"]
        )
        response_mask = jnp.concatenate([jnp.zeros_like(batch["prompt_mask"]), batch[f"{prefix}_mask"]], axis=1)
        return {"ids": ids, "mask": mask, "response_mask": response_mask}

    both = P.concat_pairs(sequences("chosen"), sequences("rejected"))  # [2M, P + R]
    logits = apply_fn(params, both["ids"], both["mask"])
    logp_2M, length_2M = P.sequence_logprobs_from_logits(logits, both["ids"], both["response_mask"])
    (chosen_logp, chosen_len), (rejected_logp, rejected_len) = P.split_pairs((logp_2M, length_2M))
    return chosen_logp, chosen_len, rejected_logp, rejected_len


def compute_loss(loss: str, hp, logps, ref_logps, pair_mask, desirable=None, rpo: bool = False):
    """The config's loss on one micro-batch: ``(pref_loss, nll_or_None, stats)`` (means over the
    valid rows of the micro-batch)."""
    chosen, chosen_len, rejected, rejected_len = logps
    ref_chosen, ref_rejected = ref_logps if ref_logps is not None else (None, None)
    if loss in ("dpo", "cdpo"):
        # label_smoothing is 0 for "dpo" (the config checks it), so DPO and cDPO share one program
        value, stats = P.dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=hp["beta"],
            label_smoothing=hp["label_smoothing"],
            pair_mask=pair_mask,
        )
    elif loss == "ipo":
        value, stats = P.ipo_loss(
            chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, beta=hp["beta"], pair_mask=pair_mask
        )
    elif loss == "simpo":
        value, stats = P.simpo_loss(
            chosen, rejected, chosen_len, rejected_len, beta=hp["beta"], gamma=hp["simpo_gamma"], pair_mask=pair_mask
        )
    elif loss == "kto":
        # chosen = the completion, rejected = its KL (mismatched) completion.
        value, stats = P.kto_loss(
            chosen,
            ref_chosen,
            desirable,
            kl_logps=rejected,
            ref_kl_logps=ref_rejected,
            beta=hp["beta"],
            desirable_weight=hp["kto_desirable_weight"],
            undesirable_weight=hp["kto_undesirable_weight"],
            mask=pair_mask,
            kl_mask=pair_mask,
        )
    else:  # pragma: no cover - checked by the config
        raise ValueError(loss)
    nll = P.chosen_nll_loss(chosen, chosen_len, pair_mask) if rpo else None
    return value, nll, stats


def pair_rewards(loss: str, hp, logps, ref_logps):
    """Per-pair implicit rewards ``(r_w, r_l)`` of the loss: ``beta * h`` (DPO, cDPO, KTO), with
    length-averaged ``h`` (IPO), or ``beta * mean logp`` (SimPO, no reference)."""
    chosen, chosen_len, rejected, rejected_len = logps
    if loss == "simpo":
        return (hp["beta"] * chosen / jnp.maximum(chosen_len, 1), hp["beta"] * rejected / jnp.maximum(rejected_len, 1))
    h_w, h_l = chosen - ref_logps[0], rejected - ref_logps[1]
    if loss == "ipo":
        h_w, h_l = h_w / jnp.maximum(chosen_len, 1), h_l / jnp.maximum(rejected_len, 1)
    return hp["beta"] * h_w, hp["beta"] * h_l


# ----------------------------------------------------------------------------------------------
# The trainer: static setup and jitted functions


class PreferenceTrainer:
    """Static setup of a preference run: ``model`` (a `LanguageModel`), ``config``, ``mesh``
    (default: one device).

    Its jitted functions (`train_step`, `eval_step`, `reference_step`) are built once per
    (model, config structure) and shared by every trainer with an equal setup, so runs that differ
    only in numbers (or a resumed run in the same process) do not recompile.
    """

    def __init__(self, model, config: PreferenceConfig, mesh=None):
        self.model, self.config = model, config
        self.mesh = make_mesh(devices=jax.devices()[:1]) if mesh is None else mesh
        divisor = batch_size_divisor(self.mesh)
        if config.micro_batch_size % divisor:
            raise ValueError(
                f"the micro-batch size ({config.batch_size} / {config.grad_accum_steps} = "
                f"{config.micro_batch_size}) must be a multiple of the data-parallel devices "
                f"({divisor})"
            )
        self.eval_batch_size = config.eval_batch_size or config.micro_batch_size
        if self.eval_batch_size % divisor:
            raise ValueError(
                f"eval_batch_size ({self.eval_batch_size}) must be a multiple of the data-parallel devices ({divisor})"
            )
        self.optimizer = make_optimizer(config)
        fns = _jitted(model, config.structure())
        self.train_step, self.eval_step, self.reference_step = fns
        self._replicated = replicated(self.mesh)

    # -- state

    def init_state(self, params) -> PreferenceState:
        # Fresh buffers (a jit output never aliases its inputs): the step donates the state, and
        # the caller's params (often also the reference) must survive it.
        shardings = param_shardings(params, self.mesh)
        params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(params)
        opt_state = self.optimizer.init(params)
        state = PreferenceState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, hparams=loss_numbers(self.config)
        )
        return jax.device_put(state, self.state_shardings(state))

    def state_shardings(self, state: PreferenceState):
        """The state's tree of shardings: the step and the numbers replicated, the parameters and
        optimizer state as `param_shardings` places them."""
        params_sh = param_shardings(state.params, self.mesh)
        opt_sh = opt_state_shardings(self.optimizer, state.opt_state, params_sh, self.mesh)
        every_leaf_replicated = jax.tree.map(lambda _: self._replicated, state)
        return dataclasses.replace(every_leaf_replicated, params=params_sh, opt_state=opt_sh)

    def abstract_state(self, params) -> PreferenceState:
        shapes = jax.eval_shape(
            lambda p: PreferenceState(
                step=jnp.zeros((), jnp.int32),
                params=p,
                opt_state=self.optimizer.init(p),
                hparams=loss_numbers(self.config),
            ),
            params,
        )
        shardings = self.state_shardings(shapes)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

    def place_params(self, params):
        return None if params is None else jax.device_put(params, param_shardings(params, self.mesh))

    # -- batches

    def put_batch(self, host_batch: Mapping[str, np.ndarray], batch_dim: int) -> dict[str, jax.Array]:
        sharding = batch_sharding(self.mesh, batch_dim)
        return {k: global_array(np.asarray(v), sharding) for k, v in host_batch.items()}


def _step_inputs(arrays: Mapping[str, np.ndarray], rows: np.ndarray, kind: str, with_ref: bool, valid=None):
    keys = ["prompt_ids", "prompt_mask", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"]
    if kind == "kto":
        keys.append("desirable")
    if with_ref:
        keys += ["ref_chosen_logps", "ref_rejected_logps"]
    batch = {k: arrays[k][rows] for k in keys}
    batch["pair_mask"] = np.ones(rows.shape, np.float32) if valid is None else valid.astype(np.float32)
    return batch


@functools.lru_cache(maxsize=32)
def _jitted(model, structure: PreferenceConfig):
    """The jitted ``train_step``, ``eval_step`` and ``reference_step`` of a setup."""
    config = structure
    apply_fn = model.apply
    on_the_fly = config.uses_reference and config.reference_logprobs == "on_the_fly"
    rpo = config.rpo_alpha is not None
    kto = config.loss == "kto"
    multiplier = learning_rate_multiplier(config)
    optimizer = make_optimizer(config)

    def references(mb, ref_params):
        if not config.uses_reference:
            return None
        if on_the_fly:
            ref_c, _, ref_r, _ = response_logps(apply_fn, jax.lax.stop_gradient(ref_params), mb)
            return jax.lax.stop_gradient(ref_c), jax.lax.stop_gradient(ref_r)
        return mb["ref_chosen_logps"], mb["ref_rejected_logps"]

    def micro_loss(params, mb, hp, ref_params, pair_weight, token_weight):
        logps = response_logps(apply_fn, params, mb)
        ref = references(mb, ref_params)
        pref, nll, stats = compute_loss(config.loss, hp, logps, ref, mb["pair_mask"], mb.get("desirable"), rpo)
        total = pair_weight * pref
        stats = {k: pair_weight * v for k, v in stats.items()}
        if rpo:
            total = total + token_weight * hp["rpo_alpha"] * nll
            stats["nll_loss"] = token_weight * jax.lax.stop_gradient(nll)
        return total, stats

    def train_step(state: PreferenceState, batch, ref_params):
        pair_mask = batch["pair_mask"]  # [A, M]
        pairs_A = jnp.sum(pair_mask, axis=1)
        pair_weight_A = pairs_A / jnp.maximum(jnp.sum(pairs_A), 1.0)
        tokens_A = jnp.sum(jnp.sum(batch["chosen_mask"], axis=-1) * pair_mask, axis=1)
        token_weight_A = tokens_A / jnp.maximum(jnp.sum(tokens_A), 1.0)
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def body(grads, xs):
            mb, pw, tw = xs
            (loss, stats), g = grad_fn(state.params, mb, state.hparams, ref_params, pw, tw)
            grads = jax.tree.map(lambda a, b: a + b.astype(a.dtype), grads, g)
            return grads, (loss, stats)

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        grads, (losses_A, stats_A) = jax.lax.scan(body, zeros, (batch, pair_weight_A, token_weight_A))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: jnp.sum(v) for k, v in stats_A.items()}
        metrics["loss"] = jnp.sum(losses_A)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = state.opt_state.hyperparams["learning_rate"] * multiplier(state.step)
        new_state = PreferenceState(step=state.step + 1, params=params, opt_state=opt_state, hparams=state.hparams)
        return new_state, metrics

    def eval_step(params, batch, hp, ref_params):
        """Per-pair implicit rewards and the batch's mean loss over its valid rows."""
        logps = response_logps(apply_fn, params, batch)
        ref = references(batch, ref_params)
        if kto:  # held-out pairs scored with KTO's implicit reward beta * h
            r_w, r_l = pair_rewards("dpo", hp, logps, ref)
            return {"chosen_reward": r_w, "rejected_reward": r_l}
        pref, nll, _ = compute_loss(config.loss, hp, logps, ref, batch["pair_mask"], None, rpo)
        r_w, r_l = pair_rewards(config.loss, hp, logps, ref)
        out = {"chosen_reward": r_w, "rejected_reward": r_l, "loss": pref}
        if rpo:
            out["nll_loss"] = nll
        return out

    def reference_step(ref_params, batch):
        """Reference log-probs of a batch in either layout: ``[E]`` rows (held-out data, as
        `eval_step` scores the policy) or ``[A, M]`` (training data, scanned over the micro-batches
        as `train_step` scores the policy)."""
        if batch["pair_mask"].ndim == 1:
            chosen, _, rejected, _ = response_logps(apply_fn, ref_params, batch)
            return chosen, rejected

        def body(carry, mb):
            chosen, _, rejected, _ = response_logps(apply_fn, ref_params, mb)
            return carry, (chosen, rejected)

        return jax.lax.scan(body, None, batch)[1]

    return (jax.jit(train_step, donate_argnums=0), jax.jit(eval_step), jax.jit(reference_step))


# ----------------------------------------------------------------------------------------------
# Data helpers


def _pad_data(data: PreferenceData, max_prompt_len: int, max_response_len: int) -> PreferenceData:
    """Pads the arrays to the config's lengths (prompts on the left, responses on the right)."""
    P_, R_ = data.max_prompt_len, data.max_response_len
    if P_ > max_prompt_len or R_ > max_response_len:
        raise PreferenceDataError(
            f"the data is [prompt {P_}, response {R_}] tokens wide, more than the config's "
            f"max_prompt_len={max_prompt_len}, max_response_len={max_response_len}; "
            "tokenise it with these limits"
        )
    if (P_, R_) == (max_prompt_len, max_response_len):
        return data
    pad = lambda x, left, right: np.pad(x, ((0, 0), (left, right)))  # noqa: E731 - pad id 0, mask 0
    return dataclasses.replace(
        data,
        prompt_ids=pad(data.prompt_ids, max_prompt_len - P_, 0),
        prompt_mask=pad(data.prompt_mask, max_prompt_len - P_, 0),
        chosen_ids=pad(data.chosen_ids, 0, max_response_len - R_),
        chosen_mask=pad(data.chosen_mask, 0, max_response_len - R_),
        rejected_ids=pad(data.rejected_ids, 0, max_response_len - R_),
        rejected_mask=pad(data.rejected_mask, 0, max_response_len - R_),
    )


def sequence_lengths(data: PreferenceData) -> np.ndarray:
    """``[N]`` tokens of each row's longest sequence: prompt + the longer of its two responses."""
    responses = np.maximum(data.chosen_mask.sum(axis=1), data.rejected_mask.sum(axis=1))
    return data.prompt_mask.sum(axis=1) + responses


def _batches_of(n: int, batch_size: int):
    """Row indices of consecutive fixed-size batches covering ``n`` rows, and their validity (the
    last batch is filled with row 0, marked invalid)."""
    for start in range(0, n, batch_size):
        rows = np.arange(start, start + batch_size)
        valid = rows < n
        yield np.where(valid, rows, 0), valid


def precompute_reference_logps(
    trainer: PreferenceTrainer, ref_params, data: PreferenceData, *, for_training: bool = True
) -> PreferenceData:
    """``data`` with ``ref_chosen_logps`` / ``ref_rejected_logps`` scored under ``ref_params``.

    The reference is scored in the layout in which the policy will be scored against it, so that
    both sides run the same computation on the same shapes and shardings: training data
    (``for_training``) in the train step's ``[grad_accum_steps, micro_batch]`` batches, scanned over
    the micro-batches; held-out data in `evaluate`'s batches of ``eval_batch_size``. With the policy
    equal to the reference (step 0), the implicit rewards are then exactly 0 and every pair a tie
    (accuracy 1/2, DPO loss log 2), not rounding noise of either sign, as a reference scored in
    other batch shapes gives (XLA's products and reductions round differently per shape). One
    compile per layout."""
    arrays = data.arrays()
    ref_params = trainer.place_params(ref_params)
    config = trainer.config
    rows_per_call = config.batch_size if for_training else trainer.eval_batch_size
    chosen, rejected = np.zeros(len(data), np.float32), np.zeros(len(data), np.float32)
    for rows, valid in _batches_of(len(data), rows_per_call):
        if for_training:  # [A, M], placed as the train step's batch (micro-batch axis 1 sharded)
            shape = (config.grad_accum_steps, config.micro_batch_size)
            batch = trainer.put_batch(
                _step_inputs(arrays, rows.reshape(shape), "pairs", False, valid.reshape(shape)), 1
            )
        else:
            batch = trainer.put_batch(_step_inputs(arrays, rows, "pairs", False, valid), 0)
        c, r = to_host(trainer.reference_step(ref_params, batch))
        c, r = np.asarray(c).reshape(-1), np.asarray(r).reshape(-1)
        chosen[rows[valid]], rejected[rows[valid]] = c[valid], r[valid]
    return data.with_reference(chosen, rejected)


def batch_rows(n: int, step: int, config: PreferenceConfig) -> np.ndarray:
    """The ``[A, M]`` row indices of update ``step``: epoch ``e = step // (n // B)`` visits the rows
    in the order ``default_rng([seed, e]).permutation(n)`` (a last partial batch is skipped). A
    function of the step alone, so a resumed run sees the same batches."""
    per_epoch = n // config.batch_size
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([config.seed, epoch]).permutation(n)
    rows = order[i * config.batch_size : (i + 1) * config.batch_size]
    return rows.reshape(config.grad_accum_steps, config.micro_batch_size)


def evaluate(trainer: PreferenceTrainer, params, data: PreferenceData, hparams, ref_params=None) -> dict[str, float]:
    """Held-out metrics over all pairs of ``data``: implicit-reward ``accuracy`` (ties count 1/2),
    ``chosen_reward``, ``rejected_reward``, ``reward_margin``, and the loss (not for KTO)."""
    if data.kind != "pairs":
        raise PreferenceDataError("evaluation needs held-out pairs (prompt/chosen/rejected)")
    config = trainer.config
    with_ref = config.uses_reference and config.reference_logprobs == "precomputed"
    if with_ref and not data.has_reference:
        raise PreferenceDataError("evaluation data has no reference log-probs (precompute them first)")
    arrays = data.arrays()
    r_w, r_l, loss_sum, nll_sum, count = [], [], 0.0, 0.0, 0
    for rows, valid in _batches_of(len(data), trainer.eval_batch_size):
        batch = trainer.put_batch(_step_inputs(arrays, rows, "pairs", with_ref, valid), 0)
        out = to_host(trainer.eval_step(params, batch, hparams, ref_params))
        r_w.append(np.asarray(out["chosen_reward"])[valid])
        r_l.append(np.asarray(out["rejected_reward"])[valid])
        if "loss" in out:
            loss_sum += float(out["loss"]) * valid.sum()
        if "nll_loss" in out:
            nll_sum += float(out["nll_loss"]) * valid.sum()
        count += int(valid.sum())
    r_w, r_l = np.concatenate(r_w), np.concatenate(r_l)
    margin = r_w - r_l
    result = {
        "accuracy": float(np.mean(np.where(margin > 0, 1.0, np.where(margin == 0, 0.5, 0.0)))),
        "chosen_reward": float(np.mean(r_w)),
        "rejected_reward": float(np.mean(r_l)),
        "reward_margin": float(np.mean(margin)),
        "pairs": count,
    }
    if config.loss != "kto":
        result["loss"] = loss_sum / count
    if config.rpo_alpha is not None:
        result["nll_loss"] = nll_sum / count
    return result


# ----------------------------------------------------------------------------------------------
# Checkpoints

FORMAT_VERSION = 1


def _checkpoint_metadata(config: PreferenceConfig, model_config) -> dict:
    return json.loads(
        json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "preference_config": dataclasses.asdict(config),
                "policy_config": dataclasses.asdict(model_config),
            },
            default=str,
        )
    )


class PreferenceCheckpointer:
    """Orbax `CheckpointManager` of a `PreferenceState` (items ``state`` and JSON ``meta``); a
    checkpoint from a different config or model raises `CheckpointMismatchError` on restore."""

    def __init__(self, directory, trainer: PreferenceTrainer, async_save: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        self.trainer = trainer
        self.metadata = _checkpoint_metadata(trainer.config, trainer.model.config)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=trainer.config.save_every,
            max_to_keep=trainer.config.keep_checkpoints,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._saved = set(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_compatible(self, step: int) -> None:
        from jaxrlhf.training.checkpoint import CheckpointMismatchError

        ocp = self._ocp
        saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        problems = []
        if saved.get("format_version") != self.metadata["format_version"]:
            problems.append(f"format_version: {saved.get('format_version')} vs {self.metadata['format_version']}")
        for key in ("preference_config", "policy_config"):
            old, new = saved.get(key, {}), self.metadata[key]
            for name in sorted(set(old) | set(new)):
                if key == "preference_config" and name in RESUME_MUTABLE_FIELDS:
                    continue
                if old.get(name, "<missing>") != new.get(name, "<missing>"):
                    problems.append(
                        f"{key}.{name}: checkpoint {old.get(name, '<missing>')!r}, now {new.get(name, '<missing>')!r}"
                    )
        if problems:
            raise CheckpointMismatchError(
                f"cannot resume from {self.directory} (step {step}): it was written with a different "
                "configuration:\n  "
                + "\n  ".join(problems)
                + "\nUse a new output directory, or restore the original configuration."
            )

    def save(self, state: PreferenceState, force: bool = False) -> bool:
        ocp = self._ocp
        step = int(state.step)
        if step in self._saved:
            return False
        started = self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(self.metadata)),
            force=force,
        )
        if started:
            self._saved.add(step)
        return started

    def restore(self, params_like, step: int | None = None) -> PreferenceState:
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        self.check_compatible(step)
        target = self.trainer.abstract_state(params_like)
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ----------------------------------------------------------------------------------------------
# The driver

PROGRESS_KEYS = ("loss", "accuracy", "eval/accuracy")


def _unpack_model(model_and_params):
    from jaxrlhf.models.lm import Pretrained

    if isinstance(model_and_params, Pretrained):
        return model_and_params.model, model_and_params.params, model_and_params.tokenizer
    if isinstance(model_and_params, (tuple, list)) and len(model_and_params) in (2, 3):
        model, params, *rest = model_and_params
        return model, params, (rest[0] if rest else None)
    raise TypeError("model_and_params must be a Pretrained or a (model, params[, tokenizer]) tuple")


def _prepare(data, config: PreferenceConfig, tokenizer, kind: str) -> PreferenceData:
    if isinstance(data, (str, os.PathLike)) or isinstance(data, list) or hasattr(data, "column_names"):
        if tokenizer is None:
            raise ValueError("text preference data needs a tokenizer (pass Pretrained or (model, params, tokenizer))")
        if isinstance(data, (str, os.PathLike)):
            data = load_preference_data(data, tokenizer, config.max_prompt_len, config.max_response_len, kind=kind)
        else:
            from jaxrlhf.training.preference_data import load_rows, tokenize_kto, tokenize_pairs

            fn = tokenize_kto if kind == "kto" else tokenize_pairs
            data = fn(load_rows(data), tokenizer, config.max_prompt_len, config.max_response_len)
    if not isinstance(data, PreferenceData):
        raise TypeError(f"data must be PreferenceData, a path, rows or a datasets.Dataset, got {type(data).__name__}")
    if kind == "kto" and data.kind == "pairs":
        data = pairs_to_kto(data, kl_seed=config.seed)
    if data.kind != kind:
        raise PreferenceDataError(f"loss {config.loss!r} needs {kind} data, got {data.kind} data")
    return _pad_data(data, config.max_prompt_len, config.max_response_len)


def train_preference(
    model_and_params,
    data,
    config: PreferenceConfig,
    out_dir: str | None = None,
    *,
    eval_data=None,
    eval_every: int = 0,
    ref_params=None,
    tokenizer=None,
    mesh=None,
    resume: bool = True,
    log_every: int = 1,
    progress: bool = True,
    tensorboard: bool = True,
    export: bool = True,
    on_step: Callable[[int, PreferenceState, dict[str, float]], None] | None = None,
    evaluate_fn: Callable[[int, PreferenceState], Mapping[str, Any]] | None = None,
) -> PreferenceResult:
    """Trains the policy on preference data for ``config.total_steps`` updates.

    Args:
      model_and_params: a `Pretrained` (model, params, tokenizer) or ``(model, params)`` /
        ``(model, params, tokenizer)``; the params are the starting policy (the SFT model).
      data: `PreferenceData`, or a JSONL / Parquet path, a list of row dicts or a
        ``datasets.Dataset`` (tokenised with the tokenizer; see `jaxrlhf.training.preference_data`).
        Pair data given to ``loss="kto"`` becomes KTO rows (chosen desirable, rejected undesirable).
      config: the `PreferenceConfig`.
      out_dir: run directory for ``metrics.jsonl``, TensorBoard events, ``checkpoints/`` and the
        exported ``policy/``; None: no files (and no resume).
      eval_data: held-out pairs (same forms as ``data``); evaluated every ``eval_every`` updates and
        after the last, logged under ``eval/``.
      ref_params: the reference model's parameters (default: the starting params).
      tokenizer: overrides the tokenizer of ``model_and_params`` (used for text data and the export).
      mesh: a mesh with a ``"data"`` (and optionally ``"fsdp"``) axis, e.g.
        `jaxrlhf.sharding.make_mesh()` for all devices; default: one device (as `train`).
      resume: continue from the latest checkpoint in ``out_dir/checkpoints`` if there is one.
      log_every: log the training metrics every this many updates (and the last).
      on_step: ``on_step(step, state, metrics)`` after each update (and its checkpoint save).
      evaluate_fn: optional ``evaluate_fn(step, state) -> {name: scalar}`` (e.g. sampling and a true
        score), called on the ``eval_every`` schedule (and after the last update) and logged as
        ``eval/<name>`` beside the held-out pair metrics.

    Returns:
      A `PreferenceResult`.
    """
    model, params, model_tokenizer = _unpack_model(model_and_params)
    tokenizer = model_tokenizer if tokenizer is None else tokenizer
    data = _prepare(data, config, tokenizer, config.data_kind)
    if eval_data is not None:
        eval_data = _prepare(eval_data, config, tokenizer, "pairs")
    if len(data) < config.batch_size:
        raise PreferenceDataError(f"{len(data)} rows are fewer than one batch (batch_size={config.batch_size})")
    for what, rows in (("pair", data), ("held-out pair", eval_data)):
        if rows is not None:  # prompt + the longer response of each row, within a learned position table
            check_positions(model, lengths=sequence_lengths(rows), where="train_preference", what=what)
    trainer = PreferenceTrainer(model, config, mesh)
    ref_params = params if ref_params is None else ref_params

    step_ref = None
    if config.uses_reference and config.reference_logprobs == "precomputed":
        if not data.has_reference:
            data = precompute_reference_logps(trainer, ref_params, data)
        if eval_data is not None and not eval_data.has_reference:
            eval_data = precompute_reference_logps(trainer, ref_params, eval_data, for_training=False)
    elif config.uses_reference:
        step_ref = trainer.place_params(ref_params)
    with_ref = config.uses_reference and config.reference_logprobs == "precomputed"

    state = trainer.init_state(params)
    checkpointer = logger = None
    start = 0
    history: list[dict[str, float]] = []
    evals: list[dict[str, float]] = []
    arrays = data.arrays()
    try:
        if out_dir is not None:
            from jaxrlhf.metrics_log import MetricsLogger

            checkpointer = PreferenceCheckpointer(os.path.join(out_dir, "checkpoints"), trainer)
            if resume and checkpointer.latest_step() is not None:
                state = checkpointer.restore(params)
                start = int(state.step)
            logger = MetricsLogger(
                out_dir,
                total_steps=config.total_steps,
                progress_keys=PROGRESS_KEYS,
                resume_step=start - 1,
                tensorboard=tensorboard,
                progress=progress,
            )
        for step in range(start, config.total_steps):
            rows = batch_rows(len(data), step, config)
            batch = trainer.put_batch(_step_inputs(arrays, rows, data.kind, with_ref), 1)
            state, metrics = trainer.train_step(state, batch, step_ref)
            last = step == config.total_steps - 1
            record: dict[str, Any] = {}
            if step % log_every == 0 or last:
                record.update({k: float(v) for k, v in jax.device_get(metrics).items()})
                if not all(math.isfinite(v) for v in record.values()):
                    bad = sorted(k for k, v in record.items() if not math.isfinite(v))
                    raise FloatingPointError(f"non-finite metrics at step {step}: {bad}")
            if (eval_data is not None or evaluate_fn is not None) and (
                (eval_every and (step + 1) % eval_every == 0) or last
            ):
                result = {}
                if eval_data is not None:
                    result.update(evaluate(trainer, state.params, eval_data, state.hparams, step_ref))
                if evaluate_fn is not None:
                    result.update({k: float(v) for k, v in evaluate_fn(step, state).items()})
                evals.append({"step": step, **result})
                record["eval"] = result
            if record:
                history.append({"step": step, **_flat(record)})
                if logger is not None:
                    logger.log(step, record)
            if checkpointer is not None:
                checkpointer.save(state, force=last)
            if on_step is not None:
                on_step(step, state, record)
        final_params = to_host(state.params)
        if out_dir is not None and export:
            from jaxrlhf.models.hf_io import save_pretrained

            save_pretrained(os.path.join(out_dir, "policy"), model, final_params, tokenizer)
    finally:
        if checkpointer is not None:
            checkpointer.close()
        if logger is not None:
            logger.close()
    return PreferenceResult(state, final_params, history, evals, data, dict(data.stats))


def _flat(record):
    from jaxrlhf.metrics_log import flatten_metrics

    return flatten_metrics(record)
