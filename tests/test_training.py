"""PPO trainer: learning on a toy task, one compile, device-count invariance, reward paths, errors.

Compiles are the cost here (2 shared CPU cores), so one module-scoped learning run on one device
provides the single-device reference for the other tests, and tests reuse compiled steps by using
equal `PPO` setups (jit caches are keyed on them).
"""
import functools
import os
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.core.stats import masked_mean
from jaxrlhf.metrics_log import read_metrics
from jaxrlhf.models import LanguageModel, ModelConfig, ValueModel
from jaxrlhf.models.sharding import make_mesh
from jaxrlhf.training import (PPO, Checkpointer, CheckpointMismatchError, NonFiniteError, PPOConfig, PromptBatch,
                              PromptTooLongError, RewardModel, RewardShapeError, Rollout, TextReward,
                              make_experience, prepare_prompts, train)
from jaxrlhf.training.rewards import score_in_jit
from jaxrlhf.training.state import ScoreStats
from jaxrlhf.training.trainer import TIMING_METRICS, host_scores

VOCAB = 16
TARGET_TOKEN = 3
POISON_TOKEN = 15  # a prompt starting with it makes the test reward NaN (to test the NaN guard)
PROMPT_LEN = 4
BATCH = 32
LEARN_STEPS = 25


def tiny_gpt2_config() -> ModelConfig:
    return ModelConfig(
        model_type="gpt2", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
        head_dim=16, intermediate_size=64, max_position_embeddings=32, norm_eps=1e-5,
        positions="learned", norm="layernorm", mlp="plain", activation="gelu_new",
        qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True, eos_token_id=None)


TRACES = {"reward": 0}


def target_fraction_reward(prompt_ids, prompt_mask, response_ids, response_mask):
    """Fraction of valid response tokens equal to TARGET_TOKEN (NaN for poisoned prompts)."""
    TRACES["reward"] += 1  # Python side effect: runs once per trace of the train step
    fraction = masked_mean((response_ids == TARGET_TOKEN).astype(jnp.float32), response_mask, axis=1)
    return jnp.where(prompt_ids[:, -PROMPT_LEN] == POISON_TOKEN, jnp.nan, fraction)


BASE_CONFIG = PPOConfig(
    total_steps=LEARN_STEPS, batch_size=BATCH, minibatch_size=16, ppo_epochs=2, max_new_tokens=8,
    max_prompt_len=PROMPT_LEN, learning_rate=3e-3, critic_learning_rate=3e-3, eos_token_id=-1,
    init_kl_coef=0.01, adaptive_kl=True, target_kl=1.0, kl_horizon=200.0, seed=0)


def make_prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, POISON_TOKEN, size=(n, PROMPT_LEN)).astype(np.int32)
    return ids, np.ones_like(ids)


@pytest.fixture(scope="module")
def tiny():
    model = LanguageModel(tiny_gpt2_config())
    params = model.init_params(jax.random.PRNGKey(0))
    return model, params


@pytest.fixture(scope="module")
def learning_run(tiny):
    """LEARN_STEPS PPO iterations on one device; keeps the metrics and the state after step 1."""
    model, params = tiny
    ppo = PPO(BASE_CONFIG, model, target_fraction_reward)
    state = ppo.init_state(params)
    frozen = ppo.frozen_params(params)
    ids, mask = make_prompts(BATCH)
    batch = ppo.prompt_batch(ids, mask)
    traces_before = TRACES["reward"]
    history, state_after_1 = [], None
    for i in range(LEARN_STEPS):
        state, metrics = ppo.train_step(state, frozen, batch)
        history.append(jax.device_get(metrics))
        if i == 0:
            state_after_1 = jax.device_get(state)
    return dict(ppo=ppo, history=history, state_after_1=state_after_1, batch_np=(ids, mask),
                traces=TRACES["reward"] - traces_before, final_state=state)


def test_ppo_increases_reward_with_finite_positive_kl(learning_run):
    scores = np.array([m["score"] for m in learning_run["history"]])
    kls = np.array([m["kl"] for m in learning_run["history"]])
    assert scores[:3].mean() < 0.15  # chance level is 1/16
    assert scores[-3:].mean() > 0.5, scores
    assert np.all(np.isfinite(kls)) and np.all(kls[1:] > 0), kls
    assert kls[0] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the first rollout
    assert all(m["all_finite"] for m in learning_run["history"])


