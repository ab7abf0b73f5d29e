"""Toy environments and a tiny policy shared by the episode tests (not a test module)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny_config

from jaxrlhf.episodes import Environment, StepOutput
from jaxrlhf.models import LanguageModel

VOCAB, EOS, STOP = 32, 2, 5  # STOP (a closing tool tag) ends a turn
P, N, A, TURNS = 4, 24, 6, 4


@dataclasses.dataclass(frozen=True)
class EchoEnv(Environment):
    """A toy tool: each turn it answers ``[20 + turn, 10 + (first action token % 7), 21]`` cut to
    ``2 + turn % 2`` tokens; reward 1 when the turn's action holds token 7; done after 3 turns."""

    max_observation_tokens: int = 3
    stop_token_ids: tuple[int, ...] = (STOP,)
    metric_names: tuple[str, ...] = ("tool_calls",)

    def reset(self, key, prompt_ids, prompt_mask):
        return {"turn": jnp.zeros(prompt_ids.shape[0], jnp.int32)}

    def step(self, state, action_ids, action_mask):
        turn = state["turn"]
        obs = jnp.stack([20 + turn, 10 + action_ids[:, 0] % 7, jnp.full_like(turn, 21)], axis=1)
        length = 2 + turn % 2
        obs_mask = (jnp.arange(3)[None, :] < length[:, None]).astype(jnp.int32)
        reward = jnp.any((action_ids == 7) & (action_mask > 0), axis=1).astype(jnp.float32)
        metrics = {"tool_calls": jnp.ones_like(reward)}
        return StepOutput({"turn": turn + 1}, obs, obs_mask, reward, turn + 1 >= 3, metrics)


@dataclasses.dataclass(frozen=True)
class HostEchoEnv(Environment):
    """`EchoEnv` in NumPy, on the host (per-row Python state)."""

    max_observation_tokens: int = 3
    stop_token_ids: tuple[int, ...] = (STOP,)
    metric_names: tuple[str, ...] = ("tool_calls",)
    on_host: bool = True

    def reset(self, key, prompt_ids, prompt_mask):
        return [0] * prompt_ids.shape[0]

    def step(self, state, action_ids, action_mask):
        B = action_ids.shape[0]
        acted = action_mask.sum(1) > 0
        turns = np.array(state)
        obs = np.stack([20 + turns, 10 + action_ids[:, 0] % 7, np.full(B, 21)], axis=1)
        obs_mask = (np.arange(3)[None, :] < (2 + turns % 2)[:, None]).astype(np.int32)
        reward = np.any((action_ids == 7) & (action_mask > 0), axis=1).astype(np.float32)
        new_state = [t + 1 if a else t for t, a in zip(state, acted)]  # rows that did not act keep theirs
        return StepOutput(new_state, obs, obs_mask, reward, turns + 1 >= 3, {"tool_calls": np.ones(B)})


def tiny_policy():
    """A tiny Llama whose head makes STOP and token 7 likely enough that turns end early and
    rewards vary."""
    model = LanguageModel(tiny_config("llama", vocab_size=VOCAB, eos_token_id=EOS, max_position_embeddings=64))
    params = model.init_params(jax.random.PRNGKey(0))
    # Make STOP and 7 likely enough that turns end early and rewards vary.
    head = params["lm_head"].at[:, STOP].add(0.6).at[:, 7].add(0.3)
    return model, {**params, "lm_head": head}


@dataclasses.dataclass(frozen=True)
class OneTurn(Environment):
    """No tool: the first turn ends the episode (a single-turn response)."""

    max_observation_tokens: int = 1

    def reset(self, key, prompt_ids, prompt_mask):
        return {}

    def step(self, state, action_ids, action_mask):
        B = action_ids.shape[0]
        return StepOutput(
            state, jnp.zeros((B, 1), jnp.int32), jnp.zeros((B, 1), jnp.int32), jnp.zeros(B), jnp.ones(B, bool)
        )
