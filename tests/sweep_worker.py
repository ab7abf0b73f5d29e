"""Subprocess for tests/test_sweep.py: a sweep killed with SIGKILL after logging step 3.

With ``save_every=2`` the checkpoint of step 2 is on disk, and step 3's metrics rows are written but
not checkpointed: the rerun must drop them and resume exactly.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conftest  # noqa: E402,F401  (8 CPU devices, as in the parent test process)
import jax  # noqa: E402
import test_sweep as ts  # noqa: E402
import test_training as tt  # noqa: E402

from jaxrlhf.models import LanguageModel  # noqa: E402
from jaxrlhf.training import train_sweep  # noqa: E402


def main(out_dir: str) -> None:
    cache_dir = os.environ.get("JAXRLHF_TEST_COMPILATION_CACHE")
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    model = LanguageModel(tt.tiny_gpt2_config())
    params = model.init_params(jax.random.PRNGKey(0))

    def kill_after_step_3(step, metrics, state):
        if step == 3:
            os.kill(os.getpid(), signal.SIGKILL)

    train_sweep(
        (model, params),
        tt.target_fraction_reward,
        tt.make_prompts(tt.RESUME_PROMPTS),
        ts.CONFIG,
        out_dir,
        ts.RUNS,
        progress=False,
        export=False,
        on_step=kill_after_step_3,
    )


if __name__ == "__main__":
    main(sys.argv[1])