def test_train_step_compiles_once(learning_run):
    assert learning_run["traces"] == 1


def test_adaptive_kl_coef_moves_toward_target(learning_run):
    history = learning_run["history"]
    for before, after in zip(history, history[1:]):
        direction = np.sign(after["kl_coef"] - before["kl_coef"])
        assert direction == np.sign(before["kl"] - BASE_CONFIG.target_kl), (before, after)


# ----------------------------------------------------------------------------------------------
# Device-count invariance: 8 simulated devices (data x fsdp) and two processes vs one device.

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_training_worker.py")


def _max_abs_diff(tree_a, tree_b) -> float:
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), tree_a, tree_b)
    return max(jax.tree.leaves(diffs))


def test_step_on_8_devices_with_fsdp_matches_1_device(tiny, learning_run):
    model, params = tiny
    mesh = make_mesh(data=4, fsdp=2)
    ppo = PPO(BASE_CONFIG, model, target_fraction_reward, mesh=mesh)
    state = ppo.init_state(params)
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state.policy_params)]
    assert any("fsdp" in tuple(spec) for spec in specs)  # parameters really are split
    batch = ppo.prompt_batch(*learning_run["batch_np"])
    state, metrics = ppo.train_step(state, ppo.frozen_params(params), batch)
    reference = learning_run["state_after_1"]
    assert float(metrics["score"]) == pytest.approx(float(learning_run["history"][0]["score"]))
    assert _max_abs_diff(jax.device_get(state.policy_params), reference.policy_params) < 1e-5
    assert _max_abs_diff(jax.device_get(state.value_params), reference.value_params) < 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _worker_env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    return env


def test_two_processes_match_single_process(learning_run, tmp_path):
    out = tmp_path / "multihost.npz"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, "multihost", str(port), str(i), "2", "2", str(out)],
                              env=_worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("multi-process workers timed out")
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    result = np.load(out)
    assert int(result["global_devices"]) == 4
    from test_training_worker import flat_params

    reference = flat_params(learning_run["state_after_1"].policy_params)
    assert float(result["score"]) == pytest.approx(float(learning_run["history"][0]["score"]))
    for name, value in reference.items():
        np.testing.assert_allclose(result[name], value, atol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------------------------
# Driver: exact resume in a fresh process, NaN guard, checkpoint compatibility, prompt errors.

RESUME_PROMPTS = 48  # not a multiple of the batch: batches straddle passes over the data
RESUME_STEPS = 2  # N: 2N in one go vs N + save + restore (fresh process) + N


def _comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING_METRICS} for r in records]


def test_resume_in_fresh_process_is_exact(tiny, tmp_path):
    model, params = tiny
    prompts = make_prompts(RESUME_PROMPTS)
    straight = train((model, params), target_fraction_reward, prompts, BASE_CONFIG, tmp_path / "straight",
                     num_steps=2 * RESUME_STEPS, progress=False, export=False)
    train((model, params), target_fraction_reward, prompts, BASE_CONFIG, tmp_path / "resumed",
          num_steps=RESUME_STEPS, progress=False, export=False)
    proc = subprocess.run([sys.executable, WORKER, "resume", str(tmp_path / "resumed"), str(RESUME_STEPS)],
                          env=_worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    ppo = PPO(BASE_CONFIG, model, target_fraction_reward)
    checkpointer = Checkpointer(tmp_path / "resumed" / "checkpoints", ppo)
    assert checkpointer.latest_step() == 2 * RESUME_STEPS
    resumed_state = jax.device_get(checkpointer.restore())
    checkpointer.close()
    straight_state = jax.device_get(straight.state)
    chex.assert_trees_all_equal(resumed_state, straight_state)  # params, opt states, beta, key: bitwise
    assert _comparable(read_metrics(tmp_path / "resumed")) == _comparable(read_metrics(tmp_path / "straight"))
    assert len(read_metrics(tmp_path / "resumed")) == 2 * RESUME_STEPS
    assert os.path.exists(tmp_path / "resumed" / "policy" / "config.json")  # exported by the worker


def test_nan_reward_raises_and_keeps_last_good_state(tiny, tmp_path):
    model, params = tiny
    ids, mask = make_prompts(2 * BATCH, seed=1)
    ids[5, 0] = POISON_TOKEN  # one prompt whose reward is NaN; it comes up within two steps
    data = prepare_prompts((ids, mask), PROMPT_LEN, seed=BASE_CONFIG.seed)
    bad_step = next(s for s in range(2) if 5 in data.indices_for_step(s, BATCH))
    with pytest.raises(NonFiniteError, match=f"step {bad_step}"):
        train((model, params), target_fraction_reward, (ids, mask), BASE_CONFIG, tmp_path, num_steps=4,
              progress=False, export=False)
    assert len(read_metrics(tmp_path)) == bad_step  # nothing logged for the bad step
    ppo = PPO(BASE_CONFIG, model, target_fraction_reward)
    checkpointer = Checkpointer(tmp_path / "checkpoints", ppo)
    assert checkpointer.latest_step() == bad_step  # the state before the bad step is on disk
    state = checkpointer.restore()
    checkpointer.close()
    assert int(state.step) == bad_step
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.policy_params)))


