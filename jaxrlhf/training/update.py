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

``pg_loss`` is the configured policy loss's, a plug-in (`jaxrlhf.training.plugins`; the built-ins
in `jaxrlhf.training.policy_losses`: "ppo" with optional dual clip, "gspo", "gspo-token", "cispo",
"clip-cov", "kl-cov", "gmpo", "sapo"), called with a PRNG key per (micro-)batch for stochastic
losses; the KL term uses the configured KL estimator plug-in. A critic-free estimator has no value
term, no value parameters and no value optimizer: only the policy is differentiated and updated.

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

from jaxrlhf.core.losses import aggregate_loss, entropy_loss, ppo_value_loss
from jaxrlhf.core.stats import masked_count
from jaxrlhf.core.surrogates import ratio_diagnostics
from jaxrlhf.models.lora import LoraParams
from jaxrlhf.training import packed, plugins
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
    key=None,
    pg_weights=None,
):
    """Weighted PPO loss of a (micro-)batch; ``params = {"policy": ..., "value": ...}``.

    Numbers (clip ranges, coefficients, temperature) come from ``hparams``; ``config`` gives the
    structure (aggregation, KL placement and estimator, which optional terms are on).

    ``policy_weight``/``value_weight`` scale the policy-side and value terms (1 for a whole
    minibatch; the micro-batch's share with gradient accumulation). ``pg_weights``: see
    `loss_from_outputs`. Returns ``(loss, stats)``.
    """
    with_entropy = uses_entropy(config)
    # LoRA: ``params["policy"]`` are the adapters (differentiated), ``policy_base`` the frozen base.
    policy_params = params["policy"] if policy_base is None else LoraParams(policy_base, params["policy"])
    outputs = policy_and_values(
        models,
        policy_params,
        params["value"],
        experience.prompt_ids,
        experience.prompt_mask,
        experience.response_ids,
        experience.response_mask,
        hparams.temperature,
        with_entropy=with_entropy,
        with_router_losses=models.policy.config.is_moe,
    )
    logprobs_BxN, values_BxN, entropy_BxN = outputs[:3]
    return loss_from_outputs(
        logprobs_BxN,
        values_BxN,
        entropy_BxN,
        experience,
        kl_coef,
        hparams,
        config,
        models,
        policy_weight,
        value_weight,
        key,
        router_losses=outputs[3] if len(outputs) > 3 else None,
        pg_weights=pg_weights,
    )


