"""experiments/steer_smollm.py end to end on tiny random models, and the style-reward bridge.

The tiny run needs neither the 98 MB SmolLM2 file nor MiniLM: a random 2-layer Llama is written as a
GGUF file (with the byte-level BPE tokenizer of tests/test_gguf.py) and a random 2-layer BERT as an
HF directory; the script's code path (chat prompts, the kl_coef runs as one sweep with host scoring
of every run's texts, evaluation, plot, summary) runs on them.
"""

import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from test_gguf import Q, _hf_model, _write_gguf  # noqa: E402  (the tiny-GGUF writer helpers)

from jaxrlhf.models.bert import load_bert_encoder  # noqa: E402
from tasks.style_reward import StyleReward, decode_responses, distinct_n  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import steer_smollm  # noqa: E402

_WORDS = ["happy", "sad", "cheerful", "gloomy", "reply", "a", "the", "cat", "dog", "is", "very", "!", ",", "."]


def _tiny_bert_dir(path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _WORDS
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(path / "vocab.txt")).save_pretrained(str(path))
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).eval().save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("steer")
    gguf_path = root / "tiny-llama.gguf"
    model = _hf_model("llama", tie=True)
    _write_gguf(gguf_path, "llama", {k: v.detach().numpy() for k, v in model.state_dict().items()}, True, Q.F32)
    bert = root / "bert"
    bert.mkdir()
    return root, str(gguf_path), str(_tiny_bert_dir(bert))


@pytest.fixture(scope="module")
def tiny_style(tiny_models):
    return StyleReward(load_bert_encoder(tiny_models[2]), target="a happy reply", contrast="a sad reply", max_length=16)


def test_style_reward_on_hand_made_strings(tiny_style):
    """r = cos(e, target) - cos(e, contrast), computed here independently from unit embeddings."""
    texts = ["a happy reply", "a sad reply", "the cat is very happy !", "", "gloomy dog ."]
    scores = tiny_style.score_texts(texts)
    emb = tiny_style.embed_texts(texts)
    target, contrast = tiny_style.embed_texts(["a happy reply", "a sad reply"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(scores, emb @ target - emb @ contrast, atol=1e-5)
    # The target text itself: cos = 1 with the target; the contrast text: cos = 1 with the contrast.
    assert scores[0] == pytest.approx(1.0 - float(target @ contrast), abs=1e-5)
    assert scores[1] == pytest.approx(float(target @ contrast) - 1.0, abs=1e-5)
    assert np.all(np.isfinite(scores)) and np.all(np.abs(scores) <= 2.0 + 1e-6)
    # As a TextReward function: prompts are ignored.
    np.testing.assert_allclose(tiny_style(["p"] * 5, texts), scores, atol=1e-6)


def test_bridge_retokenizes_policy_tokens(tiny_models, tiny_style):
    """Policy ids -> text (valid tokens only, EOS dropped) -> encoder word pieces -> same score as the text."""
    from jaxrlhf.models.gguf import read_gguf

    policy_tok = read_gguf(tiny_models[1]).tokenizer
    texts = ["the cat is happy", "a sad dog"]
    rows = [policy_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows)) + 3
    eos = policy_tok.eos_token_id
    ids = np.full((2, width), eos, np.int32)
    mask = np.zeros((2, width), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row) + 1] = 1  # the EOS is a valid response token, but not text
    assert decode_responses(policy_tok, ids, mask) == texts
    np.testing.assert_allclose(tiny_style.score_tokens(policy_tok, ids, mask), tiny_style.score_texts(texts), atol=1e-6)
    enc_ids, enc_mask = tiny_style.tokenize(texts)
    assert enc_ids.shape == (2, 16) and enc_mask[0].sum() == 6  # [CLS] the cat is happy [SEP]
    timings = tiny_style.bridge_timings(policy_tok, ids, mask, repeats=2)
    assert set(timings) == {"decode", "tokenize", "encode"} and all(t >= 0 for t in timings.values())


def test_distinct_n():
    assert distinct_n([["a", "b", "a", "b"]], 1) == 0.5
    assert distinct_n([["a", "b", "a", "b"]], 2) == pytest.approx(2 / 3)
    assert distinct_n([["a"], []], 2) == 0.0
    assert distinct_n([["x", "y"], ["x", "z"]], 1) == 0.75


# The default (LoRA adapters on a scanned model, the sampler's log-probs) and every weight trained on
# the per-layer model with recomputed log-probs (the first CPU run's settings).
FULL_WEIGHTS = dict(lora_rank=None, scan_layers=False, old_logprobs_from_sampler=False)


