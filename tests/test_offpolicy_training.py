"""The off-policy trainer (issue 31): behaviour log-probs and the rollout correction in every update
path, low-precision (bf16) rollouts, bounded staleness (a queue of rollouts in flight in the
state: provenance logged, learning, interrupt + resume, sweeps, LoRA, the mesh) and the split-mesh
asynchronous trainer on 8 CPU devices.

The formulas of the corrections are tested in tests/test_core_offpolicy.py; here, that the
trainer computes them from the right arrays and hands them to the loss.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SUBPROCESS_XLA_FLAGS, persistent_compilation_cache, tiny_config

from jaxrlhf.core.stats import masked_mean
from jaxrlhf.metrics_log import read_metrics
from jaxrlhf.models import LanguageModel
from jaxrlhf.models.lora import LoraConfig
from jaxrlhf.sharding import make_mesh
from jaxrlhf.training import PPO, PPOConfig, PromptBatch, Rollout, Sweep, TextReward, grid, pipeline, run_configs, train
from jaxrlhf.training.asynchronous import SplitMeshPPO, expected_speedup, phase_means
from jaxrlhf.training.experience import Models, correct_rollout, make_experience, policy_and_values
from jaxrlhf.training.hparams import HyperParams, SweepSpecError
from jaxrlhf.training.presets import preset
from jaxrlhf.training.state import ScoreStats
from jaxrlhf.training.update import minibatch_gradients

VOCAB, EOS, TARGET, P, N = 16, 2, 3, 4, 6
BASE = PPOConfig(
    total_steps=20,
    batch_size=16,
    minibatch_size=8,
    ppo_epochs=2,
    max_new_tokens=N,
    max_prompt_len=P,
    learning_rate=3e-3,
    critic_learning_rate=3e-3,
    eos_token_id=EOS,
    kl_coef=0.01,
    seed=3,
    save_every=1000,
    loggers=("jsonl",),
)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    with persistent_compilation_cache(tmp_path_factory.mktemp("jax_cache")) as cache_dir:
        yield cache_dir


@pytest.fixture(scope="module")
def tiny():
    model = LanguageModel(
        tiny_config("gpt2", vocab_size=VOCAB, num_heads=2, max_position_embeddings=32, eos_token_id=EOS)
    )
    return model, model.init_params(jax.random.PRNGKey(0))


def target_reward(prompt_ids, prompt_mask, response_ids, response_mask):
    """Fraction of the response's tokens equal to TARGET."""
    return masked_mean((response_ids == TARGET).astype(jnp.float32), response_mask, axis=1)


def prompts(n=64, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, VOCAB, size=(n, P)).astype(np.int32)
    return ids, np.ones_like(ids)


def prompt_batch(config, step):
    """The prompts of step ``step`` (a fixed function of it, for the hand-driven loops)."""
    ids = np.random.default_rng(step).integers(4, VOCAB, size=(config.prompts_per_step, P)).astype(np.int32)
    return ids, np.ones_like(ids)


def run_steps(ppo, params, steps=3):
    """``steps`` steps driven by hand (filling the queue first): final host state and metrics."""
    config = ppo.config
    state, frozen = ppo.init_state(params), ppo.frozen_params(params)
    k = config.max_staleness
    if ppo.needs_fill(state):
        ids = np.stack([prompt_batch(config, i)[0] for i in range(k)])
        state = ppo.fill_step(state, frozen, ppo.prompt_batches(ids, np.ones_like(ids)))
    history = []
    for step in range(steps):
        state, metrics = ppo.train_step(state, frozen, ppo.prompt_batch(*prompt_batch(config, step + k)))
        history.append({name: float(v) for name, v in jax.device_get(metrics).items()})
    return jax.device_get(state), history


def leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def max_abs_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# ----------------------------------------------------------------------------------------------
# Fast: configuration and the queue


