"""Value models (critics): a scalar head on the transformer's final hidden state.

`V(s_t) = w . h_t + b`, with `h_t` the final-norm hidden state at token t. Two layouts:
- a separate critic: `ValueModel` = its own transformer trunk (usually initialised from the SFT or
  reward-model checkpoint) + head; params `{"trunk": ..., "head": ...}`;
- a shared trunk: the policy's own `forward(...).hidden` fed to `value_head_apply`, with the head's
  parameters kept beside the policy's.
The head starts at zero (`scale=0`) or small, so early value estimates do not swamp the advantages.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.lm import LanguageModel, Pretrained


def init_value_head(key: jax.Array, hidden_size: int, scale: float = 0.0) -> dict:
    """Head parameters: kernel `[D, 1]` ~ N(0, scale^2 / D) (zero when scale = 0), bias 0."""
    kernel = jax.random.normal(key, (hidden_size, 1), jnp.float32) * (scale / jnp.sqrt(hidden_size))
    return {"kernel": kernel, "bias": jnp.zeros((1,), jnp.float32)}


def value_head_apply(head_params: dict, hidden_BxLxD: jax.Array) -> jax.Array:
    """Values `[B, L]` in float32 from hidden states `[B, L, D]`."""
    kernel = head_params["kernel"].astype(jnp.float32)
    return (hidden_BxLxD.astype(jnp.float32) @ kernel)[..., 0] + head_params["bias"][0]


@dataclasses.dataclass(frozen=True)
class ValueModel:
    """A separate critic: transformer trunk + scalar head. Params: `{"trunk": ..., "head": ...}`."""

    config: ModelConfig

    @property
    def trunk(self) -> LanguageModel:
        return LanguageModel(self.config)

    def apply(self, params, input_ids_BxL, attention_mask_BxL, value_positions: slice | None = None) -> jax.Array:
        """Values `[B, L]` (`[B, n]` at the n positions of a static `value_positions` slice). The
        trunk's vocabulary head is never computed (`LanguageModel.hidden_states`)."""
        hidden = self.trunk.hidden_states(params["trunk"], input_ids_BxL, attention_mask_BxL)
        if value_positions is not None:
            hidden = hidden[:, value_positions]
        return value_head_apply(params["head"], hidden)

    def init_params(self, key: jax.Array, trunk_params=None, head_scale: float = 0.0) -> dict:
        trunk_key, head_key = jax.random.split(key)
        if trunk_params is None:
            trunk_params = self.trunk.init_params(trunk_key)
        return {"trunk": trunk_params, "head": init_value_head(head_key, self.config.hidden_size, head_scale)}

    @classmethod
    def from_pretrained(cls, pretrained: Pretrained, key: jax.Array, head_scale: float = 0.0):
        """A critic whose trunk starts from a loaded checkpoint; returns `(value_model, params)`."""
        model = cls(pretrained.config)
        return model, model.init_params(key, trunk_params=pretrained.params, head_scale=head_scale)
