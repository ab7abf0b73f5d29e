"""Countdown with a calculator (issue 30's tool task): the calculator on hand-made calls and
answers, the JAX-native environment against its plain-Python host twin (turn by turn on random
turns, and whole episodes for the same key), the demonstrations' structure, and the scripts end
to end (slow)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_script, tiny_config

from jaxrlhf.episodes import EpisodeSettings, HostEpisodes, run_episodes
from jaxrlhf.metrics_log import read_metrics
from jaxrlhf.models import LanguageModel
from tasks import countdown as cd
from tasks import countdown_calc as cc

A = cc.CALL_LEN + 1


@pytest.fixture(scope="module")
def tok():
    return cc.tokenizer()


@pytest.fixture(scope="module")
def envs(tok):
    return cc.Calculator(cc.calc_ids(tok)), cc.HostCalculator.for_tokenizer(tok)


def _turns(tok, texts, width=A):
    """Right-padded turn ids ``[B, width]`` and masks from texts (``$`` stands for EOS)."""
    ids = np.full((len(texts), width), tok.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for row, text in enumerate(texts):
        tokens = [tok.eos_token_id if c == "$" else tok.convert_tokens_to_ids(c) for c in text]
        ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
    return ids, mask


def _text(tok, ids, mask):
    return "".join(tok.convert_ids_to_tokens([int(i) for i in ids[mask > 0]]))


def test_calculator_on_hand_made_expressions(tok):
    cases = {
        "7*5-3": 32, "7+5*3": 22, "2-9*9": -79, "12*3": 36, "007": 7, "0-999": -999, "99*9+8": 899,
        "100-2*3*4": 76, "999*2": None, "": None, "7*": None, "*7": None, "1234": None, "7--3": None,
        "7+(3)": None,
    }  # fmt: skip
    for expression, value in cases.items():
        assert cc.calculate(expression) == value, expression
    assert (
        cc.observation_text(32) == "=+032;"
        and cc.observation_text(-7) == "=-007;"
        and cc.observation_text(None) == "=?;"
    )
    # The JAX calculator on the same calls (a turn budget wide enough for every case).
    calls = ["[" + e + "]" for e in cases]
    ids, mask = _turns(tok, calls, width=cc.MAX_TURN_TOKENS)
    value, ok = jax.jit(cc.evaluate_calls, static_argnums=0)(
        cc.calc_ids(tok), jnp.asarray(ids), jnp.asarray(mask.sum(1))
    )
    expected = list(cases.values())
    assert np.asarray(ok).tolist() == [v is not None for v in expected]
    assert np.asarray(value).tolist() == [0 if v is None else v for v in expected]


def test_the_environment_on_hand_made_turns(tok, envs):
    """Calls get the calculator's reply, the answer ends the episode with the checker's reward,
    and ``checked`` says whether the answer was evaluated by an earlier call."""
    env, _ = envs
    problem = cd.Problem((7, 5, 3), 32)  # 7*5-3
    prompt_ids, prompt_mask = cd.encode_prompts([problem] * 7, tok)
    state = env.reset(jax.random.key(0), jnp.asarray(prompt_ids), jnp.asarray(prompt_mask))
    step = jax.jit(env.step)
    first = ["[7*5-3]", "[7*5+]", "7*5-3]", "]", "[7+5+3]", "[7*5-3]", "[7*5-3]"]
    out = step(state, *(jnp.asarray(x) for x in _turns(tok, first)))
    replies = [_text(tok, np.asarray(i), np.asarray(m)) for i, m in zip(out.obs_ids, out.obs_mask)]
    assert replies == ["=+032;", "=?;", "=?;", "=?;", "=+015;", "=+032;", "=+032;"]
    assert not np.asarray(out.done).any() and not np.asarray(out.reward).any()
    assert np.asarray(out.metrics["tool_calls"]).tolist() == [1] * 7
    assert np.asarray(out.metrics["tool_errors"]).tolist() == [0, 1, 1, 1, 0, 0, 0]
    assert not any(np.asarray(out.metrics[name]).any() for name in cc.DECISIONS)  # no reply before these
    # Had every row called again instead: rows 0, 5 and 6 call after a match, the others after a miss.
    again = step(out.state, *(jnp.asarray(x) for x in _turns(tok, ["[7+5+3]"] * 7)))
    assert np.asarray(again.metrics["calls_after_match"]).tolist() == [1, 0, 0, 0, 0, 1, 1]
    assert np.asarray(again.metrics["calls_after_miss"]).tolist() == [0, 1, 1, 1, 1, 0, 0]
    # The answers: right after checking it, right unchecked (row 1's call was malformed), wrong,
    # cut at the turn budget, other digits than the prompt's, right after checking it, and the
    # checked expression without EOS (not well formed).
    second = ["7*5-3$", "7*5-3$", "7*5+3$", "7*5-3*1+", "8*4-0$", "7*5-3$", "7*5-3"]
    out = step(out.state, *(jnp.asarray(x) for x in _turns(tok, second)))
    assert np.asarray(out.done).tolist() == [True] * 7
    assert np.asarray(out.reward).tolist() == [1, 1, 0, 0, 0, 1, 0]
    assert np.asarray(out.metrics["correct"]).tolist() == [1, 1, 0, 0, 0, 1, 0]
    assert np.asarray(out.metrics["answers"]).tolist() == [1] * 7
    assert np.asarray(out.metrics["checked"]).tolist() == [1, 0, 0, 0, 0, 1, 0]
    # The decision after each reply: rows 0, 5 and 6 answer after the target's reply, the others
    # after a miss (a wrong value or "=?;"); no row calls again.
    assert np.asarray(out.metrics["answers_after_match"]).tolist() == [1, 0, 0, 0, 0, 1, 1]
    assert np.asarray(out.metrics["answers_after_miss"]).tolist() == [0, 1, 1, 1, 1, 0, 0]
    assert not any(np.asarray(out.metrics[name]).any() for name in ("calls_after_match", "calls_after_miss"))
    assert not np.asarray(out.obs_mask).any()  # answers get no reply
    with pytest.raises(ValueError, match="max_turn_tokens"):
        env.step(state, jnp.zeros((7, 20), jnp.int32), jnp.zeros((7, 20), jnp.int32))


def _random_turns(tok, problems, rng, width=A):
    """Turns of every kind: in-order candidate calls and answers, and random strings over the
    calculator's characters (cut at the first ``]`` or EOS, as a turn ends)."""
    ids = cc.calc_ids(tok)
    alphabet = list("[]0123456789+-*=") + ["$"]
    texts = []
    for problem in problems:
        kind = rng.integers(4)
        if kind == 0:
            texts.append("[" + rng.choice(cc.candidates(problem)) + "]")
        elif kind == 1:
            texts.append(rng.choice(cc.candidates(problem)) + "$")
        else:
            texts.append("".join(rng.choice(alphabet, rng.integers(0, width + 1))))
    turn_ids, turn_mask = _turns(tok, texts, width)
    for row in range(len(texts)):
        ends = np.flatnonzero(np.isin(turn_ids[row], [ids.close, tok.eos_token_id]) & (turn_mask[row] > 0))
        if ends.size:
            turn_ids[row, ends[0] + 1 :], turn_mask[row, ends[0] + 1 :] = tok.pad_token_id, 0
    return turn_ids, turn_mask


