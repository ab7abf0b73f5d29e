"""Offline preference losses (DPO, cDPO, RPO, IPO, SimPO, KTO) and the sequence log-prob helpers.

Checked against independent float64 NumPy versions written as plain loops (values, and gradients
by central finite differences of the NumPy loss), a hand-worked DPO example, the analytic form of
DPO's gradient, and under jit, vmap, pmap and shard_map over the 8 simulated CPU devices.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrlhf import core

N_DEV = 8
B = 16  # pairs (2 per device)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def assert_finite_close(actual, expected, atol=1e-5, rtol=1e-5):
    actual = np.asarray(actual, np.float64)
    assert np.all(np.isfinite(actual)), actual
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


def finite_difference_grad(f, args, index, eps=1e-6):
    """Central differences of the float64 NumPy loss ``f(*args)`` w.r.t. ``args[index]`` ([B])."""
    args = [np.asarray(a, np.float64).copy() for a in args]
    grad = np.zeros_like(args[index])
    for b in range(grad.shape[0]):
        up = [a.copy() for a in args]
        down = [a.copy() for a in args]
        up[index][b] += eps
        down[index][b] -= eps
        grad[b] = (f(*up) - f(*down)) / (2 * eps)
    return grad


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    chosen_lengths = rng.integers(1, 9, size=B).astype(np.float32)
    rejected_lengths = rng.integers(1, 9, size=B).astype(np.float32)
    rejected_lengths[5] = 0  # an empty rejected response: its summed log-probs are 0
    ref_chosen = (-rng.exponential(size=B) * chosen_lengths).astype(np.float32)
    ref_rejected = (-rng.exponential(size=B) * rejected_lengths).astype(np.float32)
    pair_mask = np.ones(B, np.float32)
    pair_mask[[2, 9]] = 0  # two padding pairs, on different devices
    return dict(
        chosen=(ref_chosen + rng.normal(size=B) * 2).astype(np.float32) * (chosen_lengths > 0),
        rejected=(ref_rejected + rng.normal(size=B) * 2).astype(np.float32) * (rejected_lengths > 0),
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        pair_mask=pair_mask,
    )


# ----------------------------------------------------------------------------- NumPy references


def f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


def np_masked_mean(values, mask):
    values, mask = [float(v) for v in values], [float(m) for m in mask]  # Python floats: float64
    total = sum(v * m for v, m in zip(values, mask))
    return total / max(sum(mask), 1.0)


def np_dpo(cw, cl, rw, rl, beta, e, mask, alpha=None, lengths=None):
    cw, cl, rw, rl = f64(cw, cl, rw, rl)
    losses = []
    for b in range(len(cw)):
        x = beta * ((cw[b] - rw[b]) - (cl[b] - rl[b]))
        losses.append(-(1 - e) * log_sigmoid(x) - e * log_sigmoid(-x))
    loss = np_masked_mean(losses, mask)
    if alpha is not None:
        tokens = sum(float(n) * float(m) for n, m in zip(lengths, mask))
        loss += alpha * -sum(float(c) * float(m) for c, m in zip(cw, mask)) / max(tokens, 1.0)
    return loss


def np_ipo(cw, cl, rw, rl, lw, ll, beta, mask):
    cw, cl, rw, rl, lw, ll = f64(cw, cl, rw, rl, lw, ll)
    losses = []
    for b in range(len(cw)):
        gap = (cw[b] - rw[b]) / max(lw[b], 1.0) - (cl[b] - rl[b]) / max(ll[b], 1.0)
        losses.append((gap - 1.0 / (2.0 * beta)) ** 2)
    return np_masked_mean(losses, mask)


def np_simpo(cw, cl, lw, ll, beta, gamma, mask):
    cw, cl, lw, ll = f64(cw, cl, lw, ll)
    losses = []
    for b in range(len(cw)):
        z = beta * (cw[b] / max(lw[b], 1.0) - cl[b] / max(ll[b], 1.0)) - gamma
        losses.append(-log_sigmoid(z))
    return np_masked_mean(losses, mask)


def np_kto(logps, ref, desirable, kl, ref_kl, beta, lam_d, lam_u, mask):
    logps, ref, kl, ref_kl = f64(logps, ref, kl, ref_kl)
    z0 = max(0.0, sum(a - b for a, b in zip(kl, ref_kl)) / len(kl))
    losses = []
    for b in range(len(logps)):
        h = logps[b] - ref[b]
        if desirable[b]:
            losses.append(lam_d * (1 - sigmoid(beta * (h - z0))))
        else:
            losses.append(lam_u * (1 - sigmoid(beta * (z0 - h))))
    return np_masked_mean(losses, mask)


def np_pair_stats(chosen_rewards, rejected_rewards, mask):
    margins = [w - l for w, l in zip(chosen_rewards, rejected_rewards)]
    return {
        "chosen_reward": np_masked_mean(chosen_rewards, mask),
        "rejected_reward": np_masked_mean(rejected_rewards, mask),
        "reward_margin": np_masked_mean(margins, mask),
        "accuracy": np_masked_mean([1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins], mask),
    }


def check_stats(stats, expected):
    for name, value in expected.items():
        assert_finite_close(stats[name], value, atol=1e-5)


# ----------------------------------------------------------------------------- against NumPy


@pytest.mark.parametrize("beta,label_smoothing", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_dpo_matches_numpy_and_finite_difference_gradient(pairs, beta, label_smoothing):
    p = pairs
    args = (p["chosen"], p["rejected"], p["ref_chosen"], p["ref_rejected"])
    loss, stats = core.dpo_loss(*args, beta=beta, label_smoothing=label_smoothing, pair_mask=p["pair_mask"])

    def f(cw, cl, rw, rl):
        return np_dpo(cw, cl, rw, rl, beta, label_smoothing, p["pair_mask"])

    assert_finite_close(loss, f(*args))
    hw = [beta * (a - b) for a, b in zip(p["chosen"], p["ref_chosen"])]
    hl = [beta * (a - b) for a, b in zip(p["rejected"], p["ref_rejected"])]
    check_stats(stats, np_pair_stats(hw, hl, p["pair_mask"]))
    assert_finite_close(stats["pref_loss"], f(*args))

    grads = jax.grad(
        lambda cw, cl: core.dpo_loss(
            cw, cl, *args[2:], beta=beta, label_smoothing=label_smoothing, pair_mask=p["pair_mask"]
        )[0],
        argnums=(0, 1),
    )(*args[:2])
    for index in (0, 1):
        assert_finite_close(grads[index], finite_difference_grad(f, args, index), atol=1e-5)
    # The reference log-probs are constants.
    ref_grads = jax.grad(lambda rw: core.dpo_loss(args[0], args[1], rw, args[3], beta=beta)[0])(args[2])
    np.testing.assert_array_equal(ref_grads, 0.0)


def test_label_smoothing_zero_is_plain_dpo(pairs):
    p = pairs
    args = (p["chosen"], p["rejected"], p["ref_chosen"], p["ref_rejected"])
    plain = -jnp.mean(jax.nn.log_sigmoid(0.1 * ((args[0] - args[2]) - (args[1] - args[3]))))
    default, _ = core.dpo_loss(*args, beta=0.1)
    smoothed_zero, _ = core.dpo_loss(*args, beta=0.1, label_smoothing=0.0)
    np.testing.assert_allclose(default, plain, rtol=1e-6)
    np.testing.assert_allclose(smoothed_zero, plain, rtol=1e-6)
    # And label smoothing e > 0 is not (but e = 0.5 makes the loss symmetric in chosen/rejected).
    assert abs(float(core.dpo_loss(*args, beta=0.1, label_smoothing=0.1)[0]) - float(plain)) > 1e-4
    half, _ = core.dpo_loss(*args, beta=0.1, label_smoothing=0.5)
    swapped, _ = core.dpo_loss(args[1], args[0], args[3], args[2], beta=0.1, label_smoothing=0.5)
    np.testing.assert_allclose(half, swapped, rtol=1e-6)


def test_rpo_adds_alpha_times_chosen_token_mean_nll(pairs):
    p = pairs
    args = (p["chosen"], p["rejected"], p["ref_chosen"], p["ref_rejected"])
    alpha = 0.7
    loss, stats = core.dpo_loss(
        *args, beta=0.1, rpo_alpha=alpha, chosen_lengths=p["chosen_lengths"], pair_mask=p["pair_mask"]
    )

    def f(cw, cl, rw, rl):
        return np_dpo(cw, cl, rw, rl, 0.1, 0.0, p["pair_mask"], alpha, p["chosen_lengths"])

    assert_finite_close(loss, f(*args))
    no_rpo = np_dpo(*args, 0.1, 0.0, p["pair_mask"])
    assert_finite_close(stats["pref_loss"], no_rpo)
    assert_finite_close(stats["nll_loss"], (f(*args) - no_rpo) / alpha)
    assert_finite_close(
        core.chosen_nll_loss(p["chosen"], p["chosen_lengths"], p["pair_mask"]), (f(*args) - no_rpo) / alpha
    )
    grad = jax.grad(
        lambda cw: core.dpo_loss(
            cw, *args[1:], beta=0.1, rpo_alpha=alpha, chosen_lengths=p["chosen_lengths"], pair_mask=p["pair_mask"]
        )[0]
    )
    assert_finite_close(grad(args[0]), finite_difference_grad(f, args, 0), atol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_matches_numpy_and_finite_difference_gradient(pairs, beta):
    p = pairs
    args = (p["chosen"], p["rejected"], p["ref_chosen"], p["ref_rejected"], p["chosen_lengths"], p["rejected_lengths"])
    loss, stats = core.ipo_loss(*args, beta=beta, pair_mask=p["pair_mask"])

    def f(*a):
        return np_ipo(*a, beta, p["pair_mask"])

    # The loss is O(1 / beta^2) = 100, so compare relative to that.
    assert_finite_close(loss, f(*args), atol=1e-4)
    hw = [beta * (a - b) / max(n, 1) for a, b, n in zip(p["chosen"], p["ref_chosen"], p["chosen_lengths"])]
    hl = [beta * (a - b) / max(n, 1) for a, b, n in zip(p["rejected"], p["ref_rejected"], p["rejected_lengths"])]
    check_stats(stats, np_pair_stats(hw, hl, p["pair_mask"]))
    grads = jax.grad(
        lambda cw, cl: core.ipo_loss(cw, cl, *args[2:], beta=beta, pair_mask=p["pair_mask"])[0], argnums=(0, 1)
    )(*args[:2])
    for index in (0, 1):
        assert_finite_close(grads[index], finite_difference_grad(f, args, index, eps=1e-5), atol=1e-4)


@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 0.3)])
def test_simpo_matches_numpy_and_finite_difference_gradient(pairs, beta, gamma):
    p = pairs
    args = (p["chosen"], p["rejected"], p["chosen_lengths"], p["rejected_lengths"])
    loss, stats = core.simpo_loss(*args, beta=beta, gamma=gamma, pair_mask=p["pair_mask"])

    def f(*a):
        return np_simpo(*a, beta, gamma, p["pair_mask"])

    assert_finite_close(loss, f(*args))
    hw = [beta * a / max(n, 1) for a, n in zip(p["chosen"], p["chosen_lengths"])]
    hl = [beta * a / max(n, 1) for a, n in zip(p["rejected"], p["rejected_lengths"])]
    check_stats(stats, np_pair_stats(hw, hl, p["pair_mask"]))
    grads = jax.grad(
        lambda cw, cl: core.simpo_loss(cw, cl, *args[2:], beta=beta, gamma=gamma, pair_mask=p["pair_mask"])[0],
        argnums=(0, 1),
    )(*args[:2])
    for index in (0, 1):
        assert_finite_close(grads[index], finite_difference_grad(f, args, index), atol=1e-5)


@pytest.fixture(scope="module")
def kto_batch():
    rng = np.random.default_rng(2)
    ref = (-rng.exponential(size=B) * 5).astype(np.float32)
    kl_ref = (-rng.exponential(size=B) * 5).astype(np.float32)
    return dict(
        logps=(ref + rng.normal(size=B) * 3).astype(np.float32),
        ref_logps=ref,
        desirable=rng.random(B) < 0.6,
        kl_logps=(kl_ref + 0.8 + rng.normal(size=B)).astype(np.float32),  # positive mean KL
        ref_kl_logps=kl_ref,
        mask=np.asarray([0.0 if b in (4, 11) else 1.0 for b in range(B)], np.float32),
    )


@pytest.mark.parametrize("beta,lam_d,lam_u", [(0.1, 1.0, 1.0), (0.5, 1.0, 1.33)])
def test_kto_matches_numpy_and_finite_difference_gradient(kto_batch, beta, lam_d, lam_u):
    k = kto_batch
    loss, stats = core.kto_loss(
        k["logps"],
        k["ref_logps"],
        k["desirable"],
        k["kl_logps"],
        k["ref_kl_logps"],
        beta=beta,
        desirable_weight=lam_d,
        undesirable_weight=lam_u,
        mask=k["mask"],
    )

    def f(logps, ref, kl, ref_kl):
        return np_kto(logps, ref, k["desirable"], kl, ref_kl, beta, lam_d, lam_u, k["mask"])

    args = (k["logps"], k["ref_logps"], k["kl_logps"], k["ref_kl_logps"])
    assert_finite_close(loss, f(*args))
    z0 = float(np.mean(k["kl_logps"].astype(np.float64) - k["ref_kl_logps"]))
    assert z0 > 0
    assert_finite_close(stats["kl"], z0)
    rewards = [beta * (a - b) for a, b in zip(k["logps"], k["ref_logps"])]
    d_mask = [m * d for m, d in zip(k["mask"], k["desirable"])]
    u_mask = [m * (not d) for m, d in zip(k["mask"], k["desirable"])]
    chosen, rejected = np_masked_mean(rewards, d_mask), np_masked_mean(rewards, u_mask)
    check_stats(
        stats,
        {
            "chosen_reward": chosen,
            "rejected_reward": rejected,
            "reward_margin": chosen - rejected,
            "desirable_fraction": np_masked_mean(list(map(float, k["desirable"])), k["mask"]),
        },
    )

    def loss_fn(logps, kl_logps):
        return core.kto_loss(
            logps,
            k["ref_logps"],
            k["desirable"],
            kl_logps,
            k["ref_kl_logps"],
            beta=beta,
            desirable_weight=lam_d,
            undesirable_weight=lam_u,
            mask=k["mask"],
        )[0]

    grad_logps, grad_kl = jax.grad(loss_fn, argnums=(0, 1))(k["logps"], k["kl_logps"])
    assert_finite_close(grad_logps, finite_difference_grad(f, args, 0), atol=1e-5)
    # The reference point z0 is detached: no gradient flows into the KL batch.
    np.testing.assert_array_equal(grad_kl, 0.0)


def test_kto_reference_point_is_clamped_at_zero_and_optional(kto_batch):
    k = kto_batch
    below = k["ref_kl_logps"] - 1.0  # mean KL estimate -1 -> z0 = 0
    loss, stats = core.kto_loss(k["logps"], k["ref_logps"], k["desirable"], below, k["ref_kl_logps"])
    no_kl_loss, no_kl_stats = core.kto_loss(k["logps"], k["ref_logps"], k["desirable"])
    assert float(stats["kl"]) == 0.0 and float(no_kl_stats["kl"]) == 0.0
    np.testing.assert_allclose(loss, no_kl_loss, rtol=1e-7)
    expected = np_kto(k["logps"], k["ref_logps"], k["desirable"], below, k["ref_kl_logps"], 0.1, 1.0, 1.0, np.ones(B))
    assert_finite_close(loss, expected)


def test_kto_policy_equal_to_reference_gives_half_the_weights():
    logps = jnp.asarray([-3.0, -7.0, -1.5, -4.0])
    desirable = jnp.asarray([True, False, True, False])
    loss, stats = core.kto_loss(logps, logps, desirable, logps, logps, desirable_weight=1.0, undesirable_weight=2.0)
    # h = 0 and z0 = 0: every example's loss is lambda * (1 - sigmoid(0)) = lambda / 2.
    np.testing.assert_allclose(loss, (0.5 + 1.0 + 0.5 + 1.0) / 4, rtol=1e-6)
    assert float(stats["reward_margin"]) == 0.0


# ----------------------------------------------------------------------------- by hand


def test_dpo_hand_worked_example():
    # beta = 0.1. Summed log-probs of four pairs under the policy and the reference:
    #             chosen  ref_chosen  rejected  ref_rejected |  h_w    h_l     d
    #   pair 0:   -3.0     -3.5       -4.0      -3.0         |  0.5   -1.0    1.5   (right)
    #   pair 1:   -2.0     -1.0       -2.5      -3.5         | -1.0    1.0   -2.0   (wrong)
    #   pair 2:   -5.0     -6.0       -1.0      -2.0         |  1.0    1.0    0.0   (tie)
    #   pair 3:   -1.0     -2.0       -3.0      -2.0         |  1.0   -1.0    2.0   (right)
    # loss_b = -log sigmoid(0.1 d) = log(1 + exp(-0.1 d)):
    #   pair 0: log(1 + e^-0.15) = 0.620957   pair 1: log(1 + e^0.2) = 0.798139
    #   pair 2: log 2            = 0.693147   pair 3: log(1 + e^-0.2) = 0.598139
    # mean = (0.620957 + 0.798139 + 0.693147 + 0.598139) / 4 = 0.677595
    chosen = jnp.asarray([-3.0, -2.0, -5.0, -1.0])
    ref_chosen = jnp.asarray([-3.5, -1.0, -6.0, -2.0])
    rejected = jnp.asarray([-4.0, -2.5, -1.0, -3.0])
    ref_rejected = jnp.asarray([-3.0, -3.5, -2.0, -2.0])
    loss, stats = core.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    np.testing.assert_allclose(loss, 0.677595, atol=1e-6)
    # accuracy: right, wrong, tie (one half), right -> (1 + 0 + 0.5 + 1) / 4 = 0.625
    np.testing.assert_allclose(stats["accuracy"], 0.625, atol=1e-7)
    # implicit rewards 0.1 h_w = [0.05, -0.1, 0.1, 0.1] (mean 0.0375), 0.1 h_l = [-0.1, 0.1, 0.1, -0.1] (mean 0)
    np.testing.assert_allclose(stats["chosen_reward"], 0.0375, atol=1e-7)
    np.testing.assert_allclose(stats["rejected_reward"], 0.0, atol=1e-7)
    np.testing.assert_allclose(stats["reward_margin"], 0.0375, atol=1e-7)
    # d loss / d chosen_b = -(0.1 / 4) sigmoid(-0.1 d_b), sigmoid(-0.1 d) = [0.462570, 0.549834, 0.5, 0.450166]
    grad_chosen, grad_rejected = jax.grad(
        lambda w, l: core.dpo_loss(w, l, ref_chosen, ref_rejected, beta=0.1)[0], argnums=(0, 1)
    )(chosen, rejected)
    expected = -0.025 * np.asarray([0.462570, 0.549834, 0.5, 0.450166])
    np.testing.assert_allclose(grad_chosen, expected, atol=1e-7)
    np.testing.assert_allclose(grad_rejected, -expected, atol=1e-7)


@pytest.mark.slow
def test_dpo_gradient_has_the_papers_form():
    """grad_theta L = (1 / B) sum_b -beta sigmoid(-beta d_b) (grad h_w^b - grad h_l^b), with a real
    (tiny, linear) model scoring chosen and rejected in one concatenated forward pass."""
    rng = np.random.default_rng(3)
    n_pairs, length, dim, vocab, beta = 3, 5, 4, 7, 0.3
    features = jnp.asarray(rng.normal(size=(2 * n_pairs, length, dim)), jnp.float32)
    theta = jnp.asarray(rng.normal(size=(dim, vocab)), jnp.float32)
    ref_theta = theta + 0.5 * jnp.asarray(rng.normal(size=(dim, vocab)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, vocab, size=(2 * n_pairs, length)), jnp.int32)
    lengths = rng.integers(1, length + 1, size=(2 * n_pairs, 1))
    mask = jnp.asarray(np.arange(length)[None] < lengths, jnp.float32)

    def seq_logps(params):
        logps_2B, _ = core.sequence_logprobs(core.token_logprobs(features @ params, tokens), mask)
        return logps_2B

    ref_chosen, ref_rejected = core.split_pairs(seq_logps(ref_theta))

    def loss_fn(params):
        chosen, rejected = core.split_pairs(seq_logps(params))
        return core.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta)[0]

    grad = jax.grad(loss_fn)(theta)
    chosen, rejected = core.split_pairs(seq_logps(theta))
    d = (chosen - ref_chosen) - (rejected - ref_rejected)
    jac_chosen, jac_rejected = core.split_pairs(jax.jacrev(seq_logps)(theta))  # [B, dim, vocab] each: grad h
    coefficient = -beta * jax.nn.sigmoid(-beta * d) / n_pairs
    expected = jnp.einsum("b,bij->ij", coefficient, jac_chosen - jac_rejected)
    np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_policy_equal_to_reference(pairs):
    p = pairs
    same = (p["ref_chosen"], p["ref_rejected"], p["ref_chosen"], p["ref_rejected"])
    for e in (0.0, 0.2):
        loss, stats = core.dpo_loss(*same, beta=0.1, label_smoothing=e)
        np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)
        np.testing.assert_allclose(stats["accuracy"], 0.5)  # every pair is a tie
        np.testing.assert_allclose(stats["reward_margin"], 0.0)
    # IPO: d = 0, so (0 - 1 / (2 beta))^2 = 1 / (4 beta^2).
    loss, _ = core.ipo_loss(*same, p["chosen_lengths"], p["rejected_lengths"], beta=0.1)
    np.testing.assert_allclose(loss, 25.0, rtol=1e-6)


def test_simpo_with_equal_per_token_logprobs_depends_only_on_gamma():
    """SimPO has no reference, so "policy == reference" does not pin it down. What holds: when the
    policy gives every token the same log-prob (here a uniform policy over V tokens), the
    length-normalised log-probs of chosen and rejected are equal whatever their lengths, and the
    loss is -log sigmoid(-gamma) = log(1 + e^gamma), independent of the lengths and of beta.
    (The summed log-probs, by contrast, differ with the lengths: DPO on them would not be.)"""
    vocab, length = 5, 9
    lengths_chosen = np.asarray([1, 4, 9, 6])
    lengths_rejected = np.asarray([9, 2, 3, 6])
    uniform = jnp.full((4, length), -math.log(vocab))
    mask_chosen = jnp.asarray(np.arange(length)[None] < lengths_chosen[:, None], jnp.float32)
    mask_rejected = jnp.asarray(np.arange(length)[None] < lengths_rejected[:, None], jnp.float32)
    chosen, n_chosen = core.sequence_logprobs(uniform, mask_chosen)
    rejected, n_rejected = core.sequence_logprobs(uniform, mask_rejected)
    assert not np.allclose(chosen, rejected)
    for beta in (2.0, 2.5):
        for gamma in (0.0, 0.5, 1.4):
            loss, stats = core.simpo_loss(chosen, rejected, n_chosen, n_rejected, beta=beta, gamma=gamma)
            np.testing.assert_allclose(loss, math.log1p(math.exp(gamma)), rtol=1e-6)
            np.testing.assert_allclose(stats["accuracy"], 0.5)
            np.testing.assert_allclose(stats["chosen_reward"], -beta * math.log(vocab), rtol=1e-6)


# ----------------------------------------------------------------------------- sequence log-probs


def test_sequence_logprobs_from_logits_matches_numpy_loop():
    rng = np.random.default_rng(4)
    batch, seq, vocab = 4, 8, 6
    logits = rng.normal(size=(batch, seq, vocab)).astype(np.float32) * 2
    input_ids = rng.integers(0, vocab, size=(batch, seq)).astype(np.int32)
    response_mask = np.zeros((batch, seq), np.float32)
    response_mask[0, 3:8] = 1  # prompt of 3 tokens, response of 5
    response_mask[1, 1:4] = 1  # prompt of 1 token, response of 3, then padding
    response_mask[3, 5:7] = 1  # row 2 has an empty response
    logps, lengths = core.sequence_logprobs_from_logits(logits, input_ids, response_mask)
    expected = np.zeros(batch)
    for b in range(batch):
        for i in range(1, seq):
            if response_mask[b, i]:
                z = logits[b, i - 1].astype(np.float64)
                expected[b] += z[input_ids[b, i]] - (z.max() + math.log(np.exp(z - z.max()).sum()))
    assert_finite_close(logps, expected)
    np.testing.assert_array_equal(lengths, [5, 3, 0, 2])


def test_sequence_logprobs_ignores_masked_nan_and_empty_rows():
    logprobs = jnp.asarray([[-1.0, -2.0, jnp.nan], [jnp.nan, jnp.inf, -jnp.inf]])
    mask = jnp.asarray([[1, 1, 0], [0, 0, 0]])
    logps, lengths = core.sequence_logprobs(logprobs, mask)
    np.testing.assert_array_equal(logps, [-3.0, 0.0])
    np.testing.assert_array_equal(lengths, [2.0, 0.0])


def test_concat_pairs_and_split_pairs_round_trip():
    chosen = {"ids": jnp.arange(6).reshape(2, 3), "mask": jnp.ones((2, 3)), "w": jnp.asarray([1.0, 2.0])}
    rejected = {"ids": jnp.arange(10, 18).reshape(2, 4), "mask": jnp.ones((2, 4)), "w": jnp.asarray([3.0, 4.0])}
    both = core.concat_pairs(chosen, rejected)
    assert both["ids"].shape == (4, 4) and both["mask"].shape == (4, 4) and both["w"].shape == (4,)
    np.testing.assert_array_equal(both["ids"][:2], [[0, 1, 2, 0], [3, 4, 5, 0]])  # right-padded with 0
    np.testing.assert_array_equal(both["mask"][:2, 3], [0, 0])
    np.testing.assert_array_equal(both["ids"][2:], rejected["ids"])
    back_chosen, back_rejected = core.split_pairs(both)
    np.testing.assert_array_equal(back_chosen["w"], chosen["w"])
    np.testing.assert_array_equal(back_rejected["ids"], rejected["ids"])
    np.testing.assert_array_equal(back_chosen["ids"][:, :3], chosen["ids"])
    # Under jit too.
    jitted = jax.jit(core.concat_pairs)(chosen, rejected)
    np.testing.assert_array_equal(jitted["ids"], both["ids"])


# ----------------------------------------------------------------------------- empty responses


@pytest.mark.slow
def test_empty_responses_give_finite_losses_and_gradients():
    # Pair 0: both responses empty (summed log-probs 0, length 0); pair 1: an empty rejected one.
    token_logprobs = jnp.asarray([[jnp.nan, jnp.nan], [-1.0, -0.5], [jnp.nan, -jnp.inf], [jnp.nan, jnp.nan]])
    mask = jnp.asarray([[0, 0], [1, 1], [0, 0], [0, 0]])

    def losses(token_logprobs_2BxT):
        logps_2B, lengths_2B = core.sequence_logprobs(token_logprobs_2BxT, mask)
        (chosen, rejected), (n_chosen, n_rejected) = core.split_pairs(logps_2B), core.split_pairs(lengths_2B)
        ref = jnp.zeros_like(chosen)
        return {
            "dpo": core.dpo_loss(chosen, rejected, ref, ref, rpo_alpha=1.0, chosen_lengths=n_chosen)[0],
            "ipo": core.ipo_loss(chosen, rejected, ref, ref, n_chosen, n_rejected)[0],
            "simpo": core.simpo_loss(chosen, rejected, n_chosen, n_rejected)[0],
            "kto": core.kto_loss(
                logps_2B, jnp.zeros_like(logps_2B), jnp.asarray([1, 1, 0, 0]), logps_2B, jnp.zeros_like(logps_2B)
            )[0],
        }

    values = losses(token_logprobs)
    for name, value in values.items():
        assert np.isfinite(value), name
        grad = jax.grad(lambda x: losses(x)[name])(token_logprobs)
        assert np.all(np.isfinite(grad)), name
        np.testing.assert_array_equal(np.asarray(grad)[np.asarray(mask) == 0], 0.0)
    # All pairs masked out: loss 0 and stats 0, never NaN.
    zero = jnp.zeros(3)
    loss, stats = core.dpo_loss(zero, zero, zero, zero, pair_mask=zero)
    assert float(loss) == 0.0 and all(np.isfinite(v) for v in stats.values())


def test_bf16_inputs_compute_in_float32(pairs):
    p = pairs
    args = [jnp.asarray(p[k], jnp.bfloat16) for k in ("chosen", "rejected", "ref_chosen", "ref_rejected")]
    loss, stats = core.dpo_loss(*args)
    assert loss.dtype == jnp.float32 and stats["accuracy"].dtype == jnp.float32


# ----------------------------------------------------------------------------- transforms


def _all_losses(b, axis_name=None):
    pair_args = (b["chosen"], b["rejected"], b["ref_chosen"], b["ref_rejected"])
    lengths = (b["chosen_lengths"], b["rejected_lengths"])
    return {
        "dpo": core.dpo_loss(*pair_args, beta=0.1, pair_mask=b["pair_mask"], axis_name=axis_name),
        "cdpo_rpo": core.dpo_loss(
            *pair_args,
            beta=0.2,
            label_smoothing=0.1,
            rpo_alpha=0.5,
            chosen_lengths=b["chosen_lengths"],
            pair_mask=b["pair_mask"],
            axis_name=axis_name,
        ),
        "ipo": core.ipo_loss(*pair_args, *lengths, beta=0.1, pair_mask=b["pair_mask"], axis_name=axis_name),
        "simpo": core.simpo_loss(b["chosen"], b["rejected"], *lengths, pair_mask=b["pair_mask"], axis_name=axis_name),
        "kto": core.kto_loss(
            b["chosen"],
            b["ref_chosen"],
            b["chosen_lengths"] > 4,
            b["rejected"],
            b["ref_rejected"],
            mask=b["pair_mask"],
            axis_name=axis_name,
        ),
    }


def _assert_trees_close(actual, expected, atol=1e-6):
    flat_a, tree_a = jax.tree.flatten(actual)
    flat_e, tree_e = jax.tree.flatten(expected)
    assert tree_a == tree_e
    for a, e in zip(flat_a, flat_e):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, e, atol=atol, rtol=1e-6)


def test_jit_matches_eager(pairs):
    _assert_trees_close(jax.jit(_all_losses)(pairs), _all_losses(pairs))


def test_traced_hyper_parameters_do_not_recompile(pairs):
    p = pairs
    args = (p["chosen"], p["rejected"], p["ref_chosen"], p["ref_rejected"])
    fn = jax.jit(lambda beta, e: core.dpo_loss(*args, beta=beta, label_smoothing=e)[0])
    for beta, e in [(0.1, 0.0), (0.3, 0.2)]:
        np.testing.assert_allclose(
            fn(jnp.float32(beta), jnp.float32(e)), core.dpo_loss(*args, beta=beta, label_smoothing=e)[0], rtol=1e-6
        )
    assert fn._cache_size() == 1


def test_vmap_over_stacked_batches_matches_loop(pairs):
    stacked = jax.tree.map(lambda a: a.reshape((4, 4) + a.shape[1:]), pairs)
    vmapped = jax.jit(jax.vmap(_all_losses))(stacked)
    looped = [_all_losses(jax.tree.map(lambda a: a[i], stacked)) for i in range(4)]
    _assert_trees_close(vmapped, jax.tree.map(lambda *xs: jnp.stack(xs), *looped))


def test_pmap_with_axis_name_equals_one_device(pairs):
    assert jax.device_count() >= N_DEV
    sharded = jax.tree.map(lambda a: a.reshape((N_DEV, B // N_DEV) + a.shape[1:]), pairs)
    per_device = jax.pmap(functools.partial(_all_losses, axis_name="batch"), axis_name="batch")(sharded)
    per_device = jax.block_until_ready(per_device)
    expected = jax.tree.map(lambda v: np.broadcast_to(v, (N_DEV,)), _all_losses(pairs))
    _assert_trees_close(per_device, expected)


def test_shard_map_with_axis_name_equals_one_device(pairs):
    mesh = jax.make_mesh((N_DEV,), ("batch",))
    sharded_fn = jax.jit(
        jax.shard_map(
            functools.partial(_all_losses, axis_name="batch"), mesh=mesh, in_specs=(P("batch"),), out_specs=P()
        )
    )
    sharded_pairs = jax.device_put(pairs, jax.sharding.NamedSharding(mesh, P("batch")))
    _assert_trees_close(jax.block_until_ready(sharded_fn(sharded_pairs)), _all_losses(pairs))


# ----------------------------------------------------------------------------- bad input


def test_bad_shapes_raise_clear_errors(pairs):
    p = pairs
    two_d = jnp.zeros((B, 3))
    with pytest.raises(AssertionError, match=r"\[B\]"):
        core.dpo_loss(two_d, two_d, two_d, two_d)  # token log-probs, not summed
    with pytest.raises(AssertionError, match=r"\[B\]"):
        core.dpo_loss(p["chosen"], p["rejected"][:-1], p["ref_chosen"], p["ref_rejected"])
    with pytest.raises(AssertionError, match=r"\[B\]"):
        core.simpo_loss(p["chosen"], p["rejected"], p["chosen_lengths"][:3], p["rejected_lengths"])
    with pytest.raises(AssertionError, match="pair_mask"):
        core.ipo_loss(
            p["chosen"],
            p["rejected"],
            p["ref_chosen"],
            p["ref_rejected"],
            p["chosen_lengths"],
            p["rejected_lengths"],
            pair_mask=jnp.ones(3),
        )
    with pytest.raises(ValueError, match="chosen_lengths"):
        core.dpo_loss(p["chosen"], p["rejected"], p["ref_chosen"], p["ref_rejected"], rpo_alpha=1.0)
    with pytest.raises(ValueError, match="both"):
        core.kto_loss(p["chosen"], p["ref_chosen"], p["chosen"] > 0, kl_logps=p["rejected"])
    with pytest.raises(AssertionError):
        core.sequence_logprobs(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="same number of rows"):
        core.concat_pairs(jnp.zeros((2, 3)), jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match="even"):
        core.split_pairs(jnp.zeros((3, 2)))
