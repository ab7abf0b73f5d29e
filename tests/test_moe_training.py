"""A mixture-of-experts policy in the PPO trainer (issue 32): the routers' load-balancing and z
losses join the policy loss with their (sweepable) coefficients and are logged, in the plain and
the packed update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.models import LanguageModel, ModelConfig
from jaxrlhf.training import PPO, PPOConfig

MOE = dict(model_type="qwen3_moe", vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
           num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64, eos_token_id=2)  # fmt: skip
CONFIG = PPOConfig(batch_size=8, minibatch_size=8, ppo_epochs=1, max_prompt_len=4, max_new_tokens=6,
                   eos_token_id=2, learning_rate=1e-3, advantage_estimator="grpo", num_generations=4)  # fmt: skip


def reward(prompt_ids, prompt_mask, response_ids, response_mask):
    return jnp.sum((response_ids == 5) * response_mask, axis=1).astype(jnp.float32)


def test_router_loss_coefficients_are_sweepable_numbers():
    from jaxrlhf.training.hparams import SWEEPABLE_FIELDS, HyperParams

    assert {"router_aux_loss_coef", "router_z_loss_coef"} <= set(SWEEPABLE_FIELDS)
    hp = HyperParams.from_config(CONFIG.replace(router_aux_loss_coef=0.001))
    assert float(hp.router_aux_loss_coef) == pytest.approx(0.001) and float(hp.router_z_loss_coef) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True])
def test_router_losses_join_the_loss_with_their_coefficients(packed):
    model = LanguageModel(ModelConfig.from_hf(MOE))
    params = model.init_params(jax.random.PRNGKey(0))
    config = CONFIG.replace(max_tokens_per_microbatch=2 * 10 if packed else None)
    ppo = PPO(config, model, reward)
    frozen = ppo.frozen_params(params)
    batch = ppo.prompt_batch(np.arange(8, dtype=np.int32).reshape(2, 4) + 6, np.ones((2, 4), np.int32))
    metrics = {}
    for aux, z in ((0.0, 0.0), (0.01, 0.0), (0.0, 0.1)):
        state = ppo.init_state(params, config=config.replace(router_aux_loss_coef=aux, router_z_loss_coef=z))
        _, m = ppo.train_step(state, frozen, batch)
        metrics[aux, z] = jax.device_get(m)
    assert ppo.compiled_step_count() == 1  # the coefficients are data
    base = metrics[0.0, 0.0]
    assert float(base["router_aux_loss"]) > 0 and float(base["router_z_loss"]) > 0
    assert float(metrics[0.01, 0.0]["loss"]) - float(base["loss"]) == pytest.approx(
        0.01 * float(base["router_aux_loss"]), rel=1e-4, abs=1e-7
    )
    assert float(metrics[0.0, 0.1]["loss"]) - float(base["loss"]) == pytest.approx(
        0.1 * float(base["router_z_loss"]), rel=1e-4, abs=1e-7
    )