def bigram_policy(tok):
    """A one-layer Llama whose next token depends only on the current one (attention and MLP
    write nothing; one-hot embeddings; the head is a bigram table): it opens calls, writes
    numbers joined by operators, closes the call or answers with EOS."""
    V, width = len(tok), 32
    model = LanguageModel(
        tiny_config("llama", vocab_size=V, hidden_size=width, num_layers=1, eos_token_id=tok.eos_token_id)
    )
    params = model.init_params(jax.random.key(0))
    ids = lambda chars: tok.convert_tokens_to_ids(list(chars))  # noqa: E731
    table = np.full((V, V), -12.0, np.float32)
    for current, following in (("=;", "[0123456789"), ("[+-*", "0123456789"), ("0123456789", "0123456789+-*]")):
        table[np.ix_(ids(current), ids(following))] = 0.0
    table[np.ix_(ids("0123456789"), [tok.eos_token_id])] = 0.0
    table[np.ix_(ids("=;"), ids("["))] = 2.5  # calls more often than answers
    table[np.ix_(ids("0123456789"), ids("0123456789"))] = -1.5  # mostly one-digit numbers
    layer = params["layer_0"]
    layer = {**layer, "attn": {**layer["attn"], "o": {"kernel": jnp.zeros((width, width))}},
             "mlp": {**layer["mlp"], "down": {"kernel": jnp.zeros_like(layer["mlp"]["down"]["kernel"])}}}  # fmt: skip
    # RMS-normed one-hot rows are sqrt(width) one-hot: the head's row t / sqrt(width) is token t's row of the table.
    head = np.zeros((width, V), np.float32)
    head[:V] = table / np.sqrt(width)
    embedding = np.eye(V, width, dtype=np.float32)
    return model, {
        **params,
        "layer_0": layer,
        "embed": {"embedding": jnp.asarray(embedding)},
        "lm_head": jnp.asarray(head),
    }


