"""Mixture-of-experts MLP: a top-k softmax router and a dispatch that groups tokens by expert.

One MoE layer (Shazeer et al. 2017; Mixtral, Qwen3-MoE, OLMoE) replaces the MLP by E gated
experts `f_e(x) = down_e(act(gate_e x) * up_e x)` and a router `r = x W_r` (`[D, E]`):

    p = softmax(r),   (w, i) = top_k(p),   w <- w / sum(w) if norm_topk_prob,
    y = sum_j w_j f_{i_j}(x)

Dispatch. Computing every expert on every token (`[tokens, experts, D]`) would cost E/k times the
FLOPs of the routed computation. Here the T*k (token, expert) assignments are sorted by expert so
that each expert multiplies one contiguous block of rows:

- dropless (`ModelConfig.moe_capacity_factor=None`, the default): the sorted rows go through
  `jax.lax.ragged_dot` (a grouped matmul with per-expert row counts; on CPU `blocked_ragged_dot`,
  the same product in blocks of one expert each, since XLA:CPU computes ragged_dot densely), every
  assignment computed, exactly what transformers computes;
- capacity (`moe_capacity_factor=c`): each expert gets C = ceil(c * T * k / E) slots (at most T)
  in a `[E, C, D]` buffer multiplied by `einsum("ecd,edf->ecf")`: static shapes that shard over an
  `"expert"` mesh axis. Assignments past an expert's C slots are dropped (their term is 0 in y);
  priority goes to real tokens over padding, then to first choices over second ones (GShard's
  order, Lepikhin et al. 2020), then to earlier tokens. With C = T nothing is dropped.

`dense_reference` computes the same y the dense way (every expert on every token), for tests and
benchmarks only.

Router losses, exposed in `ModelOutput.aux` for the trainer (`router_losses`):

- load balancing (Switch Transformer, Fedus et al. 2021; transformers' `load_balancing_loss_func`):
  `E * sum_e f_e P_e`, with f_e the fraction of the (layer, token, choice) assignments that went to
  expert e and P_e the mean router probability of e, over every MoE layer and real token;
- z-loss (ST-MoE, Zoph et al. 2022): the mean over layers and real tokens of `logsumexp(r)^2`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrlhf.models.config import ACTIVATIONS, ModelConfig
from jaxrlhf.models.lora import adapter_factors, quantized_kernel

Array = jax.Array
ROUTER_LOGITS = "router_logits"  # the `intermediates` entry each MoE layer sows
EXPERT_PROJECTIONS = ("gate", "up", "down")


def route(router_logits_TxE: Array, top_k: int, norm_topk_prob: bool) -> tuple[Array, Array]:
    """`(weights [T, k] float32, experts [T, k] int32)`: the k most probable experts of each token
    under `softmax(router_logits)` (in float32), weights renormalised to sum 1 if `norm_topk_prob`."""
    probs = jax.nn.softmax(router_logits_TxE.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: `ceil(capacity_factor * tokens * k / experts)`, at most `tokens` (an
    expert is chosen at most once per token, so `tokens` slots never drop anything)."""
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def _expert_order(experts_TxK: Array, valid_T: Array | None) -> Array:
    """The T*k assignments (flattened token-major, `t * k + j`) sorted by expert; within an expert
    real tokens first, then by choice j (first choices before second ones), then by token."""
    T, K = experts_TxK.shape
    token = jnp.repeat(jnp.arange(T), K)
    choice = jnp.tile(jnp.arange(K), T)
    padding = jnp.zeros(T * K, jnp.int32) if valid_T is None else jnp.repeat(1 - valid_T.astype(jnp.int32), K)
    return jnp.lexsort((token, choice, padding, experts_TxK.reshape(-1)))  # last key is the primary one


class ExpertProjection(nn.Module):
    """One stacked projection of the experts, `kernel [E, in, out]` (or a quantised `kernel_q` +
    `kernel_scale`, see `lora.quantize_params`), applied to expert-sorted rows; adds the LoRA
    update `(alpha / r) (x A_e) B_e` when the `"lora"` collection holds `lora_A [E, in, r]` and
    `lora_B [E, r, out]` for it (`LoraConfig(experts=True)`)."""

    config: ModelConfig
    shape: tuple[int, int, int]

    @nn.compact
    def __call__(self, rows, group_sizes_E: Array | None) -> Array:
        """`rows`: `[N, in]` sorted by expert with `group_sizes [E]` rows each (ragged), or
        `[E, C, in]` buffers (`group_sizes=None`)."""
        cfg = self.config
        pdt, dtype = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        kernel = quantized_kernel(self, pdt)
        if kernel is None:
            kernel = self.param("kernel", nn.initializers.normal(0.02), self.shape, pdt)
        rows = rows.astype(dtype)
        out = _grouped_matmul(rows, kernel.astype(dtype), group_sizes_E)
        factors = adapter_factors(self, cfg.lora)
        if factors is None or cfg.lora is None:
            return out
        lora_a, lora_b = (f.astype(dtype) for f in factors)
        delta = _grouped_matmul(_grouped_matmul(rows, lora_a, group_sizes_E), lora_b, group_sizes_E)
        return out + (cfg.lora.scale * delta).astype(out.dtype)


