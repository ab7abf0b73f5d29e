"""The rollout engine (issue 29, sampler part): per-row cache writes, one prefill per group,
refilled slots; the same samples as the static sampler, under jit, a sweep's vmap, the mesh and
in the trainer.

Bit-identity. The engines run the same computation for every row (same cache layout, positions,
masks and draws); whether XLA:CPU then gives the same bits depends on its kernels doing a row's
arithmetic the same way at both batch sizes. For the tiny models here they do, except where
noted (docs/sampling.md, "The rollout engine", "The same samples"): a one-row matrix
product (one slot per device), LoRA's narrow rank-r products, and the static sampler's growing
cache segments (`max_new_tokens >= 32`), whose attention reads fewer cache slots than the engine's
full-length one. Those cases are tested for identical tokens and log-probs within 3e-6 (1e-5 with
LoRA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import persistent_compilation_cache, tiny_config
from jax.sharding import Mesh

from jaxrlhf.models import ModelOutput
from jaxrlhf.models.lm import LanguageModel
from jaxrlhf.models.lora import LoraConfig, LoraParams, init_lora, with_lora
from jaxrlhf.models.transformer import put_cache_prefix, take_cache_rows
from jaxrlhf.sampling import SampleOutput, generate, make_sampler
from jaxrlhf.training import PPO, PPOConfig
from jaxrlhf.tuning import Tuning

VOCAB = 96
P = 7  # prompt width
N = 12  # response budget (one cache segment: the static sampler reads its full cache too)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    with persistent_compilation_cache(tmp_path_factory.mktemp("jax_cache")) as cache_dir:
        yield cache_dir


@functools.cache
def _model(kind: str = "gpt2", scan_layers: bool = False, lora: bool = False):
    """A tiny random model whose logits are spread out enough for ragged EOS steps; with `lora`,
    `LoraParams` whose adapters are non-zero."""
    model = LanguageModel(tiny_config(kind, vocab_size=VOCAB, scan_layers=scan_layers), Tuning.for_backend())
    params = model.init_params(jax.random.key(0))
    params = jax.tree.map(lambda p: p * 5 if p.ndim >= 2 else p, params)
    if lora:
        config = LoraConfig(rank=4, alpha=8.0, target_modules=("q", "v", "up"))
        model = with_lora(model, config)
        adapters = jax.tree.map(lambda a: a + 0.3, init_lora(config, params, jax.random.key(1)))  # B != 0
        params = LoraParams(params, adapters)
    return model, params


def _prompts(num_prompts: int, seed: int = 0, width: int = P):
    """Left-padded prompts of lengths 1 .. width."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, width + 1, num_prompts)
    lengths[0] = width
    ids = rng.integers(1, VOCAB, (num_prompts, width)).astype(np.int32)
    mask = (np.arange(width)[None] >= width - lengths[:, None]).astype(np.int32)
    return ids * mask, mask


# 9 / 96 per sampled step; chosen among the tiny models' greedy tokens so that greedy responses
# end at ragged steps too (`_assert_ragged` checks).
EOS = (5, 7, 13, 21, 45, 63, 64, 76, 77)


@functools.cache
def _forward(model):
    return jax.jit(model.forward, static_argnames=("cache_size",))


@functools.cache
def _sampler_fn(model, num_new=N, **options):
    """`generate` jitted with a traced temperature (0 = greedy): one program for both."""

    def run(params, ids, mask, key, temperature):
        return generate(
            model, params, ids, mask, key, max_new_tokens=num_new, temperature=temperature, eos_token_id=EOS, **options
        )

    return jax.jit(run)


def _sample(model, params, ids, mask, key, temperature, num_new=N, **options) -> SampleOutput:
    out = _sampler_fn(model, num_new, **options)(params, jnp.asarray(ids), jnp.asarray(mask), key, temperature)
    return jax.block_until_ready(out)


