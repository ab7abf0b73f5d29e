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
