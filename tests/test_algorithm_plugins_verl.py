"""The new built-in losses and estimators against verl's own functions on identical inputs
(verl 0.9.1, `verl/trainer/ppo/core_algos.py`): losses, the stats both report, and gradients with
respect to the policy's log-probs (torch autograd on verl's side, jax.grad on ours).

verl is installed without its dependencies (`.ci/run`); importing it needs ray, omegaconf,
tensordict, hydra-core and codetiming. Without it these tests skip, saying so.

Where the two differ by design it is said at the test: verl's GMPO averages over every row
(ours over rows with tokens: the inputs here have no empty row) and adds 1e-8 to its normalisers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.core import groups, surrogates

torch = pytest.importorskip("torch")
core_algos = pytest.importorskip(
    "verl.trainer.ppo.core_algos", reason="verl (the peer these tests compare with) is not installed; see .ci/run"
)
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig  # noqa: E402


def _actor_config(**fields):
    policy_loss = PolicyLossConfig(**fields.pop("policy_loss", {}))
    return ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=1, policy_loss=policy_loss, **fields)


def _inputs(seed, B=6, T=5, empty_row=False):
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.5, 0.5, (B, T))
    new = old + rng.normal(0, 0.3, (B, T))
    adv = rng.normal(0, 1, (B, T))
    mask = (rng.random((B, T)) < 0.8).astype(np.float64)
    mask[:, 0] = 1
    mask[1] = 0
    mask[1, [1, 2, 4]] = 1  # a non-prefix (action) mask
    if empty_row:
        mask[0] = 0
    return new, old, adv, mask


def _verl(fn, new, old, adv, mask, *args, **kwargs):
    log_prob = torch.tensor(new, dtype=torch.float64, requires_grad=True)
    loss, metrics = fn(torch.tensor(old), log_prob, torch.tensor(adv), torch.tensor(mask), *args, **kwargs)
    loss.backward()
    return float(loss.detach()), metrics, log_prob.grad.numpy()


def _ours(fn, new, old, adv, mask, *args, **kwargs):
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    loss_fn = lambda lp: fn(lp, f32(old), f32(adv), f32(mask), *args, **kwargs)  # noqa: E731
    (loss, stats), grad = jax.value_and_grad(loss_fn, has_aux=True)(f32(new))
    return float(loss), jax.device_get(stats), np.asarray(grad, np.float64)


def _compare(ours, verl, stat_pairs=()):
    loss, stats, grad = ours
    verl_loss, verl_metrics, verl_grad = verl
    assert loss == pytest.approx(verl_loss, rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(grad, verl_grad, rtol=1e-4, atol=1e-7)
    for ours_key, verl_key in stat_pairs:
        assert float(stats[ours_key]) == pytest.approx(float(verl_metrics[verl_key]), abs=1e-6), ours_key


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_cispo_equals_verl(agg):
    new, old, adv, mask = _inputs(0, empty_row=True)
    config = _actor_config(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28)
    verl = _verl(core_algos.compute_policy_loss_cispo, new, old, adv, mask, agg, config=config)
    ours = _ours(surrogates.cispo_policy_loss, new, old, adv, mask, 0.2, 0.28, agg)
    _compare(ours, verl, [("clipfrac", "actor/pg_clipfrac")])


def test_clip_cov_equals_verl_when_every_candidate_is_picked():
    """verl picks its tokens with torch.randperm; with a budget above the candidate count both
    pick every candidate, so the comparison is deterministic."""
    new, old, adv, mask = _inputs(1)
    lb, ub = 0.05, 5.0
    config = _actor_config(
        clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2,
        policy_loss=dict(clip_cov_ratio=1.0, clip_cov_lb=lb, clip_cov_ub=ub),
    )  # fmt: skip
    verl = _verl(core_algos.compute_policy_loss_clip_cov, new, old, adv, mask, "token-mean", config=config)
    ours = _ours(surrogates.clip_cov_policy_loss, new, old, adv, mask, jax.random.PRNGKey(0), 0.2, 0.2, 1.0, lb, ub)
    assert 0 < float(ours[1]["clipfrac"]) < 1
    _compare(ours, verl, [("clipfrac", "actor/pg_clipfrac")])


def test_kl_cov_equals_verl():
    new, old, adv, mask = _inputs(2, empty_row=True)
    config = _actor_config(policy_loss=dict(kl_cov_ratio=0.2, ppo_kl_coef=0.5))
    verl = _verl(core_algos.compute_policy_loss_kl_cov, new, old, adv, mask, "token-mean", config=config)
    ours = _ours(surrogates.kl_cov_policy_loss, new, old, adv, mask, 0.2, 0.5)
    _compare(ours, verl)


def test_gmpo_equals_verl():
    new, old, adv_tokens, mask = _inputs(3)  # no empty row: verl's mean counts every row
    adv = np.repeat(adv_tokens[:, :1], adv_tokens.shape[1], axis=1) * mask
    config = _actor_config(clip_ratio=0.4, clip_ratio_low=0.4, clip_ratio_high=0.3)
    verl = _verl(core_algos.compute_policy_loss_geo_mean, new, old, adv, mask, "token-mean", config=config)
    ours = _ours(surrogates.gmpo_policy_loss, new, old, adv, mask, 0.4, 0.3)
    _compare(ours, verl, [("clipfrac", "actor/pg_clipfrac"), ("clipfrac_lower", "actor/pg_clipfrac_lower")])


def test_sapo_equals_verl():
    new, old, adv, mask = _inputs(4, empty_row=True)
    config = _actor_config(tau_pos=1.0, tau_neg=1.05)
    verl = _verl(core_algos.compute_policy_loss_sapo, new, old, adv, mask, "seq-mean-token-mean", config=config)
    ours = _ours(surrogates.sapo_policy_loss, new, old, adv, mask, 1.0, 1.05, "seq-mean-token-mean")
    _compare(ours, verl)


def _verl_outcome(fn, scores, mask, group_size, **kwargs):
    """verl's outcome estimators read the score as the sum of the token-level rewards."""
    rewards = np.zeros_like(mask)
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)
    rewards[np.arange(len(scores)), last] = scores
    index = np.arange(len(scores)) // group_size
    advantages, _ = fn(torch.tensor(rewards), torch.tensor(mask), index, **kwargs)
    return advantages.numpy()


