"""Packed experience and update passes (issue 29, packing): `max_tokens_per_microbatch` gives the
log-probs, values, losses and gradients of the unpacked passes (1e-5, also with LoRA on scanned
layers), the response-only vocabulary head equals the full head, one row's tokens never reach
another's outputs, one compile serves every length mix, and whole PPO / GRPO runs, the 8-device
mesh and a sweep agree with the unpacked trainer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from jaxrlhf.core.logprobs import entropy_from_logits, token_logprobs
from jaxrlhf.models import LanguageModel
from jaxrlhf.models.lora import LoraConfig, LoraParams, init_lora, with_lora
from jaxrlhf.sharding import make_mesh
from jaxrlhf.training import PPO, PPOConfig, grid, packed, train_sweep
from jaxrlhf.training.experience import Models, PromptBatch, Rollout, make_experience
from jaxrlhf.training.hparams import HyperParams
from jaxrlhf.training.presets import preset
from jaxrlhf.training.state import ScoreStats
from jaxrlhf.training.update import minibatch_gradients

P, N, VOCAB, EOS = 6, 10, 32, 2
BASE = PPOConfig(
    batch_size=8,
    minibatch_size=8,
    ppo_epochs=2,
    max_prompt_len=P,
    max_new_tokens=N,
    learning_rate=3e-3,
    critic_learning_rate=3e-3,
    eos_token_id=EOS,
    kl_coef=0.05,
    total_steps=10,
)
PACKED = BASE.replace(max_tokens_per_microbatch=2 * (P + N))  # 2 packs per micro-batch


pytestmark = pytest.mark.usefixtures("module_compilation_cache")


@pytest.fixture(scope="module")
def tiny():
    model = LanguageModel(tiny_config("llama", vocab_size=VOCAB, eos_token_id=EOS))
    return model, model.init_params(jax.random.PRNGKey(0))


def reward(prompt_ids, prompt_mask, response_ids, response_mask):
    return jnp.sum((response_ids == 5) * response_mask, axis=1) / N


def ragged_batch(seed=0, B=8):
    """Left-padded prompts of 1..P tokens, responses of 0..N tokens (an empty one), random ids."""
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(1, P + 1, B)
    prompt_mask = (np.arange(P)[None] >= P - prompt_len[:, None]).astype(np.int32)
    prompt_ids = rng.integers(3, VOCAB, (B, P)) * prompt_mask
    response_len = rng.integers(0, N + 1, B)
    response_len[1], response_len[2] = 0, N
    response_mask = (np.arange(N)[None] < response_len[:, None]).astype(np.int32)
    response_ids = rng.integers(3, VOCAB, (B, N)) * response_mask
    return PromptBatch(jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)), Rollout(
        jnp.asarray(response_ids), jnp.asarray(response_mask)
    )


def _experience(config, models, params, value_params, prompts, rollout_out):
    fn = jax.jit(functools.partial(make_experience, config, models))
    scores = jnp.linspace(-1.0, 1.0, prompts.ids.shape[0])
    ref_params = jax.tree.map(lambda p: p * 1.05, params)
    return fn(
        params, value_params, ref_params, prompts, rollout_out, scores, jnp.float32(0.05), ScoreStats.zeros(),
        HyperParams.from_config(config),
    )[0]  # fmt: skip


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_packed_experience_equals_unpacked(tiny, critic):
    model, params = tiny
    shared = critic == "shared"
    outputs = []
    for config in (BASE, PACKED):
        config = config.replace(shared_trunk=shared, entropy_coef=0.0)
        ppo = PPO(config, model, reward)
        value_params = ppo.default_value_params(params, jax.random.PRNGKey(1))
        value_params = jax.tree.map(lambda v: v + 0.01, value_params)  # a head that is not zero
        outputs.append(jax.device_get(_experience(config, ppo.models, params, value_params, *ragged_batch())))
    unpacked, packed_ = outputs
    mask = np.asarray(unpacked.response_mask) > 0  # off the mask the unpacked pass leaves whatever it computed
    for name in ("old_logprobs", "ref_logprobs", "old_values", "advantages", "returns", "rewards"):
        np.testing.assert_allclose(
            np.where(mask, getattr(packed_, name), 0),
            np.where(mask, getattr(unpacked, name), 0),
            atol=1e-5,
            err_msg=name,
        )


def test_packed_gradients_and_losses_equal_unpacked(tiny):
    model, params = tiny
    prompts, rollout_out = ragged_batch(1)
    models = Models(model, None, has_value=False)
    config = preset("grpo", BASE, num_generations=4).replace(entropy_coef=0.01)
    experience = _experience(config, models, params, {}, prompts, rollout_out)
    results = []
    for cfg in (config, config.replace(max_tokens_per_microbatch=P + N)):  # one pack per micro-batch
        grads, stats = jax.jit(
            lambda p, exp, cfg=cfg: minibatch_gradients(
                cfg, models, {"policy": p, "value": {}}, exp, jnp.float32(0.04), HyperParams.from_config(cfg),
                jax.random.PRNGKey(0),
            )
        )(params, experience)  # fmt: skip
        results.append(jax.device_get((grads, stats)))
    (g0, s0), (g1, s1) = results
    for key in ("loss", "pg_loss", "policy_kl", "policy_entropy", "approx_kl"):
        assert float(s1[key]) == pytest.approx(float(s0[key]), abs=1e-5), key
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
    np.testing.assert_allclose(flat(g1), flat(g0), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_packed_lora_scanned_gradients_equal_unpacked():
    """A LoRA policy with scanned layers: the packed experience and gradients (the response head
    reads the base's output layer; the adapters' gradients flow through the hidden states) equal
    the unpacked ones."""
    lora = LoraConfig(rank=2)
    model = with_lora(LanguageModel(tiny_config("llama", vocab_size=VOCAB, eos_token_id=EOS, scan_layers=True)), lora)
    assert isinstance(model, LanguageModel)
    base = model.init_params(jax.random.PRNGKey(0))
    adapters = jax.tree.map(lambda a: a + 0.05, init_lora(lora, base, jax.random.PRNGKey(1)))
    models = Models(model, None, has_value=False)
    config = preset("grpo", BASE, num_generations=4).replace(entropy_coef=0.01)
    results = []
    for cfg in (config, config.replace(max_tokens_per_microbatch=2 * (P + N))):
        experience = _experience(cfg, models, LoraParams(base, adapters), {}, *ragged_batch(4))
        grads, stats = jax.jit(
            lambda a, exp, cfg=cfg: minibatch_gradients(
                cfg, models, {"policy": a, "value": {}}, exp, jnp.float32(0.04), HyperParams.from_config(cfg),
                jax.random.PRNGKey(0), policy_base=base,
            )
        )(adapters, experience)  # fmt: skip
        results.append(jax.device_get((experience, grads, stats)))
    (e0, g0, s0), (e1, g1, s1) = results
    mask = np.asarray(e0.response_mask) > 0
    for name in ("old_logprobs", "ref_logprobs", "advantages"):
        got, want = (np.where(mask, getattr(e, name), 0) for e in (e1, e0))
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)
    for key in ("loss", "pg_loss", "policy_entropy"):
        assert float(s1[key]) == pytest.approx(float(s0[key]), abs=1e-5), key
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
    assert np.abs(flat(g0)).max() > 1e-4
    np.testing.assert_allclose(flat(g1), flat(g0), atol=1e-5, rtol=1e-4)


def _check_response_head(tiny, prompt_kinds, chunkings):
    """`packed.response_head` (the vocabulary head at the positions that predict response
    tokens only, in chunks) gives the full head's log-probs, entropies and gradients there, 0
    elsewhere, whether one chunk holds every target or they spill over several; the targets are
    exactly the response tokens."""
    model, params = tiny
    prompts, rollout_out = ragged_batch(3)
    kinds = {
        "ragged": prompts,  # prompts of 1..P tokens
        "one-token": prompts._replace(mask=prompts.mask.at[:, :-1].set(0), ids=prompts.ids.at[:, :-1].set(0)),
    }
    temperature = jnp.float32(0.7)
    for prompt_batch in (kinds[kind] for kind in prompt_kinds):
        tokens, mask = rollout_out.tokens, rollout_out.mask
        batch = packed.pack_batch(prompt_batch.ids, prompt_batch.mask, tokens, mask, 2 * (P + N))
        R, T = batch.geometry.packs_per_micro, batch.geometry.pack_len
        total_targets = sum(int(jnp.sum(batch.response_targets(i))) for i in range(int(batch.num_micro)))
        assert total_targets == int(jnp.sum(rollout_out.mask))
        ids, positions, segments = batch.micro(0)
        hidden = model.forward(
            params, ids, segments > 0, positions=positions, segment_ids=segments, logits_positions=slice(0, 0)
        ).hidden
        targets = np.asarray(batch.response_targets(0))
        assert 0 < targets.sum() < R * T
        assert targets.sum() > -(-R * T // 3)  # 3 chunks: the targets fill more than one

        def full(params, hidden):
            logits = model.output_layer(params, hidden)
            return token_logprobs(logits, packed.next_ids(ids), temperature), entropy_from_logits(logits, temperature)

        def weighted(outputs):  # a loss over the targets, for the gradients
            logprobs, entropy = outputs
            weights = jnp.where(targets, jnp.arange(R * T).reshape(R, T) % 5 - 2.0, 0.0)
            return jnp.sum(weights * (logprobs + 0.3 * entropy))

        def loss_and_outputs(head, params, hidden):
            outputs = head(params, hidden)
            return weighted(outputs), outputs

        def compare(head):
            grad_fn = jax.jit(jax.grad(functools.partial(loss_and_outputs, head), argnums=(0, 1), has_aux=True))
            return jax.device_get(grad_fn(params, hidden))

        want_grads, want = compare(full)
        for chunks in (R * T if c == "all" else c for c in chunkings):
            head = lambda p, h, chunks=chunks: packed.response_head(  # noqa: E731
                model, p, h, ids, jnp.asarray(targets), temperature, with_entropy=True, chunks=chunks
            )
            grads, got = compare(head)
            for name, g, w in zip(("logprobs", "entropy"), got, want):
                np.testing.assert_allclose(g, np.where(targets, w, 0), atol=1e-5, err_msg=f"{name}, {chunks} chunks")
            for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
                np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4, err_msg=f"gradients, {chunks} chunks")


def test_response_head_equals_the_full_head(tiny):
    """Prompts of 1 token (responses fill most of the packs), the targets spilling over 3 chunks."""
    _check_response_head(tiny, ["one-token"], [3])


@pytest.mark.slow
def test_response_head_equals_the_full_head_for_every_chunking(tiny):
    _check_response_head(tiny, ["ragged", "one-token"], [1, 3, packed.HEAD_CHUNKS, "all"])


def test_one_rows_tokens_never_reach_another_rows_outputs(tiny):
    """Perturbing row 3's tokens (same lengths, so the same packing) leaves every other row's
    packed log-probs and values exactly as they were."""
    model, params = tiny
    config = PACKED
    ppo = PPO(config, model, reward)
    value_params = ppo.default_value_params(params, jax.random.PRNGKey(1))
    prompts, rollout_out = ragged_batch(2)
    changed = rollout_out._replace(tokens=rollout_out.tokens.at[3].set((rollout_out.tokens[3] + 7) % VOCAB))
    a = _experience(config, ppo.models, params, value_params, prompts, rollout_out)
    b = _experience(config, ppo.models, params, value_params, prompts, changed)
    others = np.arange(8) != 3
    for name in ("old_logprobs", "ref_logprobs", "old_values"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name))[others], np.asarray(getattr(b, name))[others])
    assert not np.array_equal(np.asarray(a.old_logprobs)[3], np.asarray(b.old_logprobs)[3])


def _run(config, model, params, steps=3, mesh=None, seed=0):
    ppo = PPO(config, model, reward, mesh=mesh)
    state, frozen = ppo.init_state(params), ppo.frozen_params(params)
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(config.prompts_per_step, P)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    batch = ppo.prompt_batch(ids, mask)
    history = []
    for _ in range(steps):
        state, metrics = ppo.train_step(state, frozen, batch)
        history.append(jax.device_get(metrics))
    return ppo, jax.device_get(state), history


def _relative(a, b):
    flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])  # noqa: E731
    return float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(b)))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_packed_runs_equal_unpacked_runs(tiny, algorithm):
    """3 steps: the samples are the same, so parameters and metrics agree to float rounding (the
    attention sums run over other lengths), and one program serves every step's length mix."""
    model, params = tiny
    config = BASE if algorithm == "ppo" else preset("grpo", BASE, num_generations=4)
    _, plain, plain_history = _run(config, model, params)
    ppo, packed_state, packed_history = _run(config.replace(max_tokens_per_microbatch=2 * (P + N)), model, params)
    assert ppo.compiled_step_count() == 1
    assert _relative(packed_state.policy_params, plain.policy_params) < 3e-5
    for step in range(3):
        for key in ("score", "kl", "loss", "response_length", "num_response_tokens"):
            assert float(packed_history[step][key]) == pytest.approx(float(plain_history[step][key]), abs=2e-5), key


@pytest.mark.slow
def test_packed_step_on_8_devices_and_in_a_sweep_equals_one_device(tiny, tmp_path):
    model, params = tiny
    config = preset("grpo", PACKED, num_generations=4)
    _, one, _ = _run(config, model, params, steps=1)
    _, eight, _ = _run(config, model, params, steps=1, mesh=make_mesh(data=4, fsdp=2))
    assert _relative(eight.policy_params, one.policy_params) < 1e-5
    prompts = (np.random.default_rng(0).integers(3, VOCAB, size=(4, P)), np.ones((4, P), np.int32))
    sweep = train_sweep(
        (model, params), reward, prompts, config.replace(total_steps=2), tmp_path / "sweep",
        runs=grid(seed=[0], clip_eps=[0.1, 0.3]), progress=False, export=False,
    )  # fmt: skip
    assert all(np.isfinite(h[-1]["loss"]) for h in sweep.histories)
