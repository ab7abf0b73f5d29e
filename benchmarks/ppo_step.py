"""Seconds per PPO iteration: jaxrlhf's jitted step vs a TRL-style (pre-1.0) PyTorch loop.

Both sides run the same weights: a random-weight GPT-2 is built with transformers from a
`GPT2Config` (dropout off), saved with `save_pretrained` to a temporary directory and loaded with
`jaxrlhf.load_pretrained` (``--model gemma3-125m`` / ``moe-125m``: a Gemma-3- or Qwen3-MoE-shaped
model of ~125M parameters, `Gemma3ForCausalLM` / `Qwen3MoeForCausalLM`, whose trunk is the critic's;
the FLOP counts take a mixture of experts' k chosen experts only). Policy, reference (= initial
policy) and a separate critic (a copy of the trunk + the same random value head) start equal in
both frameworks. One iteration:

    rollout      sample --new_tokens tokens per prompt (temperature 1, no top-k/top-p, KV cache,
                 no EOS so every row has the full length)
    experience   programmatic reward; policy, reference and critic forwards over prompt + response;
                 k1 KL-penalised step rewards (beta 0.05); GAE (gamma 1, gae_lambda 0.95); whitening
    update       1 PPO epoch x --minibatches minibatches: clipped policy + value loss, grad-norm
                 clip, AdamW on policy and critic

jaxrlhf is timed twice per iteration: the fused step (`PPO.bind(frozen, donate=True)`: one
`jax.jit` for the whole iteration, the number that counts) and the same step split into three
separately jitted phases (`PPO.rollout_step`, `make_experience`, `make_ppo_update`) for the
breakdown. The torch baseline is `benchmarks/torch_ppo_baseline.py`. Both run in one process and
alternate in blocks of --block iterations (default 1); at each switch the framework leaving frees
its training state and the one coming in rebuilds it (untimed), so the two never hold their ~3-4 GB
(GPT-2 124M) at the same time. After one warm-up iteration each (jaxrlhf's compiles, reported
separately) the table shows medians of --iters iterations. torch runs with
`torch.set_num_threads(os.cpu_count())`; XLA uses all cores by default.

GRPO (``--algorithm grpo``): the same phases for `preset("grpo")`, critic-free. ``--batch`` counts
responses, ``--group`` G per prompt (``batch / G`` prompts, each sampled G times); the experience
runs the policy (old log-probs) and reference forwards and the group advantages, the update the
clipped ratio loss plus the k3 KL term (beta 0.04), each response's token mean averaged over
responses; AdamW on the policy only. The torch side is `torch_ppo_baseline.TorchGRPO` (the same
formulas). Neither side takes the old log-probs from its sampler (jaxrlhf's default).

LoRA (``--lora_rank R``): the policy gets rank-R adapters (``--lora_alpha``, ``--lora_targets``) on
both sides and trains them only; the reference is the base with the adapters off, not a second
copy. jaxrlhf: `with_lora(model, LoraConfig(...))`, whose `PPO` keeps the adapters in the state and
the base in the frozen parameters. torch: `peft.get_peft_model` (`fan_in_fan_out=True` for GPT-2's
`Conv1D`), the reference under `with policy.disable_adapter():`, AdamW over the trainable
parameters. The critic is a full trunk + head on both sides, as without LoRA (what jaxrlhf's PPO
builds by default for a LoRA policy with a separate critic). The targets are the projections both
frameworks hold as separate matrices: attention output (``o`` = GPT-2's ``attn.c_proj``) and the
MLP (``up`` = ``mlp.c_fc``, ``down`` = ``mlp.c_proj``). GPT-2 fuses q, k and v into one ``c_attn``,
whose PEFT adapter shares one ``A`` between them (``4 D r`` weights, against ``6 D r`` for
jaxrlhf's separate q, k, v adapters of the same rank), so q, k, v are refused: the two sides
would not train the same number of parameters. Both counts are printed and must be equal.

FLOP accounting (with ``--split``): for the fused step and each phase program, the FLOPs of the
compiled program from XLA's cost analysis (``lower(...).compile().cost_analysis()``) and from
shapes (`forward_flops` and the phase functions below). XLA's count takes a loop body once
(checked: a ``scan`` of 10 matrix products counts as one), so it misses all but one step of the
decode ``while_loop`` and all but one minibatch of the update's ``scan``; for the rollout, the
update and the fused step the shape count is the one used, for the experience (no loop over
matrix products) XLA's. Where XLA's count covers a whole program (the experience; the update with
``--minibatches 1``; a 1-token rollout) the two agree within 10%, with and without LoRA. From it: GFLOP/s and the
fraction of this machine's matrix-product peak (a jitted 2048^3 float32 product, measured at the
start). For the decode loop also one step's time (``(t(N) - t(1)) / (N - 1)``, a 1-token
rollout timed beside each split iteration), the bytes a step reads at least (weights + the KV
cache slots attention reads), the bandwidth that implies against a measured copy bandwidth, and
the fraction of the step's floor ``max(FLOPs / peak, bytes / bandwidth)`` reached. ``--out DIR``
writes every figure to ``DIR/ppo_step.json`` and the tables to ``DIR/ppo_step.md``.

    python benchmarks/ppo_step.py                       # GPT-2 124M, batch 16, 32 + 32 tokens
    python benchmarks/ppo_step.py --batch 32 --new_tokens 64 --minibatches 4
    python benchmarks/ppo_step.py --lora_rank 8         # LoRA policy (o, up, down), both sides
    python benchmarks/ppo_step.py --algorithm grpo      # GRPO: 4 prompts x G = 4, no critic
    python benchmarks/ppo_step.py --quick               # tiny model, checks that it runs (< 1 min)
    python benchmarks/ppo_step.py --quick --lora_rank 4 --split True --out /tmp/ppo
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Literal

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sampling import GEMMA3_125M, MOE_125M  # noqa: E402 (after the path insert)

MODELS = {
    # GPT-2 small: 124M parameters, 50257-token vocabulary, 12 layers of width 768.
    "gpt2-124m": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
    # The small-model regime of RLHF research (e.g. randomwalks): 2 layers, width 64, 64 tokens.
    "tiny": dict(vocab_size=64, n_positions=128, n_embd=64, n_layer=2, n_head=4),
    # The Gemma-3-shaped (~121M) and Qwen3-MoE-shaped (~124M, ~49M active) rows of sampling.py.
    "gemma3-125m": GEMMA3_125M,
    "moe-125m": MOE_125M,
}
# The transformers model_type of each shape (GPT-2 unless listed).
MODEL_TYPES = {"gemma3-125m": "gemma3_text", "moe-125m": "qwen3_moe"}
PHASES = ("rollout", "experience", "update")
# LoRA targets: jaxrlhf's projection name -> the GPT-2 module (suffix) peft adapts.
TORCH_LORA_TARGETS = {"o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}
FUSED_QKV = ("q", "k", "v")


@dataclasses.dataclass(frozen=True)
class Config:
    """Seconds per PPO iteration: jaxrlhf's jitted step vs a TRL-style PyTorch loop, same weights
    (see the module docstring of benchmarks/ppo_step.py for what is timed)."""

    quick: bool = False
    """Tiny model, 16 new tokens, 2 iterations, no phase split: checks that it runs."""
    algorithm: Literal["ppo", "grpo"] = "ppo"
    """ppo: a critic and GAE; grpo: `preset("grpo")`, critic-free, --group responses per prompt."""
    group: int = 4
    """GRPO: responses per prompt (--batch counts responses; must divide it)."""
    model: Literal[tuple(MODELS)] | None = None
    """Model shape (None: gpt2-124m, tiny with --quick): gpt2-124m, tiny, gemma3-125m (Gemma-3
    layers, ~121M), moe-125m (Qwen3-MoE layers, 16 experts top-2, ~124M total)."""
    batch: int = 16
    """Prompts (= responses) per iteration."""
    prompt_len: int = 32
    """Prompt length (left-padded, half to all of it real tokens)."""
    new_tokens: int | None = None
    """Sampled tokens per response (None: 32, 16 with --quick)."""
    minibatches: int = 2
    """Minibatches of the one PPO epoch; must divide batch."""
    iters: int | None = None
    """Timed iterations per side (None: 5, 2 with --quick)."""
    block: int = 1
    """Iterations per framework before switching to the other (each switch rebuilds the training
    state, so only one framework's state is in memory at a time)."""
    threads: int = os.cpu_count() or 1
    """torch.set_num_threads."""
    split: bool | None = None
    """Also time jaxrlhf's three phases as separate jits (None: on, off with --quick)."""
    verbose: bool = False
    """Print every iteration."""
    lora_rank: int | None = None
    """Rank of LoRA adapters on the policy, both sides (None: full fine-tuning)."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the adapted projection is W x + (alpha / rank) B A x."""
    lora_targets: tuple[Literal["q", "k", "v", "o", "up", "down"], ...] = ("o", "up", "down")
    """Projections with adapters: o (attn.c_proj), up (mlp.c_fc), down (mlp.c_proj); q, k, v are
    refused (GPT-2's fused c_attn cannot hold the same adapters, see the module docstring)."""
    out: str | None = None
    """Also write every figure to OUT/ppo_step.json and the tables to OUT/ppo_step.md."""


def resolve(config: Config) -> Config:
    """The config with every None default filled in (they depend on --quick), checked."""
    config = dataclasses.replace(
        config,
        model=config.model or ("tiny" if config.quick else "gpt2-124m"),
        new_tokens=config.new_tokens or (16 if config.quick else 32),
        iters=config.iters or (2 if config.quick else 5),
        split=(not config.quick) if config.split is None else config.split,
    )
    if config.batch % config.minibatches:
        sys.exit(f"--minibatches ({config.minibatches}) must divide --batch ({config.batch})")
    if config.algorithm == "grpo" and (config.group < 2 or config.batch % config.group):
        sys.exit(f"--group ({config.group}) must be >= 2 and divide --batch ({config.batch}) for GRPO")
    if config.lora_rank is not None:
        if config.lora_rank < 1:
            sys.exit(f"--lora_rank must be >= 1, got {config.lora_rank}")
        fused = [t for t in config.lora_targets if t in FUSED_QKV]
        if fused:
            sys.exit(
                f"--lora_targets {' '.join(fused)}: GPT-2 fuses q, k, v into one c_attn, whose peft adapter "
                "shares one A between them (4 D r weights against jaxrlhf's 6 D r for separate q, k, v), so "
                "the two sides would not train the same parameters; use o, up, down"
            )
        if not config.lora_targets:
            sys.exit("--lora_targets is empty")
        if config.model in MODEL_TYPES:
            sys.exit(f"--lora_rank: the LoRA comparison here is for the GPT-2 shapes, not --model {config.model}")
    if config.out is not None and os.path.exists(config.out) and not os.path.isdir(config.out):
        sys.exit(f"--out {config.out} exists and is not a directory")
    return config


def num_prompts(args) -> int:
    """Distinct prompts per iteration: --batch, or --batch / --group for GRPO."""
    return args.batch // args.group if args.algorithm == "grpo" else args.batch


def build_checkpoint(model_name: str, directory: str, seed: int = 0):
    """Random-weight HF model (GPT-2, or the Gemma-3 / Qwen3-MoE shapes) saved to `directory`;
    returns the torch policy and a value head."""
    import torch
    import transformers

    torch.manual_seed(seed)
    token_ids = dict(pad_token_id=0, bos_token_id=None, eos_token_id=None)
    if model_name in MODEL_TYPES:  # dropout is off by default in these configs
        config = transformers.AutoConfig.for_model(MODEL_TYPES[model_name], **MODELS[model_name], **token_ids)
        policy = transformers.AutoModelForCausalLM.from_config(config)
    else:
        config = transformers.GPT2Config(
            **MODELS[model_name], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **token_ids
        )
        policy = transformers.GPT2LMHeadModel(config)
    policy.generation_config.eos_token_id = None
    policy.generation_config.pad_token_id = 0
    policy.save_pretrained(directory)
    head = torch.nn.Linear(config.hidden_size, 1)
    torch.nn.init.normal_(head.weight, std=0.1 / config.hidden_size**0.5)
    torch.nn.init.zeros_(head.bias)
    return policy, head


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0):
    """Left-padded prompts with lengths between prompt_len / 2 and prompt_len."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_len // 2, prompt_len + 1, size=batch)
    ids = rng.integers(1, vocab, size=(batch, prompt_len)).astype(np.int32)
    mask = (np.arange(prompt_len)[None, :] >= prompt_len - lengths[:, None]).astype(np.int32)
    return ids * mask, mask


def jax_reward(prompt_ids, prompt_mask, response_ids, response_mask):
    """Fraction of valid response tokens with an even id (a cheap programmatic reward)."""
    import jax.numpy as jnp

    even = (response_ids % 2 == 0).astype(jnp.float32) * response_mask
    return even.sum(1) / jnp.maximum(response_mask.sum(1), 1)


def torch_reward(prompt_ids, prompt_mask, response_ids, response_mask):
    even = (response_ids % 2 == 0).float() * response_mask
    return even.sum(1) / response_mask.sum(1).clamp(min=1)


# ----------------------------------------------------------------------------------------------
# FLOPs and bytes from shapes


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the FLOP counts need of a GPT-2-layout jaxrlhf model, read from its parameter shapes."""

    trunk_weights: int  # weights of the layers' matrix products (every `kernel` under a layer)
    head_weights: int  # the output layer, V x D (tied: the embedding table)
    adapter_weights: int  # LoRA A and B of the policy (0 without adapters)
    num_layers: int
    attention_width: int  # heads x head_dim: the width of q, k and v
    # The last layer's weights a prefill does not need (all but its k and v projections: the cache
    # is all a prefill keeps, so XLA drops the rest of that layer), base and adapters.
    prefill_unused_weights: int = 0
    prefill_unused_adapter_weights: int = 0

    def without_adapters(self) -> ModelShape:
        return dataclasses.replace(self, adapter_weights=0, prefill_unused_adapter_weights=0)


