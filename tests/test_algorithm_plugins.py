"""Algorithms as plug-ins (issue 33): a user's estimator and loss, defined here (outside
jaxrlhf/), train in the fused step, in a sweep over their own number, and on the 8-device mesh;
the built-ins took the same door and compute what the if/elif trainer computed; bad plug-ins are
refused before anything compiles.

The new built-ins (CISPO, Clip-Cov, KL-Cov, GMPO, SAPO; OPO, GPG, GRPO pass@k) are checked against
float64 NumPy references here and against verl's own functions in test_algorithm_plugins_verl.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_training as tt
from test_training import BASE_CONFIG, make_prompts, target_fraction_reward, tiny_gpt2_config

from jaxrlhf.core import broadcast_over_tokens, groups, surrogates
from jaxrlhf.sharding import make_mesh
from jaxrlhf.training import PPO, PPOConfig, grid, train, train_sweep
from jaxrlhf.training.config import registered_advantage_estimators, registered_policy_losses
from jaxrlhf.training.hparams import HyperParams, run_configs
from jaxrlhf.training.plugins import (
    AdvantageInputs,
    Advantages,
    PluginError,
    PolicyLossInputs,
    advantage_estimator,
    policy_loss,
)
from jaxrlhf.training.presets import preset

# ----------------------------------------------------------------------------------------------
# A user's plug-ins: neither is a copy of a built-in.


@advantage_estimator("test_softmax_baseline", numbers={"baseline_temperature": 1.0}, min_group_size=2)
def softmax_baseline(x: AdvantageInputs) -> Advantages:
    """Each group's baseline is its scores' softmax-weighted mean (temperature ``baseline_temperature``:
    large -> the plain mean, small -> the best score)."""
    scores_PxG = x.sequence_scores().reshape(-1, x.group_size)
    weights_PxG = jax.nn.softmax(scores_PxG / x.numbers["baseline_temperature"], axis=-1)
    baseline_Px1 = jnp.sum(weights_PxG * scores_PxG, axis=-1, keepdims=True)
    advantages_B = (scores_PxG - baseline_Px1).reshape(-1)
    return Advantages(broadcast_over_tokens(advantages_B, x.mask), stats={"baseline_mean": jnp.mean(baseline_Px1)})


@policy_loss("test_tanh_clip", numbers={"soft_clip_width": 0.2})
def tanh_clip(x: PolicyLossInputs):
    """A soft clip: ``-A * (1 + w * tanh((r - 1) / w))`` (PPO's gradient at r = 1, bounded ratio)."""
    width = x.numbers["soft_clip_width"]
    ratio = jnp.exp(x.logprobs - x.old_logprobs)
    loss_BxN = -x.advantages * (1.0 + width * jnp.tanh((ratio - 1.0) / width))
    saturated = (jnp.abs(ratio - 1.0) > width).astype(jnp.float32)
    return x.aggregate(loss_BxN), {"saturated_fraction": jnp.sum(saturated * x.mask) / jnp.maximum(jnp.sum(x.mask), 1)}


USER_CONFIG = BASE_CONFIG.replace(
    advantage_estimator="test_softmax_baseline",
    policy_loss="test_tanh_clip",
    num_generations=4,
    kl_placement="loss",
    kl_estimator="k3",
    adaptive_kl=False,
    total_steps=3,
    plugin_numbers={"baseline_temperature": 0.5},
)


pytestmark = pytest.mark.usefixtures("module_compilation_cache")


@pytest.fixture(scope="module")
def tiny():
    model = tt.LanguageModel(tiny_gpt2_config())
    return model, model.init_params(jax.random.PRNGKey(0))


def _relative_error(a, b) -> float:
    flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])  # noqa: E731
    a, b = flat(a), flat(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_user_plugins_are_registered_names_with_numbers_as_data():
    assert "test_softmax_baseline" in registered_advantage_estimators()
    assert "test_tanh_clip" in registered_policy_losses()
    # Passing the plug-in itself stores its name; its numbers join the state's hyper-parameters.
    config = USER_CONFIG.replace(advantage_estimator=softmax_baseline, policy_loss=tanh_clip)
    assert (config.advantage_estimator, config.policy_loss) == ("test_softmax_baseline", "test_tanh_clip")
    assert config.plugin_numbers == (("baseline_temperature", 0.5),)
    plugin_numbers = HyperParams.from_config(config).plugin
    assert {k: float(v) for k, v in plugin_numbers.items()} == pytest.approx(
        {"baseline_temperature": 0.5, "soft_clip_width": 0.2}
    )
    assert not config.uses_critic
    # grid() sweeps a plug-in's number like a built-in one.
    configs = run_configs(config, grid(seed=[0, 1], soft_clip_width=[0.1, 0.3]))
    assert [dict(c.plugin_numbers) for c in configs][:2] == [
        {"baseline_temperature": 0.5, "soft_clip_width": 0.1},
        {"baseline_temperature": 0.5, "soft_clip_width": 0.3},
    ]


@pytest.mark.slow
def test_user_plugins_train_sweep_and_run_on_the_mesh(tiny, tmp_path):
    """`train` learns the toy task with the user's estimator and loss; a sweep over the loss's own
    number equals the single runs (1e-5) on one compiled step; the mesh equals one device."""
    model, params = tiny
    prompts = make_prompts(16)
    learn_config = USER_CONFIG.replace(total_steps=20, save_every=100)
    learned = train(
        (model, params), target_fraction_reward, prompts, learn_config, tmp_path / "learn", progress=False, export=False
    )
    scores = [m["score"] for m in learned.history]
    assert np.mean(scores[:2]) < 0.15 and np.mean(scores[-3:]) > 0.3, scores
    assert {"baseline_mean", "saturated_fraction", "pg_loss", "approx_kl"} <= set(learned.history[0])

    runs = grid(soft_clip_width=[0.1, 0.4])
    sweep = train_sweep(
        (model, params),
        target_fraction_reward,
        prompts,
        USER_CONFIG,
        tmp_path / "sweep",
        runs,
        progress=False,
        export=False,
    )
    for r, overrides in enumerate(runs):
        config = run_configs(USER_CONFIG, [overrides])[0]
        single = train(
            (model, params),
            target_fraction_reward,
            prompts,
            config,
            tmp_path / f"single{r}",
            progress=False,
            export=False,
        )
        assert (
            _relative_error(
                jax.device_get(sweep.state.run(r).policy_params), jax.device_get(single.state.policy_params)
            )
            < 1e-5
        )
        assert sweep.histories[r][-1]["saturated_fraction"] == pytest.approx(
            single.history[-1]["saturated_fraction"], abs=1e-5
        )

    # One step on 8 devices (4-way data x 2-way fsdp) equals one device.
    config = USER_CONFIG
    one = PPO(config, model, target_fraction_reward)
    eight = PPO(config, model, target_fraction_reward, mesh=make_mesh(data=4, fsdp=2))
    ids, mask = make_prompts(config.prompts_per_step)
    results = []
    for ppo in (one, eight):
        state, metrics = ppo.train_step(ppo.init_state(params), ppo.frozen_params(params), ppo.prompt_batch(ids, mask))
        results.append((jax.device_get(state), jax.device_get(metrics)))
    assert _relative_error(results[1][0].policy_params, results[0][0].policy_params) < 1e-5
    for key in ("score", "baseline_mean", "saturated_fraction", "pg_loss"):
        assert float(results[1][1][key]) == pytest.approx(float(results[0][1][key]), abs=1e-5), key


def test_a_plugin_number_is_data_not_a_recompile(tiny):
    model, params = tiny
    config = USER_CONFIG.replace(batch_size=8, minibatch_size=8, ppo_epochs=1, max_new_tokens=4)
    ppo = PPO(config, model, target_fraction_reward)
    frozen = ppo.frozen_params(params)
    batch = ppo.prompt_batch(*make_prompts(config.prompts_per_step))
    losses = []
    for width in (0.2, 0.05):
        state = ppo.init_state(params, config=config.replace(plugin_numbers={"soft_clip_width": width}))
        _, metrics = ppo.train_step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert ppo.compiled_step_count() == 1
    assert np.isfinite(losses).all()


# ----------------------------------------------------------------------------------------------
# Built-ins through the same door


def test_builtins_are_registered_like_a_users():
    assert set(registered_advantage_estimators()) >= {
        "gae", "grpo", "drgrpo", "rloo", "reinforce++", "reinforce++-baseline", "remax", "opo", "gpg", "grpo-passk",
    }  # fmt: skip
    assert set(registered_policy_losses()) >= {
        "ppo",
        "gspo",
        "gspo-token",
        "cispo",
        "clip-cov",
        "kl-cov",
        "gmpo",
        "sapo",
    }


@pytest.mark.slow
def test_presets_compute_what_the_if_elif_trainer_computed():
    """Every preset (and the switches the plug-ins replaced) for 3 steps against the trainer before
    this change (tests/data/preset_steps_golden.npz, see tests/preset_golden.py): metrics and
    parameters. On the machine that wrote the file the two are bit-identical; elsewhere XLA:CPU may
    round differently, hence the tolerance."""
    import preset_golden

    golden = dict(np.load(preset_golden.GOLDEN_PATH))
    now = preset_golden.compute_all()
    assert set(golden) <= set(now)  # metrics added since (e.g. the sampler-trainer mismatch) are new keys
    for key, value in golden.items():
        np.testing.assert_allclose(now[key], value, rtol=2e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("loss_name", ["cispo", "clip-cov", "kl-cov", "gmpo", "sapo"])
def test_new_policy_losses_run_in_the_trainer(tiny, loss_name):
    model, params = tiny
    config = preset("grpo", BASE_CONFIG, num_generations=4).replace(
        policy_loss=loss_name, batch_size=8, minibatch_size=8, max_new_tokens=4, total_steps=2
    )
    ppo = PPO(config, model, target_fraction_reward)
    state = ppo.init_state(params)
    _, metrics = ppo.train_step(state, ppo.frozen_params(params), ppo.prompt_batch(*make_prompts(2)))
    metrics = jax.device_get(metrics)
    assert bool(metrics["all_finite"]) and {"pg_loss", "approx_kl", "ratio_mean"} <= set(metrics)


@pytest.mark.parametrize("estimator", ["opo", "gpg", "grpo-passk"])
def test_new_estimators_run_in_the_trainer(tiny, estimator):
    model, params = tiny
    config = preset("grpo", BASE_CONFIG, num_generations=4).replace(
        advantage_estimator=estimator, batch_size=8, minibatch_size=8, max_new_tokens=4, total_steps=2
    )
    ppo = PPO(config, model, target_fraction_reward)
    _, metrics = ppo.train_step(ppo.init_state(params), ppo.frozen_params(params), ppo.prompt_batch(*make_prompts(2)))
    assert bool(jax.device_get(metrics)["all_finite"])


# ----------------------------------------------------------------------------------------------
# Bad plug-ins: clear errors when the trainer is built, before any compile


def _bad_config(**changes):
    return BASE_CONFIG.replace(num_generations=4, adaptive_kl=False, **changes)


def test_unknown_names_list_what_is_registered():
    with pytest.raises(
        PluginError, match=r"advantage_estimator must be one of the registered names .*'grpo'.*got 'grpoo'"
    ):
        PPOConfig(advantage_estimator="grpoo")
    with pytest.raises(PluginError, match=r"policy_loss must be one of .*'cispo'"):
        PPOConfig(policy_loss="cisp0")
    with pytest.raises(ValueError, match=r"plugin_numbers sets 'tau'.*declare"):
        PPOConfig(plugin_numbers={"tau": 1.0})


def test_a_name_registered_twice_by_another_function_is_refused():
    def other(x):
        return Advantages(x.mask * 0.0)

    with pytest.raises(PluginError, match="'test_softmax_baseline' is registered twice"):
        advantage_estimator("test_softmax_baseline")(other)
    with pytest.raises(PluginError, match="'ppo' is registered twice"):
        policy_loss("ppo")(lambda x: (jnp.zeros(()), {}))


def test_bad_plugins_are_refused_when_the_trainer_is_built(tiny):
    model, _ = tiny

    @advantage_estimator("test_wrong_shape")
    def wrong_shape(x):
        return Advantages(x.scores)  # [B], not [B, N]

    @advantage_estimator("test_undeclared_number")
    def undeclared(x):
        return Advantages(x.mask * x.numbers["temperaturee"])

    @policy_loss("test_python_control_flow")
    def python_control_flow(x):
        if x.advantages[0, 0] > 0:  # Python `if` on a traced value
            return jnp.sum(x.logprobs), {}
        return -jnp.sum(x.logprobs), {}

    @policy_loss("test_vector_loss")
    def vector_loss(x):
        return jnp.sum(x.logprobs, axis=1), {}

    cases = [
        (
            dict(advantage_estimator="test_wrong_shape"),
            r"test_wrong_shape.*advantages must have shape \(32, 8\).*got shape \(32,\)",
        ),
        (
            dict(advantage_estimator="test_undeclared_number"),
            r"reads the number 'temperaturee', which it does not declare.*did you mean 'temperature'",
        ),
        (
            dict(policy_loss="test_python_control_flow"),
            r"test_python_control_flow.*failed to trace: .*pure JAX function.*docs/extending.md",
        ),
        (dict(policy_loss="test_vector_loss"), r"test_vector_loss.*the loss must be a scalar, got shape \(32,\)"),
    ]
    for changes, message in cases:
        with pytest.raises(PluginError, match=message):
            PPO(_bad_config(**changes), model, target_fraction_reward)


# ----------------------------------------------------------------------------------------------
# New built-ins against float64 NumPy


def _masked_mean(x, m):
    return float(np.sum(x * m) / max(np.sum(m), 1))


def _aggregate(loss, mask, agg):
    if agg == "token-mean":
        return _masked_mean(loss, mask)
    counts = mask.sum(-1)
    per_row = (loss * mask).sum(-1)
    if agg == "seq-mean-token-mean":
        per_row = per_row / np.maximum(counts, 1)
    rows = counts > 0
    return float(per_row[rows].mean()) if rows.any() else 0.0


def _inputs(seed=0, B=6, T=5):
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.5, 0.5, (B, T))
    new = old + rng.normal(0, 0.3, (B, T))
    adv = rng.normal(0, 1, (B, T))
    mask = (rng.random((B, T)) < 0.8).astype(np.float64)
    mask[0] = 0  # an empty row
    mask[1] = 0
    mask[1, [1, 2, 4]] = 1  # a non-prefix (action) mask
    return new, old, adv, mask


def _finite_difference(fn, x, eps=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += eps
        down[index] -= eps
        grad[index] = (fn(up) - fn(down)) / (2 * eps)
    return grad


def _jax_loss_and_grad(fn, new, *args, **kwargs):
    loss_fn = lambda lp: fn(lp, *args, **kwargs)[0]  # noqa: E731
    loss, stats = fn(jnp.asarray(new, jnp.float32), *args, **kwargs)
    grad = jax.grad(loss_fn)(jnp.asarray(new, jnp.float32))
    return float(loss), jax.device_get(stats), np.asarray(grad, np.float64)


def _f32(*arrays):
    return [jnp.asarray(a, jnp.float32) for a in arrays]


def test_cispo_against_numpy():
    new, old, adv, mask = _inputs(1)
    eps_low, eps_high = 0.2, 0.28
    ratio = np.exp(new - old)
    weight = np.clip(ratio, 1 - eps_low, 1 + eps_high)
    loss_ref = _aggregate(-weight * adv * new, mask, "token-mean")
    grad_ref = -weight * adv * mask / mask.sum()  # the weight is a constant: no gradient through it
    loss, stats, grad = _jax_loss_and_grad(surrogates.cispo_policy_loss, new, *_f32(old, adv, mask), eps_low, eps_high)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    np.testing.assert_allclose(grad, grad_ref, atol=1e-6)
    assert float(stats["clipfrac"]) == pytest.approx(_masked_mean((ratio != weight).astype(float), mask), abs=1e-6)


def _ppo_token_loss(new, old, adv, eps_low, eps_high):
    ratio = np.exp(new - old)
    return np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps_low, 1 + eps_high))


