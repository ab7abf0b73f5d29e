"""A style reward from a frozen sentence encoder, and the bridge from the policy's tokens to it.

The reward of a response ``y`` is how much closer its sentence embedding lies to a *target*
description of the style than to a *contrast* description::

    r(y) = cos(e(y), e(target)) - cos(e(y), e(contrast)),       r in [-2, 2]

with ``e`` a sentence-transformers encoder (all-MiniLM-L6-v2: BERT, mean pooling, L2 norm;
`jaxrlhf.models.bert`), e.g. target "a cheerful, positive, happy reply" and contrast "a gloomy, sad,
negative reply". The encoder is frozen and knows nothing about fluency, so an unconstrained policy
can "hack" it: a string of happy words scores higher than any sensible reply.

**The re-tokenization bridge.** The policy (SmolLM2: byte-level BPE, 49152 tokens) and the encoder
(BERT WordPiece, 30522 tokens, lower-cased) do not share a vocabulary, and there is no token-to-token
map between them: WordPiece splits depend on word boundaries and on the characters around a token,
so one BPE token can become zero, one or several word pieces depending on its neighbours. The
exact bridge is text, done on the host between rollout and scoring (the trainer's `TextReward`
path):

    policy ids --tokenizer.decode--> text --MiniLM tokenizer (pad to a fixed length)--> ids'
    ids' --jitted encoder.embed (on device)--> e(y) --> r(y)

The texts are padded to ``max_length`` word pieces (truncating longer ones), so the jitted encoder
compiles once. Its cost per batch is measured by `bridge_timings` (see docs/steer_smollm.md: about
a millisecond of tokenizer work for 8 responses of 32 tokens, against seconds for the rollout).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.models.bert import BertEncoder, l2_normalize, load_bert_encoder
from jaxrlhf.training.rewards import decode_responses

__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_CONTRAST",
    "StyleReward",
    "cosine_style_reward",
    "decode_responses",
    "distinct_n",
]

DEFAULT_TARGET = "a cheerful, positive, happy reply"
DEFAULT_CONTRAST = "a gloomy, sad, negative reply"


def cosine_style_reward(encoder: BertEncoder, params, input_ids, attention_mask, target_emb, contrast_emb):
    """Reward ``cos(e, target) - cos(e, contrast)`` per row, e = ``encoder.embed(...)``  -> ``[B]``.

    ``target_emb`` / ``contrast_emb`` are ``[D]`` (one for the batch) or ``[B, D]`` (one per row);
    they need not be normalised. The reward lies in [-2, 2].
    """
    response = encoder.embed(params, input_ids, attention_mask)  # unit rows unless normalize=False

    def cosine(other):
        return (l2_normalize(response) * l2_normalize(jnp.asarray(other, jnp.float32))).sum(axis=-1)

    return cosine(target_emb) - cosine(contrast_emb)


def distinct_n(token_lists: Sequence[Sequence[Any]], n: int) -> float:
    """distinct-n (Li et al., 2016): number of distinct n-grams / number of n-grams, over all
    sequences together (0.0 when there is no n-gram). Low values mean repetition."""
    total, seen = 0, set()
    for tokens in token_lists:
        tokens = list(tokens)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


@dataclasses.dataclass(eq=False)
class StyleReward:
    """``r(y) = cos(e(y), e(target)) - cos(e(y), e(contrast))`` on texts, with a jitted encoder.

    Call it as a `jaxrlhf.training.TextReward` function: ``reward(prompts, responses) -> [B]`` floats
    (the prompts are ignored: the style is judged on the response alone).

    Args:
      encoder: a `BertEncoder` with a tokenizer (``load_bert_encoder(path)``).
      target, contrast: the two style descriptions.
      max_length: responses are tokenized for the encoder to exactly this many word pieces
        (padded; truncated if longer), so the jitted encoder compiles once.
    """

    encoder: BertEncoder
    target: str = DEFAULT_TARGET
    contrast: str = DEFAULT_CONTRAST
    max_length: int = 64

    def __post_init__(self):
        if self.encoder.tokenizer is None:
            raise ValueError("the encoder has no tokenizer: the style reward needs one to re-tokenize text")
        encoder = self.encoder
        self._embed = jax.jit(lambda params, ids, mask: encoder.embed(params, ids, mask))
        self._score = jax.jit(
            lambda params, ids, mask, target, contrast: cosine_style_reward(
                encoder, params, ids, mask, target, contrast
            )
        )
        self.target_emb, self.contrast_emb = self.embed_texts([self.target, self.contrast])

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> StyleReward:
        """Loads the encoder from a local sentence-transformers / HF BERT directory."""
        return cls(load_bert_encoder(path), **kwargs)

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> encoder ids and mask, ``[B, max_length]`` int32 (the host half of the bridge)."""
        enc = self.encoder.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="np"
        )
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Unit sentence embeddings ``[B, D]`` (float32, NumPy)."""
        ids, mask = self.tokenize(texts)
        return np.asarray(self._embed(self.encoder.params, ids, mask))

    def score_texts(self, texts: Sequence[str]) -> np.ndarray:
        """``r(y)`` per text, ``[B]`` float32."""
        ids, mask = self.tokenize(texts)
        return np.asarray(self._score(self.encoder.params, ids, mask, self.target_emb, self.contrast_emb))

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        del prompts
        return self.score_texts(responses)

    def score_tokens(self, policy_tokenizer, response_ids, response_mask) -> np.ndarray:
        """The whole bridge: policy token ids ``[B, N]`` -> text -> encoder tokens -> ``r(y)``."""
        return self.score_texts(decode_responses(policy_tokenizer, response_ids, response_mask))

    def bridge_timings(self, policy_tokenizer, response_ids, response_mask, repeats: int = 5) -> dict[str, float]:
        """Median seconds per batch of each stage of the bridge (after a warm-up call):
        ``decode`` (policy ids -> text), ``tokenize`` (text -> encoder ids), ``encode`` (jitted
        encoder + cosines, on device)."""
        self.score_tokens(policy_tokenizer, response_ids, response_mask)  # compile
        times: dict[str, list[float]] = {"decode": [], "tokenize": [], "encode": []}
        for _ in range(repeats):
            t0 = time.perf_counter()
            texts = decode_responses(policy_tokenizer, response_ids, response_mask)
            t1 = time.perf_counter()
            ids, mask = self.tokenize(texts)
            t2 = time.perf_counter()
            jax.block_until_ready(self._score(self.encoder.params, ids, mask, self.target_emb, self.contrast_emb))
            t3 = time.perf_counter()
            times["decode"].append(t1 - t0)
            times["tokenize"].append(t2 - t1)
            times["encode"].append(t3 - t2)
        return {k: float(np.median(v)) for k, v in times.items()}