def test_off_policy_config_is_checked_and_its_numbers_are_data():
    for bad, field in (
        (dict(rollout_correction="tiss"), "rollout_correction"),
        (dict(rollout_is_cap=0.5), "rollout_is_cap"),
        (dict(rollout_mask_low=1.5), "rollout_mask_low"),
        (dict(rollout_mask_high=0.9), "rollout_mask_high"),
        (dict(rollout_reject_threshold=-1.0), "rollout_reject_threshold"),
        (dict(rollout_dtype="int8"), "rollout_dtype"),
        (dict(max_staleness=-1), "max_staleness"),
        (dict(max_staleness=1.0), "max_staleness"),
    ):
        with pytest.raises(ValueError, match=field):
            BASE.replace(**bad)
    config = BASE.replace(rollout_correction="k3-rs-tis", rollout_dtype="bfloat16", max_staleness=2)
    runs = run_configs(config, grid(rollout_is_cap=[2.0, 3.0], rollout_reject_threshold=[0.01, 0.1]))
    assert [float(HyperParams.from_config(c).rollout_is_cap) for c in runs] == [2.0, 2.0, 3.0, 3.0]
    for static in ("rollout_correction", "rollout_dtype", "max_staleness"):
        with pytest.raises(SweepSpecError, match=static):
            run_configs(config, [{static: getattr(BASE, static)}])
    with pytest.raises(SweepSpecError, match="rollout_is_cap"):
        run_configs(config, [{"rollout_is_cap": 0.5}])


def test_staleness_needs_a_reward_scored_in_the_jit():
    model = LanguageModel(tiny_config("gpt2", vocab_size=VOCAB, num_heads=2, max_position_embeddings=32))
    with pytest.raises(ValueError, match="TextReward"):
        PPO(BASE.replace(max_staleness=1), model, TextReward(lambda p, r: [0.0] * len(r)))


def test_the_queue_drops_the_oldest_and_appends_the_newest():
    k, prompts_, rows = 3, 2, 4
    queue = pipeline.empty_queue(k, prompts_, P, rows, N)
    assert np.all(np.asarray(queue.version) == -1) and pipeline.is_empty(queue)

    def flight(v):
        full = lambda shape, dtype=jnp.int32: jnp.full(shape, v, dtype)  # noqa: E731
        return pipeline.InFlight(
            PromptBatch(full((prompts_, P)), full((prompts_, P))),
            Rollout(full((rows, N)), full((rows, N)), full((rows, N), jnp.float32)),
            full((rows,), jnp.float32),
            full((rows,)),
            full((rows,)) + 10,
        )

    for v in range(4):
        queue = pipeline.push(queue, flight(v))
    np.testing.assert_array_equal(np.asarray(queue.version)[:, 0], [1, 2, 3])  # 0 dropped, oldest first
    assert not pipeline.is_empty(queue)
    head = pipeline.oldest(queue)
    assert int(head.rollout.tokens[0, 0]) == 1 and head.rollout.logprobs.dtype == jnp.float32
    stats = pipeline.staleness_stats(jnp.int32(5), head)
    assert {k_: float(v) for k_, v in stats.items()} == {
        "episode_version_min": 1.0,
        "episode_version_max": 1.0,
        "staleness_max": 4.0,
        "staleness_mean": 4.0,
        "episode_batch_min": 11.0,
        "episode_batch_max": 11.0,
    }
    keys = [np.asarray(pipeline.fill_key(jax.random.PRNGKey(0), slot, k)) for slot in range(k)]
    assert len({tuple(key) for key in keys}) == k


# ----------------------------------------------------------------------------------------------
# The correction in the update: identity when behaviour == old; every path gets the weights


