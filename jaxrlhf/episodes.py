"""Multi-turn episodes: the policy acts, an environment answers, turn after turn (DESIGN.md, "Episodes").

An episode row is the ``N`` tokens after its prompt: action segments the policy samples and
observation segments the environment writes, alternating, until the environment says done, the
policy emits EOS, ``max_turns`` turns have passed or the budget ``N`` is spent:

    prompt | a a a a ] | = 3 5 ; | a a a ] | = 1 2 ; | a a <eos> | . . .
    mask       1 1 1 1 1   1 1 1 1   1 1 1 1   1 1 1 1   1 1 1       0 0 0   (attended)
    action     1 1 1 1 1   0 0 0 0   1 1 1 1   0 0 0 0   1 1 1       0 0 0   (sampled)

**Environments.** An `Environment` is batched over the B rows and has static shapes:
``reset(key, prompt_ids [B, P], prompt_mask [B, P]) -> state`` (a pytree whose leaves have a
leading B axis) and ``step(state, action_ids [B, A], action_mask [B, A]) -> StepOutput(state,
obs_ids [B, O], obs_mask [B, O], reward [B], done [B], metrics)``, where ``A`` is the per-turn
action budget and ``O = env.max_observation_tokens``. A turn ends at one of
``env.stop_token_ids`` (e.g. a closing tool tag), at EOS, or after ``A`` tokens; ``step`` sees the
turn's tokens (the action mask marks them, the stop token included). Two kinds:

- JAX-native (``env.on_host = False``): pure functions, traced into the rollout's jitted loop
  (and so into the fused PPO step, a sweep's ``vmap``, the mesh). Every row of the batch is
  stepped each turn; rows that were not acting keep their old state (`jnp.where`), so ``step``
  must be total: any padding action gives some (ignored) output.
- On the host (``env.on_host = True``): the same calls with NumPy arrays (the reset key as its
  raw key data), for tools that cannot be JAX (code execution, a search index). The rollout then
  runs jitted turns with the environment called between them (one device -> host -> device round
  trip per turn), and every output is checked (`check_step_output`): shapes, dtypes, ids in the
  vocabulary, the observation mask a prefix; an exception is re-raised as `EnvError` naming the
  environment.

**Schedule.** Turns are synchronous across rows: each turn decodes every acting row until all of
them have ended their turn, then the environment steps, then the observations are written. So
the JAX-native and host rollouts compute the same episodes (the same jitted per-turn pieces in the
same order). Each row is independent of the others: its randomness is addressed by (row, token
index) (`uniforms[t, b]`, as `generate` draws them), its cache slots and positions are its own.

**The KV cache.** Observations enter the cache after the action that provoked them, in one
forward of ``O`` tokens with per-row valid lengths (`LanguageModel.forward`'s ``[B]``
``cache_index`` and ``valid_lengths``): the history is never prefilled twice. Token-in,
token-out: the episode's tokens are exactly the ids the policy sampled and the ids the
environment returned, never re-tokenised.

**Rewards.** ``step``'s reward of turn k goes on the last action token of turn k
(`Rollout.token_rewards`); the trainer's reward function (if any) scores the finished episode on
its last action token. ``metrics`` (``{name: [B]}``) are summed over turns into
`Rollout.episode_stats`, with ``turns`` and ``observation_tokens``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import engine
from jaxrlhf.sampling import _any_over_axis, is_eos, sample_from_uniform
from jaxrlhf.typing import Scalar

Array = jax.Array


class EnvError(RuntimeError):
    """An environment raised, or returned something outside its protocol (names the environment
    and the field)."""


class StepOutput(NamedTuple):
    """What `Environment.step` returns for the B rows (NumPy arrays from a host environment)."""

    state: Any
    obs_ids: Any  # [B, O] int: the observation's token ids
    obs_mask: Any  # [B, O] 0/1: 1 for the first o_b tokens (a prefix)
    reward: Any  # [B] float: this turn's reward
    done: Any  # [B] bool: the episode is over
    metrics: Mapping[str, Any] | None = None  # {name: [B]} per-turn numbers (summed over turns)


class Environment:
    """Base class of environments (see the module docstring). Subclasses set
    ``max_observation_tokens``, ``stop_token_ids`` and the names of the metrics ``step`` returns
    (``metric_names``), and implement ``reset`` and ``step``; a host environment also sets
    ``on_host = True``. An environment is a static part of the trainer:
    it is hashable (a frozen dataclass is the natural form) and holds no arrays that change."""

    max_observation_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    metric_names: tuple[str, ...] = ()
    on_host: bool = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def reset(self, key, prompt_ids, prompt_mask):
        raise NotImplementedError

    def step(self, state, action_ids, action_mask) -> StepOutput:
        raise NotImplementedError


class EpisodeOutput(NamedTuple):
    """Episodes, all ``[B, N]`` except ``episode_stats`` (``{name: [B]}``)."""

    tokens: Array
    logprobs: Array
    mask: Array
    action_mask: Array
    token_rewards: Array
    episode_stats: dict[str, Array]


class _TurnState(NamedTuple):
    """Per-row decode state of the episode loop (every field ``[B, ...]``)."""

    t: Array  # next response index to write (tokens [0, t) are written)
    last_token: Array  # the token fed next, at cache slot P - 1 + t (response token t - 1, or the last prompt token)
    acting: Array  # bool: sampling in this turn
    done: Array  # bool: the episode is over
    turn_start: Array  # response index where the current turn began
    turns: Array  # turns completed (environment steps)
    cache: Any
    tokens: Array
    logprobs: Array
    mask: Array
    action_mask: Array
    token_rewards: Array
    stats: dict[str, Array]


@dataclasses.dataclass(frozen=True)
class EpisodeSettings:
    """The static settings of a rollout: budgets, sampling switches, EOS and padding ids."""

    max_new_tokens: int
    max_turns: int
    max_turn_tokens: int
    top_k: int | None = None
    filter_top_p: bool = False
    eos_token_id: Any = None
    pad_token_id: int = 0
    stop_axis_name: str | None = None


def _where_rows(rows_B, new, old):
    """``new`` where ``rows_B`` else ``old``, leaf by leaf (leaves with a leading B axis)."""

    def pick(n, o):
        n, o = jnp.asarray(n), jnp.asarray(o)
        return jnp.where(rows_B.reshape(rows_B.shape + (1,) * (o.ndim - 1)), n.astype(o.dtype), o)

    return jax.tree.map(pick, new, old)


class Episodes:
    """The pieces of a multi-turn rollout for one model, environment and prompt batch shape.

    `run_episodes` strings them together in one traced loop (JAX-native environment) or on the
    host with the environment between jitted turns (`run_host_episodes`); both call `start`,
    `decode_turn`, `action_window`, `after_step` and `write_observations`, in that order.
    """

    def __init__(self, model, env: Environment, settings: EpisodeSettings, prompt_len: int):
        self.model, self.env, self.settings, self.prompt_len = model, env, settings, prompt_len
        self.num_new = settings.max_new_tokens
        if engine.long_rope_switch(model, prompt_len, self.num_new) is not None:
            # An observation written into the cache may cross the boundary mid-chunk; the
            # single-turn sampler recomputes a crossing row's cache, the episode loop does not yet.
            raise ValueError(
                f"episodes with a LongRoPE model need prompt_len + max_new_tokens - 1 <= "
                f"original_max_position_embeddings ({model.config.rope_scaling[4]}), got "
                f"{prompt_len} + {self.num_new} - 1: past it the model switches rotary factors, "
                "which multi-turn rollouts do not support yet"
            )
        self.total_slots = prompt_len - 1 + self.num_new

    # -------------------------------------------------------------- pieces (all traceable)

    def start(self, params, prompt_ids, prompt_mask, num_generations: int = 1):
        """The prefilled cache (each distinct prompt once, shared by its G rows) and the initial
        per-row state; prompts are ``[B / G, P]``."""
        model, P, N = self.model, self.prompt_len, self.num_new
        num_prompts = prompt_ids.shape[0]
        batch = num_prompts * num_generations
        if P > 1:
            cache = model.forward(params, prompt_ids[:, :-1], prompt_mask[:, :-1], cache_size=self.total_slots).cache
        else:
            cache = model.init_cache(num_prompts, self.total_slots)
        prompt_of_row = jnp.arange(batch, dtype=jnp.int32) // num_generations
        if num_generations > 1:
            cache = model.take_cache_rows(cache, prompt_of_row)
        rows_ids, rows_mask = (jnp.take(x, prompt_of_row, axis=0) for x in (prompt_ids, prompt_mask))
        zeros = jnp.zeros((batch, N), jnp.int32)
        state = _TurnState(
            t=jnp.zeros((batch,), jnp.int32),
            last_token=rows_ids[:, -1],
            acting=jnp.ones((batch,), bool),
            done=jnp.zeros((batch,), bool),
            turn_start=jnp.zeros((batch,), jnp.int32),
            turns=jnp.zeros((batch,), jnp.int32),
            cache=cache,
            tokens=jnp.full((batch, N), self.settings.pad_token_id, jnp.int32),
            logprobs=jnp.zeros((batch, N), jnp.float32),
            mask=zeros,
            action_mask=zeros,
            token_rewards=jnp.zeros((batch, N), jnp.float32),
            stats={
                name: jnp.zeros((batch,), jnp.float32)
                for name in ("turns", "observation_tokens", *self.env.metric_names)
            },
        )
        key_mask = jnp.concatenate([rows_mask, jnp.ones((batch, N - 1), jnp.int32)], axis=1)
        last_prompt_position = jnp.maximum(jnp.sum(rows_mask, axis=1) - 1, 0)
        return state, rows_ids, rows_mask, key_mask, last_prompt_position

    def decode_turn(self, params, state: _TurnState, key_mask, last_prompt_position, uniforms_NxB, temperature, top_p):
        """Samples one action token per acting row until every row has ended its turn."""
        s, P, N = self.settings, self.prompt_len, self.num_new
        stop_ids = tuple(self.env.stop_token_ids)
        rows = jnp.arange(state.t.shape[0])

        def step(state: _TurnState) -> _TurnState:
            active = state.acting
            t = state.t
            out = self.model.forward(
                params,
                state.last_token[:, None],
                key_mask,
                positions=(last_prompt_position + t)[:, None],
                cache=state.cache,
                cache_index=jnp.where(active, P - 1 + t, self.total_slots),  # idle rows write nowhere
            )
            t_read = jnp.minimum(t, N - 1)
            uniform = uniforms_NxB[t_read, rows]
            tokens, logprobs = sample_from_uniform(
                out.logits[:, 0, :], uniform, temperature, s.top_k, top_p if s.filter_top_p else 1.0
            )
            write = lambda buffer, value: buffer.at[rows, t_read].set(  # noqa: E731
                jnp.where(active, value, buffer[rows, t_read])
            )
            tokens = jnp.where(active, tokens, state.last_token)
            ends_turn = is_eos(tokens, stop_ids) if stop_ids else jnp.zeros_like(active)
            eos = is_eos(tokens, s.eos_token_id)
            turn_full = t + 1 - state.turn_start >= s.max_turn_tokens
            out_of_budget = t + 1 >= N
            return state._replace(
                t=jnp.where(active, t + 1, t),
                last_token=tokens,
                acting=active & ~(ends_turn | eos | turn_full | out_of_budget),
                done=state.done | (active & (eos | out_of_budget)),
                cache=out.cache,
                tokens=write(state.tokens, tokens),
                logprobs=write(state.logprobs, logprobs),
                mask=write(state.mask, jnp.ones_like(tokens)),
                action_mask=write(state.action_mask, jnp.ones_like(tokens)),
            )

        return jax.lax.while_loop(lambda st: _any_over_axis(jnp.any(st.acting), s.stop_axis_name), step, state)

    def action_window(self, state: _TurnState):
        """The turn's action tokens ``[B, A]`` (from ``turn_start``) and their mask; the rows
        that acted in this turn (they have new action tokens)."""
        A = self.settings.max_turn_tokens
        index = state.turn_start[:, None] + jnp.arange(A, dtype=jnp.int32)[None, :]
        inside = index < state.t[:, None]
        ids = jnp.take_along_axis(state.tokens, jnp.minimum(index, self.num_new - 1), axis=1)
        stepped = state.t > state.turn_start
        return jnp.where(inside, ids, self.settings.pad_token_id), inside.astype(jnp.int32), stepped

    def after_step(self, state: _TurnState, stepped, output: StepOutput):
        """Books the environment's answer for the rows that acted: the reward on the turn's last
        action token, done, turn counts, metrics; returns the state and each row's observation
        length (0 for rows that are done or did not act, cut to the budget)."""
        s, N = self.settings, self.num_new
        rows = jnp.arange(state.t.shape[0])
        last = jnp.maximum(state.t - 1, 0)
        reward = jnp.where(stepped, jnp.asarray(output.reward, jnp.float32), 0.0)
        token_rewards = state.token_rewards.at[rows, last].add(reward)
        turns = state.turns + stepped.astype(jnp.int32)
        done = state.done | (stepped & (jnp.asarray(output.done, bool) | (turns >= s.max_turns)))
        obs_len = jnp.sum(jnp.asarray(output.obs_mask, jnp.int32), axis=1)
        obs_len = jnp.where(stepped & ~done, jnp.minimum(obs_len, N - state.t), 0)
        stats = dict(state.stats)
        stats["turns"] = stats["turns"] + stepped.astype(jnp.float32)
        stats["observation_tokens"] = stats["observation_tokens"] + obs_len.astype(jnp.float32)
        for name, value in (output.metrics or {}).items():
            stats[name] = stats[name] + jnp.where(stepped, jnp.asarray(value, jnp.float32), 0.0)
        # A row whose observation fills the budget ends there.
        done = done | (stepped & (state.t + obs_len >= N))
        return state._replace(token_rewards=token_rewards, turns=turns, done=done, stats=stats), obs_len

    def write_observations(self, params, state: _TurnState, obs_ids, obs_len, key_mask, last_prompt_position):
        """Writes each row's ``obs_len`` observation tokens after its action: into the episode's
        arrays (mask 1, action 0) and into the KV cache, by one forward of ``[last action token,
        obs_1, ..., obs_{o-1}]`` at the row's next slots (valid length o); ``obs_o`` becomes the
        token fed next. Then every row that is not done starts its next turn."""
        P, N = self.prompt_len, self.num_new
        O = obs_ids.shape[1]
        rows = jnp.arange(state.t.shape[0])
        obs_ids = jnp.asarray(obs_ids, jnp.int32)
        index = state.t[:, None] + jnp.arange(O, dtype=jnp.int32)[None, :]
        inside = jnp.arange(O)[None, :] < obs_len[:, None]
        target = jnp.where(inside, index, N)  # outside: dropped
        put = lambda buffer, value: buffer.at[rows[:, None], target].set(value, mode="drop")  # noqa: E731
        if O > 0:
            feed = (
                jnp.concatenate([state.last_token[:, None], obs_ids[:, :-1]], axis=1)
                if O > 1
                else state.last_token[:, None]
            )
            positions = last_prompt_position[:, None] + state.t[:, None] + jnp.arange(O, dtype=jnp.int32)[None, :]
            out = self.model.forward(
                params,
                feed,
                key_mask,
                positions=positions,
                cache=state.cache,
                cache_index=P - 1 + state.t,
                valid_lengths=obs_len,
                logits_positions=slice(0, 0),
            )
            last_obs = obs_ids[rows, jnp.maximum(obs_len - 1, 0)]
            state = state._replace(
                cache=out.cache,
                last_token=jnp.where(obs_len > 0, last_obs, state.last_token),
                tokens=put(state.tokens, obs_ids),
                mask=put(state.mask, jnp.ones_like(obs_ids)),
            )
        t = state.t + obs_len
        return state._replace(t=t, acting=~state.done, turn_start=t)

    def output(self, state: _TurnState) -> EpisodeOutput:
        return EpisodeOutput(
            state.tokens, state.logprobs, state.mask, state.action_mask, state.token_rewards, state.stats
        )


def _check_traced_output(env: Environment, out, batch: int) -> StepOutput:
    """Static checks of a JAX-native environment's `StepOutput` (shapes and dtypes, at trace time)."""
    if not isinstance(out, StepOutput):
        raise EnvError(f"environment {env.name}: step must return a StepOutput, got {type(out).__name__}")
    O = env.max_observation_tokens
    for field, shape in (("obs_ids", (batch, O)), ("obs_mask", (batch, O)), ("reward", (batch,)), ("done", (batch,))):
        value = getattr(out, field)
        if np.shape(value) != shape:
            raise EnvError(
                f"environment {env.name}: step's {field} must have shape {shape} (B rows, "
                f"max_observation_tokens={O}), got {np.shape(value)}"
            )
    if not jnp.issubdtype(jnp.asarray(out.obs_ids).dtype, jnp.integer):
        raise EnvError(f"environment {env.name}: step's obs_ids must be integer token ids, got {out.obs_ids.dtype}")
    _check_metric_names(env, out.metrics, batch)
    return out


