"""Test set-up: 8 simulated CPU devices so multi-device code runs on any machine, and an XLA:CPU
that compiles fast.

The flags must be set before jax is imported anywhere, hence at conftest import time.

The suite's programs are tiny models run for a few steps, so its time goes to compiling them, not
to running them. On the CPU the tests therefore compile with two XLA options that make compiling
cheaper and leave the results alone (XLA's HLO passes, which decide fusion and numerics, still run;
both sides of every equality test are compiled alike):

- ``--xla_backend_optimization_level=0``: no LLVM optimisation passes, most of a compile spent on
  code that then runs for milliseconds. Measured on the 2-core CI machine: the scan tests 129 s ->
  85 s, the reward-hacking and group-trainer files 166 s -> 123 s.
- ``--xla_cpu_use_fusion_emitters=false``: XLA:CPU's LLVM-IR loop emitters for its elementwise
  fusions instead of the MLIR fusion pipeline, which costs more per fusion (a tiny PPO step has
  about 1400). Measured on a quiet 2-core machine, one process: test_training_groups.py +
  test_models_scan.py 252 s -> 176 s, every test passing; the tiny PPO step's compile 9.0 s ->
  6.9 s with a bit-identical loss.

Benchmarks never run under these flags outside the tests. ``JAXRLHF_TEST_XLA_OPTIMIZE=1`` (or an
optimisation level already in ``XLA_FLAGS``) keeps XLA's defaults.
"""

import contextlib
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags = (_flags + " --xla_force_host_platform_device_count=8").strip()
if (
    os.environ["JAX_PLATFORMS"] == "cpu"
    and os.environ.get("JAXRLHF_TEST_XLA_OPTIMIZE", "0") != "1"
    and "xla_backend_optimization_level" not in _flags
):
    _flags = (_flags + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false").strip()
os.environ["XLA_FLAGS"] = _flags
# What a subprocess started by a test (a benchmark, a worker with its own device count) keeps of
# these flags: the compile settings, not the simulated device count.
SUBPROCESS_XLA_FLAGS = " ".join(f for f in _flags.split() if "xla_force_host_platform_device_count" not in f)
# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The experiments' tasks (`experiments/tasks`) and scripts import as top-level modules, as they do
# when a script runs from experiments/.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)


def load_script(name):
    """An experiment script (``experiments/<name>.py``) imported as a module, as the tests call it."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


# The files whose tests run for minutes (end-to-end runs, subprocesses, real checkpoints), longest
# first. pytest-xdist's `--dist loadfile` would hand out files by their number of tests, so a
# file of a few long tests (the GPU-suite smoke: about 4 minutes) started last and ran alone at
# the end; starting the longest files first lets the short ones fill in around them.
LONG_FILES_FIRST = (
    "test_benchmarks_smoke.py",
    "test_sweep.py",
    "test_training.py",
    "test_gguf_generation.py",
    "test_training_groups.py",
    "test_reliability.py",
    "test_training_recompute.py",
    "test_steer_smollm.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order given below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.path))
        return LONG_FILES_FIRST.index(name) if name in LONG_FILES_FIRST else len(LONG_FILES_FIRST)

    items.sort(key=rank)  # stable: a file's tests keep their order


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the whole test run, shared by the xdist workers and the
    subprocesses the tests start (through ``JAX_COMPILATION_CACHE_DIR``).

    Many tests compile the same program: the same tiny model's forward, or one trainer step under
    several numeric configs (hyper-parameters are data, so the HLO is the same). Each is compiled
    once per run and loaded afterwards. The directory lives under pytest's base temp (the parent of
    the workers' own), so every run starts cold and old runs are cleaned up with pytest's temp dirs.
    ``JAXRLHF_TEST_COMPILATION_CACHE=0`` turns it off.
    """
    if os.environ.get("JAXRLHF_TEST_COMPILATION_CACHE", "1") == "0":
        yield None
        return
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    directory = root / "jax_compilation_cache"
    directory.mkdir(exist_ok=True)
    min_seconds = 0.0  # every program: the subprocess tests recompile what the tests before them did
    env = {"JAX_COMPILATION_CACHE_DIR": str(directory), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(min_seconds)}
    previous_env = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    with persistent_compilation_cache(directory, min_compile_time_secs=min_seconds):
        yield str(directory)
    for name, value in previous_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def module_compilation_cache(tmp_path_factory):
    """A module's own persistent compilation cache (`persistent_compilation_cache`): a test module
    that compiles the same programs more than once uses it with
    ``pytestmark = pytest.mark.usefixtures("module_compilation_cache")``."""
    with persistent_compilation_cache(tmp_path_factory.mktemp("jax_cache")) as cache_dir:
        yield cache_dir


@contextlib.contextmanager
def persistent_compilation_cache(directory, min_compile_time_secs: float = 0.0):
    """JAX's persistent compilation cache in ``directory`` while the block runs (off again after).

    Test modules that compile the same programs more than once (or in a subprocess) use it from a
    module-scoped fixture, so a program compiled once is loaded, not compiled, the next time.
    """
    from jax._src import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {name: getattr(jax.config, name) for name in names}
    cc.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_secs)
    try:
        yield str(directory)
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        cc.reset_cache()


# The fields `ModelConfig.from_hf` sets for each architecture family (the rest are the defaults).
_FAMILY_FIELDS = {
    "gpt2": dict(
        positions="learned",
        norm="layernorm",
        mlp="plain",
        activation="gelu_new",
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
    ),
    "llama": {},
    "mistral": {},
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True),
}


def tiny_config(model_type: str = "llama", **overrides):
    """A tiny `ModelConfig` of ``model_type``'s architecture, for tests that build a model from scratch.

    Sizes unless overridden: vocabulary 64, width 32, 2 layers, 4 heads of ``hidden_size //
    num_heads`` dimensions with 2 KV heads (GPT-2, which has no grouped-query attention: as many
    KV heads as heads), MLP width 64, 64 positions, norm epsilon 1e-5. ``overrides`` set any field
    (sizes, token ids, ``scan_layers``, ...), so a test states the numbers its results depend on.
    """
    from jaxrlhf.models.config import ModelConfig

    if model_type not in _FAMILY_FIELDS:
        raise ValueError(f"tiny_config: no tiny {model_type!r}; families: {', '.join(_FAMILY_FIELDS)}")
    fields = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    fields.update(max_position_embeddings=64, norm_eps=1e-5, **_FAMILY_FIELDS[model_type])
    fields.update(overrides)
    fields.setdefault("num_kv_heads", fields["num_heads"] if model_type == "gpt2" else 2)
    fields.setdefault("head_dim", fields["hidden_size"] // fields["num_heads"])
    return ModelConfig(model_type=model_type, **fields)