def _covariance(adv, new, mask):
    return (adv - _masked_mean(adv, mask)) * (new - _masked_mean(new, mask))


def test_clip_cov_against_numpy():
    """With the budget above the candidate count every candidate is picked (no randomness)."""
    new, old, adv, mask = _inputs(2)
    eps, lb, ub, fraction = 0.2, 0.05, 5.0, 1.0
    ratio = np.exp(new - old)
    clipped_by_ppo = (-adv * np.clip(ratio, 1 - eps, 1 + eps) > -adv * ratio) & (mask > 0)
    cov = _covariance(adv, new, mask)
    picked = (mask > 0) & ~clipped_by_ppo & (cov > lb) & (cov < ub)
    assert 0 < picked.sum() < mask.sum()

    def reference(lp):
        return _aggregate(_ppo_token_loss(lp, old, adv, eps, eps) * (1 - picked), mask, "token-mean")

    loss, stats, grad = _jax_loss_and_grad(
        surrogates.clip_cov_policy_loss, new, *_f32(old, adv, mask), jax.random.PRNGKey(0), eps, eps, fraction, lb, ub
    )
    assert loss == pytest.approx(reference(new), rel=1e-5)
    np.testing.assert_allclose(grad, _finite_difference(reference, new), atol=1e-5)
    assert float(stats["clipfrac"]) == pytest.approx(_masked_mean(picked.astype(float), mask), abs=1e-6)