def _check_metric_names(env: Environment, metrics, batch: int) -> None:
    names = sorted(metrics or {})
    if names != sorted(env.metric_names):
        raise EnvError(
            f"environment {env.name}: step's metrics are {names}, but its metric_names declare "
            f"{sorted(env.metric_names)} (declare every metric: the rollout sums them from the first turn)"
        )
    for name, value in (metrics or {}).items():
        if np.shape(value) != (batch,):
            raise EnvError(
                f"environment {env.name}: step's metrics[{name!r}] must have shape ({batch},), got {np.shape(value)}"
            )


def draws(key, num_new: int, batch: int):
    """The rollout's randomness: ``uniforms [N, B]`` from ``key`` itself (as `generate` draws
    them, so a single-turn episode samples what `generate` samples) and the environment's reset
    key, ``fold_in(key, 1)``."""
    return jax.random.uniform(key, (num_new, batch), jnp.float32), jax.random.fold_in(key, 1)


def run_episodes(
    model,
    params,
    prompt_ids,
    prompt_mask,
    key,
    env: Environment,
    *,
    max_new_tokens: int,
    max_turns: int,
    max_turn_tokens: int,
    temperature: Scalar = 1.0,
    top_k: int | None = None,
    top_p: Scalar = 1.0,
    eos_token_id=None,
    pad_token_id: int = 0,
    num_generations: int = 1,
    stop_axis_name: str | None = None,
) -> EpisodeOutput:
    """Multi-turn episodes with a JAX-native environment, as one traceable loop (jit, vmap, mesh).

    Prompts are ``[B / G, P]`` (left-padded), each run ``num_generations`` (G) times as
    consecutive rows; ``key`` gives the one ``[N, B]`` uniform draw (token t of row b uses
    ``uniforms[t, b]``) and the environment's reset key. Sampling options as in
    `jaxrlhf.sampling.generate`. Returns `EpisodeOutput` (module docstring).
    """
    if env.on_host:
        raise ValueError(f"environment {env.name} runs on the host: use run_host_episodes (or the trainer)")
    settings = EpisodeSettings(
        max_new_tokens, max_turns, max_turn_tokens, top_k, not (isinstance(top_p, (int, float)) and top_p >= 1.0),
        eos_token_id, pad_token_id, stop_axis_name,
    )  # fmt: skip
    prompt_ids, prompt_mask = jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32)
    episodes = Episodes(model, env, settings, prompt_ids.shape[1])
    if hasattr(model, "decoding_params"):
        params = model.decoding_params(params)
    state, rows_ids, rows_mask, key_mask, last_position = episodes.start(
        params, prompt_ids, prompt_mask, num_generations
    )
    batch = rows_ids.shape[0]
    uniforms, env_key = draws(key, max_new_tokens, batch)
    env_state = env.reset(env_key, rows_ids, rows_mask)

    def turn(carry):
        state, env_state = carry
        state = episodes.decode_turn(params, state, key_mask, last_position, uniforms, temperature, top_p)
        action_ids, action_mask, stepped = episodes.action_window(state)
        out = _check_traced_output(env, env.step(env_state, action_ids, action_mask), batch)
        env_state = _where_rows(stepped, out.state, env_state)
        state, obs_len = episodes.after_step(state, stepped, out)
        state = episodes.write_observations(params, state, out.obs_ids, obs_len, key_mask, last_position)
        return state, env_state

    state, _ = jax.lax.while_loop(
        lambda carry: _any_over_axis(jnp.any(~carry[0].done), stop_axis_name), turn, (state, env_state)
    )
    return episodes.output(state)


