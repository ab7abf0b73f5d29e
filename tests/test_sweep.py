"""Hyper-parameters as data and sweeps: run r of a sweep equals the single run with run r's seed and
numbers; numbers never recompile; a sharded run axis; exact resume after a kill; a NaN run is frozen
while the others train; bad sweep specs fail before any compile.

One sweep of 8 runs serves most tests: two seeds, a kl_coef x learning-rate grid, one run with other
clip range and temperature, and one whose learning rate (1e38) makes its first update overflow.
"""

import json
import os
import signal
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
import test_training as tt
from conftest import persistent_compilation_cache

from jaxrlhf.metrics_log import read_metrics
from jaxrlhf.models import LanguageModel
from jaxrlhf.sampling import generate
from jaxrlhf.sharding import make_mesh
from jaxrlhf.training import PPO, Checkpointer, Sweep, SweepSpecError, grid, run_configs, train_sweep
from jaxrlhf.training.sweep import split_metrics
from jaxrlhf.training.trainer import TIMING_METRICS

STEPS = 3
NAN_RUN = 7
RUNS = (
    [{"seed": 0}, {"seed": 1}]
    + [dict(seed=2, **g) for g in grid(kl_coef=[0.0, 0.2], learning_rate=[3e-3, 1e-3])]
    + [{"seed": 3, "clip_eps": 0.1, "value_clip_eps": 0.5, "temperature": 0.8, "critic_learning_rate": 1e-3}]
    + [{"seed": 4, "learning_rate": 1e38}]
)
CONFIG = tt.BASE_CONFIG.replace(total_steps=2 * STEPS, save_every=2)
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sweep_worker.py")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    with persistent_compilation_cache(tmp_path_factory.mktemp("jax_cache")) as cache_dir:
        yield cache_dir


def _relative_error(a, b) -> float:
    """``||a - b|| / ||b||`` over all leaves of two pytrees together.

    Not leaf by leaf: the attention key biases have an exactly zero gradient (softmax ignores a
    shift shared by all keys), so their "updates" are Adam-normalised float noise, different in
    any two programs that sum in another order.
    """
    flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])  # noqa: E731
    a, b = flat(a), flat(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def sweep_run(tt_tiny):
    model, params = tt_tiny
    sweep = Sweep(CONFIG, model, tt.target_fraction_reward, RUNS)
    frozen = sweep.frozen_params(params)
    ids, mask = tt.make_prompts(tt.BATCH)
    batch = sweep.prompt_batch(np.stack([ids] * len(RUNS)), np.stack([mask] * len(RUNS)))
    state = sweep.init_state(params)
    history = []
    for _ in range(STEPS):
        state, metrics = sweep.train_step(state, frozen, batch)
        history.append(split_metrics(metrics, len(RUNS)))
    return dict(sweep=sweep, state=jax.device_get(state), history=history, batch_np=(ids, mask))


@pytest.fixture(scope="module")
def tt_tiny():
    model = LanguageModel(tt.tiny_gpt2_config())
    return model, model.init_params(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def single_runs(tt_tiny, sweep_run):
    """Each (finite) run of the sweep alone, all on one PPO trainer: numbers come from the state."""
    model, params = tt_tiny
    configs = run_configs(CONFIG, RUNS)
    traces_before = tt.TRACES["reward"]
    ppo = PPO(sweep_run["sweep"].ppo.config, model, tt.target_fraction_reward)
    frozen = ppo.frozen_params(params)
    batch = ppo.prompt_batch(*sweep_run["batch_np"])
    results = {}
    for r, config in enumerate(configs):
        if r == NAN_RUN:
            continue
        state = ppo.init_state(params, config=config)
        history = []
        for _ in range(STEPS):
            state, metrics = ppo.train_step(state, frozen, batch)
            history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
        results[r] = (jax.device_get(state), history)
    return dict(results=results, traces=tt.TRACES["reward"] - traces_before, ppo=ppo)


@pytest.mark.slow
def test_each_run_of_the_sweep_equals_its_single_run(sweep_run, single_runs):
    sweep_state = sweep_run["state"]
    for r, (single_state, single_history) in single_runs["results"].items():
        run_state = jax.tree.map(lambda x: x[r], sweep_state.runs)
        assert _relative_error(run_state.policy_params, single_state.policy_params) < 1e-5, r
        assert _relative_error(run_state.value_params, single_state.value_params) < 1e-5, r
        assert _relative_error(run_state.policy_opt_state, single_state.policy_opt_state) < 1e-5, r
        chex.assert_trees_all_equal(run_state.hparams, single_state.hparams)
        for step in range(STEPS):
            swept, alone = sweep_run["history"][step][r], single_history[step]
            for name, value in alone.items():
                assert swept[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (r, step, name)
    # The runs really differ: seeds give other samples, numbers other updates and betas.
    final = {r: sweep_run["history"][-1][r] for r in range(len(RUNS))}
    assert final[0]["score"] != final[1]["score"]
    assert final[2]["kl_coef"] == 0.0 and 0.15 < final[4]["kl_coef"] < 0.25  # adaptive: moved from 0.2
    assert final[2]["learning_rate"] == pytest.approx(3e-3) and final[3]["learning_rate"] == pytest.approx(1e-3)
    assert _relative_error(sweep_state.run(2).policy_params, sweep_state.run(3).policy_params) > 1e-4


@pytest.mark.slow
def test_numbers_never_recompile(sweep_run, single_runs):
    # Seven configs differing in kl_coef, learning rates, clip ranges, temperature and seed ran on one
    # trainer: one trace of the step (the reward function counts its traces), one compiled program.
    assert single_runs["traces"] == 1
    assert single_runs["ppo"].compiled_step_count() == 1
    assert sweep_run["sweep"].compiled_step_count() == 1


@pytest.mark.slow
def test_a_non_finite_run_is_frozen_and_the_others_train(sweep_run, tt_tiny):
    state = sweep_run["state"]
    assert list(state.active) == [r != NAN_RUN for r in range(len(RUNS))]
    assert int(state.failed_step[NAN_RUN]) == 0
    assert state.failed_step[:NAN_RUN].tolist() == [-1] * NAN_RUN
    # Frozen at its last good state: the initial parameters, finite.
    _, params = tt_tiny
    chex.assert_trees_all_equal(state.run(NAN_RUN).policy_params, jax.device_get(params))
    assert int(state.run(NAN_RUN).step) == 0
    assert all(h[NAN_RUN]["all_finite"] == 0.0 for h in sweep_run["history"])
    assert all(h[0]["all_finite"] == 1.0 for h in sweep_run["history"])


@pytest.mark.slow
def test_sweep_on_8_devices_with_sharded_run_axis_matches_1_device(tt_tiny, sweep_run):
    model, params = tt_tiny
    mesh = make_mesh(runs=4, data=2)
    sweep = Sweep(CONFIG, model, tt.target_fraction_reward, RUNS, mesh=mesh)
    state = sweep.init_state(params)
    leaf = jax.tree.leaves(state.runs.policy_params)[0]
    assert leaf.sharding.spec[0] == "runs" and len(leaf.sharding.device_set) == 8
    ids, mask = sweep_run["batch_np"]
    batch = sweep.prompt_batch(np.stack([ids] * len(RUNS)), np.stack([mask] * len(RUNS)))
    assert batch.ids.sharding.spec[:2] == ("runs", ("data", "fsdp"))  # fsdp has 1 device here
    frozen = sweep.frozen_params(params)
    for step in range(STEPS):
        state, metrics = sweep.train_step(state, frozen, batch)
        for r, m in enumerate(split_metrics(metrics, len(RUNS))):
            for name, value in sweep_run["history"][step][r].items():
                assert m[name] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), (r, step, name)
    host = jax.device_get(state)
    assert _relative_error(host.runs.policy_params, sweep_run["state"].runs.policy_params) < 1e-5
    assert list(host.active) == list(sweep_run["state"].active)


def _comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING_METRICS} for r in records]