def _assert_identical(actual: SampleOutput, expected: SampleOutput):
    np.testing.assert_array_equal(np.asarray(actual.tokens), np.asarray(expected.tokens))
    np.testing.assert_array_equal(np.asarray(actual.mask), np.asarray(expected.mask))
    np.testing.assert_array_equal(np.asarray(actual.logprobs), np.asarray(expected.logprobs))


def _assert_same_tokens(actual: SampleOutput, expected: SampleOutput, atol: float = 3e-6):
    np.testing.assert_array_equal(np.asarray(actual.tokens), np.asarray(expected.tokens))
    np.testing.assert_array_equal(np.asarray(actual.mask), np.asarray(expected.mask))
    np.testing.assert_allclose(np.asarray(actual.logprobs), np.asarray(expected.logprobs), atol=atol, rtol=0)


def _assert_ragged(out: SampleOutput, num_new=N):
    lengths = np.asarray(out.mask).sum(axis=1)
    assert (lengths < num_new).sum() >= 2 and len(set(lengths.tolist())) >= 3, lengths


# ----------------------------------------------------------------------------------------------
# The model: per-row cache writes


@pytest.mark.parametrize("scan_layers", [False, True])
def test_per_row_cache_writes_equal_full_forward(scan_layers):
    """Rows at their own cache slots, L > 1 tokens with per-row valid lengths, then one token each:
    the logits of a full causal forward (1e-5); a [B] index equal for all rows is the scalar path."""
    model, params = _model("llama", scan_layers)
    forward = _forward(model)
    batch, total = 4, 10
    ids = jax.random.randint(jax.random.key(1), (batch, total), 1, VOCAB)
    mask = jnp.ones((batch, total), jnp.int32)
    full = np.asarray(forward(params, ids, mask).logits)
    cache = forward(params, ids[:, :3], mask[:, :3], cache_size=total).cache
    valid = jnp.array([1, 2, 3, 4])
    # Row b feeds tokens 3 .. 3 + valid[b] - 1 of an L = 4 window; the rest are padding.
    out = forward(params, ids[:, 3:7], mask, cache=cache, cache_index=jnp.full((batch,), 3), valid_lengths=valid)
    for b in range(batch):
        np.testing.assert_allclose(np.asarray(out.logits[b, : valid[b]]), full[b, 3 : 3 + valid[b]], atol=1e-5)
    # Each row continues at its own slot: the padding tokens were not written.
    index = 3 + valid
    out = forward(params, jnp.take_along_axis(ids, index[:, None], 1), mask, cache=out.cache, cache_index=index)
    np.testing.assert_allclose(np.asarray(out.logits[:, 0]), full[np.arange(batch), np.asarray(index)], atol=1e-5)
    # Writes past the last slot are dropped, not clamped onto the last slots.
    dropped = forward(params, ids[:, :1], mask, cache=cache, cache_index=jnp.full((batch,), total))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), dropped.cache, cache)

    scalar = forward(params, ids[:, 3:4], mask, cache=cache, cache_index=3)
    vector = forward(params, ids[:, 3:4], mask, cache=cache, cache_index=jnp.full((batch,), 3))
    np.testing.assert_array_equal(np.asarray(scalar.logits), np.asarray(vector.logits))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), scalar.cache, vector.cache)
    with pytest.raises(ValueError, match="valid_lengths"):
        forward(params, ids[:, 3:4], mask, cache=cache, cache_index=3, valid_lengths=valid)