@pytest.mark.slow
@pytest.mark.parametrize(
    "base, corrections",
    [
        (BASE.replace(old_logprobs_from_sampler=True, grad_accum_steps=2), ("tis", "k3-rs-tis")),
        (BASE.replace(old_logprobs_from_sampler=True, max_tokens_per_microbatch=2 * (P + N)), ("icepop",)),
    ],
    ids=["grad-accum", "packed"],
)
def test_every_correction_is_the_identity_when_behaviour_is_old(tiny, base, corrections):
    """Old log-probs from the sampler: behaviour == old, so every correction gives weights 1 and the
    mask unchanged, and 3 steps are bit-identical to the uncorrected trainer (parameters, metrics)."""
    model, params = tiny
    reference_state, reference = run_steps(PPO(base, model, target_reward), params)
    for name in corrections:
        state, history = run_steps(PPO(base.replace(rollout_correction=name), model, target_reward), params)
        assert leaves_equal(state.policy_params, reference_state.policy_params), name
        assert leaves_equal(state.value_params, reference_state.value_params), name
        for step, (metrics, expected) in enumerate(zip(history, reference)):
            assert {k: metrics[k] for k in expected} == expected, (name, step)
            assert metrics["is_weight_min"] == metrics["is_weight_max"] == 1.0
            assert metrics["reject_frac"] == 0.0 and metrics["mismatch_k3"] == 0.0


def _ragged_experience(model, params, config, seed=0, B=8):
    """An experience of a critic-free config on ragged prompts and responses, with behaviour
    log-probs ``old + noise`` (two rows far off) and the config's correction applied."""
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(1, P + 1, B)
    prompt_mask = (np.arange(P)[None] >= P - prompt_len[:, None]).astype(np.int32)
    prompt_ids = rng.integers(3, VOCAB, (B, P)) * prompt_mask
    response_len = rng.integers(1, N + 1, B)
    response_mask = (np.arange(N)[None] < response_len[:, None]).astype(np.int32)
    response_ids = rng.integers(3, VOCAB, (B, N)) * response_mask
    prompts_, rollout_out = (
        PromptBatch(jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)),
        Rollout(jnp.asarray(response_ids), jnp.asarray(response_mask)),
    )
    models = Models(model, None, has_value=False)
    hparams = HyperParams.from_config(config)
    uncorrected = config.replace(rollout_correction=None)
    experience = jax.jit(functools.partial(make_experience, uncorrected, models))(
        params, {}, params, prompts_, rollout_out, jnp.linspace(-1.0, 1.0, B), jnp.float32(0.0), ScoreStats.zeros(),
        hparams,
    )[0]  # fmt: skip
    noise = rng.normal(0.0, 0.05, (B, N)) + np.where(np.arange(B)[:, None] < 2, 1.0, 0.0)
    behaviour = jnp.where(response_mask > 0, experience.old_logprobs + noise.astype(np.float32), 0.0)
    weights, policy_mask, _ = correct_rollout(
        config, experience.old_logprobs, behaviour, experience.response_mask, hparams
    )
    return (
        models,
        hparams,
        experience._replace(behaviour_logprobs=behaviour, loss_weights=weights, policy_mask=policy_mask),
    )


