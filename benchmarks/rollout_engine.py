"""The rollout engine against the static sampler: refilled slots on long-tailed lengths, and
GRPO's shared group prefill (random-weight models built by jaxrlhf; no torch).

1. **Long-tailed lengths, equal decode-cache memory.** B rows, budget N. The static sampler
   decodes them in waves of S rows (`generate` on S rows at a time, each wave running until its
   longest row ends: the cache of S rows); the engine serves the B rows through S refilled slots
   (`generate(..., slots=S)`: the same S-row cache, plus the prompts' caches). Lengths come from a
   random-weight model whose EOS logit is raised by a constant (`EosBiased`): with the
   near-uniform next-token distribution of random weights, each step ends the response with
   probability about p = 1 / (`--mean_fraction` N) whatever came before, so lengths are close to
   geometric with mean `mean_fraction * N`, cut at N: most short, a few at the budget. Reported:
   useful (mask-1) tokens per second of each, their ratio, and the ideal ratio: the arithmetic the
   schedule saves, static row-steps (S times the sum of the waves' longest rows) over the engine's
   (S times its loop steps), per useful token. The realised mean length is printed.
2. **GRPO, G = 8, a long prompt.** B / G prompts of P tokens, each sampled G times: `generate` on
   the prompts repeated G times (one prefill per row) vs `generate(..., num_generations=G)` (one
   prefill per prompt). Reported: prefill FLOPs of each (their ratio, G, is the ideal), the time of
   a call with N = 1 (prefill plus one step) and of the whole rollout at N, against the FLOP ratio
   of the whole rollout.

Each pair is timed interleaved (A, B, A, B, ...) `--reps` times after a compile call; the tables
show medians. On a loaded machine the absolute figures vary; the ratios come from interleaved runs.

    python benchmarks/rollout_engine.py            # every case
    python benchmarks/rollout_engine.py --quick    # small tiny-model cases, 2 repetitions (a smoke run)
    python benchmarks/rollout_engine.py --cases lengths-gpt2-124m grpo-gpt2-124m --reps 5
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys
import time
from typing import Any, Literal

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ppo_step import make_prompts  # noqa: E402
from sampling import GPT2_124M, GPT2_TINY, TOKEN_IDS, mean_slots_read  # noqa: E402

TINY = dict(GPT2_TINY, n_positions=512)  # room for the 256-token prompt of the GRPO case


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "lengths": refilled slots vs static waves; "grpo": shared vs repeated prefill
    hf_config: dict
    rows: int  # B responses
    prompt_len: int  # P
    new_tokens: int  # N
    slots: int = 0  # S ("lengths")
    group: int = 1  # G ("grpo")


CASES = [
    Case("lengths-tiny", "lengths", TINY, rows=256, prompt_len=16, new_tokens=128, slots=32),
    Case("lengths-gpt2-124m", "lengths", GPT2_124M, rows=64, prompt_len=32, new_tokens=128, slots=16),
    Case("grpo-tiny", "grpo", TINY, rows=64, prompt_len=256, new_tokens=64, group=8),
    Case("grpo-gpt2-124m", "grpo", GPT2_124M, rows=16, prompt_len=256, new_tokens=64, group=8),
    # --quick: the same comparisons at smoke-test sizes.
    Case("lengths-tiny-quick", "lengths", TINY, rows=32, prompt_len=8, new_tokens=32, slots=8),
    Case("grpo-tiny-quick", "grpo", TINY, rows=16, prompt_len=64, new_tokens=8, group=8),
]
QUICK = ("lengths-tiny-quick", "grpo-tiny-quick")
DEFAULT = ("lengths-tiny", "lengths-gpt2-124m", "grpo-tiny", "grpo-gpt2-124m")
CaseName = Literal[tuple(c.name for c in CASES)]  # an unknown name is a command-line error


@dataclasses.dataclass(frozen=True)
class Config:
    """The rollout engine vs the static sampler (see the module docstring of
    benchmarks/rollout_engine.py for what is timed)."""

    quick: bool = False
    """Only the small tiny-model cases, at most 2 repetitions (ignored when --cases is given)."""
    cases: tuple[CaseName, ...] = ()
    """Case names, space-separated (empty: the four full-size cases)."""
    reps: int = 5
    """Timed repetitions of each side (interleaved; the median is reported)."""
    mean_fraction: float = 0.25
    """Mean response length of the "lengths" cases, as a fraction of the budget N."""
    eos_token_id: int = 2
    """The token whose logit is raised (any id of the vocabulary)."""


# ----------------------------------------------------------------------------------------------
# A model with a controlled length distribution


@dataclasses.dataclass(frozen=True)
class EosBiased:
    """`model` with `bias` added to the logit of `eos` at every position (hashable, so `generate`
    can close over it); every other attribute is the model's."""

    model: object
    eos: int
    bias: float

    def forward(self, *args, **kwargs):
        out = self.model.forward(*args, **kwargs)  # pyright: ignore[reportAttributeAccessIssue]
        return out._replace(logits=out.logits.at[..., self.eos].add(self.bias))

    def __getattr__(self, name):  # config, init_cache, decoding_params, take_cache_rows, ...
        return getattr(self.model, name)