@pytest.mark.slow
def test_killed_sweep_resumes_bit_identical(tt_tiny, tmp_path, compilation_cache):
    model, params = tt_tiny
    prompts = tt.make_prompts(tt.RESUME_PROMPTS)
    straight = train_sweep(
        (model, params),
        tt.target_fraction_reward,
        prompts,
        CONFIG,
        tmp_path / "straight",
        RUNS,
        progress=False,
        export=False,
    )
    # A fresh process trains, checkpoints at step 2 and is killed (SIGKILL) after logging step 3.
    env = tt._worker_env(compilation_cache)
    proc = subprocess.run(
        [sys.executable, WORKER, str(tmp_path / "resumed")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(read_metrics(tmp_path / "resumed" / "run_0")) == 4  # steps 0-3 logged, 3 not checkpointed
    resumed = train_sweep(
        (model, params),
        tt.target_fraction_reward,
        prompts,
        CONFIG,
        tmp_path / "resumed",
        RUNS,
        progress=False,
        export=True,
    )
    chex.assert_trees_all_equal(jax.device_get(resumed.state), jax.device_get(straight.state))
    for r in range(len(RUNS)):
        resumed_rows = read_metrics(tmp_path / "resumed" / f"run_{r}")
        assert _comparable(resumed_rows) == _comparable(read_metrics(tmp_path / "straight" / f"run_{r}")), r
    assert len(read_metrics(tmp_path / "resumed" / "run_0")) == CONFIG.total_steps  # no duplicated rows
    assert len(read_metrics(tmp_path / "resumed" / f"run_{NAN_RUN}")) == 1  # its one flagged row
    summary = json.load(open(tmp_path / "resumed" / "sweep_summary.json"))
    assert [run["failed"] for run in summary["runs"]] == [r == NAN_RUN for r in range(len(RUNS))]
    assert summary["runs"][NAN_RUN]["failed_at_step"] == 0 and summary["runs"][0]["failed_at_step"] is None
    assert summary["runs"][3]["overrides"] == RUNS[3]
    flagged = read_metrics(tmp_path / "resumed" / f"run_{NAN_RUN}")[0]
    assert flagged["step"] == 0 and flagged["non_finite"] == 1.0
    assert "First non-finite" in straight.summary["runs"][NAN_RUN]["diagnosis"]  # seen by that call
    assert os.path.exists(tmp_path / "resumed" / "run_5" / "policy" / "config.json")
    # Run 0's prompt order follows its seed and run 1's its own: different batches, same sweep.
    checkpointer = Checkpointer(tmp_path / "resumed" / "checkpoints", resumed.sweep)
    assert checkpointer.latest_step() == CONFIG.total_steps
    checkpointer.close()


def test_bad_sweep_specs_are_errors_before_any_compile(tt_tiny):
    model, _ = tt_tiny
    cases = [
        ([{"batch_size": 16}], "'batch_size' is a static field"),
        ([{"kl_estimator": "k3"}], "'kl_estimator' is a static field"),
        ([{"init_kl_cof": 0.1}], "unknown PPOConfig field 'init_kl_cof'"),
        ([{"cliprange": 0.1}], "run 0: config key 'cliprange' was renamed to 'clip_eps'"),
        ([{"learning_rate": "1e-3"}], "'learning_rate' takes numbers, got '1e-3'"),
        ([{"seed": 1.5}], "'seed' takes integers"),
        ([{"value_clip_eps": None}], "changes the program's structure: value_clip_eps is None"),
        ([{"temperature": -1.0}], "temperature must be positive"),
        ({"seed": [0, 1]}, "runs must be a non-empty list"),
        ([], "runs must be a non-empty list"),
    ]
    for runs, message in cases:
        with pytest.raises(SweepSpecError, match=message.replace("(", r"\(")):
            Sweep(CONFIG, model, tt.target_fraction_reward, runs)
    with pytest.raises(SweepSpecError, match="grid axis 'seed' must be a list"):
        grid(seed=3)
    with pytest.raises(ValueError, match="8 runs cannot be split over a 'runs' mesh axis of 3"):
        Sweep(CONFIG, model, tt.target_fraction_reward, RUNS, mesh=make_mesh(runs=3, data=1, devices=jax.devices()[:3]))


@pytest.mark.slow
def test_shared_decode_stop_samples_what_each_run_samples_alone(tt_tiny):
    """Under the sweep's vmap, decoding until every run is done (`stop_axis_name`) gives the tokens,
    log-probs and masks of a per-run early stop bit for bit (rows that are done only write padding),
    and each run's tokens and mask sampled alone. Three runs of three rows, 12 tokens in two cache segments,
    four of the 16 tokens are EOS: rows stop at different steps, one run's rows all stop early."""
    model, _ = tt_tiny
    num_runs, rows, num_new = 3, 3, 12
    params_R = jax.vmap(model.init_params)(jax.random.split(jax.random.PRNGKey(1), num_runs))
    keys_R = jax.random.split(jax.random.PRNGKey(2), num_runs)
    ids, mask = tt.make_prompts(rows)
    options = dict(max_new_tokens=num_new, temperature=1.0, eos_token_id=(0, 1, 2, 3), pad_token_id=5, cache_segments=2)

    def sample_all(stop_axis_name):
        one = lambda params, key: generate(
            model,
            params,
            ids,
            mask,
            key,
            stop_axis_name=stop_axis_name,  # noqa: E731
            **options,
        )
        return jax.device_get(jax.jit(jax.vmap(one, axis_name="runs"))(params_R, keys_R))

    shared, per_run = sample_all("runs"), sample_all(None)
    for name in ("tokens", "logprobs", "mask"):
        np.testing.assert_array_equal(getattr(shared, name), getattr(per_run, name), err_msg=name)
    for r in range(num_runs):
        run_params = jax.tree.map(lambda x, r=r: x[r], params_R)
        alone = jax.device_get(generate(model, run_params, ids, mask, keys_R[r], **options))
        np.testing.assert_array_equal(shared.tokens[r], alone.tokens, err_msg=r)
        np.testing.assert_array_equal(shared.mask[r], alone.mask, err_msg=r)
        # Alone is another program (unbatched products): the same log-probs up to float rounding.
        np.testing.assert_allclose(shared.logprobs[r], alone.logprobs, rtol=1e-5, atol=1e-6, err_msg=r)
    lengths_RxB = shared.mask.sum(axis=2)
    assert len(set(lengths_RxB.ravel().tolist())) > 2  # rows stop at different steps
    last_step_R = lengths_RxB.max(axis=1)
    assert last_step_R.min() < last_step_R.max()  # a run all done while another still decodes
    assert np.all(shared.tokens[shared.mask == 0] == 5)  # EOS-masked: padding after each row's EOS
