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
  parameter is replicated;
- `"expert"` (only when asked for): mixture-of-experts weights are split over it by expert
  (expert parallelism); the batch is split over it too, so outside the MoE layers it is one more
  data axis;
- `"model"` (only when asked for): tensor parallelism, Megatron-style (Shoeybi et al. 2019):
  attention heads and the MLP's hidden units are split over it (q/k/v and gate/up by output
  column, o and down by input row, embeddings and the output layer by vocabulary); the batch is
  replicated along it. GSPMD inserts the all-reduces after the row-split projections.

`batch_sharding(mesh)` splits an array's batch axis over `("data", "fsdp", "expert")` together
(those the mesh has).

Choosing sizes: `model` splits every layer's matmuls and adds two all-reduces of the activations
per layer, so keep it within a fast interconnect (a host's GPUs, a TPU slice's nearest
neighbours) and make it divide the number of KV heads (a head split across devices works but
moves data); `expert` should divide the number of experts; `fsdp` trades memory for a parameter
all-gather per layer; `data` is the rest. The product is the device count.

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
EXPERT = "expert"
MODEL = "model"
BATCH_AXES = (DATA, FSDP, EXPERT)  # the mesh axes a batch dimension is split over (those the mesh has)

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

# Tensor and expert parallelism (applied first, on the `"model"` / `"expert"` axes when the mesh
# has them): `(regex, spec)` with `MODEL` / `EXPERT` entries; the FSDP rules then split one of the
# dimensions these leave free. Kernels are `[in, out]` (`x @ kernel`); experts `[E, in, out]`.
_W = r"(kernel|kernel_q|kernel_scale)$"
TENSOR_PARALLEL_RULES: tuple[tuple[str, PartitionSpec], ...] = (
    (r"(^|/)attn/(q|k|v)/" + _W, PartitionSpec(None, MODEL)),  # column-parallel: heads split
    (r"(^|/)attn/(q|k|v)/bias$", PartitionSpec(MODEL)),
    (r"(^|/)attn/o/" + _W, PartitionSpec(MODEL, None)),  # row-parallel: partial sums all-reduced
    (r"(^|/)mlp/experts/(gate|up)/" + _W, PartitionSpec(EXPERT, None, MODEL)),
    (r"(^|/)mlp/experts/down/" + _W, PartitionSpec(EXPERT, MODEL, None)),
    (r"(^|/)mlp/(gate|up)/" + _W, PartitionSpec(None, MODEL)),
    (r"(^|/)mlp/(gate|up)/bias$", PartitionSpec(MODEL)),
    (r"(^|/)mlp/down/" + _W, PartitionSpec(MODEL, None)),
    (r"(^|/)embed/embedding$", PartitionSpec(MODEL, None)),  # vocabulary-parallel
    (r"(^|/)(lm_head|decode_head)$", PartitionSpec(None, MODEL)),
)


