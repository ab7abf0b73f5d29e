"""What you gave is what ran, and nothing computed is lost: bad prompt sets fail before any work;
Ctrl-C, SIGTERM and a failing host reward checkpoint the last committed step; a rerun after a kill
before the first checkpoint does not duplicate metrics rows; a checkpoint past total_steps warns.
"""

import os
import signal

import jax
import numpy as np
import pytest
import test_training as tt
from conftest import persistent_compilation_cache

from jaxrlhf.metrics_log import read_metrics
from jaxrlhf.models import LanguageModel
from jaxrlhf.training import PPO, Checkpointer, CheckpointMismatchError, TextReward, train
from jaxrlhf.training.trainer import TrainingInterrupted

CONFIG = tt.BASE_CONFIG.replace(total_steps=4, save_every=100)  # no periodic checkpoint before the end


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    with persistent_compilation_cache(tmp_path_factory.mktemp("jax_cache")) as cache_dir:
        yield cache_dir


@pytest.fixture(scope="module")
def tiny():
    model = LanguageModel(tt.tiny_gpt2_config())
    return model, model.init_params(jax.random.PRNGKey(0))


def _train(tiny, out_dir, prompts=None, config=CONFIG, reward=tt.target_fraction_reward, **kwargs):
    prompts = tt.make_prompts(tt.BATCH) if prompts is None else prompts
    return train(tiny, reward, prompts, config, out_dir, progress=False, export=False, **kwargs)


# ----------------------------------------------------------------------------------------------
# Prompt sets that used to run with silently wrong inputs


def test_prompt_sets_that_do_not_fit_the_model_fail_before_any_work(tiny, tmp_path):
    ids, mask = tt.make_prompts(tt.BATCH)
    cases = [
        ((ids, mask[:-1]), "same shape"),  # rows were cut to the shorter
        ((ids.astype(np.float32) + 0.5, mask), "must be integers"),  # float ids were truncated
        ([[5, 6], [7.5, 8]], "prompt 1: token ids must be integers"),
        ((np.where(np.arange(4) == 1, -3, ids), mask), r"row 0, column 1 is -3"),  # negative ids wrapped around
        ((np.where(np.arange(4) == 2, tt.VOCAB, ids), mask), f"outside the vocabulary \\[0, {tt.VOCAB}\\)"),
    ]
    for prompts, message in cases:
        with pytest.raises(ValueError, match=message):
            _train(tiny, tmp_path / "run", prompts=prompts)
    # Prompt + max_new_tokens past the learned position table (32) used to clamp positions.
    long_config = CONFIG.replace(max_new_tokens=30)
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        _train(tiny, tmp_path / "run", config=long_config)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # refused before any work


# ----------------------------------------------------------------------------------------------
# Interrupts: nothing committed is lost


class DigitTokenizer(tt.DigitTokenizer):
    pass


def _host_reward(fail_at_call: int, error: BaseException):
    calls = []

    def fraction(prompts, responses):
        calls.append(1)
        if len(calls) == fail_at_call:
            raise error
        return [r.split().count(f"t{tt.TARGET_TOKEN}") / max(len(r.split()), 1) for r in responses]

    return TextReward(fraction, DigitTokenizer())


@pytest.mark.slow
@pytest.mark.parametrize(
    "error", [KeyboardInterrupt(), RuntimeError("scoring server went away")], ids=["ctrl-c", "host-reward-exception"]
)
def test_interrupt_or_host_error_checkpoints_the_last_committed_step(tiny, tmp_path, error):
    reward = _host_reward(fail_at_call=3, error=error)  # steps 0 and 1 commit, step 2's scoring fails
    with pytest.raises(type(error)):
        _train(tiny, tmp_path, reward=reward)
    ppo = PPO(CONFIG, tiny[0], reward)
    checkpointer = Checkpointer(tmp_path / "checkpoints", ppo)
    assert checkpointer.latest_step() == 2  # today: nothing on disk (save_every=100)
    checkpointer.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]
    resumed = _train(tiny, tmp_path, reward=_host_reward(fail_at_call=0, error=error))
    assert int(resumed.state.step) == CONFIG.total_steps
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]


@pytest.mark.slow
def test_sigterm_checkpoints_then_raises(tiny, tmp_path):
    def terminate_after_step_1(step, metrics, state):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="SIGTERM"):
        _train(tiny, tmp_path, on_step=terminate_after_step_1)
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is put back
    checkpointer = Checkpointer(tmp_path / "checkpoints", PPO(CONFIG, tiny[0], tt.target_fraction_reward))
    assert checkpointer.latest_step() == 2
    checkpointer.close()


@pytest.mark.slow
def test_rerun_after_a_kill_before_the_first_checkpoint_does_not_duplicate_rows(tiny, tmp_path):
    # What a run killed (-9) after logging two steps, before any checkpoint, leaves behind.
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write('{"step": 0, "score": 0.1}\n{"step": 1, "score": 0.2}\n')
    _train(tiny, tmp_path, num_steps=2)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1] and rows[0]["score"] != 0.1  # rewritten, not appended


@pytest.mark.slow
def test_checkpoint_past_total_steps_warns(tiny, tmp_path):
    _train(tiny, tmp_path, num_steps=2)
    with pytest.warns(UserWarning, match="checkpoint is at step 2, past total_steps=1"):
        result = _train(tiny, tmp_path, config=CONFIG.replace(total_steps=1))
    assert int(result.state.step) == 2 and result.history == []


@pytest.mark.slow
def test_resuming_with_a_different_prompt_set_is_refused_unless_allowed(tiny, tmp_path):
    _train(tiny, tmp_path, num_steps=2)
    other = tt.make_prompts(tt.BATCH, seed=9)
    with pytest.raises(CheckpointMismatchError, match="allow_different_prompts=True"):
        _train(tiny, tmp_path, prompts=other)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]  # refused before any work
    with pytest.warns(UserWarning, match="prompt"):
        result = _train(tiny, tmp_path, prompts=other, allow_different_prompts=True)
    assert int(result.state.step) == CONFIG.total_steps


def test_non_finite_diagnosis_names_the_first_bad_stage():
    from jaxrlhf.training.trainer import diagnose_non_finite

    finite = {"score": 0.5, "kl": 0.1, "entropy": 2.0, "advantages_mean": 0.0, "pg_loss": 0.1, "loss": 0.2}
    nan = float("nan")
    assert "scores (score)" in diagnose_non_finite({**finite, "score": nan, "kl": nan})
    assert "log-probs (kl, entropy)" in diagnose_non_finite({**finite, "kl": nan, "entropy": float("inf")})
    assert "values and advantages" in diagnose_non_finite({**finite, "advantages_mean": nan, "loss": nan})
    assert "update diverged" in diagnose_non_finite({**finite, "loss": nan})
    assert "parameters after the update" in diagnose_non_finite(finite)