def eos_bias(model, params, ids, mask, eos: int, stop_probability: float) -> float:
    """The constant that gives `eos` probability `stop_probability` at the prompts' next position:
    `p = e^(l + b) / (e^(l + b) + sum_{v != eos} e^(l_v))`, solved for b with the medians of
    the prompts' `l = l_eos` and `log sum_{v != eos} e^(l_v)`."""
    import jax
    import jax.numpy as jnp

    logits = jax.jit(model.apply)(params, ids, mask)[:, -1].astype(jnp.float32)
    eos_logit = logits[:, eos]
    others = jax.nn.logsumexp(logits.at[:, eos].set(-jnp.inf), axis=-1)
    odds = stop_probability / (1 - stop_probability)
    return float(math.log(odds) + np.median(np.asarray(others)) - np.median(np.asarray(eos_logit)))


# ----------------------------------------------------------------------------------------------
# Arithmetic


def refill_steps(lengths, slots: int) -> int:
    """Loop steps of the engine: rows in order, each taking the slot that frees first."""
    free_at = np.zeros(slots, np.int64)
    for length in lengths:
        free_at[int(np.argmin(free_at))] += max(int(length), 1)
    return int(free_at.max())


def matmul_weights(model, params) -> int:
    """Weights multiplied per token (every matrix, the output layer included; lookups excluded)."""
    import jax

    lookups = 0 if model.config.tie_word_embeddings else params["embed"]["embedding"].size
    lookups += params["pos_embed"]["embedding"].size if "pos_embed" in params else 0
    return sum(x.size for x in jax.tree.leaves(params)) - lookups


def prefill_flops(model, params, rows: int, prompt_len: int) -> float:
    """FLOPs of prefilling `rows` prompts' first P - 1 tokens: `2 W` per token (no output layer:
    its logits are unused) plus `4 H E` per layer and (query, key) pair of the `(P - 1)^2` computed."""
    cfg = model.config
    tokens = prompt_len - 1
    weights = matmul_weights(model, params) - cfg.vocab_size * cfg.hidden_size
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * tokens**2
    return rows * (2 * weights * tokens + attention)


def decode_flops(model, params, row_steps: float, slots_read: float) -> float:
    """FLOPs of `row_steps` one-token decode steps reading `slots_read` cache slots each (mean)."""
    cfg = model.config
    per_step = 2 * matmul_weights(model, params) + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * slots_read
    return row_steps * per_step


# ----------------------------------------------------------------------------------------------
# Running


def build(case: Case):
    import jax

    from jaxrlhf.models import LanguageModel, ModelConfig

    config = ModelConfig.from_hf(dict(model_type="gpt2", **case.hf_config, **TOKEN_IDS))
    model = LanguageModel(config)
    return model, model.init_params(jax.random.PRNGKey(0))


