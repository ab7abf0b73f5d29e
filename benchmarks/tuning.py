"""A/B of the XLA:CPU compiler options in `jaxrlhf.tuning`: sampling tokens/s with and without them.

For each shape a random-weight GPT-2 samples `new_tokens` tokens per row (temperature 1, no EOS, so
every row runs to the end) with one `jax.jit(generate)` per variant:

    default   `Tuning.for_backend("cpu")` with no compiler options (XLA:CPU's YNNPACK fusions on)
    no_ynn    the same with `NO_YNN_FUSIONS` (`xla_cpu_experimental_ynn_fusion_type=""`)

Both programs are compiled first (compile time reported apart), then timed interleaved: each
repetition times one call of each, in alternating order, so a change in machine load hits both.
Reported per shape: median tokens/s of each, their ratio `no_ynn / default` (> 1: the options
help), the same ratio in CPU time (`time.process_time()`, all of this process's threads: less
sensitive than wall time to other jobs on the machine) and the load average (`os.getloadavg()`)
before and after. `Tuning.for_backend`'s rule
(`CPU_NO_YNN_MAX_ROWS`, `CPU_NO_YNN_MIN_WIDTH`) comes from these ratios; docs/performance.md
records them.

    python benchmarks/tuning.py                          # the default shapes, 3 repetitions
    python benchmarks/tuning.py --shapes gpt2-b16 gpt2-b32 --reps 5
    python benchmarks/tuning.py --shapes ppo-w768-b16    # one fused PPO step instead of sampling

`ppo-*` shapes time `PPO.train_step` (rollout, experience and one epoch of updates in one
program, which compiles with one set of options) of a 2-layer GPT-2 of that width with a 4096-token
vocabulary (the GPT-2 one needs more memory than a shared machine has); "tokens" there are the rollout's sampled tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time

import tyro


@dataclasses.dataclass(frozen=True)
class Shape:
    width: int
    layers: int
    heads: int
    vocab: int
    batch: int
    new_tokens: int
    prompt_len: int = 16


# GPT2_TINY: the 6-layer, width-144 GPT-2 of the randomwalks experiments (30-token vocabulary);
# gpt2: GPT-2 124M's shape (12 layers, width 768, 50257-token vocabulary), random weights.
SHAPES = {
    "tiny-b16": Shape(144, 6, 4, 30, 16, 32),
    "tiny-b128": Shape(144, 6, 4, 30, 128, 32),
    "gpt2-b16": Shape(768, 12, 12, 50257, 16, 16),
    "gpt2-b32": Shape(768, 12, 12, 50257, 32, 16),
    "gpt2-b64": Shape(768, 12, 12, 50257, 64, 16),
    "ppo-w768-b16": Shape(768, 2, 12, 4096, 16, 16),
}


@dataclasses.dataclass(frozen=True)
class Args:
    """Tokens/s of sampling with and without the XLA:CPU options of `jaxrlhf.tuning`."""

    shapes: tuple[str, ...] = ("tiny-b16", "tiny-b128", "gpt2-b16", "gpt2-b64")
    """Shapes to measure, from: tiny-b16, tiny-b128, gpt2-b16, gpt2-b32, gpt2-b64, ppo-w768-b16."""
    reps: int = 3
    """Interleaved repetitions per shape (one call of each variant per repetition); medians are reported."""
    seed: int = 0


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(name: str, shape: Shape, reps: int, seed: int) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxrlhf.models import LanguageModel, gpt2_config
    from jaxrlhf.sampling import generate
    from jaxrlhf.tuning import NO_YNN_FUSIONS, Tuning

    config = gpt2_config(
        shape.vocab,
        hidden_size=shape.width,
        num_layers=shape.layers,
        num_heads=shape.heads,
        max_len=shape.prompt_len + shape.new_tokens,
    )
    base = Tuning.for_backend("cpu").replace(compiler_options=())
    variants = {"default": base, "no_ynn": base.replace(compiler_options=NO_YNN_FUSIONS)}
    model = LanguageModel(config, base)  # the model-level fields are the same in both variants
    key = jax.random.key(seed)
    params = jax.jit(model.init_params)(key)
    ids = jax.random.randint(jax.random.fold_in(key, 1), (shape.batch, shape.prompt_len), 0, shape.vocab)
    mask = jnp.ones_like(ids)
    programs, compile_s = {}, {}
    if name.startswith("ppo-"):
        from jaxrlhf.training import PPO, PPOConfig

        config = PPOConfig(
            batch_size=shape.batch,
            minibatch_size=shape.batch,
            ppo_epochs=1,
            max_new_tokens=shape.new_tokens,
            max_prompt_len=shape.prompt_len,
            eos_token_id=-1,
        )

        def reward(prompt_ids, prompt_mask, response_ids, response_mask):  # share of even token ids
            return jnp.mean((response_ids % 2 == 0) * response_mask, axis=-1)

        for variant, tuning in variants.items():
            ppo = PPO(config, model, reward, tuning=tuning)
            state, frozen, batch = ppo.init_state(params), ppo.frozen_params(params), ppo.prompt_batch(ids, mask)
            start = time.perf_counter()
            jax.block_until_ready(ppo.train_step(state, frozen, batch))  # compile + first step
            compile_s[variant] = time.perf_counter() - start
            programs[variant] = lambda p, i, m, k, ppo=ppo, state=state, frozen=frozen, batch=batch: ppo.train_step(
                state, frozen, batch
            )
    else:
        sample = functools.partial(generate, model, max_new_tokens=shape.new_tokens, temperature=1.0)
        for variant, tuning in variants.items():
            start = time.perf_counter()
            programs[variant] = tuning.jit(sample).lower(params, ids, mask, key).compile()
            compile_s[variant] = time.perf_counter() - start
            jax.block_until_ready(programs[variant](params, ids, mask, key))  # warm-up call
    seconds = {variant: [] for variant in variants}
    cpu_seconds = {variant: [] for variant in variants}
    load_before = _load()
    for rep in range(reps):
        order = list(variants) if rep % 2 == 0 else list(variants)[::-1]
        for variant in order:
            start, cpu_start = time.perf_counter(), time.process_time()
            jax.block_until_ready(programs[variant](params, ids, mask, jax.random.fold_in(key, rep)))
            seconds[variant].append(time.perf_counter() - start)
            cpu_seconds[variant].append(time.process_time() - cpu_start)
    tokens = shape.batch * shape.new_tokens
    rate = {variant: tokens / statistics.median(s) for variant, s in seconds.items()}
    cpu = {variant: statistics.median(s) for variant, s in cpu_seconds.items()}
    return dict(
        shape=name,
        batch=shape.batch,
        width=shape.width,
        default=rate["default"],
        no_ynn=rate["no_ynn"],
        ratio=rate["no_ynn"] / rate["default"],
        cpu_ratio=cpu["default"] / cpu["no_ynn"],
        compile_s=sum(compile_s.values()),
        load_before=load_before,
        load_after=_load(),
    )


def main(args: Args) -> None:
    import jax

    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; choose from {', '.join(SHAPES)}")
    print(
        f"# jax {jax.__version__}, {jax.default_backend()} x{jax.device_count()}, {os.cpu_count()} CPUs, "
        f"{args.reps} interleaved repetitions, medians; load average {_load()}"
    )
    print(
        "| shape | batch | width | tok/s default | tok/s no_ynn | no_ynn / default | same in CPU time | compile s "
        "| load before -> after |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in args.shapes:
        r = measure(name, SHAPES[name], args.reps, args.seed)
        print(
            f"| {r['shape']} | {r['batch']} | {r['width']} | {r['default']:.0f} | {r['no_ynn']:.0f} | "
            f"{r['ratio']:.2f} | {r['cpu_ratio']:.2f} | {r['compile_s']:.1f} | {r['load_before']} -> "
            f"{r['load_after']} |",
            flush=True,
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