class ExpertKernels(nn.Module):
    """The experts' projections `gate`, `up` (`[E, D, F]`) and `down` (`[E, F, D]`)."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        D, F, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        self.gate = ExpertProjection(cfg, (E, D, F))
        self.up = ExpertProjection(cfg, (E, D, F))
        self.down = ExpertProjection(cfg, (E, F, D))

    def __call__(self, rows, group_sizes_E: Array | None, name: str) -> Array:
        return getattr(self, name)(rows, group_sizes_E)


def _grouped_matmul(rows, kernel_ExIxO: Array, group_sizes_E: Array | None) -> Array:
    if group_sizes_E is None:
        return jnp.einsum("eci,eio->eco", rows, kernel_ExIxO)
    if jax.default_backend() == "cpu":
        # XLA:CPU lowers ragged_dot to every group on every row (E times the FLOPs; measured in
        # benchmarks/moe_dispatch.py): blocks of one expert each cost the routed FLOPs plus padding.
        return blocked_ragged_dot(rows, kernel_ExIxO, group_sizes_E)
    return jax.lax.ragged_dot(rows, kernel_ExIxO, group_sizes_E)


def blocked_ragged_dot(rows_NxI: Array, kernel_ExIxO: Array, group_sizes_E: Array, block: int | None = None) -> Array:
    """`jax.lax.ragged_dot` as blocks of rows that each belong to one expert.

    Each group (expert) of the sorted rows is padded to a multiple of `block` rows, so that the
    padded rows split into `NB = ceil((N + E (block - 1)) / block)` blocks (static) of one group
    each; block j multiplies its rows by its group's kernel (gathered: `[NB, I, O]`), and the
    padded rows are dropped. FLOPs: at most `N + E (block - 1)` rows instead of N (the dense
    lowering of ragged_dot computes `E N`). Rows past `sum(group_sizes)` come out 0, as ragged_dot's.
    `block` (static) defaults to the mean group size as a power of 2 in [8, 128]: large blocks for
    the long sequences of a forward, small ones for a decode step's few rows.
    """
    N = rows_NxI.shape[0]
    E = kernel_ExIxO.shape[0]
    if block is None:
        block = min(128, max(8, 1 << max(0, math.ceil(N / E) - 1).bit_length()))
    block = max(1, min(block, N))
    num_blocks = -(-(N + E * (block - 1)) // block)
    padded_sizes_E = -(-group_sizes_E // block) * block
    group_start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    padded_start_E = jnp.cumsum(padded_sizes_E) - padded_sizes_E
    # Row i of group e (rank i - start_e) goes to padded_start_e + rank; rows past the groups to a spare row.
    group_N = jnp.searchsorted(jnp.cumsum(group_sizes_E), jnp.arange(N), side="right")
    in_group_N = group_N < E
    group_N = jnp.minimum(group_N, E - 1)
    dest_N = jnp.where(in_group_N, padded_start_E[group_N] + jnp.arange(N) - group_start_E[group_N], num_blocks * block)
    padded = jnp.zeros((num_blocks * block + 1, rows_NxI.shape[1]), rows_NxI.dtype).at[dest_N].set(rows_NxI)
    # The group of block j: the one whose padded range holds its first row (empty blocks: the last).
    block_group = jnp.searchsorted(jnp.cumsum(padded_sizes_E), jnp.arange(num_blocks) * block, side="right")
    kernels_BxIxO = kernel_ExIxO[jnp.minimum(block_group, E - 1)]
    out = jnp.einsum("jbi,jio->jbo", padded[:-1].reshape(num_blocks, block, -1), kernels_BxIxO)
    out = jnp.concatenate([out.reshape(num_blocks * block, -1), jnp.zeros_like(out[0, :1])])
    return out[dest_N]


class MoE(nn.Module):
    """The mixture-of-experts MLP of one layer (see the module docstring); parameters
    `router/kernel [D, E]` and `experts/{gate,up,down}/kernel`. Sows its router logits
    (`[B, L, E]` float32) into the `"intermediates"` collection for `router_losses`."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array, valid_BxL: Array) -> Array:
        cfg = self.config
        B, L, D = x_BxLxD.shape
        dtype = jnp.dtype(cfg.dtype)
        router = nn.Dense(
            cfg.num_experts,
            use_bias=False,
            dtype=dtype,
            param_dtype=jnp.dtype(cfg.param_dtype),
            kernel_init=nn.initializers.normal(0.02),
            name="router",
        )
        logits_BxLxE = router(x_BxLxD)
        self.sow("intermediates", ROUTER_LOGITS, logits_BxLxE.astype(jnp.float32))
        x_TxD = x_BxLxD.reshape(B * L, D)
        weights, experts = route(logits_BxLxE.reshape(B * L, -1), cfg.num_experts_per_tok, cfg.norm_topk_prob)
        kernels = ExpertKernels(cfg, name="experts")
        out = dispatch(
            lambda rows, sizes, name: kernels(rows, sizes, name),
            x_TxD,
            experts,
            weights,
            ACTIVATIONS[cfg.activation],
            cfg.num_experts,
            cfg.moe_capacity_factor,
            valid_BxL.reshape(B * L),
        )
        return out.reshape(B, L, D).astype(x_BxLxD.dtype)