@pytest.mark.slow
def test_correction_weights_and_mask_reach_the_loss_in_every_update_path(tiny):
    """K3 rejection + token TIS with behaviour != old: one minibatch in one pass, in 2 accumulated
    micro-batches and in packed micro-batches gives the same losses and gradients, and the policy
    loss is the formula's: the mean over the kept rows of their token mean of
    ``-A * min(exp(old - behaviour), C)`` (the ratio is 1 at the parameters that computed old)."""
    model, params = tiny
    config = preset("grpo", BASE, num_generations=4).replace(
        batch_size=8,
        minibatch_size=8,
        rollout_correction="k3-rs-tis",
        rollout_reject_threshold=0.05,
        rollout_is_cap=1.02,
    )
    models, hparams, experience = _ragged_experience(model, params, config)
    results = []
    for variant in (config, config.replace(grad_accum_steps=2), config.replace(max_tokens_per_microbatch=2 * (P + N))):
        grads, stats = jax.jit(
            lambda p, exp, cfg=variant: minibatch_gradients(
                cfg, models, {"policy": p, "value": {}}, exp, jnp.float32(0.05), hparams, jax.random.PRNGKey(0)
            )
        )(params, experience)
        results.append(jax.device_get((grads, stats)))
    (g0, s0), *others = results
    for g, s in others:
        for key in ("loss", "pg_loss", "policy_kl", "approx_kl", "clipfrac"):
            assert float(s[key]) == pytest.approx(float(s0[key]), abs=1e-6), key
        assert max_abs_diff(g, g0) < 1e-5

    old = np.asarray(experience.old_logprobs, np.float64)
    behaviour = np.asarray(experience.behaviour_logprobs, np.float64)
    mask = np.asarray(experience.response_mask, np.float64)
    log_w = (old - behaviour) * mask
    k3_row = ((np.exp(log_w) - log_w - 1) * mask).sum(1) / mask.sum(1)
    kept = mask * (k3_row <= 0.05)[:, None]
    assert 0 < kept.sum() < mask.sum()  # some rows rejected, some kept
    np.testing.assert_array_equal(np.asarray(experience.policy_mask), kept)
    w = np.minimum(np.exp(log_w), 1.02) * kept
    assert np.any((w > 0) & (w < 1.02)) and np.any(w == 1.02)  # some truncated, some not
    advantages = np.asarray(experience.advantages, np.float64)
    rows = kept.sum(1) > 0  # GRPO's "seq-mean-token-mean": rejected rows leave the mean
    expected_pg = np.mean(np.sum(-advantages * w, 1)[rows] / kept.sum(1)[rows])
    assert float(s0["pg_loss"]) == pytest.approx(expected_pg, abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Low-precision rollouts


@pytest.mark.slow
def test_bf16_rollouts_measure_the_mismatch_and_the_correction_weighs_the_loss_by_the_formula(tiny):
    model, params = tiny
    metrics = {}
    for dtype in ("float32", "bfloat16"):
        ppo = PPO(BASE.replace(rollout_dtype=dtype), model, target_reward)
        _, history = run_steps(ppo, params, steps=1)
        metrics[dtype] = history[0]
    # A float32 sampler differs from the trainer's forward only by the cached decode's rounding.
    assert metrics["float32"]["mismatch_abs_max"] < 1e-5
    assert metrics["bfloat16"]["mismatch_k3"] > 0 and metrics["bfloat16"]["mismatch_abs_max"] > 1e-4
    assert metrics["bfloat16"]["mismatch_abs_max"] > 100 * metrics["float32"]["mismatch_abs_max"]

    # One bf16 batch, trained with and without token TIS: the losses differ by the weights.
    config = BASE.replace(rollout_dtype="bfloat16", rollout_correction="tis", rollout_is_cap=1.001)
    ppo = PPO(config, model, target_reward)
    state, frozen = ppo.init_state(params), ppo.frozen_params(params)
    batch = ppo.prompt_batch(*prompt_batch(config, 0))
    rollout_out = ppo.rollout_step(state, frozen, batch)
    assert rollout_out.logprobs is not None
    hparams = HyperParams.from_config(config)
    repeated = ppo.repeat_prompts(batch)
    scores = jnp.linspace(-1.0, 1.0, config.batch_size)

    def experience_of(cfg):
        fn = jax.jit(functools.partial(make_experience, cfg, ppo.models))
        return fn(state.policy_params, state.value_params, params, repeated, rollout_out, scores, jnp.float32(0.01),
                  ScoreStats.zeros(), hparams)[0]  # fmt: skip

    corrected, plain = experience_of(config), experience_of(config.replace(rollout_correction=None))
    assert plain.loss_weights is None and corrected.policy_mask is None
    logprobs, _, _ = jax.jit(functools.partial(policy_and_values, ppo.models))(
        state.policy_params, state.value_params, repeated.ids, repeated.mask, rollout_out.tokens, rollout_out.mask, 1.0
    )
    pg = {}
    for name, exp in (("corrected", corrected), ("plain", plain)):
        grads, stats = jax.jit(
            lambda p, v, e: minibatch_gradients(
                config, ppo.models, {"policy": p, "value": v}, e, jnp.float32(0.01), hparams, jax.random.PRNGKey(0)
            )
        )(state.policy_params, state.value_params, exp)
        pg[name] = float(stats["pg_loss"])
    mask = np.asarray(rollout_out.mask, np.float64)
    old = np.asarray(corrected.old_logprobs, np.float64)
    w = np.minimum(np.exp(old - np.asarray(rollout_out.logprobs, np.float64)), 1.001) * mask
    assert np.any(w == 1.001) and np.any((w > 0) & (w < 1))  # the cap and the tail both act
    advantages = np.asarray(corrected.advantages, np.float64)
    ratio = np.exp(np.asarray(logprobs, np.float64) - old)
    pg_tokens = np.maximum(-advantages * ratio, -advantages * np.clip(ratio, 0.8, 1.2)) * mask
    assert pg["plain"] == pytest.approx(pg_tokens.sum() / mask.sum(), abs=1e-6)
    assert pg["corrected"] == pytest.approx((pg_tokens * w).sum() / mask.sum(), abs=1e-6)
    assert pg["corrected"] - pg["plain"] == pytest.approx((pg_tokens * (w - 1)).sum() / mask.sum(), abs=1e-6)
    assert abs(pg["corrected"] - pg["plain"]) > 1e-5


# ----------------------------------------------------------------------------------------------
# Bounded staleness through the driver: provenance, learning, interrupt and resume

STALE = BASE.replace(max_staleness=2, rollout_correction="tis")


def _check_provenance(rows, k):
    """From the logged versions: the batch trained at step s is batch s (none repeated, none
    skipped), sampled by version max(s - k, 0): never more than k updates old."""
    assert [row["step"] for row in rows] == list(range(len(rows)))
    for row in rows:
        s = row["step"]
        assert row["episode_batch_min"] == row["episode_batch_max"] == s
        assert row["episode_version_min"] == row["episode_version_max"] == max(s - k, 0)
        assert row["staleness_max"] == row["staleness_mean"] == min(s, k) <= k


@pytest.fixture(scope="module")
def stale_run(tiny, tmp_path_factory):
    """20 steps of k = 2 with token TIS through `train`; the state after step 8 kept."""
    model, params = tiny
    out_dir = tmp_path_factory.mktemp("stale")
    snapshots = {}

    def keep(step, metrics, state):
        if step == 7:
            snapshots["after_8"] = jax.device_get(state)

    result = train(
        (model, params), target_reward, prompts(), STALE, out_dir, export=False, progress=False, on_step=keep
    )
    return {"rows": read_metrics(out_dir / "metrics.jsonl"), "after_8": snapshots["after_8"], "result": result}


@pytest.mark.slow
def test_stale_rollouts_are_at_most_k_old_each_trained_once_and_learn(tiny, stale_run, tmp_path):
    model, params = tiny
    _check_provenance(stale_run["rows"], k=2)
    scores = [row["score"] for row in stale_run["rows"]]
    assert np.mean(scores[-5:]) > np.mean(scores[:5]) + 0.1, scores
    assert all(row["mismatch_k3"] >= 0 for row in stale_run["rows"])
    assert any(row["is_clipfrac"] > 0 for row in stale_run["rows"][2:])  # stale: weights above C

    config = BASE.replace(max_staleness=1, total_steps=12)
    train((model, params), target_reward, prompts(), config, tmp_path, export=False, progress=False)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    _check_provenance(rows, k=1)
    assert np.mean([r["score"] for r in rows[-4:]]) > np.mean([r["score"] for r in rows[:4]]), rows


@pytest.mark.slow
def test_interrupted_stale_run_resumes_without_losing_or_repeating_an_episode(tiny, stale_run, tmp_path):
    """k = 2, interrupted after step 4 (an exception from a hook: the last committed state, with
    its two batches in flight, is checkpointed), then rerun to step 8: every batch trained once in
    order, the metrics and the parameters those of the uninterrupted run."""
    model, params = tiny
    config = STALE.replace(total_steps=8, save_every=3)

    def interrupt(step, metrics, state):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            (model, params), target_reward, prompts(), config, tmp_path, export=False, progress=False, on_step=interrupt
        )
    result = train((model, params), target_reward, prompts(), config, tmp_path, export=False, progress=False)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    _check_provenance(rows, k=2)
    reference = stale_run["rows"][:8]
    for row, expected in zip(rows, reference, strict=True):
        assert {k: v for k, v in row.items() if k not in ("step_time", "tokens_per_s")} == {
            k: v for k, v in expected.items() if k not in ("step_time", "tokens_per_s")
        }
    final = jax.device_get(result.state)
    assert leaves_equal(final.policy_params, stale_run["after_8"].policy_params)
    assert leaves_equal(final.pipeline, stale_run["after_8"].pipeline)  # the batches in flight too


