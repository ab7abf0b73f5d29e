"""Sampling throughput: jaxrlhf `make_sampler` vs transformers `generate` (PyTorch), same weights.

For each case a random-weight model is built with transformers, saved as an HF checkpoint and
loaded with `jaxrlhf.load_pretrained`, so both sides run the same weights and shapes (with
`--no-torch`, jaxrlhf writes the random checkpoint itself and torch is never imported). Both sample
(temperature 1, no top-k/top-p filtering) with a KV cache, produce exactly `new` tokens per row (no
EOS), and are timed back to back in the same process, interleaved, `--reps` times; the table shows
medians. PyTorch runs with `torch.set_num_threads(--threads)` (default 2).

    python benchmarks/sampling.py            # the default cases (see DEFAULT)
    python benchmarks/sampling.py --quick    # one small and one large case, fewer repetitions
    python benchmarks/sampling.py --cases tiny-b128-n64 gpt2-124m-b16-n64 --reps 7
    python benchmarks/sampling.py --roofline --no-torch   # on a GPU: decode-step bandwidth roofline

`--roofline` adds, per case, the time of one decode step (`(t(N) - t(1)) / (N - 1)`, so prefill and
compile are excluded), the bytes a step must at least move (every parameter once, plus the keys and
values of the cache slots attention reads, averaged over the steps), the bandwidth this implies,
and its fraction of the device's memory bandwidth: measured here by a jitted sum over a large array
(`--peak-gbps` overrides it with a datasheet figure, e.g. 3350 for an H100 SXM).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from typing import Literal

import numpy as np


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    family: str  # the HF model_type: "gpt2", "llama", "gemma3_text", "qwen3_moe"
    hf_config: dict
    batch: int
    prompt_len: int
    new_tokens: int


GPT2_124M = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
# Llama-shaped, ~153M parameters: 12 layers of width 768, grouped-query attention (12 q / 4 kv
# heads), SwiGLU 3072, 32k vocabulary with an untied head.
LLAMA_150M = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)
# The small-model regime of RLHF research: a 6-layer, width-144 GPT-2 with a tiny vocabulary.
GPT2_TINY = dict(vocab_size=30, n_positions=128, n_embd=144, n_layer=6, n_head=4)
# Gemma-3-shaped, ~121M parameters: Gemma 3 270M's layers (18 of width 640, 4 query heads / 1 KV
# head of 256 dims, GELU-gated MLP 2048, five sliding-window layers of 512 per global one, q/k
# norms, sandwich norms) with a 32k tied vocabulary instead of 262k.
GEMMA3_125M = dict(
    vocab_size=32000,
    hidden_size=640,
    intermediate_size=2048,
    num_hidden_layers=18,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    max_position_embeddings=2048,
    sliding_window=512,
    query_pre_attn_scalar=256,
)
# Qwen3-MoE-shaped, ~124M parameters of which ~49M active per token: 9 layers of width 512,
# 8 query / 2 KV heads, 16 experts of width 384 with top-2 routing (renormalised), untied 32k head.
MOE_125M = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1536,
    moe_intermediate_size=384,
    num_hidden_layers=9,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=16,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)

CASES = [
    Case("gpt2-124m-b16-n64", "gpt2", GPT2_124M, 16, 32, 64),
    Case("gpt2-124m-b16-n128", "gpt2", GPT2_124M, 16, 32, 128),
    Case("gpt2-124m-b64-n64", "gpt2", GPT2_124M, 64, 32, 64),
    Case("llama-150m-b16-n64", "llama", LLAMA_150M, 16, 32, 64),
    Case("llama-150m-b64-n64", "llama", LLAMA_150M, 64, 32, 64),
    Case("tiny-b128-n10", "gpt2", GPT2_TINY, 128, 16, 10),
    Case("tiny-b128-n64", "gpt2", GPT2_TINY, 128, 16, 64),
    Case("gemma3-125m-b16-n64", "gemma3_text", GEMMA3_125M, 16, 32, 64),
    Case("moe-125m-b16-n64", "qwen3_moe", MOE_125M, 16, 32, 64),
]
QUICK = ("gpt2-124m-b16-n64", "tiny-b128-n64")
DEFAULT = tuple(c.name for c in CASES if c.name != "gpt2-124m-b16-n128")
CaseName = Literal[tuple(c.name for c in CASES)]  # an unknown name is a command-line error


@dataclasses.dataclass(frozen=True)
class Config:
    """Sampling throughput: jaxrlhf make_sampler vs transformers generate, same weights (see the
    module docstring of benchmarks/sampling.py for what is timed)."""

    quick: bool = False
    """Only gpt2-124m-b16-n64 and tiny-b128-n64, at most 2 repetitions, no extra-threads run
    (ignored when --cases is given)."""
    cases: tuple[CaseName, ...] = ()
    """Case names, space-separated (empty: every case but gpt2-124m-b16-n128)."""
    reps: int = 5
    """Timed repetitions per side (the median is reported)."""
    dtype: str = "float32"
    """jaxrlhf parameter/compute dtype."""
    threads: int = 2
    """torch.set_num_threads."""
    extra_threads: int = 1
    """Also time torch with this many threads (0: off; off with --quick). On a loaded machine
    PyTorch's OpenMP threads can slow down more than XLA's pool."""
    torch: bool = True
    """Time the PyTorch baseline; --no-torch skips it (e.g. on a GPU machine)."""
    roofline: bool = False
    """Also time single decode steps and print their fraction of the memory-bandwidth roofline."""
    peak_gbps: float | None = None
    """Memory bandwidth for --roofline in GB/s (None: measured by a jitted sum)."""


# Token ids of every random checkpoint: no BOS/EOS (every row samples exactly `new` tokens), pad 0.
TOKEN_IDS = dict(pad_token_id=0, bos_token_id=None, eos_token_id=None)


def build_checkpoint(case: Case, directory: str):
    """A random-weight transformers model of `case`, saved as an HF checkpoint in `directory`."""
    import torch
    import transformers

    torch.manual_seed(0)
    if case.family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**case.hf_config, **TOKEN_IDS))
    else:  # Llama, Gemma 3 (Gemma3ForCausalLM), Qwen3-MoE (Qwen3MoeForCausalLM)
        config = transformers.AutoConfig.for_model(case.family, **case.hf_config, **TOKEN_IDS)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory)
    return model.eval()


def build_jax_checkpoint(case: Case, directory: str, seed: int = 0) -> None:
    """The same shapes written by jaxrlhf alone (`save_pretrained` of random weights), so that a
    --no-torch run imports neither torch nor transformers' model classes."""
    import jax

    from jaxrlhf.models import LanguageModel, ModelConfig, save_pretrained

    model = LanguageModel(ModelConfig.from_hf(dict(model_type=case.family, **case.hf_config, **TOKEN_IDS)))
    save_pretrained(directory, model, model.init_params(jax.random.PRNGKey(seed)))