def dispatch(
    matmul: Callable[[Array, Array | None, str], Array],
    x_TxD: Array,
    experts_TxK: Array,
    weights_TxK: Array,
    act: Callable[[Array], Array],
    num_experts: int,
    capacity_factor: float | None = None,
    valid_T: Array | None = None,
) -> Array:
    """`y_t = sum_j w_tj f_{e_tj}(x_t)` computed per expert on its own tokens (module docstring).

    `matmul(rows, group_sizes, name)` multiplies expert-sorted rows by projection `name`
    (`"gate"`, `"up"`, `"down"`): ragged `[N, in]` rows with `group_sizes [E]`, or `[E, C, in]`
    buffers when `group_sizes` is None. `valid_T` (1 for real tokens) orders the capacity queue.
    """
    T, K = experts_TxK.shape
    E = num_experts
    order = _expert_order(experts_TxK, valid_T)  # [T*K] assignment ids sorted by expert
    token_N = order // K
    expert_N = experts_TxK.reshape(-1)[order]
    x_N = x_TxD[token_N]
    group_sizes = jnp.bincount(expert_N, length=E).astype(jnp.int32)

    def expert_mlp(rows, sizes):
        return matmul(act(matmul(rows, sizes, "gate")) * matmul(rows, sizes, "up"), sizes, "down")

    if capacity_factor is None:
        y_N = expert_mlp(x_N, group_sizes)
        kept_N = jnp.ones(T * K, bool)
    else:
        C = capacity(T, K, E, capacity_factor)
        first_N = (jnp.cumsum(group_sizes) - group_sizes)[expert_N]
        rank_N = jnp.arange(T * K) - first_N  # place in the expert's queue
        kept_N = rank_N < C
        slot_N = jnp.where(kept_N, expert_N * C + rank_N, E * C)  # dropped rows go to a spare slot
        buffer = jnp.zeros((E * C + 1, x_TxD.shape[-1]), x_TxD.dtype).at[slot_N].set(x_N)
        y_buffer = expert_mlp(buffer[: E * C].reshape(E, C, -1), None).reshape(E * C, -1)
        y_N = jnp.concatenate([y_buffer, jnp.zeros_like(y_buffer[:1])])[slot_N]
    # Back to (token, choice) order, then the weighted sum over the k choices.
    y_TxKxD = jnp.zeros_like(y_N).at[order].set(y_N).reshape(T, K, -1)
    kept_TxK = jnp.zeros(T * K, bool).at[order].set(kept_N).reshape(T, K)
    w_TxK = jnp.where(kept_TxK, weights_TxK, 0.0).astype(y_TxKxD.dtype)
    return jnp.einsum("tkd,tk->td", y_TxKxD, w_TxK)


