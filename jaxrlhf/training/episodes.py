"""The trainer's side of multi-turn episodes: a `PPOConfig`'s episode settings, the rollout that
runs them (`jaxrlhf.episodes.run_episodes` with the state's numbers) and the checks of an
environment against the config, before anything compiles."""

from __future__ import annotations

import jax.numpy as jnp

from jaxrlhf.episodes import Environment, EpisodeSettings, run_episodes
from jaxrlhf.models.lm import LanguageModel
from jaxrlhf.training.config import PPOConfig
from jaxrlhf.training.experience import PromptBatch, Rollout, resolve_eos
from jaxrlhf.training.hparams import HyperParams
from jaxrlhf.training.rewards import is_host_reward


def no_reward(prompt_ids, prompt_mask, response_ids, response_mask):
    """The trainer's reward when every reward comes from the environment: 0 for every episode."""
    return jnp.zeros(response_ids.shape[:1], jnp.float32)


def max_turn_tokens(config: PPOConfig) -> int:
    """A turn's action budget A: ``config.max_turn_tokens``, or the whole budget N."""
    return config.max_new_tokens if config.max_turn_tokens is None else config.max_turn_tokens


def episode_settings(config: PPOConfig, policy: LanguageModel) -> EpisodeSettings:
    return EpisodeSettings(
        max_new_tokens=config.max_new_tokens,
        max_turns=config.max_turns,
        max_turn_tokens=max_turn_tokens(config),
        top_k=config.top_k,
        filter_top_p=config.top_p < 1.0,
        eos_token_id=resolve_eos(config, policy),
        pad_token_id=config.pad_token_id,
    )


def check_environment(config: PPOConfig, env: Environment, reward) -> None:
    """An environment the trainer can run: the protocol's static attributes, and settings that
    go with episodes (no refilled slots; ReMax's greedy episodes need a JAX-native environment)."""
    if not isinstance(env, Environment):
        raise TypeError(f"environment must be a jaxrlhf.episodes.Environment, got {env!r}")
    O = env.max_observation_tokens
    if isinstance(O, bool) or not isinstance(O, int) or O < 0:
        raise ValueError(f"environment {env.name}: max_observation_tokens must be an int >= 0, got {O!r}")
    if config.rollout_slots is not None:
        raise ValueError("rollout_slots (refilled slots) decode single responses: set it to None for episodes")
    if config.max_staleness > 0:
        raise ValueError(
            "max_staleness > 0 keeps single-turn rollouts in flight; episodes train synchronously (max_staleness=0)"
        )
    if env.on_host and config.greedy_rollout:
        raise ValueError(
            f"greedy_rollout decodes greedy episodes inside the jit: environment {env.name} runs on the host"
        )
    if env.on_host and reward is not None and not callable(reward) and not is_host_reward(reward):
        raise TypeError(f"reward must be a JAX function, a RewardModel, a TextReward or None, got {reward!r}")


def episode_rollout(
    config: PPOConfig,
    policy: LanguageModel,
    policy_params,
    prompts: PromptBatch,
    key,
    hparams: HyperParams,
    env: Environment,
    stop_axis_name: str | None = None,
    greedy: bool = False,
) -> Rollout:
    """``num_generations`` episodes per prompt with a JAX-native environment (`run_episodes`), as a
    `Rollout`; ``greedy``: one argmax episode per prompt (temperature 0, ReMax's baseline)."""
    out = run_episodes(
        policy,
        policy_params,
        prompts.ids,
        prompts.mask,
        key,
        env,
        max_new_tokens=config.max_new_tokens,
        max_turns=config.max_turns,
        max_turn_tokens=max_turn_tokens(config),
        temperature=0.0 if greedy else hparams.temperature,
        top_k=None if greedy else config.top_k,
        top_p=hparams.top_p if (config.top_p < 1.0 and not greedy) else 1.0,
        eos_token_id=resolve_eos(config, policy),
        pad_token_id=config.pad_token_id,
        num_generations=1 if greedy else config.num_generations,
        stop_axis_name=stop_axis_name,
    )
    return Rollout(out.tokens, out.mask, out.logprobs, out.action_mask, out.token_rewards, out.episode_stats)
