"""Mistakes a newcomer makes that used to pass silently or confusingly (issue: "a newcomer's first hour").

- Rows longer than a learned position table: each entry point (a model's eager `apply` / `forward`,
  `train_sft`, `train_preference`, PPO with a reward model or a separate critic, the experiments'
  reward-model training) refuses them before any work; inside `jit` nothing is read (no cost), and
  rotary models (no table) are not refused.
- A JAX reward with Python control flow on token values: `RewardTraceError`, pointing to `TextReward`,
  JAX's error chained.
- transformers' "PyTorch was not found" notice at import (it printed in every script) is filtered.

The models are one layer of width 16; the checks run before anything compiles, so these tests take
well under a second each except the PPO trace test (it traces, never compiles, the step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_script, tiny_config

from jaxrlhf.models import LanguageModel, ValueModel, check_positions, learned_position_limit
from jaxrlhf.training import PPOConfig, RewardModel, RewardTraceError, TextReward, train
from jaxrlhf.training.preference import PreferenceConfig, train_preference
from jaxrlhf.training.preference_data import pairs_from_arrays
from jaxrlhf.training.sft import train_sft

VOCAB, TABLE = 16, 8
TOO_LONG = f"more than the model's max_position_embeddings={TABLE} \\(a learned position table"


def _model(family="gpt2", max_positions=TABLE):
    config = tiny_config(
        family, vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=32
    )
    return LanguageModel(config.replace(max_position_embeddings=max_positions, eos_token_id=None))


@pytest.fixture(scope="module")
def gpt2():
    model = _model()
    return model, model.init_params(jax.random.key(0))


def _batch(width, padding=0):
    ids = np.full((2, width), 5, np.int32)
    mask = np.ones((2, width), np.int32)
    mask[0, :padding] = 0
    return ids, mask


def test_helper_reads_the_table_of_every_kind_of_model(gpt2):
    model, params = gpt2
    assert learned_position_limit(model) == TABLE
    assert learned_position_limit(model.apply) == TABLE  # a bound apply names its model
    assert learned_position_limit(model.config) == TABLE
    assert learned_position_limit(ValueModel(model.config)) == TABLE
    assert learned_position_limit(_model("llama")) is None  # rotary: no table to overflow
    assert learned_position_limit(lambda *a: None) is None
    check_positions(model, np.ones((2, TABLE)))  # exactly the table: fine
    mask = np.ones((2, TABLE + 1))
    mask[0, 0] = 0  # row 0: 8 tokens, row 1: 9
    with pytest.raises(ValueError, match=r"where: thing row 1 has 9 tokens and needs 9 positions, " + TOO_LONG):
        check_positions(model, mask, where="where", what="thing")
    with pytest.raises(ValueError, match=r"row 0 has 6 tokens plus 3 new tokens and needs 9 positions"):
        check_positions(model, lengths=[6, 2], extra_positions=3)


def test_eager_apply_refuses_positions_past_the_table_and_jit_costs_nothing(gpt2):
    model, params = gpt2
    ids, mask = _batch(TABLE + 4, padding=4)  # row 0: 8 real tokens (fits), row 1: 12
    with pytest.raises(ValueError, match=r"LanguageModel.forward: sequence row 1 has 12 tokens .*" + TOO_LONG):
        model.apply(params, ids, mask)
    with pytest.raises(ValueError, match="needs 10 positions"):  # explicit positions are checked too
        model.forward(params, ids[:, :2], mask[:, :2], positions=np.array([[0, 1], [8, 9]]))
    mask[1, :4] = 0  # padding does not count: both rows now have 8 real tokens
    assert model.apply(params, ids, mask).shape == (2, TABLE + 4, VOCAB)
    # Traced (jit, grad, ...), the mask is not read: no error, no host transfer (the trainers check
    # their data first). Rotary models have no table (`learned_position_limit` is None above).
    jax.make_jaxpr(model.apply)(params, *_batch(TABLE + 4))


def test_sft_refuses_rows_past_the_table_before_any_work(gpt2):
    model, params = gpt2
    ids, mask = _batch(TABLE + 1)
    data = {"input_ids": ids, "attention_mask": mask}
    with pytest.raises(ValueError, match=r"train_sft: sequence row 0 has 9 tokens .*" + TOO_LONG):
        train_sft(model.apply, params, data, jax.random.key(0), num_steps=1, batch_size=2)


def test_preference_training_refuses_pairs_past_the_table(gpt2):
    """DPO on pairs longer than the table used to train on clamped positions without a word."""
    model, params = gpt2
    n, prompt, response = 4, 3, 6  # 3 + 6 = 9 > 8
    ids = np.full((n, response), 5, np.int32)
    short = np.ones((n, response), np.int32)
    short[:, 5:] = 0  # 3 + 5 = 8: fits
    data = pairs_from_arrays(
        np.full((n, prompt), 4), np.ones((n, prompt)), ids, np.ones((n, response)), ids + 1, short,
        max_prompt_len=prompt, max_response_len=response,
    )  # fmt: skip
    config = PreferenceConfig(batch_size=2, total_steps=1, max_prompt_len=prompt, max_response_len=response)
    with pytest.raises(ValueError, match=r"train_preference: pair row 0 has 9 tokens .*" + TOO_LONG):
        train_preference((model, params), data, config, progress=False)
    fits = pairs_from_arrays(
        np.full((n, prompt), 4), np.ones((n, prompt)), ids, short, ids + 1, short,
        max_prompt_len=prompt, max_response_len=response,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"held-out pair row 0 has 9 tokens"):
        train_preference((model, params), fits, config, eval_data=data, progress=False)


def _reward(prompt_ids, prompt_mask, response_ids, response_mask):
    return jnp.mean(response_mask, axis=1)


PPO = PPOConfig(total_steps=1, batch_size=2, minibatch_size=2, ppo_epochs=1, max_prompt_len=4, max_new_tokens=4)


def test_ppo_checks_the_reward_model_and_critic_tables(tmp_path):
    """The policy's table fits prompt + response; a reward model's (or critic's) shorter one did not
    count before."""
    policy = _model(max_positions=32)
    prompts = (np.full((2, 4), 5, np.int32), np.ones((2, 4), np.int32))
    scorer = RewardModel(ValueModel(_model(max_positions=7).config))
    with pytest.raises(ValueError, match=r"train: prompt row 0 has 4 tokens plus 4 new tokens .*=7"):
        train((policy, None), scorer, prompts, PPO, str(tmp_path), reward_params={})
    with pytest.raises(ValueError, match=r"train: prompt row 0 has 4 tokens plus 4 new tokens .*=7"):
        train((policy, None), _reward, prompts, PPO, str(tmp_path), value_model=scorer.model)


def test_reward_model_training_in_the_experiments_checks_lengths():
    reward_hacking = load_script("reward_hacking")
    rm = ValueModel(_model().config)
    ids, mask = _batch(TABLE + 2)
    pairs = reward_hacking.lang.PreferencePairs(ids, mask, ids, mask)
    with pytest.raises(ValueError, match="train_reward_model: sequence row 0 has 10 tokens"):
        reward_hacking.train_reward_model(rm, None, pairs, jax.random.key(0), reward_hacking.Config(), None)


def test_a_reward_with_python_control_flow_points_to_text_reward(gpt2, tmp_path):
    """`int(ids[b, 0]) == 3` inside the jitted step used to end in 1,500 characters of
    ConcretizationTypeError with no word of TextReward."""
    model, params = gpt2

    def starts_with_three(prompt_ids, prompt_mask, response_ids, response_mask):
        return jnp.asarray([1.0 if int(response_ids[b, 0]) == 3 else 0.0 for b in range(response_ids.shape[0])])

    prompts = (np.full((2, 4), 5, np.int32), np.ones((2, 4), np.int32))
    config = PPO.replace(loggers=("jsonl",))
    with pytest.raises(RewardTraceError, match=r"reward function 'starts_with_three' cannot run inside") as info:
        train((model, params), starts_with_three, prompts, config, str(tmp_path), progress=False)
    message = str(info.value)
    assert "TextReward" in message and "jnp.where" in message and len(message) < 700
    assert isinstance(info.value.__cause__, jax.errors.ConcretizationTypeError)
    assert isinstance(info.value, TypeError)  # what the JAX error was
    assert TextReward  # the pointer names a real class


def test_transformers_no_torch_notice_is_dropped_and_other_warnings_kept():
    """transformers logs "PyTorch was not found..." at import when torch is absent: every script
    printed it, though jaxrlhf uses transformers for tokenizers only. `import jaxrlhf` filters
    that one record on the "transformers" logger."""
    import logging

    import jaxrlhf  # noqa: F401

    logger = logging.getLogger("transformers")

    def record(message):
        return logging.LogRecord("transformers", logging.WARNING, __file__, 1, message, None, None)

    notice = "PyTorch was not found. Models won't be available and only tokenizers, configuration and ..."
    assert not logger.filter(record(notice))
    assert logger.filter(record("Some weights of the model checkpoint were not used"))