def prompts(case: Case, vocab: int, seed: int = 0):
    """Left-padded prompts with lengths between prompt_len / 2 and prompt_len."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(case.prompt_len // 2, case.prompt_len + 1, size=case.batch)
    ids = rng.integers(1, vocab, size=(case.batch, case.prompt_len)).astype(np.int32)
    mask = (np.arange(case.prompt_len)[None, :] >= case.prompt_len - lengths[:, None]).astype(np.int32)
    return ids * mask, mask


def measured_bandwidth_gbps(megabytes: int = 512, reps: int = 10) -> float:
    """Read bandwidth of this JAX device: bytes of a large float32 array over the time to sum it."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(reps):
        total(x).block_until_ready()
    return x.nbytes * reps / (time.perf_counter() - start) / 1e9


def mean_slots_read(prompt_len: int, new_tokens: int) -> float:
    """Cache slots attention reads per decode step, averaged over the N steps of a call.

    Every step of a decode segment reads that segment's whole cache, `P - 1 + end` slots (see
    `jaxrlhf.sampling.segment_ends`).
    """
    from jaxrlhf.sampling import segment_ends

    slots_read, start = 0, 0
    for end in segment_ends(new_tokens):
        slots_read += (end - start) * (prompt_len - 1 + end)
        start = end
    return slots_read / new_tokens