# ----------------------------------------------------------------------------------------------
# Presets, sweeps, the mesh, LoRA


@pytest.mark.slow
def test_stale_sweep_on_a_mesh_equals_its_single_runs(tiny):
    """A GRPO sweep of two seeds with k = 1, its run axis and batches split over 4 devices, equals
    each seed's single run on one device (3 steps)."""
    model, params = tiny
    config = preset("grpo", BASE, num_generations=4).replace(max_staleness=1, total_steps=3)
    runs = grid(seed=[0, 1])
    sweep = Sweep(config, model, target_reward, runs, mesh=make_mesh(devices=jax.devices()[:4], runs=2, data=2))
    state, frozen = sweep.init_state(params), sweep.frozen_params(params)
    assert sweep.needs_fill(state)

    def batches(step, count=1):
        ids = np.stack([np.stack([prompt_batch(config, step + i)[0] for i in range(count)]) for _ in runs])
        return ids, np.ones_like(ids)

    state = sweep.fill_step(state, frozen, sweep.prompt_batches(*batches(0)))
    assert not sweep.needs_fill(state)
    history = []
    for step in range(3):
        ids, mask = batches(step + 1)
        state, metrics = sweep.train_step(state, frozen, sweep.prompt_batch(ids[:, 0], mask[:, 0]))
        history.append(jax.device_get(metrics))
    state = jax.device_get(state)
    for r, run in enumerate(runs):
        single_state, single = run_steps(PPO(config.replace(**run), model, target_reward), params)
        for step in range(3):
            for name, value in single[step].items():
                assert float(history[step][name][r]) == pytest.approx(value, rel=1e-4, abs=1e-5), (r, step, name)
        assert max_abs_diff(jax.tree.map(lambda x: x[r], state.runs.policy_params), single_state.policy_params) < 1e-4


