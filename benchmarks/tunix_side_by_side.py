"""jaxrlhf vs Google's Tunix, same Qwen2 weights: sampling tokens/s, seconds per GRPO and PPO iteration.

Run with the Python of the env `benchmarks/tunix_env.sh` builds (Tunix is never a dependency of
jaxrlhf: it pins older safetensors and transformers, so it lives in an env of its own):

    bash benchmarks/tunix_env.sh                                   # once: /work/venv-tunix
    /work/venv-tunix/bin/python benchmarks/tunix_side_by_side.py   # tiny, 5 repetitions
    /work/venv-tunix/bin/python benchmarks/tunix_side_by_side.py --config qwen2-125m --out /tmp/tunix
    /work/venv-tunix/bin/python benchmarks/tunix_side_by_side.py --quick   # smoke run: tiny, 1 rep

The weights: a random-weight jaxrlhf `LanguageModel(ModelConfig(model_type="qwen2", ...))` is
written as a Hugging Face Qwen2 checkpoint with `jaxrlhf.models.save_pretrained`, then loaded
back on both sides: `jaxrlhf.models.load_pretrained` and Tunix's
`tunix.models.qwen2.params.create_model_from_safe_tensors` (an nnx `Qwen2`). The configs (`CONFIGS`):

    tiny        2 layers of width 128, 4 query / 2 KV heads of 32, MLP 256, vocabulary 512
    qwen2-125m  Qwen2-0.5B's layer shape (width 896, 14 query / 2 KV heads of 64, SwiGLU 4864,
                q/k/v biases, rope theta 1e6, tied embeddings) with 6 layers instead of 24 and a
                40960-token vocabulary instead of 151936: 126M parameters (the real vocabulary's
                embedding alone would be 136M)

What is timed (after one untimed call of each program: its compile, reported apart):

    sampling    the same B prompts (left-padded to P, P/2 to P real tokens, ids in [1, V)), N new
                tokens each, greedy and at temperature 1 (no top-k, top-p 1), no EOS (every row
                runs to N tokens). jaxrlhf: `make_sampler(model, max_new_tokens=N, ...)` called as
                `sampler(params, ids, mask, key)`. Tunix: `tunix.generate.sampler.Sampler` with a KV
                cache of exactly P + N slots, called on the prompts as it is used (its `__call__`:
                strings in, token lists and decoded strings out, the host work included), and its
                two jitted programs alone (`init_sample_state`, prefill, decode loop, on arrays:
                "tunix (jit only)"), to tell its host work from its device work. tokens/s = B N / t.
    GRPO        one iteration on the same Q prompts x G responses, N new tokens, temperature 1,
                learning rate, one update per batch (one minibatch, one epoch), KL to the reference
                as a k3 ("low_var_kl") loss term with beta 0.04, clip 0.2, each response's token
                mean averaged over responses, AdamW (betas 0.9 / 0.999, eps 1e-8, no weight decay)
                after a global-norm clip at 1. The reward: the fraction of response tokens with an
                even id. jaxrlhf: `PPO(preset("grpo", PPOConfig(...)), model, reward_fn)`'s fused
                step (`bind(frozen, donate=True)`: rollout, reward, reference and policy log-probs,
                advantages and the update under one `jax.jit`). Tunix: `GRPOLearner` over an
                `RLCluster` (actor, reference and rollout on one 1-device mesh, the "vanilla"
                rollout engine), one global step of its own `train` loop per batch.
    PPO         the same, Q prompts x 1 response, with a critic: a copy of the trunk plus a linear
                value head (the same random head on both sides), its own AdamW (same numbers),
                value clip 0.2, GAE (gamma 1, lambda 0.95) with whitened advantages, and the KL to
                the reference as a k1 penalty in the reward (beta 0.05). jaxrlhf: `preset("ppo")`
                with `critic=ValueModel(...)`. Tunix: `PPOLearner` with `Qwen2Critic` (below: Tunix
                has no critic for its Qwen2, so one is written here from its modules: its layers
                and final norm, then the head, no vocabulary projection, as jaxrlhf's `ValueModel`).

The two run interleaved in one process. Sampling: each repetition calls jaxrlhf, Tunix, Tunix
(jit only) once per temperature. GRPO and PPO: Tunix's `train` runs over `TUNIX_WARMUP_STEPS` +
reps identical batches; its data iterator (which Tunix's loop calls between global steps, from its
data thread, while the trainer waits for data) first waits for Tunix's parameters to be ready, then
times one jaxrlhf step, so a Tunix step is the time from one batch handed out to the next batch
asked for, jaxrlhf's step excluded. Tunix's first two steps are dropped (the first compiles; for
PPO the second compiles again, 1.4 s against 0.09 s on the tiny config), and jaxrlhf's step beside
them (it was compiled before). The tables show medians, with the load average (1 minute) seen
during the runs.

Every difference between the two setups that we know of:

- Attention: jaxrlhf's own (`jaxrlhf.tuning` picks the backend's fast path; on CPU plain XLA
  dot-products); Tunix's Qwen2 with `use_flash_attention=False` (its default; its flash kernel
  is TPU-only), plain einsums with a full [B, L, cache] mask.
- Compilation: jaxrlhf's `Tuning.for_backend` (compiler options per backend and batch); Tunix with
  XLA's defaults. Sampling prompt buckets: jaxrlhf pads prompts to a bucket length (P itself here,
  a power of two); Tunix to `max_prompt_length` = P.
- Sharding: jaxrlhf unsharded on the default device (no mesh); Tunix on a 1-device mesh with
  axes ("fsdp", "tp") (what `RLCluster` requires), which on one device shards nothing.
- dtype: float32 parameters and compute on both sides.
- KV cache: jaxrlhf grows its cache in segments (`cache_segments` None: `segment_ends`), reading
  only the slots written so far; Tunix allocates P + N slots once and attends over all of them
  with a mask every step.
- Padding: Tunix marks padding by `token == pad_id` (0 here), also for generated tokens: a
  sampled 0 is treated as padding afterwards (masked from attention and from the GRPO loss).
  jaxrlhf masks by the prompt mask and the EOS only. With random weights about 1/V of the sampled
  tokens are 0; the script reports how many Tunix's greedy output holds.
- Sampling work per step: jaxrlhf's sampler always returns each token's log-prob (a log-softmax
  over the vocabulary per step); Tunix's only with `return_logprobs` (off: its default, also in
  its GRPO rollout). At temperature 1 with top-p 1 both draw from the full distribution without
  sorting it.
- EOS: none on either side (jaxrlhf `eos_token_id=None` / -1; Tunix `eos_tokens=[-1]`, an id that
  never occurs), so every response has N tokens.
- Tokenizer: Tunix's sampler and learner take text. The prompts are passed as space-separated
  ids through a minimal tokenizer (`IdTokenizer`: encode splits, decode joins), so both sides see
  the same token ids; Tunix's per-step host work (encoding, decoding every response, its Python
  reward on the decoded text) is part of its time, as it would be in use.
- Reward: jaxrlhf's is a JAX function inside the jitted step; Tunix's a Python function on the
  decoded completions (its API), run on the host between rollout and update.
- Reference model: jaxrlhf's reference is the initial parameters passed as frozen arrays (no
  copy); Tunix loads a second `Qwen2` from the checkpoint (a second copy of the weights).
- What a step holds: jaxrlhf's fused step is one program (rollout, reward, reference and policy
  log-probs over prompt + response, advantages, one update). Tunix's global step: host-side
  batching and prompt repetition (x G), the rollout (prefill + decode loop, two programs), its
  reward function, the reference log-probs (a separate jitted forward), group advantages on the
  host, the trainer's jitted update (its policy forward also computes the token entropy from the
  logits for logging), its metrics buffering and progress bar, and the data thread's queue
  hand-off. The rollout shares the actor's weights (same mesh), so there is no weight sync.
- Old log-probs (GRPO): Tunix's GRPO with one iteration has no old-policy forward (its ratio's
  old log-probs are the policy's own, stop-gradient). jaxrlhf's takes them from its sampler
  (`old_logprobs_from_sampler=True`, `--sampler_logprobs`, the default here), which it computes
  anyway, so neither side runs that forward; with `--no-sampler_logprobs` jaxrlhf recomputes
  them with a policy forward over prompt + response (its trainer's default), one forward more.
- Critic (PPO): both a copy of the trunk, initialised from the checkpoint, with the same head;
  Tunix loads a third `Qwen2` for it (actor, reference, critic trunk), jaxrlhf copies the arrays.
- Logging: jaxrlhf's step returns its metrics as arrays (not fetched here); Tunix logs through its
  `MetricsLogger` (a temporary directory) and buffers per-step metrics on the host.
- PPO: both recompute the old policy's log-probs and the critic's values with forwards over
  prompt + response; Tunix runs them (and the reference's) as separate programs and updates the
  actor and the critic with two trainers (two jitted updates), jaxrlhf's fused step does all of
  it in one program.
- Tunix 0.1.7's `PPOLearner` adds the scores into `jnp.zeros_like(completion_ids)`, an int32
  array, so a reward function's fractional scores are truncated to integers (JAX warns: "scatter
  inputs have incompatible types"); here every score in [0, 1) becomes 0. The work per step is
  the same, so the timing stands, but Tunix's PPO does not learn from this reward.

Not a measurement of quality: the weights are random, only the speed is compared.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Literal

import numpy as np
import tyro

# Qwen2 shapes (jaxrlhf `ModelConfig` fields); both share `QWEN2_COMMON`.
QWEN2_COMMON = dict(rope_theta=1_000_000.0, norm_eps=1e-6, qkv_bias=True, tie_word_embeddings=True)
CONFIGS = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=256,
        max_position_embeddings=512,
    ),
    # Qwen2-0.5B's layers (24 of them there), 6 of them, and a 40960-token vocabulary: 126M parameters.
    "qwen2-125m": dict(
        vocab_size=40960,
        hidden_size=896,
        num_layers=6,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=4864,
        max_position_embeddings=2048,
    ),
}
PAD_ID = 0
NO_EOS = -1  # Tunix's EOS list and jaxrlhf's eos_token_id: an id no token has
# Untimed first steps of Tunix's learners: the first compiles everything, and the second compiles
# again for PPO (1.4 s instead of 0.09 s on the tiny config: a program retraced once the updated
# parameters come back); GRPO's second step is already steady, dropping it costs one step.
TUNIX_WARMUP_STEPS = 2


@dataclasses.dataclass(frozen=True)
class Args:
    """jaxrlhf vs Tunix on the same Qwen2 weights: sampling tokens/s, seconds per GRPO and PPO
    iteration (see the module docstring of benchmarks/tunix_side_by_side.py for what is timed)."""

    quick: bool = False
    """The tiny config, 16 new tokens, 1 repetition: a smoke run, not a measurement."""
    config: Literal[tuple(CONFIGS)] = "tiny"
    """Model shape (see CONFIGS)."""
    batch: int = 16
    """Prompts per sampling call."""
    prompt_len: int = 32
    """Prompt length P (left-padded; P/2 to P real tokens); a power of two, so that neither side
    pads it further."""
    new_tokens: int | None = None
    """New tokens N per response, sampling and GRPO (None: 64, 16 with --quick)."""
    temperatures: tuple[float, ...] = (0.0, 1.0)
    """Sampling temperatures to time (0: greedy)."""
    grpo_prompts: int = 4
    """Prompts Q per GRPO iteration (each sampled --group times) and per PPO iteration (once each)."""
    group: int = 4
    """G, responses per prompt."""
    learning_rate: float = 1e-5
    """AdamW learning rate, both sides."""
    reps: int = 5
    """Interleaved repetitions; medians are reported (1 with --quick)."""
    sampling: bool = True
    """Time the samplers."""
    grpo: bool = True
    """Time the GRPO iterations."""
    ppo: bool = True
    """Time PPO iterations (--grpo_prompts prompts, one response each, a critic) the same way."""
    sampler_logprobs: bool = True
    """jaxrlhf's GRPO takes the ratio's old log-probs from its sampler (`old_logprobs_from_sampler`),
    as Tunix's GRPO with one iteration skips that forward; --no-sampler_logprobs recomputes them with
    a policy forward (jaxrlhf's default)."""
    seed: int = 0
    """Weights, prompts and sampling keys."""
    out: str | None = None
    """Also write the figures to OUT/tunix_side_by_side.json and the tables to OUT/tunix_side_by_side.md."""


def resolve(args: Args) -> Args:
    """`args` with the --quick and None defaults filled in, checked before jax starts."""
    if args.quick:
        args = dataclasses.replace(args, config="tiny", reps=1, new_tokens=args.new_tokens or 16)
    args = dataclasses.replace(args, new_tokens=args.new_tokens or 64)
    if args.prompt_len < 2 or args.prompt_len & (args.prompt_len - 1):
        sys.exit(f"--prompt_len must be a power of two >= 2, got {args.prompt_len}")
    if min(args.batch, args.new_tokens, args.grpo_prompts, args.reps) < 1:
        sys.exit("--batch, --new_tokens, --grpo_prompts and --reps must be >= 1")
    if args.group < 2:
        sys.exit(f"--group must be >= 2 (GRPO's baseline is the group), got {args.group}")
    if args.prompt_len + args.new_tokens > CONFIGS[args.config]["max_position_embeddings"]:
        sys.exit(f"--prompt_len + --new_tokens exceeds {args.config}'s position table")
    if any(t < 0 for t in args.temperatures):
        sys.exit(f"--temperatures must be >= 0, got {args.temperatures}")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        sys.exit(f"--out {args.out} exists and is not a directory")
    return args


class IdTokenizer:
    """Token ids as text, for Tunix's text-in sampler and learner: ``encode("5 17 3") == [5, 17, 3]``,
    ``decode`` joins with spaces. No BOS; padding 0; an EOS id (-1) no token has."""

    def encode(self, text: str, **kwargs) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **kwargs) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return None

    def eos_id(self) -> int:
        return NO_EOS

    def pad_id(self) -> int:
        return PAD_ID


