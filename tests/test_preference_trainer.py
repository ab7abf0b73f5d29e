"""Preference trainer: learning on the synthetic language's pairs, 1 vs 8 devices, exact gradient
accumulation, exact resume, precomputed == on-the-fly reference, every loss at the policy = reference
point, bad input, checkpoint mismatch and the exported policy.

Compiles dominate (2 shared CPU cores): the tests share one setup (a 1-layer GPT-2, batch 16 in two
micro-batches, constant learning rate, so `total_steps` changes no program) whose jitted steps are
cached across calls, one module-scoped reference run provides the numbers the others compare to,
and a persistent compilation cache in a temporary directory backs the rest.
"""

import dataclasses
import json
import math
import os

import jax
import numpy as np
import pytest
from conftest import persistent_compilation_cache

from jaxrlhf.metrics_log import read_metrics
from jaxrlhf.models import LanguageModel, gpt2_config
from jaxrlhf.sharding import make_mesh
from jaxrlhf.training.checkpoint import CheckpointMismatchError
from jaxrlhf.training.preference import PRESETS, PreferenceConfig, train_preference
from jaxrlhf.training.preference_data import PreferenceDataError, pairs_from_arrays
from tasks import synthetic_language as sl

NUM_TRAIN, NUM_EVAL = 256, 64
CONFIG = PreferenceConfig.preset(
    "dpo",
    learning_rate=3e-3,
    total_steps=4,
    batch_size=16,
    grad_accum_steps=2,
    max_prompt_len=1,
    max_response_len=sl.MAX_SENTENCE_LEN - 1,
    save_every=2,
    seed=0,
)
QUIET = dict(progress=False, tensorboard=False, mesh=make_mesh())  # all 8 (CPU) devices


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    with persistent_compilation_cache(tmp_path_factory.mktemp("jax_cache")) as cache_dir:
        yield cache_dir


@pytest.fixture(scope="module")
def tiny():
    model = LanguageModel(
        gpt2_config(sl.VOCAB_SIZE, hidden_size=32, num_layers=1, num_heads=2, max_len=16, **sl.SPECIAL_TOKEN_IDS)
    )
    return model, model.init_params(jax.random.PRNGKey(1))


def to_data(c, cm, r, rm):
    """Sentences as prompt = <bos>, response = the rest (with its '.' EOS)."""
    return pairs_from_arrays(
        c[:, :1],
        cm[:, :1],
        c[:, 1:],
        cm[:, 1:],
        r[:, 1:],
        rm[:, 1:],
        max_prompt_len=1,
        max_response_len=sl.MAX_SENTENCE_LEN - 1,
    )


@pytest.fixture(scope="module")
def pairs():
    """Synthetic-language pairs labelled by the true score (more positive adjectives is better)."""
    arrays = [np.asarray(x) for x in sl.preference_pairs(jax.random.PRNGKey(0), NUM_TRAIN + NUM_EVAL)]
    train = to_data(*(a[:NUM_TRAIN] for a in arrays))
    held_out = to_data(*(a[NUM_TRAIN:] for a in arrays))
    return train, held_out, arrays


def host(tree):
    return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


@pytest.fixture(scope="module")
def reference_run(tiny, pairs):
    """CONFIG on all 8 devices without files; keeps the parameters after steps 0 and 1."""
    train, _, _ = pairs
    params_at = {}
    result = train_preference(
        tiny, train, CONFIG, on_step=lambda s, state, _: params_at.__setitem__(s, host(state.params)), **QUIET
    )
    return result, params_at


