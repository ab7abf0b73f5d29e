"""PPO trainer: learning on a toy task, one compile, device-count invariance, reward paths, errors,
every ablation switch in one real step, and the config table of docs/training.md.

Compiles are the cost here (2 shared CPU cores), so one module-scoped learning run on one device
provides the single-device reference for the other tests, and tests reuse compiled steps by using
equal `PPO` setups (jit caches are keyed on them). A JAX persistent compilation cache in a temporary
directory, shared with the fresh-process resume test, lets that process load the step this one
compiled instead of compiling it again. (The two processes of the multi-host test cannot share
programs: on CPU their cache keys differ per process, and `jax_share_binary_between_hosts` then
deadlocks, so each compiles its own.)
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
from conftest import SUBPROCESS_XLA_FLAGS, persistent_compilation_cache, tiny_config

from jaxrlhf.core.stats import masked_mean
from jaxrlhf.metrics_log import read_metrics
from jaxrlhf.models import LanguageModel, ModelConfig, ValueModel
from jaxrlhf.sharding import make_mesh
from jaxrlhf.training import (
    PPO,
    Checkpointer,
    CheckpointMismatchError,
    NonFiniteError,
    PPOConfig,
    PromptBatch,
    PromptTooLongError,
    RewardModel,
    RewardShapeError,
    Rollout,
    TextReward,
    make_experience,
    prepare_prompts,
    train,
)
from jaxrlhf.training.hparams import HyperParams
from jaxrlhf.training.rewards import postprocess_scores, score_in_jit
from jaxrlhf.training.state import ScoreStats
from jaxrlhf.training.trainer import TIMING_METRICS, host_scores

VOCAB = 16
TARGET_TOKEN = 3
POISON_TOKEN = 15  # a prompt starting with it makes the test reward NaN (to test the NaN guard)
PROMPT_LEN = 4
BATCH = 32
LEARN_STEPS = 25


def tiny_gpt2_config() -> ModelConfig:
    return tiny_config("gpt2", vocab_size=VOCAB, num_heads=2, max_position_embeddings=32, eos_token_id=None)


TRACES = {"reward": 0}


def target_fraction_reward(prompt_ids, prompt_mask, response_ids, response_mask):
    """Fraction of valid response tokens equal to TARGET_TOKEN (NaN for poisoned prompts)."""
    TRACES["reward"] += 1  # Python side effect: runs once per trace of the train step
    fraction = masked_mean((response_ids == TARGET_TOKEN).astype(jnp.float32), response_mask, axis=1)
    return jnp.where(prompt_ids[:, -PROMPT_LEN] == POISON_TOKEN, jnp.nan, fraction)


BASE_CONFIG = PPOConfig(
    total_steps=LEARN_STEPS,
    batch_size=BATCH,
    minibatch_size=16,
    ppo_epochs=2,
    max_new_tokens=8,
    max_prompt_len=PROMPT_LEN,
    learning_rate=3e-3,
    critic_learning_rate=3e-3,
    eos_token_id=-1,
    kl_coef=0.01,
    adaptive_kl=True,
    target_kl=1.0,
    kl_horizon=200.0,
    seed=0,
)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    with persistent_compilation_cache(tmp_path_factory.mktemp("jax_cache")) as cache_dir:
        yield cache_dir


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
    return dict(
        ppo=ppo,
        history=history,
        state_after_1=state_after_1,
        batch_np=(ids, mask),
        traces=TRACES["reward"] - traces_before,
        final_state=state,
    )


@pytest.mark.slow
def test_ppo_increases_reward_with_finite_positive_kl(learning_run):
    scores = np.array([m["score"] for m in learning_run["history"]])
    kls = np.array([m["kl"] for m in learning_run["history"]])
    assert scores[:3].mean() < 0.15  # chance level is 1/16
    assert scores[-3:].mean() > 0.5, scores
    assert np.all(np.isfinite(kls)) and np.all(kls[1:] > 0), kls
    assert kls[0] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the first rollout
    assert all(m["all_finite"] for m in learning_run["history"])


@pytest.mark.slow
def test_train_step_compiles_once(learning_run):
    assert learning_run["traces"] == 1


@pytest.mark.slow
def test_adaptive_kl_coef_moves_toward_target(learning_run):
    history = learning_run["history"]
    for before, after in zip(history, history[1:]):
        direction = np.sign(after["kl_coef"] - before["kl_coef"])
        assert direction == np.sign(before["kl"] - BASE_CONFIG.target_kl), (before, after)


# ----------------------------------------------------------------------------------------------
# Device-count invariance: 8 simulated devices (data x fsdp) and two processes vs one device.

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "training_worker.py")


def _max_abs_diff(tree_a, tree_b) -> float:
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), tree_a, tree_b)
    return max(jax.tree.leaves(diffs))


@pytest.mark.slow
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


def _worker_env(cache_dir):
    """The workers' environment: their own device count; this module's compilation cache."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = SUBPROCESS_XLA_FLAGS  # the worker adds its own device count
    if cache_dir:
        env["JAXRLHF_TEST_COMPILATION_CACHE"] = cache_dir
    return env


