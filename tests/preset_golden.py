"""Three trainer steps of every preset (and the switches the algorithm plug-ins replaced), summarised
for a golden comparison: `tests/data/preset_steps_golden.npz` holds what the trainer computed
before estimators, policy losses and KL penalties became plug-ins (commit fe67cde, the if/elif
trainer); `test_algorithm_plugins.py` recomputes it with today's trainer and compares.

Per case: every metric after each of the 3 steps, and each parameter leaf after step 3 projected on
4 fixed random directions (a change in any entry moves the projections).

    python tests/preset_golden.py tests/data/preset_steps_golden.npz    # regenerate (old trainer)
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny_config

from jaxrlhf.core.stats import masked_mean
from jaxrlhf.models import LanguageModel, ModelConfig
from jaxrlhf.training import PPO, PPOConfig
from jaxrlhf.training.presets import preset

GOLDEN_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "preset_steps_golden.npz")
VOCAB, EOS, TARGET, PROMPT_LEN = 16, 2, 3, 4
STEPS = 3
BASE = PPOConfig(
    total_steps=10,
    batch_size=16,
    minibatch_size=8,
    ppo_epochs=2,
    max_new_tokens=6,
    max_prompt_len=PROMPT_LEN,
    learning_rate=3e-3,
    critic_learning_rate=3e-3,
    eos_token_id=EOS,
    kl_coef=0.05,
    seed=3,
)

# name -> (preset, overrides)
CASES: dict[str, tuple[str, dict]] = {
    "ppo": ("ppo", dict(entropy_coef=0.01, adaptive_kl=True, target_kl=1.0)),
    "ppo_shared_k3_accum": (
        "ppo",
        dict(shared_trunk=True, kl_estimator="k3", grad_accum_steps=2, loss_agg="seq-mean-token-mean"),
    ),
    "ppo_abs_running_sampler": (
        "ppo",
        dict(
            kl_estimator="abs",
            score_norm="running",
            missing_eos_penalty=-1.0,
            old_logprobs_from_sampler=True,
            whiten_advantages=False,
            value_clip_eps=None,
        ),
    ),
    "grpo": ("grpo", dict(num_generations=4)),
    "dr_grpo": ("dr_grpo", dict(num_generations=4)),
    "dapo": ("dapo", dict(num_generations=4, dual_clip=3.0, dynamic_sampling_oversample=2)),
    "gspo": ("gspo", dict(num_generations=4)),
    "gspo_token": ("gspo", dict(num_generations=4, policy_loss="gspo-token", kl_coef=0.02, kl_placement="loss")),
    "rloo": ("rloo", dict(num_generations=4)),
    "reinforce_pp": ("reinforce_pp", {}),
    "reinforce_pp_baseline": ("reinforce_pp_baseline", dict(num_generations=4)),
    "remax": ("remax", {}),
}


def model_config() -> ModelConfig:
    return tiny_config("gpt2", vocab_size=VOCAB, num_heads=2, max_position_embeddings=32, eos_token_id=EOS)


def target_reward(prompt_ids, prompt_mask, response_ids, response_mask):
    """Fraction of valid response tokens equal to TARGET, plus 0.1 per prompt token equal to 5."""
    fraction = masked_mean((response_ids == TARGET).astype(jnp.float32), response_mask, axis=1)
    return fraction + 0.1 * jnp.sum(prompt_ids == 5, axis=1)


def case_config(name: str) -> PPOConfig:
    preset_name, overrides = CASES[name]
    return preset(preset_name, BASE, **overrides)


def projections(tree, directions: int = 4) -> np.ndarray:
    """``[leaves, directions]``: each leaf (float64, flattened) dotted with fixed random vectors."""
    rows = []
    for index, leaf in enumerate(jax.tree.leaves(tree)):
        flat = np.ravel(np.asarray(leaf, np.float64))
        rng = np.random.default_rng(index)
        rows.append(rng.standard_normal((directions, flat.size)) @ flat)
    return np.stack(rows)


def run_case(name: str, model: LanguageModel, params) -> dict[str, np.ndarray]:
    config = case_config(name)
    ppo = PPO(config, model, target_reward)
    state = ppo.init_state(params)
    frozen = ppo.frozen_params(params)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, size=(config.prompts_per_step, PROMPT_LEN)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :2] = 0  # a left-padded prompt
    batch = ppo.prompt_batch(ids, mask)
    out: dict[str, np.ndarray] = {}
    for step in range(STEPS):
        state, metrics = ppo.train_step(state, frozen, batch)
        for key, value in jax.device_get(metrics).items():
            out[f"{name}/metric/{key}/{step}"] = np.asarray(value, np.float64)
    out[f"{name}/policy"] = projections(state.policy_params)
    out[f"{name}/value"] = projections(state.value_params) if jax.tree.leaves(state.value_params) else np.zeros(0)
    return out


def compute_all(names=None) -> dict[str, np.ndarray]:
    model = LanguageModel(model_config())
    params = model.init_params(jax.random.PRNGKey(0))
    out: dict[str, np.ndarray] = {}
    for name in names or CASES:
        out.update(run_case(name, model, params))
    return out


if __name__ == "__main__":
    np.savez_compressed(sys.argv[1], **compute_all())
