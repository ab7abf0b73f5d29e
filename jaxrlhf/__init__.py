"""jaxrlhf: RLHF for language models as pure, jit-compiled JAX functions."""

__version__ = "0.1.0"

# Public API. Each block is added when its module lands; keep the blocks in this order.
# --- core math ---
# --- models ---
from jaxrlhf.models import (
    CheckpointError,
    LanguageModel,
    ModelConfig,
    Pretrained,
    UnsupportedModelError,
    load_pretrained,
    save_pretrained,
)
# --- sampling ---
# --- training ---