def make_prompts(rows: int, prompt_len: int, vocab: int, seed: int):
    """Left-padded prompts, P/2 to P real tokens with ids in [1, vocab) (0 is padding): ids, mask
    ``[rows, P]`` and the same prompts as Tunix's text."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_len // 2, prompt_len + 1, size=rows)
    ids = rng.integers(1, vocab, size=(rows, prompt_len)).astype(np.int32)
    mask = (np.arange(prompt_len)[None, :] >= prompt_len - lengths[:, None]).astype(np.int32)
    ids = ids * mask
    texts = [" ".join(str(t) for t in row[row > 0]) for row in ids]
    return ids, mask, texts


def even_fraction_jax(prompt_ids, prompt_mask, response_ids, response_mask):
    """jaxrlhf's reward: the fraction of valid response tokens with an even id."""
    import jax.numpy as jnp

    even = (response_ids % 2 == 0).astype(jnp.float32) * response_mask
    return even.sum(1) / jnp.maximum(response_mask.sum(1), 1)


def even_fraction_text(prompts, completions, **kwargs) -> list[float]:
    """Tunix's reward (a Python function on decoded completions): the same fraction."""
    scores = []
    for text in completions:
        ids = [int(t) for t in text.split()]
        scores.append(sum(i % 2 == 0 for i in ids) / max(len(ids), 1))
    return scores


