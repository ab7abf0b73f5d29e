"""The one check that a batch fits a model's learned position table.

A model with learned positions (GPT-2's ``wpe``: ``ModelConfig.positions == "learned"``) has
``max_position_embeddings = M`` rows in its table, for positions ``0 .. M - 1``. Positions come from
the attention mask (``cumsum(mask) - 1``, docs/models.md), so a row with ``n`` real tokens uses
positions up to ``n - 1`` and needs ``n <= M``. Inside a compiled program a position past the
table cannot raise: the lookup clamps it to the last row (`transformer.Transformer`), and every
token past ``M`` would silently share one position. So the length is checked before any work,
wherever the values are known:

- every trainer and evaluation entry point (PPO's `train` / `train_sweep`, `train_preference`,
  `train_sft`, the experiments' reward-model training) calls `check_positions` on its whole data
  set before it builds anything;
- `LanguageModel.forward` / `apply` call it when the attention mask is concrete (NumPy, a list, a
  jax array outside a trace). A traced mask (inside ``jax.jit``, ``grad``, ``vmap``, ``scan``) is
  not read: the check costs nothing in compiled code, and a traced call past the table is not
  caught there (check the data first, as the trainers do).

Rotary models (Llama family) have no table: a position past ``M`` is computed as ``transformers``
computes it, so they are not refused here. (PPO's prompt check, `jaxrlhf.sampling.check_prompts`,
also holds rotary models to ``M``, the length they were configured for.)
"""

from __future__ import annotations

from typing import Any

import jax.core  # `jax.core.Tracer`, named explicitly for the type checker
import numpy as np

__all__ = ["check_positions", "learned_position_limit"]


def learned_position_limit(model: Any) -> int | None:
    """``M`` of a model with a learned position table, None for any other model.

    ``model``: a `LanguageModel`, `Pretrained`, `ValueModel`, `ModelConfig`, or a bound method of one
    (``model.apply``), i.e. anything with a ``config`` (or that is one) whose ``positions`` is
    ``"learned"``."""
    owner = getattr(model, "__self__", model)  # model.apply -> model
    config = getattr(owner, "config", owner)
    if getattr(config, "positions", None) != "learned":
        return None
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, (int, np.integer)) and not isinstance(limit, bool) else None


def concrete_or_none(value) -> np.ndarray | None:
    """A NumPy copy of a concrete value; None for a tracer (or an array not readable on this host)."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value)
    except Exception:  # e.g. a jax.Array that is not fully addressable from this process
        return None


def check_positions(
    model: Any,
    attention_mask: Any = None,
    *,
    lengths: Any = None,
    positions: Any = None,
    extra_positions: int = 0,
    where: str = "apply",
    what: str = "sequence",
) -> None:
    """Raise ValueError when a row needs positions past ``model``'s learned position table.

    Args:
      model: see `learned_position_limit`; a model without a learned table passes unchecked.
      attention_mask: ``[B, L]`` 0/1 (or bool); a row's length is its number of ones. A traced mask
        is not checked (nothing is read inside a trace).
      lengths: ``[B]`` row lengths instead of a mask (e.g. prompt + longest response).
      positions: ``[B, L]`` explicit positions instead of a mask (a row needs ``max + 1``).
      extra_positions: tokens each row will still get (a generation budget) on top of its length.
      where, what: the entry point and the kind of row, for the message.
    """
    limit = learned_position_limit(model)
    if limit is None:
        return
    if lengths is None and positions is not None:
        explicit = concrete_or_none(positions)
        if explicit is None or explicit.ndim != 2 or explicit.size == 0:
            return
        lengths = explicit.max(axis=1) + 1
    if lengths is None:
        mask = concrete_or_none(attention_mask)
        if mask is None or mask.ndim != 2:
            return
        lengths = (mask != 0).sum(axis=1)
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lengths.size == 0:
        return
    row = int(np.argmax(lengths))
    need = int(lengths[row]) + int(extra_positions)
    if need > limit:
        budget = f" plus {extra_positions} new tokens" if extra_positions else ""
        raise ValueError(
            f"{where}: {what} row {row} has {int(lengths[row])} tokens{budget} and needs {need} positions, "
            f"more than the model's max_position_embeddings={limit} (a learned position table: every "
            f"position past it would silently reuse its last entry): shorten the {what}s, or use a "
            f"model with a longer table"
        )