def test_incompatible_checkpoint_is_refused_before_any_work(tiny, tmp_path):
    model, params = tiny
    ppo = PPO(BASE_CONFIG, model, target_fraction_reward)
    checkpointer = Checkpointer(tmp_path / "checkpoints", ppo)
    checkpointer.save(ppo.init_state(params), force=True)
    checkpointer.close()
    changed = BASE_CONFIG.replace(cliprange=0.3, kl_estimator="k3")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)cliprange: checkpoint 0.2, now 0.3.*kl_estimator"):
        train((model, params), target_fraction_reward, make_prompts(BATCH), changed, tmp_path, progress=False)
    other_model = LanguageModel(tiny_gpt2_config().replace(hidden_size=64, head_dim=32))
    with pytest.raises(CheckpointMismatchError, match="policy_config.hidden_size"):
        Checkpointer(tmp_path / "checkpoints", PPO(BASE_CONFIG, other_model, target_fraction_reward)).restore()
    # Changing only how often checkpoints are written is fine.
    relaxed = Checkpointer(tmp_path / "checkpoints", PPO(BASE_CONFIG.replace(save_every=7), model,
                                                          target_fraction_reward))
    assert int(relaxed.restore().step) == 0
    relaxed.close()
    assert not os.path.exists(tmp_path / "metrics.jsonl")  # the refused runs did no work


def test_too_long_prompt_is_an_error_before_training(tiny, tmp_path):
    model, params = tiny
    prompts = [[5, 6, 7], [5, 6, 7, 8, 9], [4]]
    with pytest.raises(PromptTooLongError, match="prompt 1 with 5 tokens"):
        train((model, params), target_fraction_reward, prompts, BASE_CONFIG, tmp_path, progress=False)
    assert not os.path.exists(tmp_path / "checkpoints")


def test_reward_of_wrong_shape_is_an_error_at_trace_time(tiny, learning_run):
    model, params = tiny

    def column_reward(prompt_ids, prompt_mask, response_ids, response_mask):
        return jnp.mean(response_ids == TARGET_TOKEN, axis=1, keepdims=True)  # [B, 1]: wrong

    ppo = PPO(BASE_CONFIG, model, column_reward)
    state = learning_run["final_state"]
    before = jax.device_get(state.policy_params)
    with pytest.raises(RewardShapeError, match=r"shape \(32,\).*shape \(32, 1\)"):
        ppo.train_step(state, ppo.frozen_params(params), ppo.prompt_batch(*learning_run["batch_np"]))
    chex.assert_trees_all_equal(jax.device_get(state.policy_params), before)  # state untouched


# ----------------------------------------------------------------------------------------------
# Reward paths: the step rewards, a reward model, and a host-side text reward.