def test_jax_and_host_calculators_agree_turn_by_turn(tok, envs):
    env, host = envs
    rng = np.random.default_rng(0)
    problems = list(cc.make_task(0, 600).train[:256])
    prompt_ids, prompt_mask = cd.encode_prompts(problems, tok)
    state = env.reset(None, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask))
    host_state = host.reset(None, prompt_ids, prompt_mask)
    step = jax.jit(env.step)
    totals = dict.fromkeys(cc.METRICS, 0.0)
    for _ in range(5):
        turn_ids, turn_mask = _random_turns(tok, problems, rng)
        out, host_out = (
            step(state, jnp.asarray(turn_ids), jnp.asarray(turn_mask)),
            host.step(host_state, turn_ids, turn_mask),
        )
        np.testing.assert_array_equal(np.asarray(out.obs_mask), host_out.obs_mask)
        np.testing.assert_array_equal(np.asarray(out.obs_ids) * host_out.obs_mask, host_out.obs_ids * host_out.obs_mask)
        np.testing.assert_array_equal(np.asarray(out.reward), host_out.reward)
        np.testing.assert_array_equal(np.asarray(out.done), host_out.done)
        for name in cc.METRICS:
            np.testing.assert_array_equal(np.asarray(out.metrics[name]), host_out.metrics[name], err_msg=name)
            totals[name] += float(host_out.metrics[name].sum())
        state, host_state = out.state, host_out.state
    assert min(totals.values()) > 0, totals  # every kind of turn happened