@pytest.mark.slow
def test_two_processes_match_single_process(learning_run, tmp_path):
    out = tmp_path / "multihost.npz"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, "multihost", str(port), str(i), "2", "2", str(out)],
            env=_worker_env(None),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
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
    from training_worker import flat_params

    reference = flat_params(learning_run["state_after_1"].policy_params)
    assert float(result["score"]) == pytest.approx(float(learning_run["history"][0]["score"]))
    for name, value in reference.items():
        # A key bias shifts every score of a query by the same amount, which the softmax ignores:
        # its gradient is zero up to round-off, so its step is round-off too, of either program.
        atol = 1e-4 if "['k']['bias']" in name else 1e-5
        np.testing.assert_allclose(result[name], value, atol=atol, err_msg=name)


# ----------------------------------------------------------------------------------------------
# Driver: exact resume in a fresh process, NaN guard, checkpoint compatibility, prompt errors.

RESUME_PROMPTS = 48  # not a multiple of the batch: batches straddle passes over the data
RESUME_STEPS = 2  # N: 2N in one go vs N + save + restore (fresh process) + N


def _comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING_METRICS} for r in records]


@pytest.mark.slow
def test_resume_in_fresh_process_is_exact(tiny, tmp_path, compilation_cache):
    model, params = tiny
    prompts = make_prompts(RESUME_PROMPTS)
    straight = train(
        (model, params),
        target_fraction_reward,
        prompts,
        BASE_CONFIG,
        tmp_path / "straight",
        num_steps=2 * RESUME_STEPS,
        progress=False,
        export=False,
    )
    train(
        (model, params),
        target_fraction_reward,
        prompts,
        BASE_CONFIG,
        tmp_path / "resumed",
        num_steps=RESUME_STEPS,
        progress=False,
        export=False,
    )
    proc = subprocess.run(
        [sys.executable, WORKER, "resume", str(tmp_path / "resumed"), str(RESUME_STEPS)],
        env=_worker_env(compilation_cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
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


@pytest.mark.slow
def test_nan_reward_raises_and_keeps_last_good_state(tiny, tmp_path):
    model, params = tiny
    ids, mask = make_prompts(2 * BATCH, seed=1)
    ids[5, 0] = POISON_TOKEN  # one prompt whose reward is NaN; it comes up within two steps
    data = prepare_prompts((ids, mask), PROMPT_LEN, seed=BASE_CONFIG.seed)
    bad_step = next(s for s in range(2) if 5 in data.indices_for_step(s, BATCH))
    with pytest.raises(NonFiniteError, match=f"(?s)step {bad_step}.*First non-finite: scores.*the reward"):
        train(
            (model, params),
            target_fraction_reward,
            (ids, mask),
            BASE_CONFIG,
            tmp_path,
            num_steps=4,
            progress=False,
            export=False,
        )
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
    changed = BASE_CONFIG.replace(clip_eps=0.3, kl_estimator="k3")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)clip_eps: checkpoint 0.2, now 0.3.*kl_estimator"):
        train((model, params), target_fraction_reward, make_prompts(BATCH), changed, tmp_path, progress=False)
    other_model = LanguageModel(tiny_gpt2_config().replace(hidden_size=64, head_dim=32))
    with pytest.raises(CheckpointMismatchError, match="policy_config.hidden_size"):
        Checkpointer(tmp_path / "checkpoints", PPO(BASE_CONFIG, other_model, target_fraction_reward)).restore()
    # Changing only how often checkpoints are written is fine.
    relaxed = Checkpointer(
        tmp_path / "checkpoints", PPO(BASE_CONFIG.replace(save_every=7), model, target_fraction_reward)
    )
    assert int(relaxed.restore().step) == 0
    relaxed.close()
    assert not os.path.exists(tmp_path / "metrics.jsonl")  # the refused runs did no work


def test_too_long_prompt_is_an_error_before_training(tiny, tmp_path):
    model, params = tiny
    prompts = [[5, 6, 7], [5, 6, 7, 8, 9], [4]]
    with pytest.raises(PromptTooLongError, match="prompt 1 with 5 tokens"):
        train((model, params), target_fraction_reward, prompts, BASE_CONFIG, tmp_path, progress=False)
    assert not os.path.exists(tmp_path / "checkpoints")


def test_reward_of_wrong_shape_is_an_error_at_trace_time(tiny):
    model, params = tiny

    def column_reward(prompt_ids, prompt_mask, response_ids, response_mask):
        return jnp.mean(response_ids == TARGET_TOKEN, axis=1, keepdims=True)  # [B, 1]: wrong

    ppo = PPO(BASE_CONFIG, model, column_reward)
    state = ppo.init_state(params)
    before = jax.device_get(state.policy_params)
    with pytest.raises(RewardShapeError, match=r"shape \(32,\).*shape \(32, 1\)"):
        ppo.train_step(state, ppo.frozen_params(params), ppo.prompt_batch(*make_prompts(BATCH)))
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


KL_KINDS = ("k1", "k2", "k3", "abs")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jitted_make_experiences(configs, models, *args):
    return [make_experience(config, models, *args, HyperParams.from_config(config))[0] for config in configs]


def _experiences(config, model, params, kl_coef, scores):
    """make_experience on the hand-made rollout with each KL estimator (one compile for all four)."""
    ppo = PPO(config, model, target_fraction_reward)
    value_params = ppo.default_value_params(params, jax.random.PRNGKey(1))
    ids, mask = make_prompts(4, seed=2)
    mask[1, :2] = 0  # a left-padded prompt
    rollout_out, _ = _handmade_rollout()
    ref_params = jax.tree.map(lambda p: p * 1.1, params)  # a reference that differs: KL != 0
    configs = tuple(config.replace(kl_estimator=kind) for kind in KL_KINDS)
    experiences = _jitted_make_experiences(
        configs,
        ppo.models,
        params,
        value_params,
        ref_params,
        PromptBatch(jnp.asarray(ids), jnp.asarray(mask)),
        rollout_out,
        jnp.asarray(scores, jnp.float32),
        jnp.float32(kl_coef),
        ScoreStats.zeros(),
    )
    return dict(zip(KL_KINDS, jax.device_get(experiences)))


@pytest.mark.slow
def test_zero_kl_coef_gives_the_plain_score_on_the_last_token(tiny):
    model, params = tiny
    scores = np.array([1.5, -2.0, 0.25, 3.0], np.float32)
    config = BASE_CONFIG.replace(whiten_advantages=False, gae_lambda=1.0)
    rollout_out, lengths = _handmade_rollout()
    expected = np.zeros((4, 8), np.float32)
    expected[np.arange(4), lengths - 1] = scores
    mask = np.asarray(rollout_out.mask)
    for exp0 in _experiences(config, model, params, 0.0, scores).values():
        np.testing.assert_array_equal(np.asarray(exp0.rewards), expected)
        # gamma = gae_lambda = 1: the value target of every valid token is the score itself.
        np.testing.assert_allclose(np.asarray(exp0.returns), expected.sum(1, keepdims=True) * mask, atol=1e-6)
    # With beta > 0 the KL penalty is the only difference, per docs/design.md: r = -beta * kl * mask + score,
    # with each estimator of d = ref_logprobs - logprobs (float64 NumPy here).
    beta = 0.5
    experiences = _experiences(config, model, params, beta, scores)
    d = np.asarray(experiences["k1"].ref_logprobs, np.float64) - np.asarray(experiences["k1"].old_logprobs, np.float64)
    assert np.any(d * mask > 1e-3) and np.any(d * mask < -1e-3)
    estimates = {"k1": -d, "k2": d**2 / 2, "k3": np.exp(d) - d - 1, "abs": np.abs(d)}
    for kind, exp1 in experiences.items():
        np.testing.assert_array_equal(exp1.old_logprobs, experiences["k1"].old_logprobs)
        np.testing.assert_allclose(
            np.asarray(exp1.rewards), expected - beta * estimates[kind] * mask, atol=1e-6, err_msg=kind
        )


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
        seq = np.concatenate([ids[row][mask[row] != 0], np.asarray(rollout_out.tokens[row, : lengths[row]])])
        rows[row, : len(seq)] = seq
        last.append(len(seq) - 1)
    real = (np.arange(12)[None] <= np.array(last)[:, None]).astype(np.int32)
    values = jax.jit(rm_model.apply)(rm_params, jnp.asarray(rows), jnp.asarray(real))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(values)[np.arange(4), last], atol=1e-5)