def _handmade_rollout():
    """Responses of lengths 8, 3, 1 and 5 (mask a valid prefix), tokens drawn at random."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, VOCAB, size=(4, 8)).astype(np.int32)
    lengths = np.array([8, 3, 1, 5])
    mask = (np.arange(8)[None, :] < lengths[:, None]).astype(np.int32)
    return Rollout(jnp.asarray(tokens), jnp.asarray(mask)), lengths


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jitted_make_experience(config, models, *args):
    return make_experience(config, models, *args)


def _experience(config, model, params, kl_coef, scores):
    ppo = PPO(config, model, target_fraction_reward)
    value_params = ppo.default_value_params(params, jax.random.PRNGKey(1))
    ids, mask = make_prompts(4, seed=2)
    mask[1, :2] = 0  # a left-padded prompt
    rollout_out, _ = _handmade_rollout()
    ref_params = jax.tree.map(lambda p: p * 1.1, params)  # a reference that differs: KL != 0
    experience, _, _ = _jitted_make_experience(
        config, ppo.models, params, value_params, ref_params, PromptBatch(jnp.asarray(ids), jnp.asarray(mask)),
        rollout_out, jnp.asarray(scores, jnp.float32), jnp.float32(kl_coef), ScoreStats.zeros())
    return experience


def test_zero_kl_coef_gives_the_plain_score_on_the_last_token(tiny):
    model, params = tiny
    scores = np.array([1.5, -2.0, 0.25, 3.0], np.float32)
    config = BASE_CONFIG.replace(whiten_advantages=False, lam=1.0)
    rollout_out, lengths = _handmade_rollout()
    expected = np.zeros((4, 8), np.float32)
    expected[np.arange(4), lengths - 1] = scores
    exp0 = _experience(config, model, params, 0.0, scores)
    np.testing.assert_array_equal(np.asarray(exp0.rewards), expected)
    # gamma = lam = 1: the value target of every valid token is the score itself.
    np.testing.assert_allclose(np.asarray(exp0.returns), expected.sum(1, keepdims=True) * np.asarray(rollout_out.mask),
                               atol=1e-6)
    # With beta > 0 the KL penalty is the only difference, per DESIGN.md: r = -beta * k1 * mask + score.
    beta = 0.5
    exp1 = _experience(config, model, params, beta, scores)
    kl = np.asarray(exp1.old_logprobs - exp1.ref_logprobs) * np.asarray(rollout_out.mask)
    assert np.abs(kl).sum() > 0
    np.testing.assert_allclose(np.asarray(exp1.rewards), expected - beta * kl, atol=1e-6)


def test_reward_model_scores_the_last_valid_token(tiny):
    model, params = tiny
    rm_model = ValueModel(model.config)
    rm_params = rm_model.init_params(jax.random.PRNGKey(7), trunk_params=params, head_scale=1.0)
    rollout_out, lengths = _handmade_rollout()
    ids, mask = make_prompts(4, seed=2)
    ids[1, :2], mask[1, :2] = 0, 0  # a left-padded prompt
    score = jax.jit(functools.partial(score_in_jit, RewardModel(rm_model)))
    scores = score(rm_params, jnp.asarray(ids), jnp.asarray(mask), rollout_out.tokens, rollout_out.mask)
    # Reference: each row's real tokens alone, right-padded, head output at its last real token.
    rows, last = np.zeros((4, 12), np.int32), []
    for row in range(4):
        seq = np.concatenate([ids[row][mask[row] != 0], np.asarray(rollout_out.tokens[row, :lengths[row]])])
        rows[row, :len(seq)] = seq
        last.append(len(seq) - 1)
    real = (np.arange(12)[None] <= np.array(last)[:, None]).astype(np.int32)
    values = jax.jit(rm_model.apply)(rm_params, jnp.asarray(rows), jnp.asarray(real))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(values)[np.arange(4), last], atol=1e-5)


class DigitTokenizer:
    """Token id i <-> the word "t{i}"."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{i}" for i in ids)


def test_text_reward_split_step_matches_fused_jax_reward(tiny, learning_run):
    model, params = tiny

    def text_fraction(prompts, responses):
        return [r.split().count(f"t{TARGET_TOKEN}") / max(len(r.split()), 1) for r in responses]

    ppo = PPO(BASE_CONFIG, model, TextReward(text_fraction, DigitTokenizer()))
    state = ppo.init_state(params)
    frozen = ppo.frozen_params(params)
    ids, mask = learning_run["batch_np"]
    batch = ppo.prompt_batch(ids, mask)
    rollout_out = ppo.rollout_step(state, frozen, batch)
    scores = host_scores(ppo.reward, None, ids, mask, rollout_out)
    state, metrics = ppo.update_step(state, frozen, batch, rollout_out, scores)
    assert float(metrics["score"]) == pytest.approx(float(learning_run["history"][0]["score"]))
    reference = learning_run["state_after_1"]
    assert _max_abs_diff(jax.device_get(state.policy_params), reference.policy_params) < 1e-5
