"""Backend tuning: the speed-only choices of decoding, in one explicit, frozen object.

Some ways of computing the same numbers are faster on one backend and slower on another. They are
collected in `Tuning`, chosen once where the program is built (`Tuning.for_backend`), and handed
down explicitly: the model reads its fields (`LanguageModel.tuning`), and every jitted program
that samples (`make_sampler`, the PPO trainer's rollout and fused step, sweeps) compiles with
the `compiler_options` chosen for it (a program that also trains gets none, see `for_backend`).
Nothing below the top asks `jax.default_backend()`. No choice changes
a result beyond floating-point rounding.

Fields:

- `decode_attention`: how a one-token decoding query attends with grouped-query attention
  (G = H / K > 1 query heads per key/value head). `"grouped"`: one `[G, E] x [E, S]` product per
  key/value head, reading the cache once. `"per_head"`: G matrix-vector products, one per group
  member, reading the cache G times. XLA:CPU runs the grouped product far slower (Llama-shaped,
  G = 3: 3.2 -> 1.8 ms per layer at batch 64, +13 % tokens/s with `"per_head"`); accelerators are
  bandwidth-bound there and keep `"grouped"`.
- `decode_head`: the output layer of a model with tied embeddings while decoding. `"tied"`:
  multiply by the `[V, D]` embedding table. `"transposed"`: `generate` makes a `[D, V]` copy once
  per call, outside its loop; XLA:CPU multiplies a few rows by that layout 1.2-2.4x faster (GPT-2
  124M, batch 16: 26 vs 63 ms per step for the output layer). Accelerators read either layout at
  the same speed, and the copy would cost a vocabulary-sized buffer.
- `compiler_options`: XLA options for `jax.jit(..., compiler_options=...)`, as sorted
  `(name, value)` pairs (a dict is accepted and converted, so a `Tuning` stays hashable and can be
  a static argument). On CPU the rule of `for_backend` may turn XLA:CPU's YNNPACK dot fusions off
  (`xla_cpu_experimental_ynn_fusion_type=""`), see `for_backend` and docs/performance.md.

`Tuning()` is the portable choice (what an accelerator gets).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

DECODE_ATTENTION = ("grouped", "per_head")
DECODE_HEAD = ("tied", "transposed")

# XLA:CPU without YNNPACK dot fusions: its default (Eigen) kernels are faster for the skinny
# products of decoding a mid-sized model at a small batch (measured, docs/performance.md).
NO_YNN_FUSIONS = (("xla_cpu_experimental_ynn_fusion_type", ""),)

# The `for_backend` rule on CPU: YNNPACK fusions off when a decoding step multiplies at most this
# many rows per device by weight matrices at least this wide (see docs/performance.md).
CPU_NO_YNN_MAX_ROWS = 32
CPU_NO_YNN_MIN_WIDTH = 512


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Speed-only choices for one backend (see the module docstring for each field).

    Attributes:
      decode_attention: `"grouped"` or `"per_head"` (one-token grouped-query attention).
      decode_head: `"tied"` or `"transposed"` (tied output layer while decoding).
      compiler_options: XLA compile options, sorted `(name, value)` pairs (a dict is accepted).
    """

    decode_attention: str = "grouped"
    decode_head: str = "tied"
    compiler_options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"decode_attention must be one of {DECODE_ATTENTION}, got {self.decode_attention!r}")
        if self.decode_head not in DECODE_HEAD:
            raise ValueError(f"decode_head must be one of {DECODE_HEAD}, got {self.decode_head!r}")
        options = self.compiler_options
        pairs = options.items() if isinstance(options, Mapping) else options
        try:
            pairs = tuple(sorted((str(name), str(value)) for name, value in pairs))
        except (TypeError, ValueError):
            raise ValueError(f"compiler_options must be a dict or (name, value) pairs, got {options!r}") from None
        object.__setattr__(self, "compiler_options", pairs)  # frozen: normalise once, here

    @property
    def jit_compiler_options(self) -> dict[str, str] | None:
        """`compiler_options` as the dict `jax.jit` takes (None when there are none)."""
        return dict(self.compiler_options) or None

    def jit(self, fn: Callable, **jit_kwargs) -> Callable:
        """`jax.jit(fn, compiler_options=self.jit_compiler_options, **jit_kwargs)`."""
        return jax.jit(fn, compiler_options=self.jit_compiler_options, **jit_kwargs)

    def replace(self, **changes) -> Tuning:
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_backend(
        cls,
        backend: str | None = None,
        *,
        rows_per_device: int | None = None,
        width: int | None = None,
        trains: bool = False,
    ) -> Tuning:
        """The tuning of `backend` (default: `jax.default_backend()`) for a decoding shape.

        Args:
          backend: `"cpu"`, `"gpu"`, `"tpu"`, ...; anything but `"cpu"` gets `Tuning()`.
          rows_per_device: rows each device feeds through a decoding step (the sampling batch
            divided by the devices it is split over); None: unknown.
          width: the model's hidden size (the narrow side of its weight matrices); None: unknown.
          trains: the program also trains (the fused PPO step: forward and backward passes over
            `B x T` rows in the same program as the rollout); it gets no compiler options.

        On CPU: `decode_attention="per_head"`, `decode_head="transposed"`, and YNNPACK dot fusions
        off (`NO_YNN_FUSIONS`) when `rows_per_device <= CPU_NO_YNN_MAX_ROWS` and
        `width >= CPU_NO_YNN_MIN_WIDTH`, i.e. a mid-sized model decoded at a small batch, the case
        where they are measured slower (docs/performance.md "Backend tuning"); an unknown shape
        keeps them, and so does a program that `trains` (a fused PPO step of a width-768 policy at
        batch 16 ran 0.81x as fast without them). The options are also dropped when this XLA build
        does not accept them (`compiler_options_supported`).
        """
        backend = jax.default_backend() if backend is None else backend
        if backend != "cpu":
            return cls()
        skinny = (
            not trains
            and rows_per_device is not None
            and width is not None
            and rows_per_device <= CPU_NO_YNN_MAX_ROWS
            and width >= CPU_NO_YNN_MIN_WIDTH
        )
        options = NO_YNN_FUSIONS if skinny and compiler_options_supported(NO_YNN_FUSIONS, backend) else ()
        return cls(decode_attention="per_head", decode_head="transposed", compiler_options=options)


