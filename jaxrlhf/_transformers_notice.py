"""Quiets one notice of `transformers` that says nothing to a jaxrlhf user.

jaxrlhf uses `transformers` for tokenizers and config files only, never its PyTorch models (the
models are Flax, and ``pip install -e .`` brings no torch). Without torch, transformers logs at
import "PyTorch was not found. Models won't be available and only tokenizers, configuration and
file/data utilities can be used." in every script. The filter below, on the "transformers" logger,
drops that one record; every other warning of transformers is left as it is. It is installed when
`jaxrlhf` is imported, before any of its modules imports transformers (they all do so lazily).
"""

from __future__ import annotations

import logging

NOTICE = "PyTorch was not found."


def drop_no_torch_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(NOTICE)


if drop_no_torch_notice not in logging.getLogger("transformers").filters:
    logging.getLogger("transformers").addFilter(drop_no_torch_notice)