@pytest.mark.slow
def test_stale_bf16_lora_run_trains_its_adapters(tiny, tmp_path):
    model, params = tiny
    lora_model = LanguageModel(dataclasses.replace(model.config, lora=LoraConfig(rank=4, alpha=8.0)))
    config = BASE.replace(max_staleness=1, rollout_dtype="bfloat16", rollout_correction="icepop", total_steps=3)
    result = train((lora_model, params), target_reward, prompts(), config, tmp_path, export=False, progress=False)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    _check_provenance(rows, k=1)
    assert all(row["mismatch_abs_max"] > 0 for row in rows)
    assert set(jax.tree.leaves(jax.tree.map(lambda x: x.dtype, result.state.policy_params))) == {jnp.dtype("float32")}


# ----------------------------------------------------------------------------------------------
# The split-mesh asynchronous trainer


@pytest.mark.slow
def test_split_mesh_trainer_equals_the_synchronous_one_and_the_pipeline(tiny, tmp_path):
    """On 8 CPU devices, rollout on 4, update on the other 4: with k = 0 it computes what the
    synchronous trainer computes on the update's devices (and one device's numbers up to the device
    count's rounding); with k = 1 through `train`, what the single-mesh pipeline computes, with a
    span per phase and step on its timeline."""
    model, params = tiny
    devices = jax.devices()
    assert len(devices) == 8
    sampler_devices, trainer_devices = devices[:4], devices[4:]

    split = SplitMeshPPO(BASE, model, target_reward, sampler_devices=sampler_devices, trainer_devices=trainer_devices)
    split_state, split_history = run_steps(split, params)
    sync_state, sync_history = run_steps(
        PPO(BASE, model, target_reward, mesh=make_mesh(devices=trainer_devices)), params
    )
    assert max_abs_diff(split_state.policy_params, sync_state.policy_params) < 1e-6
    assert max_abs_diff(split_state.value_params, sync_state.value_params) < 1e-6
    for got, expected in zip(split_history, sync_history):
        assert got == pytest.approx(expected, abs=1e-6)
    one_state, _ = run_steps(PPO(BASE, model, target_reward), params)
    assert max_abs_diff(split_state.policy_params, one_state.policy_params) < 1e-3

    config = BASE.replace(max_staleness=1, total_steps=4)
    split = SplitMeshPPO(
        config,
        model,
        target_reward,
        sampler_devices=sampler_devices,
        trainer_devices=trainer_devices,
        timeline="overlap",
    )
    split_result = train((model, params), target_reward, prompts(), config, tmp_path / "split", export=False,
                         progress=False, trainer=split)  # fmt: skip
    sync_result = train((model, params), target_reward, prompts(), config, tmp_path / "sync", export=False,
                        progress=False, mesh=make_mesh(devices=trainer_devices))  # fmt: skip
    rows = read_metrics(tmp_path / "split" / "metrics.jsonl")
    _check_provenance(rows, k=1)
    for got, expected in zip(rows, read_metrics(tmp_path / "sync" / "metrics.jsonl"), strict=True):
        for name in expected:
            if name not in ("step_time", "tokens_per_s"):
                assert got[name] == pytest.approx(expected[name], abs=1e-6), name
    assert max_abs_diff(split_result.state.policy_params, sync_result.state.policy_params) < 1e-6
    assert sorted((s.phase, s.step) for s in split.timeline) == sorted(
        (phase, step) for phase in ("rollout", "update", "transfer") for step in range(4)
    )
    assert set(phase_means(split.timeline)) == {"rollout", "update", "transfer"}
    assert expected_speedup(1.0, 1.0) == pytest.approx(2.0)


