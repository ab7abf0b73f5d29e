"""Character-level Hugging Face tokenizers, built offline.

For toy tasks (random walks on a graph, arithmetic, ...) a model from scratch wants one token per
character and nothing else. ``char_tokenizer`` builds that with the ``tokenizers`` library and wraps
it in a ``transformers.PreTrainedTokenizerFast``, so it travels with a checkpoint: ``save_pretrained``
writes ``tokenizer.json`` + ``tokenizer_config.json`` and ``AutoTokenizer.from_pretrained`` reads the
same tokenizer back, with no download.

Vocabulary layout (ids): the special tokens first, in the order pad, bos, eos, unk, then ``chars``
in the given order. With the defaults and ``chars="abc"``::

    <pad>=0 <bos>=1 <eos>=2 <unk>=3 a=4 b=5 c=6

Encoding splits the text into single characters (special tokens written in the text, such as
``"<eos>"``, stay whole); a character not in ``chars`` becomes ``<unk>``. Decoding concatenates the
tokens without separators, so ``decode(encode(text)) == text`` for text over ``chars``.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["char_tokenizer"]

# Named so it does not hide the `tokenizers` package for code that does `from jaxrlhf import tokenizers`.


def char_tokenizer(
    chars: Iterable[str],
    *,
    pad_token: str = "<pad>",
    bos_token: str = "<bos>",
    eos_token: str = "<eos>",
    unk_token: str = "<unk>",
    add_bos: bool = False,
    add_eos: bool = False,
    padding_side: str = "left",
    model_max_length: int | None = None,
):
    """A character-level ``transformers.PreTrainedTokenizerFast``.

    Args:
      chars: the ordinary characters, one token each, in id order (after the special tokens).
        Duplicates and multi-character strings are errors.
      pad_token, bos_token, eos_token, unk_token: the special tokens (ids 0, 1, 2, 3).
      add_bos: prepend ``bos_token`` to every encoded text (``tokenizer("b") -> [bos, b]``).
      add_eos: append ``eos_token`` to every encoded text.
      padding_side: where ``tokenizer(..., padding=True)`` pads; ``"left"`` suits prompts for
        generation.
      model_max_length: optional length limit recorded in the tokenizer config.

    Returns:
      A ``PreTrainedTokenizerFast``; ``save_pretrained`` / ``AutoTokenizer.from_pretrained``
      round-trip it.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(chars)
    for c in chars:
        if not isinstance(c, str) or len(c) != 1:
            raise ValueError(f"char_tokenizer: every entry of chars must be one character, got {c!r}")
    if len(set(chars)) != len(chars):
        raise ValueError(f"char_tokenizer: duplicate characters in {''.join(chars)!r}")
    specials = [pad_token, bos_token, eos_token, unk_token]
    if len(set(specials)) != 4 or set(specials) & set(chars):
        raise ValueError(f"char_tokenizer: special tokens {specials} must be distinct and not in chars")

    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    # Every character is its own piece ("isolated" keeps each match as a separate piece).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join the tokens without spaces
    backend.add_special_tokens(specials)  # matched whole in text, skipped by skip_special_tokens

    single = " ".join(([f"{bos_token}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos_token}:0"] if add_eos else []))
    pair = " ".join(
        ([f"{bos_token}:0"] if add_bos else []) + ["$A:0", "$B:1"] + ([f"{eos_token}:1"] if add_eos else [])
    )
    backend.post_processor = processors.TemplateProcessing(
        single=single,
        pair=pair,
        special_tokens=[(bos_token, vocab[bos_token]), (eos_token, vocab[eos_token])],
    )

    kwargs = {}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad_token,
        bos_token=bos_token,
        eos_token=eos_token,
        unk_token=unk_token,
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
