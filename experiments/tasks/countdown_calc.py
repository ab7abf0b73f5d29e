"""Countdown with a calculator tool: a multi-turn task where a tool call is worth making.

The problems are countdown's (`experiments/tasks/countdown.py`) with ``*`` allowed and targets
made from the digits in the prompt's order: three digits, a target, and an answer ``d op d op d``
that uses each digit once and evaluates to the target. Before answering, the policy may ask a
calculator as often as the turn limit allows:

    prompt    <bos> 7 5 3 : + 0 3 2 =
    turn 1    [ 7 * 5 + 3 ]          a tool call; ``]`` ends the turn (the stop token)
    observed  = + 0 3 8 ;            the calculator's answer (6 tokens), written by the environment
    turn 2    [ 7 * 5 - 3 ]
    observed  = + 0 3 2 ;            32: the target
    turn 3    7 * 5 - 3 <eos>        the final answer, checked as in countdown

**Why the tool helps here.** With ``*`` an answer's value is a product or a sum of products of
digits (up to 729): to pick the two operators in its head, a small model must have learnt the
multiplication table and the values of all nine in-order candidates from a few thousand problems,
and still errs on unseen ones. Checking a candidate with the calculator needs none of that: the
calculator's reply has the prompt's format (sign and three digits), so comparing it with the
target is copying, and a policy that tries candidates until one matches can be right whatever
arithmetic it knows. (Countdown with ``+-`` alone is easy enough to compute in the head:
countdown's SFT on correct answers reaches 0.92 held out.)

**The calculator** reads the text between ``[`` and ``]``: numbers of one to three digits joined
by ``+ - *`` (``*`` binds tighter; no signs, no brackets, no spaces). It answers ``=`` then the
value as a sign and three digits then ``;`` (``=-007;``), or ``=?;`` for a malformed expression or
a value outside [-999, 999]. A turn that ends at ``]`` is a tool call (malformed when it does not
start with ``[``); any other turn (ended by EOS, or cut at the turn budget) is the final answer,
and ends the episode.

**Reward**: 1 for a correct final answer (`countdown.check_answers` on the turn's tokens, as in
countdown), 0 otherwise. No format reward and no cost per call: the SFT policy already writes
well-formed answers, and the turn limit (``PPOConfig.max_turns``) bounds the calls; a reward for
calling would be farmed, a cost would teach the policy to guess.

**Metrics** (per turn, summed over an episode by the rollout): ``tool_calls``, ``tool_errors``
(calls answered ``=?;``), ``answers`` (1 when the episode ended with an answer turn, 0 when the
turn limit ran out on a call), ``correct``, and ``checked``: the answer is well formed and its
expression is one the calculator evaluated earlier in the episode (among the last ``memory``
calls). ``checked / answers`` is the fraction of answers checked with the tool. And the decision
after each reply (`DECISIONS`): ``answers_after_match`` / ``calls_after_match`` count the turns
that answer / call again right after a reply equal to the target, ``answers_after_miss`` /
``calls_after_miss`` those after any other reply (``=?;`` included). A policy that reads its
replies answers after a match and calls again after a miss.

The environment exists twice, with identical episodes for the same key (tested):
`Calculator` is JAX-native (it runs inside the jitted rollout and the fused training step), and
`HostCalculator` is the same tool in plain Python on the host (a regular expression and integer
arithmetic on decoded text), as a tool that cannot be JAX would be written.

**Demonstrations** (`demonstrations`) use the tool imperfectly, so that RL has something to fix:
some answer without checking (correct or with a slipped operator), the others check candidates
until one matches: after a reply that is not the target they try another candidate (never one
already tried; sometimes a mistyped, malformed expression), after the matching reply they answer
that candidate, except that some then answer with a slip anyway. Most demonstrations try at
least one wrong candidate first, so the decision "the reply is not the target: try again" is
shown about as often as "it is: answer it". `final_answers` keeps only each demonstration's
answer: the data of the same task without the tool.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.episodes import Environment, StepOutput, run_episodes
from tasks import countdown as cd

CHARS = cd.CHARS + "[];?"
OPS = "+-*"
EXPRESSION_LEN = 2 * cd.NUM_NUMBERS - 1  # d op d op d
CALL_LEN = EXPRESSION_LEN + 2  # [ d op d op d ]
OBSERVATION_LEN = 6  # = sign d d d ;
MAX_TURN_TOKENS = 12
"""The largest turn budget the calculator accepts: a call holds at most 10 characters, so every
intermediate value (numbers of at most three digits) fits in int32."""
MAX_VALUE = 999
DECISIONS = ("answers_after_match", "calls_after_match", "answers_after_miss", "calls_after_miss")
METRICS = ("tool_calls", "tool_errors", "answers", "correct", "checked", *DECISIONS)
NUMBER = r"\d{1,3}"
EXPRESSION_RE = re.compile(rf"{NUMBER}(?:[+\-*]{NUMBER})*")


# ----------------------------------------------------------------------------------------------
# The calculator in Python (the reference, the host environment and the demonstrations use it)


def calculate(expression: str) -> int | None:
    """The calculator on the text between the brackets: numbers of 1-3 digits joined by ``+ - *``
    (``*`` first, then left to right); None if malformed or outside [-999, 999]."""
    if not EXPRESSION_RE.fullmatch(expression):
        return None
    pieces = re.split(r"([+-])", expression)  # term, sign, term, sign, ...
    value = math.prod(int(n) for n in pieces[0].split("*"))
    for sign, term in zip(pieces[1::2], pieces[2::2]):
        product = math.prod(int(n) for n in term.split("*"))
        value = value + product if sign == "+" else value - product
    return value if abs(value) <= MAX_VALUE else None


def observation_text(value: int | None) -> str:
    """The calculator's reply: ``=+032;`` or ``=?;``."""
    if value is None:
        return "=?;"
    return "=" + ("-" if value < 0 else "+") + f"{abs(value):03d}" + ";"


