"""Guess the number: an interactive game that a single-turn policy cannot win.

The environment draws a secret number in 1..M (its reset key; the policy never sees it). Each turn
the policy guesses a number (two digits, the turn budget: ``07``) and the environment replies with
one token: ``<`` (the secret is lower), ``>`` (higher), or ``!`` (not a number in 1..M); a right
guess ends the episode with reward 1. The episode also ends after ``max_turns`` guesses (reward 0)::

    prompt    <bos> ?
    turn 1    1 6        observed  <
    turn 2    0 8        observed  >
    turn 3    1 2        (secret 12: reward 1, done)

**Why one turn cannot reach the optimum.** A policy that does not see the replies (one response
holding all its guesses, or any policy blind to the observations) picks its K guesses before
knowing anything about the secret; with the secret uniform, it finds it with probability at most
K / M (`best_single_turn_return`). Using the replies, binary search finds any secret of 1..M in
ceil(log2(M + 1)) guesses: with M = 2^K - 1 the optimum is 1, and a policy gets there only by
reading every reply (`binary_search_guesses`).

Text, one character per token (`tokenizer`): digits, the replies ``< > = !`` and the prompt's
``?``. Metrics per turn, summed over an episode: ``found`` (the episode's return), ``guesses``
(valid guesses), ``invalid`` and ``consistent`` (valid guesses inside the interval the replies so
far leave open: a policy that reads the replies makes only consistent guesses).

SFT demonstrations (`demonstrations`) come from a sloppy player: each guess reads the replies
with probability ``consistent`` (a random number inside the interval they leave open) and ignores
them otherwise (a random number not guessed yet). It never bisects on purpose; RL from the reward
has to make the policy read every reply and learn where to guess inside the interval.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.episodes import Environment, StepOutput, run_episodes

CHARS = "0123456789<>=!?"
PROMPT = "?"
GUESS_LEN = 2
METRICS = ("found", "guesses", "invalid", "consistent")


def tokenizer():
    from jaxrlhf.tokenizers import char_tokenizer

    return char_tokenizer(CHARS)


def best_single_turn_return(max_number: int, max_turns: int) -> float:
    """The best expected return of a policy that does not see the replies: its ``max_turns``
    guesses are fixed before the (uniform) secret is known, so at most that many of the
    ``max_number`` secrets are found."""
    return min(max_turns, max_number) / max_number


def binary_search_guesses(max_number: int) -> list[int]:
    """Guesses binary search needs for each secret 1..M (middle of the open interval, rounded down)."""
    counts = []
    for secret in range(1, max_number + 1):
        lo, hi, n = 1, max_number, 0
        while True:
            guess, n = (lo + hi) // 2, n + 1
            if guess == secret:
                break
            lo, hi = (lo, guess - 1) if secret < guess else (guess + 1, hi)
        counts.append(n)
    return counts


def optimal_return(max_number: int, max_turns: int) -> float:
    """Binary search's return: the fraction of secrets it finds within ``max_turns`` guesses."""
    return float(np.mean([n <= max_turns for n in binary_search_guesses(max_number)]))


class Ids(NamedTuple):
    digit0: int
    lower: int  # <
    higher: int  # >
    correct: int  # =
    invalid: int  # !
    prompt: int  # ?
    bos: int


def token_ids(tok) -> Ids:
    ids = tok.convert_tokens_to_ids(list(CHARS))
    return Ids(ids[0], *tok.convert_tokens_to_ids(list("<>=!?")), tok.bos_token_id)


