"""Compile time and XLA memory of a forward+backward pass: per-layer blocks vs `nn.scan`, with and
without `nn.remat`. Prints a markdown table (the one in docs/models.md).

    python benchmarks/scan_layers.py                 # Llama-shaped toy, 2 / 8 / 16 layers
    python benchmarks/scan_layers.py --smollm2       # SmolLM2-135M shape (30 layers), compile only
    python benchmarks/scan_layers.py --sampler       # compile time of generate instead

Compile time is `jax.jit(f).lower(...).compile()` on abstract inputs (nothing is allocated), a fresh
function each time; memory is that executable's `memory_analysis()` (temporaries = activations
kept for the backward pass plus scratch; arguments = parameters and batch). The loss is the
next-token cross-entropy, the gradient is with respect to every parameter.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.config import parse_config
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.lm import LanguageModel

TOY = ModelConfig(
    model_type="llama",
    vocab_size=4096,
    hidden_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    intermediate_size=768,
    max_position_embeddings=512,
    norm_eps=1e-5,
)
SMOLLM2 = ModelConfig(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    intermediate_size=1536,
    max_position_embeddings=8192,
    norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)


def _loss(model, params, ids, mask):
    logits = model.apply(params, ids, mask)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    chosen = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return -jnp.mean(chosen * mask[:, 1:])


def measure(cfg: ModelConfig, batch: int, length: int, run: bool = False) -> dict:
    model = LanguageModel(cfg)
    params = jax.eval_shape(model.init_params, jax.random.key(0))
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    step = jax.jit(jax.value_and_grad(lambda p, i, m: _loss(model, p, i, m)))
    start = time.perf_counter()
    compiled = step.lower(params, ids, ids).compile()
    seconds = time.perf_counter() - start
    out = {"compile_s": seconds}
    try:
        mem = compiled.memory_analysis()
        out.update(
            temp_mb=mem.temp_size_in_bytes / 2**20,
            args_mb=mem.argument_size_in_bytes / 2**20,
            out_mb=mem.output_size_in_bytes / 2**20,
        )
    except Exception:  # not every backend reports it
        pass
    if run:
        real = model.init_params(jax.random.key(0))
        x = jnp.ones((batch, length), jnp.int32)
        jax.block_until_ready(compiled(real, x, x))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(real, x, x))
            times.append(time.perf_counter() - t0)
        out["step_ms"] = 1e3 * float(np.median(times))
    return out


def measure_sampler(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Compile time of `sampling.generate` (prefill + decoding loops) on abstract inputs."""
    from jaxrlhf.sampling import generate

    model = LanguageModel(cfg)
    params = jax.eval_shape(model.init_params, jax.random.key(0))
    ids = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    fn = jax.jit(lambda p, i, m, k: generate(model, p, i, m, k, max_new_tokens=new_tokens, temperature=1.0))
    start = time.perf_counter()
    fn.lower(params, ids, ids, key).compile()
    return {"compile_s": time.perf_counter() - start}


@dataclasses.dataclass(frozen=True)
class Config:
    """Compile time and XLA memory of a forward+backward pass: per-layer blocks vs nn.scan, with and
    without nn.remat (a markdown table)."""

    layers: tuple[int, ...] = (2, 8, 16)
    """Layer counts of the Llama-shaped toy, one table row group each (ignored with --smollm2)."""
    batch: int = 4
    """Sequences per batch."""
    length: int = 128
    """Tokens per sequence of the forward+backward pass."""
    smollm2: bool = False
    """SmolLM2-135M shape at its 30 layers instead of the toy."""
    run: bool = False
    """Also time 3 steps (median)."""
    sampler: bool = False
    """Instead: compile time of generate (prompt 32, 64 new tokens: 4 decode segments)."""


VARIANTS = (
    ("per-layer", False, None),
    ("per-layer + remat full", False, "full"),
    ("scan", True, None),
    ("scan + remat full", True, "full"),
    ("scan + remat dots_saveable", True, "dots_saveable"),
)


def main(argv=None):
    args = parse_config(Config, argv)
    if not args.layers and not args.smollm2:
        raise SystemExit("--layers: give at least one layer count")
    base = SMOLLM2 if args.smollm2 else TOY
    layer_counts = [base.num_layers] if args.smollm2 else args.layers
    print(
        f"# {jax.default_backend()} x{jax.device_count()}, jax {jax.__version__}, load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; batch {args.batch} x "
        f"{'(32 prompt + 64 new)' if args.sampler else args.length} tokens; "
        f"width {base.hidden_size}, vocab {base.vocab_size}"
    )
    if args.sampler:
        print("| layers | variant | generate compile s |")
        print("| --- | --- | --- |")
        for layers in layer_counts:
            for scan in (False, True):
                cfg = base.replace(num_layers=layers, scan_layers=scan)
                r = measure_sampler(cfg, args.batch, 32, 64)
                print(f"| {layers} | {'scan' if scan else 'per-layer'} | {r['compile_s']:.2f} |", flush=True)
        print(f"# load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return
    print("| layers | variant | compile s | temp MiB | args MiB |" + (" step ms |" if args.run else ""))
    print("| --- | --- | --- | --- | --- |" + (" --- |" if args.run else ""))
    for layers in layer_counts:
        for name, scan, remat in VARIANTS:
            cfg = base.replace(num_layers=layers, scan_layers=scan, remat=remat)
            r = measure(cfg, args.batch, args.length, run=args.run)
            row = (
                f"| {layers} | {name} | {r['compile_s']:.2f} | {r.get('temp_mb', float('nan')):.1f} | "
                f"{r.get('args_mb', float('nan')):.1f} |"
            )
            if args.run:
                row += f" {r['step_ms']:.1f} |"
            print(row, flush=True)
    print(f"# load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
