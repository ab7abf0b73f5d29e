"""Type aliases shared by the package (read by the type checker; nothing here runs any math)."""

from __future__ import annotations

from typing import TypeAlias

import jax

Scalar: TypeAlias = float | jax.Array
"""A number that may be traced. Hyper-parameters are data (they live in the train state as
float32 scalars, see docs/design.md), so a function that reads one (``clip_eps``, ``gamma``,
``temperature``, ...) gets a Python number when called eagerly and a traced ``jax.Array`` inside a
jitted step. ``int`` is accepted wherever ``float`` is."""
