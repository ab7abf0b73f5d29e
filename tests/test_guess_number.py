"""Guess the number (issue 30's game): the environment's replies, interval and metrics on
hand-made guesses, the single-turn bound and binary search, the demonstrations, episodes in the
jitted rollout, and the experiment end to end (slow)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_script, tiny_config

from jaxrlhf.episodes import run_episodes
from jaxrlhf.models import LanguageModel
from tasks import guess_number as gn


@pytest.fixture(scope="module")
def tok():
    return gn.tokenizer()


def _guesses(tok, texts):
    """Turns ``[B, 2]`` from two-character texts (``$`` stands for EOS, ``.`` for nothing)."""
    ids = np.zeros((len(texts), gn.GUESS_LEN), np.int32)
    mask = np.zeros_like(ids)
    for row, text in enumerate(texts):
        for col, c in enumerate(text):
            if c != ".":
                ids[row, col] = tok.eos_token_id if c == "$" else tok.convert_tokens_to_ids(c)
                mask[row, col] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


def test_the_game_on_hand_made_guesses(tok):
    env = gn.GuessNumber(gn.token_ids(tok), max_number=31, enumerate_secrets=True)
    prompt_ids, prompt_mask = gn.encode_prompts(tok, 6)
    state = env.reset(jax.random.key(0), jnp.asarray(prompt_ids), jnp.asarray(prompt_mask))
    assert np.asarray(state.secret).tolist() == [1, 2, 3, 4, 5, 6]
    step = jax.jit(env.step)
    reply = lambda out: "".join(tok.convert_ids_to_tokens(np.asarray(out.obs_ids)[:, 0].tolist()))  # noqa: E731
    out = step(state, *_guesses(tok, ["16", "02", "01", "32", "00", "$."]))
    assert reply(out) == "<=>!!!"
    assert np.asarray(out.reward).tolist() == [0, 1, 0, 0, 0, 0] and np.asarray(out.done).tolist() == [0, 1, 0, 0, 0, 0]
    assert np.asarray(out.metrics["guesses"]).tolist() == [1, 1, 1, 0, 0, 0]
    assert np.asarray(out.metrics["invalid"]).tolist() == [0, 0, 0, 1, 1, 1]
    assert np.asarray(out.obs_mask).tolist() == [[1]] * 6
    # The interval the replies leave open, and guesses consistent with it.
    assert np.asarray(out.state.lo).tolist() == [1, 1, 2, 1, 1, 1]
    assert np.asarray(out.state.hi).tolist() == [15, 31, 31, 31, 31, 31]
    out = step(out.state, *_guesses(tok, ["20", "01", "03", "04", "05", "09"]))
    assert reply(out)[2:] == "===<" and np.asarray(out.metrics["consistent"]).tolist() == [0, 1, 1, 1, 1, 1]
    assert np.asarray(out.reward).tolist() == [0, 0, 1, 1, 1, 0]
    with pytest.raises(ValueError, match="max_turn_tokens=2"):
        env.step(state, jnp.zeros((6, 3), jnp.int32), jnp.ones((6, 3), jnp.int32))
    with pytest.raises(ValueError, match="max_number"):
        gn.GuessNumber(gn.token_ids(tok), max_number=100)
    # Random secrets follow the reset key.
    random_env = gn.GuessNumber(gn.token_ids(tok), max_number=31)
    many = gn.encode_prompts(tok, 4000)
    secrets = np.asarray(random_env.reset(jax.random.key(1), *(jnp.asarray(x) for x in many)).secret)
    assert secrets.min() == 1 and secrets.max() == 31 and abs(secrets.mean() - 16) < 0.5


def test_single_turn_bound_and_binary_search():
    assert gn.best_single_turn_return(31, 5) == pytest.approx(5 / 31)
    assert gn.best_single_turn_return(3, 5) == 1.0
    counts = gn.binary_search_guesses(31)
    assert max(counts) == 5 == gn.turns_needed(31) and sum(counts) == 1 * 1 + 2 * 2 + 4 * 3 + 8 * 4 + 16 * 5
    assert gn.optimal_return(31, 5) == 1.0 and gn.optimal_return(31, 4) == pytest.approx(15 / 31)
    assert gn.turns_needed(15) == 4 and math.isclose(gn.optimal_return(15, 4), 1.0)


def test_demonstrations_read_the_replies_as_often_as_asked(tok):
    blind = gn.demonstrations(31, 5, 2000, consistent=0.0, seed=0)
    assert abs(np.mean([secret in guesses for secret, guesses in blind]) - 5 / 31) < 0.03  # the bound
    for secret, guesses in blind:
        assert len(set(guesses)) == len(guesses) <= 5 and (guesses[-1] == secret or len(guesses) == 5)
    for secret, guesses in gn.demonstrations(31, 5, 500, consistent=1.0, seed=1):
        lo, hi = 1, 31
        for guess in guesses:  # every guess inside the interval the replies leave open
            assert lo <= guess <= hi
            lo, hi = (lo, guess - 1) if secret < guess else (guess + 1, hi) if secret > guess else (lo, hi)
        assert guesses[-1] == secret or len(guesses) == 5
    data = gn.encode_demonstrations([(12, [16, 8, 12]), (1, [2, 3, 4, 5, 6])], tok, 5)
    text = lambda row: "".join(
        tok.convert_ids_to_tokens(data["input_ids"][row][data["attention_mask"][row] > 0].tolist())
    )  # noqa: E731
    assert text(0) == "<bos>?16<08>12" and text(1) == "<bos>?02<03<04<05<06"  # no reply after the last guess
    trained = data["input_ids"][0][data["loss_mask"][0] > 0]
    assert "".join(tok.convert_ids_to_tokens(trained.tolist())) == "160812"
    assert data["input_ids"].shape[1] == 2 + gn.episode_tokens(5) + 1


@pytest.mark.slow
def test_episodes_of_the_game_in_the_jitted_rollout(tok):
    """Replies follow each two-token guess, the reward sits on the finding guess, the statistics
    add up; the evaluator runs on every secret."""
    model = LanguageModel(tiny_config("gpt2", vocab_size=len(tok), num_layers=1, eos_token_id=tok.eos_token_id))
    params = model.init_params(jax.random.key(0))
    env = gn.GuessNumber(gn.token_ids(tok), max_number=7)
    prompt_ids, prompt_mask = gn.encode_prompts(tok, 64)
    options = dict(max_new_tokens=gn.episode_tokens(4), max_turns=4, max_turn_tokens=2, eos_token_id=tok.eos_token_id)
    run = jax.jit(lambda p, k: run_episodes(model, p, prompt_ids, prompt_mask, k, env, **options))
    out = jax.device_get(run(params, jax.random.key(3)))
    stats = out.episode_stats
    np.testing.assert_array_equal(stats["guesses"] + stats["invalid"], stats["turns"])
    np.testing.assert_array_equal(out.token_rewards.sum(1), stats["found"])
    observed = out.mask - out.action_mask
    assert (observed.sum(1) == stats["observation_tokens"]).all()
    for row in range(64):  # guesses (a pair, or EOS alone), each answered until the last one
        pattern = "".join("a" if a else "o" if m else "." for a, m in zip(out.action_mask[row], out.mask[row]))
        assert re.fullmatch(r"(aao)*(aa|a)\.*", pattern), pattern
        assert pattern.count("o") == stats["turns"][row] - 1
    evaluate = gn.make_evaluator(model, tok, max_number=7, max_turns=4, samples_per_secret=2)
    metrics = {k: float(v) for k, v in evaluate(params, jax.random.key(0)).items()}
    assert set(metrics) == {
        f"{p}/{m}" for p in ("greedy", "sampled") for m in ("return", "guesses", "invalid", "consistent")
    }
    assert 0.0 <= metrics["greedy/return"] <= 1.0


@pytest.mark.slow
def test_guess_number_quick(tmp_path):
    script = load_script("guess_number")
    summary = script.main(script.Config(out_dir=str(tmp_path), quick=True, progress=False))
    assert summary["best_single_turn_return"] == pytest.approx(5 / 31) and summary["optimal_return"] == 1.0
    assert [run["steps"] for run in summary["runs"]] == [2, 2]
    assert all(np.isfinite(v) for run in summary["runs"] for v in run["after"].values())
    table = open(tmp_path / "results.md").read()
    assert "best single-turn" in table and "multi-turn RL (2 seeds)" in table
    assert (tmp_path / "guess_number.png").is_file() and (tmp_path / "sft" / "model" / "config.json").is_file()
