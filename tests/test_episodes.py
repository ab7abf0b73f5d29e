"""Multi-turn episodes (issue 30, the rollout): a JAX-native environment inside the jitted loop and
the same environment on the host give identical episodes; the KV cache holds exactly the
episode (action log-probs equal a full forward's over prompt + episode); a single turn is
`generate`; jit / vmap / 8 devices agree; a broken environment is named with its field."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from episode_envs import EOS, STOP, TURNS, VOCAB, A, EchoEnv, HostEchoEnv, N, OneTurn, P, tiny_policy

from jaxrlhf.core import token_logprobs
from jaxrlhf.episodes import EnvError, Environment, EpisodeSettings, HostEpisodes, StepOutput, run_episodes
from jaxrlhf.sampling import generate


@pytest.fixture(scope="module")
def tiny():
    return tiny_policy()


def prompts(B=6, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(8, VOCAB, (B, P)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # a left-padded prompt
    return ids * mask, mask


OPTIONS = dict(max_new_tokens=N, max_turns=TURNS, max_turn_tokens=A, temperature=1.0, eos_token_id=EOS)


def jax_episodes(model, params, ids, mask, key, **extra):
    run = jax.jit(lambda p, i, m, k: run_episodes(model, p, i, m, k, EchoEnv(), **OPTIONS, **extra))
    return jax.device_get(run(params, ids, mask, key))


def test_jax_native_and_host_environments_give_identical_episodes(tiny):
    model, params = tiny
    ids, mask = prompts()
    key = jax.random.PRNGKey(3)
    native = jax_episodes(model, params, ids, mask, key)
    settings = EpisodeSettings(N, TURNS, A, eos_token_id=EOS)
    host = jax.device_get(HostEpisodes(model, HostEchoEnv(), settings, vocab_size=VOCAB)(params, ids, mask, key))
    for field in ("tokens", "mask", "action_mask", "token_rewards"):
        np.testing.assert_array_equal(getattr(host, field), getattr(native, field), err_msg=field)
    np.testing.assert_allclose(host.logprobs, native.logprobs, atol=1e-6)
    for name in native.episode_stats:
        np.testing.assert_array_equal(host.episode_stats[name], native.episode_stats[name], err_msg=name)
    assert native.episode_stats["turns"].max() >= 2  # several turns really happened
    assert (native.mask - native.action_mask).sum() > 0  # and observations were written


def test_a_host_rollout_takes_a_typed_key(tiny):
    """``jax.random.key`` (typed) and ``PRNGKey`` (raw bits) of the same seed give the same episodes;
    the host environment's reset gets the key's bits as NumPy either way."""
    model, params = tiny
    ids, mask = prompts()
    episodes = HostEpisodes(model, HostEchoEnv(), EpisodeSettings(N, TURNS, A, eos_token_id=EOS), vocab_size=VOCAB)
    typed = jax.device_get(episodes(params, ids, mask, jax.random.key(3)))
    raw = jax.device_get(episodes(params, ids, mask, jax.random.PRNGKey(3)))
    np.testing.assert_array_equal(typed.tokens, raw.tokens)


def test_episode_structure_and_the_cache_holds_the_episode(tiny):
    """Observations follow their turn's last action (stop token, budget or EOS), with action mask
    0; rewards sit on each turn's last action token; and the sampler's log-probs of the action
    tokens equal a full forward's over prompt + episode (the observations entered the cache)."""
    model, params = tiny
    ids, mask = prompts(seed=1)
    out = jax_episodes(model, params, ids, mask, jax.random.PRNGKey(4))
    for b in range(ids.shape[0]):
        action, attended, tokens = out.action_mask[b], out.mask[b], out.tokens[b]
        length = int(attended.sum())
        assert attended[:length].all() and not attended[length:].any()  # the episode is a prefix
        obs_starts = [t for t in range(1, length) if action[t - 1] and not action[t]]
        for t in obs_starts:  # the token before an observation ends a turn
            turn_start = t - 1
            while turn_start > 0 and action[turn_start - 1]:
                turn_start -= 1
            assert tokens[t - 1] == STOP or t - turn_start >= A, (b, t, tokens)
            assert tokens[t] in (20, 21, 22, 23)  # the observation's first token: 20 + turn
        rewarded = np.flatnonzero(out.token_rewards[b])
        assert all(action[t] and (t + 1 >= length or not action[t + 1]) for t in rewarded)
    full_ids = jnp.concatenate([jnp.asarray(ids), jnp.asarray(out.tokens)], axis=1)
    full_mask = jnp.concatenate([jnp.asarray(mask), jnp.asarray(out.mask)], axis=1)
    logits = model.forward(params, full_ids, full_mask).logits[:, P - 1 : P + N - 1]
    recomputed = np.asarray(token_logprobs(logits, jnp.asarray(out.tokens)))
    np.testing.assert_allclose(np.where(out.action_mask, recomputed, 0), out.logprobs, atol=2e-5)