def timed_pair(first, second, reps: int, warmup_seconds: list | None = None):
    """Median seconds of `first()` and `second()`, run interleaved after one warm-up call each
    (their seconds appended to ``warmup_seconds`` when given: compile time plus one call)."""
    for fn in (first, second):
        start = time.perf_counter()
        fn()
        if warmup_seconds is not None:
            warmup_seconds.append(time.perf_counter() - start)
    times = ([], [])
    for _ in range(reps):
        for fn, out in zip((first, second), times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def run_lengths(case: Case, reps: int, mean_fraction: float, eos: int) -> dict:
    import jax

    from jaxrlhf.sampling import generate
    from jaxrlhf.tuning import Tuning, model_width

    base, params = build(case)
    # Both sides decode S rows per step: the same backend tuning (as `make_sampler` picks it).
    base = base.with_tuning(Tuning.for_backend(rows_per_device=case.slots, width=model_width(base)))
    tuning = base.tuning
    ids, mask = make_prompts(case.rows, case.prompt_len, base.config.vocab_size)
    bias = eos_bias(base, params, ids, mask, eos, 1.0 / (mean_fraction * case.new_tokens))
    model = EosBiased(base, eos, bias)
    options: dict[str, Any] = dict(max_new_tokens=case.new_tokens, temperature=1.0, eos_token_id=eos)
    static = tuning.jit(lambda p, i, m, k: generate(model, p, i, m, k, **options))
    engine = tuning.jit(lambda p, i, m, k: generate(model, p, i, m, k, **options, slots=case.slots))
    waves = [(ids[w : w + case.slots], mask[w : w + case.slots]) for w in range(0, case.rows, case.slots)]
    results = {}

    def run_static():
        masks = [static(params, i, m, jax.random.fold_in(jax.random.key(1), w)).mask for w, (i, m) in enumerate(waves)]
        results["static"] = np.concatenate([np.asarray(x) for x in masks])

    def run_engine():
        results["engine"] = np.asarray(engine(params, ids, mask, jax.random.key(1)).mask)

    static_s, engine_s = timed_pair(run_static, run_engine, reps)
    static_lengths, engine_lengths = results["static"].sum(1), results["engine"].sum(1)
    static_row_steps = case.slots * sum(int(x.max()) for x in np.split(static_lengths, len(waves)))
    engine_row_steps = case.slots * refill_steps(engine_lengths, case.slots)
    static_useful, engine_useful = static_lengths.sum(), engine_lengths.sum()
    ideal = (engine_useful / engine_row_steps) / (static_useful / static_row_steps)
    return dict(
        case=case.name,
        mean_length=float(engine_lengths.mean()),
        at_budget=float((engine_lengths == case.new_tokens).mean()),
        static_tok_s=static_useful / static_s,
        engine_tok_s=engine_useful / engine_s,
        ratio=(engine_useful / engine_s) / (static_useful / static_s),
        ideal=ideal,
    )


def run_grpo(case: Case, reps: int) -> dict:
    import jax

    from jaxrlhf.sampling import generate
    from jaxrlhf.tuning import Tuning, model_width

    model, params = build(case)
    model = model.with_tuning(Tuning.for_backend(rows_per_device=case.rows, width=model_width(model)))
    num_prompts = case.rows // case.group
    ids, mask = make_prompts(num_prompts, case.prompt_len, model.config.vocab_size)
    repeated_ids, repeated_mask = np.repeat(ids, case.group, 0), np.repeat(mask, case.group, 0)

    def pair(new_tokens):
        options: dict[str, Any] = dict(max_new_tokens=new_tokens, temperature=1.0)
        repeated = model.tuning.jit(lambda p, i, m, k: generate(model, p, i, m, k, **options))
        shared = model.tuning.jit(lambda p, i, m, k: generate(model, p, i, m, k, **options, num_generations=case.group))
        key = jax.random.key(1)
        return timed_pair(
            lambda: jax.block_until_ready(repeated(params, repeated_ids, repeated_mask, key)),
            lambda: jax.block_until_ready(shared(params, ids, mask, key)),
            reps,
        )

    prefill_rep_s, prefill_shared_s = pair(1)
    rollout_rep_s, rollout_shared_s = pair(case.new_tokens)
    flops_rep = prefill_flops(model, params, case.rows, case.prompt_len)
    flops_shared = prefill_flops(model, params, num_prompts, case.prompt_len)
    decode = decode_flops(model, params, case.rows * case.new_tokens, mean_slots_read(case.prompt_len, case.new_tokens))
    return dict(
        case=case.name,
        prefill_gflop_rep=flops_rep / 1e9,
        prefill_gflop_shared=flops_shared / 1e9,
        prefill_ratio=prefill_rep_s / prefill_shared_s,
        prefill_ideal=flops_rep / flops_shared,
        rollout_rep_s=rollout_rep_s,
        rollout_shared_s=rollout_shared_s,
        rollout_ratio=rollout_rep_s / rollout_shared_s,
        rollout_ideal=(flops_rep + decode) / (flops_shared + decode),
    )


def grpo_row(case: Case, r: dict) -> str:
    gflop = f"{r['prefill_gflop_rep']:.1f} / {r['prefill_gflop_shared']:.1f}"
    seconds = f"{r['rollout_rep_s']:.2f} / {r['rollout_shared_s']:.2f}"
    return (
        f"{r['case']:<20} {case.rows:>4} {case.group:>3} {case.prompt_len:>4} {case.new_tokens:>4} "
        f"{gflop:>25} {r['prefill_ratio']:>8.2f}x {r['prefill_ideal']:>5.1f}x {seconds:>21} "
        f"{r['rollout_ratio']:>5.2f}x {r['rollout_ideal']:>5.2f}x"
    )


def table(title: str, header: str, cases, run, row) -> None:
    """Prints `title`, `header` and one `row(case, run(case))` per case (none: nothing)."""
    if not cases:
        return
    print(title)
    print(header)
    print("-" * len(header))
    for case in cases:
        print(row(case, run(case)), flush=True)


def resolve(config: Config) -> Config:
    if config.cases:
        return config
    if config.quick:
        return dataclasses.replace(config, cases=QUICK, reps=min(config.reps, 2))
    return dataclasses.replace(config, cases=DEFAULT)


def main(argv=None):
    from jaxrlhf.config import parse_config

    args = resolve(parse_config(Config, argv))
    if not 0 < args.mean_fraction <= 1:
        raise SystemExit(f"--mean_fraction must be in (0, 1], got {args.mean_fraction}")
    cases = [c for c in CASES if c.name in args.cases]

    import jax

    print(
        f"jax {jax.__version__} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs, median of {args.reps} "
        f"interleaved repetitions, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    table(
        f"\nlong-tailed lengths (mean ~ {args.mean_fraction:g} N): static waves of S rows vs S refilled slots, "
        "useful tokens/s",
        f"{'case':<20} {'B':>4} {'S':>4} {'N':>4} {'mean len':>8} {'at N':>5} {'static tok/s':>13} "
        f"{'engine tok/s':>13} {'ratio':>6} {'ideal':>6}",
        [c for c in cases if c.kind == "lengths"],
        lambda case: run_lengths(case, args.reps, args.mean_fraction, args.eos_token_id),
        lambda case, r: (
            f"{r['case']:<20} {case.rows:>4} {case.slots:>4} {case.new_tokens:>4} {r['mean_length']:>8.1f} "
            f"{r['at_budget']:>5.0%} {r['static_tok_s']:>13.0f} {r['engine_tok_s']:>13.0f} "
            f"{r['ratio']:>5.2f}x {r['ideal']:>5.2f}x"
        ),
    )
    table(
        "\nGRPO: G responses per prompt, prefill once per row (repeated) vs once per prompt (shared)",
        f"{'case':<20} {'B':>4} {'G':>3} {'P':>4} {'N':>4} {'prefill GFLOP rep/shared':>25} "
        f"{'N=1 ratio':>9} {'ideal':>6} {'rollout s rep/shared':>21} {'ratio':>6} {'ideal':>6}",
        [c for c in cases if c.kind == "grpo"],
        lambda case: run_grpo(case, args.reps),
        grpo_row,
    )
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
