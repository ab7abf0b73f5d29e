"""Parameter shardings for a (data, fsdp) device mesh, from a table of path rules.

Layout (FSDP / ZeRO-3 style): every parameter is replicated over `data` and, when large enough,
split along one dimension over `fsdp`; the batch is split over both axes. Under `jax.jit`, GSPMD
inserts the all-gathers of parameter shards and the reduce-scatters of their gradients.

A rule is `(regex, action)`; the first regex that `re.search`es the parameter's path
(`"/".join(keys)`, e.g. `"layer_0/attn/q/kernel"`) decides:

- `LARGEST`: shard the largest dimension that the fsdp axis size divides (ties: the first);
- `REPLICATE` (or `PartitionSpec()`): keep a full copy on every device;
- a `PartitionSpec`: used as given, where the name `FSDP` stands for `fsdp_axis`.

Any result that does not divide the parameter's shape falls back to replication, as does a tensor
with fewer than `min_size` elements or no matching rule: a sharding choice never makes a model fail.

Scanned models (`ModelConfig.scan_layers`) keep their blocks stacked under `layers/` with a leading
layer axis (`"layers/attn/q/kernel"`, `[num_layers, D, H*E]`). The rules see the per-layer shape
(`shape[1:]`) and the spec gets a `None` in front: the layer axis is never split, so every block
is sharded exactly as in the unscanned model.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

STACKED_LAYERS = r"(^|/)layers/"  # paths of a scanned model's stacked blocks (leading layer axis)
FSDP = "fsdp"  # placeholder axis name in rule specs, replaced by `fsdp_axis`
LARGEST = "largest"
REPLICATE = "replicate"

# Norm scales/biases and all biases are small: replicate. Every kernel, embedding and the LM head
# is split along its largest dimension (vocab for embeddings, the wide side of MLP kernels).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    (r"norm/(scale|bias)$", REPLICATE),
    (r"(^|/)bias$", REPLICATE),
    (r"(^|/)(kernel|embedding|lm_head)$", LARGEST),
    (r".*", REPLICATE),
)


def make_mesh(data: int = 1, fsdp: int = -1, devices: Sequence[jax.Device] | None = None,
              data_axis: str = "data", fsdp_axis: str = FSDP) -> Mesh:
    """A 2-D `(data, fsdp)` mesh; `-1` on one axis takes all remaining devices.

    The axes are `AxisType.Auto`, passed explicitly: with Auto axes a jitted function only needs
    its inputs placed (`shard_params`, a batch sharding) and GSPMD propagates shardings through
    the whole computation, as the trainer and the sampler expect. `AxisType.Explicit` would instead
    make sharding part of every array's type (sharding-in-types), requiring `out_sharding`
    annotations on ops whose result sharding is ambiguous; the model code is not written for that.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("at most one mesh axis may be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not use the {n} devices exactly")
    return jax.make_mesh((data, fsdp), (data_axis, fsdp_axis), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def _path_str(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _divides(spec: PartitionSpec, shape: tuple[int, ...], axis_sizes: dict[str, int]) -> bool:
    if len(spec) > len(shape):
        return False
    for dim, entry in zip(shape, spec):
        if entry is None:
            continue
        names = entry if isinstance(entry, tuple) else (entry,)
        size = math.prod(axis_sizes.get(name, 0) for name in names)
        if size == 0 or dim % size:
            return False
    return True


def spec_for(path: str, shape: tuple[int, ...], rules=DEFAULT_RULES, fsdp_axis: str = FSDP,
             fsdp_size: int = 1, axis_sizes: dict[str, int] | None = None, min_size: int = 0) -> PartitionSpec:
    """The `PartitionSpec` the first matching rule gives one parameter (see the module docstring)."""
    axis_sizes = dict(axis_sizes or {})
    axis_sizes.setdefault(fsdp_axis, fsdp_size)
    if int(np.prod(shape, dtype=np.int64)) < min_size or len(shape) == 0:
        return PartitionSpec()
    for pattern, action in rules:
        if not re.search(pattern, path):
            continue
        if isinstance(action, str) and action == REPLICATE:
            return PartitionSpec()
        if isinstance(action, str) and action == LARGEST:
            n = axis_sizes[fsdp_axis]
            order = sorted(range(len(shape)), key=lambda d: (-shape[d], d))
            for d in order:
                if shape[d] % n == 0 and n > 1:
                    return PartitionSpec(*[fsdp_axis if i == d else None for i in range(len(shape))])
            return PartitionSpec()
        if isinstance(action, PartitionSpec):
            spec = PartitionSpec(*[_rename(e, fsdp_axis) for e in action])
            return spec if _divides(spec, shape, axis_sizes) else PartitionSpec()
        raise ValueError(f"rule {pattern!r}: action must be LARGEST, REPLICATE or a PartitionSpec, got {action!r}")
    return PartitionSpec()


def _rename(entry, fsdp_axis):
    if isinstance(entry, tuple):
        return tuple(fsdp_axis if e == FSDP else e for e in entry)
    return fsdp_axis if entry == FSDP else entry


def param_partition_specs(params, rules=DEFAULT_RULES, fsdp_axis: str = FSDP, mesh: Mesh | None = None,
                          min_size: int = 0):
    """A pytree of `PartitionSpec`s, one per parameter, from `rules`.

    Args:
      params: parameter pytree (arrays or `jax.ShapeDtypeStruct`s).
      rules: `(regex, action)` pairs, first match wins.
      fsdp_axis: the mesh axis parameters are split over.
      mesh: gives the axis sizes that must divide the sharded dimensions; default: all devices on
        the fsdp axis (the mesh `make_mesh()` builds).
      min_size: tensors with fewer elements are replicated (sharding tiny tensors only adds
        communication); for stacked blocks the count is per layer.
    """
    if mesh is not None:
        axis_sizes = dict(mesh.shape)
        if fsdp_axis not in axis_sizes:
            raise ValueError(f"mesh axes {tuple(axis_sizes)} have no {fsdp_axis!r} axis")
    else:
        axis_sizes = {fsdp_axis: jax.device_count()}

    def one(path, p):
        name, shape = _path_str(path), tuple(p.shape)
        if re.search(STACKED_LAYERS, name) and len(shape) >= 1:
            inner = spec_for(name, shape[1:], rules, fsdp_axis, axis_sizes=axis_sizes, min_size=min_size)
            return PartitionSpec(None, *inner) if len(inner) else PartitionSpec()
        return spec_for(name, shape, rules, fsdp_axis, axis_sizes=axis_sizes, min_size=min_size)

    return jax.tree_util.tree_map_with_path(one, params)


def shard_params(params, mesh: Mesh, specs=None):
    """Places every parameter on `mesh` with `NamedSharding(mesh, spec)` (specs default to the rules)."""
    if specs is None:
        specs = param_partition_specs(params, mesh=mesh)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda x: isinstance(x, PartitionSpec))
    return jax.device_put(params, shardings)


def batch_sharding(mesh: Mesh, data_axis: str = "data", fsdp_axis: str = FSDP) -> NamedSharding:
    """Sharding of a `[batch, ...]` array: the batch split over both mesh axes (FSDP layout)."""
    return NamedSharding(mesh, PartitionSpec((data_axis, fsdp_axis)))


__all__ = [
    "DEFAULT_RULES",
    "FSDP",
    "LARGEST",
    "REPLICATE",
    "STACKED_LAYERS",
    "batch_sharding",
    "make_mesh",
    "param_partition_specs",
    "shard_params",
    "spec_for",
]