def test_a_single_turn_episode_is_generate(tiny):
    model, params = tiny
    ids, mask = prompts(seed=2)
    key = jax.random.PRNGKey(5)
    run = jax.jit(
        lambda p, i, m, k: run_episodes(
            model, p, i, m, k, OneTurn(), max_new_tokens=N, max_turns=1, max_turn_tokens=N, eos_token_id=EOS
        )
    )
    episodes = jax.device_get(run(params, ids, mask, key))
    sample = jax.device_get(jax.jit(lambda p, i, m, k: generate(model, p, i, m, k, max_new_tokens=N, eos_token_id=EOS))(
        params, ids, mask, key
    ))  # fmt: skip
    np.testing.assert_array_equal(episodes.tokens, sample.tokens)
    np.testing.assert_array_equal(episodes.mask, sample.mask)
    np.testing.assert_array_equal(episodes.action_mask, sample.mask)
    np.testing.assert_allclose(episodes.logprobs, sample.logprobs, atol=1e-6)


@pytest.mark.slow
def test_episodes_under_vmap_and_on_8_devices_equal_one_device(tiny):
    from jaxrlhf.sharding import batch_sharding, make_mesh

    model, params = tiny
    ids, mask = prompts(B=8, seed=3)
    keys = jax.random.split(jax.random.PRNGKey(6), 2)
    one = [jax_episodes(model, params, ids, mask, k) for k in keys]
    vmapped = jax.jit(
        jax.vmap(
            lambda k: run_episodes(model, params, ids, mask, k, EchoEnv(), **OPTIONS, stop_axis_name="runs"),
            axis_name="runs",
        )
    )(keys)
    for r in range(2):
        np.testing.assert_array_equal(np.asarray(vmapped.tokens[r]), one[r].tokens)
        np.testing.assert_array_equal(np.asarray(vmapped.token_rewards[r]), one[r].token_rewards)
    mesh = make_mesh(data=8)
    sharded = jax.device_put((jnp.asarray(ids), jnp.asarray(mask)), batch_sharding(mesh))
    on_mesh = jax_episodes(model, params, *sharded, keys[0])
    np.testing.assert_array_equal(on_mesh.tokens, one[0].tokens)
    np.testing.assert_array_equal(on_mesh.action_mask, one[0].action_mask)


@dataclasses.dataclass(frozen=True)
class BadHostEnv(Environment):
    """A host environment that breaks its protocol in the way ``fault`` says."""

    fault: str = "shape"
    max_observation_tokens: int = 3
    stop_token_ids: tuple[int, ...] = (STOP,)
    on_host: bool = True

    def reset(self, key, prompt_ids, prompt_mask):
        return None

    def step(self, state, action_ids, action_mask):
        B = action_ids.shape[0]
        obs, obs_mask = np.full((B, 3), 9), np.ones((B, 3), np.int32)
        if self.fault == "shape":
            obs = obs[:, :2]
        elif self.fault == "vocab":
            obs[1, 1] = VOCAB + 4
        elif self.fault == "negative":
            obs_mask[2] = [0, 1, 1]  # a gap: no well-defined (non-negative, prefix) length
        elif self.fault == "dtype":
            obs = obs.astype(np.float32)
        elif self.fault == "raise":
            raise KeyError("the calculator crashed")
        return StepOutput(state, obs, obs_mask, np.zeros(B), np.zeros(B, bool))


@pytest.mark.parametrize(
    "fault, message",
    [
        ("shape", r"BadHostEnv: step's obs_ids must have shape \(6, 3\).*got \(6, 2\)"),
        ("vocab", r"BadHostEnv: step's obs_ids row 1, column 1 is 36, outside the vocabulary \[0, 32\)"),
        ("negative", r"BadHostEnv: step's obs_mask row 2 is not a prefix"),
        ("dtype", r"BadHostEnv: step's obs_ids must be integer token ids"),
        ("raise", r"environment BadHostEnv: step raised KeyError: 'the calculator crashed'"),
    ],
)
def test_a_broken_host_environment_is_named_with_its_field(tiny, fault, message):
    model, params = tiny
    ids, mask = prompts()
    episodes = HostEpisodes(model, BadHostEnv(fault), EpisodeSettings(N, TURNS, A, eos_token_id=EOS), vocab_size=VOCAB)
    with pytest.raises(EnvError, match=message):
        episodes(params, ids, mask, jax.random.PRNGKey(0))


def test_a_jax_environment_of_the_wrong_shape_fails_at_trace_time(tiny):
    model, params = tiny

    @dataclasses.dataclass(frozen=True)
    class Short(EchoEnv):
        max_observation_tokens: int = 4  # but step returns 3 columns

    with pytest.raises(EnvError, match=r"Short: step's obs_ids must have shape \(6, 4\).*got \(6, 3\)"):
        run_episodes(model, params, *prompts(), jax.random.PRNGKey(0), Short(), **OPTIONS)