def encode_prompts(tok, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` copies of the prompt ``<bos> ?`` (the game has no other input)."""
    ids = np.asarray([[tok.bos_token_id, token_ids(tok).prompt]] * count, np.int32)
    return ids, np.ones_like(ids)


class GuessState(NamedTuple):
    secret: jax.Array  # [B]
    lo: jax.Array  # [B] the smallest secret the replies so far allow
    hi: jax.Array  # [B] the largest


@dataclasses.dataclass(frozen=True)
class GuessNumber(Environment):
    """The game, JAX-native (module docstring). ``enumerate_secrets``: row b's secret is
    ``b % M + 1`` instead of a random draw (an exact evaluation over every secret)."""

    ids: Ids
    max_number: int = 31
    enumerate_secrets: bool = False
    max_observation_tokens: int = 1
    metric_names: tuple[str, ...] = METRICS

    def __post_init__(self):
        if not 1 <= self.max_number <= 99:
            raise ValueError(f"max_number must be in [1, 99] (two-digit guesses), got {self.max_number}")

    def reset(self, key, prompt_ids, prompt_mask):
        B = prompt_ids.shape[0]
        if self.enumerate_secrets:
            secret = jnp.arange(B, dtype=jnp.int32) % self.max_number + 1
        else:
            secret = jax.random.randint(key, (B,), 1, self.max_number + 1, jnp.int32)
        return GuessState(secret, jnp.ones((B,), jnp.int32), jnp.full((B,), self.max_number, jnp.int32))

    def step(self, state: GuessState, action_ids, action_mask):
        if action_ids.shape[1] != GUESS_LEN:
            raise ValueError(f"guess_number needs max_turn_tokens={GUESS_LEN} (two digits), got {action_ids.shape[1]}")
        digits = action_ids - self.ids.digit0
        is_digit = (digits >= 0) & (digits < 10) & (action_mask > 0)
        guess = digits[:, 0] * 10 + digits[:, 1]
        valid = jnp.all(is_digit, axis=1) & (guess >= 1) & (guess <= self.max_number)
        found = valid & (guess == state.secret)
        lower, higher = valid & (state.secret < guess), valid & (state.secret > guess)
        consistent = valid & (guess >= state.lo) & (guess <= state.hi)
        reply = jnp.where(
            found,
            self.ids.correct,
            jnp.where(lower, self.ids.lower, jnp.where(higher, self.ids.higher, self.ids.invalid)),
        )
        new_state = GuessState(
            state.secret,
            jnp.where(higher, jnp.maximum(state.lo, guess + 1), state.lo),
            jnp.where(lower, jnp.minimum(state.hi, guess - 1), state.hi),
        )
        as_float = lambda x: x.astype(jnp.float32)  # noqa: E731
        metrics = {
            "found": as_float(found),
            "guesses": as_float(valid),
            "invalid": as_float(~valid),
            "consistent": as_float(consistent),
        }
        obs_ids = reply[:, None].astype(jnp.int32)
        return StepOutput(new_state, obs_ids, jnp.ones_like(obs_ids), as_float(found), found, metrics)


def demonstrations(
    max_number: int, max_turns: int, count: int, consistent: float = 0.5, seed: int = 0
) -> list[tuple[int, list[int]]]:
    """``count`` games of a sloppy player: ``(secret, guesses)``, the guesses ending at the secret
    or after ``max_turns``. Each guess reads the replies with probability ``consistent`` (a
    uniform draw from the interval the replies so far leave open), else ignores them (a uniform
    draw from the numbers not guessed yet); it never bisects on purpose."""
    rng = np.random.default_rng(seed)
    games = []
    for _ in range(count):
        secret = int(rng.integers(1, max_number + 1))
        lo, hi, guesses = 1, max_number, []
        while len(guesses) < max_turns and (not guesses or guesses[-1] != secret):
            if rng.random() < consistent:
                guess = int(rng.integers(lo, hi + 1))
            else:
                guess = int(rng.choice([n for n in range(1, max_number + 1) if n not in guesses]))
            guesses.append(guess)
            lo, hi = (
                (lo, min(hi, guess - 1)) if secret < guess else (max(lo, guess + 1), hi) if secret > guess else (lo, hi)
            )
        games.append((secret, guesses))
    return games


def reply_text(secret: int, guess: int) -> str:
    return "<" if secret < guess else ">" if secret > guess else "="


def encode_demonstrations(games, tok, max_turns: int) -> dict[str, np.ndarray]:
    """SFT rows ``<bos> ? g g r g g r ...``: loss on the guesses, not the replies; the last guess
    (right, or the ``max_turns``-th) gets no reply, as in the rollout."""
    width = 2 + max_turns * (GUESS_LEN + 1)
    ids = np.full((len(games), width), tok.pad_token_id, np.int32)
    attention, loss = np.zeros_like(ids), np.zeros_like(ids)
    for row, (secret, guesses) in enumerate(games):
        tokens, is_action = [tok.bos_token_id, token_ids(tok).prompt], [0, 0]
        for turn, guess in enumerate(guesses):
            tokens += tok.convert_tokens_to_ids(list(f"{guess:02d}"))
            is_action += [1, 1]
            if guess != secret and turn < max_turns - 1:
                tokens.append(tok.convert_tokens_to_ids(reply_text(secret, guess)))
                is_action.append(0)
        ids[row, : len(tokens)], attention[row, : len(tokens)], loss[row, : len(tokens)] = tokens, 1, is_action
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


def episode_tokens(max_turns: int) -> int:
    """The episode budget N: every guess and every reply but the last."""
    return max_turns * (GUESS_LEN + 1) - 1


def make_evaluator(model, tok, max_number: int, max_turns: int, samples_per_secret: int = 8):
    """``evaluate(params, key) -> metrics`` (jitted): ``greedy/`` one episode per secret 1..M (the
    greedy policy's exact expected return), ``sampled/`` ``samples_per_secret`` episodes per
    secret at T = 1. Metrics: ``return`` (the fraction found), ``guesses`` per episode,
    ``consistent`` (the fraction of valid guesses the replies so far allowed), ``invalid``."""
    env = GuessNumber(token_ids(tok), max_number, enumerate_secrets=True)

    def play(params, key, temperature, copies):
        prompt_ids, prompt_mask = (jnp.asarray(x) for x in encode_prompts(tok, max_number * copies))
        return run_episodes(
            model, params, prompt_ids, prompt_mask, key, env,
            max_new_tokens=episode_tokens(max_turns), max_turns=max_turns, max_turn_tokens=GUESS_LEN,
            temperature=temperature, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ).episode_stats  # fmt: skip

    def rates(prefix, stats):
        return {
            f"{prefix}/return": jnp.mean(stats["found"]),
            f"{prefix}/guesses": jnp.mean(stats["guesses"]),
            f"{prefix}/invalid": jnp.mean(stats["invalid"]),
            f"{prefix}/consistent": jnp.sum(stats["consistent"]) / jnp.maximum(jnp.sum(stats["guesses"]), 1.0),
        }

    @jax.jit
    def evaluate(params, key):
        greedy_key, sampled_key = jax.random.split(key)
        return {
            **rates("greedy", play(params, greedy_key, 0.0, 1)),
            **rates("sampled", play(params, sampled_key, 1.0, samples_per_secret)),
        }

    return evaluate


def turns_needed(max_number: int) -> int:
    """Guesses binary search needs in the worst case: ceil(log2(M + 1))."""
    return math.ceil(math.log2(max_number + 1))
