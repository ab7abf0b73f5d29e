"""Episodes in the trainer (issue 30): a single-turn config through the episode path is today's
trainer; every preset, the critic, LoRA, a sweep, 8 devices and Orbax resume work with a
JAX-native environment; a host environment trains like its JAX twin; the trained ids are the
sampled + observed ids; a failing host environment stops training with the last step saved."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from episode_envs import EOS, VOCAB, EchoEnv, HostEchoEnv, OneTurn, tiny_policy

from jaxrlhf.episodes import EnvError, StepOutput
from jaxrlhf.metrics_log import read_metrics
from jaxrlhf.models import LoraConfig, with_lora
from jaxrlhf.sharding import make_mesh
from jaxrlhf.training import PPO, PPOConfig, grid, train, train_sweep
from jaxrlhf.training.presets import preset
from jaxrlhf.training.trainer import TIMING_METRICS

P = 4
BASE = PPOConfig(
    batch_size=8,
    minibatch_size=8,
    ppo_epochs=1,
    max_prompt_len=P,
    max_new_tokens=20,
    max_turns=3,
    max_turn_tokens=6,
    learning_rate=3e-3,
    critic_learning_rate=3e-3,
    eos_token_id=EOS,
    kl_coef=0.02,
    total_steps=3,
    save_every=1,
)


@pytest.fixture(scope="module")
def tiny():
    return tiny_policy()


pytestmark = pytest.mark.usefixtures("module_compilation_cache")


def prompt_set(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(8, VOCAB, (n, P)).astype(np.int32), np.ones((n, P), np.int32)


def reward(prompt_ids, prompt_mask, response_ids, response_mask):
    return jnp.sum((response_ids == 9) * response_mask, axis=1) / 4.0


def _run(config, policy, out_dir, environment, **kwargs):
    return train(policy, reward, prompt_set(), config, out_dir, progress=False, export=False,
                 environment=environment, **kwargs)  # fmt: skip


def _relative(a, b):
    flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])  # noqa: E731
    return float(np.linalg.norm(flat(a) - flat(b)) / max(np.linalg.norm(flat(b)), 1e-30))


def test_a_single_turn_config_through_the_episode_path_is_todays_trainer(tiny, tmp_path):
    config = BASE.replace(max_turns=1, max_turn_tokens=None, max_new_tokens=8)
    plain = _run(config, tiny, tmp_path / "plain", None)
    episodic = _run(config, tiny, tmp_path / "episodes", OneTurn())
    assert _relative(episodic.state.policy_params, plain.state.policy_params) < 1e-6
    for before, after in zip(plain.history, episodic.history):
        for key in ("score", "kl", "loss", "pg_loss", "vf_loss", "advantages_mean", "response_length"):
            assert after[key] == pytest.approx(before[key], abs=1e-6), key
        assert after["num_observation_tokens"] == 0


def test_trained_ids_are_the_sampled_and_observed_ids(tiny):
    """The update's experience holds exactly the rollout's tokens (the environment's included)."""
    model, params = tiny
    ppo = PPO(BASE, model, reward, environment=EchoEnv())
    state, frozen = ppo.init_state(params), ppo.frozen_params(params)
    batch = ppo.prompt_batch(*prompt_set(8))
    rollout_out = jax.device_get(ppo.rollout_step(state, frozen, batch))
    assert (rollout_out.mask - rollout_out.action_mask).sum() > 0  # observations present
    # The update path sees the same ids: re-derive them from the experience of the same rollout.
    from jaxrlhf.training.experience import make_experience

    experience, _, stats = jax.jit(
        lambda st, ro: make_experience(
            BASE, ppo.models, ppo.policy_params(st, frozen), st.value_params, frozen.ref_params,
            ppo.repeat_prompts(batch), ro, jnp.zeros(8), st.kl_ctl.kl_coef, st.score_stats, st.hparams,
        )
    )(state, rollout_out)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(experience.response_ids), rollout_out.tokens)
    np.testing.assert_array_equal(np.asarray(experience.action_mask), rollout_out.action_mask)
    np.testing.assert_array_equal(np.asarray(experience.response_mask), rollout_out.mask)
    assert float(stats["num_observation_tokens"]) == (rollout_out.mask - rollout_out.action_mask).sum()


PRESETS = ["ppo", "grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax"]


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_trains_on_episodes(tiny, name):
    model, params = tiny
    config = preset(name, BASE, num_generations=4) if name not in ("reinforce_pp", "remax") else preset(name, BASE)
    ppo = PPO(config, model, reward, environment=EchoEnv())
    state, frozen = ppo.init_state(params), ppo.frozen_params(params)
    batch = ppo.prompt_batch(*prompt_set(config.prompts_per_step))
    for _ in range(2):
        state, metrics = ppo.train_step(state, frozen, batch)
    metrics = jax.device_get(metrics)
    assert bool(metrics["all_finite"])
    assert {"episode/turns", "episode/tool_calls", "num_observation_tokens", "turn_reward"} <= set(metrics)
    assert float(metrics["episode/turns"]) >= 1


