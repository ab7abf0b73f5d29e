"""Algorithms as plug-ins: advantage estimators, policy losses and KL estimators.

The trainer computes three algorithm-specific things, and each is a pure function that a user can
write in their own file and select by name or by passing it in the config:

    kind                 called in            inputs (a frozen dataclass)     returns
    advantage estimator  the experience pass  `AdvantageInputs`              `Advantages`
    policy loss          every (micro-)batch   `PolicyLossInputs`             ``(loss, stats)``
    KL estimator         both (reward / loss)  `KLInputs`                     per-token KL ``[B, N]``

A plug-in is declared with a decorator that names it and its numeric settings::

    @advantage_estimator("my_baseline", numbers={"tau": 1.0}, min_group_size=2)
    def my_baseline(x: AdvantageInputs) -> Advantages:
        scores_PxG = x.sequence_scores().reshape(-1, x.group_size)
        weights_PxG = jax.nn.softmax(scores_PxG / x.numbers["tau"], axis=-1)
        baseline_Px1 = jnp.sum(weights_PxG * scores_PxG, axis=-1, keepdims=True)
        return Advantages(broadcast_over_tokens((scores_PxG - baseline_Px1).reshape(-1), x.mask))

    config = PPOConfig(advantage_estimator="my_baseline", num_generations=4, plugin_numbers={"tau": 0.5})

The built-ins (`jaxrlhf.training.estimators`, `jaxrlhf.training.policy_losses`,
`jaxrlhf.training.kl_estimators`) are registered exactly this way; the trainer never branches on
an algorithm's name. What a plug-in may rely on:

- it runs inside the fused jitted step, under a sweep's ``vmap`` and over the mesh, so it is a pure
  JAX function of its inputs (no Python control flow on array values, no NumPy conversion);
- its numbers (``numbers=`` defaults, overridden by ``PPOConfig.plugin_numbers``) are data in the
  train state (`jaxrlhf.training.hparams.HyperParams.plugin`): ``grid(tau=[0.5, 1.0])`` sweeps one
  in one compiled program, and another value does not recompile. ``x.numbers`` also holds every
  built-in number of the state (``clip_eps``, ``gamma``, ``temperature``, ...). Reading a number
  the plug-in did not declare is an error naming it;
- ``mask`` is the *action* mask: 1 on tokens the policy sampled (for a single-turn response, every
  response token up to and including EOS). Everything reduces over it;
- ``axis_name`` is passed through: a reduction over the batch that should span devices under
  ``shard_map`` / ``pmap`` uses it (the trainer itself runs GSPMD ``jit`` on global arrays, where it
  is None).

Each plug-in is checked once when a trainer is built (`check_plugins`: traced with abstract inputs
of the run's shapes, no compile): a function that fails to trace, returns the wrong shapes, or reads
an undeclared number is refused there with a message naming it and this protocol.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.core.losses import aggregate_loss
from jaxrlhf.core.rewards import step_rewards
from jaxrlhf.core.stats import masked_sum

if TYPE_CHECKING:
    from jaxrlhf.training.config import PPOConfig

Stats = dict[str, jax.Array]

PROTOCOL_DOC = "docs/extending.md (and the docstring of jaxrlhf.training.plugins)"


class PluginError(ValueError):
    """A plug-in is unknown, registered twice, fails to trace, or breaks its protocol."""


# ----------------------------------------------------------------------------------------------
# Numbers: the hyper-parameters a plug-in reads


class Numbers(Mapping[str, jax.Array]):
    """Read-only view of the run's numbers for one plug-in: every built-in hyper-parameter of the
    state (``clip_eps``, ``gamma``, ...) and the plug-in numbers its owner declares. Reading a
    plug-in number the owner did not declare raises `PluginError` naming both (a view without an
    owner sees every number)."""

    def __init__(
        self,
        builtin: Mapping[str, jax.Array],
        plugin: Mapping[str, jax.Array],
        owner: str = "",
        declared: Collection[str] | None = None,
    ):
        self._builtin = dict(builtin)
        self._plugin = dict(plugin)
        self._owner = owner
        self._visible = set(self._plugin) if declared is None else set(declared) & set(self._plugin)

    def __getitem__(self, name: str) -> jax.Array:
        if name in self._builtin:
            return self._builtin[name]
        if name in self._visible:
            return self._plugin[name]
        known = sorted(set(self._builtin) | self._visible)
        close = difflib.get_close_matches(name, known, n=2)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise PluginError(
            f"{self._owner or 'a plug-in'} reads the number {name!r}, which it does not declare{hint}: declare it "
            f"with its default in the decorator, e.g. numbers={{{name!r}: 1.0}}. Its numbers: "
            f"{sorted(self._visible) or 'none'}; the built-in ones: {sorted(self._builtin)}"
        )

    def __iter__(self) -> Iterator[str]:
        return iter([*self._builtin, *sorted(self._visible)])

    def __len__(self) -> int:
        return len(self._builtin) + len(self._visible)

    def for_owner(self, owner: str, declared: Collection[str]) -> Numbers:
        """The view of the same numbers that the plug-in ``owner`` (declaring ``declared``) gets."""
        return Numbers(self._builtin, self._plugin, owner, declared)

    # A pytree (the numbers are leaves, the owner static), so inputs holding it cross jit and vmap.
    def tree_flatten(self):
        return (self._builtin, self._plugin), (self._owner, tuple(sorted(self._visible)))

    @classmethod
    def tree_unflatten(cls, aux, children):
        owner, visible = aux
        return cls(children[0], children[1], owner, visible)


jax.tree_util.register_pytree_node_class(Numbers)


# ----------------------------------------------------------------------------------------------
# The three protocols


@dataclasses.dataclass(frozen=True)
class AdvantageInputs:
    """What an advantage estimator sees (one batch of B responses of N tokens).

    Attributes:
      scores: ``[B]`` sequence scores after the trainer's processing (overlong shaping, missing-EOS
        penalty, clipping, normalisation).
      logprobs: ``[B, N]`` log-probs of the sampled tokens under the rollout (old) policy.
      ref_logprobs: ``[B, N]`` under the reference policy.
      values: ``[B, N]`` the critic's ``V(s_t)``, or None without a critic.
      mask: ``[B, N]`` action mask (1 = a token the policy sampled).
      kl: ``[B, N]`` per-token KL estimate of the config's KL estimator (``kl_estimator``).
      reward_kl_coef: the KL coefficient beta when ``kl_placement="reward"``, else 0 (the penalty
        is then a loss term, and scores are left alone).
      numbers: the run's numbers (`Numbers`).
      group_size: G (static): rows ``b`` with the same ``b // G`` answer one prompt.
      greedy_scores: ``[B // G]`` processed scores of the greedy responses (estimators declared
        with ``needs_greedy=True``), else None.
      config: the `PPOConfig` (static: switches such as ``whiten_advantages``).
      axis_name: the device axis of batch reductions under ``shard_map`` / ``pmap``, or None.
      token_rewards: ``[B, N]`` a multi-turn episode's per-turn rewards, each on the last action
        token of its turn, or None (a single turn). `step_rewards` and `sequence_scores` add them.
    """

    scores: jax.Array
    logprobs: jax.Array
    ref_logprobs: jax.Array
    values: jax.Array | None
    mask: jax.Array
    kl: jax.Array
    reward_kl_coef: jax.Array
    numbers: Numbers
    group_size: int
    greedy_scores: jax.Array | None
    config: PPOConfig
    axis_name: str | None = None
    token_rewards: jax.Array | None = None

    def step_rewards(self, scores: jax.Array | None = None) -> jax.Array:
        """DESIGN.md's step rewards ``r = -beta * kl * mask; r[last action token] += score`` with
        ``beta = reward_kl_coef`` (``scores`` defaults to ``self.scores``), plus an episode's
        per-turn rewards where they sit."""
        scores_B = self.scores if scores is None else scores
        rewards_BxN = step_rewards(scores_B, self.kl, self.mask, self.reward_kl_coef)
        if self.token_rewards is None:
            return rewards_BxN
        return rewards_BxN + jnp.where(self.mask != 0, self.token_rewards, 0.0)

    def sequence_scores(self) -> jax.Array:
        """``[B]`` ``score + sum of the turn rewards - beta * sum_t kl_t`` over action tokens: the
        episode's return at gamma = 1, the sequence-level form of the KL penalty, which outcome
        estimators (GRPO, RLOO, ReMax, ...) compare."""
        scores_B = self.scores - self.reward_kl_coef * masked_sum(self.kl, self.mask, axis=1)
        if self.token_rewards is None:
            return scores_B
        return scores_B + masked_sum(self.token_rewards, self.mask, axis=1)


class Advantages(NamedTuple):
    """What an advantage estimator returns.

    Attributes:
      advantages: ``[B, N]``, 0 off the action mask.
      returns: ``[B, N]`` value targets; required by (and only by) estimators declared with
        ``uses_critic=True``.
      rewards: ``[B, N]`` the step rewards, logged for analysis (None: ``x.step_rewards()``).
      stats: extra scalar diagnostics, logged under their names.
    """

    advantages: jax.Array
    returns: jax.Array | None = None
    rewards: jax.Array | None = None
    stats: Stats | None = None


@dataclasses.dataclass(frozen=True)
class PolicyLossInputs:
    """What a policy loss sees (one minibatch, or one micro-batch with gradient accumulation).

    Attributes:
      logprobs: ``[B, N]`` log-probs under the policy being optimised (differentiated).
      old_logprobs: ``[B, N]`` under the policy the update started from (the PPO ratio's
        denominator).
      advantages: ``[B, N]`` (constants).
      mask: ``[B, N]`` action mask.
      numbers: the run's numbers (`Numbers`): ``clip_eps``, ``clip_eps_high``, ``dual_clip``, ...
        and the loss's own.
      key: a PRNG key for stochastic losses (e.g. Clip-Cov's random pick of tokens), different for
        every minibatch of every epoch.
      config: the `PPOConfig` (static: ``loss_agg``, ``dual_clip is None``, ...).
      token_weights: ``[B, N]`` per-token weights of the loss (e.g. an off-policy correction), or
        None for 1. `aggregate` applies them.
      axis_name: as in `AdvantageInputs`.
    """

    logprobs: jax.Array
    old_logprobs: jax.Array
    advantages: jax.Array
    mask: jax.Array
    numbers: Numbers
    key: jax.Array
    config: PPOConfig
    token_weights: jax.Array | None = None
    axis_name: str | None = None

    def aggregate(self, loss_BxN: jax.Array, agg: str | None = None) -> jax.Array:
        """``loss_BxN`` (times ``token_weights``) reduced to a scalar with the config's
        ``loss_agg`` (or ``agg``), over the action mask, `aggregate_loss`'s rules."""
        if self.token_weights is not None:
            loss_BxN = loss_BxN * self.token_weights
        return aggregate_loss(loss_BxN, self.mask, agg or self.config.loss_agg, self.axis_name)


@dataclasses.dataclass(frozen=True)
class KLInputs:
    """What a KL estimator sees: ``logprobs`` (the policy's; differentiated when the KL is a loss
    term) and ``ref_logprobs`` of the same tokens, any equal shapes, and the run's ``numbers``.
    It returns the per-token estimate, same shape (the trainer applies the mask)."""

    logprobs: jax.Array
    ref_logprobs: jax.Array
    numbers: Numbers


# The inputs are pytrees (arrays and numbers as leaves; config, group size and axis name static),
# so a plug-in can be jitted, vmapped or differentiated on its own inputs, as the tests do.
jax.tree_util.register_dataclass(
    AdvantageInputs,
    data_fields=["scores", "logprobs", "ref_logprobs", "values", "mask", "kl", "reward_kl_coef", "numbers",
                 "greedy_scores", "token_rewards"],
    meta_fields=["group_size", "config", "axis_name"],
)  # fmt: skip
jax.tree_util.register_dataclass(
    PolicyLossInputs,
    data_fields=["logprobs", "old_logprobs", "advantages", "mask", "numbers", "key", "token_weights"],
    meta_fields=["config", "axis_name"],
)
jax.tree_util.register_dataclass(KLInputs, data_fields=["logprobs", "ref_logprobs", "numbers"], meta_fields=[])


# ----------------------------------------------------------------------------------------------
# Plug-in objects and the registries


@dataclasses.dataclass(frozen=True, eq=False)
class Plugin:
    """A registered function with its name and declared numbers (the base of the three kinds)."""

    name: str
    fn: Callable
    numbers: Mapping[str, float] = dataclasses.field(default_factory=dict)

    kind = "plug-in"

    def __call__(self, inputs):
        return self.fn(inputs)

    @property
    def origin(self) -> str:
        return f"{getattr(self.fn, '__module__', '?')}.{getattr(self.fn, '__qualname__', repr(self.fn))}"

    def describe(self) -> str:
        return f"{self.kind} {self.name!r} ({self.origin})"


@dataclasses.dataclass(frozen=True, eq=False)
class AdvantageEstimator(Plugin):
    """An advantage estimator. ``uses_critic``: the trainer keeps a value model, passes its values
    and trains it on the returned ``returns``. ``min_group_size``: the smallest ``num_generations``
    it accepts (2 for group baselines). ``needs_greedy``: it reads ``greedy_scores`` (the trainer
    then decodes each prompt greedily every step)."""

    uses_critic: bool = False
    min_group_size: int = 1
    needs_greedy: bool = False

    kind = "advantage estimator"


@dataclasses.dataclass(frozen=True, eq=False)
class PolicyLoss(Plugin):
    """A policy loss. ``supports_dual_clip``: it honours ``PPOConfig.dual_clip``."""

    supports_dual_clip: bool = False

    kind = "policy loss"


@dataclasses.dataclass(frozen=True, eq=False)
class KLEstimator(Plugin):
    """A per-token KL estimator (the reward penalty's and the KL loss term's)."""

    kind = "KL estimator"


_REGISTRIES: dict[type, dict[str, Plugin]] = {AdvantageEstimator: {}, PolicyLoss: {}, KLEstimator: {}}
_CONFIG_FIELD = {AdvantageEstimator: "advantage_estimator", PolicyLoss: "policy_loss", KLEstimator: "kl_estimator"}


def register(plugin: Plugin) -> Plugin:
    """Adds ``plugin`` to its kind's registry under ``plugin.name``.

    The same function registered again (a module imported twice) replaces itself; another function
    under a taken name, or a number name that another plug-in declares with another default, is a
    `PluginError`.
    """
    registry = _REGISTRIES[type(plugin)]
    existing = registry.get(plugin.name)
    if existing is not None and existing.origin != plugin.origin:
        raise PluginError(
            f"{plugin.kind} name {plugin.name!r} is registered twice: by {existing.origin} and now by "
            f"{plugin.origin}; choose another name"
        )
    for number, default in plugin.numbers.items():
        if not isinstance(number, str) or not number.isidentifier():
            raise PluginError(f"{plugin.describe()}: number names must be identifiers, got {number!r}")
        if isinstance(default, bool) or not isinstance(default, (int, float, np.floating, np.integer)):
            raise PluginError(f"{plugin.describe()}: number {number!r} needs a numeric default, got {default!r}")
    registry[plugin.name] = plugin
    return plugin


def _decorator(cls, name, numbers, **metadata):
    def wrap(fn: Callable) -> Plugin:
        if isinstance(fn, Plugin):
            fn = fn.fn
        if not callable(fn):
            raise PluginError(f"a {cls.kind} must be a function, got {fn!r}")
        plugin = cls(name=name or fn.__name__, fn=fn, numbers=dict(numbers or {}), **metadata)
        return register(plugin)

    return wrap


def advantage_estimator(
    name: str | None = None,
    *,
    numbers: Mapping[str, float] | None = None,
    uses_critic: bool = False,
    min_group_size: int = 1,
    needs_greedy: bool = False,
) -> Callable[[Callable[[AdvantageInputs], Advantages]], AdvantageEstimator]:
    """Decorator: registers ``fn(x: AdvantageInputs) -> Advantages`` as an advantage estimator
    named ``name`` (default: the function's name). See the module docstring."""
    return _decorator(
        AdvantageEstimator,
        name,
        numbers,
        uses_critic=uses_critic,
        min_group_size=min_group_size,
        needs_greedy=needs_greedy,
    )  # pyright: ignore[reportReturnType]


def policy_loss(
    name: str | None = None, *, numbers: Mapping[str, float] | None = None, supports_dual_clip: bool = False
) -> Callable[[Callable[[PolicyLossInputs], tuple[jax.Array, Stats]]], PolicyLoss]:
    """Decorator: registers ``fn(x: PolicyLossInputs) -> (loss, stats)`` as a policy loss named
    ``name``. ``loss`` is a scalar; ``stats`` a dict of scalar means over the batch's tokens (they
    are combined over micro-batches by token share and averaged over the step's updates)."""
    return _decorator(PolicyLoss, name, numbers, supports_dual_clip=supports_dual_clip)  # pyright: ignore[reportReturnType]


def kl_estimator(
    name: str | None = None, *, numbers: Mapping[str, float] | None = None
) -> Callable[[Callable[[KLInputs], jax.Array]], KLEstimator]:
    """Decorator: registers ``fn(x: KLInputs) -> kl`` (per token, the shape of ``x.logprobs``) as
    a KL estimator named ``name``."""
    return _decorator(KLEstimator, name, numbers)  # pyright: ignore[reportReturnType]


P = TypeVar("P", bound=Plugin)


def registered(kind: type[Plugin]) -> tuple[str, ...]:
    """The names registered for ``kind`` (`AdvantageEstimator`, `PolicyLoss` or `KLEstimator`)."""
    _load_builtins()
    return tuple(_REGISTRIES[kind])


def lookup(kind: type[P], name: Any) -> P:
    """The plug-in of ``kind`` named ``name``; `PluginError` listing what is registered otherwise."""
    _load_builtins()
    registry = _REGISTRIES[kind]
    if name not in registry:
        close = difflib.get_close_matches(str(name), list(registry), n=2)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise PluginError(
            f"{_CONFIG_FIELD[kind]}: no {kind.kind} is registered as {name!r}{hint} Registered: "
            f"{', '.join(registry)}. A plug-in of your own registers when the module that defines it is "
            f"imported (before the config is built); see {PROTOCOL_DOC}"
        )
    plugin = registry[name]
    assert isinstance(plugin, kind)
    return plugin


def as_name(kind: type[Plugin], value: Any) -> str:
    """A config field's value (a registered name, a plug-in, or a plain function) as a registered
    name: plug-ins and functions are registered (under their own name) on the way."""
    if isinstance(value, str):
        lookup(kind, value)
        return value
    if isinstance(value, Plugin):
        if not isinstance(value, kind):
            raise PluginError(f"{_CONFIG_FIELD[kind]} takes a {kind.kind}, got the {value.describe()}")
        registry = _REGISTRIES[kind]
        if registry.get(value.name) is not value:
            register(value)
        return value.name
    if callable(value):
        name = f"{getattr(value, '__module__', 'fn')}.{getattr(value, '__qualname__', 'fn')}"
        existing = _REGISTRIES[kind].get(name)
        if existing is None or existing.fn is not value:
            register(kind(name=name, fn=value))
        return name
    raise PluginError(f"{_CONFIG_FIELD[kind]} takes a registered name or a {kind.kind} function, got {value!r}")


def _load_builtins() -> None:
    # The built-ins register on import; imported here (not at the top) because they import this module.
    from jaxrlhf.training import estimators, kl_estimators, policy_losses  # noqa: F401


# ----------------------------------------------------------------------------------------------
# The config's plug-ins and their numbers


def plugins_of(config: PPOConfig) -> tuple[AdvantageEstimator, PolicyLoss, KLEstimator]:
    """The advantage estimator, policy loss and KL estimator ``config`` names."""
    return (
        lookup(AdvantageEstimator, config.advantage_estimator),
        lookup(PolicyLoss, config.policy_loss),
        lookup(KLEstimator, config.kl_estimator),
    )


def declared_numbers(config: PPOConfig) -> dict[str, float]:
    """Every number the config's plug-ins declare, with its default. The three share one namespace
    in the state: two may declare one name only with the same default."""
    out: dict[str, float] = {}
    owners: dict[str, Plugin] = {}
    for plugin in plugins_of(config):
        for number, default in plugin.numbers.items():
            if number in out and out[number] != default:
                raise PluginError(
                    f"{plugin.describe()} and {owners[number].describe()} both declare the number {number!r}, "
                    f"with defaults {default} and {out[number]}: plug-in numbers share one namespace in the "
                    "train state; rename one"
                )
            out[number], owners[number] = float(default), plugin
    return out


def plugin_number_values(config: PPOConfig) -> dict[str, float]:
    """The declared numbers with the config's ``plugin_numbers`` over their defaults."""
    return {**declared_numbers(config), **dict(config.plugin_numbers)}


def numbers_view(hparams) -> Numbers:
    """`Numbers` of a `HyperParams`: its built-in fields and its plug-in numbers (no owner yet)."""
    builtin = {f.name: getattr(hparams, f.name) for f in dataclasses.fields(hparams) if f.name != "plugin"}
    return Numbers(builtin, hparams.plugin)


# ----------------------------------------------------------------------------------------------
# Calling plug-ins: the protocol's checks, and trace failures explained

_TRACE_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerIntegerConversionError,
)