def model_shape(model, params, adapters=None) -> ModelShape:
    """`ModelShape` of `model` with parameters `params` (and LoRA `adapters`, arrays or shapes)."""
    import jax

    cfg = model.config
    last_layer = f"layer_{cfg.num_layers - 1}"

    def weights(tree, leaf_names) -> tuple[int, int]:
        """(all matrix weights under the layers, those of the last layer outside its k and v);
        of a mixture of experts only the share a token uses (k of E experts)."""
        total = unused = 0
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            keys = [getattr(k, "key", None) for k in path]
            if keys[-1] in leaf_names and str(keys[0]).startswith("layer"):
                active = math.prod(leaf.shape)
                if "experts" in keys:
                    active = active * cfg.num_experts_per_tok // cfg.num_experts
                total += active
                if keys[0] == last_layer and keys[-2] not in ("k", "v"):
                    unused += active
        return total, unused

    trunk, unused = weights(params, ("kernel",))
    adapter_weights, unused_adapters = weights(adapters or {}, ("lora_A", "lora_B"))
    head = params["lm_head"] if "lm_head" in params else params["embed"]["embedding"]
    return ModelShape(
        trunk,
        math.prod(head.shape),
        adapter_weights,
        cfg.num_layers,
        cfg.num_heads * cfg.head_dim,
        unused,
        unused_adapters,
    )


