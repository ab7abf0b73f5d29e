"""The countdown task: problems are solvable and split for good, the checker on hand-made answers
(right, wrong, malformed, empty), and the JAX checker against a plain-Python one on many answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tasks import countdown as cd


@pytest.fixture(scope="module")
def tok():
    return cd.tokenizer()


def _response(tok, text, width=8, eos=True):
    """Right-padded response ids and the trainer's mask (1 up to and including EOS)."""
    tokens = tok.convert_tokens_to_ids(list(text)) + ([tok.eos_token_id] if eos else [])
    ids = np.full(width, tok.pad_token_id, np.int32)
    ids[: len(tokens)] = tokens[:width]
    mask = (np.arange(width) < min(len(tokens), width)).astype(np.int32)
    return ids, mask


def _check(tok, problem, answers, **kwargs):
    prompt_ids, _ = cd.encode_prompts([problem] * len(answers), tok)
    rows = [_response(tok, a, **kwargs) for a in answers]
    response_ids, response_mask = (np.stack(x) for x in zip(*rows))
    return jax.jit(cd.check_answers, static_argnums=0)(
        cd.token_ids(tok), jnp.asarray(prompt_ids), jnp.asarray(response_ids), jnp.asarray(response_mask)
    )


def test_checker_on_hand_made_answers(tok):
    problem = cd.Problem((3, 5, 7), 9)  # 7 + 5 - 3 = 9, 5 - 3 + 7 = 9
    assert cd.prompt_text(problem) == "357:+009="
    answers = ["7+5-3", "5-3+7", "7+5+3", "7+5-4", "7+5-", "75+-3", "", "7+5-3+1", "3*5-7", "3+5*7"]
    check = _check(tok, problem, answers)
    assert check.correct.tolist() == [True, True, False, False, False, False, False, False, False, False]
    assert check.well_formed.tolist() == [True, True, True, True, False, False, False, False, True, True]
    assert check.uses_numbers.tolist() == [True, True, True, False, False, False, False, False, True, True]
    assert np.asarray(check.value)[[0, 2, 8, 9]].tolist() == [9, 15, 8, 38]  # * binds tighter: 3 + 5 * 7 = 38
    # A right answer without EOS (cut off at the budget) is not well formed.
    no_eos = _check(tok, problem, ["7+5-3"], eos=False)
    assert not bool(no_eos.well_formed[0]) and not bool(no_eos.correct[0])
    # Negative targets and precedence.
    negative = cd.Problem((2, 4, 9), -34)  # 2 - 4 * 9
    assert cd.prompt_text(negative) == "249:-034="
    assert _check(tok, negative, ["2-4*9", "2-9*4", "4*9-2"]).correct.tolist() == [True, True, False]


def test_reward_fn_scores_and_format_bonus(tok):
    problem = cd.Problem((1, 2, 3), 6)
    prompt_ids, prompt_mask = cd.encode_prompts([problem] * 4, tok)
    rows = [_response(tok, a) for a in ["1+2+3", "3-2+1", "12+3", ""]]
    response_ids, response_mask = (jnp.asarray(np.stack(x)) for x in zip(*rows))
    for bonus, expected in ((0.0, [1.0, 0.0, 0.0, 0.0]), (0.1, [1.0, 0.1, 0.0, 0.0])):
        reward = jax.jit(cd.make_reward_fn(tok, format_reward=bonus))
        np.testing.assert_allclose(reward(prompt_ids, prompt_mask, response_ids, response_mask), expected)


def test_checker_matches_plain_python_on_random_answers(tok):
    rng = np.random.default_rng(0)
    task = cd.make_task(seed=1, num_problems=300, ops="+-*")
    problems = list(task.train[:200])
    answers = []
    for problem in problems:
        kind = rng.integers(3)
        if kind == 0:
            answers.append(cd.solutions(problem, "+-*")[0])
        elif kind == 1:
            answers.append(cd.expression_text(rng.permutation(problem.numbers).tolist(), rng.choice(list("+-*"), 2)))
        else:
            answers.append("".join(rng.choice(list(cd.CHARS), rng.integers(0, 7))))
    prompt_ids, _ = cd.encode_prompts(problems, tok)
    rows = [_response(tok, a) for a in answers]
    response_ids, response_mask = (np.stack(x) for x in zip(*rows))
    check = cd.check_answers(
        cd.token_ids(tok), jnp.asarray(prompt_ids), jnp.asarray(response_ids), jnp.asarray(response_mask)
    )

    def python_correct(problem, answer):
        if (
            len(answer) != 5
            or not all(answer[i] in "123456789" for i in (0, 2, 4))
            or not all(answer[i] in "+-*" for i in (1, 3))
        ):
            return False
        numbers = [int(answer[i]) for i in (0, 2, 4)]
        return (
            sorted(numbers) == sorted(problem.numbers)
            and cd.evaluate_expression(numbers, (answer[1], answer[3])) == problem.target
        )

    expected = [python_correct(p, a) for p, a in zip(problems, answers)]
    assert check.correct.tolist() == expected
    assert 30 < sum(expected) < 170  # both kinds are present