def write_checkpoint(config_name: str, directory: str, seed: int):
    """A random-weight jaxrlhf Qwen2 saved as an HF checkpoint; returns its `ModelConfig`."""
    import jax

    from jaxrlhf.models import LanguageModel, ModelConfig, save_pretrained

    config = ModelConfig(model_type="qwen2", **CONFIGS[config_name], **QWEN2_COMMON, pad_token_id=PAD_ID)
    model = LanguageModel(config)
    save_pretrained(directory, model, model.init_params(jax.random.PRNGKey(seed)))
    return config


def tunix_mesh():
    """The 1-device mesh with Tunix's axis names ("fsdp", "tp"), both automatic (as
    `tunix.utils.mesh` builds them; an explicit-axes mesh makes its embedding lookup ambiguous)."""
    import jax

    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(auto, auto), devices=jax.devices()[:1])


def tunix_model(directory: str, config, mesh):
    """Tunix's nnx `Qwen2` of the checkpoint in `directory`, float32, on `mesh`."""
    import jax.numpy as jnp
    from tunix.models.qwen2 import model as qwen2_model
    from tunix.models.qwen2 import params as qwen2_params

    tunix_config = qwen2_model.ModelConfig(
        num_layers=config.num_layers,
        vocab_size=config.vocab_size,
        embed_dim=config.hidden_size,
        hidden_dim=config.intermediate_size,
        num_heads=config.num_heads,
        head_dim=config.head_dim,
        num_kv_heads=config.num_kv_heads,
        rope_theta=int(config.rope_theta),
        norm_eps=config.norm_eps,
        use_tied_embedding=config.tie_word_embeddings,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    )
    return qwen2_params.create_model_from_safe_tensors(directory, tunix_config, mesh=mesh, dtype=jnp.float32)


