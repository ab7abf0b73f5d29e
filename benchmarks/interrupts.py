"""Per-step cost of the driver's interrupt handling: `train` with and without it.

`train` installs a SIGTERM handler once per call and wraps its loop in one ``try``; on the way out
of an interrupt or a host-side exception it checkpoints the last committed state. Nothing runs per
step except remembering that state. This script measures it: the same tiny PPO run (the trainer
tests' 2-layer GPT-2, batch 32, 8 new tokens) through `train`, alternately with the handling and
with it replaced by a no-op (the loop body unchanged), in blocks of steps; reported are the median
step times of each and their ratio.

    python benchmarks/interrupts.py               # 6 blocks of 10 steps each way
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Args:
    """Interrupt handling on and off, interleaved."""

    blocks: int = 6
    """Blocks per variant (alternating)."""
    steps: int = 10
    """Steps per block."""


def main(args: Args) -> dict:
    import jax

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_training as tt

    from jaxrlhf.models import LanguageModel
    from jaxrlhf.training import PPO, train
    from jaxrlhf.training import trainer as trainer_module

    model = LanguageModel(tt.tiny_gpt2_config())
    params = model.init_params(jax.random.PRNGKey(0))
    config = tt.BASE_CONFIG.replace(total_steps=10**6, save_every=10**6)
    ppo = PPO(config, model, tt.target_fraction_reward)  # compiled once, shared by both variants
    prompts = tt.make_prompts(tt.BATCH)
    with_handling = trainer_module._run_loop

    def without_handling(runner, state, start, end, loggers, checkpointer, **hooks):
        result = trainer_module._steps(runner, state, start, end, loggers, checkpointer, [state], **hooks)
        checkpointer.wait()
        return result

    times = {"with interrupt handling": [], "without": []}
    with tempfile.TemporaryDirectory() as tmp:
        for block in range(2 * args.blocks + 1):
            name = "with interrupt handling" if block % 2 else "without"
            trainer_module._run_loop = with_handling if block % 2 else without_handling
            with contextlib.redirect_stderr(open(os.devnull, "w")):
                result = train(
                    (model, params),
                    tt.target_fraction_reward,
                    prompts,
                    config,
                    os.path.join(tmp, f"block_{block}"),
                    num_steps=args.steps,
                    progress=False,
                    export=False,
                    trainer=ppo,
                )
            if block:  # block 0 compiles
                times[name] += [m["step_time"] for m in result.history[1:]]
    trainer_module._run_loop = with_handling
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"load average {os.getloadavg()[0]:.2f}; median step time over {len(times['without'])} steps each:")
    for name, value in medians.items():
        print(f"  {name:<24} {value * 1e3:8.2f} ms")
    ratio = medians["with interrupt handling"] / medians["without"]
    print(f"ratio (with / without): {ratio:.3f}")
    return {"medians_s": medians, "ratio": ratio}


if __name__ == "__main__":
    main(tyro.cli(Args))
