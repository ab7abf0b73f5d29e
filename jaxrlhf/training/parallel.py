"""Data parallelism (and FSDP) with `jax.jit` + `NamedSharding` (GSPMD), single- or multi-host.

The train step is written for one device holding the whole batch; the mesh only says where the
arrays live. The batch axis of prompts and experience is split over the mesh axes ``"data"`` and
``"fsdp"`` together; parameters (and the optimizer moments that mirror them) are split over
``"fsdp"`` by the models' sharding rules when that axis has more than one device, and replicated
otherwise. XLA then inserts the collectives, so batch means inside the step (masked means,
whitening, token-mean losses) are already global: the core functions run with ``axis_name=None``.

Multi-host: call `initialize_distributed` in every process first, then build the same mesh
everywhere (`jax.devices()` lists all processes' devices). Every process runs the same program on
the same global arrays; `global_array` builds them from host data that every process holds.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, **kwargs) -> None:
    """`jax.distributed.initialize`, with CPU collectives over gloo (needed by multi-process CPU runs).

    Call once per process before any other JAX call; arguments as in `jax.distributed.initialize`
    (all None on a managed cluster such as SLURM or Cloud TPU, which fill them in).
    """
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)


def data_mesh(devices=None) -> Mesh:
    """A 1-D ``("data",)`` mesh over all (or the given) devices: plain data parallelism."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), ("data",))


def check_threefry_partitionable() -> None:
    """Sampling must not depend on the device count; that needs partitionable threefry."""
    if not jax.config.jax_threefry_partitionable:
        raise RuntimeError(
            "jax_threefry_partitionable is off: random numbers would depend on how the batch is "
            "sharded. Turn it on with jax.config.update('jax_threefry_partitionable', True).")


def batch_axes(mesh: Mesh) -> tuple:
    """The mesh axes the batch dimension is split over."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_size_divisor(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def batch_sharding(mesh: Mesh, batch_dim: int = 0) -> NamedSharding:
    """Arrays whose axis ``batch_dim`` is the batch: split over the data-parallel axes."""
    return NamedSharding(mesh, P(*([None] * batch_dim), batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(params, mesh: Mesh):
    """Shardings of a parameter pytree: FSDP rules from `jaxrlhf.models.sharding` when the mesh
    has an ``"fsdp"`` axis of size > 1, replicated otherwise."""
    if "fsdp" in mesh.axis_names and mesh.shape["fsdp"] > 1:
        from jaxrlhf.models.sharding import param_partition_specs

        specs = param_partition_specs(params, fsdp_axis="fsdp", mesh=mesh)
        return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                            is_leaf=lambda x: isinstance(x, P))
    return jax.tree.map(lambda _: replicated(mesh), params)


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_opt_state, params_shardings, mesh: Mesh):
    """Optimizer moments shard like the parameters they mirror; counters are replicated."""
    is_sharding = lambda x: isinstance(x, NamedSharding)  # noqa: E731
    return optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract_opt_state, params_shardings,
        transform_non_params=lambda _: replicated(mesh), is_leaf=is_sharding)


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