@pytest.mark.slow
def test_a_host_environment_trains_like_its_jax_twin_and_resumes(tiny, tmp_path):
    native = _run(BASE, tiny, tmp_path / "native", EchoEnv())
    host = _run(BASE, tiny, tmp_path / "host", HostEchoEnv())
    assert _relative(host.state.policy_params, native.state.policy_params) < 1e-5
    assert host.history[-1]["episode/turns"] == pytest.approx(native.history[-1]["episode/turns"])
    # Orbax resume: 1 + 2 steps equal 3 (the episode rollout's randomness lives in the state).
    _run(BASE, tiny, tmp_path / "resumed", EchoEnv(), num_steps=1)
    resumed = _run(BASE, tiny, tmp_path / "resumed", EchoEnv())
    chex.assert_trees_all_close(jax.device_get(resumed.state.policy_params), jax.device_get(native.state.policy_params))
    comparable = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_METRICS} for r in rows]  # noqa: E731
    assert comparable(read_metrics(tmp_path / "resumed")) == comparable(read_metrics(tmp_path / "native"))


@pytest.mark.slow
def test_episodes_with_lora_a_sweep_and_8_devices(tiny, tmp_path):
    model, params = tiny
    config = preset("grpo", BASE, num_generations=4)
    lora_model = with_lora(model, LoraConfig(rank=4, alpha=8.0, target_modules=("q", "v")))
    lora = _run(config.replace(total_steps=1), (lora_model, params), tmp_path / "lora", EchoEnv())
    assert np.isfinite(lora.history[-1]["loss"])
    single = _run(config.replace(total_steps=2), tiny, tmp_path / "single", EchoEnv())
    sweep = train_sweep(tiny, reward, prompt_set(), config.replace(total_steps=2), tmp_path / "sweep",
                        runs=grid(seed=[0], clip_eps=[0.2, 0.1]), progress=False, export=False,
                        environment=EchoEnv())  # fmt: skip
    assert (
        _relative(jax.device_get(sweep.state.run(0).policy_params), jax.device_get(single.state.policy_params)) < 1e-5
    )
    one = PPO(config, model, reward, environment=EchoEnv())
    eight = PPO(config, model, reward, environment=EchoEnv(), mesh=make_mesh(data=4, fsdp=2))
    ids, mask = prompt_set(config.prompts_per_step)
    states = []
    for ppo in (one, eight):
        state, _ = ppo.train_step(ppo.init_state(params), ppo.frozen_params(params), ppo.prompt_batch(ids, mask))
        states.append(jax.device_get(state))
    assert _relative(states[1].policy_params, states[0].policy_params) < 1e-5


@dataclasses.dataclass(frozen=True)
class FailingHostEnv(HostEchoEnv):
    """`HostEchoEnv` whose step raises from its ``fail_after``-th call on."""

    calls: list = dataclasses.field(default_factory=list, hash=False, compare=False)
    fail_after: int = 4

    def step(self, state, action_ids, action_mask) -> StepOutput:
        self.calls.append(1)
        if len(self.calls) >= self.fail_after:
            raise ConnectionError("the tool server went away")
        return super().step(state, action_ids, action_mask)


@pytest.mark.slow
def test_a_failing_host_environment_stops_training_with_the_last_step_saved(tiny, tmp_path):
    with pytest.raises(EnvError, match=r"environment FailingHostEnv: step raised ConnectionError: the tool server"):
        _run(BASE, tiny, tmp_path / "run", FailingHostEnv())
    from jaxrlhf.training.checkpoint import Checkpointer

    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] >= 1, steps  # the steps before the failure are committed and saved
    del Checkpointer


@pytest.mark.slow
def test_group_signal_counts_the_environments_rewards(tiny):
    """With every reward from the environment (reward=None), a group's signal is its episodes'
    turn rewards: group_signal_fraction sees them, and DAPO's dynamic sampling keeps those groups."""
    model, params = tiny
    for config in (
        preset("grpo", BASE, num_generations=4),
        preset("dapo", BASE, num_generations=4, dynamic_sampling_oversample=2),
    ):
        ppo = PPO(config, model, None, environment=EchoEnv())
        state, frozen = ppo.init_state(params), ppo.frozen_params(params)
        ids, mask = prompt_set(config.batch_size * config.dynamic_sampling_oversample // config.num_generations)
        _, metrics = ppo.train_step(state, frozen, ppo.prompt_batch(ids, mask))
        metrics = jax.device_get(metrics)
        assert float(metrics["score"]) == 0.0 and float(metrics["turn_reward"]) > 0.0
        assert float(metrics["group_signal_fraction"]) > 0.0, config.advantage_estimator
        if config.dynamic_sampling_oversample > 1:
            assert float(metrics["kept_group_fraction"]) > 0.0
