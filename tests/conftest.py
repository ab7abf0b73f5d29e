"""Test set-up: 8 simulated CPU devices so multi-device code runs on any machine.

The flag must be set before jax is imported anywhere, hence at conftest import time.
"""

import contextlib
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The experiments' tasks (`experiments/tasks`) and scripts import as top-level modules, as they do
# when a script runs from experiments/.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments"))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)


@contextlib.contextmanager
def persistent_compilation_cache(directory):
    """JAX's persistent compilation cache in ``directory`` while the block runs (off again after).

    Test modules that compile the same programs more than once (or in a subprocess) use it from a
    module-scoped fixture, so a program compiled once is loaded, not compiled, the next time.
    """
    from jax._src import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {name: getattr(jax.config, name) for name in names}
    cc.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        yield str(directory)
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        cc.reset_cache()