class DigitTokenizer:
    """Token id i <-> the word "t{i}"."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{i}" for i in ids)


@pytest.mark.slow
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
    # A second round reuses both compiled halves: update_step returns the state with the shardings
    # (and committedness) that init_state gave it, so rollout_step sees the same input types.
    for _ in range(2):
        rollout_out = ppo.rollout_step(state, frozen, batch)
        state, metrics = ppo.update_step(
            state, frozen, batch, rollout_out, host_scores(ppo.reward, None, ids, mask, rollout_out)
        )
        jax.block_until_ready(metrics)
    assert ppo.compiled_step_count("rollout") == 1
    assert ppo.compiled_step_count("update") == 1


# ----------------------------------------------------------------------------------------------
# Ablation switches: one real step (rollout -> update) with every rarely-used switch on at once.

EOS = 5
SWITCHES = PPOConfig(
    total_steps=10,
    batch_size=8,
    minibatch_size=4,
    ppo_epochs=1,
    grad_accum_steps=2,
    max_new_tokens=6,
    max_prompt_len=PROMPT_LEN,
    eos_token_id=EOS,
    learning_rate=1e-3,
    critic_learning_rate=1e-3,
    shared_trunk=True,  # value head on the policy trunk
    kl_placement="loss",
    kl_estimator="k3",  # GRPO-style KL term in the policy loss
    score_clip=1.0,
    score_norm="batch",  # scores clipped to [-1, 1], then divided by their std
    missing_eos_penalty=-0.5,  # rows without EOS score -0.5
    entropy_coef=0.01,
    value_clip_eps=None,
    gamma=1.0,
    gae_lambda=1.0,  # returns = sum of later rewards (values start at 0)
    loss_agg="seq-mean-token-mean",
    seed=3,
)
SWITCH_BETA = 0.5
# Raw scores outside [-1, 1] in most rows; given by the "host" so the expected scores are known.
SWITCH_RAW_SCORES = np.array([3.0, -4.0, 0.25, -0.5, 2.0, 0.75, -2.0, 1.5], np.float32)


def _with_kl_coef(state, beta):
    return state.replace(kl_ctl=state.kl_ctl._replace(kl_coef=jnp.asarray(beta, jnp.float32)))


@pytest.fixture(scope="module")
def switch_runs(tiny):
    """One rollout, then the jitted update step with grad_accum 2 (beta 0.5 and 0) and grad_accum 1."""
    model, params = tiny
    ref_params = jax.tree.map(lambda p: p * 1.5, params)  # a reference that differs: KL > 0 at once
    ids, mask = make_prompts(SWITCHES.batch_size, seed=4)
    ppo = PPO(SWITCHES, model, target_fraction_reward)
    state = ppo.init_state(params)
    frozen = ppo.frozen_params(ref_params)
    batch = ppo.prompt_batch(ids, mask)
    rollout_out = jax.device_get(ppo.rollout_step(state, frozen, batch))
    runs = {}
    for name, accum, beta in (("accum2", 2, SWITCH_BETA), ("beta0", 2, 0.0), ("accum1", 1, SWITCH_BETA)):
        step_ppo = ppo if accum == 2 else PPO(SWITCHES.replace(grad_accum_steps=accum), model, target_fraction_reward)
        new_state, metrics = step_ppo.update_step(
            _with_kl_coef(state, beta), frozen, batch, rollout_out, SWITCH_RAW_SCORES
        )
        runs[name] = (jax.device_get(new_state), jax.device_get(metrics))
    return dict(runs=runs, rollout=rollout_out, state=jax.device_get(state))


def _expected_switch_scores(tokens, mask):
    """NumPy float64: missing-EOS penalty, then clipping, then division by the batch std (ddof 1)."""
    eos_B = np.any((tokens == EOS) & (mask != 0), axis=1)
    scores = np.where(eos_B, SWITCH_RAW_SCORES.astype(np.float64), SWITCHES.missing_eos_penalty)
    clipped = np.clip(scores, -SWITCHES.score_clip, SWITCHES.score_clip)
    return eos_B, scores, clipped, clipped / np.std(clipped, ddof=1)


def _switch_scores(runs):
    tokens, mask = np.asarray(runs["rollout"].tokens), np.asarray(runs["rollout"].mask)
    return (*_expected_switch_scores(tokens, mask), mask)


def _check_missing_eos_penalty(runs):
    """The penalty replaces the score of rows without EOS, whatever their raw score."""
    eos_B, _, _, _, _ = _switch_scores(runs)
    _, metrics = runs["runs"]["accum2"]
    assert 0 < eos_B.sum() < len(eos_B)  # both kinds of rows are present
    assert np.any(SWITCH_RAW_SCORES[~eos_B] != SWITCHES.missing_eos_penalty)
    assert float(metrics["eos_fraction"]) == pytest.approx(eos_B.mean())


def _check_score_clip(runs):
    """Clipping bounds the (penalised) scores to [-1, 1]; the raw score is logged as is."""
    _, penalised, _, expected_B, _ = _switch_scores(runs)
    _, metrics = runs["runs"]["accum2"]
    assert np.any(np.abs(penalised) > SWITCHES.score_clip)
    assert float(metrics["score"]) == pytest.approx(SWITCH_RAW_SCORES.mean(), abs=1e-6)
    assert float(metrics["score_used"]) == pytest.approx(expected_B.mean(), abs=1e-5)


def _check_score_norm(runs):
    """ "batch" normalisation divides the clipped scores by their batch std."""
    _, _, clipped, expected_B, _ = _switch_scores(runs)
    _, metrics = runs["runs"]["accum2"]
    assert np.std(clipped, ddof=1) != pytest.approx(1.0)  # the division changes the scores
    assert float(metrics["score_used"]) == pytest.approx(expected_B.mean(), abs=1e-5)


def _check_kl_placement(runs):
    """kl_placement="loss": the step rewards are the score alone. The zero value head gives V = 0, so
    with gamma = gae_lambda = 1 every valid token's return is its row's score, for any beta ..."""
    _, _, _, expected_B, mask = _switch_scores(runs)
    _, metrics = runs["runs"]["accum2"]
    _, metrics_beta0 = runs["runs"]["beta0"]
    lengths_B = mask.sum(1)
    expected_returns_mean = (expected_B * lengths_B).sum() / lengths_B.sum()
    assert float(metrics["value_mean"]) == 0.0
    for m in (metrics, metrics_beta0):
        assert float(m["returns_mean"]) == pytest.approx(expected_returns_mean, abs=1e-5)
    # ... although there is a KL to penalise (in the rewards it would move returns_mean by more than
    # beta * KL per token, far beyond the tolerance).
    assert float(metrics["kl_per_token"]) * SWITCH_BETA > 1e-3
    assert float(metrics["non_score_reward"]) == pytest.approx(-SWITCH_BETA * float(metrics["kl"]))


def _check_entropy_coef(runs):
    """The KL term (k3 >= 0) is in the policy loss, with the entropy bonus:
    loss = pg_loss + vf_coef * vf_loss - entropy_coef * H + beta * KL."""
    _, metrics = runs["runs"]["accum2"]
    _, metrics_beta0 = runs["runs"]["beta0"]
    for m, beta in ((metrics, SWITCH_BETA), (metrics_beta0, 0.0)):
        assert float(m["policy_kl"]) > 1e-3 and float(m["policy_entropy"]) > 0.1
        expected_loss = (
            m["pg_loss"]
            + SWITCHES.vf_coef * m["vf_loss"]
            - SWITCHES.entropy_coef * m["policy_entropy"]
            + beta * m["policy_kl"]
        )
        assert float(m["loss"]) == pytest.approx(float(expected_loss), rel=1e-5, abs=1e-6)


def _check_kl_coef(runs):
    """beta changes the update only through the loss's KL term: its gradient reaches the policy."""
    state, _ = runs["runs"]["accum2"]
    beta0_state, _ = runs["runs"]["beta0"]
    assert _max_abs_diff(state.policy_params, beta0_state.policy_params) > 1e-4