@pytest.mark.slow
@pytest.mark.parametrize("training", [{}, FULL_WEIGHTS], ids=["lora", "full"])
def test_tiny_end_to_end_run(tiny_models, tmp_path, training):
    root, policy_path, encoder_path = tiny_models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"request number {i}" for i in range(12)) + "\n")
    config = steer_smollm.Config(
        out_dir=str(tmp_path / "run"),
        policy_path=policy_path,
        encoder_path=encoder_path,
        prompts_file=str(prompts),
        system_prompt="be brief",
        num_eval_prompts=4,
        kl_coefs=(0.0, 0.1),
        steps=2,
        batch_size=4,
        minibatch_size=2,
        ppo_epochs=1,
        max_new_tokens=5,
        learning_rate=1e-3,
        encoder_max_length=16,
        num_samples_shown=1,
        progress=False,
        **training,
    )
    summary = steer_smollm.main(config)

    out = tmp_path / "run"
    for name in (
        "config.json",
        "summary.json",
        "steer_smollm.png",
        "sweep/run_0/metrics.jsonl",
        "sweep/run_1/metrics.jsonl",
        "sweep/sweep_summary.json",
    ):
        assert (out / name).is_file(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "sweep" / "run_1"))
    lines = (out / "sweep" / "run_1" / "metrics.jsonl").read_text().splitlines()  # kl_coef 0.1
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [0, 1]
    assert records[0]["kl_coef"] == pytest.approx(0.1) and records[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    for key in ("score", "kl", "distinct_1", "distinct_2", "step_time", "tokens_per_s"):
        assert all(np.isfinite(r[key]) for r in records), key

    saved = json.loads((out / "summary.json").read_text())
    assert saved["num_train_prompts"] == 8 and len(saved["samples"]) == 4
    assert set(saved["runs"]) == {"kl_0", "kl_0.1"}
    for run in saved["runs"].values():
        after = run["after"]
        for key in ("reward", "kl", "ref_logprob_per_token", "distinct_1", "distinct_2"):
            assert np.isfinite(after[key]), key
    assert set(saved["bridge_cost_s_per_batch"]) == {"decode", "tokenize", "encode"}
    assert {"prompt", "before", "kl_0", "kl_0.1"} <= set(saved["samples"][0])
    # Before training the policy is the reference: its samples have KL 0 to it.
    assert saved["before"]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert summary["prompt_width"] % 8 == 0


def test_full_preset_and_eval_batch_check():
    full = steer_smollm.resolve(steer_smollm.Config(full=True, steps=7))
    assert full.batch_size == 64 and full.steps == 7 and not full.shared_trunk
    with pytest.raises(ValueError, match="multiple of batch_size"):
        steer_smollm.resolve(steer_smollm.Config(num_eval_prompts=5))


@pytest.mark.slow
@pytest.mark.parametrize(
    "sweep,variants",
    [(False, ("full_unrolled", "lora_scan_lp")), (True, ("lora_scan_lp",))],
    ids=["one_run", "sweep"],
)
def test_steer_step_benchmark_runs(tiny_models, sweep, variants):
    """benchmarks/steer_step.py --quick on the tiny models: the baseline and the default variant build,
    compile and step as one run, and the default as the experiment's sweep of kl_coefs."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "steer_step.py")
    spec = importlib.util.spec_from_file_location("steer_step", path)
    steer_step = importlib.util.module_from_spec(spec)
    sys.modules["steer_step"] = steer_step
    spec.loader.exec_module(steer_step)
    _, policy_path, encoder_path = tiny_models
    args = steer_step.Args(
        quick=True, policy_path=policy_path, encoder_path=encoder_path, sweep=sweep, variants=variants
    )
    result = steer_step.main(args)
    assert set(result["speedup"]) == set(variants)
    assert result["speedup"][variants[0]] == pytest.approx(1.0)
    assert result["sweep_runs"] == (3 if sweep else 1)
    assert all(result["gflop"][v] > 0 for v in variants)
    for medians in result["median_s"].values():
        assert all(np.isfinite(v) and v > 0 for v in medians.values())


def test_policy_as_trained_applies_lora_and_layer_scan(tiny_models):
    from jaxrlhf.models import load_pretrained

    pretrained = load_pretrained(tiny_models[1])
    fast = steer_smollm.policy_as_trained(pretrained, steer_smollm.Config())
    assert fast.config.lora is not None and fast.config.lora.rank == 16 and fast.config.scan_layers
    assert "layers" in fast.params and "layer_0" not in fast.params  # stacked base, the same weights
    full = steer_smollm.policy_as_trained(pretrained, steer_smollm.Config(**FULL_WEIGHTS))
    assert full.config.lora is None and not full.config.scan_layers and full.params is pretrained.params
