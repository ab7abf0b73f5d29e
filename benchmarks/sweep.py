"""R PPO runs as one sweep vs R runs one after another: seconds per PPO iteration, by phase.

The workload is the README's randomwalks PPO (experiments/randomwalks_ppo.py's default config:
128 rollouts of up to 10 tokens per step, 4 epochs x 2 minibatches, value head on the policy's
trunk, adaptive KL) on its 6-layer, width-144 GPT-2 with the task's character vocabulary, with
the walk-optimality reward inside the jit. The SFT policy of ``--sft_dir`` is used when it exists
(``python experiments/randomwalks_sft.py`` writes it); otherwise a random-weight model of the same
shape, whose responses all run to the 10-token budget (the slowest case for both sides).

    baseline  one run: `PPO.train_step` (one jitted iteration); R runs in sequence take R times it
    sweep     `Sweep.train_step` with R runs (seeds 0..R-1): one jitted, vmapped iteration of all

One process. ``--devices D`` (> 1) gives the CPU D devices (``XLA_FLAGS=
--xla_force_host_platform_device_count=D``, set before jax starts) and splits the sweeps' run axis
over them (a ``"runs"`` mesh); the one-run baseline stays on one device. After each program's
first call (its compile, reported apart) the programs are timed interleaved: each repetition
times one step of every program, then (``--phases``) its rollout alone (`rollout_step`); the rest
of the step (scoring, experience, update) is the difference of the two medians. ``--compare``
adds variants of the largest sweep to the same interleaving, for A/B figures:

    per_run_stop   Sweep(shared_decode_stop=False): each run's decode loop stops on its own
                   (a batched while-loop predicate)
    one_device     with --devices > 1: the run axis on one device
    xla:NAME=VALUE the sweep's step compiled with that XLA option too (the one-run trainer's
                   `Tuning`, its compiler_options plus this one),
                   e.g. xla:xla_cpu_experimental_ynn_fusion_type=

Reported: medians, the sweep's time per step relative to one run (``x one run``), the throughput
ratio against running the R runs in sequence (``R x t_1 / t_R``), the per-phase split and the
load average. What bounds a sweep: its FLOPs are R times one run's, so the achieved FLOP rate is
printed against the machine's matrix-product peak (a jitted 2048^3 float32 product, measured
here). The FLOPs are counted from shapes (``2 x matmul parameters`` per token and forward; a
backward pass twice a forward): rollout over prompt + response tokens, the policy and reference
forwards of the experience pass (the value head shares the trunk), and ``ppo_epochs``
forward+backward passes over the batch; attention's score products (12-token sequences) are left
out.

    python benchmarks/sweep.py                              # R = 1, 2, 4, 8; 5 repetitions
    python benchmarks/sweep.py --runs 1 8 --devices 2 --compare per_run_stop one_device
    python benchmarks/sweep.py --runs 1 8 --no-phases --compare xla:xla_cpu_use_onednn=true
    python benchmarks/sweep.py --quick                      # tiny steps: checks that it runs
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import statistics
import sys
import time

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))


COMPARE = ("per_run_stop", "one_device")


@dataclasses.dataclass(frozen=True)
class Args:
    """Sweep vs sequential runs on the randomwalks PPO workload."""

    runs: tuple[int, ...] = (1, 2, 4, 8)
    """Sweep sizes R to time."""
    reps: int = 5
    """Interleaved repetitions (one step of each program per repetition); medians are reported."""
    devices: int = 1
    """CPU devices the sweeps' run axis is split over (a "runs" mesh; each R must be a multiple)."""
    compare: tuple[str, ...] = ()
    """Variants of the largest sweep timed alongside it: per_run_stop, one_device, xla:NAME=VALUE (see the
    docstring)."""
    phases: bool = True
    """Also time each program's rollout alone, and report the rest of the step as the difference."""
    sft_dir: str = "runs/randomwalks_sft"
    """randomwalks_sft.py output; a random-weight model of the same shape is used without it."""
    quick: bool = False
    """A 2-layer random-weight model, batch 16, 1 epoch, R = 2D (D = --devices), one repetition: a
    smoke test, not a measurement."""


def sweep_sizes(args: Args) -> tuple[int, ...]:
    return (2 * args.devices,) if args.quick else args.runs