def test_clip_cov_picks_the_budget_at_random():
    new, old, adv, mask = _inputs(3, B=16, T=8)
    args = (*_f32(new, old, adv, mask),)
    picks, losses = [], []
    for seed in range(2):
        loss, stats = surrogates.clip_cov_policy_loss(*args, jax.random.PRNGKey(seed), 0.2, 0.2, 0.05, -10.0, 10.0)
        picks.append(float(stats["clipfrac"]) * mask.sum())
        losses.append(float(loss))
    budget = max(np.floor(0.05 * mask.sum()), 1)
    assert picks[0] == pytest.approx(budget, abs=1e-3) and picks[1] == pytest.approx(budget, abs=1e-3)
    assert losses[0] != losses[1]  # other keys pick other tokens


def test_kl_cov_against_numpy():
    new, old, adv, mask = _inputs(4)
    fraction, coef = 0.2, 0.5
    cov = np.where(mask > 0, _covariance(adv, new, mask), -np.inf)
    k = max(int(np.floor(fraction * mask.sum())), 1)
    top = np.zeros_like(mask, bool)
    top[np.unravel_index(np.argsort(-cov, axis=None)[:k], cov.shape)] = True

    def reference(lp):
        ratio = np.exp(lp - old)
        return _aggregate(-adv * ratio + np.where(top, coef * np.abs(lp - old), 0), mask, "token-mean")

    loss, stats, grad = _jax_loss_and_grad(surrogates.kl_cov_policy_loss, new, *_f32(old, adv, mask), fraction, coef)
    assert loss == pytest.approx(reference(new), rel=1e-5)
    np.testing.assert_allclose(grad, _finite_difference(reference, new), atol=1e-5)
    assert float(stats["kl_cov_fraction"]) == pytest.approx(k / mask.sum(), abs=1e-6)


