"""Hyper-parameters as data: the numbers of a `PPOConfig` that change no shape live in the state.

A `PPOConfig` mixes two kinds of field:

- **structure** (batch sizes, lengths, epochs, minibatches, the KL estimator, booleans, schedules'
  lengths, whether an optional term is on at all): it decides the shapes and the program, so it is
  static and part of what `jax.jit` compiles;
- **numbers** (learning rates, the KL coefficient and the adaptive controller's target/horizon,
  clip ranges, the dual-clip constant, the value/entropy coefficients, gamma, lambda, temperature,
  top-p, score clipping, the missing-EOS penalty, DAPO's overlong buffer, the rollout
  correction's cap, band and rejection threshold, AdamW's constants):
  they are float32 scalars in the `TrainState`, so a run with other numbers reuses the compiled
  step, and a sweep stacks them on a run axis.

Where each number lives in the state:

    learning_rate, critic_learning_rate,        policy_opt_state / value_opt_state .hyperparams
    adam_b1, adam_b2, adam_eps, weight_decay,     (optax.inject_hyperparams: the optimizer reads
    max_grad_norm                                  them from its own state at every update)
    kl_coef                                      kl_ctl.kl_coef (its initial value)
    everything else in `HyperParams`             state.hparams

``seed`` is no hyper-parameter but a sweep axis too: it picks the run's PRNG key (in the state)
and its prompt order.

An optional number given as None (``value_clip_eps=None``: no value clipping) is structure: the
term is not computed. Likewise ``entropy_coef == 0`` skips the entropy computation (a sweep that
mixes 0 and non-zero values computes it for all runs, which changes nothing for the zero ones).
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxrlhf.config import renamed_field_message
from jaxrlhf.training import plugins
from jaxrlhf.training.config import PPOConfig


@flax.struct.dataclass
class HyperParams:
    """The numbers the PPO step reads from the state (float32 scalars; ``[R]`` in a sweep).

    Optional config values that are None are stored as 0 and never read (their term is off).
    """

    temperature: jax.Array
    top_p: jax.Array
    target_kl: jax.Array
    kl_horizon: jax.Array
    gamma: jax.Array
    gae_lambda: jax.Array
    clip_eps: jax.Array
    clip_eps_high: jax.Array  # = clip_eps when the config's clip_eps_high is None
    value_clip_eps: jax.Array
    vf_coef: jax.Array
    entropy_coef: jax.Array
    score_clip: jax.Array
    missing_eos_penalty: jax.Array
    dual_clip: jax.Array
    overlong_buffer: jax.Array
    router_aux_loss_coef: jax.Array
    router_z_loss_coef: jax.Array
    # The rollout correction's numbers (`jaxrlhf.core.apply_rollout_correction`), read when
    # config.rollout_correction is set.
    rollout_is_cap: jax.Array
    rollout_mask_low: jax.Array
    rollout_mask_high: jax.Array
    rollout_reject_threshold: jax.Array
    # The numbers the config's plug-ins declare (`jaxrlhf.training.plugins`), by name; {} if none.
    plugin: dict[str, jax.Array] = flax.struct.field(default_factory=dict)

    @classmethod
    def from_config(cls, config: PPOConfig) -> HyperParams:
        values = {name: getattr(config, name) for name in HPARAM_FIELDS}
        if values["clip_eps_high"] is None:
            values["clip_eps_high"] = config.clip_eps
        builtin = {name: jnp.asarray(0.0 if v is None else v, jnp.float32) for name, v in values.items()}
        plugin = {name: jnp.asarray(v, jnp.float32) for name, v in plugins.plugin_number_values(config).items()}
        return cls(**builtin, plugin=plugin)


HPARAM_FIELDS = tuple(f.name for f in dataclasses.fields(HyperParams) if f.name != "plugin")

# PPOConfig field -> the name of the optimizer hyper-parameter (in both optimizers' states,
# except the two learning rates, each in its own).
OPTIMIZER_FIELDS = {
    "adam_b1": "b1",
    "adam_b2": "b2",
    "adam_eps": "eps",
    "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm",
}
LEARNING_RATE_FIELDS = {"policy": "learning_rate", "value": "critic_learning_rate"}

# Every PPOConfig field that is data (changes no shape), and the sweep axes (those plus the seed).
NUMERIC_FIELDS = HPARAM_FIELDS + tuple(OPTIMIZER_FIELDS) + tuple(LEARNING_RATE_FIELDS.values()) + ("kl_coef",)
SWEEPABLE_FIELDS = NUMERIC_FIELDS + ("seed",)
# Numbers whose None switches a term off (structure) rather than taking a value.
OPTIONAL_NUMERIC_FIELDS = (
    "clip_eps_high",
    "value_clip_eps",
    "score_clip",
    "missing_eos_penalty",
    "max_grad_norm",
    "dual_clip",
    "overlong_buffer",
)


def optimizer_numbers(config: PPOConfig, which: str) -> dict[str, float]:
    """The injected hyper-parameters of the ``"policy"`` or ``"value"`` optimizer, from ``config``."""
    numbers_ = {"learning_rate": getattr(config, LEARNING_RATE_FIELDS[which])}
    for field, name in OPTIMIZER_FIELDS.items():
        value = getattr(config, field)
        if value is not None:
            numbers_[name] = value
    return numbers_


def initial_numbers(config: PPOConfig) -> dict[str, Any]:
    """Every number of ``config`` that the state holds, as a pytree of float32 scalars (what a
    sweep stacks on its run axis): ``hparams``, both optimizers' injected numbers, ``kl_coef``."""
    as_array = lambda tree: jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), tree)  # noqa: E731
    return {
        "hparams": HyperParams.from_config(config),
        "policy_optimizer": as_array(optimizer_numbers(config, "policy")),
        "value_optimizer": as_array(optimizer_numbers(config, "value")),
        "kl_coef": jnp.asarray(config.kl_coef, jnp.float32),
    }


