"""A host environment written on text: the user writes ``step_text``, `ChatDelta` makes the ids.

`TextEnvironment` is an `jaxrlhf.episodes.Environment` on the host (``on_host = True``) whose
subclass writes two functions on strings:

- ``reset_text(prompts) -> (states, messages)``: per row, the user's state and the chat messages
  the prompt renders (parsed from the prompt's text, or looked up in the data set); they are
  checked against the prompt's ids (the template must give exactly those ids);
- ``step_text(states, actions) -> (states, observations, rewards, dones)``: called each turn
  with the rows that acted only (lists in row order), ``actions`` the text of each row's
  assistant message so far in this turn (decoded, a final end-of-turn token left out). An
  observation is a string (the content of one message with role ``observation_role``, "tool" by
  default), a message dict, a list of them, or None (no message: the assistant's message goes on
  in the next turn); it is ignored for a row that is done.

Each observation enters the episode as the ids `ChatDelta.add_messages` gives: the ids the
template adds after the conversation so far, never a re-tokenisation of it (token-in/token-out).
A delta longer than ``max_observation_tokens`` is an `EnvError` naming the row (raise the limit,
or shorten the observation in ``step_text``); so is a template that is not prefix-preserving for
the conversation (`ChatTemplateError`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from jaxrlhf.chat import ChatDelta, ChatTemplateError, Conversation, first_difference
from jaxrlhf.episodes import EnvError, Environment, StepOutput


class TextState(NamedTuple):
    """A `TextEnvironment`'s state: per row, the user's state and the `Conversation`."""

    user: list[Any]
    conversations: list[Conversation]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextEnvironment(Environment):
    """A host environment on text (module docstring). Subclass it, set ``chat``,
    ``max_observation_tokens`` and ``stop_token_ids``, and write ``reset_text`` and ``step_text``."""

    chat: ChatDelta
    max_observation_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    observation_role: str = "tool"
    on_host: bool = True

    def reset_text(self, prompts: list[str]) -> tuple[list[Any], list[list[dict]]]:
        raise NotImplementedError

    def step_text(self, states: list[Any], actions: list[str]) -> tuple[list[Any], list[Any], list[float], list[bool]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ the Environment protocol

    def reset(self, key, prompt_ids, prompt_mask) -> TextState:
        prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
        rows = [[int(i) for i in ids[mask > 0]] for ids, mask in zip(prompt_ids, prompt_mask)]
        user, messages = self.reset_text([self.chat.decode(r) for r in rows])
        self._check_rows("reset_text", "states", user, len(rows))
        self._check_rows("reset_text", "messages", messages, len(rows))
        conversations = []
        for b, (ids, row_messages) in enumerate(zip(rows, messages)):
            conversation = self.chat.start(row_messages)
            if list(conversation.ids) != ids:
                raise EnvError(
                    f"environment {self.name}: reset_text's messages of row {b} render to other ids than the "
                    f"prompt's ({len(conversation.ids)} vs {len(ids)} tokens, first difference at "
                    f"{first_difference(conversation.ids, ids)}): give the messages the prompt was made from "
                    "(ChatDelta.prompts), untruncated"
                )
            conversations.append(conversation)
        return TextState(list(user), conversations)

    def step(self, state: TextState, action_ids, action_mask) -> StepOutput:
        action_ids, action_mask = np.asarray(action_ids), np.asarray(action_mask)
        B, O = action_ids.shape[0], self.max_observation_tokens
        acted = [b for b in range(B) if action_mask[b].sum() > 0]
        conversations = list(state.conversations)
        for b in acted:
            conversations[b] = self.chat.add_action(conversations[b], action_ids[b][action_mask[b] > 0])
        user, observations, rewards, dones = self.step_text(
            [state.user[b] for b in acted], [self.chat.action_text(conversations[b]) for b in acted]
        )
        for field, value in (("states", user), ("observations", observations), ("rewards", rewards), ("dones", dones)):
            self._check_rows("step_text", field, value, len(acted))
        new_user = list(state.user)
        obs_ids, obs_mask = np.zeros((B, O), np.int32), np.zeros((B, O), np.int32)
        reward, done = np.zeros(B, np.float32), np.ones(B, bool)
        for i, b in enumerate(acted):
            new_user[b], reward[b], done[b] = user[i], rewards[i], bool(dones[i])
            if done[b] or observations[i] is None:
                continue
            try:
                delta, conversations[b] = self.chat.add_messages(conversations[b], self._messages(observations[i]))
            except ChatTemplateError as error:
                raise EnvError(f"environment {self.name}: row {b}: {error}") from error
            if len(delta) > O:
                raise EnvError(
                    f"environment {self.name}: row {b}'s observation is {len(delta)} tokens, more than "
                    f"max_observation_tokens={O} (raise it, or shorten the observation in step_text): "
                    f"{self.chat.decode(delta)[:80]!r}"
                )
            obs_ids[b, : len(delta)], obs_mask[b, : len(delta)] = delta, 1
        return StepOutput(TextState(new_user, conversations), obs_ids, obs_mask, reward, done)

    def _messages(self, observation) -> list[dict]:
        if isinstance(observation, str):
            return [{"role": self.observation_role, "content": observation}]
        if isinstance(observation, dict):
            return [observation]
        if isinstance(observation, (list, tuple)) and all(isinstance(m, dict) for m in observation):
            return list(observation)
        raise EnvError(
            f"environment {self.name}: step_text's observation must be a str, a message dict, a list of them "
            f"or None, got {type(observation).__name__}"
        )

    def _check_rows(self, method: str, field: str, value, rows: int) -> None:
        if not isinstance(value, (list, tuple, np.ndarray)) or len(value) != rows:
            got = f"length {len(value)}" if hasattr(value, "__len__") else type(value).__name__
            raise EnvError(
                f"environment {self.name}: {method}'s {field} must have one entry per row ({rows}), got {got}"
            )
