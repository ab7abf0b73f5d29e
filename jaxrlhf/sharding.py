"""Device meshes and shardings: one mesh constructor, one batch sharding, parameter rules, multi-host.

Every jitted program in jaxrlhf is written for one device holding the whole batch; a mesh only
says where the arrays live, and GSPMD (`jax.jit` + `NamedSharding`) inserts the collectives. So
batch means inside a step (masked means, whitening, token-mean losses) are already global and the
core functions run with `axis_name=None`.

Mesh axes (`make_mesh`), in this order:

- `"runs"` (only in a sweep's mesh): the run axis of a sweep's stacked state is split over it
  (`jax.vmap(..., spmd_axis_name="runs")`, see `jaxrlhf.training.sweep`);
- `"data"`: the batch is split over it, parameters are replicated along it;
- `"fsdp"`: the batch is split over it too, and parameters (with the optimizer moments that mirror
  them) are split along one dimension over it (FSDP / ZeRO-3); with one device on it every
  parameter is replicated.

`batch_sharding(mesh)` splits an array's batch axis over `("data", "fsdp")` together.

Parameter rules. A rule is `(regex, action)`; the first regex that `re.search`es the parameter's
path (`keystr(path, simple=True, separator="/")`, e.g. `"layer_0/attn/q/kernel"`) decides:

- `LARGEST`: shard the largest dimension that the fsdp axis size divides (ties: the first);
- `REPLICATE` (or `PartitionSpec()`): keep a full copy on every device;
- a `PartitionSpec`: used as given, where the name `FSDP` stands for `fsdp_axis`.

Any result that does not divide the parameter's shape falls back to replication, as does a tensor
with fewer than `min_size` elements or no matching rule: a sharding choice never makes a model fail.
Scanned models (`ModelConfig.scan_layers`) keep their blocks stacked under `layers/` with a leading
layer axis (`"layers/attn/q/kernel"`, `[num_layers, D, H*E]`). The rules see the per-layer shape
(`shape[1:]`) and the spec gets a `None` in front: the layer axis is never split, so every block
is sharded exactly as in the unscanned model.

Multi-host: call `initialize_distributed` in every process first, then build the same mesh
everywhere (`jax.devices()` lists all processes' devices). Every process runs the same program on
the same global arrays; `global_array` builds them from host data that every process holds, and
`to_host` fetches results back to every process.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

RUNS = "runs"
DATA = "data"
FSDP = "fsdp"  # also the placeholder axis name in rule specs, replaced by `fsdp_axis`
BATCH_AXES = (DATA, FSDP)  # the mesh axes a batch dimension is split over (those the mesh has)

STACKED_LAYERS = r"(^|/)layers/"  # paths of a scanned model's stacked blocks (leading layer axis)
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


# ----------------------------------------------------------------------------------------------
# Meshes


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    *,
    runs: int | None = None,
    # jax exports `Device` as an assigned alias of jaxlib's class, which pyright rejects as a type.
    devices: Sequence[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm]
) -> Mesh:
    """A `(data, fsdp)` mesh, or `(runs, data, fsdp)` with `runs`; `-1` on one axis takes the rest.

    `make_mesh()` is plain data parallelism over all devices; `make_mesh(data=2, fsdp=4)` splits
    parameters 4 ways; `make_mesh(runs=4, data=2)` is a sweep's mesh (runs over 4 device groups,
    each run's batch over 2 devices). The axis sizes must use the devices exactly: for fewer, pass
    them (`devices=jax.devices()[:n]`).

    The axes are `AxisType.Auto`, passed deliberately: a jitted function then only needs its inputs
    placed (`param_shardings`, `batch_sharding`) and GSPMD propagates shardings through the whole
    computation, as the trainer and the sampler expect. `AxisType.Explicit` would make sharding
    part of every array's type (sharding-in-types), requiring `out_sharding` annotations on ops
    whose result sharding is ambiguous; the model code is not written for that.
    """
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = (DATA, FSDP), [data, fsdp]
    if runs is not None:
        names, sizes = (RUNS,) + names, [runs] + sizes
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(names, sizes))}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        sizes[sizes.index(-1)] = len(devices) // known if known > 0 else 0
    if any(s < 1 for s in sizes) or math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {' x '.join(f'{n}={s}' for n, s in zip(names, sizes))} does not use the "
            f"{len(devices)} devices exactly (pass devices=jax.devices()[:n] for fewer)"
        )
    return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch dimension is split over: those of `BATCH_AXES` the mesh has."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_size_divisor(mesh: Mesh) -> int:
    """How many shards a batch is split into: a batch size must be a multiple of it."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh, batch_dim: int = 0) -> NamedSharding:
    """Sharding of an array whose axis `batch_dim` is the batch: split over `batch_axes(mesh)`."""
    axes = batch_axes(mesh)
    if not axes:
        raise ValueError(
            f"mesh axes {mesh.axis_names} have none of the batch axes {BATCH_AXES}: build it with make_mesh"
        )
    return NamedSharding(mesh, PartitionSpec(*([None] * batch_dim), axes))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


