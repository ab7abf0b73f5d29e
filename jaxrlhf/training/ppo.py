"""`PPO`: the trainer's static setup and its jitted step functions.

One PPO iteration is a pure function ``(state, frozen, prompts) -> (state, metrics)``:

    key -> (rollout_key, update_key, next_key)
    repeat(prompts [B / G], G)                                  -> prompts [B], groups of G rows
    rollout(policy, prompts, rollout_key)                       -> responses
    [greedy_rollout] greedy decode + score of each prompt        -> ReMax baseline
    [dynamic sampling] keep batch_size / G groups with signal     -> the batch the update sees
    score(reward, prompts, responses)                           -> raw scores [B]
    make_experience(policy, ref, critic, responses, scores, beta) -> advantages, returns, ...
                                                   (no critic for critic-free estimators)
    ppo_update(params, opt_states, experience, update_key)     -> params, opt_states
    kl_controller.update(beta, KL, batch_size)                  -> beta

With a JAX reward (function or reward model) all of it runs under a single `jax.jit`
(`PPO.train_step`): no Python per token, no host round-trip per minibatch. A `TextReward` splits
it in two jitted halves around host-side scoring (`PPO.rollout_step`, `PPO.update_step`).

`PPO` holds the static setup (the config's structure, model definitions, the reward, the mesh) and
builds its jitted functions once. The config's numbers are only the initial values of the state
(`jaxrlhf.training.hparams`): a state with other numbers, passed to the same `PPO`, runs the same
compiled program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrlhf.core.groups import select_groups_with_signal
from jaxrlhf.core.kl_control import KLControllerState, adaptive_kl_controller, fixed_kl_controller
from jaxrlhf.episodes import Environment, HostEpisodes
from jaxrlhf.models.lm import LanguageModel
from jaxrlhf.models.lora import LoraParams, init_lora, is_quantized
from jaxrlhf.models.lora import base_params as lora_base_params
from jaxrlhf.models.value import ValueModel, init_value_head
from jaxrlhf.sharding import (
    batch_sharding,
    batch_size_divisor,
    check_threefry_partitionable,
    global_array,
    make_mesh,
    opt_state_shardings,
    param_shardings,
    replicated,
)
from jaxrlhf.training import pipeline, plugins
from jaxrlhf.training.config import PPOConfig
from jaxrlhf.training.episodes import check_environment, episode_rollout, episode_settings, no_reward
from jaxrlhf.training.experience import (
    Models,
    PromptBatch,
    Rollout,
    episode_outcomes,
    greedy_rollout,
    make_experience,
    overlong_penalty,
    rollout,
)
from jaxrlhf.training.hparams import HyperParams, initial_numbers, structure_differences, uses_entropy
from jaxrlhf.training.rewards import RewardModel, TextReward, check_scores, is_host_reward, score_in_jit
from jaxrlhf.training.state import (
    FrozenParams,
    ScoreStats,
    TrainState,
    init_optimizer_state,
    learning_rate_multiplier,
    make_optimizer,
)
from jaxrlhf.training.update import make_ppo_update
from jaxrlhf.tuning import Tuning, model_width, resolve_tuning

Metrics = dict[str, jax.Array]


class PromptTooLongError(ValueError):
    """A prompt has more tokens than ``PPOConfig.max_prompt_len``."""


class PPO:
    """Static setup of a PPO run and its jitted steps: configs, model definitions, reward, mesh.

    Args:
      config: the `PPOConfig`: its structure is compiled in; its numbers initialise `init_state`.
      policy: the policy `LanguageModel` (its initial parameters are also the reference).
      reward: a JAX function ``(prompt_ids, prompt_mask, response_ids, response_mask) -> [B]``, a
        `RewardModel`, or a `TextReward` (see `jaxrlhf.training.rewards`).
      critic: the critic's `ValueModel`; None builds one with the policy's architecture (or, with
        ``config.shared_trunk``, uses a value head on the policy's trunk). A critic-free
        ``config.advantage_estimator`` (anything but "gae") has no critic: pass None.
      mesh: a device mesh with a ``"data"`` axis (and optionally ``"fsdp"``), e.g. from
        `jaxrlhf.sharding.make_mesh`; None = one device.
      tuning: the speed-only choices of sampling (`jaxrlhf.tuning`): ``"auto"`` picks
        `Tuning.for_backend` for the rollout's rows per device and the policy's width; a `Tuning`
        is used as given; None is `Tuning()`. The policy decodes with it (``self.policy``), and
        the jitted programs that sample compile with its XLA options: the rollout step with
        ``self.tuning``'s, the fused step with ``self.fused_tuning``'s (with ``"auto"``, none:
        that program also trains, see `Tuning.for_backend`).
    """

    def __init__(
        self,
        config: PPOConfig,
        policy: LanguageModel,
        reward: Any,
        critic: ValueModel | None = None,
        mesh: Mesh | None = None,
        tuning: Tuning | str | None = "auto",
        environment: Environment | None = None,
    ):
        check_threefry_partitionable()
        if environment is not None:
            check_environment(config, environment, reward)
            if reward is None:
                reward = no_reward  # every reward comes from the environment
        self.environment = environment
        self.uses_host_env = environment is not None and environment.on_host
        if config.shared_trunk and critic is not None:
            raise ValueError("config.shared_trunk=True uses a value head on the policy; pass critic=None")
        if not config.uses_critic and critic is not None:
            raise ValueError(f"advantage_estimator={config.advantage_estimator!r} is critic-free: pass critic=None")
        if not isinstance(reward, TextReward) and not callable(reward):
            raise TypeError(f"reward must be a JAX function, a RewardModel or a TextReward, got {reward!r}")
        if config.greedy_rollout and is_host_reward(reward):
            raise ValueError(
                "greedy_rollout (ReMax's baseline) scores the greedy responses inside the jit: it needs "
                "a JAX reward function or a RewardModel, not a TextReward"
            )
        self.config = config
        # The config's plug-ins, traced once on abstract inputs: a broken one is refused here.
        plugins.check_plugins(config, HyperParams.from_config(config), value_shapes=config.uses_critic)
        self.policy = policy
        # LoRA (`policy.config.lora`): the state trains the adapters only; the frozen base is the
        # reference (`frozen.ref_params`) and the policy is `LoraParams(base, adapters)`.
        self.lora = policy.config.lora
        if self.lora is not None and self.lora.dropout > 0:
            raise ValueError(
                f"LoRA dropout ({self.lora.dropout}) would make the update's log-probs differ from the "
                "rollout's at the same parameters (a PPO ratio != 1 from noise alone): use dropout=0 "
                "for PPO"
            )
        if config.max_staleness > 0 and is_host_reward(reward):
            raise ValueError(
                f"max_staleness={config.max_staleness} keeps scored rollouts in flight in the state, scored inside "
                "the jit: it needs a JAX reward function or a RewardModel, not a TextReward"
            )
        self.reward = reward
        self.has_critic = config.uses_critic
        self.critic = None if (config.shared_trunk or not self.has_critic) else (critic or ValueModel(policy.config))
        self.mesh = make_mesh(devices=jax.devices()[:1]) if mesh is None else mesh
        divisor = batch_size_divisor(self.mesh)
        micro = config.minibatch_size // config.grad_accum_steps
        if micro % divisor:
            raise ValueError(
                f"the micro-batch size minibatch_size / grad_accum_steps = {micro} must be a multiple of "
                f"the number of data-parallel devices ({divisor}) so every device gets whole rows"
            )
        # Chosen once for the rollout's shape: the policy decodes with it, the sampling programs
        # compile with its options.
        if config.rollout_slots is not None and config.rollout_slots % divisor:
            raise ValueError(
                f"config.rollout_slots={config.rollout_slots} must be a multiple of the number of "
                f"data-parallel devices ({divisor}): every device serves its own rows with its own slots"
            )
        decode_rows = config.rollout_size if config.rollout_slots is None else config.rollout_slots
        rows_per_device, width = max(1, decode_rows // divisor), model_width(policy)
        self.tuning = resolve_tuning(tuning, rows_per_device=rows_per_device, width=width)
        self.fused_tuning = resolve_tuning(tuning, rows_per_device=rows_per_device, width=width, trains=True)
        if hasattr(policy, "with_tuning"):
            policy = self.policy = policy.with_tuning(self.tuning)
        # What samples: the policy itself, or (rollout_dtype) the same architecture computing in that
        # dtype, called with a cast copy of the parameters (`sampler_params`).
        self.sampler = policy if config.rollout_dtype is None else sampler_model(policy, config.rollout_dtype)
        self.models = Models(policy, self.critic, has_value=self.has_critic)
        self.policy_optimizer = make_optimizer(config, "policy")
        self.value_optimizer = make_optimizer(config, "value") if self.has_critic else None
        self.uses_host_reward = is_host_reward(reward)
        # Host rewards and host environments split the step around the host (rollout_step, update_step).
        self.uses_host_rollout = self.uses_host_reward or self.uses_host_env
        self._host_episodes = None
        if self.uses_host_env:
            assert environment is not None
            self._host_episodes = HostEpisodes(
                self.sampler, environment, episode_settings(config, policy), vocab_size=policy.config.vocab_size
            )
        self._abstract_state = self._build_abstract_state()
        self._state_shardings = jax.tree.map(lambda s: s.sharding, self._abstract_state)

        # The jitted entry points, built once (compiled on first use per input shapes/shardings).
        rep, batch_sh = replicated(self.mesh), batch_sharding(self.mesh)
        step_shardings = (self._state_shardings, rep)  # metrics: replicated scalars
        # The programs that sample compile with the tuning's compiler options.
        self._jit_fused = self.fused_tuning.jit(self.fused_step, out_shardings=step_shardings)
        self._jit_fused_donated = self.fused_tuning.jit(self.fused_step, out_shardings=step_shardings, donate_argnums=0)
        # One sharding for the whole Rollout (a pytree prefix): every field is batch-sharded.
        self._jit_rollout = self.tuning.jit(self.rollout, out_shardings=batch_sh)
        self._jit_update = jax.jit(self.update, out_shardings=step_shardings)
        self._jit_init = jax.jit(self._init_from_seed, out_shardings=self._state_shardings)
        self._jit_score = None  # built on first use (`score_step`)
        self._jit_fill = self.tuning.jit(self.fill_pipeline, out_shardings=self._state_shardings)

    # ------------------------------------------------------------------ state

    def check_config(self, config: PPOConfig) -> None:
        """``config`` may initialise this trainer's state: it has the trainer's structure."""
        problems = structure_differences(self.config, config)
        if uses_entropy(config) and not uses_entropy(self.config):
            problems.append("entropy_coef: the trainer was built with 0 (no entropy term)")
        if problems:
            raise ValueError("this PPO trainer was built for another structure: " + "; ".join(problems))

    def _init_state(self, policy_params, value_params, seed_key, numbers) -> TrainState:
        """The initial state from parameters, a PRNG key and ``numbers`` (`initial_numbers`).

        Without a critic ``value_params`` and ``value_opt_state`` are empty dicts: no leaves. With
        LoRA, ``policy_params`` is the base (fresh adapters are drawn from ``seed_key``) or
        `LoraParams` (its adapters are used); the state holds the adapters only."""
        if self.lora is not None:
            policy_params = self._initial_adapters(policy_params, seed_key)
        if self.has_critic:
            value_opt_state = init_optimizer_state(self.value_optimizer, value_params, numbers["value_optimizer"])
        else:
            value_params, value_opt_state = {}, {}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            policy_params=policy_params,
            value_params=value_params,
            policy_opt_state=init_optimizer_state(self.policy_optimizer, policy_params, numbers["policy_optimizer"]),
            value_opt_state=value_opt_state,
            kl_ctl=KLControllerState(kl_coef=numbers["kl_coef"]),
            score_stats=ScoreStats.zeros(),
            hparams=numbers["hparams"],
            key=seed_key,
            pipeline=self._empty_pipeline(),
        )

    def _empty_pipeline(self) -> pipeline.InFlight | None:
        """The queue of ``max_staleness`` empty slots (None when it is 0: no leaves)."""
        config = self.config
        if config.max_staleness == 0:
            return None
        return pipeline.empty_queue(
            config.max_staleness,
            config.prompts_per_step,
            config.max_prompt_len,
            config.rollout_size,
            config.max_new_tokens,
            with_greedy=config.greedy_rollout,
        )

    def _initial_adapters(self, policy_params, seed_key):
        """LoRA: the adapters of `LoraParams`, or fresh ones (`B = 0`) for base parameters."""
        if isinstance(policy_params, LoraParams):
            return policy_params.adapters
        return init_lora(self.lora, policy_params, jax.random.fold_in(seed_key, 2))

    def policy_params(self, state: TrainState, frozen: FrozenParams | None):
        """What the policy is called with: the state's parameters, or with LoRA
        `LoraParams(frozen base, state's adapters)`."""
        if self.lora is None:
            return state.policy_params
        if frozen is None:
            raise ValueError("with LoRA the policy needs its frozen base: pass frozen")
        return LoraParams(frozen.ref_params, state.policy_params)

    def default_value_params(self, policy_params, key):
        """Critic parameters when none are given: a zero value head on a copy of the policy's
        trunk (separate critic) or on the policy itself (shared trunk); ``{}`` without a critic."""
        if not self.has_critic:
            return {}
        policy_params = lora_base_params(policy_params)
        if not self.config.shared_trunk and is_quantized(policy_params):
            raise ValueError(
                "a separate critic trains a full copy of the policy's trunk, which cannot be a "
                "quantised (QLoRA) base: pass value_params (a float critic), or use shared_trunk=True "
                "or a critic-free advantage_estimator"
            )
        if self.config.shared_trunk:
            return init_value_head(key, self.policy.config.hidden_size)
        assert self.critic is not None  # a critic without a shared trunk is a separate ValueModel
        if self.critic.config != self.policy.config:
            raise ValueError("the critic's architecture differs from the policy's: pass value_params")
        return self.critic.init_params(key, trunk_params=policy_params)

    def abstract_state(self) -> TrainState:
        """`TrainState` of `jax.ShapeDtypeStruct`s with their shardings (e.g. a restore target)."""
        return self._abstract_state

    def state_shardings(self) -> TrainState:
        return self._state_shardings

    def _init_from_seed(self, policy_params, value_params, seed, numbers) -> TrainState:
        """`_init_state` with the PRNG key from ``seed`` (and, if ``value_params`` is None, the
        default critic from that key): traceable, so a sweep vmaps it over seeds and numbers."""
        seed_key = jax.random.PRNGKey(seed)
        if value_params is None:
            _, value_key = jax.random.split(jax.random.fold_in(seed_key, 1))
            value_params = self.default_value_params(policy_params, value_key)
        return self._init_state(policy_params, value_params, seed_key, numbers)

    def init_state(self, policy_params, value_params=None, config: PPOConfig | None = None) -> TrainState:
        """The initial `TrainState`, placed on the mesh.

        ``config`` (default: the trainer's) gives the numbers and the seed of the PRNG key; it must
        have the trainer's structure, and then the state runs on the already compiled step.
        """
        config = self.config if config is None else config
        self.check_config(config)
        if not self.has_critic and value_params:
            raise ValueError(f"advantage_estimator={config.advantage_estimator!r} is critic-free: pass no value_params")
        seed = jnp.asarray(config.seed, jnp.uint32)
        return self._jit_init(policy_params, value_params, seed, initial_numbers(config))

    def frozen_params(self, ref_params, reward_params=None) -> FrozenParams:
        """The reference policy (and reward model) parameters, placed on the mesh."""
        if isinstance(self.reward, RewardModel) and reward_params is None:
            raise ValueError("a RewardModel reward needs reward_params")
        frozen = FrozenParams(lora_base_params(ref_params), reward_params)  # LoRA: the base alone
        return jax.device_put(frozen, self.frozen_shardings(frozen))

    def frozen_shardings(self, frozen: FrozenParams) -> FrozenParams:
        reward_shardings = None
        if frozen.reward_params is not None:
            reward_shardings = param_shardings(frozen.reward_params, self.mesh)
        return FrozenParams(param_shardings(frozen.ref_params, self.mesh), reward_shardings)

    def prompt_batch(self, prompt_ids, prompt_mask) -> PromptBatch:
        """Host prompt arrays ``[batch_size / num_generations, P]`` (the global batch of distinct
        prompts, on every process) -> `PromptBatch` on the mesh (split over the batch shards when
        they divide it, else replicated: the step repeats each prompt G times, then splits)."""
        prompt_ids, prompt_mask = np.asarray(prompt_ids, np.int32), np.asarray(prompt_mask, np.int32)
        sharding = self._prompts_sharding(prompt_ids.shape[0])
        return PromptBatch(global_array(prompt_ids, sharding), global_array(prompt_mask, sharding))

    def prompt_batches(self, prompt_ids, prompt_mask) -> PromptBatch:
        """Host prompt arrays ``[k, batch_size / num_generations, P]`` (the next k steps' batches, what
        `fill_pipeline` samples) -> a `PromptBatch` on the mesh, split over axis 1 like `prompt_batch`."""
        prompt_ids, prompt_mask = np.asarray(prompt_ids, np.int32), np.asarray(prompt_mask, np.int32)
        sharding = NamedSharding(self.mesh, PartitionSpec(None, *self.prompt_batches_sharding_spec()))
        return PromptBatch(global_array(prompt_ids, sharding), global_array(prompt_mask, sharding))

    def prompt_batches_sharding_spec(self) -> tuple:
        """The partition of a step's distinct prompts ``[B / G, P]``: split over the batch axes when
        they divide ``B / G``, else replicated (as `prompt_batch` places them)."""
        return tuple(self._prompts_sharding(self.config.prompts_per_step).spec)

    def _prompts_sharding(self, rows: int, batch_dim: int = 0) -> NamedSharding:
        if rows % batch_size_divisor(self.mesh) == 0:
            return batch_sharding(self.mesh, batch_dim)
        return replicated(self.mesh)

    def kl_controller(self, hparams: HyperParams):
        """The KL controller's update with the state's target and horizon (its initial beta is
        ``kl_coef``, written by `init_state`)."""
        if self.config.adaptive_kl:
            return adaptive_kl_controller(0.0, hparams.target_kl, hparams.kl_horizon)
        return fixed_kl_controller(0.0)

    # ------------------------------------------------------------------ the step (pure, traceable)

    def _constrain_batch(self, x, batch_dim: int = 0):
        return jax.lax.with_sharding_constraint(x, batch_sharding(self.mesh, batch_dim))

    def _check_batch(self, batch: PromptBatch):
        rows, width = batch.ids.shape
        config = self.config
        if rows != config.prompts_per_step:
            B, G, f = config.batch_size, config.num_generations, config.dynamic_sampling_oversample
            how = (
                f"batch_size / num_generations = {B} / {G}"
                if f == 1
                else f"batch_size * dynamic_sampling_oversample / num_generations = {B} * {f} / {G}"
            )
            raise ValueError(
                f"prompt batch has {rows} rows; the step takes {how} = {config.prompts_per_step} "
                "prompts (each sampled num_generations times)"
            )
        if width > self.config.max_prompt_len:
            raise PromptTooLongError(
                f"prompt batch is {width} tokens wide, more than config.max_prompt_len={self.config.max_prompt_len}"
            )

    @staticmethod
    def _keys(state: TrainState):
        rollout_key, update_key, next_key = jax.random.split(state.key, 3)
        return rollout_key, update_key, next_key

    def repeat_prompts(self, batch: PromptBatch) -> PromptBatch:
        """``[B / G, P]`` distinct prompts -> ``[B, P]``: each repeated G times in consecutive rows
        (row b is a copy of prompt b // G), split over the batch shards."""
        G = self.config.num_generations
        if G == 1:
            return batch
        return PromptBatch(*(self._constrain_batch(jnp.repeat(x, G, axis=0)) for x in batch))

    def sampler_params(self, state: TrainState, frozen: FrozenParams | None):
        """What the sampler is called with: `policy_params`, or with ``rollout_dtype`` a copy of them
        with every floating-point leaf in that dtype (with LoRA: the base and the adapters), made
        inside the jitted step, once per step; the trainer's own parameters are untouched."""
        params = self.policy_params(state, frozen)
        if self.config.rollout_dtype is None:
            return params
        return cast_floating(params, self.config.rollout_dtype)

    def rollout(
        self,
        state: TrainState,
        frozen: FrozenParams,
        batch: PromptBatch,
        stop_axis_name: str | None = None,
        key: jax.Array | None = None,
    ) -> Rollout:
        """Sample the responses of one iteration (pure; `rollout_step` is its jitted form): ``[B, N]``,
        G consecutive rows per prompt of ``batch``, each row with its own random draws, by the sampler
        (`sampler_params`). ``stop_axis_name``: a sweep's vmapped run axis (its runs stop decoding
        together; same samples). ``key``: default the step's rollout key."""
        self._check_batch(batch)
        rollout_key = self._keys(state)[0] if key is None else key
        if self.environment is not None:  # multi-turn episodes, the environment in the loop
            out = episode_rollout(
                self.config,
                self.sampler,
                self.sampler_params(state, frozen),
                batch,
                rollout_key,
                state.hparams,
                self.environment,
                stop_axis_name=stop_axis_name,
            )
            return jax.tree.map(self._constrain_batch, out)
        out = rollout(
            self.config,
            self.sampler,
            self.sampler_params(state, frozen),
            batch,  # each prompt prefilled once for its G rows
            rollout_key,
            state.hparams,
            stop_axis_name=stop_axis_name,
            num_generations=self.config.num_generations,
            mesh=self.mesh,
        )
        return jax.tree.map(self._constrain_batch, out)

    def greedy_rollout(
        self,
        state: TrainState,
        batch: PromptBatch,
        stop_axis_name: str | None = None,
        frozen: FrozenParams | None = None,
    ) -> Rollout:
        """One greedy (temperature 0) response per distinct prompt, ``[B / G, N]`` (ReMax), by the
        sampler. ``frozen`` is needed with LoRA (the base)."""
        self._check_batch(batch)
        if self.lora is not None and frozen is None:
            raise ValueError("with LoRA the policy needs its frozen base: pass frozen")
        if self.environment is not None:  # the greedy episode (temperature 0) of each prompt
            return episode_rollout(
                self.config,
                self.sampler,
                self.sampler_params(state, frozen),
                batch,
                jax.random.PRNGKey(0),
                state.hparams,
                self.environment,
                stop_axis_name=stop_axis_name,
                greedy=True,
            )
        return greedy_rollout(
            self.config, self.sampler, self.sampler_params(state, frozen), batch, stop_axis_name=stop_axis_name
        )

    def sample(
        self,
        state: TrainState,
        frozen: FrozenParams,
        batch: PromptBatch,
        stop_axis_name: str | None = None,
        slot=None,
    ) -> pipeline.InFlight:
        """Rollout, scoring in the jit and (``greedy_rollout``) the greedy baseline of ``batch``, with
        the state's parameters: one `InFlight` batch of episodes (pure). ``slot``: the queue slot a
        filling run samples (`fill_pipeline`), with that slot's key; None: the step's own rollout."""
        if self.uses_host_rollout:
            raise TypeError("a TextReward or a host environment runs on the host: use rollout_step, then update_step")
        key = None if slot is None else pipeline.fill_key(state.key, slot, self.config.max_staleness)
        rollout_out = self.rollout(state, frozen, batch, stop_axis_name, key=key)
        prompts = self.repeat_prompts(batch)
        raw_scores_B = score_in_jit(
            self.reward, frozen.reward_params, prompts.ids, prompts.mask, rollout_out.tokens, rollout_out.mask
        )
        greedy = None
        if self.config.greedy_rollout:
            greedy_out = self.greedy_rollout(state, batch, stop_axis_name, frozen=frozen)
            greedy_scores_P = score_in_jit(
                self.reward, frozen.reward_params, batch.ids, batch.mask, greedy_out.tokens, greedy_out.mask
            )
            greedy = (greedy_out, greedy_scores_P)
        return self.in_flight(state, batch, rollout_out, raw_scores_B, greedy, slot)

    def in_flight(
        self, state: TrainState, batch: PromptBatch, rollout_out: Rollout, raw_scores_B, greedy=None, slot=None
    ) -> pipeline.InFlight:
        """Scored rollouts as an `InFlight` batch sampled by the state's parameters (``version =
        state.step``), answering the prompts of step ``state.step + max_staleness`` (of step
        ``state.step + slot`` when filling)."""
        k = self.config.max_staleness
        if k > 0 and batch.ids.shape[1] != self.config.max_prompt_len:
            raise ValueError(
                f"with max_staleness={k} the prompts in flight have one shape: pad them to "
                f"max_prompt_len={self.config.max_prompt_len} (got {batch.ids.shape[1]} tokens)"
            )
        version_B = jnp.full(rollout_out.tokens.shape[:1], state.step, jnp.int32)
        offset = k if slot is None else slot
        return pipeline.InFlight(batch, rollout_out, raw_scores_B, version_B, version_B + offset, greedy)

    def update(
        self,
        state: TrainState,
        frozen: FrozenParams,
        batch: PromptBatch,
        rollout_out: Rollout,
        raw_scores_B,
        greedy: tuple[Rollout, Any] | None = None,
    ) -> tuple[TrainState, Metrics]:
        """Experience + PPO update + KL controller from scored rollouts (pure; see `update_step`):
        `advance` with them.

        ``batch`` holds the distinct prompts (``[B / G, P]``); ``greedy`` the greedy responses and
        their raw scores (with ``greedy_rollout``)."""
        if self.config.greedy_rollout and greedy is None:
            raise ValueError(
                "greedy_rollout is on: update needs greedy=(greedy responses, their scores); train_step computes them"
            )
        return self.advance(state, frozen, self.in_flight(state, batch, rollout_out, raw_scores_B, greedy))

    def advance(self, state: TrainState, frozen: FrozenParams, flight: pipeline.InFlight) -> tuple[TrainState, Metrics]:
        """One step given the episodes just sampled (pure). Synchronous (``max_staleness = 0``):
        train on ``flight``. With ``k > 0``: train on the oldest batch in flight, then `push`
        ``flight`` (`jaxrlhf.training.pipeline`)."""
        if self.config.max_staleness == 0:
            return self.train_on(state, frozen, flight)
        new_state, metrics = self.train_on(state, frozen, pipeline.oldest(state.pipeline))
        return self.push(new_state, flight), metrics

    def push(self, state: TrainState, flight: pipeline.InFlight) -> TrainState:
        """``state`` with ``flight`` appended to its queue and the oldest batch dropped (pure)."""
        new_state = dataclasses.replace(state, pipeline=pipeline.push(state.pipeline, flight))
        return jax.lax.with_sharding_constraint(new_state, self.state_shardings())

    def train_on(
        self, state: TrainState, frozen: FrozenParams, flight: pipeline.InFlight
    ) -> tuple[TrainState, Metrics]:
        """Experience + PPO update + KL controller on one scored batch (pure); the queue, if any, is
        left as it is. With ``max_staleness > 0`` the metrics include the batch's provenance
        (`pipeline.staleness_stats`)."""
        config, hp = self.config, state.hparams
        batch, rollout_out, raw_scores_B, greedy = flight.prompts, flight.rollout, flight.raw_scores, flight.greedy
        _, update_key, next_key = self._keys(state)
        kl_coef = state.kl_ctl.kl_coef
        selection = None
        if config.dynamic_sampling_oversample > 1:
            batch, rollout_out, raw_scores_B, selection = self._keep_groups_with_signal(
                batch, rollout_out, raw_scores_B, hp
            )
        experience, score_stats, exp_stats = make_experience(
            config,
            self.models,
            self.policy_params(state, frozen),
            state.value_params,
            frozen.ref_params,
            self.repeat_prompts(batch),
            rollout_out,
            raw_scores_B,
            kl_coef,
            state.score_stats,
            hp,
            greedy=greedy,
        )
        if selection is not None:
            exp_stats.update(selection)
        if config.max_staleness > 0:
            exp_stats.update(pipeline.staleness_stats(state.step, flight))
        experience = jax.tree.map(self._constrain_batch, experience)

        ppo_update = make_ppo_update(
            config, self.models, self.policy_optimizer, self.value_optimizer, self._constrain_batch
        )
        params = {"policy": state.policy_params, "value": state.value_params}
        opt_states = {"policy": state.policy_opt_state, "value": state.value_opt_state}
        params, opt_states, update_stats = ppo_update(
            params,
            opt_states,
            experience,
            kl_coef,
            hp,
            update_key,
            policy_base=None if self.lora is None else frozen.ref_params,
        )

        kl_ctl = self.kl_controller(hp).update(state.kl_ctl, exp_stats["kl"], config.batch_size)
        new_state = dataclasses.replace(  # flax's `state.replace`, spelled so the type checker sees it
            state,
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
        multiplier = learning_rate_multiplier(config)(state.step * config.updates_per_step)
        metrics["learning_rate"] = state.policy_opt_state.hyperparams["learning_rate"] * multiplier
        if self.has_critic:
            metrics["critic_learning_rate"] = state.value_opt_state.hyperparams["learning_rate"] * multiplier
        # One flag the host checks before committing the new state: scores, losses and params finite.
        finite = jnp.all(jnp.isfinite(raw_scores_B))
        for value in update_stats.values():
            finite &= jnp.isfinite(value)
        finite &= jnp.isfinite(optax.tree.norm(params))
        metrics["all_finite"] = finite
        return new_state, metrics

    def _keep_groups_with_signal(self, batch: PromptBatch, rollout_out: Rollout, raw_scores_B, hparams):
        """DAPO's dynamic sampling: of the ``f * batch_size / G`` sampled groups keep the first
        ``batch_size / G`` with signal (`select_groups_with_signal` on the raw scores plus an
        episode's turn rewards and the overlong penalty, i.e. what the advantages see); rows of
        kept groups without signal (when too few have it) get an all-zero mask. Returns the kept
        prompts, rollouts, scores and stats (the sampled batch's score, its
        group_signal_fraction, kept_group_fraction)."""
        config = self.config
        G = config.num_generations
        shaped_B = episode_outcomes(raw_scores_B, rollout_out)  # an episode's turn rewards count too
        if config.overlong_buffer is not None:
            shaped_B = shaped_B + overlong_penalty(config, rollout_out.mask, hparams)
        sel = select_groups_with_signal(shaped_B, G, config.batch_size // G)
        kept_batch = PromptBatch(*(x[sel.group_indices_K] for x in batch))
        row_valid_R = sel.row_valid_R[:, None].astype(rollout_out.mask.dtype)
        kept = jax.tree.map(lambda x: x[sel.row_indices_R], rollout_out)  # every [B, ...] field, kept rows
        kept_rollout = jax.tree.map(
            self._constrain_batch,
            kept._replace(
                mask=kept.mask * row_valid_R,
                action_mask=None if kept.action_mask is None else kept.action_mask * row_valid_R,
            ),
        )
        stats = {
            "score": jnp.mean(raw_scores_B),
            "score_std": jnp.std(raw_scores_B),
            "group_signal_fraction": sel.signal_fraction,
            "kept_group_fraction": jnp.mean(sel.group_valid_K.astype(jnp.float32)),
            "num_sampled_tokens": jnp.sum(rollout_out.mask).astype(jnp.float32),
        }
        return kept_batch, kept_rollout, self._constrain_batch(raw_scores_B[sel.row_indices_R]), stats

    def fused_step(
        self, state: TrainState, frozen: FrozenParams, batch: PromptBatch, stop_axis_name: str | None = None
    ) -> tuple[TrainState, Metrics]:
        """Rollout, scoring in the jit and update: one whole iteration (pure; see `train_step`):
        `sample` ``batch``, then `advance`. ``stop_axis_name``: see `rollout`. With
        ``max_staleness = k > 0`` ``batch`` holds the prompts of step ``state.step + k``."""
        return self.advance(state, frozen, self.sample(state, frozen, batch, stop_axis_name))

    def fill_pipeline(
        self, state: TrainState, frozen: FrozenParams, batches: PromptBatch, stop_axis_name: str | None = None
    ) -> TrainState:
        """``state`` with its queue filled (``max_staleness = k > 0``; pure, `fill_step` is its jitted
        form): ``batches`` ``[k, B / G, P]`` are the prompts of steps ``state.step .. + k - 1``, each
        sampled and scored with the state's parameters (`sample`, slot i with its own key) and put
        in flight. The state's key is not advanced: the same state fills the same queue."""
        k = self.config.max_staleness
        if k == 0:
            raise ValueError("fill_pipeline: max_staleness is 0, there is no queue to fill")
        if batches.ids.shape[0] != k:
            raise ValueError(
                f"fill_pipeline takes the prompts of the next max_staleness={k} steps, got {batches.ids.shape[0]}"
            )
        new_state = dataclasses.replace(state, pipeline=self.filled_queue(state, frozen, batches, stop_axis_name))
        return jax.lax.with_sharding_constraint(new_state, self.state_shardings())

    def filled_queue(
        self, state: TrainState, frozen: FrozenParams, batches: PromptBatch, stop_axis_name: str | None = None
    ) -> pipeline.InFlight:
        """The queue `fill_pipeline` puts in ``state`` (pure): reads only what sampling reads."""
        slots = jnp.arange(self.config.max_staleness, dtype=jnp.int32)
        queue = jax.lax.map(
            lambda slot_and_batch: self.sample(state, frozen, slot_and_batch[1], stop_axis_name, slot_and_batch[0]),
            (slots, batches),
        )
        return jax.tree.map(lambda empty, x: x.astype(empty.dtype), self._empty_pipeline(), queue)  # its dtypes

    # ------------------------------------------------------------------ jitted entry points

    def train_step(self, state: TrainState, frozen: FrozenParams, batch: PromptBatch) -> tuple[TrainState, Metrics]:
        """One PPO iteration under a single `jax.jit` (JAX reward function or reward model)."""
        return self._jit_fused(state, frozen, batch)

    def rollout_step(self, state: TrainState, frozen: FrozenParams, batch: PromptBatch) -> Rollout:
        """First half of the split step: sample responses (jitted), ``[batch_size, N]``; with a host
        environment, its episodes (jitted turns, the environment called between them)."""
        if self._host_episodes is None:
            return self._jit_rollout(state, frozen, batch)
        self._check_batch(batch)
        rollout_key, _, _ = self._keys(state)
        episodes = self._host_episodes(
            self.sampler_params(state, frozen),
            batch.ids,
            batch.mask,
            rollout_key,
            temperature=state.hparams.temperature,
            top_p=state.hparams.top_p if self.config.top_p < 1.0 else 1.0,
            num_generations=self.config.num_generations,
        )
        rollout_out = Rollout(
            episodes.tokens,
            episodes.mask,
            episodes.logprobs,
            episodes.action_mask,
            episodes.token_rewards,
            episodes.episode_stats,
        )
        return jax.device_put(rollout_out, batch_sharding(self.mesh))

    def score_step(self, frozen: FrozenParams, batch: PromptBatch, rollout_out: Rollout) -> jax.Array:
        """The JAX reward of rollouts made outside the fused step (a host environment's), jitted."""
        if self._jit_score is None:
            self._jit_score = jax.jit(
                lambda frozen, batch, rollout_out: score_in_jit(
                    self.reward,
                    frozen.reward_params,
                    *self.repeat_prompts(batch),
                    rollout_out.tokens,
                    rollout_out.mask,
                )
            )
        return self._jit_score(frozen, batch, rollout_out)

    def update_step(self, state, frozen, batch, rollout_out: Rollout, raw_scores_B) -> tuple[TrainState, Metrics]:
        """Second half of the split step: experience + PPO update from host-computed scores (jitted)."""
        raw_scores_B = check_scores(np.asarray(raw_scores_B, np.float32), self.config.rollout_size, "text reward")
        raw_scores_B = global_array(np.asarray(raw_scores_B), batch_sharding(self.mesh))
        return self._jit_update(state, frozen, batch, rollout_out, raw_scores_B)

    def fill_step(self, state: TrainState, frozen: FrozenParams, batches: PromptBatch) -> TrainState:
        """`fill_pipeline`, jitted: ``batches`` from `prompt_batches` (the next ``max_staleness``
        steps' prompts)."""
        return self._jit_fill(state, frozen, batches)

    def needs_fill(self, state: TrainState) -> bool:
        """Whether ``state`` has an empty slot in flight (a fresh state with ``max_staleness > 0``):
        `fill_step` it before its first step. Reads the queue's versions on the host."""
        return self.config.max_staleness > 0 and pipeline.is_empty(state.pipeline)

    def bind(
        self, frozen: FrozenParams, donate: bool = False
    ) -> Callable[[TrainState, PromptBatch], tuple[TrainState, Metrics]]:
        """``train_step(state, prompts) -> (state, metrics)`` with the frozen parameters bound.

        With ``donate=True`` the step donates the input state's buffers to the new state (same
        program, but parameters and optimizer moments are not held twice; the state passed in
        is deleted). `train` does not donate: its NaN guard keeps the previous state.
        """
        step = self._jit_fused_donated if donate else self._jit_fused

        def train_step(state: TrainState, batch: PromptBatch):
            return step(state, frozen, batch)

        return train_step

    def compiled_step_count(self, which: str = "fused") -> int:
        """How many programs the jitted ``"fused"``, ``"rollout"``, ``"update"`` or ``"fill"`` step holds (for
        tests that a step compiles once)."""
        jitted = {"fused": self._jit_fused, "rollout": self._jit_rollout, "update": self._jit_update}
        jitted["fill"] = self._jit_fill
        return jitted[which]._cache_size()

    # ------------------------------------------------------------------ shapes and shardings

    def _build_abstract_state(self) -> TrainState:
        seed_key = jax.random.PRNGKey(0)

        def init_from_scratch():
            policy_params = self.policy.init_params(seed_key)
            if not self.has_critic:
                value_params = {}
            elif self.config.shared_trunk:
                value_params = init_value_head(seed_key, self.policy.config.hidden_size)
            else:
                assert self.critic is not None  # a critic without a shared trunk is a separate ValueModel
                value_params = self.critic.init_params(seed_key)
            return self._init_state(policy_params, value_params, seed_key, initial_numbers(self.config))

        shapes = jax.eval_shape(init_from_scratch)
        shardings = self._shardings_for(shapes)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

    def _shardings_for(self, shapes: TrainState) -> TrainState:
        mesh = self.mesh
        rep = replicated(mesh)
        policy_sh = param_shardings(shapes.policy_params, mesh)
        if not self.has_critic:
            value_sh = {}
        elif self.config.shared_trunk:
            value_sh = jax.tree.map(lambda _: rep, shapes.value_params)
        else:
            value_sh = {
                "trunk": param_shardings(shapes.value_params["trunk"], mesh),
                "head": jax.tree.map(lambda _: rep, shapes.value_params["head"]),
            }
        everything_replicated = jax.tree.map(lambda _: rep, shapes)
        # The queue in flight ([k, rows, ...]): split over the rows like the batch it holds.
        queue_sh = jax.tree.map(lambda s: self._prompts_sharding(s.shape[1], batch_dim=1), shapes.pipeline)
        return everything_replicated.replace(
            pipeline=queue_sh,
            policy_params=policy_sh,
            value_params=value_sh,
            policy_opt_state=opt_state_shardings(self.policy_optimizer, shapes.policy_opt_state, policy_sh, mesh),
            value_opt_state=(
                {}
                if not self.has_critic
                else opt_state_shardings(self.value_optimizer, shapes.value_opt_state, value_sh, mesh)
            ),
        )


def sampler_model(policy: LanguageModel, dtype: str) -> LanguageModel:
    """``policy`` computing in ``dtype`` (activations, KV cache and parameter storage; the logits stay
    float32): the low-precision sampler of ``PPOConfig.rollout_dtype``."""
    config = getattr(policy, "config", None)
    if config is None or not hasattr(config, "dtype") or not hasattr(config, "param_dtype"):
        raise TypeError(f"rollout_dtype needs a policy whose config has dtype and param_dtype, got {policy!r}")
    return dataclasses.replace(policy, config=config.replace(dtype=dtype, param_dtype=dtype))


def cast_floating(params, dtype: str):
    """``params`` with every floating-point leaf cast to ``dtype`` (integer leaves, e.g. quantised
    codes or a PRNG key, as they are)."""
    target = jnp.dtype(dtype)
    return jax.tree.map(lambda p: p.astype(target) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