def assert_trees_close(a, b, rtol, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_presets_and_config_checks():
    assert PRESETS["dpo"]["beta"] == 0.1 and PRESETS["kto"]["beta"] == 0.1 and PRESETS["ipo"]["beta"] == 0.1
    simpo = PreferenceConfig.preset("simpo")
    assert simpo.beta == 2.0 and simpo.simpo_gamma / simpo.beta == 0.5
    assert PreferenceConfig.preset("cdpo").label_smoothing == 0.1
    assert PreferenceConfig.preset("dpo", beta=0.3).beta == 0.3
    for bad, match in [
        (dict(loss="orpo"), "loss"),
        (dict(loss="cdpo"), "label_smoothing"),
        (dict(label_smoothing=0.1), "cdpo"),
        (dict(batch_size=6, grad_accum_steps=4), "multiple"),
        (dict(reference_logprobs="lazy"), "reference_logprobs"),
        (dict(loss="ipo", rpo_alpha=1.0), "rpo_alpha"),
        (dict(beta=0.0), "beta"),
    ]:
        with pytest.raises(ValueError, match=match):
            PreferenceConfig(**bad)
    # numbers change no program: a different beta / learning rate / length has the same structure
    assert CONFIG.structure() == dataclasses.replace(CONFIG, beta=0.5, learning_rate=1.0, total_steps=9).structure()
    assert CONFIG.structure() != dataclasses.replace(CONFIG, grad_accum_steps=1).structure()
    assert CONFIG.structure() == dataclasses.replace(CONFIG, loss="cdpo", label_smoothing=0.2).structure()


@pytest.mark.slow
def test_dpo_raises_held_out_accuracy(tiny, pairs):
    """At the start the policy is the reference (loss log 2, accuracy 1/2 from ties); 12 updates
    on 256 pairs lift the implicit-reward accuracy on 64 held-out pairs well above chance."""
    train, held_out, _ = pairs
    config = dataclasses.replace(CONFIG, total_steps=12)
    result = train_preference(tiny, train, config, eval_data=held_out, eval_every=6, **QUIET)
    first = result.history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["accuracy"] == 0.5
    assert first["learning_rate"] == pytest.approx(3e-3) and first["grad_norm"] > 0
    assert [e["step"] for e in result.evals] == [5, 11]
    final = result.evals[-1]
    assert final["pairs"] == NUM_EVAL and final["accuracy"] >= 0.75, result.evals
    assert final["reward_margin"] > 0 and final["loss"] < math.log(2)
    for row in result.history:
        assert all(math.isfinite(v) for v in row.values())


def test_policy_equal_to_reference_logs_exact_ties_at_step_0():
    """Step 0, policy == reference: every implicit reward is exactly 0, so accuracy is exactly 1/2
    (ties), the margin exactly 0 and the loss log 2, also when the held-out batch size differs from
    the micro-batch (on 8 devices: 2 rows per device against 1). The reference used to be scored in
    batches of ``eval_batch_size``, whose rounding differed from the train step's by ~1e-8 of either
    sign: accuracy 0.53125 here (0.25 in a 4-pair run), not the documented 1/2."""
    rng = np.random.default_rng(0)
    n, prompt, response, vocab = 16, 12, 24, 40
    lengths = lambda low, high: rng.integers(low, high, n)[:, None]  # noqa: E731
    prompt_mask = (np.arange(prompt) >= lengths(0, prompt - 1)).astype(np.int32)  # left-padded
    chosen_mask, rejected_mask = ((np.arange(response) < lengths(1, response)).astype(np.int32) for _ in range(2))
    ids = lambda width: rng.integers(3, vocab, (n, width))  # noqa: E731
    data = pairs_from_arrays(
        ids(prompt), prompt_mask, ids(response), chosen_mask, ids(response), rejected_mask,
        max_prompt_len=prompt, max_response_len=response,
    )  # fmt: skip
    model = LanguageModel(gpt2_config(vocab, hidden_size=16, num_layers=1, num_heads=2, max_len=64))
    config = PreferenceConfig.preset(
        "dpo", total_steps=1, batch_size=16, grad_accum_steps=2, eval_batch_size=16,
        max_prompt_len=prompt, max_response_len=response,
    )  # fmt: skip
    first = train_preference((model, model.init_params(jax.random.PRNGKey(1))), data, config, **QUIET).history[0]
    assert first["accuracy"] == 0.5 and first["reward_margin"] == 0.0
    assert first["chosen_reward"] == 0.0 and first["rejected_reward"] == 0.0
    assert first["pref_loss"] == pytest.approx(math.log(2), rel=1e-7)


@pytest.mark.slow
def test_one_device_equals_eight(tiny, pairs, reference_run):
    train, _, _ = pairs
    reference, params_at = reference_run
    one = train_preference(
        tiny,
        train,
        dataclasses.replace(CONFIG, total_steps=2),
        **{**QUIET, "mesh": make_mesh(devices=jax.devices()[:1])},
    )
    for a, b in zip(one.history, reference.history[:2]):
        for key in ("loss", "accuracy", "reward_margin", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    # atol 1e-5: the key bias has an exactly-zero gradient (softmax ignores it), so its updates are
    # Adam-normalised rounding noise of size ~lr * noise / eps, which differs with the reduction order.
    assert_trees_close(one.params, params_at[1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_gradient_accumulation_is_exact(tiny, pairs, reference_run):
    """One batch of 16 pairs in one micro-batch or in two gives the same loss, gradient and update."""
    train, _, _ = pairs
    reference, params_at = reference_run
    whole = train_preference(tiny, train, dataclasses.replace(CONFIG, total_steps=1, grad_accum_steps=1), **QUIET)
    for key in ("loss", "accuracy", "grad_norm", "reward_margin"):
        assert whole.history[0][key] == pytest.approx(reference.history[0][key], rel=1e-5, abs=1e-6), key
    assert_trees_close(whole.params, params_at[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_reference_precomputed_equals_on_the_fly(tiny, pairs, reference_run):
    train, _, _ = pairs
    reference, params_at = reference_run
    assert reference.data.has_reference  # precomputed once, stored with the data
    fly = train_preference(
        tiny, train, dataclasses.replace(CONFIG, total_steps=2, reference_logprobs="on_the_fly"), **QUIET
    )
    assert not fly.data.has_reference
    for a, b in zip(fly.history, reference.history[:2]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6)
        assert a["reward_margin"] == pytest.approx(b["reward_margin"], rel=1e-5, abs=1e-6)
    assert_trees_close(fly.params, params_at[1], rtol=1e-5, atol=1e-5)


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_exact_resume_after_interruption(tiny, pairs, reference_run, tmp_path):
    """Killed after update 3 (last checkpoint after update 2), rerun: the same 4 updates, bit for
    bit, and each step's metrics row exactly once."""
    train, _, _ = pairs
    reference, _ = reference_run
    out = str(tmp_path / "run")

    def kill(step, state, record):
        if step == 2:
            raise Interrupt

    logged = {**QUIET, "tensorboard": True}
    with pytest.raises(Interrupt):
        train_preference(tiny, train, CONFIG, out, on_step=kill, **logged)
    assert max(int(d) for d in os.listdir(os.path.join(out, "checkpoints")) if d.isdigit()) == 2
    resumed = train_preference(tiny, train, CONFIG, out, **logged)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))
    assert [row["step"] for row in resumed.history] == [2, 3]
    assert int(resumed.state.step) == CONFIG.total_steps
    for x, y in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(reference.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference.history]

    # the exported policy loads back with the final parameters
    from jaxrlhf.models.hf_io import load_pretrained

    with pytest.warns(UserWarning, match="no tokenizer"):  # token-id data: no tokenizer to export
        loaded = load_pretrained(os.path.join(out, "policy"))
    assert_trees_close(loaded.params, reference.params, rtol=0, atol=0)
    # a different configuration refuses to resume from these checkpoints
    with pytest.raises(CheckpointMismatchError, match="beta"):
        train_preference(tiny, train, dataclasses.replace(CONFIG, beta=0.2), out, **QUIET)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["cdpo", "ipo", "simpo", "kto", "dpo+rpo"])
def test_every_loss_at_the_reference_point(tiny, pairs, loss):
    """Step 0 (policy = reference): cDPO log 2, IPO (1 / (2 beta))^2, KTO 1/2 (z0 = 0), SimPO its
    length-only value; then one update, everything finite."""
    train, _, _ = pairs
    name, rpo = (loss.split("+")[0], 1.0) if "+" in loss else (loss, None)
    overrides = {
        k: getattr(CONFIG, k)
        for k in ("learning_rate", "batch_size", "grad_accum_steps", "max_prompt_len", "max_response_len")
    }
    config = PreferenceConfig.preset(name, total_steps=2, rpo_alpha=rpo, **overrides)
    result = train_preference(tiny, train, config, **QUIET)
    first = result.history[0]
    if name in ("cdpo", "dpo"):
        assert first["pref_loss"] == pytest.approx(math.log(2), abs=1e-6)
    if name == "ipo":
        assert first["loss"] == pytest.approx((1 / (2 * config.beta)) ** 2, rel=1e-6)
    if name == "kto":
        assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["kl"] == 0.0
        assert len(result.data) == 2 * NUM_TRAIN  # pairs become desirable + undesirable rows
    if name == "simpo":  # -log sigmoid(beta (mean logp_w - mean logp_l) - gamma): no reference
        assert not result.data.has_reference and first["loss"] > 0
    if rpo:
        assert first["nll_loss"] > 0 and first["loss"] == pytest.approx(
            first["pref_loss"] + first["nll_loss"], rel=1e-5
        )
    for row in result.history:
        assert all(math.isfinite(v) for v in row.values()), row


def test_bad_pairs_are_dropped_not_nan(tiny, pairs):
    """An empty response and a prompt over the limit are counted and dropped; the loss stays finite."""
    _, _, (c, cm, r, rm) = pairs
    c, cm, r, rm = (x[:40].copy() for x in (c, cm, r, rm))
    cm[0, 1:] = 0  # row 0: empty chosen response
    prompt = np.concatenate([c[:, :1], c[:, :1]], axis=1)
    prompt_mask = np.concatenate([cm[:, :1], np.zeros_like(cm[:, :1])], axis=1)
    prompt_mask[1, 1] = 1  # row 1: a 2-token prompt, over max_prompt_len = 1
    r[2], rm[2] = c[2], cm[2]  # row 2: identical pair
    with pytest.warns(UserWarning, match="kept 37 of 40"):
        data = pairs_from_arrays(
            prompt,
            prompt_mask,
            c[:, 1:],
            cm[:, 1:],
            r[:, 1:],
            rm[:, 1:],
            max_prompt_len=1,
            max_response_len=sl.MAX_SENTENCE_LEN - 1,
        )
    assert (data.stats["empty_response"], data.stats["prompt_too_long"], data.stats["identical"]) == (1, 1, 1)
    result = train_preference(tiny, data, dataclasses.replace(CONFIG, total_steps=2), **QUIET)
    assert result.data_stats["kept"] == 37
    assert all(math.isfinite(row["loss"]) for row in result.history)
    with pytest.raises(PreferenceDataError, match="fewer than one batch"):
        train_preference(tiny, data.select(np.arange(8)), CONFIG, **QUIET)
    with pytest.raises(PreferenceDataError, match="wider|max_prompt_len"):
        with pytest.warns(UserWarning):
            wide = pairs_from_arrays(prompt, np.ones_like(prompt), c[:, 1:], cm[:, 1:], r[:, 1:], rm[:, 1:])
        train_preference(tiny, wide, CONFIG, **QUIET)


@pytest.mark.slow
def test_text_pairs_from_jsonl_end_to_end(tmp_path):
    """JSONL text pairs -> tokenizer (with a chat template) -> one update -> the exported policy
    carries the tokenizer; a user evaluate_fn is logged under eval/."""
    from jaxrlhf.models.hf_io import load_pretrained
    from jaxrlhf.tokenizers import char_tokenizer

    tokenizer = char_tokenizer("abcdefghijklmnopq:")  # 4 specials + 18 = 22 ids: the tiny model's vocabulary
    tokenizer.chat_template = (
        "{% for m in messages %}<bos>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}:{% endif %}"
    )
    model = LanguageModel(
        gpt2_config(sl.VOCAB_SIZE, hidden_size=32, num_layers=1, num_heads=2, max_len=16, **sl.SPECIAL_TOKEN_IDS)
    )
    params = model.init_params(jax.random.PRNGKey(2))
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopq")
    rows = [
        {
            "prompt": "".join(rng.choice(letters, 2)),
            "chosen": "a" * int(rng.integers(1, 5)),
            "rejected": "".join(rng.choice(letters[1:], int(rng.integers(1, 5)))),
        }
        for _ in range(20)
    ]
    rows.append({"prompt": "ab", "chosen": "", "rejected": "b"})  # dropped: empty response
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = PreferenceConfig.preset(
        "dpo", learning_rate=1e-3, total_steps=1, batch_size=16, max_prompt_len=4, max_response_len=6
    )
    out = str(tmp_path / "run")
    with pytest.warns(UserWarning, match="empty_response=1"):
        result = train_preference(
            (model, params, tokenizer),
            str(path),
            config,
            out,
            eval_every=1,
            evaluate_fn=lambda step, state: {"probe": 1.5},
            **QUIET,
        )
    assert result.data_stats["kept"] == 20 and result.data.prompt_ids.shape == (20, 4)
    assert result.history[0]["eval/probe"] == 1.5 and math.isfinite(result.history[0]["loss"])
    loaded = load_pretrained(os.path.join(out, "policy"))
    assert loaded.tokenizer is not None and loaded.tokenizer.chat_template == tokenizer.chat_template
