"""The split-mesh asynchronous trainer's timeline: rollout and update overlapping on two sub-meshes.

`jaxrlhf.training.asynchronous.SplitMeshPPO` samples on one half of the devices and trains on the
other, both at once (``max_staleness = 1``: the rollout of step t + 1 runs while step t trains).
This script runs the same PPO steps three ways on the same devices (8 by default; on a CPU host
they are simulated, ``--xla_force_host_platform_device_count``):

    synchronous   `PPO` on all devices: rollout then update, one fused program per step
    sequential    the split mesh, blocking after each phase: each phase's own duration on its half
    overlapped    the split mesh as it trains: both phases in flight, each span from its dispatch
                  to the moment its result is ready

and reports the median step time of each, the phases' durations, and the gain the overlap should
give where the two halves are separate chips, from the sequential phase times:

    expected speedup over the sequential split step = (rollout + update) / (max(rollout, update) + transfer)

(against the synchronous step on all devices, divide the synchronous step time by
``max(rollout, update) + transfer``). The measured overlapped step time is only meaningful on
accelerators: XLA:CPU executes one program at a time, even on disjoint simulated devices, so on a
CPU host the two phases are in flight together but run one after the other. Writes
``out_dir/async_timeline.json`` and ``async_timeline.png`` (the sequential and the overlapped
timelines, one row per phase).

    python benchmarks/async_timeline.py                    # GPT-2-small-like shapes, 8 devices
    python benchmarks/async_timeline.py --quick            # tiny shapes, 4 steps: checks that it runs
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclasses.dataclass(frozen=True)
class Args:
    """Rollout and update on two sub-meshes, overlapping: timeline and expected gain."""

    devices: int = 8
    """Devices (simulated on a CPU host); the first half samples, the second trains."""
    layers: int = 6
    """Transformer blocks of the (random) GPT-2-shaped policy."""
    width: int = 384
    """Its width."""
    vocab: int = 8192
    """Its vocabulary."""
    batch: int = 64
    """Responses per step."""
    prompt_len: int = 32
    """Prompt length P."""
    new_tokens: int = 64
    """Response length N (no EOS: every response runs to N)."""
    steps: int = 6
    """Steps per way (the first compiles and is left out of the medians)."""
    out_dir: str = "runs/async_timeline"
    """Where the JSON and the PNG go."""
    quick: bool = False
    """Tiny shapes (2 layers x 32, vocabulary 64, 16 responses of 8 tokens), 4 steps."""


def resolve(args: Args) -> Args:
    if args.devices < 2 or args.devices % 2:
        raise SystemExit(f"--devices must be an even number >= 2 (half sample, half train), got {args.devices}")
    if args.steps < 2:
        raise SystemExit(f"--steps must be >= 2 (the first compiles), got {args.steps}")
    if args.quick:
        return dataclasses.replace(args, layers=2, width=32, vocab=64, batch=16, prompt_len=4, new_tokens=8, steps=4)
    return args


def setup_devices(count: int) -> None:
    """On a CPU host, simulate ``count`` devices (before jax is imported)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def timed_steps(trainer, state, frozen, batch, steps: int) -> tuple[list[float], object]:
    """``steps`` steps, each timed to its result (the driver's loop: dispatch, then block)."""
    import jax

    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, frozen, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return times, state


def draw(timelines: dict, out_png: str) -> None:
    from matplotlib.figure import Figure

    colors = {"rollout": "tab:blue", "update": "tab:orange", "transfer": "tab:green"}
    rows = list(colors)
    fig = Figure(figsize=(10, 2.0 * len(timelines) + 0.6), layout="constrained")
    axes = fig.subplots(len(timelines), 1, squeeze=False).ravel()
    for ax, (title, spans) in zip(axes, timelines.items()):
        spans = [s for s in spans if s["step"] >= 1]  # the first step compiles
        origin = min(s["start"] for s in spans)
        for s in spans:
            y = rows.index(s["phase"])
            ax.barh(y, (s["end"] - s["start"]) * 1e3, left=(s["start"] - origin) * 1e3, color=colors[s["phase"]])
            ax.text((s["start"] - origin) * 1e3, y, f" {s['step']}", va="center", fontsize=7)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("ms since the second step's dispatch")
        ax.set_title(title)
    fig.savefig(out_png, dpi=120)