def _traced_call(plugin: Plugin, inputs):
    try:
        return plugin(inputs)
    except PluginError:
        raise
    except _TRACE_ERRORS as error:
        raise PluginError(
            f"{plugin.describe()} failed to trace: it runs inside the jitted step (and under vmap and the "
            "mesh), so it must be a pure JAX function of its inputs: no Python `if`/`int()`/`float()` on "
            "array values and no NumPy conversion (use jnp.where, lax.cond, ...). See "
            f"{PROTOCOL_DOC}. JAX said: {type(error).__name__}"
        ) from error


def _check_scalar_stats(plugin: Plugin, stats) -> Stats:
    if stats is None:
        return {}
    if not isinstance(stats, Mapping):
        raise PluginError(f"{plugin.describe()}: stats must be a dict of scalars, got {type(stats).__name__}")
    for key, value in stats.items():
        if not isinstance(key, str) or np.shape(value) != ():
            raise PluginError(
                f"{plugin.describe()}: stats[{key!r}] must be a scalar (a mean over the batch), got shape "
                f"{np.shape(value)}"
            )
    return dict(stats)


def _check_shape(plugin: Plugin, what: str, value, shape) -> None:
    if value is None or np.shape(value) != tuple(shape):
        got = "None" if value is None else f"shape {np.shape(value)}"
        raise PluginError(f"{plugin.describe()}: {what} must have shape {tuple(shape)} (the action mask's), got {got}")