# ----------------------------------------------------------------------------------------------
# The environment on the host, between jitted turns


def check_step_output(env: Environment, out, batch: int, vocab_size: int | None) -> StepOutput:
    """A host environment's `StepOutput` as NumPy arrays, after checking every field: shapes
    (``[B, O]``, ``[B]``), integer ids in ``[0, vocab_size)`` on the observation's mask, a 0/1
    observation mask that is a prefix of each row (no negative or gapped lengths), finite
    rewards. `EnvError` names the environment, the field, and the first offending row."""
    where = f"environment {env.name}: step's"
    if not isinstance(out, StepOutput):
        raise EnvError(f"environment {env.name}: step must return a StepOutput, got {type(out).__name__}")
    O = env.max_observation_tokens
    arrays = {}
    for field, shape in (("obs_ids", (batch, O)), ("obs_mask", (batch, O)), ("reward", (batch,)), ("done", (batch,))):
        value = np.asarray(getattr(out, field))
        if value.shape != shape:
            raise EnvError(
                f"{where} {field} must have shape {shape} (B rows, max_observation_tokens={O}), got {value.shape}"
            )
        arrays[field] = value
    ids, mask = arrays["obs_ids"], arrays["obs_mask"]
    if not np.issubdtype(ids.dtype, np.integer):
        raise EnvError(f"{where} obs_ids must be integer token ids, got dtype {ids.dtype}")
    if not np.isin(mask, (0, 1)).all():
        raise EnvError(f"{where} obs_mask must be 0/1, got values {sorted(set(np.unique(mask).tolist()))[:5]}")
    gaps = np.diff(mask.astype(np.int64), axis=1) > 0  # a 0 followed by a 1: not a prefix
    if gaps.any():
        row = int(np.argwhere(gaps.any(axis=1))[0, 0])
        raise EnvError(f"{where} obs_mask row {row} is not a prefix of ones (the observation's length): {mask[row]}")
    if vocab_size is not None:
        bad = (mask > 0) & ((ids < 0) | (ids >= vocab_size))
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            value = int(ids[row, col])
            raise EnvError(
                f"{where} obs_ids row {row}, column {col} is {value}, outside the vocabulary [0, {vocab_size})"
            )
    if not np.all(np.isfinite(arrays["reward"].astype(np.float64))):
        row = int(np.argwhere(~np.isfinite(arrays["reward"].astype(np.float64)))[0, 0])
        raise EnvError(f"{where} reward row {row} is {arrays['reward'][row]}: rewards must be finite")
    _check_metric_names(env, out.metrics, batch)
    metrics = {name: np.asarray(value, np.float32) for name, value in (out.metrics or {}).items()}
    return StepOutput(
        out.state, ids.astype(np.int32), mask.astype(np.int32), arrays["reward"].astype(np.float32),
        arrays["done"].astype(bool), metrics,
    )  # fmt: skip