def forward_flops(shape: ModelShape, rows: int, length: int, logit_positions: int, keys: int | None = None) -> float:
    """FLOPs of a forward pass of `rows` sequences of `length` tokens:

        2 rows T (W_trunk + W_adapters)      every token through every layer's matrix products
      + 2 rows n V D                         the output layer at the n = logit_positions positions
      + 4 rows L D_attn T K                  attention: q k^T and the weighted sum of v over K keys

    (K = T: XLA computes the full T x T scores, causal mask or not). Norms, softmax and the
    element-wise rest are left out."""
    keys = length if keys is None else keys
    matmuls = 2 * rows * length * (shape.trunk_weights + shape.adapter_weights)
    head = 2 * rows * logit_positions * shape.head_weights
    attention = 4 * rows * shape.num_layers * shape.attention_width * length * keys
    return float(matmuls + head + attention)


def backward_flops(shape: ModelShape, rows: int, length: int, logit_positions: int, frozen_base: bool) -> float:
    """FLOPs of the backward pass matching `forward_flops`: every matrix product `y = x W` needs
    `dx = dy W^T` (as many FLOPs as the forward) and, for a trained W, `dW = x^T dy` (as many
    again). So 2x the forward for full fine-tuning; with a frozen base (LoRA) 1x for the base's
    products and the output layer, 2x for the adapters; attention's two products always 2x (both
    their inputs are activations)."""
    base = 2 * rows * length * shape.trunk_weights + 2 * rows * logit_positions * shape.head_weights
    adapters = 2 * rows * length * shape.adapter_weights
    attention = 4 * rows * shape.num_layers * shape.attention_width * length * length
    return float((1 if frozen_base else 2) * base + 2 * adapters + 2 * attention)