@pytest.mark.slow
def test_jax_and_host_environments_give_identical_episodes(tok, envs):
    """The same tiny policy and key: the JAX-native rollout (environment inside the jit) and the
    host rollout (environment between jitted turns) write the same episodes."""
    env, host = envs
    model, params = bigram_policy(tok)
    problems = list(cc.make_task(0, 600).train[:16])
    prompt_ids, prompt_mask = cd.encode_prompts(problems, tok)
    options = dict(max_new_tokens=40, max_turns=5, max_turn_tokens=A)
    key = jax.random.key(7)
    run = jax.jit(lambda p, k: run_episodes(model, p, prompt_ids, prompt_mask, k, env, **options, num_generations=4,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))  # fmt: skip
    native = jax.device_get(run(params, key))
    settings = EpisodeSettings(**options, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    on_host = jax.device_get(
        HostEpisodes(model, host, settings, vocab_size=len(tok))(
            params, prompt_ids, prompt_mask, key, num_generations=4
        )
    )
    for field in ("tokens", "mask", "action_mask", "token_rewards"):
        np.testing.assert_array_equal(getattr(on_host, field), getattr(native, field), err_msg=field)
    for name in native.episode_stats:
        np.testing.assert_array_equal(on_host.episode_stats[name], native.episode_stats[name], err_msg=name)
    stats = native.episode_stats
    assert stats["tool_calls"].sum() > stats["tool_errors"].sum() > 0, stats  # valid and malformed calls
    assert stats["turns"].max() >= 3 and stats["answers"].sum() > 0


def test_demonstrations_use_the_tool_imperfectly(tok):
    task = cc.make_task(0, 2000)
    settings = cc.DemoSettings()
    demos = cc.demonstrations(task, settings, seed=0)
    assert len(demos) == len(task.train)
    kinds = {"direct": 0, "checked": 0, "wrong_first": 0, "typo": 0, "slipped_after_check": 0}
    for problem, demo in demos:
        assert len(demo) % 2 == 1 and len(demo) // 2 <= settings.max_calls
        calls, replies, answer = demo[:-1:2], demo[1::2], demo[-1]
        for call, reply in zip(calls, replies):  # every reply is the calculator's
            assert call[0] == "[" and call[-1] == "]" and reply == cc.observation_text(cc.calculate(call[1:-1]))
        assert len(answer) == cc.EXPRESSION_LEN and answer[::2] == "".join(map(str, problem.numbers))
        if not calls:
            kinds["direct"] += 1
            continue
        assert cc.calculate(calls[-1][1:-1]) == problem.target  # the last call finds the target
        # After a reply that is not the target, the teacher tries another candidate (no repeats).
        assert all(cc.calculate(call[1:-1]) != problem.target for call in calls[:-1])
        assert len(set(calls)) == len(calls)
        kinds["checked"] += answer == calls[-1][1:-1]
        kinds["slipped_after_check"] += cc.calculate(answer) != problem.target
        kinds["wrong_first"] += len(calls) > 1
        kinds["typo"] += any(r == "=?;" for r in replies)
    n = len(demos)
    assert 0.15 < kinds["direct"] / n < 0.25 and 0.45 < kinds["wrong_first"] / n < 0.65
    assert 0.05 < kinds["slipped_after_check"] / (n - kinds["direct"]) < 0.15 and kinds["typo"] > 0
    # Encoded: the loss on the calls, the answer and EOS; not on the prompt, replies or padding.
    problem = cd.Problem((7, 5, 3), 32)
    demo = ("[7+5+3]", "=+015;", "[7*5-3]", "=+032;", "7*5-3")
    data = cc.encode_demonstrations([(problem, demo), (problem, demo[-1:])], tok, cc.max_demo_tokens(settings))
    text = "<bos>" + cd.prompt_text(problem) + "".join(demo) + "<eos>"
    row = data["input_ids"][0][data["attention_mask"][0] > 0]
    assert "".join(tok.convert_ids_to_tokens(row.tolist())) == text
    trained = "".join(tok.convert_ids_to_tokens(data["input_ids"][0][data["loss_mask"][0] > 0].tolist()))
    assert trained == "[7+5+3][7*5-3]7*5-3<eos>"
    assert cc.final_answers([(problem, demo)]) == [(problem, ("7*5-3",))]
    assert data["loss_mask"][1].sum() == cc.EXPRESSION_LEN + 1


@pytest.mark.slow
def test_sft_then_rl_with_and_without_the_tool_quick(tmp_path):
    """`countdown_calc_rl.py --quick`: both SFT policies (tiny, trained on the spot), then both
    conditions' sweeps, the table and the plot."""
    rl = load_script("countdown_calc_rl")
    config = rl.Config(out_dir=str(tmp_path / "rl"), sft_root=str(tmp_path / "sft"), quick=True, progress=False)
    summary = rl.main(config)
    assert [r["condition"] for r in summary["results"]] == ["tool", "no_tool"]
    for result in summary["results"]:
        assert [run["steps"] for run in result["runs"]] == [2, 2]
        assert all(np.isfinite(v) for run in result["runs"] for v in run["after"].values())
    no_tool = summary["results"][1]["mean"]
    assert no_tool["sampled/tool_calls"]["mean"] <= 1.0  # one turn: at most one (unanswered) call
    table = open(tmp_path / "rl" / "results.md").read()
    assert table.count("\n| ") == 5 and "RL (2 seeds), tool" in table
    assert (tmp_path / "rl" / "countdown_calc_rl.png").is_file()
    assert (tmp_path / "sft" / "no_tool" / "model" / "config.json").is_file()
    # An SFT policy of other demonstrations is refused.
    other = rl.Config(out_dir=str(tmp_path / "rl2"), sft_root=str(tmp_path / "sft"), quick=True, progress=False,
                      demos=cc.DemoSettings(direct_fraction=0.5))  # fmt: skip
    with pytest.raises(SystemExit, match="other demonstrations"):
        rl.main(other)


def test_episode_outcome_reads_the_last_check_and_the_answer():
    """`episode_outcome` (the diagnosis script's reading of an episode) on hand-written texts."""
    problem = cd.Problem(numbers=(7, 5, 3), target=32)
    ops = "+-*"
    found = cc.episode_outcome(problem, "[7*5+3]=+038;[7*5-3]=+032;7*5-3", ops)
    assert found == cc.EpisodeOutcome(("7*5+3", "7*5-3"), (False, True), True, True)
    assert found.last_check == "matched"
    gave_up = cc.episode_outcome(problem, "[7*5+3]=+038;7*5+3", ops)
    assert gave_up == cc.EpisodeOutcome(("7*5+3",), (False,), True, False)
    assert gave_up.last_check == "missed"
    malformed_then_right = cc.episode_outcome(problem, "[7*5+]=?;7*5-3", ops)
    assert malformed_then_right == cc.EpisodeOutcome(("7*5+",), (False,), False, True)
    assert malformed_then_right.last_check == "missed"
    direct = cc.episode_outcome(problem, "7 * 5 - 3", ops)
    assert direct == cc.EpisodeOutcome((), (), False, True) and direct.last_check == "none"


@pytest.mark.slow
def test_sft_continues_from_a_saved_policy(tmp_path):
    """``--init_model_dir``: the second run starts from the first one's weights (its greedy
    step-0 evaluation equals the first run's final one); another model shape is refused."""
    sft = load_script("countdown_calc_sft")
    small = dict(n_layer=1, n_embd=16, n_head=2, num_steps=3, batch_size=16, eval_every=3, eval_problems=16,
                 num_problems=400, demos=cc.DemoSettings(max_calls=2))  # fmt: skip
    first = sft.main(sft.Config(out_dir=str(tmp_path / "first"), **small))
    second = sft.Config(out_dir=str(tmp_path / "second"), init_model_dir=first["model_dir"], **small)
    sft.main(second)
    start = [r for r in read_metrics(str(tmp_path / "second")) if "eval/greedy/accuracy" in r][0]
    assert start["step"] == 0
    for name in ("accuracy", "tool_calls", "answers_after_miss"):
        assert start[f"eval/greedy/{name}"] == pytest.approx(first[f"held_out/greedy/{name}"], abs=1e-6), name
    other = sft.Config(out_dir=str(tmp_path / "other"), init_model_dir=first["model_dir"], **{**small, "n_embd": 32})
    with pytest.raises(SystemExit, match="another model shape"):
        sft.main(other)