def test_shared_prefix_logits_equal_per_row_prefill():
    """One prefill per prompt, its cache shared by G rows: the next logits equal those of prefilling
    every row (1e-5), and of a full forward."""
    model, params = _model("llama")
    forward = _forward(model)
    ids, mask = _prompts(3)
    group = 4
    rows = jnp.arange(3 * group) // group
    shared = take_cache_rows(forward(params, ids[:, :-1], mask[:, :-1], cache_size=P).cache, rows)
    repeated_ids, repeated_mask = np.repeat(ids, group, 0), np.repeat(mask, group, 0)
    per_row = forward(params, repeated_ids[:, :-1], repeated_mask[:, :-1], cache_size=P).cache
    positions = jnp.asarray(repeated_mask.sum(1) - 1)[:, None]

    def next_logits(cache):
        return forward(
            params, repeated_ids[:, -1:], repeated_mask, positions=positions, cache=cache, cache_index=P - 1
        ).logits[:, 0]

    np.testing.assert_allclose(np.asarray(next_logits(shared)), np.asarray(next_logits(per_row)), atol=1e-5)
    full = forward(params, repeated_ids, repeated_mask).logits[:, -1]
    np.testing.assert_allclose(np.asarray(next_logits(shared)), np.asarray(full), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Same samples: static batch, shared group prefill, refilled slots


def _engines_case(kind, scan_layers, temperature, group, slots, lora=False):
    model, params = _model(kind, scan_layers, lora)
    ids, mask = _prompts(16 // group)
    key = jax.random.key(3)
    static = _sample(model, params, np.repeat(ids, group, 0), np.repeat(mask, group, 0), key, temperature)
    _assert_ragged(static)
    outputs = {"shared": _sample(model, params, ids, mask, key, temperature, num_generations=group)}
    for num_slots in slots:
        outputs[f"slots={num_slots}"] = _sample(
            model, params, ids, mask, key, temperature, num_generations=group, slots=num_slots
        )
    return static, outputs


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_engines_give_identical_samples(temperature):
    """GPT-2, G = 4 (4 prompts, 16 rows), 3 slots: bit-identical tokens, log-probs and masks."""
    static, outputs = _engines_case("gpt2", False, temperature, 4, (3,))
    for out in outputs.values():
        _assert_identical(out, static)


@pytest.mark.slow
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("temperature", [1.0, 0.0])
@pytest.mark.parametrize("kind,scan_layers", [("gpt2", False), ("llama", True)])
def test_engine_matrix_is_bit_identical(kind, scan_layers, temperature, group):
    """The matrix: both families (Llama with grouped-query attention and scanned layers), greedy
    and sampled, G in {1, 4}, 2 / 5 / 16 slots (16: every row has its own slot)."""
    static, outputs = _engines_case(kind, scan_layers, temperature, group, (2, 5, 16))
    for name, out in outputs.items():
        try:
            _assert_identical(out, static)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


@pytest.mark.slow
def test_where_bits_may_differ_the_tokens_do_not():
    """One slot (XLA:CPU multiplies a single row by a matrix-vector kernel), a static sampler
    decoding in growing cache segments (N = 40: 2 segments), and LoRA adapters (XLA:CPU computes
    the rank-4 product `[M, 32] x [32, 4]` by one of two kernels depending on M): same tokens,
    log-probs within 3e-6 (1e-5 with LoRA)."""
    for temperature in (1.0, 0.0):
        static, outputs = _engines_case("llama", False, temperature, 4, (3, 16), lora=True)
        _assert_same_tokens(outputs["shared"], static, atol=1e-5)
        _assert_same_tokens(outputs["slots=3"], static, atol=1e-5)
        _assert_identical(outputs["slots=16"], outputs["shared"])  # the same 16-row batches
    model, params = _model("llama", True)
    ids, mask = _prompts(4)
    key = jax.random.key(5)
    static = _sample(model, params, np.repeat(ids, 4, 0), np.repeat(mask, 4, 0), key, 1.0)
    _assert_same_tokens(_sample(model, params, ids, mask, key, 1.0, num_generations=4, slots=1), static)
    long_static = _sample(model, params, ids, mask, key, 1.0, num_new=40)
    _assert_ragged(long_static, 40)
    _assert_same_tokens(_sample(model, params, ids, mask, key, 1.0, num_new=40, slots=3), long_static)
    one_segment = _sample(model, params, ids, mask, key, 1.0, num_new=40, cache_segments=1)
    _assert_identical(_sample(model, params, ids, mask, key, 1.0, num_new=40, slots=3), one_segment)


# ----------------------------------------------------------------------------------------------
# Refill order and loop length, with a scripted model


class _ScriptedRows:
    """A fake LM whose prompt's first token names a script row: response token t of that prompt is
    `script[tag, t]`. Its "cache" keeps the tag in slot 0 (`[B, 1, S, 1]`, the engine's layout);
    `calls` counts its decoding steps (on the host)."""

    def __init__(self, script, prompt_len, vocab=32):
        self.script = jnp.asarray(script, jnp.int32)
        self.prompt_len = prompt_len
        self.vocab = vocab
        self.calls = []

    def __hash__(self):
        return id(self)

    def init_cache(self, batch, max_len, dtype=None):
        return {"tag": jnp.zeros((batch, 1, max_len, 1), jnp.float32)}

    def take_cache_rows(self, cache, rows):
        return take_cache_rows(cache, rows)

    def put_cache_prefix(self, cache, prefix, which):
        return put_cache_prefix(cache, prefix, which)

    def forward(self, params, input_ids, attention_mask, positions=None, cache=None, cache_index=None, cache_size=None):
        if cache is None:  # the prefill: remember the prompt's first token
            tags = input_ids[:, :1].astype(jnp.float32)[:, None, :, None]
            cache = {"tag": jnp.pad(tags, ((0, 0), (0, 0), (0, cache_size - 1), (0, 0)))}
            return ModelOutput(jnp.zeros(input_ids.shape + (self.vocab,)), None, cache)
        jax.debug.callback(lambda: self.calls.append(1))
        tag = cache["tag"][:, 0, 0, 0].astype(jnp.int32)
        # Full-length prompts: token t is fed at position P - 1 + t.
        step = jnp.clip(positions[:, 0] - (self.prompt_len - 1), 0, self.script.shape[1] - 1)
        token = self.script[tag, step]
        logits = jnp.where(jnp.arange(self.vocab)[None, :] == token[:, None], 0.0, -1e9)
        return ModelOutput(logits[:, None, :], None, cache)


def _schedule_steps(lengths, slots):
    """Loop steps of serving rows of `lengths`, in row order, through `slots` refilled slots (a
    freed slot takes the next row; slots freed at the same step take rows in slot order)."""
    free_at = [0] * slots
    for length in lengths:
        slot = int(np.argmin(free_at))
        free_at[slot] += length
    return max(free_at)


def test_refilled_slots_serve_rows_in_order_until_all_are_done():
    """Rows of scripted lengths: the outputs in row order, and the loop runs exactly the steps of
    the refill schedule (fewer than static waves of as many rows as slots)."""
    eos, num_new = 9, 8
    lengths = [1, 5, 2, 2, 3, 1, 6, 1]
    script = np.full((len(lengths), num_new), 4, np.int32)
    script[np.arange(len(lengths)), np.array(lengths) - 1] = eos
    ids = np.full((len(lengths), P), 2, np.int32)
    ids[:, 0] = np.arange(len(lengths))  # the tag
    mask = np.ones_like(ids)
    expected_mask = np.arange(num_new)[None, :] < np.array(lengths)[:, None]
    for slots in (2, 3):
        model = _ScriptedRows(script, P)
        out = jax.jit(
            lambda i, m, model=model, slots=slots: generate(
                model,
                None,
                i,
                m,
                jax.random.key(0),
                max_new_tokens=num_new,
                temperature=0.0,
                eos_token_id=eos,
                slots=slots,
            )
        )(ids, mask)
        jax.block_until_ready(out)
        jax.effects_barrier()
        np.testing.assert_array_equal(np.asarray(out.mask), expected_mask)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.where(expected_mask, script, 0))
        assert len(model.calls) == _schedule_steps(lengths, slots), (slots, len(model.calls))
        static_waves = sum(max(lengths[i : i + slots]) for i in range(0, len(lengths), slots))
        assert len(model.calls) < static_waves


# ----------------------------------------------------------------------------------------------
# Inside jit, under a sweep's vmap, on the mesh; compiles


def test_sweep_vmap_with_stop_axis_equals_each_run():
    """Two runs (own parameters and keys) vmapped with stop_axis_name: each run's samples are its
    own call's (tokens identical, log-probs 1e-6: a batched matrix product per run)."""
    model, params = _model("gpt2")
    ids, mask = _prompts(4)
    runs_params = jax.tree.map(lambda p: jnp.stack([p, p * 0.9]), params)
    keys = jax.random.split(jax.random.key(7), 2)

    def one(p, key):
        return generate(
            model,
            p,
            ids,
            mask,
            key,
            max_new_tokens=N,
            eos_token_id=EOS,
            num_generations=4,
            slots=3,
            stop_axis_name="runs",
        )

    swept = jax.jit(jax.vmap(one, axis_name="runs"))(runs_params, keys)
    for r in range(2):
        single = _sample(model, jax.tree.map(lambda x: x[r], runs_params), ids, mask, keys[r], 1.0, num_generations=4)
        _assert_same_tokens(jax.tree.map(lambda x: x[r], swept), single, atol=1e-6)


def test_same_samples_on_eight_devices_and_one_compile_per_shape():
    """8 devices (2 slots and 4 rows each, 16 prompts x G = 2) equal one device bit for bit; new
    prompts with another length mix reuse the compiled program."""
    model, params = _model("gpt2")
    assert len(jax.devices()) >= 8
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    options = dict(max_new_tokens=N, eos_token_id=EOS, prompt_buckets=(P,), num_generations=2, slots=16)
    sharded = make_sampler(model, mesh=mesh, **options)
    single = make_sampler(model, **options)
    lengths = []
    for seed in (0, 1, 2):
        ids, mask = _prompts(16, seed=seed)
        out = jax.block_until_ready(sharded(params, ids, mask, jax.random.key(seed)))
        assert len(out.tokens.sharding.device_set) == 8
        _assert_identical(out, single(params, ids, mask, jax.random.key(seed)))
        lengths.append(np.asarray(out.mask).sum(1))
    assert not np.array_equal(lengths[0], lengths[1])
    assert sharded.trace_count == 1 and single.trace_count == 1


# ----------------------------------------------------------------------------------------------
# Bad arguments


def test_bad_engine_arguments_are_clear_errors():
    model, params = _model("gpt2")
    ids, mask = _prompts(4)
    call = functools.partial(generate, model, params, ids, mask, jax.random.key(0), max_new_tokens=4)
    with pytest.raises(ValueError, match="num_generations must be >= 1"):
        call(num_generations=0)
    with pytest.raises(ValueError, match="slots must be None"):
        call(slots=0)
    with pytest.raises(ValueError, match="at most the rows they serve, 8"):
        call(num_generations=2, slots=9)
    with pytest.raises(ValueError, match="cache_segments applies to the static batch"):
        call(slots=2, cache_segments=2)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    with pytest.raises(ValueError, match="slots=4 must be a multiple of the mesh's 8"):
        call(num_generations=2, slots=4, mesh=mesh)
    with pytest.raises(ValueError, match="rollout_slots must be None"):
        PPOConfig(batch_size=8, minibatch_size=8, rollout_slots=9)
    with pytest.raises(ValueError, match="rollout_slots must be None"):
        PPOConfig(batch_size=8, minibatch_size=8, rollout_slots=0)
    with pytest.raises(ValueError, match="rollout_slots=4 must be a multiple"):
        PPO(PPOConfig(batch_size=8, minibatch_size=8, rollout_slots=4), model, lambda *a: jnp.zeros(8), mesh=mesh)


# ----------------------------------------------------------------------------------------------
# The trainer: the engine on equals the engine off


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_trainer_with_rollout_slots_equals_static_rollout(estimator):
    """PPO (critic) and GRPO (G = 8): 3 steps with `rollout_slots=8` give the parameters and
    metrics of the static rollout (1e-5): the samples are the same."""
    import test_training as tt

    model = LanguageModel(tt.tiny_gpt2_config())
    params = model.init_params(jax.random.PRNGKey(0))
    config = tt.BASE_CONFIG.replace(total_steps=3, eos_token_id=5)
    if estimator == "grpo":
        config = config.replace(advantage_estimator="grpo", num_generations=8, kl_placement="loss")
    results = []
    for slots in (None, 8):
        ppo = PPO(config.replace(rollout_slots=slots), model, tt.target_fraction_reward)
        state, frozen = ppo.init_state(params), ppo.frozen_params(params)
        batch = ppo.prompt_batch(*tt.make_prompts(config.prompts_per_step))
        history = []
        for _ in range(3):
            state, metrics = ppo.train_step(state, frozen, batch)
            history.append(jax.device_get(metrics))
        results.append((jax.device_get(state.policy_params), history))
    (params_off, history_off), (params_on, history_on) = results
    assert 0 < history_off[0]["response_length"] < config.max_new_tokens  # EOS at ragged steps
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), params_on, params_off)
    for on, off in zip(history_on, history_off):
        for name in off:
            np.testing.assert_allclose(on[name], off[name], atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_sweep_with_rollout_slots_equals_single_runs():
    """A GRPO sweep of two seeds with `rollout_slots=8` (the runs vmapped, refills synchronised over
    them): each run's first step equals the single run's (1e-5)."""
    import test_training as tt

    from jaxrlhf.training import Sweep
    from jaxrlhf.training.sweep import split_metrics

    model = LanguageModel(tt.tiny_gpt2_config())
    params = model.init_params(jax.random.PRNGKey(0))
    config = tt.BASE_CONFIG.replace(
        total_steps=3,
        eos_token_id=5,
        advantage_estimator="grpo",
        num_generations=8,
        kl_placement="loss",
        rollout_slots=8,
    )
    runs = [{"seed": 0}, {"seed": 1}]
    sweep = Sweep(config, model, tt.target_fraction_reward, runs)
    ids, mask = tt.make_prompts(config.prompts_per_step)
    batch = sweep.prompt_batch(np.stack([ids] * 2), np.stack([mask] * 2))
    state, metrics = sweep.train_step(sweep.init_state(params), sweep.frozen_params(params), batch)
    swept = split_metrics(metrics, 2)
    assert swept[0]["score"] != swept[1]["score"]
    ppo = PPO(config, model, tt.target_fraction_reward)
    for r, run in enumerate(runs):
        single_state, single_metrics = ppo.train_step(
            ppo.init_state(params, config=config.replace(**run)), ppo.frozen_params(params), ppo.prompt_batch(ids, mask)
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
            jax.device_get(jax.tree.map(lambda x: x[r], state.runs.policy_params)),
            jax.device_get(single_state.policy_params),
        )
        for name, value in jax.device_get(single_metrics).items():
            assert swept[r][name] == pytest.approx(float(value), rel=1e-5, abs=1e-6), (r, name)


@pytest.mark.slow
def test_trainer_with_rollout_slots_on_eight_devices_equals_one_device():
    """GRPO (4 prompts x G = 8, replicated prompts) with 16 slots, 2 per device: one step on an
    8-device data-parallel mesh equals one device (1e-5)."""
    import test_training as tt

    from jaxrlhf.sharding import make_mesh

    model = LanguageModel(tt.tiny_gpt2_config())
    params = model.init_params(jax.random.PRNGKey(0))
    config = tt.BASE_CONFIG.replace(
        eos_token_id=5, advantage_estimator="grpo", num_generations=8, kl_placement="loss", rollout_slots=16
    )
    ids, mask = tt.make_prompts(config.prompts_per_step)
    results = []
    for mesh in (None, make_mesh(data=8, devices=jax.devices()[:8])):
        ppo = PPO(config, model, tt.target_fraction_reward, mesh=mesh)
        state, metrics = ppo.train_step(ppo.init_state(params), ppo.frozen_params(params), ppo.prompt_batch(ids, mask))
        results.append((jax.device_get(state.policy_params), jax.device_get(metrics)))
    (params_one, metrics_one), (params_eight, metrics_eight) = results
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), params_eight, params_one)
    for name, value in metrics_one.items():
        np.testing.assert_allclose(metrics_eight[name], value, atol=1e-5, rtol=1e-5, err_msg=name)