# ----------------------------------------------------------------------------------------------
# Problems and demonstrations


def make_task(seed: int = 0, num_problems: int = 20000, held_out_fraction: float = 0.2) -> cd.CountdownTask:
    """Countdown problems with ``+-*`` and in-order targets (`countdown.make_task`)."""
    return cd.make_task(seed, num_problems, OPS, held_out_fraction=held_out_fraction, ordered=True)


def candidates(problem: cd.Problem) -> list[str]:
    """The nine expressions of the prompt's digits in order (``7+5+3`` ... ``7*5*3``)."""
    return [cd.expression_text(problem.numbers, pair) for pair in ((a, b) for a in OPS for b in OPS)]


def slipped(expression: str, rng: np.random.Generator) -> str:
    """The expression with its last operator replaced by another one (countdown's slip)."""
    others = [op for op in OPS if op != expression[-2]]
    return expression[:-2] + others[rng.integers(len(others))] + expression[-1]


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """How a teacher that uses the calculator imperfectly writes a demonstration."""

    direct_fraction: float = 0.2
    """Demonstrations that answer without calling the calculator."""
    direct_correct: float = 0.5
    """Of those, the fraction answered correctly (the others: a slip of the correct answer)."""
    wrong_call: float = 0.7
    """Probability of each further wrong candidate called before the right one (a geometric
    number of wrong calls, at most ``max_calls - 1``): after a reply that is not the target the
    teacher always tries another candidate, so most demonstrations show that decision."""
    typo: float = 0.1
    """Probability that a wrong call is mistyped instead (an operand dropped: answered ``=?;``)."""
    answer_slip: float = 0.1
    """After finding the matching candidate, the probability of answering with a slip anyway."""
    max_calls: int = 8
    """Calls per demonstration at most, and the RL episodes' turn limit minus one. Eight of the
    nine in-order candidates: a policy that reads the replies can find the answer by checking
    even in a random order (89.6 % of held-out problems with 8 random candidates, 46 % with 4),
    which a policy that guesses in its head cannot."""


Demo = tuple[str, ...]
"""A demonstration: turns alternating action, observation, ..., action; the last action is the
final answer (without EOS, added when encoded)."""