def test_problems_are_solvable_and_held_out_ones_never_train():
    task = cd.make_task(seed=0, num_problems=2000)
    assert len(task.held_out) > 100 and len(task.train) > 4 * len(task.held_out) - 200
    assert not {p.key for p in task.train} & {p.key for p in task.held_out}
    assert all(cd.solutions(p, task.ops) for p in task.train[:200] + task.held_out[:50])
    demos = cd.demonstrations(task, correct_fraction=0.3, seed=0)
    assert [p for p, _ in demos] == list(task.train)
    right = np.mean([a in cd.solutions(p, task.ops) for p, a in demos])
    assert 0.3 <= right <= 0.5  # noisy demonstrations: 30% correct by design, plus lucky guesses
    tok = cd.tokenizer()
    rows = cd.encode_demonstrations(demos[:3], tok)
    assert rows["input_ids"].shape == (3, cd.PROMPT_LEN + cd.ANSWER_LEN)
    assert tok.decode(rows["input_ids"][0], skip_special_tokens=True) == cd.prompt_text(demos[0][0]) + demos[0][1]
    assert rows["loss_mask"][0].tolist() == [0] * cd.PROMPT_LEN + [1] * cd.ANSWER_LEN
    with pytest.raises(ValueError, match="ops must be"):
        cd.make_task(ops="/")


def test_ordered_problems_have_an_in_order_solution_and_correct_demonstrations_use_it():
    task = cd.make_task(seed=0, num_problems=2000, ordered=True)
    assert task.ordered and len(task.held_out) > 50
    assert not {p.key for p in task.train} & {p.key for p in task.held_out}
    in_order = lambda p, a: a[::2] == "".join(map(str, p.numbers))  # noqa: E731
    for problem in task.train[:300] + task.held_out[:100]:
        assert any(in_order(problem, a) for a in cd.solutions(problem, task.ops)), problem
    demos = cd.demonstrations(task, correct_fraction=1.0, seed=0)
    assert all(a in cd.solutions(p, task.ops) and in_order(p, a) for p, a in demos)
    # The unordered task's targets come from a random order: some have no in-order solution.
    free = cd.make_task(seed=0, num_problems=2000)
    assert not all(any(in_order(p, a) for a in cd.solutions(p, free.ops)) for p in free.train)


def test_slip_demonstrations_flip_only_the_last_operator_of_an_in_order_solution():
    task = cd.make_task(seed=0, num_problems=2000, ordered=True)
    demos = cd.demonstrations(task, correct_fraction=0.4, seed=0, noise="slip")
    assert [p for p, _ in demos] == list(task.train)
    right = np.mean([a in cd.solutions(p, task.ops) for p, a in demos])
    assert 0.35 <= right <= 0.45  # digits 1..9: a slipped sign always changes the value
    for problem, answer in demos[:300]:
        assert answer[::2] == "".join(map(str, problem.numbers))  # the prompt's order, always
        if answer not in cd.solutions(problem, task.ops):
            slipped_back = answer[:-2] + {"+": "-", "-": "+"}[answer[-2]] + answer[-1]
            assert slipped_back in cd.solutions(problem, task.ops), (problem, answer)
    # "random" noise draws the same numbers as before this option existed.
    assert cd.demonstrations(task, 0.3, seed=1) == cd.demonstrations(task, 0.3, seed=1, noise="random")
    with pytest.raises(ValueError, match="noise must be one of"):
        cd.demonstrations(task, 0.4, noise="typo")
    with pytest.raises(ValueError, match="two operators"):
        cd.demonstrations(cd.make_task(seed=0, num_problems=50, ops="+"), 0.4, noise="slip")