def main(args: Args) -> dict:
    args = resolve(args)
    setup_devices(args.devices)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxrlhf.models import LanguageModel
    from jaxrlhf.models.config import gpt2_config
    from jaxrlhf.sharding import make_mesh
    from jaxrlhf.training import PPO, PPOConfig
    from jaxrlhf.training.asynchronous import SplitMeshPPO, expected_speedup, phase_means

    devices = jax.devices()[: args.devices]
    if len(devices) < args.devices:
        raise SystemExit(f"{args.devices} devices asked, {len(devices)} available")
    half = args.devices // 2
    heads = max(1, args.width // 64)
    model = LanguageModel(
        gpt2_config(args.vocab, args.width, args.layers, heads, max_len=args.prompt_len + args.new_tokens)
    )
    params = model.init_params(jax.random.PRNGKey(0))

    def reward(prompt_ids, prompt_mask, response_ids, response_mask):
        return jnp.mean((response_ids % 7 == 3).astype(jnp.float32) * response_mask, axis=1)

    config = PPOConfig(
        batch_size=args.batch,
        minibatch_size=args.batch // 2,
        ppo_epochs=2,
        max_prompt_len=args.prompt_len,
        max_new_tokens=args.new_tokens,
        eos_token_id=-1,
        learning_rate=1e-5,
        total_steps=args.steps,
        max_staleness=1,
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, (args.steps + 2, config.prompts_per_step, args.prompt_len)).astype(np.int32)

    results: dict = {"args": dataclasses.asdict(args), "backend": jax.default_backend()}
    results["device_kind"] = devices[0].device_kind
    sync = PPO(config.replace(max_staleness=0), model, reward, mesh=make_mesh(devices=devices))
    state, frozen = sync.init_state(params), sync.frozen_params(params)
    times, _ = timed_steps(sync, state, frozen, sync.prompt_batch(ids[0], np.ones_like(ids[0])), args.steps)
    results["synchronous_step_s"] = statistics.median(times[1:])

    timelines = {}
    for mode in ("sequential", "overlap"):
        split = SplitMeshPPO(
            config, model, reward, sampler_devices=devices[:half], trainer_devices=devices[half:], timeline=mode
        )
        state, frozen = split.init_state(params), split.frozen_params(params)
        state = split.fill_step(state, frozen, split.prompt_batches(ids[:1], np.ones_like(ids[:1])))
        times, _ = timed_steps(split, state, frozen, split.prompt_batch(ids[1], np.ones_like(ids[1])), args.steps)
        results[f"{mode}_step_s"] = statistics.median(times[1:])
        results[f"{mode}_phase_s"] = phase_means(split.timeline)
        timelines[mode] = [dataclasses.asdict(span) for span in split.timeline]
    phases = results["sequential_phase_s"]
    results["expected_speedup_over_sequential"] = expected_speedup(
        phases["rollout"], phases["update"], phases.get("transfer", 0.0)
    )
    results["expected_speedup_over_synchronous"] = results["synchronous_step_s"] / (
        max(phases["rollout"], phases["update"]) + phases.get("transfer", 0.0)
    )
    results["timelines"] = timelines

    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "async_timeline.json"), "w") as f:
        json.dump(results, f, indent=2)
    draw(
        {f"{mode} ({args.devices // 2} + {args.devices // 2} devices)": spans for mode, spans in timelines.items()},
        os.path.join(args.out_dir, "async_timeline.png"),
    )
    print(f"backend {results['backend']} ({results['device_kind']}), {args.devices} devices")
    print(f"synchronous step on {args.devices} devices: {results['synchronous_step_s'] * 1e3:.1f} ms")
    print(
        f"split mesh, sequential: rollout {phases['rollout'] * 1e3:.1f} ms, update {phases['update'] * 1e3:.1f} ms, "
        f"transfer {phases.get('transfer', 0.0) * 1e3:.1f} ms; step {results['sequential_step_s'] * 1e3:.1f} ms"
    )
    print(f"split mesh, overlapped step: {results['overlap_step_s'] * 1e3:.1f} ms (meaningful on accelerators only)")
    print(
        f"expected speedup from the phase times: {results['expected_speedup_over_sequential']:.2f}x over the "
        f"sequential split step, {results['expected_speedup_over_synchronous']:.2f}x over the synchronous step"
    )
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