def build(args: Args):
    import jax
    import numpy as np
    import randomwalks_ppo
    import randomwalks_sft

    from jaxrlhf.models import load_pretrained
    from jaxrlhf.tokenizers import char_tokenizer
    from tasks import randomwalks as rw

    task = rw.make_task(1002, 21, 0.1, 10)
    model_dir = os.path.join(args.sft_dir, "model")
    if os.path.isfile(os.path.join(model_dir, "config.json")) and not args.quick:
        sft = load_pretrained(model_dir)
        model, params, tokenizer, source = sft.model, sft.params, sft.tokenizer, f"SFT policy of {model_dir}"
    else:
        sft_config = randomwalks_sft.Config()
        if args.quick:
            sft_config = dataclasses.replace(sft_config, n_layer=2)
        tokenizer = char_tokenizer(task.letters, model_max_length=sft_config.max_length + 6)
        model = randomwalks_sft.make_model(sft_config, tokenizer)
        params = model.init_params(jax.random.PRNGKey(0))
        source = "random weights (no SFT policy found)"
    config = randomwalks_ppo.Config().ppo.replace(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if args.quick:
        config = config.replace(batch_size=16, minibatch_size=8, ppo_epochs=1)
    ids, mask = rw.encode_prompts(task.prompts, tokenizer)
    rows = np.arange(config.batch_size) % len(ids)
    return model, params, rw.make_reward_fn(task, tokenizer), config, (ids[rows], mask[rows]), source


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    """Float32 GFLOP/s of a jitted n x n x n matrix product (median of ``reps``)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    product = jax.jit(lambda x, y: x @ y)
    product(a, a).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        product(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def ppo_step_gflop(params, config, prompt_len: int) -> float:
    """FLOPs of one PPO iteration from shapes (see the module docstring), in GFLOP."""
    import jax

    matmul_params = sum(x.size for x in jax.tree.leaves(params) if x.ndim == 2)  # embeddings: the tied output layer
    tokens = config.batch_size * (prompt_len + config.max_new_tokens)
    forward = 2 * matmul_params * tokens
    models = 1 if config.shared_trunk else 2  # policy (+ critic)
    rollout, experience = forward, forward * (1 + models)  # reference + policy (+ critic)
    update = config.ppo_epochs * 3 * forward * models
    return (rollout + experience + update) / 1e9


def check_args(args: Args) -> None:
    """Bad options fail before jax starts."""
    unknown = sorted(c for c in set(args.compare) - set(COMPARE) if not (c.startswith("xla:") and "=" in c))
    if unknown:
        raise SystemExit(f"--compare takes {', '.join(COMPARE)} or xla:NAME=VALUE; got {', '.join(unknown)}")
    if args.devices < 1:
        raise SystemExit(f"--devices must be >= 1, got {args.devices}")
    if "one_device" in args.compare and args.devices == 1:
        raise SystemExit("--compare one_device needs --devices > 1 (it is the 1-device side of that A/B)")
    runs = sweep_sizes(args)
    if any(r % args.devices for r in runs):
        raise SystemExit(f"every sweep size ({runs}) must be a multiple of --devices {args.devices}")


def force_host_devices(count: int) -> None:
    """``count`` simulated CPU devices (one XLA flag, read when jax's CPU client starts)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])


def main(args: Args) -> dict:
    check_args(args)
    if args.devices > 1:
        force_host_devices(args.devices)
    import jax
    import numpy as np

    from jaxrlhf.sharding import make_mesh
    from jaxrlhf.training import PPO, Sweep

    runs = sweep_sizes(args)
    reps = 1 if args.quick else args.reps
    model, params, reward_fn, config, (ids, mask), source = build(args)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"randomwalks PPO: {n_params / 1e6:.2f}M parameters ({source}); batch {config.batch_size}, "
        f"{config.max_new_tokens} new tokens, {config.ppo_epochs} epochs x {config.num_minibatches} minibatches; "
        f"{jax.device_count()} {jax.default_backend()} device(s), sweeps' run axis over {args.devices}"
    )

    programs = {}
    ppo = PPO(config, model, reward_fn)
    batch = ppo.prompt_batch(ids, mask)
    programs["one run"] = dict(
        step=ppo.train_step,
        rollout=ppo.rollout_step,
        state=ppo.init_state(params),
        frozen=ppo.frozen_params(params),
        batch=batch,
    )

    def add_sweep(name, r, devices=args.devices, **options):
        mesh = make_mesh(runs=devices, data=1, devices=jax.devices()[:devices]) if devices > 1 else None
        sweep = Sweep(config, model, reward_fn, [{"seed": s} for s in range(r)], mesh=mesh, **options)
        programs[name] = dict(
            step=sweep.train_step,
            rollout=sweep.rollout_step,
            state=sweep.init_state(params),
            frozen=sweep.frozen_params(params),
            batch=sweep.prompt_batch(np.stack([ids] * r), np.stack([mask] * r)),
            runs=r,
        )

    for r in runs:
        add_sweep(f"sweep R={r}", r)
    largest = max(runs)
    if "per_run_stop" in args.compare:
        add_sweep(f"R={largest} per-run stop", largest, shared_decode_stop=False)
    if "one_device" in args.compare:
        add_sweep(f"R={largest} 1 device", largest, devices=1)
    for option in (c for c in args.compare if c.startswith("xla:")):
        name, value = option[len("xla:") :].split("=", 1)
        add_sweep(
            f"R={largest} {name.removeprefix('xla_cpu_')}={value}",
            largest,
            tuning=dataclasses.replace(ppo.tuning, compiler_options={**dict(ppo.tuning.compiler_options), name: value}),
        )

    def timed(fn, *call_args):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*call_args))
        return out, time.perf_counter() - start

    def one_step(program) -> float:
        (program["state"], _), seconds = timed(program["step"], program["state"], program["frozen"], program["batch"])
        return seconds

    def one_rollout(program) -> float:
        return timed(program["rollout"], program["state"], program["frozen"], program["batch"])[1]

    compile_s = {name: one_step(p) for name, p in programs.items()}  # first call: compile + one step
    if args.phases:
        for p in programs.values():
            one_rollout(p)
    times = {name: [] for name in programs}
    rollout_times = {name: [] for name in programs}
    loads = []
    for _ in range(reps):
        for name, program in programs.items():
            times[name].append(one_step(program))
            if args.phases:
                rollout_times[name].append(one_rollout(program))
        loads.append(os.getloadavg()[0])
    median = {name: statistics.median(t) for name, t in times.items()}
    t_one = median["one run"]
    peak = matmul_peak_gflops()
    gflop_one = ppo_step_gflop(params, config, ids.shape[1])

    print(
        f"\n{datetime.date.today()}, load average during the runs {min(loads):.2f}-{max(loads):.2f}, "
        f"medians of {reps} interleaved repetitions\n"
    )
    print(
        f"{'program':<34} {'s/step':>8} {'x one run':>10} {'R in sequence s/step':>21} "
        f"{'throughput vs sequence':>23} "
        f"{'GFLOP/step':>11} {'GFLOP/s':>8} {'of peak':>8} {'compile s':>10}"
    )
    results = {"one_run_s": t_one, "load_average": [min(loads), max(loads)], "matmul_peak_gflops": peak, "rows": []}
    for name, program in programs.items():
        r = program.get("runs", 1)
        sequential = r * t_one
        ratio = sequential / median[name]
        gflop = r * gflop_one
        rate = gflop / median[name]
        print(
            f"{name:<34} {median[name]:8.3f} {median[name] / t_one:9.2f}x {sequential:21.3f} {ratio:22.2f}x "
            f"{gflop:11.1f} {rate:8.1f} {rate / peak:7.0%} {compile_s[name] - median[name]:10.1f}"
        )
        results["rows"].append(
            dict(
                program=name,
                runs=r,
                seconds=median[name],
                vs_one_run=median[name] / t_one,
                throughput_ratio=ratio,
                gflops=rate,
                compile_s=compile_s[name] - median[name],
            )
        )
    print(f"\nmatrix-product peak of this machine: {peak:.0f} GFLOP/s (float32, jitted 2048^3 product)")
    if args.phases:
        rollout_one = statistics.median(rollout_times["one run"])
        print("\nby phase (rollout timed alone; rest = step - rollout: scoring, experience, update)\n")
        print(f"{'program':<34} {'rollout s':>10} {'x one run':>10} {'rest s':>8} {'x one run':>10}")
        for row in results["rows"]:
            rollout_s = statistics.median(rollout_times[row["program"]])
            rest_s = row["seconds"] - rollout_s
            row.update(rollout_s=rollout_s, rest_s=rest_s)
            print(
                f"{row['program'] + ':':<34} {rollout_s:10.3f} {rollout_s / rollout_one:9.2f}x {rest_s:8.3f} "
                f"{rest_s / (t_one - rollout_one):9.2f}x"
            )
    row = next(x for x in results["rows"] if x["program"] == f"sweep R={largest}")
    print(
        f"\n{largest} runs as one sweep: {row['vs_one_run']:.2f}x the time of one run, "
        f"{row['throughput_ratio']:.2f}x the throughput of {largest} runs in sequence"
    )
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
