"""Flax decoder LMs (GPT-2, Llama family, Gemma 2/3, Phi-3/4, Qwen3-MoE, Mixtral, OLMoE) with HF checkpoint I/O."""

from jaxrlhf.models.config import REMAT_POLICIES, ModelConfig, UnsupportedModelError, gpt2_config
from jaxrlhf.models.hf_io import CheckpointError, load_pretrained, pretrained_from_hf, resolve_hub_id, save_pretrained
from jaxrlhf.models.lm import LanguageModel, Pretrained
from jaxrlhf.models.lora import (
    LoraConfig,
    LoraParams,
    dequantize_params,
    init_lora,
    merge_lora,
    quantize_params,
    with_lora,
)
from jaxrlhf.models.peft_io import AdapterError, load_peft_adapter, save_merged, save_peft_adapter
from jaxrlhf.models.positions import check_positions, learned_position_limit
from jaxrlhf.models.transformer import (
    ModelOutput,
    Transformer,
    grow_cache,
    init_cache,
    positions_from_mask,
    stack_cache,
    stack_layers,
    unstack_cache,
    unstack_layers,
)
from jaxrlhf.models.value import ValueModel, init_value_head, value_head_apply
