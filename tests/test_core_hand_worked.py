"""One response worked out by hand: step rewards, returns and GAE with the numbers written out."""

import jax.numpy as jnp
import numpy as np

from jaxrlhf import core

# A 3-token response (plus one padding position) that the reward model scored 2.0.
SCORES = jnp.array([2.0])
LOGPROBS = jnp.array([[-1.0, -0.5, -2.0, -3.0]])  # policy log pi(a_t | s_t)
REF_LOGPROBS = jnp.array([[-1.2, -0.5, -1.5, -9.0]])  # SFT reference log pi_ref(a_t | s_t)
MASK = jnp.array([[1, 1, 1, 0]])  # the 4th position is padding
VALUES = jnp.array([[0.5, 1.0, 1.5, 7.0]])  # critic V(s_t); the padding value is ignored
KL_COEF = 0.1


def test_step_rewards_by_hand():
    # k1 per token: logprobs - ref_logprobs = [-1.0 + 1.2, -0.5 + 0.5, -2.0 + 1.5] = [0.2, 0.0, -0.5]
    # penalty -0.1 * kl                                                      = [-0.02, 0.0, 0.05]
    # the score 2.0 lands on the last valid token (t = 2): 0.05 + 2.0 = 2.05; padding gets 0.
    rewards = core.kl_penalized_rewards(SCORES, LOGPROBS, REF_LOGPROBS, MASK, KL_COEF, "k1")
    np.testing.assert_allclose(rewards, [[-0.02, 0.0, 2.05, 0.0]], atol=1e-6)


def test_returns_by_hand():
    rewards = jnp.array([[-0.02, 0.0, 2.05, 0.0]])
    # gamma = 1.0: every token gets the whole rest of the reward.
    #   G_2 = 2.05;  G_1 = 0.0 + 2.05 = 2.05;  G_0 = -0.02 + 2.05 = 2.03
    np.testing.assert_allclose(core.discounted_returns(rewards, MASK, 1.0), [[2.03, 2.05, 2.05, 0.0]], atol=1e-6)
    # gamma = 0.9: earlier tokens see the final score discounted.
    #   G_2 = 2.05
    #   G_1 = 0.0 + 0.9 * 2.05 = 1.845
    #   G_0 = -0.02 + 0.9 * 1.845 = -0.02 + 1.6605 = 1.6405
    np.testing.assert_allclose(core.discounted_returns(rewards, MASK, 0.9), [[1.6405, 1.845, 2.05, 0.0]], atol=1e-6)


def test_gae_by_hand():
    rewards = jnp.array([[-0.02, 0.0, 2.05, 0.0]])
    # gamma = 1.0, gae_lambda = 0.95; V past the last valid token is 0.
    #   delta_2 = 2.05 + 1.0 * 0.0 - 1.5 = 0.55
    #   delta_1 = 0.0  + 1.0 * 1.5 - 1.0 = 0.5
    #   delta_0 = -0.02 + 1.0 * 1.0 - 0.5 = 0.48
    #   A_2 = 0.55
    #   A_1 = 0.5  + 0.95 * 0.55   = 0.5  + 0.5225   = 1.0225
    #   A_0 = 0.48 + 0.95 * 1.0225 = 0.48 + 0.971375 = 1.451375
    #   returns = A + V = [1.451375 + 0.5, 1.0225 + 1.0, 0.55 + 1.5] = [1.951375, 2.0225, 2.05]
    advantages, returns = core.gae_advantages(rewards, VALUES, MASK, gamma=1.0, gae_lambda=0.95)
    np.testing.assert_allclose(advantages, [[1.451375, 1.0225, 0.55, 0.0]], atol=1e-6)
    np.testing.assert_allclose(returns, [[1.951375, 2.0225, 2.05, 0.0]], atol=1e-6)
    # gae_lambda = 1.0: A_t = G_t - V_t, so the value targets are the plain returns [2.03, 2.05, 2.05].
    #   A_2 = 0.55;  A_1 = 0.5 + 0.55 = 1.05;  A_0 = 0.48 + 1.05 = 1.53
    advantages, returns = core.gae_advantages(rewards, VALUES, MASK, gamma=1.0, gae_lambda=1.0)
    np.testing.assert_allclose(advantages, [[1.53, 1.05, 0.55, 0.0]], atol=1e-6)
    np.testing.assert_allclose(returns, [[2.03, 2.05, 2.05, 0.0]], atol=1e-6)


def test_ppo_losses_by_hand():
    # Two tokens, advantage +1 and -1, both with new/old ratio e^0.3 = 1.3499 > 1 + 0.2.
    #   token 0 (A = +1): max(-1 * 1.3499, -1 * 1.2) = -1.2     (clipped: no push beyond 1.2)
    #   token 1 (A = -1): max(+1 * 1.3499, +1 * 1.2) = 1.3499   (unclipped: pessimistic bound)
    #   token-mean = (-1.2 + 1.3499) / 2 = 0.07493; one of two tokens clipped.
    logprobs = jnp.array([[-0.7, -0.7]])
    old_logprobs = jnp.array([[-1.0, -1.0]])
    loss, stats = core.ppo_policy_loss(logprobs, old_logprobs, jnp.array([[1.0, -1.0]]), jnp.ones((1, 2)))
    np.testing.assert_allclose(loss, (-1.2 + np.exp(0.3)) / 2, rtol=1e-6)
    np.testing.assert_allclose(stats["clipfrac"], 0.5)
    # approx_kl = k3 with d = old - new = -0.3: e^-0.3 + 0.3 - 1 = 0.040818
    np.testing.assert_allclose(stats["approx_kl"], np.exp(-0.3) + 0.3 - 1, rtol=1e-5)
    # Value: V = 1.5, V_old = 1.0, R = 2.0, eps = 0.2: clip(V) = 1.2.
    #   (1.5 - 2)^2 = 0.25, (1.2 - 2)^2 = 0.64 -> max = 0.64, loss = 0.5 * 0.64 = 0.32
    loss, stats = core.ppo_value_loss(jnp.array([[1.5]]), jnp.array([[1.0]]), jnp.array([[2.0]]), jnp.ones((1, 1)))
    np.testing.assert_allclose(loss, 0.32, rtol=1e-6)
    np.testing.assert_allclose(stats["vf_clipfrac"], 1.0)