def timed(fn, *call_args):
    """(fn's output with every array ready, its wall-clock seconds)."""
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(*call_args))
    return out, time.perf_counter() - start


def sampling_side_by_side(args: Args, jax_side, tunix_net, config, loads: list) -> dict:
    """Tokens/s of jaxrlhf's sampler, Tunix's sampler and Tunix's jitted programs alone."""
    import jax
    import jax.numpy as jnp
    from tunix.generate import sampler as tunix_sampler

    P, N, B = args.prompt_len, args.new_tokens, args.batch
    ids, mask, texts = make_prompts(B, P, config.vocab_size, args.seed + 1)
    from jaxrlhf.sampling import make_sampler

    cache = tunix_sampler.CacheConfig(
        cache_size=P + N, num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim
    )
    tunix = tunix_sampler.Sampler(tunix_net, IdTokenizer(), cache)
    # Tunix's mode: greedy unless top_p is given; top_p 1.0 with a temperature samples unfiltered.
    results = {}
    for temperature in args.temperatures:
        top_p = None if temperature == 0 else 1.0
        ours = make_sampler(
            jax_side.model, max_new_tokens=N, temperature=temperature, eos_token_id=None, pad_token_id=PAD_ID
        )

        def run_jaxrlhf(rep):
            return ours(jax_side.params, ids, mask, jax.random.PRNGKey(rep)).tokens

        def run_tunix(rep):
            out = tunix(
                texts,
                max_generation_steps=N,
                max_prompt_length=P,
                eos_tokens=[NO_EOS],
                temperature=temperature,
                top_p=top_p,
                seed=rep,
            )
            return out.tokens

        def run_tunix_jit(rep):
            # What `Sampler.__call__` runs on the device, without its host-side encoding and decoding.
            state = tunix.init_sample_state(
                jnp.asarray(ids),
                total_sampling_steps=P + N,
                include_logits=False,
                forbidden_token_ids=None,
                temperature=temperature,
                top_p=top_p,
                top_k=None,
                seed=jax.random.PRNGKey(rep),
                beam_size=None,
            )
            state = tunix._compiled_prefill_fn(tunix._flattened_transformer_state, state, None, echo=False)
            state = tunix._compiled_decode_fn(tunix._flattened_transformer_state, state)
            return state.token_buffer

        programs = {"jaxrlhf": run_jaxrlhf, "tunix": run_tunix, "tunix (jit only)": run_tunix_jit}
        first = {name: timed(fn, 0) for name, fn in programs.items()}  # compile + one call
        times = {name: [] for name in programs}
        for rep in range(args.reps):
            for name, fn in programs.items():
                times[name].append(timed(fn, rep + 1)[1])
            loads.append(os.getloadavg()[0])
        medians = {name: statistics.median(t) for name, t in times.items()}
        tunix_tokens = first["tunix"][0]
        row = dict(temperature=temperature, tokens=B * N, programs={})
        for name in programs:
            row["programs"][name] = dict(
                seconds=medians[name],
                tokens_per_s=B * N / medians[name],
                compile_s=first[name][1] - medians[name],
                all_seconds=times[name],
            )
        row["tunix_tokens_per_row"] = sorted({len(t) for t in tunix_tokens})
        row["tunix_generated_pad_fraction"] = float(np.mean([np.mean(np.asarray(t) == PAD_ID) for t in tunix_tokens]))
        if temperature == 0:
            # Same weights, same greedy decoding: the first tokens should agree (float32 round-off
            # may flip a near-tie later on).
            ours_tokens = np.asarray(first["jaxrlhf"][0])
            theirs = np.stack([np.asarray(t)[:N] for t in tunix_tokens]) if row["tunix_tokens_per_row"] == [N] else None
            row["greedy_first_token_agreement"] = (
                None if theirs is None else float(np.mean(ours_tokens[:, 0] == theirs[:, 0]))
            )
            row["greedy_token_agreement"] = None if theirs is None else float(np.mean(ours_tokens == theirs))
        results[f"T={temperature:g}"] = row
    return results