def decode_step_flops(shape: ModelShape, batch: int, prompt_len: int, new_tokens: int) -> float:
    """FLOPs of one decode step, averaged over the N steps: one token per row through everything,

        2 B (W_trunk + W_adapters + V D) + 4 B L D_attn S

    with S the cache slots attention reads, averaged over the steps (the decode segments of
    `jaxrlhf.sampling.segment_ends`: `sampling.mean_slots_read`)."""
    from sampling import mean_slots_read

    weights = shape.trunk_weights + shape.adapter_weights + shape.head_weights
    slots = mean_slots_read(prompt_len, new_tokens)
    return float(2 * batch * weights + 4 * batch * shape.num_layers * shape.attention_width * slots)


def prefill_flops(shape: ModelShape, batch: int, prompt_len: int) -> float:
    """The prefill of the first P - 1 prompt tokens into the cache: `forward_flops` without the
    output layer (its logits are unused) and without what the cache does not need of the last
    layer (its attention and everything after its k and v projections; XLA drops it):

        2 B (P - 1) (W_trunk - W_last_unused + W_adapters - W_last_unused_adapters)
      + 4 B (L - 1) D_attn (P - 1)^2"""
    tokens = prompt_len - 1
    weights = (
        shape.trunk_weights
        - shape.prefill_unused_weights
        + shape.adapter_weights
        - shape.prefill_unused_adapter_weights
    )
    attention = 4 * batch * (shape.num_layers - 1) * shape.attention_width * tokens * tokens
    return float(2 * batch * tokens * weights + attention)


def rollout_flops(shape: ModelShape, batch: int, prompt_len: int, new_tokens: int) -> float:
    """The rollout: the prefill (`prefill_flops`) plus N decode steps (`decode_step_flops`)."""
    return prefill_flops(shape, batch, prompt_len) + new_tokens * decode_step_flops(
        shape, batch, prompt_len, new_tokens
    )


def experience_flops(shape: ModelShape, batch: int, prompt_len: int, new_tokens: int, critic: bool = True) -> float:
    """Forwards over prompt + response (T = P + N): the policy (adapters on) and the reference
    (adapters off; without LoRA the same weights) with the output layer at the N response
    positions, and (PPO) the critic's trunk (no vocabulary head; its value head, 2 D per token, left out)."""
    length = prompt_len + new_tokens
    base = shape.without_adapters()
    return (
        forward_flops(shape, batch, length, new_tokens)
        + forward_flops(base, batch, length, new_tokens)
        + (forward_flops(base, batch, length, 0) if critic else 0.0)
    )


def update_flops(
    shape: ModelShape, batch: int, prompt_len: int, new_tokens: int, epochs: int, critic: bool = True
) -> float:
    """Each epoch: forward + backward of the policy (frozen base with LoRA) and (PPO) of the critic
    (a full trunk) over the whole batch, in minibatches."""
    length = prompt_len + new_tokens
    lora = shape.adapter_weights > 0
    trunk = shape.without_adapters()
    policy = forward_flops(shape, batch, length, new_tokens) + backward_flops(shape, batch, length, new_tokens, lora)
    value = forward_flops(trunk, batch, length, 0) + backward_flops(trunk, batch, length, 0, False) if critic else 0.0
    return float(epochs * (policy + value))


def phase_flops(
    shape: ModelShape, batch: int, prompt_len: int, new_tokens: int, epochs: int, critic: bool = True
) -> dict:
    """Shape-counted FLOPs of each phase and of the fused step (their sum); `batch` counts responses
    (the rollout's prefill runs on every row, GRPO's repeated prompts included)."""
    flops = {
        "rollout": rollout_flops(shape, batch, prompt_len, new_tokens),
        "experience": experience_flops(shape, batch, prompt_len, new_tokens, critic),
        "update": update_flops(shape, batch, prompt_len, new_tokens, epochs, critic),
    }
    return flops | {"fused": sum(flops.values())}


def decode_bytes(jax_side, args) -> float:
    """Bytes one decode step reads at least: `sampling.decode_step_bytes` (every weight once, plus
    the keys and values of the cache slots attention reads, averaged over the steps) plus the
    LoRA adapters, which the adapted projections read beside the base weights."""
    import jax
    from sampling import decode_step_bytes

    base = decode_step_bytes(jax_side.model, jax_side.params, args.batch, args.prompt_len, args.new_tokens)
    adapters = jax.tree.leaves(jax_side.decode_params or {})
    return float(base + sum(math.prod(x.shape) * x.dtype.itemsize for x in adapters))


def xla_flops(jitted, *args) -> float:
    """FLOPs of `jitted`'s compiled program for `args` from XLA's cost analysis (a loop body is
    counted once). The program was compiled by the timed call already: this is a cache hit."""
    analysis = jitted.lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


def abstract(tree):
    """`jax.ShapeDtypeStruct`s (shape, dtype, sharding, weak type) of the arrays of `tree`: what
    `lower` needs, kept before a call donates the arrays."""
    import jax

    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding, weak_type=x.weak_type), tree
    )


