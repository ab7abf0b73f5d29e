"""`PPO`: the trainer's static setup and its jitted step functions.

One PPO iteration is a pure function ``(state, frozen, prompts) -> (state, metrics)``:

    key -> (rollout_key, update_key, next_key)
    rollout(policy, prompts, rollout_key)                       -> responses
    score(reward, prompts, responses)                           -> raw scores [B]
    make_experience(policy, ref, critic, responses, scores, beta) -> advantages, returns, ...
    ppo_update(params, opt_states, experience, update_key)     -> params, opt_states
    kl_controller.update(beta, KL, batch_size)                  -> beta

With a JAX reward (function or reward model) all of it runs under a single `jax.jit`
(`PPO.train_step`): no Python per token, no host round-trip per minibatch. A `TextReward` splits
it in two jitted halves around host-side scoring (`PPO.rollout_step`, `PPO.update_step`).

`PPO` is a frozen dataclass of hashable parts (configs, model definitions, the reward, the mesh),
so equal setups share compiled functions.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxrlhf.core.kl_control import adaptive_kl_controller, fixed_kl_controller
from jaxrlhf.models.lm import LanguageModel
from jaxrlhf.models.value import ValueModel, init_value_head
from jaxrlhf.training import parallel
from jaxrlhf.training.config import PPOConfig
from jaxrlhf.training.experience import Models, PromptBatch, Rollout, make_experience, rollout
from jaxrlhf.training.rewards import RewardModel, TextReward, check_scores, is_host_reward, score_in_jit
from jaxrlhf.training.state import (FrozenParams, ScoreStats, TrainState, learning_rate_schedule,
                                    make_optimizer)
from jaxrlhf.training.update import make_ppo_update

Metrics = Dict[str, jax.Array]


class PromptTooLongError(ValueError):
    """A prompt has more tokens than ``PPOConfig.max_prompt_len``."""


@dataclasses.dataclass(frozen=True)
class PPO:
    """Static setup of a PPO run: configs, model definitions, reward, mesh (no parameters).

    Args:
      config: the `PPOConfig`.
      policy: the policy `LanguageModel` (its initial parameters are also the reference).
      reward: a JAX function ``(prompt_ids, prompt_mask, response_ids, response_mask) -> [B]``, a
        `RewardModel`, or a `TextReward` (see `jaxrlhf.training.rewards`).
      critic: the critic's `ValueModel`; None builds one with the policy's architecture (or, with
        ``config.shared_trunk``, uses a value head on the policy's trunk).
      mesh: a device mesh with a ``"data"`` axis (and optionally ``"fsdp"``); None = one device.
    """

    config: PPOConfig
    policy: LanguageModel
    reward: Any
    critic: Optional[ValueModel] = None
    mesh: Optional[Mesh] = None

    def __post_init__(self):
        parallel.check_threefry_partitionable()
        if self.mesh is None:
            object.__setattr__(self, "mesh", parallel.data_mesh(jax.devices()[:1]))
        if self.config.shared_trunk and self.critic is not None:
            raise ValueError("config.shared_trunk=True uses a value head on the policy; pass critic=None")
        if not self.config.shared_trunk and self.critic is None:
            object.__setattr__(self, "critic", ValueModel(self.policy.config))
        divisor = parallel.batch_size_divisor(self.mesh)
        micro = self.config.minibatch_size // self.config.grad_accum_steps
        if micro % divisor:
            raise ValueError(
                f"the micro-batch size minibatch_size / grad_accum_steps = {micro} must be a multiple of "
                f"the number of data-parallel devices ({divisor}) so every device gets whole rows")
        if isinstance(self.reward, TextReward) is False and not callable(self.reward):
            raise TypeError(f"reward must be a JAX function, a RewardModel or a TextReward, got {self.reward!r}")

    # ------------------------------------------------------------------ static pieces

    @property
    def models(self) -> Models:
        return Models(self.policy, None if self.config.shared_trunk else self.critic)

    @property
    def policy_optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.config, self.config.learning_rate)

    @property
    def value_optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.config, self.config.critic_learning_rate)

    @property
    def kl_controller(self):
        c = self.config
        if c.adaptive_kl:
            return adaptive_kl_controller(c.init_kl_coef, c.target_kl, c.kl_horizon)
        return fixed_kl_controller(c.init_kl_coef)

    @property
    def uses_host_reward(self) -> bool:
        return is_host_reward(self.reward)

    # ------------------------------------------------------------------ state

    def _init_state(self, policy_params, value_params, seed_key) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            policy_params=policy_params,
            value_params=value_params,
            policy_opt_state=self.policy_optimizer.init(policy_params),
            value_opt_state=self.value_optimizer.init(value_params),
            kl_ctl=self.kl_controller.init(),
            score_stats=ScoreStats.zeros(),
            key=seed_key,
        )

    def default_value_params(self, policy_params, key):
        """Critic parameters when none are given: a zero value head on a copy of the policy's
        trunk (separate critic) or on the policy itself (shared trunk)."""
        if self.config.shared_trunk:
            return init_value_head(key, self.policy.config.hidden_size)
        if self.critic.config != self.policy.config:
            raise ValueError("the critic's architecture differs from the policy's: pass value_params")
        return self.critic.init_params(key, trunk_params=policy_params)

    def abstract_state(self) -> TrainState:
        """`TrainState` of `jax.ShapeDtypeStruct`s with their shardings (e.g. a restore target)."""
        return _abstract_state(self)

    def state_shardings(self) -> TrainState:
        return _state_shardings(self)

    def init_state(self, policy_params, value_params=None) -> TrainState:
        """The initial `TrainState`, placed on the mesh (PRNG key from ``config.seed``)."""
        seed_key = jax.random.PRNGKey(self.config.seed)
        policy_key, value_key = jax.random.split(jax.random.fold_in(seed_key, 1))
        del policy_key
        if value_params is None:
            value_params = self.default_value_params(policy_params, value_key)
        shardings = self.state_shardings()
        init = jax.jit(self._init_state, out_shardings=shardings)
        return init(policy_params, value_params, seed_key)

    def frozen_params(self, ref_params, reward_params=None) -> FrozenParams:
        """The reference policy (and reward model) parameters, placed on the mesh."""
        if isinstance(self.reward, RewardModel) and reward_params is None:
            raise ValueError("a RewardModel reward needs reward_params")
        frozen = FrozenParams(ref_params, reward_params)
        return jax.device_put(frozen, self._frozen_shardings(frozen))

    def _frozen_shardings(self, frozen: FrozenParams) -> FrozenParams:
        reward_shardings = None
        if frozen.reward_params is not None:
            reward_shardings = parallel.param_shardings(frozen.reward_params, self.mesh)
        return FrozenParams(parallel.param_shardings(frozen.ref_params, self.mesh), reward_shardings)

    def prompt_batch(self, prompt_ids, prompt_mask) -> PromptBatch:
        """Host prompt arrays ``[B, P]`` (the global batch, on every process) -> sharded `PromptBatch`."""
        prompt_ids, prompt_mask = np.asarray(prompt_ids, np.int32), np.asarray(prompt_mask, np.int32)
        sharding = parallel.batch_sharding(self.mesh)
        return PromptBatch(parallel.global_array(prompt_ids, sharding), parallel.global_array(prompt_mask, sharding))

    # ------------------------------------------------------------------ the step

    def _constrain_batch(self, x, batch_dim: int = 0):
        return jax.lax.with_sharding_constraint(x, parallel.batch_sharding(self.mesh, batch_dim))

    def _check_batch(self, batch: PromptBatch):
        batch_size, width = batch.ids.shape
        if batch_size != self.config.batch_size:
            raise ValueError(f"prompt batch has {batch_size} rows, config.batch_size is {self.config.batch_size}")
        if width > self.config.max_prompt_len:
            raise PromptTooLongError(
                f"prompt batch is {width} tokens wide, more than config.max_prompt_len={self.config.max_prompt_len}")

    def _keys(self, state: TrainState):
        rollout_key, update_key, next_key = jax.random.split(state.key, 3)
        return rollout_key, update_key, next_key

    def _rollout(self, state: TrainState, frozen: FrozenParams, batch: PromptBatch) -> Rollout:
        del frozen
        self._check_batch(batch)
        rollout_key, _, _ = self._keys(state)
        out = rollout(self.config, self.policy, state.policy_params, batch, rollout_key)
        return Rollout(self._constrain_batch(out.tokens), self._constrain_batch(out.mask))

    def _update(self, state: TrainState, frozen: FrozenParams, batch: PromptBatch, rollout_out: Rollout,
                raw_scores_B) -> Tuple[TrainState, Metrics]:
        config = self.config
        _, update_key, next_key = self._keys(state)
        kl_coef = state.kl_ctl.kl_coef
        experience, score_stats, exp_stats = make_experience(
            config, self.models, state.policy_params, state.value_params, frozen.ref_params,
            batch, rollout_out, raw_scores_B, kl_coef, state.score_stats)
        experience = jax.tree.map(self._constrain_batch, experience)

        ppo_update = make_ppo_update(config, self.models, self.policy_optimizer, self.value_optimizer,
                                     self._constrain_batch)
        params = {"policy": state.policy_params, "value": state.value_params}
        opt_states = {"policy": state.policy_opt_state, "value": state.value_opt_state}
        params, opt_states, update_stats = ppo_update(params, opt_states, experience, kl_coef, update_key)

        kl_ctl = self.kl_controller.update(state.kl_ctl, exp_stats["kl"], config.batch_size)
        new_state = TrainState(
            step=state.step + 1,
            policy_params=params["policy"],
            value_params=params["value"],
            policy_opt_state=opt_states["policy"],
            value_opt_state=opt_states["value"],
            kl_ctl=kl_ctl,
            score_stats=score_stats,
            key=next_key,
        )
        new_state = jax.lax.with_sharding_constraint(new_state, self.state_shardings())
        metrics = {**exp_stats, **update_stats}
        first_update = state.step * config.updates_per_step
        metrics["learning_rate"] = learning_rate_schedule(config, config.learning_rate)(first_update)
        metrics["critic_learning_rate"] = learning_rate_schedule(config, config.critic_learning_rate)(first_update)
        # One flag the host checks before committing the new state: scores, losses and params finite.
        finite = jnp.all(jnp.isfinite(raw_scores_B))
        for value in update_stats.values():
            finite &= jnp.isfinite(value)
        finite &= jnp.isfinite(optax.tree.norm(params))
        metrics["all_finite"] = finite
        return new_state, metrics

    def _fused_step(self, state: TrainState, frozen: FrozenParams, batch: PromptBatch):
        if self.uses_host_reward:
            raise TypeError("a TextReward is scored on the host: use rollout_step, then update_step")
        rollout_out = self._rollout(state, frozen, batch)
        raw_scores_B = score_in_jit(self.reward, frozen.reward_params, batch.ids, batch.mask,
                                    rollout_out.tokens, rollout_out.mask)
        return self._update(state, frozen, batch, rollout_out, raw_scores_B)

    # Jitted entry points (compiled once per equal PPO setup and input shapes/shardings).

    def train_step(self, state: TrainState, frozen: FrozenParams, batch: PromptBatch) -> Tuple[TrainState, Metrics]:
        """One PPO iteration under a single `jax.jit` (JAX reward function or reward model)."""
        return _jitted(self, "fused")(state, frozen, batch)

    def rollout_step(self, state: TrainState, frozen: FrozenParams, batch: PromptBatch) -> Rollout:
        """First half of the split step: sample responses (jitted)."""
        return _jitted(self, "rollout")(state, frozen, batch)

    def update_step(self, state, frozen, batch, rollout_out: Rollout, raw_scores_B) -> Tuple[TrainState, Metrics]:
        """Second half of the split step: experience + PPO update from host-computed scores (jitted)."""
        raw_scores_B = check_scores(np.asarray(raw_scores_B, np.float32), self.config.batch_size, "text reward")
        raw_scores_B = parallel.global_array(np.asarray(raw_scores_B), parallel.batch_sharding(self.mesh))
        return _jitted(self, "update")(state, frozen, batch, rollout_out, raw_scores_B)

    def bind(self, frozen: FrozenParams, donate: bool = False) -> Callable[[TrainState, PromptBatch], Tuple[TrainState, Metrics]]:
        """``train_step(state, prompts) -> (state, metrics)`` with the frozen parameters bound.

        With ``donate=True`` the step donates the input state's buffers to the new state (same
        program, but parameters and optimizer moments are not held twice; the state passed in
        is deleted). `train` does not donate: its NaN guard keeps the previous state.
        """
        step = _jitted(self, "fused_donated" if donate else "fused")

        def train_step(state: TrainState, batch: PromptBatch):
            return step(state, frozen, batch)

        return train_step


@functools.lru_cache(maxsize=64)
def _abstract_state(ppo: PPO) -> TrainState:
    seed_key = jax.random.PRNGKey(0)

    def init_from_scratch():
        policy_params = ppo.policy.init_params(seed_key)
        if ppo.config.shared_trunk:
            value_params = init_value_head(seed_key, ppo.policy.config.hidden_size)
        else:
            value_params = ppo.critic.init_params(seed_key)
        return ppo._init_state(policy_params, value_params, seed_key)

    shapes = jax.eval_shape(init_from_scratch)
    shardings = _state_shardings_for(ppo, shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _state_shardings_for(ppo: PPO, shapes: TrainState) -> TrainState:
    mesh = ppo.mesh
    policy_sh = parallel.param_shardings(shapes.policy_params, mesh)
    if ppo.config.shared_trunk:
        value_sh = jax.tree.map(lambda _: parallel.replicated(mesh), shapes.value_params)
    else:
        value_sh = {"trunk": parallel.param_shardings(shapes.value_params["trunk"], mesh),
                    "head": jax.tree.map(lambda _: parallel.replicated(mesh), shapes.value_params["head"])}
    rep = lambda tree: jax.tree.map(lambda _: parallel.replicated(mesh), tree)  # noqa: E731
    return TrainState(
        step=parallel.replicated(mesh),
        policy_params=policy_sh,
        value_params=value_sh,
        policy_opt_state=parallel.opt_state_shardings(ppo.policy_optimizer, shapes.policy_opt_state, policy_sh, mesh),
        value_opt_state=parallel.opt_state_shardings(ppo.value_optimizer, shapes.value_opt_state, value_sh, mesh),
        kl_ctl=rep(shapes.kl_ctl),
        score_stats=rep(shapes.score_stats),
        key=parallel.replicated(mesh),
    )


@functools.lru_cache(maxsize=64)
def _state_shardings(ppo: PPO) -> TrainState:
    return jax.tree.map(lambda s: s.sharding, _abstract_state(ppo))


@functools.lru_cache(maxsize=64)
def _jitted(ppo: PPO, which: str):
    rep = parallel.replicated(ppo.mesh)
    batch_sh = parallel.batch_sharding(ppo.mesh)
    if which == "rollout":
        return jax.jit(ppo._rollout, out_shardings=Rollout(batch_sh, batch_sh))
    out_shardings = (ppo.state_shardings(), rep)  # metrics: replicated scalars
    if which == "fused":
        return jax.jit(ppo._fused_step, out_shardings=out_shardings)
    if which == "fused_donated":
        return jax.jit(ppo._fused_step, out_shardings=out_shardings, donate_argnums=0)
    return jax.jit(ppo._update, out_shardings=out_shardings)