def qwen2_critic(trunk, head: dict):
    """Tunix's PPO critic for the Qwen2 `trunk`: its layers and final norm, then a linear value
    head (`head`'s kernel [D, 1] and bias [1], jaxrlhf's initial head), per-token values [B, T, 1].
    Tunix calls a critic as it calls its policy; the vocabulary head is not computed, as in
    jaxrlhf's `ValueModel`."""
    import jax.numpy as jnp
    from flax import nnx
    from tunix.models.qwen2 import model as qwen2_model

    class Qwen2Critic(nnx.Module):
        def __init__(self):
            self.trunk = trunk
            self.value_head = nnx.Linear(trunk.config.embed_dim, 1, rngs=nnx.Rngs(0))
            self.value_head.kernel.value = jnp.asarray(head["kernel"])
            self.value_head.bias.value = jnp.asarray(head["bias"])

        def __call__(self, input_tokens, positions, cache=None, attention_mask=None, segment_ids=None, **kwargs):
            net = self.trunk
            x = net.embedder.encode(input_tokens)
            sin, cos = qwen2_model._generate_pos_embeddings(positions, net.config.head_dim, net.config.rope_theta)
            sin, cos = sin.astype(x.dtype), cos.astype(x.dtype)
            for layer in net.layers:
                _, x = layer(x, None, attention_mask, sin, cos, segment_ids=segment_ids)
            return self.value_head(net.final_norm(x)), None

    return Qwen2Critic()