def kept_assignments(experts_TxK: Array, num_experts: int, capacity_factor: float | None, valid_T=None) -> Array:
    """`[T, k]` bool: which assignments the dispatch computes (all of them when dropless)."""
    T, K = experts_TxK.shape
    if capacity_factor is None:
        return jnp.ones((T, K), bool)
    order = _expert_order(experts_TxK, valid_T)
    expert_N = experts_TxK.reshape(-1)[order]
    group_sizes = jnp.bincount(expert_N, length=num_experts)
    rank_N = jnp.arange(T * K) - (jnp.cumsum(group_sizes) - group_sizes)[expert_N]
    kept_N = rank_N < capacity(T, K, num_experts, capacity_factor)
    return jnp.zeros(T * K, bool).at[order].set(kept_N).reshape(T, K)


def dense_reference(
    x_TxD: Array,
    experts_TxK: Array,
    weights_TxK: Array,
    kernels: dict[str, Array],
    act: Callable[[Array], Array],
    kept_TxK: Array | None = None,
) -> Array:
    """Every expert on every token (`[T, E, D]`: E / k times the routed FLOPs), combined with the
    routing weights of the kept assignments. For tests and benchmarks, never used by the model."""
    h = act(jnp.einsum("td,edf->tef", x_TxD, kernels["gate"])) * jnp.einsum("td,edf->tef", x_TxD, kernels["up"])
    y_TxExD = jnp.einsum("tef,efd->ted", h, kernels["down"])
    E = kernels["gate"].shape[0]
    w = weights_TxK if kept_TxK is None else jnp.where(kept_TxK, weights_TxK, 0.0)
    combine_TxE = jnp.einsum("tk,tke->te", w, jax.nn.one_hot(experts_TxK, E, dtype=w.dtype))
    return jnp.einsum("ted,te->td", y_TxExD, combine_TxE.astype(y_TxExD.dtype))


def router_losses(router_logits_NxBxLxE: Array, valid_BxL: Array, top_k: int) -> dict[str, Array]:
    """`{"router_aux_loss", "router_z_loss"}` over N MoE layers and the real tokens (module docstring).

    aux = E * sum_e f_e P_e, f_e = #{(layer, t, j): e_tj = e} / M, P_e = sum_{layer, t} p_te / M,
    M = N * #real tokens; z = sum_{layer, t} logsumexp(r_t)^2 / M. Finite (0) without real tokens.
    """
    logits = router_logits_NxBxLxE.astype(jnp.float32)
    E = logits.shape[-1]
    valid = jnp.broadcast_to(valid_BxL.astype(jnp.float32), logits.shape[:-1])  # [N, B, L]
    rows = jnp.maximum(jnp.sum(valid), 1.0)
    probs = jax.nn.softmax(logits, axis=-1)
    _, chosen = jax.lax.top_k(probs, top_k)
    counts_E = jnp.einsum("nbl,nblke->e", valid, jax.nn.one_hot(chosen, E, dtype=jnp.float32))
    prob_sum_E = jnp.einsum("nbl,nble->e", valid, probs)
    aux = E * jnp.sum((counts_E / rows) * (prob_sum_E / rows))
    z = jnp.sum(valid * jnp.square(jax.nn.logsumexp(logits, axis=-1))) / rows
    return {"router_aux_loss": aux, "router_z_loss": z}


def collect_router_logits(intermediates: Any) -> Array:
    """The sown router logits of every MoE layer, stacked in layer order: `[N, B, L, E]`."""
    found: list[tuple[int, Array]] = []

    def walk(node, layer):
        if not isinstance(node, dict):
            return
        for name, value in node.items():
            if name == ROUTER_LOGITS:
                found.append((layer, value[0]))
            elif name.startswith("layer_") and name[len("layer_") :].isdigit():
                walk(value, int(name[len("layer_") :]))
            else:
                walk(value, layer)

    walk(dict(intermediates), -1)
    if len(found) == 1 and found[0][0] == -1:  # a scanned model: already stacked [layers, ...]
        return found[0][1]
    return jnp.stack([logits for _, logits in sorted(found, key=lambda item: item[0])])


__all__ = [
    "EXPERT_PROJECTIONS",
    "MoE",
    "blocked_ragged_dot",
    "ROUTER_LOGITS",
    "capacity",
    "collect_router_logits",
    "dense_reference",
    "dispatch",
    "kept_assignments",
    "route",
    "router_losses",
]


def router_loss_terms(aux) -> dict:
    """The scalar router losses of a forward's `ModelOutput.aux` (``router_aux_loss``, the
    load-balancing loss, and ``router_z_loss``), its per-layer router logits left out: what a
    trainer adds to its loss (with its coefficients) and logs."""
    return {name: aux[name] for name in ("router_aux_loss", "router_z_loss")}