def test_gmpo_against_numpy():
    new, old, adv_tokens, mask = _inputs(5)
    adv = np.repeat(adv_tokens[:, :1], adv_tokens.shape[1], axis=1)  # one advantage per response
    eps_low, eps_high = 0.15, 0.25

    def reference(lp):
        log_ratio = lp - old
        clipped = np.clip(log_ratio, -eps_low, eps_high)
        sign = np.sign(adv)
        pessimistic = sign * np.minimum(sign * log_ratio, sign * clipped)
        counts = mask.sum(-1)
        rows = counts > 0
        seq_ratio = np.exp((pessimistic * mask).sum(-1)[rows] / counts[rows])
        seq_adv = (adv * mask).sum(-1)[rows] / counts[rows]
        return float(np.mean(-seq_adv * seq_ratio))

    loss, _, grad = _jax_loss_and_grad(surrogates.gmpo_policy_loss, new, *_f32(old, adv, mask), eps_low, eps_high)
    assert loss == pytest.approx(reference(new), rel=1e-5)
    np.testing.assert_allclose(grad, _finite_difference(reference, new), atol=1e-5)


def test_sapo_against_numpy():
    new, old, adv, mask = _inputs(6)
    tau_pos, tau_neg = 1.0, 1.05

    def reference(lp):
        ratio = np.exp(lp - old)
        tau = np.where(adv > 0, tau_pos, tau_neg)
        gate = 4.0 / tau / (1.0 + np.exp(-tau * (ratio - 1.0)))
        return _aggregate(-gate * adv, mask, "seq-mean-token-mean")

    loss, _, grad = _jax_loss_and_grad(surrogates.sapo_policy_loss, new, *_f32(old, adv, mask), tau_pos, tau_neg)
    assert loss == pytest.approx(reference(new), rel=1e-5)
    np.testing.assert_allclose(grad, _finite_difference(reference, new), atol=1e-5)
    # At r = 1 SAPO's gradient is PPO's: -A per token (before aggregation).
    _, _, grad_at_one = _jax_loss_and_grad(surrogates.sapo_policy_loss, old, *_f32(old, adv, mask), tau_pos, tau_neg)
    counts = mask.sum(-1, keepdims=True)
    rows = (mask.sum(-1) > 0).sum()
    np.testing.assert_allclose(grad_at_one, -adv * mask / np.maximum(counts, 1) / rows, atol=1e-6)


