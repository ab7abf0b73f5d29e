"""Subprocess worker for tests/test_training.py; defines no tests.

    python tests/training_worker.py multihost PORT PROCESS_ID NUM_PROCESSES LOCAL_DEVICES OUT.npz
        one PPO step as one process of a `jax.distributed` job (CPU, gloo collectives) on a
        data-parallel mesh over every process's devices; process 0 writes the policy params.
    python tests/training_worker.py resume OUT_DIR NUM_STEPS
        `train` for NUM_STEPS more steps into OUT_DIR (resuming from its checkpoint), in a fresh
        process, on the same 8 simulated devices the test process has.

With $JAXRLHF_TEST_COMPILATION_CACHE set, compiled programs go to (and come from) that persistent
compilation cache directory, shared with the test process (the resume worker loads the step the test
process compiled).
"""

import os
import sys

if __name__ == "__main__":
    _mode = sys.argv[1]
    _devices = sys.argv[5] if _mode == "multihost" else "8"
    _flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*_flags, f"--xla_force_host_platform_device_count={_devices}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def enable_compilation_cache() -> None:
    import jax

    cache_dir = os.environ.get("JAXRLHF_TEST_COMPILATION_CACHE")
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def flat_params(params) -> dict:
    import jax
    import numpy as np

    return {
        jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def run_multihost(port: int, process_id: int, num_processes: int, out_path: str) -> None:
    import jax
    import numpy as np

    from jaxrlhf.sharding import initialize_distributed, make_mesh, to_host
    from jaxrlhf.training import PPO

    initialize_distributed(f"localhost:{port}", num_processes, process_id)
    import test_training as tt

    model = tt.LanguageModel(tt.tiny_gpt2_config())
    params = model.init_params(jax.random.PRNGKey(0))
    mesh = make_mesh()  # all devices of all processes
    ppo = PPO(tt.BASE_CONFIG, model, tt.target_fraction_reward, mesh=mesh)
    state = ppo.init_state(params)
    frozen = ppo.frozen_params(params)
    batch = ppo.prompt_batch(*tt.make_prompts(tt.BATCH))  # every process holds the global batch
    state, metrics = ppo.train_step(state, frozen, batch)
    host_params = to_host(state.policy_params)
    metrics = jax.device_get(metrics)
    if process_id == 0:
        np.savez(out_path, global_devices=len(jax.devices()), score=metrics["score"], **flat_params(host_params))
    jax.distributed.shutdown()


def run_resume(out_dir: str, num_steps: int) -> None:
    import jax
    import test_training as tt

    from jaxrlhf.training import train

    model = tt.LanguageModel(tt.tiny_gpt2_config())
    params = model.init_params(jax.random.PRNGKey(0))
    train(
        (model, params),
        tt.target_fraction_reward,
        tt.make_prompts(tt.RESUME_PROMPTS),
        tt.BASE_CONFIG,
        out_dir,
        num_steps=num_steps,
        progress=False,
    )


if __name__ == "__main__":
    enable_compilation_cache()
    if _mode == "multihost":
        run_multihost(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[6])
    elif _mode == "resume":
        run_resume(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {_mode!r}")