def call_advantage_estimator(estimator: AdvantageEstimator, inputs: AdvantageInputs) -> Advantages:
    """``estimator(inputs)`` with the protocol checked: an `Advantages` of ``[B, N]`` arrays,
    returns iff the estimator uses a critic, scalar stats."""
    out = _traced_call(
        estimator,
        dataclasses.replace(inputs, numbers=inputs.numbers.for_owner(estimator.describe(), estimator.numbers)),
    )
    if not isinstance(out, Advantages):
        if isinstance(out, tuple) or hasattr(out, "shape"):
            out = Advantages(*out) if isinstance(out, tuple) else Advantages(out)
        else:
            raise PluginError(
                f"{estimator.describe()} must return Advantages(advantages, ...), got {type(out).__name__}"
            )
    shape = inputs.mask.shape
    _check_shape(estimator, "advantages", out.advantages, shape)
    if estimator.uses_critic:
        _check_shape(estimator, "returns (it declares uses_critic=True)", out.returns, shape)
    if out.rewards is not None:
        _check_shape(estimator, "rewards", out.rewards, shape)
    return out._replace(stats=_check_scalar_stats(estimator, out.stats))


def call_policy_loss(loss_fn: PolicyLoss, inputs: PolicyLossInputs) -> tuple[jax.Array, Stats]:
    """``loss_fn(inputs)`` with the protocol checked: a scalar loss and scalar stats."""
    out = _traced_call(
        loss_fn, dataclasses.replace(inputs, numbers=inputs.numbers.for_owner(loss_fn.describe(), loss_fn.numbers))
    )
    if not (isinstance(out, tuple) and len(out) == 2):
        raise PluginError(f"{loss_fn.describe()} must return (loss, stats), got {type(out).__name__}")
    loss, stats = out
    if np.shape(loss) != ():
        raise PluginError(f"{loss_fn.describe()}: the loss must be a scalar, got shape {np.shape(loss)}")
    return loss, _check_scalar_stats(loss_fn, stats)