# ----------------------------------------------------------------------------------------------
# Parameters


def path_str(path) -> str:
    """A pytree key path as the rules see it: `"layer_0/attn/q/kernel"`."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


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


def _rename(entry, fsdp_axis):
    if isinstance(entry, tuple):
        return tuple(fsdp_axis if e == FSDP else e for e in entry)
    return fsdp_axis if entry == FSDP else entry


def spec_for(
    path: str,
    shape: tuple[int, ...],
    rules=DEFAULT_RULES,
    fsdp_axis: str = FSDP,
    fsdp_size: int = 1,
    axis_sizes: dict[str, int] | None = None,
    min_size: int = 0,
) -> PartitionSpec:
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


def param_partition_specs(
    params, rules=DEFAULT_RULES, fsdp_axis: str = FSDP, mesh: Mesh | None = None, min_size: int = 0
):
    """A pytree of `PartitionSpec`s, one per parameter, from `rules`.

    Args:
      params: parameter pytree (arrays or `jax.ShapeDtypeStruct`s).
      rules: `(regex, action)` pairs, first match wins.
      fsdp_axis: the mesh axis parameters are split over.
      mesh: gives the axis sizes that must divide the sharded dimensions; default: all devices on
        the fsdp axis.
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
        name, shape = path_str(path), tuple(p.shape)
        if re.search(STACKED_LAYERS, name) and len(shape) >= 1:
            inner = spec_for(name, shape[1:], rules, fsdp_axis, axis_sizes=axis_sizes, min_size=min_size)
            return PartitionSpec(None, *inner) if len(inner) else PartitionSpec()
        return spec_for(name, shape, rules, fsdp_axis, axis_sizes=axis_sizes, min_size=min_size)

    return jax.tree_util.tree_map_with_path(one, params)


def param_shardings(params, mesh: Mesh, rules=DEFAULT_RULES, min_size: int = 0):
    """`NamedSharding`s of a parameter pytree: the FSDP `rules` over the mesh's `"fsdp"` axis, or
    replicated everywhere when the mesh has none."""
    if FSDP not in mesh.axis_names:
        return jax.tree.map(lambda _: replicated(mesh), params)
    specs = param_partition_specs(params, rules, FSDP, mesh=mesh, min_size=min_size)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_params(params, mesh: Mesh, specs=None):
    """Places every parameter on `mesh`: by `specs` (a pytree of `PartitionSpec`s) when given, else
    by `param_shardings`."""
    if specs is None:
        return jax.device_put(params, param_shardings(params, mesh))
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return jax.device_put(params, shardings)


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_opt_state, params_shardings, mesh: Mesh):
    """Optimizer moments shard like the parameters they mirror; counters are replicated."""
    is_sharding = lambda x: isinstance(x, NamedSharding)  # noqa: E731
    return optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_opt_state,
        params_shardings,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=is_sharding,
    )


# ----------------------------------------------------------------------------------------------
# Processes and host data


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None, **kwargs
) -> None:
    """`jax.distributed.initialize`, with CPU collectives over gloo (needed by multi-process CPU runs).

    Call once per process before any other JAX call; arguments as in `jax.distributed.initialize`
    (all None on a managed cluster such as SLURM or Cloud TPU, which fill them in).
    """
    # jax.config's flags are attributes set at run time, unknown to the type checker.
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):  # pyright: ignore[reportAttributeAccessIssue]
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)


def check_threefry_partitionable() -> None:
    """Sampling must not depend on the device count; that needs partitionable threefry."""
    if not jax.config.jax_threefry_partitionable:  # pyright: ignore[reportAttributeAccessIssue] (a run-time flag)
        raise RuntimeError(
            "jax_threefry_partitionable is off: random numbers would depend on how the batch is "
            "sharded. Turn it on with jax.config.update('jax_threefry_partitionable', True)."
        )


def global_array(host_array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global `jax.Array` from a host array that every process holds in full."""
    host_array = np.asarray(host_array)
    return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])


def to_host(tree: Any) -> Any:
    """Fetch a pytree of (possibly multi-host, sharded) arrays as NumPy on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


__all__ = [
    "BATCH_AXES",
    "DATA",
    "DEFAULT_RULES",
    "FSDP",
    "LARGEST",
    "REPLICATE",
    "RUNS",
    "STACKED_LAYERS",
    "batch_axes",
    "batch_sharding",
    "batch_size_divisor",
    "check_threefry_partitionable",
    "global_array",
    "initialize_distributed",
    "make_mesh",
    "opt_state_shardings",
    "param_partition_specs",
    "param_shardings",
    "path_str",
    "replicated",
    "shard_params",
    "spec_for",
    "to_host",
]
