"""The built-in policy losses, registered as plug-ins (`jaxrlhf.training.plugins`).

Each calls its `jaxrlhf.core` function (formula and paper there) with the run's numbers:

    name         core function                      numbers (besides clip_eps / clip_eps_high)
    ppo          losses.ppo_policy_loss (dual clip)  dual_clip (with config.dual_clip set)
    gspo         losses.gspo_policy_loss, "seq"
    gspo-token   losses.gspo_policy_loss, "token"
    cispo        surrogates.cispo_policy_loss
    clip-cov     surrogates.clip_cov_policy_loss     clip_cov_ratio, clip_cov_lb, clip_cov_ub
    kl-cov       surrogates.kl_cov_policy_loss       kl_cov_ratio, kl_cov_coef (no clip)
    gmpo         surrogates.gmpo_policy_loss         (clip in log space; the paper's 0.4)
    sapo         surrogates.sapo_policy_loss         sapo_tau_pos, sapo_tau_neg (no clip)

Their stats are the per-token means the trainer logs (``clipfrac``, ``approx_kl``, ``ratio_mean``
and the loss's own); the trainer adds ``pg_loss``.
"""

from __future__ import annotations

from jaxrlhf.core import surrogates
from jaxrlhf.core.losses import gspo_policy_loss, ppo_policy_loss
from jaxrlhf.training.plugins import PolicyLossInputs, policy_loss

# The diagnostics PPO's loss always logged (its other stats, ratio_min / ratio_max, are extrema,
# which do not combine over micro-batches by token share).
_LOGGED = ("clipfrac", "approx_kl", "ratio_mean", "dual_clipfrac")


def _core_args(x: PolicyLossInputs):
    """The four arrays every `jaxrlhf.core` policy loss takes first."""
    return x.logprobs, x.old_logprobs, x.advantages, x.mask


def _logged(stats):
    return {k: v for k, v in stats.items() if k in _LOGGED}


@policy_loss("ppo", supports_dual_clip=True)
def ppo(x: PolicyLossInputs):
    """PPO's clipped surrogate (Schulman et al. 2017), with dual clip (Ye et al. 2020) when
    ``config.dual_clip`` is set."""
    n = x.numbers
    dual_clip = None if x.config.dual_clip is None else n["dual_clip"]
    loss, stats = ppo_policy_loss(
        *_core_args(x),
        n["clip_eps"],
        n["clip_eps_high"],
        x.config.loss_agg,
        axis_name=x.axis_name,
        dual_clip=dual_clip,
        weights=x.token_weights,
    )
    return loss, _logged(stats)


def _gspo(x: PolicyLossInputs, variant: str):
    n = x.numbers
    loss, stats = gspo_policy_loss(
        *_core_args(x),
        n["clip_eps"],
        n["clip_eps_high"],
        variant,
        x.config.loss_agg,
        axis_name=x.axis_name,
        weights=x.token_weights,
    )
    return loss, {**_logged(stats), "ratio_mean": stats["seq_ratio_mean"]}


@policy_loss("gspo")
def gspo(x: PolicyLossInputs):
    """GSPO (Zheng et al. 2025): the sequence-level ratio, clipped."""
    return _gspo(x, "seq")


@policy_loss("gspo-token")
def gspo_token(x: PolicyLossInputs):
    """GSPO-token: the sequence ratio's value, each token's own gradient."""
    return _gspo(x, "token")


@policy_loss("cispo")
def cispo(x: PolicyLossInputs):
    """CISPO (MiniMax-M1, 2025): the clipped ratio as a constant weight of ``-A * logp``."""
    n = x.numbers
    return surrogates.cispo_policy_loss(
        *_core_args(x),
        n["clip_eps"],
        n["clip_eps_high"],
        x.config.loss_agg,
        x.axis_name,
        x.token_weights,
    )


@policy_loss("clip-cov", numbers={"clip_cov_ratio": 2e-4, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0})
def clip_cov(x: PolicyLossInputs):
    """Clip-Cov (Cui et al. 2025): PPO's loss with a random few high-covariance tokens cut."""
    n = x.numbers
    return surrogates.clip_cov_policy_loss(
        *_core_args(x),
        x.key,
        n["clip_eps"],
        n["clip_eps_high"],
        n["clip_cov_ratio"],
        n["clip_cov_lb"],
        n["clip_cov_ub"],
        x.config.loss_agg,
        x.axis_name,
        x.token_weights,
    )


@policy_loss("kl-cov", numbers={"kl_cov_ratio": 2e-4, "kl_cov_coef": 0.1})
def kl_cov(x: PolicyLossInputs):
    """KL-Cov (Cui et al. 2025): no clip; a KL penalty on the top-covariance tokens."""
    n = x.numbers
    return surrogates.kl_cov_policy_loss(
        *_core_args(x),
        n["kl_cov_ratio"],
        n["kl_cov_coef"],
        x.config.loss_agg,
        x.axis_name,
        x.token_weights,
    )


@policy_loss("gmpo")
def gmpo(x: PolicyLossInputs):
    """GMPO (Zhao et al. 2025): the geometric mean of log-space-clipped token ratios, per response
    (a sequence-level loss: ``loss_agg`` does not apply)."""
    n = x.numbers
    return surrogates.gmpo_policy_loss(
        *_core_args(x),
        n["clip_eps"],
        n["clip_eps_high"],
        x.axis_name,
        x.token_weights,
    )


@policy_loss("sapo", numbers={"sapo_tau_pos": 1.0, "sapo_tau_neg": 1.05})
def sapo(x: PolicyLossInputs):
    """SAPO (Gao et al. 2025): a smooth sigmoid gate instead of the clip."""
    n = x.numbers
    return surrogates.sapo_policy_loss(
        *_core_args(x),
        n["sapo_tau_pos"],
        n["sapo_tau_neg"],
        x.config.loss_agg,
        x.axis_name,
        x.token_weights,
    )