def learner_side_by_side(args: Args, algorithm: str, jax_side, directory: str, config, loads: list) -> dict:
    """Seconds per iteration of `algorithm` ("grpo" or "ppo"): jaxrlhf's fused step, interleaved
    with Tunix's `GRPOLearner` / `PPOLearner` (see the module docstring)."""
    import jax
    import optax
    from flax import nnx
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.ppo import ppo_learner
    from tunix.rl.rollout import base_rollout
    from tunix.sft import metrics_logger

    from jaxrlhf.models import ValueModel, init_value_head
    from jaxrlhf.training import PPO, PPOConfig
    from jaxrlhf.training.presets import preset

    P, N, Q = args.prompt_len, args.new_tokens, args.grpo_prompts
    G = args.group if algorithm == "grpo" else 1
    ids, mask, texts = make_prompts(Q, P, config.vocab_size, args.seed + 2)
    base = PPOConfig(
        total_steps=1000,
        batch_size=Q * G,
        minibatch_size=Q * G,
        ppo_epochs=1,
        max_new_tokens=N,
        max_prompt_len=P,
        temperature=1.0,
        top_k=None,
        top_p=1.0,
        eos_token_id=NO_EOS,
        pad_token_id=PAD_ID,
        learning_rate=args.learning_rate,
        critic_learning_rate=args.learning_rate,
        max_grad_norm=1.0,
        weight_decay=0.0,
        seed=args.seed,
    )
    head = init_value_head(jax.random.PRNGKey(args.seed + 3), config.hidden_size, scale=1.0)
    if algorithm == "grpo":
        grpo_config = base.replace(num_generations=G, old_logprobs_from_sampler=args.sampler_logprobs)
        ppo = PPO(preset("grpo", grpo_config), jax_side.model, even_fraction_jax)
        value_params = None
    else:  # PPO with a separate critic (a trunk + head), k1 KL penalty in the reward, GAE
        ppo_config = preset("ppo", base.replace(kl_coef=0.05, kl_estimator="k1", kl_placement="reward"))
        ppo = PPO(ppo_config, jax_side.model, even_fraction_jax, critic=ValueModel(jax_side.model.config))
        value_params = {"trunk": jax.tree.map(lambda x: x.copy(), jax_side.params), "head": head}
    frozen = ppo.frozen_params(ref_params=jax_side.params)
    batch = ppo.prompt_batch(ids, mask)
    step = ppo.bind(frozen, donate=True)
    state = ppo.init_state(jax.tree.map(lambda x: x.copy(), jax_side.params), value_params)
    (state, _), jax_first = timed(step, state, batch)

    mesh = tunix_mesh()
    actor, reference = tunix_model(directory, config, mesh), tunix_model(directory, config, mesh)
    roles = [rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE, rl_cluster_lib.Role.ROLLOUT]
    critic = None
    if algorithm == "ppo":
        critic = qwen2_critic(tunix_model(directory, config, mesh), head)
        roles.append(rl_cluster_lib.Role.CRITIC)

    def optimizer():
        return optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(args.learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0),
        )

    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={role: mesh for role in roles},
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optimizer(),
            critic_optimizer=optimizer() if critic is not None else None,
            eval_every_n_steps=10**9,
            max_steps=args.reps + 10,  # the loop ends when the batches do
            metrics_logging_options=metrics_logger.MetricsLoggerOptions(
                log_dir=tempfile.mkdtemp(prefix="tunix_metrics_"), flush_every_n_steps=10**9
            ),
            pbar_description=None,
        ),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=N,
            max_prompt_length=P,
            kv_cache_size=P + N,
            temperature=1.0,
            top_p=1.0,
            top_k=None,
            eos_tokens=[NO_EOS],
        ),
    )
    cluster = rl_cluster_lib.RLCluster(
        actor=actor, critic=critic, reference=reference, tokenizer=IdTokenizer(), cluster_config=cluster_config
    )
    if algorithm == "grpo":
        learner = grpo_learner.GRPOLearner(
            rl_cluster=cluster,
            algo_config=grpo_learner.GRPOConfig(
                num_generations=G,
                num_iterations=1,
                beta=0.04,
                epsilon=0.2,
                kl_loss_mode="low_var_kl",
                loss_agg_mode="sequence-mean-token-mean",
            ),
            reward_fns=even_fraction_text,
        )
    else:
        learner = ppo_learner.PPOLearner(
            rl_cluster=cluster,
            ppo_config=ppo_learner.PPOConfig(
                num_iterations=1,
                gamma=1.0,
                gae_lambda=0.95,
                beta=0.05,
                kl_method="kl",
                epsilon=0.2,
                clip_range_value=0.2,
            ),
            reward_fns=even_fraction_text,
        )

    def tunix_params_ready():
        trainers = [cluster.actor_trainer] + ([cluster.critic_trainer] if critic is not None else [])
        jax.block_until_ready([jax.tree.leaves(nnx.state(t.model)) for t in trainers])

    jax_times, tunix_marks = [], []
    holder = {"state": state}

    def batches():
        """Identical batches, TUNIX_WARMUP_STEPS + reps of them; between two, one timed jaxrlhf step
        (while Tunix waits for data)."""
        for i in range(TUNIX_WARMUP_STEPS + args.reps):
            if i:
                tunix_params_ready()
                tunix_marks.append(("end", time.perf_counter()))
                (holder["state"], _), seconds = timed(step, holder["state"], batch)
                jax_times.append(seconds)
                loads.append(os.getloadavg()[0])
            tunix_marks.append(("start", time.perf_counter()))
            yield {"prompts": np.array(texts)}  # an array, as Tunix repeats it x G along axis 0
        tunix_params_ready()
        tunix_marks.append(("end", time.perf_counter()))

    learner.train(batches())
    starts = [t for kind, t in tunix_marks if kind == "start"]
    ends = [t for kind, t in tunix_marks if kind == "end"]
    tunix_steps = [end - start for start, end in zip(starts, ends)]
    if len(tunix_steps) != TUNIX_WARMUP_STEPS + args.reps:
        raise RuntimeError(f"Tunix ran {len(tunix_steps)} {algorithm} steps, expected {TUNIX_WARMUP_STEPS + args.reps}")
    # jaxrlhf was compiled before; its steps beside Tunix's warm-up are dropped too.
    jax_times = jax_times[TUNIX_WARMUP_STEPS - 1 :]
    tunix_times = tunix_steps[TUNIX_WARMUP_STEPS:]
    jax_median, tunix_median = statistics.median(jax_times), statistics.median(tunix_times)
    rollout_tokens = Q * G * N
    return dict(
        prompts=Q,
        group=G,
        rollout_tokens=rollout_tokens,
        train_steps_tunix=cluster.actor_trainer.train_steps,
        programs={
            "jaxrlhf": dict(
                seconds=jax_median,
                tokens_per_s=rollout_tokens / jax_median,
                compile_s=jax_first - jax_median,
                all_seconds=jax_times,
            ),
            "tunix": dict(
                seconds=tunix_median,
                tokens_per_s=rollout_tokens / tunix_median,
                compile_s=sum(tunix_steps[:TUNIX_WARMUP_STEPS]) - TUNIX_WARMUP_STEPS * tunix_median,
                all_seconds=tunix_times,
            ),
        },
    )


