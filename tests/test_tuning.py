"""`jaxrlhf.tuning`: the choices are explicit, chosen once, and never change the numbers."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import tiny_config

from jaxrlhf.models import LanguageModel, gpt2_config
from jaxrlhf.sampling import generate, make_sampler
from jaxrlhf.tuning import (
    CPU_NO_YNN_MAX_ROWS,
    CPU_NO_YNN_MIN_WIDTH,
    NO_YNN_FUSIONS,
    Tuning,
    compiler_options_supported,
    resolve_tuning,
)

LLAMA_GQA = tiny_config("llama", max_position_embeddings=32)
GPT2 = gpt2_config(64, hidden_size=32, num_layers=2, num_heads=4, max_len=32)
PORTABLE = Tuning()
CPU = Tuning(decode_attention="per_head", decode_head="transposed", compiler_options=NO_YNN_FUSIONS)


def test_fields_are_checked_and_hashable():
    with pytest.raises(ValueError, match="decode_attention"):
        Tuning(decode_attention="fast")
    with pytest.raises(ValueError, match="decode_head"):
        Tuning(decode_head="untied")
    with pytest.raises(ValueError, match="compiler_options"):
        Tuning(compiler_options=3)
    from_dict = Tuning(compiler_options={"b": "1", "a": ""})
    assert from_dict.compiler_options == (("a", ""), ("b", "1"))
    assert from_dict == Tuning(compiler_options=(("b", "1"), ("a", "")))
    assert len({from_dict, Tuning(compiler_options={"a": "", "b": "1"})}) == 1  # usable as a dict key
    assert from_dict.jit_compiler_options == {"a": "", "b": "1"}
    assert Tuning().jit_compiler_options is None


def test_for_backend_rule():
    assert Tuning.for_backend("gpu", rows_per_device=1, width=4096) == PORTABLE
    assert Tuning.for_backend("tpu") == PORTABLE
    unknown_shape = Tuning.for_backend("cpu")
    assert (unknown_shape.decode_attention, unknown_shape.decode_head) == ("per_head", "transposed")
    assert unknown_shape.compiler_options == ()
    skinny = Tuning.for_backend("cpu", rows_per_device=CPU_NO_YNN_MAX_ROWS, width=CPU_NO_YNN_MIN_WIDTH)
    assert skinny.compiler_options == NO_YNN_FUSIONS
    assert Tuning.for_backend("cpu", rows_per_device=CPU_NO_YNN_MAX_ROWS + 1, width=768).compiler_options == ()
    assert Tuning.for_backend("cpu", rows_per_device=1, width=CPU_NO_YNN_MIN_WIDTH - 1).compiler_options == ()
    assert Tuning.for_backend("cpu", rows_per_device=1, width=768, trains=True).compiler_options == ()
    assert resolve_tuning(None) == PORTABLE and resolve_tuning(CPU) is CPU
    with pytest.raises(ValueError, match="tuning"):
        resolve_tuning("fast")


def test_unknown_compiler_option_is_detected_by_type():
    assert compiler_options_supported(NO_YNN_FUSIONS)
    assert not compiler_options_supported((("xla_cpu_no_such_option_anywhere", "1"),))
    assert compiler_options_supported(())


def test_model_default_is_chosen_at_construction():
    model = LanguageModel(GPT2)
    assert model.tuning == Tuning.for_backend()
    assert model.with_tuning(PORTABLE).tuning == PORTABLE
    assert model.with_layers(scan_layers=True).tuning == model.tuning


@pytest.mark.slow
@pytest.mark.parametrize("config", [LLAMA_GQA, GPT2], ids=["llama-gqa", "gpt2-tied"])
def test_tunings_sample_the_same_tokens(config):
    """Per-head vs grouped decode attention, transposed vs tied head, XLA options: same samples."""
    params = LanguageModel(config).init_params(jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (4, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    key = jax.random.key(1)
    outs = []
    for tuning in (PORTABLE, CPU):
        model = LanguageModel(config, tuning)
        run = tuning.jit(lambda p, i, m, k, model=model: generate(model, p, i, m, k, max_new_tokens=8))
        outs.append(jax.device_get(run(params, ids, mask, key)))
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-5)
    decoding = LanguageModel(config, CPU).decoding_params(params)
    assert ("decode_head" in decoding) == config.tie_word_embeddings
    assert "decode_head" not in LanguageModel(config, PORTABLE).decoding_params(params)


def test_sampler_tuning_per_batch():
    model = LanguageModel(GPT2.replace(hidden_size=CPU_NO_YNN_MIN_WIDTH, head_dim=CPU_NO_YNN_MIN_WIDTH // 4))
    auto = make_sampler(model, max_new_tokens=2, prompt_buckets=(4,))
    assert auto.tuning_for(8) == Tuning.for_backend(rows_per_device=8, width=CPU_NO_YNN_MIN_WIDTH)
    assert auto.tuning_for(CPU_NO_YNN_MAX_ROWS + 1).compiler_options == ()
    fixed = make_sampler(model, max_new_tokens=2, prompt_buckets=(4,), tuning=None)
    assert fixed.tuning_for(8) == PORTABLE
    with pytest.raises(ValueError, match="tuning"):
        make_sampler(model, max_new_tokens=2, tuning="fast")


def test_ppo_applies_its_tuning():
    from jaxrlhf.training import PPO, PPOConfig

    config = PPOConfig(batch_size=8, minibatch_size=8, max_new_tokens=4, max_prompt_len=4)
    model = LanguageModel(GPT2)

    def reward(prompt_ids, prompt_mask, response_ids, response_mask):
        return response_mask.sum(-1).astype(np.float32)

    ppo = PPO(config, model, reward)
    assert ppo.tuning == Tuning.for_backend(rows_per_device=config.rollout_size, width=GPT2.hidden_size)
    assert ppo.policy.tuning == ppo.tuning
    assert ppo.fused_tuning == ppo.tuning.replace(compiler_options=())  # the fused step also trains
    assert PPO(config, model, reward, tuning=CPU).policy.tuning == CPU


@pytest.mark.slow
def test_sampling_programs_compile_with_the_tuning_options():
    """The options reach the sampler's and the trainer's jitted programs: an option XLA does not
    know fails their compilation (and only theirs: the state's init compiles without it)."""
    from jaxrlhf.training import PPO, PPOConfig

    bogus = Tuning(compiler_options={"xla_cpu_no_such_option_anywhere": "1"})
    model = LanguageModel(GPT2)
    params = model.init_params(jax.random.key(0))
    ids = np.full((8, 4), 7, np.int32)
    mask = np.ones_like(ids)
    sampler = make_sampler(model, max_new_tokens=2, prompt_buckets=(4,), tuning=bogus)
    with pytest.raises(jax.errors.JaxRuntimeError, match="no_such_option"):
        sampler(params, ids, mask, jax.random.key(1))

    def reward(prompt_ids, prompt_mask, response_ids, response_mask):
        return response_mask.sum(-1).astype(np.float32)

    ppo = PPO(
        PPOConfig(batch_size=8, minibatch_size=8, max_new_tokens=2, max_prompt_len=4), model, reward, tuning=bogus
    )
    state, frozen, batch = ppo.init_state(params), ppo.frozen_params(params), ppo.prompt_batch(ids, mask)
    for step in (ppo.train_step, ppo.rollout_step):
        with pytest.raises(jax.errors.JaxRuntimeError, match="no_such_option"):
            step(state, frozen, batch)