def demonstration(problem: cd.Problem, settings: DemoSettings, rng: np.random.Generator) -> Demo:
    """One demonstration of ``problem`` (see `DemoSettings`)."""
    options = candidates(problem)
    right = [c for c in options if calculate(c) == problem.target]
    answer = right[rng.integers(len(right))]
    if rng.random() < settings.direct_fraction:
        return (answer if rng.random() < settings.direct_correct else slipped(answer, rng),)
    wrong = [c for c in options if calculate(c) != problem.target]
    rng.shuffle(wrong)
    turns: list[str] = []
    while len(turns) // 2 < settings.max_calls - 1 and wrong and rng.random() < settings.wrong_call:
        called = wrong.pop()
        if rng.random() < settings.typo:
            drop = 2 * rng.integers(cd.NUM_NUMBERS)  # an operand
            called = called[:drop] + called[drop + 1 :]
        turns += ["[" + called + "]", observation_text(calculate(called))]
    turns += ["[" + answer + "]", observation_text(calculate(answer))]
    return (*turns, slipped(answer, rng) if rng.random() < settings.answer_slip else answer)


def demonstrations(task: cd.CountdownTask, settings: DemoSettings, seed: int = 0) -> list[tuple[cd.Problem, Demo]]:
    """One demonstration per training problem."""
    rng = np.random.default_rng(seed)
    return [(problem, demonstration(problem, settings, rng)) for problem in task.train]


def final_answers(demos: Sequence[tuple[cd.Problem, Demo]]) -> list[tuple[cd.Problem, Demo]]:
    """Each demonstration's final answer alone: the same answers, without the tool."""
    return [(problem, demo[-1:]) for problem, demo in demos]


def max_demo_tokens(settings: DemoSettings) -> int:
    """The longest demonstration's tokens after the prompt (its calls, replies and answer + EOS)."""
    return settings.max_calls * (CALL_LEN + OBSERVATION_LEN) + cd.ANSWER_LEN


def encode_demonstrations(demos: Sequence[tuple[cd.Problem, Demo]], tokenizer, width: int) -> dict[str, np.ndarray]:
    """SFT rows ``<bos> prompt turns <eos>`` ``[N, PROMPT_LEN + width]``, right-padded;
    ``loss_mask`` is 1 on the action tokens (calls, the answer and EOS), 0 on the prompt, the
    calculator's replies and padding: the policy is trained on what it writes, as in RL."""
    rows = len(demos)
    ids = np.full((rows, cd.PROMPT_LEN + width), tokenizer.pad_token_id, np.int32)
    attention, loss = np.zeros_like(ids), np.zeros_like(ids)
    for row, (problem, demo) in enumerate(demos):
        tokens = [tokenizer.bos_token_id] + tokenizer.convert_tokens_to_ids(list(cd.prompt_text(problem)))
        is_action = [0] * len(tokens)
        for turn, text in enumerate(demo):
            piece = tokenizer.convert_tokens_to_ids(list(text))
            if turn == len(demo) - 1:
                piece = piece + [tokenizer.eos_token_id]
            tokens += piece
            is_action += [1 - turn % 2] * len(piece)
        if len(tokens) > ids.shape[1]:
            raise ValueError(f"demonstration {demo} is {len(tokens) - cd.PROMPT_LEN} tokens, wider than width={width}")
        ids[row, : len(tokens)] = tokens
        attention[row, : len(tokens)] = 1
        loss[row, : len(tokens)] = is_action
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


# ----------------------------------------------------------------------------------------------
# Token ids and the JAX calculator


def tokenizer(max_episode_tokens: int = 64):
    """The task's character tokenizer (``<pad> <bos> <eos> <unk>`` then ``CHARS``)."""
    from jaxrlhf.tokenizers import char_tokenizer

    return char_tokenizer(CHARS, model_max_length=cd.PROMPT_LEN + max_episode_tokens)


class CalcIds(NamedTuple):
    countdown: cd.TokenIds  # digits, + - *, EOS
    open: int  # [
    close: int  # ]: the stop token of a tool call
    equals: int  # =
    end: int  # ;
    error: int  # ?
    pad: int


def calc_ids(tok) -> CalcIds:
    opening, closing, equals, end, error = tok.convert_tokens_to_ids(list("[]=;?"))
    return CalcIds(cd.token_ids(tok), opening, closing, equals, end, error, tok.pad_token_id)


