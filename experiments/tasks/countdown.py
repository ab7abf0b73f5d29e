"""Countdown-style arithmetic: a verifiable-reward task for critic-free RL (GRPO and friends).

A problem is three digits and a target; the answer is an expression that uses each digit exactly
once, with ``+``, ``-`` (and, optionally, ``*`` with the usual precedence), and evaluates to the
target. Every problem is solvable: its target is the value of a random such expression.

Text, one character per token (`jaxrlhf.tokenizers.char_tokenizer` over ``CHARS``), fixed widths
so that a JAX checker can read it by position::

    prompt    <bos> 3 5 7 : + 0 0 9 =        digits, ':', the target as sign + 3 digits, '='
    response  7 + 5 - 3 <eos>                 digit op digit op digit, then EOS (6 tokens)

The checker (`check_answers`, `make_reward_fn`) works on token ids inside the jitted step: an
answer is **well formed** when its valid tokens are exactly ``digit op digit op digit <eos>``; it
**uses the numbers** when its three digits are the prompt's three (as a multiset); it is
**correct** when, in addition, its value equals the target. The reward is 1 for a correct
answer and ``format_reward`` (default 0) for a well-formed wrong one.

Held-out problems: a problem's identity is (sorted digits, target); a fixed hash of it puts a
fraction of all problems in the held-out split, which no SFT or RL step ever sees.

Ordered problems (``make_task(ordered=True)``): each target is the value of an expression of the
digits **in the prompt's order** (``357:+005=`` from ``3-5+7``), so an in-order solution always
exists, and correct demonstrations use it. The checker still accepts any order. A policy then
chooses two operators rather than a permutation as well, which a small model learns from a few
thousand problems well enough to generalise to held-out ones; with targets from a random order it
memorises the training problems (held-out accuracy about 0.7 after SFT on correct answers alone).

SFT demonstrations are noisy on purpose (``correct_fraction``): a demonstration is a correct
solution with that probability, otherwise a wrong one (``noise``): a random well-formed
expression of the same digits, or the correct answer with its last operator slipped to another
one. The SFT policy then writes well-formed answers but is right only part of the time, leaving
RL something to learn from a binary, verifiable reward.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DIGITS = "0123456789"
CHARS = DIGITS + "+-*:="
NUM_NUMBERS = 3
TARGET_DIGITS = 3
PROMPT_LEN = 1 + NUM_NUMBERS + 1 + 1 + TARGET_DIGITS + 1  # <bos> ddd : s ttt =
ANSWER_LEN = 2 * NUM_NUMBERS  # d op d op d <eos>


@dataclasses.dataclass(frozen=True)
class Problem:
    numbers: tuple[int, ...]
    target: int

    @property
    def key(self) -> tuple:
        return tuple(sorted(self.numbers)), self.target


def evaluate_expression(numbers: Sequence[int], ops: Sequence[str]) -> int:
    """``a op1 b op2 c`` with ``*`` binding tighter than ``+``/``-``, left to right otherwise."""
    a, b, c = numbers
    op1, op2 = ops
    if op2 == "*" and op1 != "*":
        right = b * c
        return a + right if op1 == "+" else a - right
    left = {"+": a + b, "-": a - b, "*": a * b}[op1]
    return {"+": left + c, "-": left - c, "*": left * c}[op2]


def expression_text(numbers: Sequence[int], ops: Sequence[str]) -> str:
    return f"{numbers[0]}{ops[0]}{numbers[1]}{ops[1]}{numbers[2]}"


def prompt_text(problem: Problem) -> str:
    sign = "-" if problem.target < 0 else "+"
    return "".join(map(str, problem.numbers)) + ":" + sign + f"{abs(problem.target):0{TARGET_DIGITS}d}" + "="


def solutions(problem: Problem, ops: str) -> list[str]:
    """Every correct answer text (without EOS)."""
    found = []
    for order in sorted(set(itertools.permutations(problem.numbers))):
        for op_pair in itertools.product(ops, repeat=2):
            if evaluate_expression(order, op_pair) == problem.target:
                found.append(expression_text(order, op_pair))
    return found


def is_held_out(problem: Problem, held_out_fraction: float) -> bool:
    """A fixed split: the first 8 bytes of SHA-256 of the problem's identity, as a fraction."""
    digest = hashlib.sha256(repr(problem.key).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < held_out_fraction


@dataclasses.dataclass(frozen=True)
class CountdownTask:
    ops: str
    train: tuple[Problem, ...]
    held_out: tuple[Problem, ...]
    ordered: bool = False


def make_task(
    seed: int = 0,
    num_problems: int = 4000,
    ops: str = "+-",
    max_digit: int = 9,
    held_out_fraction: float = 0.2,
    ordered: bool = False,
) -> CountdownTask:
    """Random solvable problems (duplicates removed), split into train and held-out by `is_held_out`.
    ``ordered``: each target is made from the digits in the prompt's order (else a random order)."""
    if not set(ops) <= set("+-*") or not ops:
        raise ValueError(f"ops must be a non-empty subset of '+-*', got {ops!r}")
    rng = np.random.default_rng(seed)
    seen, train, held_out = set(), [], []
    for _ in range(num_problems):
        numbers = tuple(int(x) for x in rng.integers(1, max_digit + 1, NUM_NUMBERS))
        order = tuple(rng.permutation(numbers).tolist())
        if ordered:
            order = numbers
        op_pair = tuple(rng.choice(list(ops), 2).tolist())
        problem = Problem(numbers, evaluate_expression(order, op_pair))
        if problem in seen or abs(problem.target) >= 10**TARGET_DIGITS:
            continue
        seen.add(problem)
        (held_out if is_held_out(problem, held_out_fraction) else train).append(problem)
    return CountdownTask(ops, tuple(train), tuple(held_out), ordered)


NOISE_KINDS = ("random", "slip")


def demonstrations(
    task: CountdownTask, correct_fraction: float, seed: int = 0, noise: str = "random"
) -> list[tuple[Problem, str]]:
    """One (problem, answer) per training problem: a correct answer with probability
    ``correct_fraction`` (for an ordered task, one with the digits in the prompt's order), otherwise
    a wrong one of the kind ``noise`` names:

    - ``"random"``: a random well-formed expression of the same digits (usually wrong);
    - ``"slip"``: that correct answer with its last operator replaced by another one (``8+6+5`` ->
      ``8+6-5``), the systematic mistake of a teacher who gets the sign of the last step wrong.
    """
    if noise not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
    if noise == "slip" and len(task.ops) < 2:
        raise ValueError(f"noise='slip' needs at least two operators to slip between, got ops={task.ops!r}")
    rng = np.random.default_rng(seed)
    demos = []
    for problem in task.train:
        correct = rng.random() < correct_fraction
        if correct or noise == "slip":
            candidates = solutions(problem, task.ops)
            if task.ordered:
                prefix = "".join(map(str, problem.numbers))
                candidates = [c for c in candidates if c[::2] == prefix]
            answer = candidates[rng.integers(len(candidates))]
            if not correct:
                others = [op for op in task.ops if op != answer[-2]]
                answer = answer[:-2] + others[rng.integers(len(others))] + answer[-1]
        else:
            order = rng.permutation(problem.numbers).tolist()
            answer = expression_text(order, rng.choice(list(task.ops), 2).tolist())
        demos.append((problem, answer))
    return demos


# ----------------------------------------------------------------------------------------------
# Token ids


class TokenIds(NamedTuple):
    digit0: int  # id of "0"; "0".."9" are consecutive
    plus: int
    minus: int
    times: int
    eos: int


def token_ids(tokenizer) -> TokenIds:
    ids = tokenizer.convert_tokens_to_ids(list(DIGITS) + ["+", "-", "*"])
    if ids[:10] != list(range(ids[0], ids[0] + 10)):
        raise ValueError("the tokenizer's digit ids must be consecutive (char_tokenizer over CHARS)")
    return TokenIds(ids[0], ids[10], ids[11], ids[12], tokenizer.eos_token_id)


def encode_prompts(problems: Sequence[Problem], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """``<bos> prompt`` ids ``[N, PROMPT_LEN]`` int32 (all the same width) and their mask."""
    rows = [[tokenizer.bos_token_id] + tokenizer.convert_tokens_to_ids(list(prompt_text(p))) for p in problems]
    ids = np.asarray(rows, np.int32)
    return ids, np.ones_like(ids)


def encode_demonstrations(demos: Sequence[tuple[Problem, str]], tokenizer) -> dict[str, np.ndarray]:
    """SFT rows ``<bos> prompt answer <eos>`` with ``loss_mask`` on the answer and EOS."""
    width = PROMPT_LEN + ANSWER_LEN
    ids = np.full((len(demos), width), tokenizer.pad_token_id, np.int32)
    for row, (problem, answer) in enumerate(demos):
        tokens = (
            [tokenizer.bos_token_id]
            + tokenizer.convert_tokens_to_ids(list(prompt_text(problem) + answer))
            + [tokenizer.eos_token_id]
        )
        ids[row, : len(tokens)] = tokens
    attention = (np.arange(width)[None] < PROMPT_LEN + ANSWER_LEN).astype(np.int32)
    loss = (np.arange(width)[None] >= PROMPT_LEN).astype(np.int32) * attention
    return {
        "input_ids": ids,
        "attention_mask": np.broadcast_to(attention, ids.shape).copy(),
        "loss_mask": np.broadcast_to(loss, ids.shape).copy(),
    }


class Check(NamedTuple):
    """Per answer ``[B]``: well formed, uses the prompt's digits, correct (all bool), and its value."""

    well_formed: jax.Array
    uses_numbers: jax.Array
    correct: jax.Array
    value: jax.Array


def prompt_targets(ids: TokenIds, prompt_ids: jax.Array) -> jax.Array:
    """The targets ``[B]`` int32 of prompts ``[B, PROMPT_LEN]`` as written by `encode_prompts`."""
    digit = lambda t: t - ids.digit0  # noqa: E731
    sign_B = jnp.where(prompt_ids[:, 2 + NUM_NUMBERS] == ids.minus, -1, 1)
    target_digits = digit(prompt_ids[:, 3 + NUM_NUMBERS : 3 + NUM_NUMBERS + TARGET_DIGITS])
    return sign_B * (target_digits[:, 0] * 100 + target_digits[:, 1] * 10 + target_digits[:, 2])


def check_answers(ids: TokenIds, prompt_ids: jax.Array, response_ids: jax.Array, response_mask: jax.Array) -> Check:
    """Checks answers on token ids (jit/vmap-able). ``prompt_ids [B, PROMPT_LEN]`` as written by
    `encode_prompts`; ``response_ids, response_mask [B, N]`` with ``N >= ANSWER_LEN``."""
    if prompt_ids.shape[1] != PROMPT_LEN or response_ids.shape[1] < ANSWER_LEN:
        raise ValueError(
            f"countdown prompts are {PROMPT_LEN} tokens wide and answers need {ANSWER_LEN} "
            f"response slots; got {prompt_ids.shape[1]} and {response_ids.shape[1]}"
        )
    digit = lambda t: t - ids.digit0  # noqa: E731
    is_digit = lambda t: (t >= ids.digit0) & (t < ids.digit0 + 10)  # noqa: E731
    is_op = lambda t: (t == ids.plus) | (t == ids.minus) | (t == ids.times)  # noqa: E731

    numbers_Bx3 = digit(prompt_ids[:, 1 : 1 + NUM_NUMBERS])
    target_B = prompt_targets(ids, prompt_ids)

    tokens = response_ids[:, :ANSWER_LEN]
    length_B = jnp.sum(response_mask != 0, axis=1)
    a, op1, b, op2, c, end = (tokens[:, i] for i in range(ANSWER_LEN))
    well_formed = (
        (length_B == ANSWER_LEN) & is_digit(a) & is_op(op1) & is_digit(b) & is_op(op2) & is_digit(c) & (end == ids.eos)
    )
    answer_Bx3 = jnp.stack([digit(a), digit(b), digit(c)], axis=1)
    uses_numbers = well_formed & jnp.all(jnp.sort(answer_Bx3, axis=1) == jnp.sort(numbers_Bx3, axis=1), axis=1)

    def apply(x, op, y):
        return jnp.where(op == ids.plus, x + y, jnp.where(op == ids.minus, x - y, x * y))

    x, y, z = digit(a), digit(b), digit(c)
    precedence = (op2 == ids.times) & (op1 != ids.times)  # a +/- (b * c)
    value = jnp.where(precedence, apply(x, op1, y * z), apply(apply(x, op1, y), op2, z))
    correct = uses_numbers & (value == target_B)
    return Check(well_formed, uses_numbers, correct, jnp.where(well_formed, value, 0))


def make_reward_fn(tokenizer, format_reward: float = 0.0) -> Callable[..., jax.Array]:
    """``reward_fn(prompt_ids, prompt_mask, response_ids, response_mask) -> [B]`` for the trainer:
    1 for a correct answer, ``format_reward`` for a well-formed one using the digits, else 0."""
    ids = token_ids(tokenizer)

    def reward_fn(prompt_ids, prompt_mask, response_ids, response_mask):
        del prompt_mask
        check = check_answers(ids, prompt_ids, response_ids, response_mask)
        return jnp.where(check.correct, 1.0, jnp.where(check.uses_numbers, format_reward, 0.0)).astype(jnp.float32)

    return reward_fn


def tokenizer():
    """The task's character tokenizer (``<pad> <bos> <eos> <unk>`` then ``CHARS``)."""
    from jaxrlhf.tokenizers import char_tokenizer

    return char_tokenizer(CHARS, model_max_length=PROMPT_LEN + ANSWER_LEN + 4)


def make_evaluator(model, tokenizer, problems: Sequence[Problem], samples_per_problem: int = 4):
    """``evaluate(params, key, ref_params=None) -> metrics`` on ``problems`` (jitted).

    Metrics: ``greedy/accuracy``, ``greedy/well_formed`` (one greedy answer per problem);
    ``sampled/accuracy``, ``sampled/well_formed`` (``samples_per_problem`` answers per problem at
    temperature 1); with ``ref_params``, also ``sampled/kl_to_ref``, the mean per-answer KL of the
    policy to the reference on the sampled answers (`jaxrlhf.training.evaluation.sequence_kl`).
    """
    from jaxrlhf.sampling import generate
    from jaxrlhf.training.evaluation import sequence_kl

    ids = token_ids(tokenizer)
    prompt_ids, prompt_mask = (jnp.asarray(x) for x in encode_prompts(problems, tokenizer))
    repeated = (
        jnp.repeat(prompt_ids, samples_per_problem, axis=0),
        jnp.repeat(prompt_mask, samples_per_problem, axis=0),
    )

    def sample(params, prompts, key, temperature):
        return generate(
            model,
            params,
            *prompts,
            key,
            max_new_tokens=ANSWER_LEN + 2,
            temperature=temperature,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    def rates(prompts, out):
        check = check_answers(ids, prompts[0], out.tokens, out.mask)
        return jnp.mean(check.correct.astype(jnp.float32)), jnp.mean(check.well_formed.astype(jnp.float32))

    @jax.jit
    def evaluate(params, key, ref_params=None):
        greedy_key, sampled_key = jax.random.split(key)
        greedy_accuracy, greedy_formed = rates(
            (prompt_ids, prompt_mask), sample(params, (prompt_ids, prompt_mask), greedy_key, 0.0)
        )
        sampled = sample(params, repeated, sampled_key, 1.0)
        sampled_accuracy, sampled_formed = rates(repeated, sampled)
        metrics = {
            "greedy/accuracy": greedy_accuracy,
            "greedy/well_formed": greedy_formed,
            "sampled/accuracy": sampled_accuracy,
            "sampled/well_formed": sampled_formed,
        }
        if ref_params is not None:
            kl_B = sequence_kl(model, params, ref_params, *repeated, sampled.tokens, sampled.mask)
            metrics["sampled/kl_to_ref"] = jnp.mean(kl_B)
        return metrics

    return evaluate
