"""Chat conversations token-in/token-out: each new message is tokenised as a delta.

A multi-turn episode is one token sequence: the prompt, the ids the policy sampled, the ids the
environment wrote, and so on (DESIGN.md, "Episodes"). The trainer trains on exactly those ids, so
the history must never be re-tokenised or re-templated: decoding the sampled ids and encoding
the text again can give other ids (a merge across a boundary, a different split of the same
text), and the log-probs were taken on the sampled ones. `ChatDelta` appends each new message (a
tool's output, a user turn) as the ids the chat template adds after the conversation so far:

    prefix = template(history, generation prompt) + decode(sampled ids)
    full   = template(history + [assistant: decode(sampled ids)] + new messages, generation prompt)
    delta  = encode(full[len(prefix):])         appended after the sampled ids

For a **prefix-preserving** template (the text of a conversation is a prefix of the text of any
continuation, and tokenising the two pieces apart gives the tokens of the whole) the ids of a
conversation built this way are exactly ``encode(template(conversation))``. Not every template
is: some trim or rewrite earlier messages (drop the reasoning of earlier assistant turns, strip
whitespace, number the turns), and with no special token at the boundary a tokenizer may merge
the end of the action with the start of the delta. `ChatDelta` checks both for every delta, on
the conversation at hand, and refuses (`ChatTemplateError`, with the position where the texts
or tokens part) rather than append ids the model would never see at inference:

- text: ``full`` starts with ``prefix``;
- tokens: ``encode(prefix) + delta == encode(full)``.

The checks render and tokenise the whole conversation for each new message (host work
proportional to the history, small next to a forward pass over it); only the delta's ids are
appended: the sampled ids are never replaced by a re-tokenisation.

The assistant message is the decoded action; an action that ends with one of ``end_of_turn_ids``
(by default the tokenizer's EOS, e.g. ``<|im_end|>``) has that token in its ids but not in the
message's content (the template writes it). Two actions with no message between them are one
assistant message (their ids decoded together).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

Message = Mapping[str, Any]


class ChatTemplateError(ValueError):
    """The chat template is not prefix-preserving for this conversation: the new message would
    change text or tokens the model has already seen."""


class Conversation(NamedTuple):
    """A conversation as the model saw it.

    ``ids`` are every token so far (prompt, sampled, appended deltas), never re-tokenised.
    ``text`` is the template's text of ``messages`` with the generation prompt: it covers
    ``ids`` up to the open assistant message, whose sampled ids are ``action_ids`` (the tail of
    ``ids``; empty right after a prompt or a delta).
    """

    messages: tuple[Message, ...]
    ids: tuple[int, ...]
    text: str
    action_ids: tuple[int, ...] = ()


def first_difference(a: Sequence, b: Sequence) -> int:
    """The first index where ``a`` and ``b`` differ (the shorter length if one is a prefix)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ChatDelta:
    """Token-in/token-out conversations with a Hugging Face tokenizer's chat template.

    Args:
      tokenizer: a ``transformers`` tokenizer with a chat template (``tokenizer.chat_template``,
        or ``chat_template=`` in ``template_kwargs``).
      end_of_turn_ids: ids that close an assistant message when the policy samples them (kept in
        the ids, left out of the message's content because the template writes them); default
        the tokenizer's EOS id.
      template_kwargs: extra arguments of every ``apply_chat_template`` call (``tools=``,
        ``chat_template=``, a template's own switches).

    ``start(messages)`` gives the prompt's `Conversation`; ``add_action(conv, ids)`` appends the
    policy's sampled ids; ``add_messages(conv, messages)`` returns the delta ids of the new
    messages (then the generation prompt) and the conversation with them.
    """

    def __init__(self, tokenizer, *, end_of_turn_ids: Sequence[int] | None = None, template_kwargs=None):
        self.tokenizer = tokenizer
        self.template_kwargs = dict(template_kwargs or {})
        if not (getattr(tokenizer, "chat_template", None) or self.template_kwargs.get("chat_template")):
            raise ValueError(
                f"ChatDelta: tokenizer {type(tokenizer).__name__} has no chat template (set "
                "tokenizer.chat_template or pass template_kwargs={'chat_template': ...})"
            )
        if end_of_turn_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            end_of_turn_ids = () if eos is None else (eos,)
        self.end_of_turn_ids = tuple(int(i) for i in end_of_turn_ids)

    # ------------------------------------------------------------------ text and ids

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The template's text of ``messages``."""
        text = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **self.template_kwargs,
        )
        if not isinstance(text, str):
            raise TypeError(f"ChatDelta: apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
        return text

    def encode(self, text: str) -> list[int]:
        """``text``'s ids, with no special tokens added (the template writes its own)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens included, with no clean-up (the inverse of `encode`
        where one exists)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # ------------------------------------------------------------------ conversations

    def start(self, messages: Sequence[Message]) -> Conversation:
        """The prompt: ``messages`` with the generation prompt, as a `Conversation`."""
        messages = tuple(messages)
        if not messages:
            raise ValueError("ChatDelta.start: messages is empty")
        text = self.render(messages)
        return Conversation(messages, tuple(self.encode(text)), text)

    def prompts(self, conversations: Sequence[Sequence[Message]], pad_token_id: int | None = None):
        """Prompt arrays for the trainer: each conversation's `start` ids, left-padded to the
        longest, ``(ids [B, P] int32, mask [B, P] int32)``; ``pad_token_id`` defaults to the
        tokenizer's pad id, else 0."""
        rows = [self.start(messages).ids for messages in conversations]
        if not rows:
            raise ValueError("ChatDelta.prompts: conversations is empty")
        if pad_token_id is None:
            pad_token_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), pad_token_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for b, row in enumerate(rows):
            ids[b, width - len(row) :] = row
            mask[b, width - len(row) :] = 1
        return ids, mask

    def add_action(self, conversation: Conversation, action_ids: Sequence[int]) -> Conversation:
        """The conversation with the policy's sampled ``action_ids`` appended (the open assistant
        message grows: two actions with no message between them are one message)."""
        action_ids = tuple(int(i) for i in action_ids)
        return conversation._replace(ids=conversation.ids + action_ids, action_ids=conversation.action_ids + action_ids)

    def action_text(self, conversation: Conversation) -> str:
        """The open assistant message's content: its sampled ids decoded, a final end-of-turn
        token left out."""
        ids = conversation.action_ids
        if ids and ids[-1] in self.end_of_turn_ids:
            ids = ids[:-1]
        return self.decode(ids)

    def add_messages(self, conversation: Conversation, messages: Sequence[Message]) -> tuple[list[int], Conversation]:
        """The ids to append for ``messages`` (a tool's output, a user turn) after the open
        assistant message, and the conversation with them; the delta ends with the generation
        prompt of the next assistant turn. `ChatTemplateError` when the template would change
        earlier text or tokens (module docstring)."""
        messages = tuple(messages)
        if not messages:
            raise ValueError("ChatDelta.add_messages: messages is empty (nothing to append)")
        if not conversation.action_ids:
            raise ValueError(
                "ChatDelta.add_messages: the conversation ends with a generation prompt and no action; "
                "add the policy's action first (add_action)"
            )
        assistant = {"role": "assistant", "content": self.action_text(conversation)}
        history = (*conversation.messages, assistant)
        prefix = conversation.text + self.decode(conversation.action_ids)
        full = self.render((*history, *messages))
        if not full.startswith(prefix):
            at = first_difference(prefix, full)
            raise ChatTemplateError(
                "the chat template is not prefix-preserving for this conversation: adding "
                f"{[m.get('role') for m in messages]} changes the text seen so far at character {at}: "
                f"{prefix[max(0, at - 40) : at + 40]!r} became {full[max(0, at - 40) : at + 40]!r} "
                "(a template that rewrites earlier messages, e.g. trims them or drops their reasoning, "
                "cannot be extended token-in/token-out)"
            )
        delta_text = full[len(prefix) :]
        delta = self.encode(delta_text)
        prefix_ids, full_ids = self.encode(prefix), self.encode(full)
        if prefix_ids + delta != full_ids:
            at = first_difference(prefix_ids + delta, full_ids)
            raise ChatTemplateError(
                "the chat template is not prefix-preserving for this conversation's tokens: the new "
                f"messages' text {delta_text[:60]!r} tokenised apart gives other ids than the whole "
                f"conversation from token {at} (the earlier text is {len(prefix_ids)} tokens): "
                f"{(prefix_ids + delta)[at : at + 6]} vs {full_ids[at : at + 6]} (a merge across the "
                "boundary: templates that end each message with a special token avoid it)"
            )
        return delta, Conversation((*history, *messages), conversation.ids + tuple(delta), full)
