"""KL-coefficient controllers as pure, jit-able state updates (optax style).

A controller is a pair ``(init, update)``: ``init() -> KLControllerState`` and
``update(state, kl, n_steps) -> KLControllerState``. The state is a pytree of arrays, so it can
live inside a jitted train state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrlhf.typing import Scalar


class KLControllerState(NamedTuple):
    """State of a KL controller: the current coefficient beta (float32 scalar)."""

    kl_coef: jax.Array


class KLController(NamedTuple):
    """``init() -> state``; ``update(state, kl, n_steps) -> state``."""

    init: Callable[[], KLControllerState]
    update: Callable[[KLControllerState, Scalar, Scalar], KLControllerState]


def fixed_kl_controller(kl_coef: Scalar) -> KLController:
    """A constant coefficient: ``beta <- beta``."""

    def init() -> KLControllerState:
        return KLControllerState(kl_coef=jnp.asarray(kl_coef, jnp.float32))

    def update(state: KLControllerState, kl: Scalar, n_steps: Scalar) -> KLControllerState:
        del kl, n_steps
        return state

    return KLController(init, update)


def adaptive_kl_controller(kl_coef: Scalar, target: Scalar, horizon: Scalar) -> KLController:
    """Adaptive coefficient of Ziegler et al. (2019), steering the observed KL towards ``target``.

    ``e = clip(KL / target - 1, -0.2, 0.2)``, ``beta <- beta * (1 + e * n_steps / horizon)``.

    Args:
      kl_coef: initial beta.
      target: the KL (per sequence, as you measure it) to aim for.
      horizon: how many samples it takes to move beta by a factor ~e^(+-0.2).
    """

    def init() -> KLControllerState:
        return KLControllerState(kl_coef=jnp.asarray(kl_coef, jnp.float32))

    def update(state: KLControllerState, kl: Scalar, n_steps: Scalar) -> KLControllerState:
        proportional_error = jnp.clip(jnp.asarray(kl, jnp.float32) / target - 1.0, -0.2, 0.2)
        multiplier = 1.0 + proportional_error * jnp.asarray(n_steps, jnp.float32) / horizon
        return KLControllerState(kl_coef=state.kl_coef * multiplier)

    return KLController(init, update)
