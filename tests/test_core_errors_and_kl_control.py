"""Clear errors for wrong shapes / unknown options, and the KL controllers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import core

BT = jnp.zeros((2, 3))
BT_OTHER = jnp.zeros((2, 4))
MASK = jnp.ones((2, 3))


@pytest.mark.parametrize(
    "call",
    [
        lambda: core.token_logprobs(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32)),  # logits lacks V
        lambda: core.token_logprobs(jnp.zeros((2, 4, 5)), jnp.zeros((2, 3), jnp.int32)),  # T mismatch
        lambda: core.token_logprobs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3))),  # float tokens
        lambda: core.entropy_from_logits(jnp.zeros((2, 3))),
        lambda: core.kl_estimate(BT, BT_OTHER),
        lambda: core.masked_mean(BT, BT_OTHER),
        lambda: core.masked_whiten(BT, jnp.ones((3,))),
        lambda: core.kl_penalized_rewards(jnp.zeros((3,)), BT, BT, MASK, 0.1),  # scores not [B]
        lambda: core.kl_penalized_rewards(jnp.zeros((2, 1)), BT, BT, MASK, 0.1),
        lambda: core.kl_penalized_rewards(jnp.zeros((2,)), BT, BT, MASK, jnp.ones(2)),  # kl_coef not scalar
        lambda: core.discounted_returns(jnp.zeros((3,)), jnp.zeros((3,))),
        lambda: core.gae_advantages(BT, BT_OTHER, MASK),
        lambda: core.last_valid_index(jnp.ones((3,))),
        lambda: core.ppo_policy_loss(BT, BT, BT_OTHER, MASK),
        lambda: core.ppo_policy_loss(jnp.zeros((6,)), jnp.zeros((6,)), jnp.zeros((6,)), jnp.ones((6,))),
        lambda: core.ppo_value_loss(BT, BT, BT, BT_OTHER),
        lambda: core.reward_model_loss(jnp.zeros((3,)), jnp.zeros((4,))),
        lambda: core.reward_model_loss(BT, BT),
    ],
)
def test_wrong_shapes_raise(call):
    with pytest.raises(AssertionError, match=r"(?i)rank|shape|type"):
        call()


def test_wrong_shapes_raise_at_trace_time_under_jit():
    with pytest.raises(AssertionError, match="shape"):
        jax.jit(core.gae_advantages)(BT, BT_OTHER, MASK)


def test_unknown_kl_kind_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"k1.*k2.*k3.*abs"):
        core.kl_estimate(BT, BT, kind="k4")
    with pytest.raises(ValueError, match="k3"):
        core.kl_penalized_rewards(jnp.zeros((2,)), BT, BT, MASK, 0.1, kind="kl")


def test_unknown_aggregation_names_the_valid_ones():
    with pytest.raises(ValueError, match="seq-mean-token-sum"):
        core.ppo_policy_loss(BT, BT, BT, MASK, agg="sum")


def test_fixed_controller_keeps_beta():
    controller = core.fixed_kl_controller(0.05)
    state = controller.init()
    assert isinstance(state, core.KLControllerState)
    for kl in (0.0, 3.0, 100.0):
        state = controller.update(state, kl, 64)
    np.testing.assert_allclose(state.kl_coef, 0.05)


def test_adaptive_controller_formula():
    controller = core.adaptive_kl_controller(0.2, target=6.0, horizon=10_000)
    state = controller.init()
    # KL = 9: e = clip(9 / 6 - 1, -0.2, 0.2) = 0.2; beta = 0.2 * (1 + 0.2 * 500 / 10000) = 0.202
    np.testing.assert_allclose(controller.update(state, 9.0, 500).kl_coef, 0.202, rtol=1e-6)
    # KL = 5.4: e = 5.4 / 6 - 1 = -0.1; beta = 0.2 * (1 - 0.1 * 500 / 10000) = 0.199
    np.testing.assert_allclose(controller.update(state, 5.4, 500).kl_coef, 0.199, rtol=1e-6)
    # KL on target: unchanged.
    np.testing.assert_allclose(controller.update(state, 6.0, 500).kl_coef, 0.2, rtol=1e-6)


def test_adaptive_controller_moves_kl_toward_target():
    """A toy policy whose KL falls as beta rises (KL = 1.2 / beta): KL settles at the target."""
    target = 6.0
    controller = core.adaptive_kl_controller(0.05, target=target, horizon=1_000)

    @jax.jit
    def run(state):
        def step(state, _):
            kl = 1.2 / state.kl_coef
            return controller.update(state, kl, 256), kl

        return jax.lax.scan(step, state, None, length=200)

    final_state, kls = run(controller.init())
    kls = np.asarray(kls)
    assert kls[0] == pytest.approx(24.0)  # far above target: beta grows
    assert np.all(np.diff(kls) <= 1e-6)  # KL moves monotonically toward the target
    assert kls[-1] == pytest.approx(target, rel=0.02)
    assert float(final_state.kl_coef) == pytest.approx(1.2 / target, rel=0.02)
    # From below the target beta shrinks.
    low = controller.update(core.KLControllerState(jnp.float32(0.5)), 1.0, 256)
    assert float(low.kl_coef) < 0.5