def copy_bandwidth_gbps(megabytes: int = 256, reps: int = 5) -> float:
    """Memory bandwidth of this JAX device: bytes read + written by a jitted `x + 1` over a large
    float32 array, in place (the input donated, so no fresh output buffer is faulted in on each
    call), over its time, median of `reps`."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((megabytes * 2**20 // 4,), jnp.float32)
    nbytes = x.nbytes
    copy = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    x = copy(x).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        x = copy(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times) / 1e9


class JaxSide:
    """jaxrlhf's PPO: the fused jitted step, and the same step as three jitted phases.

    The compiled programs live as long as this object; the training state (3 GB for GPT-2 124M:
    two models and their Adam moments) only between `reset` and `free`, so the two frameworks
    never hold their training state in memory at the same time. With `args.lora_rank` the policy
    is `with_lora(model, LoraConfig(...))`: the state holds its adapters, `frozen` the base.
    """

    def __init__(self, pretrained, head, args):
        import jax

        from jaxrlhf.models import LoraConfig, ValueModel, init_lora, with_lora
        from jaxrlhf.training import PPO, PPOConfig, make_experience, make_ppo_update
        from jaxrlhf.training.presets import preset

        self.jax = jax
        base_model, self.params = pretrained.model, pretrained.params
        self.lora = None
        if args.lora_rank is not None:
            self.lora = LoraConfig(
                rank=args.lora_rank, alpha=args.lora_alpha, dropout=0.0, target_modules=tuple(args.lora_targets)
            )
        model = base_model if self.lora is None else with_lora(base_model, self.lora)
        self.head = {
            "kernel": jax.numpy.asarray(head.weight.detach().numpy().T),
            "bias": jax.numpy.asarray(head.bias.detach().numpy()),
        }
        config = PPOConfig(
            total_steps=1000,
            batch_size=args.batch,
            minibatch_size=args.batch // args.minibatches,
            ppo_epochs=1,
            max_new_tokens=args.new_tokens,
            max_prompt_len=args.prompt_len,
            temperature=1.0,
            top_k=None,
            top_p=1.0,
            eos_token_id=-1,
            kl_coef=0.05,
            kl_estimator="k1",
            gamma=1.0,
            gae_lambda=0.95,
            clip_eps=0.2,
            value_clip_eps=0.2,
            vf_coef=0.1,
            learning_rate=1e-5,
            critic_learning_rate=1e-5,
            max_grad_norm=1.0,
        )
        critic = None
        if args.algorithm == "grpo":  # critic-free; the preset sets its KL, clip and aggregation
            config = preset("grpo", config.replace(num_generations=args.group))
        else:  # the critic: a full trunk + head of the base architecture (no adapters), as torch's
            critic = ValueModel(base_model.config)
        self.has_critic = critic is not None
        self.ppo = ppo = PPO(config, model, jax_reward, critic=critic)
        # Only its rollout is ever compiled: a 1-token rollout, the prefill half of the decode timing.
        self.ppo_one_token = PPO(config.replace(max_new_tokens=1), model, jax_reward, critic=ppo.critic)
        self.frozen = ppo.frozen_params(ref_params=self.params)  # LoRA: the base, also the reference
        ids, mask = make_prompts(num_prompts(args), args.prompt_len, model.config.vocab_size)
        self.batch = ppo.prompt_batch(ids, mask)
        # The state is donated to the step (XLA reuses its buffers for the new state).
        self.train_step = ppo.bind(self.frozen, donate=True)
        self.state = None
        adapters = None
        if self.lora is not None:  # shapes only: the state draws its own adapters
            adapters = jax.eval_shape(lambda p: init_lora(self.lora, p, jax.random.key(0)), self.params)
        self.model, self.shape = model, model_shape(model, self.params, adapters)
        self.num_params = sum(x.size for x in jax.tree.leaves(self.params))
        self.trainable_policy_params = (
            self.num_params if adapters is None else sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))
        )
        self.decode_params = adapters  # with the base: what a decode step reads (see `decode_step_bytes`)

        def experience(state, frozen, batch, rollout_out):
            batch = ppo.repeat_prompts(batch)  # GRPO: each prompt's row G times, as the rollout's
            raw = jax_reward(batch.ids, batch.mask, rollout_out.tokens, rollout_out.mask)
            exp, score_stats, _ = make_experience(
                config,
                ppo.models,
                ppo.policy_params(state, frozen),  # LoRA: LoraParams(base, adapters)
                state.value_params,
                frozen.ref_params,
                batch,
                rollout_out,
                raw,
                state.kl_ctl.kl_coef,
                state.score_stats,
                state.hparams,
            )
            return exp, score_stats

        ppo_update = make_ppo_update(config, ppo.models, ppo.policy_optimizer, ppo.value_optimizer)

        def update(state, frozen, exp, score_stats):
            _, update_key, next_key = jax.random.split(state.key, 3)
            params = {"policy": state.policy_params, "value": state.value_params}
            opt_states = {"policy": state.policy_opt_state, "value": state.value_opt_state}
            params, opt_states, _ = ppo_update(
                params,
                opt_states,
                exp,
                state.kl_ctl.kl_coef,
                state.hparams,
                update_key,
                policy_base=None if self.lora is None else frozen.ref_params,
            )
            return state.replace(
                step=state.step + 1,
                policy_params=params["policy"],
                value_params=params["value"],
                policy_opt_state=opt_states["policy"],
                value_opt_state=opt_states["value"],
                score_stats=score_stats,
                key=next_key,
            )

        self.experience = jax.jit(experience)
        self.update = jax.jit(update, donate_argnums=0)

    def reset(self):
        value_params = None  # GRPO: no critic
        if self.has_critic:
            value_params = {"trunk": self.jax.tree.map(lambda x: x.copy(), self.params), "head": self.head}
        self.state = self.jax.block_until_ready(self.ppo.init_state(self.params, value_params))
        if self.lora is not None:
            count = sum(x.size for x in self.jax.tree.leaves(self.state.policy_params))
            assert count == self.trainable_policy_params, (count, self.trainable_policy_params)

    def free(self):
        self.state = None
        gc.collect()

    def fused(self, costs: dict | None = None) -> float:
        """One fused step, in seconds; with a `costs` dict also its XLA FLOPs (`costs["fused"]`)."""
        state_shapes = abstract(self.state) if costs is not None else None
        start = time.perf_counter()
        self.state, metrics = self.train_step(self.state, self.batch)
        self.jax.block_until_ready((self.state, metrics))
        seconds = time.perf_counter() - start
        if costs is not None:  # the trainer's own jitted step (as `bind` calls it): a cache hit
            self.count(costs, "fused", self.ppo._jit_fused_donated, state_shapes, self.frozen, self.batch)
        return seconds

    @staticmethod
    def count(costs: dict, program: str, jitted, *args) -> None:
        """`costs[program]` = its XLA FLOPs; the seconds this took go to `costs["analysis_s"]` (near
        0 when the compiled program is found in jax's cache, as expected)."""
        start = time.perf_counter()
        costs[program] = xla_flops(jitted, *args)
        costs["analysis_s"] = costs.get("analysis_s", 0.0) + time.perf_counter() - start

    def split(self, costs: dict | None = None) -> dict:
        """The three phases (seconds), plus `rollout_1token`: a 1-token rollout of the same batch
        (not part of the iteration). With a `costs` dict also each phase's XLA FLOPs."""
        block = self.jax.block_until_ready
        t0 = time.perf_counter()
        rollout_out = block(self.ppo.rollout_step(self.state, self.frozen, self.batch))
        t1 = time.perf_counter()
        exp, score_stats = block(self.experience(self.state, self.frozen, self.batch, rollout_out))
        t2 = time.perf_counter()
        if costs is not None:
            self.count(costs, "rollout", self.ppo._jit_rollout, self.state, self.frozen, self.batch)
            self.count(costs, "experience", self.experience, self.state, self.frozen, self.batch, rollout_out)
            state_shapes = abstract(self.state)
        t2_end = time.perf_counter()
        self.state = block(self.update(self.state, self.frozen, exp, score_stats))
        t3 = time.perf_counter()
        if costs is not None:
            self.count(costs, "update", self.update, state_shapes, self.frozen, exp, score_stats)
        t4 = time.perf_counter()
        block(self.ppo_one_token.rollout_step(self.state, self.frozen, self.batch))
        t5 = time.perf_counter()
        return {"rollout": t1 - t0, "experience": t2 - t1, "update": t3 - t2_end, "rollout_1token": t5 - t4}


class TorchSide:
    """The TRL-style baseline, rebuilt from the checkpoint for each block (and freed after it).
    With `args.lora_rank` the policy is a peft model (`torch_ppo_baseline.lora_policy`)."""

    def __init__(self, directory, head, args):
        import torch
        from torch_ppo_baseline import trainable_parameters

        self.torch, self.directory, self.head, self.args = torch, directory, head, args
        ids, mask = make_prompts(num_prompts(args), args.prompt_len, MODELS[args.model]["vocab_size"])
        self.ids, self.mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        self.ppo = None
        self.trainable_policy_params = sum(p.numel() for p in trainable_parameters(self.adapted(self.load())))

    def load(self):
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(self.directory)

    def adapted(self, policy):
        """The policy to train: `policy` itself, or with LoRA adapters on the same targets as jaxrlhf's."""
        from torch_ppo_baseline import lora_policy

        if self.args.lora_rank is None:
            return policy
        targets = [TORCH_LORA_TARGETS[t] for t in self.args.lora_targets]
        return lora_policy(policy, self.args.lora_rank, self.args.lora_alpha, targets)

    def reset(self):
        from torch_ppo_baseline import Critic, TorchGRPO, TorchGRPOSettings, TorchPPO, TorchPPOSettings

        policy = self.load()
        minibatch = self.args.batch // self.args.minibatches
        if self.args.algorithm == "grpo":
            settings = TorchGRPOSettings(
                max_new_tokens=self.args.new_tokens, minibatch_size=minibatch, group=self.args.group
            )
            self.ppo = TorchGRPO(self.adapted(policy), torch_reward, settings)
            return
        config = policy.config
        # The trunk (GPT2Model, Gemma3TextModel, Qwen3MoeModel): the policy's base model.
        critic = Critic(type(policy.base_model)(config), self.torch.nn.Linear(config.hidden_size, 1))
        critic.trunk.load_state_dict(policy.base_model.state_dict())  # before adapters wrap its modules
        critic.head.load_state_dict(self.head.state_dict())
        policy = self.adapted(policy)
        settings = TorchPPOSettings(
            max_new_tokens=self.args.new_tokens, minibatch_size=self.args.batch // self.args.minibatches
        )
        self.ppo = TorchPPO(policy, critic, torch_reward, settings)

    def free(self):
        self.ppo = None
        gc.collect()

    def step(self) -> dict:
        return self.ppo.step(self.ids, self.mask)


def run(args) -> dict:
    import jaxrlhf

    with tempfile.TemporaryDirectory() as directory:
        head = build_checkpoint(args.model, directory)[1]  # the torch policy is rebuilt per block
        pretrained = jaxrlhf.load_pretrained(directory)
        jax_side = JaxSide(pretrained, head, args)
        torch_side = TorchSide(directory, head, args)
        del pretrained
        trainable = {"jax": jax_side.trainable_policy_params, "torch": torch_side.trainable_policy_params}
        print(f"trainable policy parameters: jaxrlhf {trainable['jax']:,}, torch {trainable['torch']:,}", flush=True)
        if args.lora_rank is not None and trainable["jax"] != trainable["torch"]:
            sys.exit(f"LoRA: jaxrlhf and torch train different numbers of policy parameters: {trainable}")

        xla_costs = {} if args.split else None  # filled at the warm-up
        split_keys = PHASES + ("rollout_1token",)
        fused, split, torch_times = [], {p: [] for p in split_keys}, {p: [] for p in PHASES}
        compile_fused = compile_split = float("nan")
        loads = [os.getloadavg()[0]]
        done = 0
        for block in range(-(-args.iters // args.block) + 1):
            # Block 0 is the warm-up (jaxrlhf compiles; torch's first step). Blocks alternate
            # which framework goes first, so slow spells of the shared machine hit both.
            warm_up = block == 0
            count = 1 if warm_up else min(args.block, args.iters - done)
            for side in ("jax", "torch") if block % 2 == 0 else ("torch", "jax"):
                if side == "jax":
                    jax_side.reset()
                    for _ in range(count):
                        costs = xla_costs if warm_up else None
                        t_fused = jax_side.fused(costs)
                        t_split = jax_side.split(costs) if args.split else {}
                        if warm_up:
                            compile_fused, compile_split = t_fused, sum(t_split.get(p, 0.0) for p in PHASES)
                        else:
                            fused.append(t_fused)
                            for p, t in t_split.items():
                                split[p].append(t)
                    jax_side.free()
                else:
                    torch_side.reset()
                    for _ in range(count):
                        times = torch_side.step()
                        for p, t in [] if warm_up else times.items():
                            torch_times[p].append(t)
                    torch_side.free()
                loads.append(os.getloadavg()[0])
            if not warm_up:
                done += count
            if args.verbose:
                i = len(fused) - 1
                last = (lambda d: sum(d[p][-1] for p in PHASES)) if i >= 0 else (lambda d: float("nan"))
                print(
                    f"  block {block}{' (warm-up)' if warm_up else ''}: jaxrlhf fused "
                    f"{compile_fused if warm_up else fused[-1]:.2f}s, split "
                    f"{compile_split if warm_up else (last(split) if args.split else float('nan')):.2f}s, "
                    f"torch {sum(times.values()) if warm_up else last(torch_times):.2f}s, "
                    f"load {loads[-1]:.1f}",
                    flush=True,
                )

    med = statistics.median
    n = len(fused)
    if not args.split:  # phases not measured: NaN in the table
        split = {p: [float("nan")] * n for p in split_keys}
    jax_totals = [sum(split[p][i] for p in PHASES) for i in range(n)]
    torch_totals = [sum(torch_times[p][i] for p in PHASES) for i in range(n)]
    return dict(
        num_params=jax_side.num_params,
        trainable_policy_params=trainable,
        shape=dataclasses.asdict(jax_side.shape),
        xla_flops=xla_costs,
        decode_step_bytes=decode_bytes(jax_side, args),
        jax={p: med(v) for p, v in split.items()} | {"total": med(jax_totals), "fused": med(fused)},
        torch={p: med(v) for p, v in torch_times.items()} | {"total": med(torch_totals)},
        compile_fused=compile_fused - med(fused),
        compile_split=compile_split - med(jax_totals),
        loads=loads,
    )


def flop_accounting(r: dict, args, peak_gflops: float, bandwidth_gbps: float) -> dict:
    """Per program (the three phases and the fused step): FLOPs by XLA's cost analysis and from
    shapes, which one is used (XLA counts a loop body once: the shapes for the programs with a
    loop over matrix products), seconds, GFLOP/s and the fraction of the matrix-product peak;
    and the decode step against its floor `max(FLOPs / peak, bytes / bandwidth)`."""
    shape = ModelShape(**r["shape"])
    counted = phase_flops(shape, args.batch, args.prompt_len, args.new_tokens, epochs=1, critic=args.algorithm == "ppo")
    seconds = {p: r["jax"][p] for p in PHASES} | {"fused": r["jax"]["fused"]}
    rows = []
    for program in (*PHASES, "fused"):
        source = "xla" if program == "experience" else "shapes"
        xla = r["xla_flops"][program]
        flops = xla if source == "xla" else counted[program]
        rate = flops / seconds[program] / 1e9
        rows.append(
            dict(
                program=program,
                xla_gflop=xla / 1e9,
                shapes_gflop=counted[program] / 1e9,
                used=source,
                seconds=seconds[program],
                gflop_s=rate,
                of_peak=rate / peak_gflops,
            )
        )
    n = args.new_tokens
    step_s = (r["jax"]["rollout"] - r["jax"]["rollout_1token"]) / (n - 1) if n > 1 else float("nan")
    if not step_s > 0:  # t(N) <= t(1): a tiny model's decode is within the timing noise
        step_s = float("nan")
    step_flops = decode_step_flops(shape, args.batch, args.prompt_len, n)
    step_bytes = r["decode_step_bytes"]
    compute_floor, memory_floor = step_flops / (peak_gflops * 1e9), step_bytes / (bandwidth_gbps * 1e9)
    decode = dict(
        step_ms=step_s * 1e3,
        gflop_per_step=step_flops / 1e9,
        mb_per_step=step_bytes / 1e6,
        gflop_s=step_flops / step_s / 1e9,
        gb_s=step_bytes / step_s / 1e9,
        of_bandwidth=step_bytes / step_s / 1e9 / bandwidth_gbps,
        compute_floor_ms=compute_floor * 1e3,
        memory_floor_ms=memory_floor * 1e3,
        of_floor=max(compute_floor, memory_floor) / step_s,
    )
    return dict(matmul_peak_gflops=peak_gflops, copy_bandwidth_gbps=bandwidth_gbps, programs=rows, decode=decode)


def markdown_tables(r: dict, flops: dict | None) -> str:
    """The result tables as markdown (what `--out` writes to ppo_step.md)."""
    lines = [
        "| phase (s / iteration) | jaxrlhf | torch | torch / jaxrlhf |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, key in TIME_ROWS:
        j, t = r["jax"][key], r["torch"][key]
        lines.append(f"| {label} | {j:.3f} | {t:.3f} | {t / j:.2f}x |")
    lines.append(
        f"| iteration (fused jit) | {r['jax']['fused']:.3f} | {r['torch']['total']:.3f} | "
        f"{r['torch']['total'] / r['jax']['fused']:.2f}x |"
    )
    if flops is not None:
        lines += [
            "",
            f"| program | XLA GFLOP | shapes GFLOP | used | s | GFLOP/s | of the matmul peak "
            f"({flops['matmul_peak_gflops']:.0f} GFLOP/s) |",
            "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
        ]
        for row in flops["programs"]:
            lines.append(
                f"| {row['program']} | {row['xla_gflop']:.2f} | {row['shapes_gflop']:.2f} | {row['used']} | "
                f"{row['seconds']:.3f} | {row['gflop_s']:.1f} | {row['of_peak']:.1%} |"
            )
        d = flops["decode"]
        lines += [
            "",
            f"| decode step ms | GFLOP | MB read | GB/s | of copy bandwidth ({flops['copy_bandwidth_gbps']:.1f} GB/s) "
            "| compute floor ms | memory floor ms | of floor |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {d['step_ms']:.2f} | {d['gflop_per_step']:.3f} | {d['mb_per_step']:.1f} | {d['gb_s']:.1f} | "
            f"{d['of_bandwidth']:.1%} | {d['compute_floor_ms']:.2f} | {d['memory_floor_ms']:.2f} | "
            f"{d['of_floor']:.1%} |",
        ]
    return "\n".join(lines) + "\n"


TIME_ROWS = (
    ("rollout", "rollout"),
    ("score + experience", "experience"),
    ("update", "update"),
    ("sum of phases", "total"),
)


def main(argv=None):
    from jaxrlhf.config import parse_config

    args = resolve(parse_config(Config, argv))

    import jax
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"PPO step benchmark, {started}")
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"(torch.set_num_threads({args.threads})), transformers {transformers.__version__}, "
        f"{os.cpu_count()} CPUs, load average {load_start[0]:.1f} {load_start[1]:.1f} {load_start[2]:.1f}"
    )
    lora = "full fine-tuning"
    if args.lora_rank is not None:
        lora = f"LoRA rank {args.lora_rank}, alpha {args.lora_alpha:g} on {' '.join(args.lora_targets)}"
    algorithm = "PPO with a critic"
    if args.algorithm == "grpo":
        algorithm = f"GRPO, {num_prompts(args)} prompts x G = {args.group}"
    print(
        f"{algorithm}; model {args.model} ({lora}), batch {args.batch}, prompt {args.prompt_len} "
        f"(left-padded, half to all real), {args.new_tokens} new tokens, 1 epoch x {args.minibatches} minibatches of "
        f"{args.batch // args.minibatches}, float32, median of {args.iters} interleaved iterations",
        flush=True,
    )
    peak = bandwidth = None
    if args.split:  # the FLOP table's references, measured before anything else runs
        from sweep import matmul_peak_gflops

        peak, bandwidth = matmul_peak_gflops(), copy_bandwidth_gbps()
        print(f"matrix-product peak {peak:.1f} GFLOP/s (jitted 2048^3 float32), copy bandwidth {bandwidth:.1f} GB/s")

    r = run(args)
    header = f"{'phase (s / iteration)':<26} {'jaxrlhf':>9} {'torch':>9} {'torch/jax':>10}"
    print(f"params {r['num_params'] / 1e6:.1f}M per model")
    print(header)
    print("-" * len(header))
    for label, key in TIME_ROWS:
        j, t = r["jax"][key], r["torch"][key]
        print(f"{label:<26} {j:>9.3f} {t:>9.3f} {t / j:>9.2f}x")
    fused, torch_total = r["jax"]["fused"], r["torch"]["total"]
    print(f"{'iteration (fused jit)':<26} {fused:>9.3f} {torch_total:>9.3f} {torch_total / fused:>9.2f}x")
    print("-" * len(header))
    print(
        f"jaxrlhf compile (not in the times above): fused step {r['compile_fused']:.1f} s, "
        f"three split phases {r['compile_split']:.1f} s"
    )
    print(f"load average (1 min) during the timed iterations: min {min(r['loads']):.1f}, max {max(r['loads']):.1f}")

    flops = None
    if args.split and args.verbose:
        print(f"XLA cost analyses took {r['xla_flops']['analysis_s']:.2f} s (compiled programs from jax's cache)")
    if args.split:
        flops = flop_accounting(r, args, peak, bandwidth)
        print("\nFLOPs per jaxrlhf program (used: xla = XLA's cost analysis, shapes = counted from shapes;")
        print("XLA counts a loop body once, so it misses the decode and minibatch loops)")
        print(
            f"{'program':<11} {'XLA GFLOP':>10} {'shapes GFLOP':>13} {'used':>7} {'s':>8} {'GFLOP/s':>8} {'of peak':>8}"
        )
        for row in flops["programs"]:
            print(
                f"{row['program']:<11} {row['xla_gflop']:>10.2f} {row['shapes_gflop']:>13.2f} {row['used']:>7} "
                f"{row['seconds']:>8.3f} {row['gflop_s']:>8.1f} {row['of_peak']:>7.1%}"
            )
        d = flops["decode"]
        print(
            f"decode step: {d['step_ms']:.2f} ms, {d['gflop_per_step']:.3f} GFLOP ({d['gflop_s']:.1f} GFLOP/s), "
            f"{d['mb_per_step']:.1f} MB read ({d['gb_s']:.1f} GB/s, {d['of_bandwidth']:.1%} of the copy bandwidth); "
            f"floor {max(d['compute_floor_ms'], d['memory_floor_ms']):.2f} ms (compute {d['compute_floor_ms']:.2f}, "
            f"memory {d['memory_floor_ms']:.2f}): {d['of_floor']:.1%} of it reached"
            + (" (t(N) - t(1) within the timing noise)" if math.isnan(d["step_ms"]) else "")
        )
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        record = dict(
            started=started,
            config=dataclasses.asdict(args),
            versions=dict(jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__),
            platform=jax.devices()[0].platform,
            cpus=os.cpu_count(),
            load_average_start=list(load_start),
            results=r,
            flops=flops,
        )
        with open(os.path.join(args.out, "ppo_step.json"), "w") as f:
            json.dump(record, f, indent=2, default=float)
        with open(os.path.join(args.out, "ppo_step.md"), "w") as f:
            f.write(markdown_tables(r, flops))
        print(f"wrote {os.path.join(args.out, 'ppo_step.json')} and ppo_step.md")
    print(f"ratio (torch / jaxrlhf) per {args.algorithm.upper()} iteration: {torch_total / fused:.2f}x")


if __name__ == "__main__":
    main()
