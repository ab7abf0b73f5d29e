"""The PPO update: epochs x minibatches (x micro-batches) of AdamW steps, all inside `lax.scan`.

    for epoch in range(ppo_epochs):                      lax.scan over epoch keys
        perm = permutation(epoch_key, B)                 same numbers on any device count
        for minibatch in split(experience[perm]):        lax.scan over [num_minibatches, mb, ...]
            grads = sum over micro-batches of            lax.scan over [grad_accum, mb / accum, ...]
                    w_i * grad(loss(micro-batch i))
            params, opt_state = optimizer step(grads)

Loss of one minibatch (DESIGN.md formulas, `jaxrlhf.core.losses`):
    L = pg_loss(ratio-clipped, loss_agg) + vf_coef * vf_loss(clipped, token-mean)
        - entropy_coef * entropy + [kl_placement="loss"] kl_coef * KL(policy || ref)

``pg_loss`` is ``policy_loss``'s: "ppo" (token ratio, optional dual clip), "gspo" or
"gspo-token" (sequence ratio). A critic-free estimator has no value term, no value parameters
and no value optimizer: only the policy is differentiated and updated.

Gradient accumulation is exact: micro-batch i's loss terms are weighted by its share ``w_i`` of
the minibatch's normaliser (valid tokens for token-mean terms, non-empty rows for seq-mean
terms), so the summed gradient equals the gradient of the whole minibatch's loss.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxrlhf.core.kl import kl_estimate
from jaxrlhf.core.losses import aggregate_loss, entropy_loss, gspo_policy_loss, ppo_policy_loss, ppo_value_loss
from jaxrlhf.core.stats import masked_count
from jaxrlhf.models.lora import LoraParams
from jaxrlhf.training.config import PPOConfig
from jaxrlhf.training.experience import Experience, Models, policy_and_values
from jaxrlhf.training.hparams import HyperParams, uses_entropy

# Diagnostics averaged over all minibatches of a step.
UPDATE_STAT_KEYS = (
    "pg_loss",
    "vf_loss",
    "loss",
    "clipfrac",
    "vf_clipfrac",
    "approx_kl",
    "ratio_mean",
    "policy_grad_norm",
    "value_grad_norm",
)
# Only with entropy_coef != 0 / kl_placement="loss": the aggregated entropy and KL(policy || ref)
# terms of the policy loss (before their coefficients), so that
# loss = pg_loss - entropy_coef * policy_entropy + kl_coef * policy_kl + vf_coef * vf_loss.
OPTIONAL_UPDATE_STAT_KEYS = ("policy_entropy", "policy_kl")
# Present only with a critic ("gae"): the value terms.
VALUE_UPDATE_STAT_KEYS = ("vf_loss", "vf_clipfrac", "value_grad_norm")


def _normaliser(mask, agg: str):
    """What a loss term divides by: valid tokens (token-mean) or non-empty rows (seq-mean)."""
    if agg == "token-mean":
        return masked_count(mask)
    return jnp.sum((masked_count(mask, axis=-1) > 0).astype(jnp.float32))


def minibatch_loss(
    params,
    experience: Experience,
    kl_coef,
    hparams: HyperParams,
    config: PPOConfig,
    models: Models,
    policy_weight,
    value_weight,
    policy_base=None,
):
    """Weighted PPO loss of a (micro-)batch; ``params = {"policy": ..., "value": ...}``.

    Numbers (clip ranges, coefficients, temperature) come from ``hparams``; ``config`` gives the
    structure (aggregation, KL placement and estimator, which optional terms are on).

    ``policy_weight``/``value_weight`` scale the policy-side and value terms (1 for a whole
    minibatch; the micro-batch's share with gradient accumulation). Returns ``(loss, stats)``.
    """
    exp, hp = experience, hparams
    with_entropy = uses_entropy(config)
    # LoRA: ``params["policy"]`` are the adapters (differentiated), ``policy_base`` the frozen base.
    policy_params = params["policy"] if policy_base is None else LoraParams(policy_base, params["policy"])
    logprobs_BxN, values_BxN, entropy_BxN = policy_and_values(
        models,
        policy_params,
        params["value"],
        exp.prompt_ids,
        exp.prompt_mask,
        exp.response_ids,
        exp.response_mask,
        hp.temperature,
        with_entropy=with_entropy,
    )
    mask_BxN = exp.response_mask
    if config.policy_loss == "ppo":
        dual_clip = None if config.dual_clip is None else hp.dual_clip
        pg_loss, pg_stats = ppo_policy_loss(
            logprobs_BxN,
            exp.old_logprobs,
            exp.advantages,
            mask_BxN,
            hp.clip_eps,
            hp.clip_eps_high,
            config.loss_agg,
            dual_clip=dual_clip,
        )
    else:
        variant = "seq" if config.policy_loss == "gspo" else "token"
        pg_loss, pg_stats = gspo_policy_loss(
            logprobs_BxN,
            exp.old_logprobs,
            exp.advantages,
            mask_BxN,
            hp.clip_eps,
            hp.clip_eps_high,
            variant,
            config.loss_agg,
        )
        pg_stats = {**pg_stats, "ratio_mean": pg_stats["seq_ratio_mean"]}
    sg = jax.lax.stop_gradient
    policy_loss = pg_loss
    extra_stats = {}
    if with_entropy:
        ent_loss, ent_stats = entropy_loss(entropy_BxN, mask_BxN, config.loss_agg)
        policy_loss = policy_loss + hp.entropy_coef * ent_loss
        extra_stats["policy_entropy"] = policy_weight * ent_stats["entropy"]
    if config.kl_placement == "loss":
        kl_BxN = kl_estimate(logprobs_BxN, exp.ref_logprobs, config.kl_estimator)
        kl_term = aggregate_loss(kl_BxN, mask_BxN, config.loss_agg)
        policy_loss = policy_loss + kl_coef * kl_term
        extra_stats["policy_kl"] = policy_weight * sg(kl_term)
    loss = policy_weight * policy_loss
    token_weight = value_weight  # vf terms and token-mean diagnostics share the token weight
    stats = {
        "pg_loss": policy_weight * pg_stats["pg_loss"],
        "clipfrac": token_weight * pg_stats["clipfrac"],
        "approx_kl": token_weight * pg_stats["approx_kl"],
        "ratio_mean": token_weight * pg_stats["ratio_mean"],
        **extra_stats,
    }
    if "dual_clipfrac" in pg_stats:
        stats["dual_clipfrac"] = token_weight * pg_stats["dual_clipfrac"]
    if models.has_value:
        value_clip = None if config.value_clip_eps is None else hp.value_clip_eps
        vf_loss, vf_stats = ppo_value_loss(values_BxN, exp.old_values, exp.returns, mask_BxN, value_clip)
        loss = loss + value_weight * hp.vf_coef * vf_loss
        stats["vf_loss"] = token_weight * vf_stats["vf_loss"]
        stats["vf_clipfrac"] = token_weight * vf_stats["vf_clipfrac"]
    stats["loss"] = sg(loss)
    return loss, stats


def _no_constraint(x, batch_dim: int = 0):
    del batch_dim
    return x


def make_ppo_update(
    config: PPOConfig,
    models: Models,
    policy_opt: optax.GradientTransformation,
    value_opt: optax.GradientTransformation,
    constrain: Callable | None = None,
):
    """Builds ``ppo_update(params, opt_states, experience, kl_coef, hparams, key) -> (params, opt_states, stats)``.

    ``params = {"policy", "value"}``, ``opt_states = {"policy", "value"}``. ``constrain(x, batch_dim)``
    pins the batch axis of (re-arranged) experience arrays to the data-parallel sharding under GSPMD
    (None: no constraint). With LoRA, ``params["policy"]`` holds the adapters and ``policy_base``
    (a keyword of ``ppo_update``) the frozen base they are applied to.
    """
    if constrain is None:
        constrain = _no_constraint
    num_mb, mb_size, accum = config.num_minibatches, config.minibatch_size, config.grad_accum_steps
    micro_size = mb_size // accum
    grad_fn = jax.grad(minibatch_loss, has_aux=True)

    def minibatch_grads(params, minibatch: Experience, kl_coef, hparams, policy_base):
        if accum == 1:
            one = jnp.ones((), jnp.float32)
            return grad_fn(params, minibatch, kl_coef, hparams, config, models, one, one, policy_base)
        # [mb, ...] -> [accum, micro, ...]; micro-batch i weighted by its share of the normaliser.
        micro = jax.tree.map(lambda x: constrain(x.reshape(accum, micro_size, *x.shape[1:]), 1), minibatch)
        token_total = jnp.maximum(_normaliser(minibatch.response_mask, "token-mean"), 1.0)
        policy_total = jnp.maximum(_normaliser(minibatch.response_mask, config.loss_agg), 1.0)

        def accumulate(grads_sum, micro_batch):
            token_w = _normaliser(micro_batch.response_mask, "token-mean") / token_total
            policy_w = _normaliser(micro_batch.response_mask, config.loss_agg) / policy_total
            grads, stats = grad_fn(
                params, micro_batch, kl_coef, hparams, config, models, policy_w, token_w, policy_base
            )
            return jax.tree.map(jnp.add, grads_sum, grads), stats

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, stats = lax.scan(accumulate, zeros, micro)
        return grads, jax.tree.map(lambda s: jnp.sum(s, axis=0), stats)

    def minibatch_step(carry, minibatch: Experience, kl_coef, hparams, policy_base):
        params, opt_states = carry
        grads, stats = minibatch_grads(params, minibatch, kl_coef, hparams, policy_base)
        stats["policy_grad_norm"] = optax.tree.norm(grads["policy"])
        new_params, new_opt_states = dict(params), dict(opt_states)
        trained = [("policy", policy_opt)]
        if models.has_value:
            stats["value_grad_norm"] = optax.tree.norm(grads["value"])
            trained.append(("value", value_opt))
        for name, opt in trained:
            updates, new_opt_states[name] = opt.update(grads[name], opt_states[name], params[name])
            new_params[name] = optax.apply_updates(params[name], updates)
        return (new_params, new_opt_states), stats

    def ppo_update(params, opt_states, experience: Experience, kl_coef, hparams: HyperParams, key, policy_base=None):
        batch = experience.response_ids.shape[0]

        def epoch(carry, epoch_key):
            perm = jax.random.permutation(epoch_key, batch)
            shuffled = jax.tree.map(lambda x: constrain(x[perm].reshape(num_mb, mb_size, *x.shape[1:]), 1), experience)
            return lax.scan(lambda c, mb: minibatch_step(c, mb, kl_coef, hparams, policy_base), carry, shuffled)

        (params, opt_states), stats = lax.scan(epoch, (params, opt_states), jax.random.split(key, config.ppo_epochs))
        # stats: [epochs, minibatches] each; report the mean over all updates of this step.
        return params, opt_states, {k: jnp.mean(v) for k, v in stats.items()}

    return ppo_update