# ----------------------------------------------------------------------------------------------
# Meshes


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    *,
    runs: int | None = None,
    expert: int | None = None,
    model: int | None = None,
    # jax exports `Device` as an assigned alias of jaxlib's class, which pyright rejects as a type.
    devices: Sequence[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm]
) -> Mesh:
    """A `(data, fsdp)` mesh, with `runs` in front and `expert`, `model` behind when given (axes
    in the order `runs, data, fsdp, expert, model`: the model axis innermost, on neighbouring
    devices); `-1` on one axis takes the rest.

    `make_mesh()` is plain data parallelism over all devices; `make_mesh(data=2, fsdp=4)` splits
    parameters 4 ways; `make_mesh(runs=4, data=2)` is a sweep's mesh (runs over 4 device groups,
    each run's batch over 2 devices); `make_mesh(data=2, fsdp=2, model=2)` adds 2-way tensor
    parallelism, `make_mesh(data=2, expert=4)` 4-way expert parallelism (see the module
    docstring for choosing sizes). The axis sizes must use the devices exactly: for fewer, pass
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
    for name, size in ((EXPERT, expert), (MODEL, model)):
        if size is not None:
            names, sizes = names + (name,), sizes + [size]
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
    taken: tuple[int, ...] = (),
) -> PartitionSpec:
    """The `PartitionSpec` the first matching rule gives one parameter (see the module docstring).
    `LARGEST` skips the dimensions in `taken` (already split over the model or expert axis)."""
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
            order = sorted((d for d in range(len(shape)) if d not in taken), key=lambda d: (-shape[d], d))
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
    params,
    rules=DEFAULT_RULES,
    fsdp_axis: str = FSDP,
    mesh: Mesh | None = None,
    min_size: int = 0,
    tp_rules=TENSOR_PARALLEL_RULES,
):
    """A pytree of `PartitionSpec`s, one per parameter: `tp_rules` on the mesh's `"model"` and
    `"expert"` axes (when it has them), then `rules` over the fsdp axis on the dimensions left.

    Args:
      params: parameter pytree (arrays or `jax.ShapeDtypeStruct`s).
      rules: `(regex, action)` pairs, first match wins.
      fsdp_axis: the mesh axis parameters are split over.
      mesh: gives the axis sizes that must divide the sharded dimensions; default: all devices on
        the fsdp axis.
      min_size: tensors with fewer elements are replicated (sharding tiny tensors only adds
        communication); for stacked blocks the count is per layer.
      tp_rules: tensor / expert parallel `(regex, spec)` rules (`TENSOR_PARALLEL_RULES`).
    """
    if mesh is not None:
        axis_sizes = dict(mesh.shape)
        if fsdp_axis not in axis_sizes:
            raise ValueError(f"mesh axes {tuple(axis_sizes)} have no {fsdp_axis!r} axis")
    else:
        axis_sizes = {fsdp_axis: jax.device_count()}

    # An axis used for FSDP (a custom `fsdp_axis` may be called "model") is not also a TP axis.
    tp_sizes = {name: size for name, size in axis_sizes.items() if name != fsdp_axis}

    def per_layer(name, shape):
        tp = tensor_parallel_spec(name, shape, tp_rules, tp_sizes, min_size)
        taken = tuple(d for d, entry in enumerate(tp) if entry is not None)
        fsdp = spec_for(name, shape, rules, fsdp_axis, axis_sizes=axis_sizes, min_size=min_size, taken=taken)
        if not taken:
            return fsdp
        merged = [t if t is not None else f for t, f in zip(tp, tuple(fsdp) + (None,) * len(shape))]
        return PartitionSpec(*merged)

    def one(path, p):
        name, shape = path_str(path), tuple(p.shape)
        if re.search(STACKED_LAYERS, name) and len(shape) >= 1:
            inner = per_layer(name, shape[1:])
            return PartitionSpec(None, *inner) if len(inner) else PartitionSpec()
        return per_layer(name, shape)

    return jax.tree_util.tree_map_with_path(one, params)


def tensor_parallel_spec(
    path: str, shape: tuple[int, ...], tp_rules=TENSOR_PARALLEL_RULES, axis_sizes=None, min_size: int = 0
) -> tuple:
    """Per dimension of one (per-layer) parameter: `MODEL`, `EXPERT` or None, from the first rule of
    `tp_rules` that matches `path`. An axis the mesh lacks (or of size 1), or that does not divide
    its dimension, is left out (None); so is everything for tensors under `min_size` elements."""
    axis_sizes = dict(axis_sizes or {})
    out: list = [None] * len(shape)
    if not shape or int(np.prod(shape, dtype=np.int64)) < min_size:
        return tuple(out)
    for pattern, spec in tp_rules:
        if not re.search(pattern, path):
            continue
        for d, (dim, entry) in enumerate(zip(shape, spec)):
            size = axis_sizes.get(entry, 1) if entry is not None else 1
            if size > 1 and dim % size == 0:
                out[d] = entry
        break
    return tuple(out)


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
    "EXPERT",
    "FSDP",
    "LARGEST",
    "MODEL",
    "REPLICATE",
    "RUNS",
    "STACKED_LAYERS",
    "TENSOR_PARALLEL_RULES",
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
    "tensor_parallel_spec",
    "to_host",
]