def decode_step_bytes(model, params, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Bytes one decode step must read at least, averaged over the N steps of a call.

    Every parameter once (the embedding table counts once: tied heads read it as the output layer,
    the input lookup only touches B rows), plus keys and values of every cache slot attention reads:
    the slots of the step's decode segment (see `jaxrlhf.sampling.segment_ends`).
    """
    import jax

    cfg = model.config
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    slot_bytes = 2 * cfg.num_layers * batch * cfg.num_kv_heads * cfg.head_dim * np.dtype(cfg.dtype).itemsize
    return param_bytes + slot_bytes * mean_slots_read(prompt_len, new_tokens)


def active_weights(cfg, params, leaf_names=None) -> float:
    """Weights one token multiplies by: all of them, but of a mixture of experts' stacked expert
    kernels (`mlp/experts/...`) only the k of E chosen (`num_experts_per_tok / num_experts`).
    `leaf_names`: count only leaves of these names (e.g. `("kernel",)`)."""
    import jax

    total = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        if leaf_names is not None and keys[-1] not in leaf_names:
            continue
        share = cfg.num_experts_per_tok / cfg.num_experts if "experts" in keys else 1.0
        total += leaf.size * share
    return total


def decode_step_flops(model, params, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Floating-point operations of one decode step, averaged over the N steps of a call.

    `2 B` per weight of every matrix product (the output layer included, the embedding lookups not;
    of a mixture of experts the k chosen experts, `active_weights`) plus `4 B H E` per layer and
    cache slot read (scores and the weighted sum of values).
    """

    cfg = model.config
    lookups = 0 if cfg.tie_word_embeddings else params["embed"]["embedding"].size
    lookups += params["pos_embed"]["embedding"].size if "pos_embed" in params else 0
    matmul_weights = active_weights(cfg, params) - lookups
    attention = 4 * batch * cfg.num_layers * cfg.num_heads * cfg.head_dim * mean_slots_read(prompt_len, new_tokens)
    return 2 * batch * matmul_weights + attention


def roofline(model, params, ids, mask, case: Case, reps: int, peak_gbps: float) -> dict:
    import jax

    import jaxrlhf

    def seconds(new_tokens):
        sampler = jaxrlhf.make_sampler(model, max_new_tokens=new_tokens, prompt_buckets=(case.prompt_len,))
        jax.block_until_ready(sampler(params, ids, mask, jax.random.key(0)))
        times = []
        for rep in range(reps):
            start = time.perf_counter()
            jax.block_until_ready(sampler(params, ids, mask, jax.random.key(rep + 1)))
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    step_s = (seconds(case.new_tokens) - seconds(1)) / (case.new_tokens - 1)
    step_bytes = decode_step_bytes(model, params, case.batch, case.prompt_len, case.new_tokens)
    step_flops = decode_step_flops(model, params, case.batch, case.prompt_len, case.new_tokens)
    achieved = step_bytes / step_s / 1e9
    return dict(
        step_ms=step_s * 1e3,
        step_mb=step_bytes / 1e6,
        achieved_gbps=achieved,
        roofline_fraction=achieved / peak_gbps,
        gflop_s=step_flops / step_s / 1e9,
        flop_per_byte=step_flops / step_bytes,
    )


def run_case(
    case: Case,
    reps: int,
    dtype: str,
    threads: int,
    extra_threads: int | None,
    with_torch: bool = True,
    peak_gbps: float | None = None,
) -> dict:
    import jax

    import jaxrlhf

    hf_model = None
    with tempfile.TemporaryDirectory() as directory:
        if with_torch:
            hf_model = build_checkpoint(case, directory)
        else:
            build_jax_checkpoint(case, directory)
        pretrained = jaxrlhf.load_pretrained(directory, dtype=dtype)
    model, params = pretrained.model, pretrained.params
    ids, mask = prompts(case, model.config.vocab_size)
    sampler = jaxrlhf.make_sampler(
        model, max_new_tokens=case.new_tokens, temperature=1.0, prompt_buckets=(case.prompt_len,)
    )

    def run_jax(seed):
        out = sampler(params, ids, mask, jax.random.key(seed))
        jax.block_until_ready(out)
        return out

    def run_torch(num_threads=threads):
        import torch

        torch.set_num_threads(num_threads)
        with torch.inference_mode():
            out = hf_model.generate(
                input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                do_sample=True,
                temperature=1.0,
                top_k=None,
                top_p=1.0,
                max_new_tokens=case.new_tokens,
                min_new_tokens=case.new_tokens,
                use_cache=True,
                pad_token_id=0,
            )
        assert out.shape[1] == case.prompt_len + case.new_tokens
        return out

    start = time.perf_counter()
    run_jax(0)
    first_call = time.perf_counter() - start
    if with_torch:
        run_torch()  # warm-up
    jax_times, torch_times, extra_times = [], [], []
    for rep in range(reps):  # interleaved: both sides see the same machine load
        start = time.perf_counter()
        out = run_jax(rep + 1)
        jax_times.append(time.perf_counter() - start)
        assert int(np.asarray(out.mask).sum()) == case.batch * case.new_tokens
        if not with_torch:
            continue
        start = time.perf_counter()
        run_torch()
        torch_times.append(time.perf_counter() - start)
        if extra_threads:
            start = time.perf_counter()
            run_torch(extra_threads)
            extra_times.append(time.perf_counter() - start)
    tokens = case.batch * case.new_tokens
    jax_s = statistics.median(jax_times)
    torch_s = statistics.median(torch_times) if torch_times else float("nan")
    result = dict(
        case=case.name,
        jax_tok_s=tokens / jax_s,
        torch_tok_s=tokens / torch_s,
        ratio=torch_s / jax_s,
        compile_s=first_call - jax_s,
        params_m=sum(x.size for x in jax.tree.leaves(params)) / 1e6,
    )
    if peak_gbps:
        result.update(roofline(model, params, ids, mask, case, reps, peak_gbps))
    if extra_times:
        extra_s = statistics.median(extra_times)
        result.update(extra_tok_s=tokens / extra_s, extra_ratio=extra_s / jax_s)
    return result


def resolve(config: Config) -> Config:
    """The config with --quick applied: its cases, at most 2 repetitions, no extra-threads run."""
    if config.cases:
        return config
    if config.quick:
        return dataclasses.replace(config, cases=QUICK, reps=min(config.reps, 2), extra_threads=0)
    return dataclasses.replace(config, cases=DEFAULT)


def main(argv=None):
    from jaxrlhf.config import parse_config

    args = resolve(parse_config(Config, argv))
    cases = [c for c in CASES if c.name in args.cases]

    import jax

    if args.torch:
        import torch
        import transformers

        versions = f"torch {torch.__version__} ({args.threads} threads), transformers {transformers.__version__}"
    else:
        versions = "torch not used (--no-torch)"
    peak_gbps = None
    if args.roofline:
        peak_gbps = args.peak_gbps or measured_bandwidth_gbps()
        print(
            f"roofline bandwidth: {peak_gbps:.1f} GB/s ({'given' if args.peak_gbps else 'measured: jitted sum'}) "
            f"on {jax.devices()[0].device_kind}"
        )
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}), {versions}, {os.cpu_count()} CPUs, "
        f"jaxrlhf dtype {args.dtype}, median of {args.reps}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(
        f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
        "(other processes share these cores: absolute numbers vary, the ratios are from interleaved runs)"
    )
    header = f"{'case':<22} {'params':>7} {'jaxrlhf tok/s':>14} {'torch tok/s':>12} {'ratio':>6} {'compile s':>10}"
    print(header)
    print("-" * len(header))
    extra_rows, roofline_rows = [], []
    for case in cases:
        r = run_case(
            case,
            args.reps,
            args.dtype,
            args.threads,
            args.extra_threads if args.torch else 0,
            with_torch=args.torch,
            peak_gbps=peak_gbps,
        )
        torch_cols = (
            "-".rjust(12) + "-".rjust(7) if not args.torch else f"{r['torch_tok_s']:>12.0f} {r['ratio']:>5.2f}x"
        )
        print(
            f"{r['case']:<22} {r['params_m']:>6.0f}M {r['jax_tok_s']:>14.0f} {torch_cols} {r['compile_s']:>10.1f}",
            flush=True,
        )
        if "extra_tok_s" in r:
            extra_rows.append(r)
        if "step_ms" in r:
            roofline_rows.append(r)
    if roofline_rows:
        print(f"\ndecode step vs the {peak_gbps:.0f} GB/s memory-bandwidth roofline:")
        print(
            f"  {'case':<22} {'step ms':>8} {'MB/step':>8} {'GB/s':>7} {'of roofline':>11} {'GFLOP/s':>8} "
            f"{'FLOP/byte':>9}"
        )
        for r in roofline_rows:
            print(
                f"  {r['case']:<22} {r['step_ms']:>8.2f} {r['step_mb']:>8.1f} {r['achieved_gbps']:>7.1f} "
                f"{r['roofline_fraction']:>10.0%} {r['gflop_s']:>8.1f} {r['flop_per_byte']:>9.1f}"
            )
        print("  (a step is bandwidth-bound when FLOP/byte is below the device's FLOP/s over its bytes/s)")
    if extra_rows:
        print(f"\ntorch with {args.extra_threads} thread(s), same runs (interleaved):")
        for r in extra_rows:
            print(f"  {r['case']:<22} torch {r['extra_tok_s']:>8.0f} tok/s  jaxrlhf/torch {r['extra_ratio']:.2f}x")
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