def _pause(total):
    time.sleep(1.5)
    return np.zeros((), np.float32)


def slow_reward(prompt_ids, prompt_mask, response_ids, response_mask):
    """`target_reward`, after the host sleeps for 1.5 s (a rollout that takes long on its devices)."""
    scores = target_reward(prompt_ids, prompt_mask, response_ids, response_mask)
    return scores + jax.pure_callback(_pause, jax.ShapeDtypeStruct((), jnp.float32), scores.sum())


@pytest.mark.slow
def test_split_mesh_dispatches_the_update_while_the_rollout_runs(tiny):
    """With k = 1 and a rollout that takes 1.5 s on the sampler mesh, the step dispatches the
    update while the rollout is in flight: nothing on the host waits for the rollout before the
    update is on its way. (XLA:CPU then runs the two programs one after the other: its simulated
    devices share one host; on accelerators they run at once.)"""
    model, params = tiny
    devices = jax.devices()
    config = BASE.replace(max_staleness=1)
    split = SplitMeshPPO(
        config, model, slow_reward, sampler_devices=devices[:4], trainer_devices=devices[4:], timeline="overlap"
    )
    _, history = run_steps(split, params, steps=2)
    spans = {(s.phase, s.step): s for s in split.timeline}
    rollout, update = spans["rollout", 1], spans["update", 1]
    assert rollout.duration >= 1.5
    assert rollout.start < update.start < rollout.start + 1.0 < rollout.end, split.timeline
    assert history[1]["staleness_max"] == 1.0


@pytest.mark.slow
def test_timeline_benchmark_runs_in_its_quick_mode(tmp_path):
    """benchmarks/async_timeline.py --quick (its own 8 simulated devices): the phase times, the
    expected gain and both timelines, as JSON and PNG."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS=SUBPROCESS_XLA_FLAGS)
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "async_timeline.py"), "--quick", "--out_dir", str(tmp_path)],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "expected speedup from the phase times" in proc.stdout
    with open(tmp_path / "async_timeline.json") as f:
        result = json.load(f)
    assert set(result["sequential_phase_s"]) == {"rollout", "update", "transfer"}
    assert result["expected_speedup_over_sequential"] > 0 and result["synchronous_step_s"] > 0
    assert {span["phase"] for span in result["timelines"]["overlap"]} == {"rollout", "update", "transfer"}
    assert (tmp_path / "async_timeline.png").stat().st_size > 0