def _check_value_clip_eps(runs):
    """value_clip_eps=None: no value clipping."""
    _, metrics = runs["runs"]["accum2"]
    assert float(metrics["vf_clipfrac"]) == 0.0


def _check_shared_trunk(runs):
    """shared_trunk: the critic is only a head on the policy, and it trains."""
    state, _ = runs["runs"]["accum2"]
    assert set(state.value_params) == {"kernel", "bias"}
    assert _max_abs_diff(state.value_params, runs["state"].value_params) > 1e-4


def _check_grad_accum_steps(runs):
    """grad_accum_steps=2 (micro-batches of 2, weighted by their share of tokens / rows) gives the
    same gradients and update as one pass over the minibatch of 4."""
    state, metrics = runs["runs"]["accum2"]
    accum1_state, accum1_metrics = runs["runs"]["accum1"]
    for key in (
        "policy_grad_norm",
        "value_grad_norm",
        "loss",
        "pg_loss",
        "vf_loss",
        "policy_kl",
        "policy_entropy",
        "approx_kl",
        "ratio_mean",
        "clipfrac",
    ):
        assert float(metrics[key]) == pytest.approx(float(accum1_metrics[key]), rel=1e-4, abs=1e-6), key
    moved = _max_abs_diff(state.policy_params, runs["state"].policy_params)
    assert moved > 1e-4
    assert _max_abs_diff(state.policy_params, accum1_state.policy_params) < 1e-6 + 1e-3 * moved
    assert _max_abs_diff(state.value_params, accum1_state.value_params) < 1e-6 + 1e-3 * moved