SCORES = np.array([1.0, 0.0, 0.5, 0.0, 0.3, 0.3, 0.3, 0.3, 0.0, 3.0, 1.0, 2.0])


def _mask(seed=5):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 7, size=SCORES.size)
    return (np.arange(6)[None, :] < lengths[:, None]).astype(np.float64)


def test_opo_equals_verl():
    mask, G = _mask(), 4
    verl = _verl_outcome(core_algos.compute_opo_outcome_advantage, SCORES, mask, G, config=None)
    ours = groups.opo_advantages(jnp.asarray(SCORES), jnp.asarray(mask.sum(-1)), G)
    np.testing.assert_allclose(np.asarray(groups.broadcast_over_tokens(ours, jnp.asarray(mask))), verl, atol=1e-6)


def test_gpg_equals_verl():
    mask, G = _mask(6), 4
    verl = _verl_outcome(core_algos.compute_gpg_outcome_advantage, SCORES, mask, G, f_norm=2.0)
    ours = groups.gpg_advantages(jnp.asarray(SCORES), G, 2.0)
    np.testing.assert_allclose(np.asarray(groups.broadcast_over_tokens(ours, jnp.asarray(mask))), verl, atol=1e-6)


def test_grpo_passk_equals_verl():
    mask, G = _mask(7), 4
    verl = _verl_outcome(
        core_algos.compute_grpo_passk_outcome_advantage, SCORES, mask, G, config={"norm_adv_by_std_in_grpo": True}
    )
    ours = groups.grpo_passk_advantages(jnp.asarray(SCORES), G)
    np.testing.assert_allclose(np.asarray(groups.broadcast_over_tokens(ours, jnp.asarray(mask))), verl, atol=1e-5)