def call_kl_estimator(kl_fn: KLEstimator, inputs: KLInputs) -> jax.Array:
    """``kl_fn(inputs)`` with the protocol checked: one estimate per token."""
    numbers = inputs.numbers.for_owner(kl_fn.describe(), kl_fn.numbers)
    kl = _traced_call(kl_fn, dataclasses.replace(inputs, numbers=numbers))
    _check_shape(kl_fn, "the KL estimate", kl, np.shape(inputs.logprobs))
    return kl


def check_plugins(config: PPOConfig, hparams, value_shapes: bool) -> None:
    """Traces the config's three plug-ins once on abstract inputs of the run's shapes (``[B, N]``
    with B the batch size and N ``max_new_tokens``; no compile, no device work), so a plug-in that
    fails to trace, returns the wrong shapes or reads an undeclared number is refused before the
    trainer compiles anything. ``value_shapes``: the trainer has a critic (values are passed)."""
    estimator, loss_fn, kl_fn = plugins_of(config)
    B, N, G = config.batch_size, config.max_new_tokens, config.num_generations
    f32 = jax.ShapeDtypeStruct((B, N), jnp.float32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)

    def run(hp, logprobs, mask, scores, greedy, key):
        numbers = numbers_view(hp)
        kl = call_kl_estimator(kl_fn, KLInputs(logprobs, logprobs, numbers))
        advantage_inputs = AdvantageInputs(
            scores=scores,
            logprobs=logprobs,
            ref_logprobs=logprobs,
            values=logprobs if value_shapes else None,
            mask=mask,
            kl=kl,
            reward_kl_coef=hp.gamma,
            numbers=numbers,
            group_size=G,
            greedy_scores=greedy if estimator.needs_greedy else None,
            config=config,
        )
        out = call_advantage_estimator(estimator, advantage_inputs)
        loss_inputs = PolicyLossInputs(logprobs, logprobs, out.advantages, mask, numbers, key, config)
        return call_policy_loss(loss_fn, loss_inputs)

    abstract_hp = jax.tree.map(lambda _: scalar, hparams)
    jax.eval_shape(
        run,
        abstract_hp,
        f32,
        f32,
        jax.ShapeDtypeStruct((B,), jnp.float32),
        jax.ShapeDtypeStruct((B // G,), jnp.float32),
        jax.random.PRNGKey(0),
    )