def loss_from_outputs(
    logprobs_BxN,
    values_BxN,
    entropy_BxN,
    experience: Experience,
    kl_coef,
    hparams: HyperParams,
    config: PPOConfig,
    models: Models,
    policy_weight,
    value_weight,
    key=None,
    router_losses=None,
    pg_weights=None,
):
    """`minibatch_loss` from the policy's (differentiable) outputs on the experience's rows:
    ``logprobs``, ``values`` (None without a critic) and ``entropy`` (None without the entropy
    term), all ``[B, N]``; the masks of ``experience`` say which tokens count (the action mask:
    observation tokens of an episode are context).

    The policy loss plug-in gets the experience's rollout-correction weights
    (``loss_weights``, `PolicyLossInputs.token_weights`) and mask (``policy_mask``: the action
    mask without rejected tokens, when the correction rejects). Its term is then normalised over
    that mask, so with gradient accumulation it takes its own shares ``pg_weights = (policy-side
    weight, token weight)`` of the minibatch's normalisers (None: ``policy_weight``,
    ``value_weight``); the other terms keep the action mask. ``router_losses`` (a
    mixture-of-experts policy's, means over its forward's tokens) add
    ``router_aux_loss_coef * aux + router_z_loss_coef * z`` to the policy-side terms and are logged."""
    exp, hp = experience, hparams
    key = jax.random.PRNGKey(0) if key is None else key  # for stochastic policy losses
    with_entropy = uses_entropy(config)
    assert logprobs_BxN is not None  # with_logprobs (the default): the policy's forward
    mask_BxN = exp.action_mask  # losses count the policy's own tokens (observations are context)
    pg_mask_BxN = mask_BxN if exp.policy_mask is None else exp.policy_mask
    pg_weight, pg_token_weight = (policy_weight, value_weight) if pg_weights is None else pg_weights
    _, loss_fn, kl_fn = plugins.plugins_of(config)
    numbers = plugins.numbers_view(hp)
    pg_loss, pg_stats = plugins.call_policy_loss(
        loss_fn,
        plugins.PolicyLossInputs(
            logprobs=logprobs_BxN,
            old_logprobs=exp.old_logprobs,
            advantages=exp.advantages,
            mask=pg_mask_BxN,
            numbers=numbers,
            key=key,
            config=config,
            token_weights=exp.loss_weights,
        ),
    )
    sg = jax.lax.stop_gradient
    # Every policy loss logs the token ratio's mean and k3 drift; a plug-in may give its own.
    pg_stats = {**ratio_diagnostics(logprobs_BxN, exp.old_logprobs, pg_mask_BxN), **pg_stats}
    other_terms = []  # the policy-side terms over the response mask
    extra_stats = {}
    if with_entropy:
        ent_loss, ent_stats = entropy_loss(entropy_BxN, mask_BxN, config.loss_agg)
        other_terms.append(hp.entropy_coef * ent_loss)
        extra_stats["policy_entropy"] = policy_weight * ent_stats["entropy"]
    if config.kl_placement == "loss":
        kl_BxN = plugins.call_kl_estimator(kl_fn, plugins.KLInputs(logprobs_BxN, exp.ref_logprobs, numbers))
        kl_term = aggregate_loss(kl_BxN, mask_BxN, config.loss_agg)
        other_terms.append(kl_coef * kl_term)
        extra_stats["policy_kl"] = policy_weight * sg(kl_term)
    token_weight = value_weight  # vf terms and token-mean diagnostics share the token weight
    if router_losses is not None:  # the load-balancing and z losses of the MoE routers
        other_terms.append(
            hp.router_aux_loss_coef * router_losses["router_aux_loss"]
            + hp.router_z_loss_coef * router_losses["router_z_loss"]
        )
        extra_stats.update({name: token_weight * sg(value) for name, value in router_losses.items()})
    if exp.policy_mask is None:  # one normaliser for every policy-side term
        policy_loss = pg_loss
        for term in other_terms:
            policy_loss = policy_loss + term
        loss = policy_weight * policy_loss
    else:
        loss = pg_weight * pg_loss
        for term in other_terms:
            loss = loss + policy_weight * term
    stats = {
        "pg_loss": pg_weight * sg(pg_loss),
        **{name: pg_token_weight * value for name, value in pg_stats.items()},
        **extra_stats,
    }
    if models.has_value:
        value_clip = None if config.value_clip_eps is None else hp.value_clip_eps
        vf_loss, vf_stats = ppo_value_loss(values_BxN, exp.old_values, exp.returns, mask_BxN, value_clip)
        loss = loss + value_weight * hp.vf_coef * vf_loss
        stats["vf_loss"] = token_weight * vf_stats["vf_loss"]
        stats["vf_clipfrac"] = token_weight * vf_stats["vf_clipfrac"]
    stats["loss"] = sg(loss)
    return loss, stats


def _pg_totals(policy_mask, agg: str):
    """A minibatch's normalisers of the policy-loss term (``(policy-side, token-mean)``) when it has
    its own mask (a rejecting rollout correction), else None."""
    if policy_mask is None:
        return None
    return jnp.maximum(_normaliser(policy_mask, agg), 1.0), jnp.maximum(_normaliser(policy_mask, "token-mean"), 1.0)


def _pg_shares(micro_policy_mask, pg_totals, agg: str):
    """A micro-batch's shares of `_pg_totals`: the policy-loss term's ``pg_weights``."""
    policy_total, token_total = pg_totals
    policy_w = _normaliser(micro_policy_mask, agg) / policy_total
    return policy_w, _normaliser(micro_policy_mask, "token-mean") / token_total


def _no_constraint(x, batch_dim: int = 0):
    del batch_dim
    return x


def _packed_minibatch_gradients(config, models, params, minibatch: Experience, kl_coef, hparams, key, policy_base):
    """The minibatch's gradient as a sum over packed micro-batches of its real tokens
    (`jaxrlhf.training.packed`), each weighted by its share of the normalisers."""
    assert config.max_tokens_per_microbatch is not None
    mask = minibatch.action_mask
    packed_batch = packed.pack_batch(
        minibatch.prompt_ids,
        minibatch.prompt_mask,
        minibatch.response_ids,
        minibatch.response_mask,
        config.max_tokens_per_microbatch,
    )
    token_total = jnp.maximum(_normaliser(mask, "token-mean"), 1.0)
    policy_total = jnp.maximum(_normaliser(mask, config.loss_agg), 1.0)
    pg_totals = _pg_totals(minibatch.policy_mask, config.loss_agg)
    with_entropy = uses_entropy(config)

    def micro_loss(params, index):
        policy_params = params["policy"] if policy_base is None else LoraParams(policy_base, params["policy"])
        logprobs, values, entropy, router = packed.micro_forward(
            models, policy_params, params["value"], packed_batch, index, hparams.temperature, with_entropy=with_entropy,
            with_router_losses=models.policy.config.is_moe,
        )  # fmt: skip
        in_micro = packed_batch.rows_in_micro(index)[:, None]
        micro_mask = mask * in_micro.astype(mask.dtype)
        token_w = _normaliser(micro_mask, "token-mean") / token_total
        policy_w = _normaliser(micro_mask, config.loss_agg) / policy_total
        micro = minibatch._replace(action_mask=micro_mask)
        pg_weights = None
        if minibatch.policy_mask is not None:
            micro = micro._replace(policy_mask=minibatch.policy_mask * in_micro.astype(minibatch.policy_mask.dtype))
            pg_weights = _pg_shares(micro.policy_mask, pg_totals, config.loss_agg)
        micro_key = jax.random.fold_in(key, index)
        return loss_from_outputs(
            logprobs,
            values,
            entropy,
            micro,
            kl_coef,
            hparams,
            config,
            models,
            policy_w,
            token_w,
            micro_key,
            router_losses=router,
            pg_weights=pg_weights,
        )

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def step(carry, index):
        grads, stats = grad_fn(params, index)
        return jax.tree.map(jnp.add, carry, (grads, stats))

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(lambda: grad_fn(params, jnp.int32(0))))
    return packed.accumulate_over_micro(packed_batch, step, zeros)