def uses_entropy(config: PPOConfig) -> bool:
    """Structure: whether the update computes the entropy term (``entropy_coef != 0``)."""
    return config.entropy_coef != 0


def structure(config: PPOConfig) -> dict[str, Any]:
    """What of ``config`` the compiled program depends on: every non-numeric field, and for each
    optional number whether it is set (plus whether top-p filtering is on at all)."""
    numeric = SWEEPABLE_FIELDS + ("plugin_numbers",)
    static = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in numeric}
    for name in OPTIONAL_NUMERIC_FIELDS:
        if name != "clip_eps_high":  # None means "= clip_eps": a value, not a switch
            static[f"{name} is None"] = getattr(config, name) is None
    static["top_p < 1"] = config.top_p < 1.0
    return static


def structure_differences(a: PPOConfig, b: PPOConfig) -> list[str]:
    sa, sb = structure(a), structure(b)
    return [f"{name}: {sa[name]!r} vs {sb[name]!r}" for name in sa if sa[name] != sb[name]]


# ----------------------------------------------------------------------------------------------
# Sweeps: per-run overrides of the numeric fields, checked before anything is compiled.


class SweepSpecError(ValueError):
    """A sweep names an unknown or static field, or gives a value of the wrong type."""


def grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    """The Cartesian product of per-field value lists, as a list of per-run overrides.

    ``grid(seed=[0, 1], kl_coef=[0.0, 0.1])`` ->
    ``[{seed: 0, kl_coef: 0.0}, {seed: 0, kl_coef: 0.1}, {seed: 1, ...}, ...]``
    (the first axis varies slowest).
    """
    for name, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise SweepSpecError(f"grid axis {name!r} must be a list of values, got {values!r}")
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(list(axes[n]) for n in names))]


def _check_value(name: str, value: Any) -> None:
    if name == "seed":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise SweepSpecError(f"sweep field 'seed' takes integers, got {value!r} ({type(value).__name__})")
        return
    if value is None and name in OPTIONAL_NUMERIC_FIELDS:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SweepSpecError(f"sweep field {name!r} takes numbers, got {value!r} ({type(value).__name__})")


def run_configs(base: PPOConfig, runs: Sequence[Mapping[str, Any]]) -> list[PPOConfig]:
    """One `PPOConfig` per run: ``base`` with the run's overrides, all of one structure.

    Raises `SweepSpecError` (naming the field) for an unknown field, a static field, a value of the
    wrong type, or overrides that change the program's structure (e.g. a None among numbers);
    `PPOConfig`'s own checks (``temperature > 0`` ...) run on every run's config.
    """
    if isinstance(runs, Mapping) or not isinstance(runs, Sequence) or not runs:
        raise SweepSpecError("runs must be a non-empty list of per-run overrides (dicts); see grid()")
    known = {f.name for f in dataclasses.fields(PPOConfig)}
    declared = plugins.declared_numbers(base)
    configs = []
    for index, overrides in enumerate(runs):
        if not isinstance(overrides, Mapping):
            raise SweepSpecError(f"run {index}: overrides must be a dict of PPOConfig fields, got {overrides!r}")
        fields, numbers_ = {}, dict(base.plugin_numbers)
        for name, value in overrides.items():
            if name in declared and name not in known:  # a plug-in's number: data like the built-in ones
                _check_value(name, value)
                numbers_[name] = value
                continue
            if name not in known:
                renamed = renamed_field_message(name, known)
                raise SweepSpecError(
                    f"run {index}: {renamed}"
                    if renamed
                    else f"run {index}: unknown PPOConfig field {name!r} (nor a number that the config's plug-ins "
                    f"declare: {sorted(declared) or 'none'})"
                )
            if name not in SWEEPABLE_FIELDS:
                raise SweepSpecError(
                    f"run {index}: {name!r} is a static field (it changes shapes or the program), so it "
                    f"cannot differ between the runs of one sweep; sweepable fields: "
                    f"{', '.join(SWEEPABLE_FIELDS + tuple(sorted(declared)))}"
                )
            _check_value(name, value)
            fields[name] = value
        if numbers_ != dict(base.plugin_numbers):
            fields["plugin_numbers"] = numbers_
        try:
            config = base.replace(**fields)
        except ValueError as error:
            raise SweepSpecError(f"run {index} ({dict(overrides)}): {error}") from None
        problems = structure_differences(base, config)
        if problems:
            raise SweepSpecError(
                f"run {index} ({dict(overrides)}) changes the program's structure: " + "; ".join(problems)
            )
        configs.append(config)
    return configs


def build_config(configs: Sequence[PPOConfig]) -> PPOConfig:
    """The config a sweep's trainer is built from: the first run's, with the entropy term on if any
    run uses it (a zero coefficient then multiplies a computed term: the same loss and gradient)."""
    first = configs[0]
    for config in configs:
        if uses_entropy(config):
            return first.replace(entropy_coef=config.entropy_coef)
    return first
