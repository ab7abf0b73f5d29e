"""Rollout and experience: from prompts to per-token advantages, as pure functions.

    rollout          prompts --generate--> response tokens, mask
    (score)          prompts, responses --reward--> raw scores [B]
    make_experience  one forward each of policy, reference and critic over prompt + response:
                       logprobs, ref_logprobs, values  [B, N]
                     scores -> (EOS penalty, clip, normalise) -> step rewards
                       r = -beta * KL * mask,  r[last] += score        (kl_placement="reward")
                     GAE: A, returns = gae(r, V, mask, gamma, gae_lambda);  A <- whiten(A)
                     or a critic-free estimator (no critic forward, see below)

The advantage estimator, the KL estimator (and, in the update, the policy loss) are plug-ins
(`jaxrlhf.training.plugins`): `make_experience` computes the log-probs, values, processed scores
and the per-token KL, and hands them to the configured estimator, which returns the advantages
(and, with a critic, the returns). The built-ins are in `jaxrlhf.training.estimators`:

    gae                    GAE on r = -beta * KL * mask, r[last] += s (a critic); A whitened
    grpo / drgrpo / rloo   A_i from the group's scores, broadcast over response i's tokens
    remax                  A_i = s_i - s(greedy response to the same prompt)
    reinforce++            whitened discounted returns of r (per token)
    reinforce++-baseline   the same with s_i - mean_g s in place of s_i
    opo / gpg / grpo-passk other group baselines (see the module)

With ``kl_placement="reward"`` an outcome estimator scores ``s_i - beta * sum_t KL_it`` (the
sequence-level form of the per-token penalty, as RLOO and ReMax do); REINFORCE++ keeps the
per-token penalty in r. With ``"loss"`` the scores are left alone.

Token t of a response of a batch with prompt width P sits at position P + t of the concatenated
sequence; it is predicted by the logits at P + t - 1, and the state it is chosen in, s_t, is the
prefix ending at P + t - 1, so ``V(s_t)`` is the value head at P + t - 1 too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxrlhf.core import groups
from jaxrlhf.core.logprobs import entropy_from_logits, token_logprobs
from jaxrlhf.core.offpolicy import apply_rollout_correction, mismatch_metrics, rollout_correction
from jaxrlhf.core.rewards import step_rewards
from jaxrlhf.core.sequences import concat_prompt_response
from jaxrlhf.core.stats import masked_mean, masked_sum, masked_var
from jaxrlhf.models.lm import LanguageModel
from jaxrlhf.models.moe import router_loss_terms
from jaxrlhf.models.value import value_head_apply
from jaxrlhf.sampling import generate
from jaxrlhf.training import packed, plugins
from jaxrlhf.training.config import PPOConfig
from jaxrlhf.training.hparams import HyperParams
from jaxrlhf.training.rewards import has_eos, postprocess_scores
from jaxrlhf.training.state import ScoreStats


class PromptBatch(NamedTuple):
    """Left-padded prompts: ``ids [B, P]`` int32 and ``mask [B, P]`` (1 = real token)."""

    ids: jax.Array
    mask: jax.Array


class Rollout(NamedTuple):
    """Sampled responses (or episodes): ``tokens``, ``mask`` ``[B, N]`` (mask 1 up to and including
    EOS; for an episode, every token the model attends to) and the sampler's ``logprobs [B, N]``:
    ``log softmax(logits / T)`` of each sampled token under the unfiltered tempered distribution
    (before top-k/top-p), 0 where the mask is 0 -- what `token_logprobs` computes from a forward,
    up to the cached decode's rounding. None when a rollout was made without them (a greedy one,
    or built by hand).

    Multi-turn episodes (DESIGN.md, "Episodes") add ``action_mask [B, N]`` (1 on the tokens the
    policy sampled; None: the same as ``mask``, a single turn), ``token_rewards [B, N]`` (the
    environment's per-turn rewards, each on the last action token of its turn; None: none) and
    ``episode_stats`` (``{name: [B]}`` per-episode numbers to log as ``episode/<name>`` means)."""

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array | None = None
    action_mask: jax.Array | None = None
    token_rewards: jax.Array | None = None
    episode_stats: dict[str, jax.Array] | None = None

    @property
    def actions(self) -> jax.Array:
        """The action mask: ``action_mask``, or ``mask`` for a single-turn rollout."""
        return self.mask if self.action_mask is None else self.action_mask


class Experience(NamedTuple):
    """What the PPO update trains on; every array is ``[B, ...]`` so minibatches slice axis 0."""

    prompt_ids: jax.Array  # [B, P]
    prompt_mask: jax.Array  # [B, P]
    response_ids: jax.Array  # [B, N]
    response_mask: jax.Array  # [B, N] every token the model attends to (what forwards see)
    action_mask: jax.Array  # [B, N] the tokens the policy sampled (what losses count); = response_mask for one turn
    old_logprobs: jax.Array  # [B, N] policy log-probs at rollout time (temperature-scaled)
    ref_logprobs: jax.Array  # [B, N] reference log-probs (temperature-scaled)
    old_values: jax.Array | None  # [B, N] V(s_t) at rollout time; None without a critic
    advantages: jax.Array  # [B, N] (whitened if configured)
    returns: jax.Array | None  # [B, N] value targets A + V; None without a critic
    rewards: jax.Array  # [B, N] step rewards (for analysis; the update does not read them)
    scores: jax.Array  # [B] scores after EOS penalty, clipping and normalisation
    # Off-policy (docs/offpolicy.md): the sampler's log-probs of the tokens (the behaviour policy;
    # None when the rollout has none), and the rollout correction's per-token weights of the policy
    # loss and its reduced mask (None: weight 1, the response mask), computed once per batch.
    behaviour_logprobs: jax.Array | None = None  # [B, N]
    loss_weights: jax.Array | None = None  # [B, N] float32, constants
    policy_mask: jax.Array | None = None  # [B, N] action_mask without the rejected tokens


@dataclasses.dataclass(frozen=True)
class Models:
    """The static (hashable) part of the trainer: model definitions, no parameters.

    ``critic`` is a `ValueModel` (separate critic) or None for the value head on the policy trunk;
    ``has_value=False``: no value model at all (critic-free estimators), values are None.
    """

    policy: LanguageModel
    critic: Any = None
    has_value: bool = True


def resolve_eos(config: PPOConfig, policy: LanguageModel):
    """The EOS id(s) to stop at: the config's, else the model's; None when there is none."""
    if config.eos_token_id is not None:
        return None if config.eos_token_id < 0 else config.eos_token_id
    return policy.config.eos_token_id


def rollout(
    config: PPOConfig,
    policy: LanguageModel,
    policy_params,
    prompts: PromptBatch,
    key,
    hparams: HyperParams,
    stop_axis_name: str | None = None,
    num_generations: int = 1,
    mesh=None,
) -> Rollout:
    """Sample ``num_generations`` responses per prompt with the current policy (`generate`).

    Temperature and top-p come from ``hparams`` (data); whether top-p filters at all, top-k, the
    lengths and ``rollout_slots`` (the rollout engine) from ``config`` (structure).
    ``stop_axis_name``: the vmapped run axis of a sweep, whose runs then stop decoding together
    (`generate`'s argument; same samples). With ``num_generations = G`` the G responses to prompt
    p are rows ``p * G .. p * G + G - 1`` and the prompt is prefilled once for them; ``mesh``:
    where the rows live (`generate`'s argument).
    """
    sample = generate(
        policy,
        policy_params,
        prompts.ids,
        prompts.mask,
        key,
        max_new_tokens=config.max_new_tokens,
        temperature=hparams.temperature,
        top_k=config.top_k,
        top_p=hparams.top_p if config.top_p < 1.0 else 1.0,
        eos_token_id=resolve_eos(config, policy),
        pad_token_id=config.pad_token_id,
        stop_axis_name=stop_axis_name,
        num_generations=num_generations,
        slots=config.rollout_slots,
        mesh=mesh,
    )
    return Rollout(sample.tokens, sample.mask.astype(jnp.int32), sample.logprobs)


def greedy_rollout(
    config: PPOConfig, policy: LanguageModel, policy_params, prompts: PromptBatch, stop_axis_name: str | None = None
) -> Rollout:
    """One greedy (argmax, temperature 0) response per prompt: ReMax's baseline (Li et al. 2023)."""
    sample = generate(
        policy,
        policy_params,
        prompts.ids,
        prompts.mask,
        jax.random.PRNGKey(0),  # no randomness used
        max_new_tokens=config.max_new_tokens,
        temperature=0.0,
        eos_token_id=resolve_eos(config, policy),
        pad_token_id=config.pad_token_id,
        stop_axis_name=stop_axis_name,
    )
    return Rollout(sample.tokens, sample.mask.astype(jnp.int32))


def response_window(prompt_len: int, num_new: int) -> slice:
    """Positions ``P - 1 .. P + N - 2`` of the concatenated sequence: the ones that predict (and
    value) response tokens. A static slice: prompts are left-padded to P, responses have N slots."""
    return slice(prompt_len - 1, prompt_len - 1 + num_new)


def response_slice(x_BxLx, prompt_len: int, num_new: int):
    """``x[:, P - 1 : P + N - 1]``: the `response_window` positions of a ``[B, P + N, ...]`` array."""
    return x_BxLx[:, response_window(prompt_len, num_new)]


def policy_and_values(
    models: Models,
    policy_params,
    value_params,
    prompt_ids,
    prompt_mask,
    response_ids,
    response_mask,
    temperature,
    with_entropy: bool = False,
    with_logprobs: bool = True,
    with_router_losses: bool = False,
) -> tuple:
    """Response log-probs, values and (optionally) entropies under the given parameters.

    Returns ``(logprobs [B, N] or None, values [B, N] or None, entropy [B, N] or None)``. The
    trunks run over the whole ``[B, P + N]`` sequence, but the vocabulary head (and the value
    head) only at the N positions of `response_window`: ``logits [B, N, V]``, never
    ``[B, P + N, V]``. With a shared trunk the value head reads the policy forward's hidden states
    (one forward); otherwise the critic runs its own forward; without a value model
    (``models.has_value=False``) values are None. ``with_logprobs=False`` (old log-probs taken from
    the sampler) skips the policy's vocabulary head, and with a separate critic or none the policy
    forward altogether; logprobs and entropy are then None.

    ``with_router_losses`` (a mixture-of-experts policy): a fourth output, the policy forward's
    router losses (``{"router_aux_loss", "router_z_loss"}`` over the real tokens, `ModelOutput.aux`).
    """
    prompt_len, num_new = prompt_ids.shape[1], response_ids.shape[1]
    window = response_window(prompt_len, num_new)
    ids, mask = concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)
    logprobs = entropy = out = None
    if with_logprobs:
        out = models.policy.forward(policy_params, ids, mask, logits_positions=window)
        logprobs = token_logprobs(out.logits, response_ids.astype(jnp.int32), temperature)
        if with_entropy:
            entropy = entropy_from_logits(out.logits, temperature)
    if not models.has_value:
        values = None
    elif models.critic is None:  # shared trunk: the policy's hidden states, with or without its head
        hidden = out.hidden if out is not None else models.policy.hidden_states(policy_params, ids, mask)
        values = value_head_apply(value_params, hidden[:, window]).astype(jnp.float32)
    else:
        values = models.critic.apply(value_params, ids, mask, value_positions=window).astype(jnp.float32)
    if with_router_losses:
        assert out is not None and out.aux is not None, "router losses come from a MoE policy's forward"
        return logprobs, values, entropy, router_loss_terms(out.aux)
    return logprobs, values, entropy


def reference_logprobs(models: Models, ref_params, prompt_ids, prompt_mask, response_ids, response_mask, temperature):
    """Response log-probs under the frozen reference policy (temperature-scaled like the policy's);
    the vocabulary head runs at the `response_window` positions only."""
    prompt_len, num_new = prompt_ids.shape[1], response_ids.shape[1]
    ids, mask = concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)
    logits_BxNxV = models.policy.forward(
        ref_params, ids, mask, logits_positions=response_window(prompt_len, num_new)
    ).logits
    return token_logprobs(logits_BxNxV, response_ids.astype(jnp.int32), temperature)


def explained_variance(values, returns, mask):
    """``1 - Var(returns - values) / Var(returns)`` over valid tokens (1 is perfect, <= 0 useless)."""
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / jnp.maximum(var_returns, 1e-8)


def overlong_penalty(config: PPOConfig, mask_BxN, hparams: HyperParams):
    """DAPO's overlong penalty of each response, ``L_max = max_new_tokens``, ``L_c`` from hparams."""
    lengths_B = jnp.sum(mask_BxN, axis=1).astype(jnp.float32)
    return groups.overlong_reward_shaping(lengths_B, config.max_new_tokens, hparams.overlong_buffer)


def episode_outcomes(scores_B, rollout_out: Rollout) -> jax.Array:
    """``[B]`` each response's score plus, for an episode, the sum of its turn rewards (over the
    action tokens): what a group statistic compares (all equal within a group: no signal)."""
    if rollout_out.token_rewards is None:
        return scores_B
    return scores_B + masked_sum(rollout_out.token_rewards, rollout_out.actions, axis=1)


def make_experience(
    config: PPOConfig,
    models: Models,
    policy_params,
    value_params,
    ref_params,
    prompts: PromptBatch,
    rollout_out: Rollout,
    raw_scores_B,
    kl_coef,
    score_stats: ScoreStats,
    hparams: HyperParams,
    greedy: tuple[Rollout, Any] | None = None,
):
    """Forward passes, step rewards and advantages for one batch of rollouts.

    ``logprobs`` (the PPO ratio's ``old_logprobs``) are recomputed with a forward over prompt +
    response, so the ratio starts at exactly 1 on the first minibatch. With
    ``config.old_logprobs_from_sampler`` they are the rollout's own (``rollout_out.logprobs``, the
    same tempered, unfiltered ``log softmax(logits / T)[token]``) and the policy forward is
    skipped (with a shared trunk only its vocabulary head): the first ratio is then
    ``exp(forward - sampler)``, 1 up to the decode's rounding, and the ``entropy`` statistic is
    the sample estimate ``-mean_t log pi(a_t | s_t)`` over valid tokens (unbiased without top-k or
    top-p) instead of the exact per-token entropy. Step rewards (DESIGN.md):
    ``r = -kl_coef * KL * mask; r[last valid] += score`` with ``kl_placement="reward"``; with
    ``"loss"`` the KL moves into the policy loss and ``r`` is the score alone. Then
    ``A, R = gae(r, V, mask, gamma, gae_lambda)`` and ``A <- whiten(A)`` if ``whiten_advantages``; or,
    for a critic-free ``advantage_estimator``, the estimator of the module docstring (no critic
    forward, ``old_values`` and ``returns`` None). With ``overlong_buffer`` DAPO's overlong penalty
    is added to the raw scores first. The numbers (temperature, gamma, lambda, score clipping,
    the overlong buffer) come from ``hparams``.

    ``prompts`` has one row per response (already repeated ``num_generations`` times);
    ``greedy = (rollout [B // G, N], raw scores [B // G])`` of the greedy responses (one per
    prompt) is needed by "remax": their scores go through the same overlong shaping, missing-EOS
    penalty and clipping (``score_norm`` must be None) and are the baseline.

    Returns:
      ``(experience, new_score_stats, stats)`` with scalar diagnostics in ``stats``.
    """
    response_ids_BxN, response_mask_BxN = rollout_out.tokens, rollout_out.mask
    G = config.num_generations
    sg = jax.lax.stop_gradient
    from_sampler = config.old_logprobs_from_sampler
    if from_sampler and rollout_out.logprobs is None:
        raise ValueError(
            "config.old_logprobs_from_sampler takes old_logprobs from the rollout: pass a Rollout "
            "with the sampler's logprobs (what `rollout` returns)"
        )
    if config.max_tokens_per_microbatch is None:
        logprobs_BxN, values_BxN, entropy_BxN = policy_and_values(
            models,
            policy_params,
            value_params,
            prompts.ids,
            prompts.mask,
            response_ids_BxN,
            response_mask_BxN,
            hparams.temperature,
            with_entropy=not from_sampler,
            with_logprobs=not from_sampler,
        )
        ref_logprobs_BxN = reference_logprobs(
            models, ref_params, prompts.ids, prompts.mask, response_ids_BxN, response_mask_BxN, hparams.temperature
        )
    else:  # the same forwards over the real tokens only (`jaxrlhf.training.packed`)
        packed_batch = packed.pack_batch(
            prompts.ids, prompts.mask, response_ids_BxN, response_mask_BxN, config.max_tokens_per_microbatch
        )
        logprobs_BxN, values_BxN, entropy_BxN = packed.packed_policy_and_values(
            models,
            policy_params,
            value_params,
            packed_batch,
            hparams.temperature,
            with_entropy=not from_sampler,
            with_logprobs=not from_sampler,
        )
        ref_logprobs_BxN = packed.packed_reference_logprobs(models, ref_params, packed_batch, hparams.temperature)
    action_mask_BxN = rollout_out.actions  # what every estimate, loss and statistic counts
    if from_sampler:
        assert rollout_out.logprobs is not None  # checked on entry
        logprobs_BxN = jnp.where(action_mask_BxN > 0, rollout_out.logprobs.astype(jnp.float32), 0.0)
        entropy_BxN = -logprobs_BxN  # per-token sample estimate; only its masked mean is reported
    assert logprobs_BxN is not None  # the policy forward's (with_logprobs) or the sampler's
    logprobs_BxN, ref_logprobs_BxN = sg(logprobs_BxN), sg(ref_logprobs_BxN)
    values_BxN = None if values_BxN is None else sg(values_BxN)
    response_length_B = jnp.sum(response_mask_BxN, axis=1).astype(jnp.float32)
    behaviour_BxN = None
    if rollout_out.logprobs is not None:
        behaviour_BxN = sg(jnp.where(action_mask_BxN > 0, rollout_out.logprobs.astype(jnp.float32), 0.0))
    loss_weights_BxN, policy_mask_BxN, extra = correct_rollout(
        config, logprobs_BxN, behaviour_BxN, action_mask_BxN, hparams
    )

    shaped_scores_B = raw_scores_B
    if config.overlong_buffer is not None:
        penalty_B = overlong_penalty(config, response_mask_BxN, hparams)
        shaped_scores_B = raw_scores_B + penalty_B
        extra["overlong_penalty"] = jnp.mean(penalty_B)
    eos_found_B = has_eos(response_ids_BxN, action_mask_BxN, resolve_eos(config, models.policy))
    scores_B, new_score_stats = postprocess_scores(config, shaped_scores_B, eos_found_B, score_stats, hparams)

    reward_kl_coef = kl_coef if config.kl_placement == "reward" else jnp.zeros_like(kl_coef)
    estimator, _, kl_fn = plugins.plugins_of(config)
    numbers = plugins.numbers_view(hparams)
    kl_BxN = plugins.call_kl_estimator(kl_fn, plugins.KLInputs(logprobs_BxN, ref_logprobs_BxN, numbers))
    kl_per_sequence_B = masked_sum(kl_BxN, action_mask_BxN, axis=1)
    greedy_scores_P = None
    if estimator.needs_greedy:
        if greedy is None:
            raise ValueError(
                f"advantage_estimator={config.advantage_estimator!r} needs the greedy responses and their scores "
                "(greedy=)"
            )
        # The greedy responses' scores go through the same shaping, EOS penalty and clipping.
        greedy_rollout_out, greedy_raw_P = greedy
        greedy_shaped_P = greedy_raw_P
        if config.overlong_buffer is not None:
            greedy_shaped_P = greedy_raw_P + overlong_penalty(config, greedy_rollout_out.mask, hparams)
        greedy_eos_P = has_eos(greedy_rollout_out.tokens, greedy_rollout_out.mask, resolve_eos(config, models.policy))
        greedy_scores_P, _ = postprocess_scores(config, greedy_shaped_P, greedy_eos_P, score_stats, hparams)
        if greedy_rollout_out.token_rewards is not None:  # a greedy episode: its return, as the samples'
            greedy_scores_P = greedy_scores_P + masked_sum(
                greedy_rollout_out.token_rewards, greedy_rollout_out.actions, axis=1
            )
    estimated = plugins.call_advantage_estimator(
        estimator,
        plugins.AdvantageInputs(
            scores=scores_B,
            logprobs=logprobs_BxN,
            ref_logprobs=ref_logprobs_BxN,
            values=values_BxN,
            mask=action_mask_BxN,
            kl=kl_BxN,
            reward_kl_coef=reward_kl_coef,
            numbers=numbers,
            group_size=G,
            greedy_scores=greedy_scores_P,
            config=config,
            token_rewards=rollout_out.token_rewards,
        ),
    )
    advantages_BxN, returns_BxN = estimated.advantages, estimated.returns if values_BxN is not None else None
    rewards_BxN = estimated.rewards
    if rewards_BxN is None:
        rewards_BxN = step_rewards(scores_B, kl_BxN, action_mask_BxN, reward_kl_coef)
    extra.update(estimated.stats or {})
    if G > 1:  # of the episodes' outcomes: the score plus the environment's turn rewards
        extra["group_signal_fraction"] = groups.group_signal_fraction(episode_outcomes(scores_B, rollout_out), G)
    if greedy is not None:
        extra["greedy_score"] = jnp.mean(greedy[1])

    stats = {
        "score": jnp.mean(raw_scores_B),
        "score_std": jnp.std(raw_scores_B),
        "score_used": jnp.mean(scores_B),
        "kl": jnp.mean(kl_per_sequence_B),  # per sequence (what the adaptive controller tracks)
        "kl_per_token": masked_mean(kl_BxN, action_mask_BxN),
        "kl_coef": kl_coef,
        "non_score_reward": -kl_coef * jnp.mean(kl_per_sequence_B),
        "entropy": masked_mean(entropy_BxN, action_mask_BxN),
        "response_length": jnp.mean(response_length_B),
        "eos_fraction": jnp.mean(eos_found_B.astype(jnp.float32)),
        "advantages_mean": masked_mean(advantages_BxN, action_mask_BxN),
        "num_response_tokens": jnp.sum(action_mask_BxN).astype(jnp.float32),
        **extra,
    }
    if rollout_out.action_mask is not None:  # an episode: observation tokens and the environment's numbers
        stats["num_observation_tokens"] = jnp.sum(response_mask_BxN - action_mask_BxN).astype(jnp.float32)
        if rollout_out.token_rewards is not None:
            stats["turn_reward"] = jnp.mean(jnp.sum(rollout_out.token_rewards, axis=1))
        for name, value in (rollout_out.episode_stats or {}).items():
            stats[f"episode/{name}"] = jnp.mean(value.astype(jnp.float32))
    if values_BxN is not None:
        stats["value_mean"] = masked_mean(values_BxN, action_mask_BxN)
        stats["returns_mean"] = masked_mean(returns_BxN, action_mask_BxN)
        stats["explained_variance"] = explained_variance(values_BxN, returns_BxN, action_mask_BxN)
    experience = Experience(
        prompt_ids=prompts.ids,
        prompt_mask=prompts.mask,
        response_ids=response_ids_BxN,
        response_mask=response_mask_BxN,
        action_mask=action_mask_BxN,
        old_logprobs=logprobs_BxN,
        ref_logprobs=ref_logprobs_BxN,
        old_values=values_BxN,
        advantages=sg(advantages_BxN),
        returns=None if returns_BxN is None else sg(returns_BxN),
        rewards=rewards_BxN,
        scores=scores_B,
        behaviour_logprobs=behaviour_BxN,
        loss_weights=loss_weights_BxN,
        policy_mask=policy_mask_BxN,
    )
    return experience, new_score_stats, stats


def correct_rollout(config: PPOConfig, old_logprobs_BxN, behaviour_BxN, mask_BxN, hparams: HyperParams):
    """The rollout correction of ``config`` for one batch: ``(loss weights [B, N] or None, policy
    mask [B, N] or None, stats)``.

    With ``config.rollout_correction`` set, `jaxrlhf.core.apply_rollout_correction` of the old
    (proximal, recomputed) and behaviour (sampler's) log-probs with the state's numbers
    (``rollout_is_cap``, ``rollout_mask_low`` / ``_high``, ``rollout_reject_threshold``): its
    weights ``w`` (``min(w, C)``, 0 outside the band or for rejected tokens), its mask when the
    correction rejects (None otherwise: the action mask), and its statistics (the mismatch
    metrics, ``is_*``, ``reject_*``). Without one: no weights, no mask, and the mismatch metrics
    (`jaxrlhf.core.mismatch_metrics`) whenever the sampler's log-probs exist and the old ones are
    recomputed: every step of a default run measures how far sampler and trainer are apart.
    """
    if config.rollout_correction is None:
        measured = behaviour_BxN is not None and not config.old_logprobs_from_sampler
        stats = mismatch_metrics(old_logprobs_BxN, behaviour_BxN, mask_BxN) if measured else {}
        return None, None, stats
    if behaviour_BxN is None:
        raise ValueError(
            f"config.rollout_correction={config.rollout_correction!r} weighs tokens by the sampler's log-probs: "
            "pass a Rollout with the sampler's logprobs (what `rollout` returns)"
        )
    correction = rollout_correction(config.rollout_correction)
    weights_BxN, corrected_mask_BxN, stats = apply_rollout_correction(
        old_logprobs_BxN,
        behaviour_BxN,
        mask_BxN,
        correction,
        is_cap=hparams.rollout_is_cap,
        mask_low=hparams.rollout_mask_low,
        mask_high=hparams.rollout_mask_high,
        reject_threshold=hparams.rollout_reject_threshold,
    )
    return weights_BxN, corrected_mask_BxN if correction.reject is not None else None, stats