def markdown(args: Args, results: dict) -> str:
    """The tables: sampling and GRPO, medians, Tunix / jaxrlhf time ratios."""
    lines = [
        f"{results['date']}, {results['config']} ({results['parameters'] / 1e6:.1f}M parameters), "
        f"{results['backend']}, load average (1 min) during the runs {results['load_average'][0]:.2f}-"
        f"{results['load_average'][1]:.2f}, medians of {args.reps} interleaved repetitions",
        "",
    ]
    if "sampling" in results:
        lines += [
            f"Sampling: {args.batch} prompts x {args.prompt_len} tokens, {args.new_tokens} new tokens, no EOS",
            "",
            "| temperature | program | s/call | tokens/s | compile s | tunix / jaxrlhf time |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for row in results["sampling"].values():
            ours = row["programs"]["jaxrlhf"]["seconds"]
            for name, p in row["programs"].items():
                # The jit-only programs are the ones Tunix's call compiled just before.
                compile_s = "(tunix's)" if name == "tunix (jit only)" else f"{p['compile_s']:.1f}"
                lines.append(
                    f"| {row['temperature']:g} | {name} | {p['seconds']:.4f} | {p['tokens_per_s']:.0f} | "
                    f"{compile_s} | {p['seconds'] / ours:.2f}x |"
                )
        greedy = results["sampling"].get("T=0")
        if greedy is not None and greedy.get("greedy_token_agreement") is not None:
            lines += [
                "",
                f"Greedy tokens equal on both sides: {greedy['greedy_first_token_agreement']:.0%} of first tokens, "
                f"{greedy['greedy_token_agreement']:.0%} of all; Tunix's greedy output is "
                f"{greedy['tunix_generated_pad_fraction']:.1%} pad (0) tokens.",
            ]
        lines.append("")
    for algorithm in ("grpo", "ppo"):
        if algorithm not in results:
            continue
        g = results[algorithm]
        ours = g["programs"]["jaxrlhf"]["seconds"]
        what = f"x G = {g['group']}" if algorithm == "grpo" else "x 1, a critic (trunk + value head)"
        lines += [
            f"{algorithm.upper()} iteration: {g['prompts']} prompts {what}, {args.prompt_len} + {args.new_tokens} "
            f"tokens, 1 update, lr {args.learning_rate:g}",
            "",
            "| program | s/iteration | rollout tokens/s | compile s | tunix / jaxrlhf time |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, p in g["programs"].items():
            lines.append(
                f"| {name} | {p['seconds']:.3f} | {p['tokens_per_s']:.0f} | {p['compile_s']:.1f} | "
                f"{p['seconds'] / ours:.2f}x |"
            )
        lines.append("")
    return "\n".join(lines)


def main(args: Args) -> dict:
    args = resolve(args)
    import importlib.metadata

    import jax

    from jaxrlhf.models import load_pretrained

    loads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="tunix_side_by_side_") as directory:
        config = write_checkpoint(args.config, directory, args.seed)
        with warnings.catch_warnings():  # the checkpoint has no tokenizer: ids are passed directly
            warnings.simplefilter("ignore", UserWarning)
            jax_side = load_pretrained(directory)
        parameters = sum(x.size for x in jax.tree.leaves(jax_side.params))
        print(
            f"{args.config}: {parameters / 1e6:.1f}M parameters; jax {jax.__version__}, tunix "
            f"{importlib.metadata.version('google-tunix')}, {jax.default_backend()} ({jax.devices()[0].device_kind})",
            flush=True,
        )
        results: dict = dict(
            date=str(datetime.date.today()),
            config=args.config,
            model=CONFIGS[args.config],
            parameters=int(parameters),
            backend=f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
            args=dataclasses.asdict(args),
        )
        if args.sampling:
            mesh = tunix_mesh()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # `with mesh:`, as Tunix's RLCluster does
                with mesh:
                    results["sampling"] = sampling_side_by_side(
                        args, jax_side, tunix_model(directory, config, mesh), config, loads
                    )
        if args.grpo:
            results["grpo"] = learner_side_by_side(args, "grpo", jax_side, directory, config, loads)
        if args.ppo:
            results["ppo"] = learner_side_by_side(args, "ppo", jax_side, directory, config, loads)
    results["load_average"] = [min(loads), max(loads)] if loads else [float("nan")] * 2
    table = markdown(args, results)
    print("\n" + table)
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tunix_side_by_side.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(args.out, "tunix_side_by_side.md"), "w") as f:
            f.write(table + "\n")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
