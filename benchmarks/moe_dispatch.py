"""MoE dispatch vs a dense MLP of the same active FLOPs: what routing and grouping cost.

One mixture-of-experts MLP (`jaxrlhf.models.moe.MoE`: router, top-k, tokens sorted by expert)
on T tokens against a plain gated MLP of width k F, which does the FLOPs the k chosen experts of a
token do (`2 T D k F x 3` per forward). The ideal time ratio is 1: everything above it is the
router, the sort, the gathers and scatters, and the grouped matmul's efficiency against one big
matmul. Timed, each as one `jax.jit` (median of --reps after a warm-up):

    moe dropless     route + a grouped matmul over the T k expert-sorted rows: `jax.lax.ragged_dot`,
                     on CPU `moe.blocked_ragged_dot` (blocks of one expert each)
    moe dropless, XLA ragged_dot   (CPU only) the same with XLA:CPU's ragged_dot, which
                     computes every expert on every row
    moe capacity c   route + `[E, C, D]` buffers (C = ceil(c T k / E)) and a batched einsum
    dense k*F        the gated MLP of width k F (same active FLOPs)
    all experts      every expert on every token (`moe.dense_reference`: E / k times the FLOPs)

for the forward and for forward + backward (gradients of every weight and of the input).

    python benchmarks/moe_dispatch.py                  # the MoE-125M layer of benchmarks/sampling.py, 4096 tokens
    python benchmarks/moe_dispatch.py --quick          # small shapes, checks that it runs
    python benchmarks/moe_dispatch.py --shape qwen3-30b-a3b --tokens 8192   # on an accelerator
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Literal

# (hidden D, expert width F, experts E, chosen k)
SHAPES = {
    "moe-125m": (512, 384, 16, 2),  # the MoE-shaped row of benchmarks/sampling.py and ppo_step.py
    "qwen3-30b-a3b": (2048, 768, 128, 8),  # one layer of Qwen3-30B-A3B (NeMo-RL's GRPO model)
    "tiny": (64, 32, 8, 2),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """MoE dispatch vs a dense MLP of equal active FLOPs (see the module docstring of
    benchmarks/moe_dispatch.py)."""

    quick: bool = False
    """The tiny shape, 512 tokens, 2 repetitions: checks that it runs."""
    shape: Literal[tuple(SHAPES)] = "moe-125m"
    """Layer shape: moe-125m (D 512, F 384, E 16, k 2), qwen3-30b-a3b (2048, 768, 128, 8), tiny."""
    tokens: int = 4096
    """T, tokens in the batch (batch x sequence length)."""
    capacity_factor: float = 1.25
    """c of the capacity dispatch."""
    reps: int = 5
    """Timed repetitions (median reported)."""
    dtype: str = "float32"
    """Parameter and compute dtype."""
    all_experts: bool = True
    """Also time every expert on every token (E / k times the FLOPs; skip it for large E)."""


def model_config(D: int, F: int, E: int, k: int, dtype: str, capacity_factor=None):
    from jaxrlhf.models import ModelConfig

    return ModelConfig(
        model_type="qwen3_moe",
        vocab_size=8,
        hidden_size=D,
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
        head_dim=D,
        intermediate_size=k * F,
        max_position_embeddings=8,
        norm_eps=1e-6,
        num_experts=E,
        num_experts_per_tok=k,
        moe_intermediate_size=F,
        norm_topk_prob=True,
        moe_capacity_factor=capacity_factor,
        param_dtype=dtype,
        dtype=dtype,
    )


def programs(args) -> dict:
    """name -> (forward, forward + backward), both jitted, on the same input and weights."""
    import jax
    import jax.numpy as jnp

    from jaxrlhf.models.config import ACTIVATIONS
    from jaxrlhf.models.moe import MoE, dense_reference, dispatch, route
    from jaxrlhf.models.transformer import MLP

    D, F, E, k = SHAPES[args.shape]
    key = jax.random.key(0)
    x = jax.random.normal(key, (1, args.tokens, D), jnp.dtype(args.dtype))
    valid = jnp.ones((1, args.tokens), bool)
    cot = jax.random.normal(jax.random.key(1), x.shape, x.dtype)
    out: dict = {}

    def add(name, apply, params):
        forward = jax.jit(lambda p, x: apply(p, x))
        grad = jax.jit(jax.grad(lambda p, x: jnp.sum(apply(p, x).astype(jnp.float32) * cot), argnums=(0, 1)))
        out[name] = (forward, grad, params)

    for label, factor in (("moe dropless", None), (f"moe capacity {args.capacity_factor:g}", args.capacity_factor)):
        module = MoE(model_config(D, F, E, k, args.dtype, factor))
        params = module.init(key, x, valid)
        add(label, lambda p, x, m=module: m.apply(p, x, valid), params)
    moe_params = out["moe dropless"][2]["params"]

    def routed(p, x):  # the dropless MoE's own routing, for the programs built outside the module
        weights, experts = route(x[0] @ p["router"]["kernel"], k, True)
        return weights.astype(x.dtype), experts

    if jax.default_backend() == "cpu":
        # The MoE module's dropless path on CPU is blocked_ragged_dot; XLA's own ragged_dot, for comparison.
        def with_ragged_dot(p, x):
            weights, experts = routed(p, x)

            def matmul(rows, sizes, name):
                return jax.lax.ragged_dot(rows, p["experts"][name]["kernel"], sizes)

            return dispatch(matmul, x[0], experts, weights, ACTIVATIONS["silu"], E)[None]

        add("moe dropless, XLA ragged_dot", with_ragged_dot, moe_params)
    dense = MLP(model_config(D, F, E, k, args.dtype))
    add(f"dense {k}*F", lambda p, x: dense.apply(p, x), dense.init(key, x))
    if args.all_experts:

        def every_expert(p, x):
            weights, experts = routed(p, x)
            kernels = {n: p["experts"][n]["kernel"] for n in ("gate", "up", "down")}
            return dense_reference(x[0], experts, weights, kernels, ACTIVATIONS["silu"])[None]

        add("all experts", every_expert, moe_params)
    return out


def timed(fn, *args, reps: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of `reps` more)."""
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main(argv=None):
    import jax

    from jaxrlhf.config import parse_config

    args = parse_config(Config, argv)
    if args.quick:
        args = dataclasses.replace(args, shape="tiny", tokens=512, reps=min(args.reps, 2))
    D, F, E, k = SHAPES[args.shape]
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, {args.dtype}; "
        f"layer {args.shape}: D {D}, F {F}, E {E}, top-{k}; T {args.tokens} tokens; median of {args.reps}; "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    active = 3 * 2 * args.tokens * D * k * F  # gate, up, down of the k chosen experts
    print(f"active FLOPs per forward: {active / 1e9:.2f} GFLOP (the dense k*F MLP does the same)")
    header = f"{'program':<29} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd / dense':>12} {'fwd+bwd / dense':>16}"
    print(header)
    print("-" * len(header))
    results = {}
    for name, (forward, grad, params) in programs(args).items():
        x = jax.random.normal(jax.random.key(0), (1, args.tokens, D), args.dtype)
        _, fwd = timed(forward, params, x, reps=args.reps)
        _, both = timed(grad, params, x, reps=args.reps)
        results[name] = (fwd, both)
    dense_fwd, dense_both = results[f"dense {k}*F"]
    for name, (fwd, both) in results.items():
        print(f"{name:<29} {fwd * 1e3:>9.2f} {both * 1e3:>11.2f} {fwd / dense_fwd:>11.2f}x {both / dense_both:>15.2f}x")
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