def evaluate_calls(ids: CalcIds, action_ids, length):
    """The calculator on each row's turn ``[B, A]`` (``length`` valid tokens), as `calculate` on
    the text between a leading ``[`` and the last token: ``(value [B], ok [B])``.

    One pass left to right, per row: ``total`` (the finished terms), ``term`` (the current
    term's sign times its finished factors), ``number`` (the digits read so far) and ``digits``;
    a digit extends the number, ``*`` multiplies it into the term, ``+``/``-`` adds the term to
    the total and starts a new one; the value is ``total + term * number``."""
    t = ids.countdown
    B, A = action_ids.shape
    zeros = jnp.zeros((B,), jnp.int32)
    total, term, number, digits = zeros, jnp.ones((B,), jnp.int32), zeros, zeros
    ok = (length >= 3) & (action_ids[:, 0] == ids.open)
    for j in range(1, A - 1):
        token = action_ids[:, j]
        inside = j <= length - 2
        is_digit = (token >= t.digit0) & (token < t.digit0 + 10)
        is_add = (token == t.plus) | (token == t.minus)
        is_mul = token == t.times
        valid = jnp.where(is_digit, digits < 3, (is_add | is_mul) & (digits > 0))
        update = inside & ok & valid
        ok = ok & (~inside | valid)
        factor = term * number
        total = jnp.where(update & is_add, total + factor, total)
        term = jnp.where(update & is_add, jnp.where(token == t.minus, -1, 1), jnp.where(update & is_mul, factor, term))
        number = jnp.where(update, jnp.where(is_digit, number * 10 + token - t.digit0, 0), number)
        digits = jnp.where(update, jnp.where(is_digit, digits + 1, 0), digits)
    value = total + term * number
    ok = ok & (digits > 0) & (jnp.abs(value) <= MAX_VALUE)
    return jnp.where(ok, value, 0), ok