# One case per switch of SWITCHES, all on the same step (the module-scoped fixture runs it once).
SWITCH_CHECKS = {
    "missing_eos_penalty": _check_missing_eos_penalty,
    "score_clip": _check_score_clip,
    "score_norm": _check_score_norm,
    "kl_placement": _check_kl_placement,
    "entropy_coef": _check_entropy_coef,
    "kl_coef": _check_kl_coef,
    "value_clip_eps": _check_value_clip_eps,
    "shared_trunk": _check_shared_trunk,
    "grad_accum_steps": _check_grad_accum_steps,
}


@pytest.mark.slow
@pytest.mark.parametrize("switch", list(SWITCH_CHECKS))
def test_ablation_switch_in_one_step(switch_runs, switch):
    SWITCH_CHECKS[switch](switch_runs)


def test_score_postprocessing_of_one_score_or_equal_scores_is_finite():
    eos = jnp.array([True])
    for norm in ("batch", "running"):
        for shift in (False, True):
            config = PPOConfig(score_norm=norm, score_norm_shift_mean=shift, batch_size=1, minibatch_size=1)
            scores, stats = postprocess_scores(
                config, jnp.array([2.5]), eos, ScoreStats.zeros(), HyperParams.from_config(config)
            )
            # No spread to divide by: the score is left unscaled (and centred with shift_mean).
            np.testing.assert_allclose(np.asarray(scores), [0.0 if shift else 2.5])
            assert int(stats.count) == 1
    config = PPOConfig(score_norm="batch", batch_size=4, minibatch_size=4)
    scores, _ = postprocess_scores(
        config, jnp.full((4,), 3.0), jnp.ones(4, bool), ScoreStats.zeros(), HyperParams.from_config(config)
    )
    np.testing.assert_allclose(np.asarray(scores), 3.0)
    # The normal case is unchanged: s / std(s, ddof=1); penalty and clipping come first.
    config = PPOConfig(score_norm="batch", score_clip=2.0, missing_eos_penalty=-1.0, batch_size=4, minibatch_size=4)
    raw, found = jnp.array([5.0, 0.5, -3.0, 1.0]), jnp.array([True, True, True, False])
    scores, _ = postprocess_scores(config, raw, found, ScoreStats.zeros(), HyperParams.from_config(config))
    used = np.array([2.0, 0.5, -2.0, -1.0])
    np.testing.assert_allclose(np.asarray(scores), used / np.std(used, ddof=1), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# docs/training.md lists every PPOConfig field with its default.

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "training.md")


def _doc_config_table():
    """``{field: default text}`` from the table of the "## PPOConfig" section."""
    text = open(DOCS).read().split("\n## PPOConfig\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names = [n.strip().strip("`") for n in cells[0].split(",")]
        defaults = [d.strip() for d in cells[1].split(",")] if len(names) > 1 else [cells[1]]
        assert len(names) == len(defaults), line
        for name, default in zip(names, defaults):
            assert name not in rows, f"{name} listed twice"
            rows[name] = default
    return rows


def test_docs_list_every_ppo_config_field_with_its_default():
    import ast
    import dataclasses

    documented = _doc_config_table()
    fields = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    assert sorted(documented) == sorted(fields)  # nothing missing, nothing stale
    for name, default in fields.items():
        value = ast.literal_eval(documented[name])
        assert type(value) is type(default) or {type(value), type(default)} == {int, float}, (name, value, default)
        assert value == default, f"docs/training.md says {name} = {documented[name]}, PPOConfig has {default!r}"