def _raw_key(key):
    """A typed key's key data (a uint32 array NumPy can hold); a raw key as it is."""
    return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def call_host_env(env: Environment, method: str, *args):
    """``env.reset(...)`` / ``env.step(...)`` on the host, its exceptions re-raised as `EnvError`
    (the original chained)."""
    try:
        return getattr(env, method)(*args)
    except EnvError:
        raise
    except Exception as error:
        raise EnvError(f"environment {env.name}: {method} raised {type(error).__name__}: {error}") from error


class HostEpisodes:
    """The jitted pieces of a rollout whose environment runs on the host, compiled once per shape.

    ``__call__`` runs the episodes: jitted start, then per turn a jitted decode (until every acting
    row has ended its turn), the host environment's ``step`` on NumPy arrays, and a jitted write
    of the observations; the loop ends when every row is done.
    """

    def __init__(self, model, env: Environment, settings: EpisodeSettings, vocab_size: int | None = None):
        if not env.on_host:
            raise ValueError(f"environment {env.name} is JAX-native (on_host=False): use run_episodes")
        self.model, self.env, self.settings, self.vocab_size = model, env, settings, vocab_size

        def start(params, prompt_ids, prompt_mask, key, num_generations):
            episodes = Episodes(model, env, settings, prompt_ids.shape[1])
            params = model.decoding_params(params) if hasattr(model, "decoding_params") else params
            state, rows_ids, rows_mask, key_mask, last_position = episodes.start(
                params, prompt_ids, prompt_mask, num_generations
            )
            uniforms, env_key = draws(key, settings.max_new_tokens, rows_ids.shape[0])
            if jnp.issubdtype(env_key.dtype, jax.dtypes.prng_key):  # a typed key: its bits, for NumPy
                env_key = jax.random.key_data(env_key)
            return state, rows_ids, rows_mask, key_mask, last_position, uniforms, env_key

        def decode(params, state, key_mask, last_position, uniforms, temperature, top_p):
            episodes = Episodes(model, env, settings, key_mask.shape[1] - settings.max_new_tokens + 1)
            params = model.decoding_params(params) if hasattr(model, "decoding_params") else params
            state = episodes.decode_turn(params, state, key_mask, last_position, uniforms, temperature, top_p)
            return (state, *episodes.action_window(state))

        def finish(params, state, stepped, output, key_mask, last_position):
            episodes = Episodes(model, env, settings, key_mask.shape[1] - settings.max_new_tokens + 1)
            params = model.decoding_params(params) if hasattr(model, "decoding_params") else params
            state, obs_len = episodes.after_step(state, stepped, output)
            return episodes.write_observations(params, state, output.obs_ids, obs_len, key_mask, last_position)

        self._start = jax.jit(start, static_argnums=4)
        self._decode = jax.jit(decode)
        self._finish = jax.jit(finish)

    def __call__(
        self, params, prompt_ids, prompt_mask, key, *, temperature: Scalar = 1.0, top_p: Scalar = 1.0, num_generations=1
    ):
        state, rows_ids, rows_mask, key_mask, last_position, uniforms, env_key = self._start(
            params, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32), key, num_generations
        )
        batch = int(rows_ids.shape[0])
        env_state = call_host_env(
            self.env,
            "reset",
            np.asarray(_raw_key(env_key)),
            np.asarray(rows_ids),
            np.asarray(rows_mask),
        )
        temperature, top_p = jnp.float32(temperature), jnp.float32(top_p)
        while not bool(np.all(np.asarray(state.done))):
            state, action_ids, action_mask, stepped = self._decode(
                params, state, key_mask, last_position, uniforms, temperature, top_p
            )
            raw = call_host_env(self.env, "step", env_state, np.asarray(action_ids), np.asarray(action_mask))
            out = check_step_output(self.env, raw, batch, self.vocab_size)
            env_state = out.state
            device_out = StepOutput(None, out.obs_ids, out.obs_mask, out.reward, out.done, out.metrics)
            state = self._finish(params, state, stepped, device_out, key_mask, last_position)
        return Episodes(self.model, self.env, self.settings, 1).output(state)