def minibatch_gradients(
    config: PPOConfig,
    models: Models,
    params,
    minibatch: Experience,
    kl_coef,
    hparams: HyperParams,
    key,
    policy_base=None,
    constrain: Callable | None = None,
):
    """``(grads, stats)`` of one minibatch's loss (`minibatch_loss`), as the update takes them:
    in one pass, in ``grad_accum_steps`` micro-batches whose weighted gradients sum to it, or in
    packed micro-batches of real tokens (``max_tokens_per_microbatch``, `jaxrlhf.training.packed`).
    ``key`` seeds stochastic policy losses; ``constrain`` as in `make_ppo_update`."""
    constrain = _no_constraint if constrain is None else constrain
    if config.max_tokens_per_microbatch is not None:
        return _packed_minibatch_gradients(config, models, params, minibatch, kl_coef, hparams, key, policy_base)
    grad_fn = jax.grad(minibatch_loss, has_aux=True)
    accum = config.grad_accum_steps
    if accum == 1:
        one = jnp.ones((), jnp.float32)
        return grad_fn(params, minibatch, kl_coef, hparams, config, models, one, one, policy_base, key)
    # [mb, ...] -> [accum, micro, ...]; micro-batch i weighted by its share of the normaliser.
    micro_size = minibatch.response_ids.shape[0] // accum
    micro = jax.tree.map(lambda x: constrain(x.reshape(accum, micro_size, *x.shape[1:]), 1), minibatch)
    token_total = jnp.maximum(_normaliser(minibatch.action_mask, "token-mean"), 1.0)
    policy_total = jnp.maximum(_normaliser(minibatch.action_mask, config.loss_agg), 1.0)
    pg_totals = _pg_totals(minibatch.policy_mask, config.loss_agg)

    def accumulate(grads_sum, micro_and_key):
        micro_batch, micro_key = micro_and_key
        token_w = _normaliser(micro_batch.action_mask, "token-mean") / token_total
        policy_w = _normaliser(micro_batch.action_mask, config.loss_agg) / policy_total
        pg_weights = None if pg_totals is None else _pg_shares(micro_batch.policy_mask, pg_totals, config.loss_agg)
        grads, stats = grad_fn(
            params, micro_batch, kl_coef, hparams, config, models, policy_w, token_w, policy_base, micro_key,
            pg_weights=pg_weights,
        )  # fmt: skip
        return jax.tree.map(jnp.add, grads_sum, grads), stats

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, stats = lax.scan(accumulate, zeros, (micro, jax.random.split(key, accum)))
    return grads, jax.tree.map(lambda s: jnp.sum(s, axis=0), stats)


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
    num_mb, mb_size = config.num_minibatches, config.minibatch_size

    def minibatch_grads(params, minibatch: Experience, kl_coef, hparams, policy_base, key):
        return minibatch_gradients(config, models, params, minibatch, kl_coef, hparams, key, policy_base, constrain)

    def minibatch_step(carry, minibatch_and_key, kl_coef, hparams, policy_base):
        params, opt_states = carry
        minibatch, key = minibatch_and_key
        grads, stats = minibatch_grads(params, minibatch, kl_coef, hparams, policy_base, key)
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
            # Keys for stochastic losses (e.g. Clip-Cov), one per minibatch; unused ones cost nothing.
            loss_keys = jax.random.split(jax.random.fold_in(epoch_key, 1), num_mb)
            return lax.scan(
                lambda c, mb: minibatch_step(c, mb, kl_coef, hparams, policy_base), carry, (shuffled, loss_keys)
            )

        (params, opt_states), stats = lax.scan(epoch, (params, opt_states), jax.random.split(key, config.ppo_epochs))
        # stats: [epochs, minibatches] each; report the mean over all updates of this step.
        return params, opt_states, {k: jnp.mean(v) for k, v in stats.items()}

    return ppo_update