@functools.cache
def compiler_options_supported(options: tuple[tuple[str, str], ...], backend: str | None = None) -> bool:
    """Whether this XLA build compiles a program with `options` (checked once per options and backend).

    Compiles `x + 1` with the options: XLA rejects an option it does not know with a
    `jax.errors.JaxRuntimeError` (INVALID_ARGUMENT), and nothing else can fail in so small a
    program, so that type alone decides. A backend other than the default one can not be checked
    this way and is assumed to accept them.
    """
    if not options:
        return True
    if backend is not None and backend != jax.default_backend():
        return True
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(jnp.zeros((), jnp.float32)).compile()
    except jax.errors.JaxRuntimeError:
        return False
    return True


def resolve_tuning(
    tuning: Tuning | str | None, *, rows_per_device: int | None = None, width: int | None = None, trains: bool = False
) -> Tuning:
    """A `Tuning` from what a sampler or trainer was given: `"auto"` picks `Tuning.for_backend` for
    the shape hints, None is `Tuning()` (portable, no compiler options), a `Tuning` is kept."""
    if isinstance(tuning, Tuning):
        return tuning
    if tuning is None:
        return Tuning()
    if tuning == "auto":
        return Tuning.for_backend(rows_per_device=rows_per_device, width=width, trains=trains)
    raise ValueError(f"tuning must be a Tuning, 'auto' or None, got {tuning!r}")


def model_width(model: Any) -> int | None:
    """`model.config.hidden_size` when the model has one (the `width` hint of `for_backend`)."""
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    return int(width) if isinstance(width, int) else None


__all__ = [
    "CPU_NO_YNN_MAX_ROWS",
    "CPU_NO_YNN_MIN_WIDTH",
    "DECODE_ATTENTION",
    "DECODE_HEAD",
    "NO_YNN_FUSIONS",
    "Tuning",
    "compiler_options_supported",
    "model_width",
    "resolve_tuning",
]