def observation_ids(ids: CalcIds, value, ok):
    """The replies ``[B, 6]`` (``= sign d d d ;`` or ``= ? ; pad pad pad``) and their mask."""
    t = ids.countdown
    magnitude = jnp.abs(value)
    digits = [t.digit0 + magnitude // 100, t.digit0 + magnitude // 10 % 10, t.digit0 + magnitude % 10]
    number = jnp.stack(
        [
            jnp.full_like(value, ids.equals),
            jnp.where(value < 0, t.minus, t.plus),
            *digits,
            jnp.full_like(value, ids.end),
        ],
        axis=1,
    )
    error = jnp.asarray([ids.equals, ids.error, ids.end] + [ids.pad] * (OBSERVATION_LEN - 3), jnp.int32)
    obs_ids = jnp.where(ok[:, None], number, error[None, :]).astype(jnp.int32)
    obs_mask = (jnp.arange(OBSERVATION_LEN)[None, :] < jnp.where(ok, OBSERVATION_LEN, 3)[:, None]).astype(jnp.int32)
    return obs_ids, obs_mask


NO_REPLY, MATCH, MISS = 0, 1, 2
"""``CalcState.last_reply``: no call yet, the last reply was the target, it was not."""


class CalcState(NamedTuple):
    prompt_ids: jax.Array  # [B, PROMPT_LEN]
    calls: jax.Array  # [B, memory, EXPRESSION_LEN] the expressions of the last calls (-1: none)
    num_calls: jax.Array  # [B] calls recorded
    last_reply: jax.Array  # [B] int32: NO_REPLY, MATCH or MISS (the previous turn's reply)


def _check_turn_budget(A: int) -> None:
    if not cd.ANSWER_LEN <= A <= MAX_TURN_TOKENS:
        raise ValueError(
            f"the calculator needs a turn budget (max_turn_tokens) in [{cd.ANSWER_LEN}, {MAX_TURN_TOKENS}] "
            f"(an answer and EOS fit; int32 arithmetic), got {A}"
        )


@dataclasses.dataclass(frozen=True)
class Calculator(Environment):
    """The calculator tool, JAX-native (module docstring). ``memory``: calls remembered for the
    ``checked`` metric."""

    ids: CalcIds
    memory: int = 8
    max_observation_tokens: int = OBSERVATION_LEN
    metric_names: tuple[str, ...] = METRICS

    @property
    def stop_token_ids(self) -> tuple[int, ...]:  # pyright: ignore[reportIncompatibleVariableOverride]
        return (self.ids.close,)

    def reset(self, key, prompt_ids, prompt_mask):
        del key, prompt_mask
        B = prompt_ids.shape[0]
        return CalcState(
            jnp.asarray(prompt_ids, jnp.int32)[:, -cd.PROMPT_LEN :],
            jnp.full((B, self.memory, EXPRESSION_LEN), -1, jnp.int32),
            jnp.zeros((B,), jnp.int32),
            jnp.full((B,), NO_REPLY, jnp.int32),
        )

    def step(self, state: CalcState, action_ids, action_mask):
        B, A = action_ids.shape
        _check_turn_budget(A)
        rows = jnp.arange(B)
        length = jnp.sum(action_mask, axis=1)
        last = action_ids[rows, jnp.maximum(length - 1, 0)]
        is_call = (length > 0) & (last == self.ids.close)
        value, ok = evaluate_calls(self.ids, action_ids, length)
        obs_ids, obs_mask = observation_ids(self.ids, value, ok)

        check = cd.check_answers(self.ids.countdown, state.prompt_ids, action_ids, action_mask)
        answer = (length > 0) & ~is_call  # an empty row (not acting) is neither
        correct = answer & check.correct
        expression = action_ids[:, :EXPRESSION_LEN]
        seen = jnp.any(jnp.all(state.calls == expression[:, None, :], axis=2), axis=1)
        checked = answer & check.well_formed & seen

        record = is_call & ok & (length == CALL_LEN)  # an evaluated d op d op d
        slot = state.num_calls % self.memory
        calls = state.calls.at[rows, slot].set(
            jnp.where(record[:, None], action_ids[:, 1 : 1 + EXPRESSION_LEN], state.calls[rows, slot])
        )
        matched = ok & (value == cd.prompt_targets(self.ids.countdown, state.prompt_ids))
        last_reply = jnp.where(is_call, jnp.where(matched, MATCH, MISS), state.last_reply)
        new_state = CalcState(state.prompt_ids, calls, state.num_calls + record.astype(jnp.int32), last_reply)
        as_float = lambda x: x.astype(jnp.float32)  # noqa: E731
        after_match, after_miss = state.last_reply == MATCH, state.last_reply == MISS
        metrics = {
            "tool_calls": as_float(is_call),
            "tool_errors": as_float(is_call & ~ok),
            "answers": as_float(answer),
            "correct": as_float(correct),
            "checked": as_float(checked),
            "answers_after_match": as_float(answer & after_match),
            "calls_after_match": as_float(is_call & after_match),
            "answers_after_miss": as_float(answer & after_miss),
            "calls_after_miss": as_float(is_call & after_miss),
        }
        obs_mask = jnp.where(is_call[:, None], obs_mask, 0)
        return StepOutput(new_state, obs_ids, obs_mask, as_float(correct), answer, metrics)


# ----------------------------------------------------------------------------------------------
# The same calculator on the host


PROMPT_RE = re.compile(r"<bos>(\d{3}):([+-])(\d{3})=")
ANSWER_RE = re.compile(r"(\d)[+\-*](\d)[+\-*](\d)")


@dataclasses.dataclass(frozen=True)
class HostCalculator(Environment):
    """`Calculator` in plain Python on the host: the turn's ids decoded to text, a regular
    expression and Python integers (`calculate`). ``vocabulary[id]`` is the token of ``id``."""

    vocabulary: tuple[str, ...]
    eos_token: str = "<eos>"
    pad_token: str = "<pad>"
    memory: int = 8
    max_observation_tokens: int = OBSERVATION_LEN
    metric_names: tuple[str, ...] = METRICS
    on_host: bool = True

    @classmethod
    def for_tokenizer(cls, tok, memory: int = 8) -> HostCalculator:
        return cls(tuple(tok.convert_ids_to_tokens(list(range(len(tok))))), tok.eos_token, tok.pad_token, memory)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:  # pyright: ignore[reportIncompatibleVariableOverride]
        return (self.vocabulary.index("]"),)

    def _text(self, ids) -> str:
        return "".join(self.vocabulary[i] for i in ids)

    def reset(self, key, prompt_ids, prompt_mask):
        del key
        rows = []
        for ids, mask in zip(prompt_ids, prompt_mask):
            match = PROMPT_RE.fullmatch(self._text(ids[mask > 0]))
            if match is None:
                raise ValueError(f"not a countdown prompt: {self._text(ids)!r}")
            digits, sign, target = match.groups()
            numbers = tuple(int(d) for d in digits)
            target = int(target) * (-1 if sign == "-" else 1)
            rows.append({"numbers": numbers, "target": target, "calls": [], "last_reply": NO_REPLY})
        return rows

    def step(self, state, action_ids, action_mask):
        B = len(state)
        obs_ids = np.full((B, OBSERVATION_LEN), self.vocabulary.index(self.pad_token), np.int32)
        obs_mask = np.zeros((B, OBSERVATION_LEN), np.int32)
        reward, done = np.zeros(B, np.float32), np.zeros(B, bool)
        metrics = {name: np.zeros(B, np.float32) for name in METRICS}
        new_state = []
        for b, row in enumerate(state):
            length = int(action_mask[b].sum())
            tokens = [self.vocabulary[i] for i in action_ids[b, :length]]
            row = dict(row, calls=list(row["calls"]))
            last_reply = row["last_reply"]
            if length and tokens[-1] == "]":  # a tool call
                inside = "".join(tokens[1:-1]) if tokens[0] == "[" and length >= 3 else "["  # "[": malformed
                value = calculate(inside)
                reply = [self.vocabulary.index(c) for c in observation_text(value)]
                obs_ids[b, : len(reply)], obs_mask[b, : len(reply)] = reply, 1
                if length == CALL_LEN and value is not None:
                    row["calls"] = (row["calls"] + [inside])[-self.memory :]
                metrics["tool_calls"][b] = 1
                metrics["tool_errors"][b] = value is None
                row["last_reply"] = MATCH if value == row["target"] else MISS
                if last_reply != NO_REPLY:
                    metrics["calls_after_match" if last_reply == MATCH else "calls_after_miss"][b] = 1
            elif length:  # the final answer
                expression = "".join(tokens[:EXPRESSION_LEN])  # longer than 5 characters if a token is special
                well_formed = len(tokens) == cd.ANSWER_LEN and tokens[-1] == self.eos_token
                well_formed = well_formed and ANSWER_RE.fullmatch(expression) is not None
                expression = expression if well_formed else ""
                uses_numbers = sorted(int(d) for d in expression[::2]) == sorted(row["numbers"])
                correct = well_formed and uses_numbers and calculate(expression) == row["target"]
                reward[b], done[b] = float(correct), True
                metrics["answers"][b], metrics["correct"][b] = 1, correct
                metrics["checked"][b] = well_formed and expression in row["calls"]
                if last_reply != NO_REPLY:
                    metrics["answers_after_match" if last_reply == MATCH else "answers_after_miss"][b] = 1
            new_state.append(row)
        return StepOutput(new_state, obs_ids, obs_mask, reward, done, metrics)


# ----------------------------------------------------------------------------------------------
# Held-out evaluation


def make_episodes(model, tok, problems: Sequence[cd.Problem], *, max_turns: int, max_new_tokens: int,
                  max_turn_tokens: int = CALL_LEN + 1):  # fmt: skip
    """``episodes(params, key, temperature, num_generations) -> Episode batch``: ``problems``'
    episodes with the JAX-native `Calculator` (traceable; the evaluator and the diagnosis jit it)."""
    env = Calculator(calc_ids(tok))
    prompt_ids, prompt_mask = (jnp.asarray(x) for x in cd.encode_prompts(problems, tok))

    def episodes(params, key, temperature, num_generations=1):
        return run_episodes(
            model, params, prompt_ids, prompt_mask, key, env,
            max_new_tokens=max_new_tokens, max_turns=max_turns, max_turn_tokens=max_turn_tokens,
            temperature=temperature, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            num_generations=num_generations,
        )  # fmt: skip

    return episodes


def make_evaluator(
    model,
    tok,
    problems: Sequence[cd.Problem],
    *,
    max_turns: int,
    max_new_tokens: int,
    max_turn_tokens: int = CALL_LEN + 1,
    samples_per_problem: int = 4,
):
    """``evaluate(params, key, ref_params=None) -> metrics`` on ``problems`` (jitted): episodes
    with `Calculator`, one greedy and ``samples_per_problem`` sampled (T = 1) per problem.

    Metrics, ``greedy/`` and ``sampled/``: ``accuracy`` (correct final answers), ``tool_calls``
    (per episode), ``tool_errors``, ``answered`` (episodes that ended with an answer) and
    ``checked`` (of the answers, the fraction whose expression the calculator evaluated before),
    ``answers_after_match`` / ``answers_after_miss`` (of the turns right after a reply equal to
    the target / any other reply, the fraction that answer instead of calling again);
    with ``ref_params``, ``sampled/kl_to_ref``: the per-episode KL of the policy to the reference
    over the action tokens (`jaxrlhf.training.evaluation.sequence_kl`). ``max_turns=1`` gives the
    episodes of a policy without the tool (a call ends the episode unanswered).
    """
    from jaxrlhf.training.evaluation import sequence_kl

    prompt_ids, prompt_mask = (jnp.asarray(x) for x in cd.encode_prompts(problems, tok))
    episodes = make_episodes(
        model, tok, problems, max_turns=max_turns, max_new_tokens=max_new_tokens, max_turn_tokens=max_turn_tokens
    )

    def rates(prefix, stats):
        answers = jnp.sum(stats["answers"])
        total = {name: jnp.sum(stats[name]) for name in DECISIONS}

        def after(kind):  # of the turns after a reply of this kind, the fraction that answer
            answered, called = total[f"answers_after_{kind}"], total[f"calls_after_{kind}"]
            return answered / jnp.maximum(answered + called, 1.0)

        return {
            f"{prefix}/accuracy": jnp.mean(stats["correct"]),
            f"{prefix}/tool_calls": jnp.mean(stats["tool_calls"]),
            f"{prefix}/tool_errors": jnp.mean(stats["tool_errors"]),
            f"{prefix}/answered": jnp.mean(stats["answers"]),
            f"{prefix}/checked": jnp.sum(stats["checked"]) / jnp.maximum(answers, 1.0),
            f"{prefix}/answers_after_match": after("match"),
            f"{prefix}/answers_after_miss": after("miss"),
        }

    @jax.jit
    def evaluate(params, key, ref_params=None):
        greedy_key, sampled_key = jax.random.split(key)
        greedy = episodes(params, greedy_key, 0.0, 1)
        sampled = episodes(params, sampled_key, 1.0, samples_per_problem)
        metrics = {**rates("greedy", greedy.episode_stats), **rates("sampled", sampled.episode_stats)}
        if ref_params is not None:
            repeated = (jnp.repeat(x, samples_per_problem, axis=0) for x in (prompt_ids, prompt_mask))
            kl_B = sequence_kl(
                model, params, ref_params, *repeated, sampled.tokens, sampled.mask, action_mask=sampled.action_mask
            )
            metrics["sampled/kl_to_ref"] = jnp.mean(kl_B)
        return metrics

    return evaluate


# ----------------------------------------------------------------------------------------------
# Diagnosis of episodes: what the policy does after its last check


CALL_RE = re.compile(r"\[([^\]]*)\]=([^;]*);")


class EpisodeOutcome(NamedTuple):
    """One episode read back from its text (`episode_outcome`)."""

    calls: tuple[str, ...]  # the expressions called, in order
    matches: tuple[bool, ...]  # per call: its reply was the target
    answer_is_last_call: bool  # the answer is the expression of the last call
    correct: bool  # the answer solves the problem

    @property
    def last_check(self) -> str:
        """ "matched" (the last reply is the target), "missed", or "none" (no call)."""
        return "none" if not self.matches else "matched" if self.matches[-1] else "missed"


def episode_outcome(problem: cd.Problem, text: str, ops: str) -> EpisodeOutcome:
    """An episode's calls, its last check and its answer, from its decoded text (calls
    ``[expr]=reply;`` then the answer; spaces ignored)."""
    text = text.replace(" ", "")
    calls = CALL_RE.findall(text)
    answer = CALL_RE.sub("", text)
    target_reply = observation_text(problem.target)  # what the calculator answers for the target
    return EpisodeOutcome(
        calls=tuple(expression for expression, _ in calls),
        matches=tuple(f"={reply};" == target_reply for _, reply in calls),
        answer_is_last_call=bool(calls) and answer == calls[-1][0],
        correct=answer in cd.solutions(problem, ops),
    )