def test_opo_gpg_and_passk_against_numpy():
    scores = np.array([1.0, 0.0, 0.5, 0.0, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 1.0, 3.0])
    lengths = np.array([4, 2, 3, 1, 5, 5, 1, 2, 6, 2, 2, 3], np.float64)
    G = 4
    s, L = scores.reshape(-1, G), lengths.reshape(-1, G)
    opo_ref = s - (L * s).sum(-1, keepdims=True) / L.sum(-1, keepdims=True)
    opo_ref[1] = 0  # an all-equal group
    np.testing.assert_allclose(
        groups.opo_advantages(jnp.asarray(scores), jnp.asarray(lengths), G), opo_ref.ravel(), atol=1e-6
    )

    alpha = scores.size / np.count_nonzero(scores)
    gpg_ref = alpha * (s - s.mean(-1, keepdims=True)) / 2.0
    gpg_ref[1] = 0
    np.testing.assert_allclose(groups.gpg_advantages(jnp.asarray(scores), G, 2.0), gpg_ref.ravel(), atol=1e-6)

    passk_ref = np.zeros_like(s)
    for p in range(s.shape[0]):
        best = int(np.argmax(s[p]))
        top2 = np.sort(s[p])[::-1][:2]
        passk_ref[p, best] = (top2[0] - top2[1]) / (np.std(s[p], ddof=1) + 1e-6)
    np.testing.assert_allclose(groups.grpo_passk_advantages(jnp.asarray(scores), G), passk_ref.ravel(), atol=1e-6)
    assert passk_ref[2].tolist() == [0, 0, 0, 0]  # the two best tie: no advantage


def test_new_builtins_are_finite_on_an_all_empty_batch():
    zeros = jnp.zeros((3, 4), jnp.float32)
    for fn, extra in (
        (surrogates.cispo_policy_loss, ()),
        (surrogates.clip_cov_policy_loss, (jax.random.PRNGKey(0),)),
        (surrogates.kl_cov_policy_loss, ()),
        (surrogates.gmpo_policy_loss, ()),
        (surrogates.sapo_policy_loss, ()),
    ):
        loss, stats = fn(zeros, zeros, zeros, zeros, *extra)
        chex.assert_tree_all_finite((loss, stats))
