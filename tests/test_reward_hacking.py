"""The synthetic language's true reward on hand-made sentences, and a tiny end-to-end run of
experiments/reward_hacking.py (SFT -> reward model -> PPO at two KL coefficients)."""

import importlib.util
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tasks import synthetic_language as lang

# (sentence, well formed, true score)
HAND_MADE = [
    ("the cat sees a dog .", True, 0.0),
    ("the good great cat sees a dog .", True, 2.0),
    ("a bad cat likes the sad cold boy .", True, -3.0),
    ("the good kind cat helps a happy great bird .", True, 4.0),  # the best a sentence can do
    ("the good bad girl finds a dull boy .", True, -1.0),
    ("the good good cat sees a dog .", False, -4.0),  # an adjective repeated back to back
    ("the good great happy cat sees a dog .", False, -4.0),  # three adjectives
    ("the cat sees a dog", False, -4.0),  # no "."
    ("the cat sees a dog . the", False, -4.0),  # words after "."
    ("happy happy happy .", False, -4.0),  # the hacked kind of sentence
    ("the cat a dog .", False, -4.0),  # no verb
    ("cat sees a dog .", False, -4.0),  # no determiner
    ("the good cat sees a good dog .", True, 2.0),  # the same adjective in two phrases is fine
]


def test_true_score_on_hand_made_sentences():
    ids, mask = lang.batch_encode([text for text, _, _ in HAND_MADE], length=14)
    judgement = jax.jit(lang.judge)(ids, mask)
    for (text, well_formed, score), wf, s in zip(HAND_MADE, judgement.well_formed, judgement.score):
        assert bool(wf) == well_formed, text
        assert float(s) == score, text
    # <bos> is optional, and the score does not depend on the padding layout.
    no_bos_ids, no_bos_mask = lang.batch_encode([t for t, _, _ in HAND_MADE], length=14, add_bos=False)
    np.testing.assert_array_equal(lang.true_score(no_bos_ids, no_bos_mask), judgement.score)
    shifted_ids = np.concatenate([np.zeros_like(ids[:, :3]), ids], axis=1)  # left padding changes nothing
    shifted_mask = np.concatenate([np.zeros_like(mask[:, :3]), mask], axis=1)
    np.testing.assert_array_equal(lang.true_score(shifted_ids, shifted_mask), judgement.score)


def test_true_reward_fn_on_prompt_and_response():
    # Prompt "<bos> the" left-padded to 4; responses right-padded, masked after ".".
    prompt_ids = jnp.array([[0, 0, 1, lang.TOKEN_ID["the"]]] * 3)
    prompt_mask = jnp.array([[0, 0, 1, 1]] * 3)
    responses = ["happy cat sees a dog .", "happy happy cat sees a dog .", "cat sees"]
    response_ids, response_mask = lang.batch_encode(responses, length=9, add_bos=False)
    response_ids[0, -1] = lang.TOKEN_ID["bad"]  # a token after EOS with mask 0 is ignored
    scores = jax.jit(lang.true_reward_fn)(prompt_ids, prompt_mask, response_ids, response_mask)
    np.testing.assert_array_equal(scores, [1.0, -4.0, -4.0])
    # An all-zero mask gives a finite score (ill formed).
    empty = lang.true_score(jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 5), jnp.int32))
    np.testing.assert_array_equal(empty, [-4.0, -4.0])


@pytest.mark.slow
def test_reference_distribution_and_pairs():
    num = 2 * 300 + 16  # the round size of preference_pairs(..., 300) below: one compiled sampler
    ids, mask = lang.sample_sentences(jax.random.key(0), num, length=lang.MAX_SENTENCE_LEN)
    assert ids.shape == (num, lang.MAX_SENTENCE_LEN) and ids[:, 0].tolist() == [lang.BOS_ID] * num
    judgement = lang.judge(ids, mask)
    assert bool(jnp.all(judgement.well_formed))  # every reference sentence is well formed
    assert abs(float(jnp.mean(judgement.score))) < 0.2  # sentiment is symmetric: mean 0
    assert float(jnp.max(judgement.score)) <= 4 and float(jnp.min(judgement.score)) >= -4
    lengths = np.asarray(mask.sum(1))
    assert lengths.min() == 7 and lengths.max() == lang.MAX_SENTENCE_LEN
    pairs = lang.preference_pairs(jax.random.key(1), 300)
    assert pairs.chosen_ids.shape == (300, lang.MAX_SENTENCE_LEN)
    chosen = lang.true_score(pairs.chosen_ids, pairs.chosen_mask)
    rejected = lang.true_score(pairs.rejected_ids, pairs.rejected_mask)
    assert bool(jnp.all(chosen > rejected))
    ids, mask = lang.batch_encode(["the cat sees a dog ."], length=9)
    assert lang.decode(ids[0], mask[0]) == "the cat sees a dog ."


def _load_experiment():
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "reward_hacking.py")
    spec = importlib.util.spec_from_file_location("reward_hacking_experiment", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and typing.get_type_hints look the module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_end_to_end_run(tmp_path):
    rh = _load_experiment()
    config = rh.Config(
        out_dir=str(tmp_path / "run"),
        policy_width=16,
        policy_layers=1,
        sft_examples=256,
        sft_steps=20,
        sft_batch_size=32,
        rm_width=16,
        rm_pairs=64,
        rm_eval_pairs=64,
        rm_steps=10,
        rm_batch_size=32,
        kl_coefs=(0.0, 0.1),
        ppo_steps=3,
        ppo_batch_size=8,
        ppo_minibatch_size=4,
        ppo_epochs=1,
        eval_every=2,
        eval_batch_size=16,
        num_samples_shown=2,
    )
    summary = rh.main(config)
    out = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "summary.json", "reward_hacking.png", "reward_hacking_steps.png"):
        assert (out / name).is_file(), name
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert set(summary["runs"]) == {"kl_coef=0", "kl_coef=0.1"}
    assert 0.0 <= summary["rm_accuracy"]["held_out"] <= 1.0
    assert [p["true_score"] for p in summary["rm_probes"]][:3] == [4.0, 0.0, -4.0]
    assert all(math.isfinite(p["proxy_score"]) for p in summary["rm_probes"])
    for run in summary["runs"].values():
        for key in ("proxy_score", "true_score", "kl", "well_formed"):
            assert math.isfinite(run[key]), key
        assert -4.0 <= run["true_score"] <= 4.0
        assert len(run["samples"]) == 2 and all(isinstance(s, str) for s in run["samples"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v) for r in records for v in r.values())
    evaluated = [r for r in records if "ppo/kl_coef=0/true_score" in r]
    assert [r["step"] for r in evaluated] == [20 + 10 + 1, 20 + 10 + 2]  # after PPO steps 2 and 3
