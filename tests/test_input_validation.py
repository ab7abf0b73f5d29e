"""Bad input to the sampler and the loaders fails early with an error naming the argument, row and value.

Each case here was accepted silently before (wrong samples, a never-stopping EOS, clamped positions,
a tokenizer quietly None, a bare JSONDecodeError, "directory does not exist" for a hub id). The
sampling checks run on concrete values before tracing, so most tests below compile nothing; the
few that run `generate` use a one-layer model and a few tokens.
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

import jaxrlhf
from jaxrlhf.models import CheckpointError, save_pretrained
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.lm import LanguageModel
from jaxrlhf.sampling import check_prompts, generate, make_sampler

VOCAB = 32
MAX_POSITIONS = 16


def _config(positions: str = "learned") -> ModelConfig:
    """One layer of width 16: a GPT-2 with learned positions, or a llama with rope."""
    return tiny_config(
        "gpt2" if positions == "learned" else "llama",
        vocab_size=VOCAB,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        intermediate_size=32,
        max_position_embeddings=MAX_POSITIONS,
        eos_token_id=None,
    )


@pytest.fixture(scope="module")
def tiny():
    model = LanguageModel(_config())
    return model, model.init_params(jax.random.key(0))


def _prompts(batch=3, width=5):
    ids = np.arange(1, batch * width + 1, dtype=np.int32).reshape(batch, width) % (VOCAB - 1) + 1
    mask = np.ones((batch, width), np.int32)
    mask[1, :2] = 0  # row 1 left-padded
    return ids * mask, mask


def _generate(model, params, ids, mask, **options):
    options = {"max_new_tokens": 2, **options}
    return generate(model, params, ids, mask, jax.random.key(0), **options)


# ----------------------------------------------------------------------------------------------
# generate: sampling arguments


@pytest.mark.parametrize("temperature", [-1.0, -1e-6, float("nan"), float("inf"), np.float32(-0.5), jnp.asarray(-2.0)])
def test_bad_temperature(tiny, temperature):
    with pytest.raises(ValueError, match=r"generate: temperature must be a finite number >= 0 .* got"):
        _generate(*tiny, *_prompts(), temperature=temperature)


@pytest.mark.parametrize("eos", [VOCAB, VOCAB + 100, -1, (3, VOCAB), [VOCAB + 1]])
def test_eos_outside_vocabulary(tiny, eos):
    with pytest.raises(ValueError, match=r"eos_token_id -?\d+ is outside the vocabulary \[0, 32\).*never stop"):
        _generate(*tiny, *_prompts(), eos_token_id=eos)


def test_eos_and_pad_must_be_integers(tiny):
    with pytest.raises(ValueError, match=r"eos_token_id must be an integer, got 2.5"):
        _generate(*tiny, *_prompts(), eos_token_id=2.5)
    with pytest.raises(ValueError, match=r"pad_token_id -1 is outside the vocabulary \[0, 32\)"):
        _generate(*tiny, *_prompts(), pad_token_id=-1)


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.5, float("nan")])
def test_bad_top_p(tiny, top_p):
    with pytest.raises(ValueError, match=r"generate: top_p must be in \(0, 1\] \(1 = off\), got"):
        _generate(*tiny, *_prompts(), top_p=top_p)


def test_bad_top_k(tiny):
    for k in (-1, 0):  # None, not 0, turns top-k off
        with pytest.raises(ValueError, match=rf"generate: top_k must be None \(off\) or >= 1, got {k}"):
            _generate(*tiny, *_prompts(), top_k=k)
    with pytest.raises(ValueError, match=r"generate: top_k must be an integer, got 2.0"):
        _generate(*tiny, *_prompts(), top_k=2.0)


def test_bad_max_new_tokens(tiny):
    with pytest.raises(ValueError, match=r"generate: max_new_tokens must be >= 1, got 0"):
        _generate(*tiny, *_prompts(), max_new_tokens=0)


# ----------------------------------------------------------------------------------------------
# generate: prompts


def test_all_zero_mask_row_names_the_row(tiny):
    ids, mask = _prompts()
    mask[2] = 0
    ids[2] = 0
    with pytest.raises(ValueError, match=r"prompt_mask row 2 is all zeros, an empty prompt \(1 such rows\)"):
        _generate(*tiny, ids, mask)
    # Concrete jax arrays are checked too (outside a trace).
    with pytest.raises(ValueError, match=r"prompt_mask row 2 is all zeros"):
        _generate(*tiny, jnp.asarray(ids), jnp.asarray(mask))


@pytest.mark.parametrize("bad_id", [-1, VOCAB, VOCAB + 7])
def test_ids_outside_vocabulary_name_row_column_value(tiny, bad_id):
    ids, mask = _prompts()
    ids[1, 3] = bad_id
    with pytest.raises(ValueError, match=rf"prompt_ids row 1, column 3 is {bad_id}, outside the vocabulary \[0, 32\)"):
        _generate(*tiny, ids, mask)


def test_padding_ids_are_checked_too(tiny):
    ids, mask = _prompts()
    ids[1, 0] = -100  # under mask 0
    with pytest.raises(ValueError, match=r"row 1, column 0 is -100.*padding must be a valid id"):
        _generate(*tiny, ids, mask)


def test_float_ids_are_rejected(tiny):
    ids, mask = _prompts()
    with pytest.raises(ValueError, match=r"prompt_ids must be an integer array, got dtype float32"):
        _generate(*tiny, ids.astype(np.float32) + 0.5, mask)


@pytest.mark.parametrize("mask_shape", [(2, 5), (3, 4), (3,)])
def test_ids_and_mask_shapes_must_match(tiny, mask_shape):
    ids, _ = _prompts()
    with pytest.raises(ValueError, match=r"prompt_ids and prompt_mask must have the same shape, got \(3, 5\)"):
        _generate(*tiny, ids, np.ones(mask_shape, np.int32))


def test_mask_values_and_left_padding(tiny):
    ids, mask = _prompts()
    bad = mask.copy()
    bad[0, 1] = 2
    with pytest.raises(ValueError, match=r"prompt_mask must hold only 0 and 1; row 0, column 1 is 2"):
        _generate(*tiny, ids, bad)
    right_padded = mask.copy()
    right_padded[2] = [1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match=r"prompt_mask row 2 is 0 in the last column .* left-padded"):
        _generate(*tiny, ids, right_padded)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_prompt_plus_new_tokens_longer_than_position_table(positions):
    model = LanguageModel(_config(positions))
    ids = np.ones((2, 10), np.int32)
    mask = np.ones((2, 10), np.int32)
    mask[0, :6] = 0  # row 1 is the longest: 10 tokens
    with pytest.raises(
        ValueError,
        match=r"prompt row 1 has 10 tokens; with max_new_tokens=7 prompt and response "
        r"need 17 positions, more than the model's max_position_embeddings=16",
    ):
        generate(model, None, ids, mask, jax.random.key(0), max_new_tokens=7)


def test_position_check_counts_real_tokens_not_padding(tiny):
    """A wide, mostly padded batch fits when its longest real prompt plus the response does."""
    model, params = tiny
    ids = np.ones((2, 14), np.int32)
    mask = np.zeros((2, 14), np.int32)
    mask[:, -4:] = 1  # 4 real tokens + 6 new = 10 <= 16, although 14 + 6 > 16
    check_prompts(ids, mask, vocab_size=VOCAB, max_new_tokens=6, max_positions=MAX_POSITIONS)
    with pytest.raises(ValueError, match="prompt row 0 has 4 tokens"):
        check_prompts(ids, mask, vocab_size=VOCAB, max_new_tokens=13, max_positions=MAX_POSITIONS)


def test_valid_arguments_still_sample(tiny):
    """The documented "off" values (top_k = None, top_p = 1) and limits (top_k >= V, eos = V - 1) run."""
    model, params = tiny
    ids, mask = _prompts()
    out = _generate(
        model,
        params,
        ids,
        mask.astype(bool),
        temperature=0.7,
        top_k=VOCAB + 5,
        top_p=1.0,
        eos_token_id=(VOCAB - 1, 0),
        pad_token_id=VOCAB - 1,
        max_new_tokens=3,
    )
    assert out.tokens.shape == (3, 3)
    assert np.all((np.asarray(out.tokens) >= 0) & (np.asarray(out.tokens) < VOCAB))


def test_traced_values_are_not_checked_inside_jit(tiny):
    """Under the caller's jit (as in the PPO step) traced prompts and temperature pass untouched;
    shapes and static arguments are still checked at trace time."""
    model, params = tiny
    ids, mask = _prompts()

    @jax.jit
    def rollout(params, ids, mask, temperature):
        return generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=2, temperature=temperature)

    out = rollout(params, ids, mask, 1.0)
    assert out.tokens.shape == (3, 2)
    # A traced all-zero mask row can not be seen at trace time: documented, not an error.
    empty = mask.copy()
    empty[0] = 0
    rollout(params, ids, empty, 1.0)
    with pytest.raises(ValueError, match="must have the same shape"):
        rollout(params, ids, mask[:2], 1.0)
    with pytest.raises(ValueError, match="integer array"):
        rollout(params, ids.astype(np.float32), mask, 1.0)


# ----------------------------------------------------------------------------------------------
# Sampler


def test_sampler_checks_options_at_construction(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"Sampler: temperature must be a finite number >= 0"):
        make_sampler(model, max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match=r"Sampler: top_p must be in \(0, 1\]"):
        make_sampler(model, max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match=r"Sampler: top_k must be None \(off\) or >= 1"):
        make_sampler(model, max_new_tokens=2, top_k=-3)
    with pytest.raises(ValueError, match=r"Sampler: eos_token_id 32 is outside the vocabulary"):
        make_sampler(model, max_new_tokens=2, eos_token_id=VOCAB)


def test_sampler_checks_prompts_before_padding(tiny):
    model, params = tiny
    sampler = make_sampler(model, max_new_tokens=2, prompt_buckets=(8,))
    ids, mask = _prompts()
    empty = mask.copy()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"Sampler: prompt_mask row 1 is all zeros"):
        sampler(params, ids, empty, jax.random.key(0))
    negative = ids.copy()
    negative[2, 4] = -5
    with pytest.raises(ValueError, match=r"Sampler: prompt_ids row 2, column 4 is -5"):
        sampler(params, negative, mask, jax.random.key(0))
    with pytest.raises(ValueError, match=r"Sampler: prompt_ids must be an integer array"):
        sampler(params, ids + 0.7, mask, jax.random.key(0))  # left_pad would truncate them
    with pytest.raises(ValueError, match=r"Sampler: prompt_ids and prompt_mask must have the same shape"):
        sampler(params, ids, mask[:2], jax.random.key(0))
    long_sampler = make_sampler(model, max_new_tokens=12, prompt_buckets=(8,))
    with pytest.raises(ValueError, match=r"Sampler: prompt row 0 has 5 tokens; with max_new_tokens=12"):
        long_sampler(params, ids, mask, jax.random.key(0))
    assert sampler.trace_count == 0 and long_sampler.trace_count == 0


def test_sampler_bucket_padding_does_not_count_against_the_position_table(tiny):
    model, params = tiny
    sampler = make_sampler(model, max_new_tokens=8, prompt_buckets=(16,))  # 16 + 8 > 16 slots of padding
    ids, mask = _prompts()  # at most 5 real tokens: 5 + 8 <= 16
    out = sampler(params, ids, mask, jax.random.key(0))
    assert out.tokens.shape == (3, 8)


# ----------------------------------------------------------------------------------------------
# Loading


@pytest.fixture(scope="module")
def checkpoint_dir(tiny, tmp_path_factory):
    model, params = tiny
    directory = tmp_path_factory.mktemp("ckpt")
    save_pretrained(str(directory), model, params)
    return directory


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_tokenizer_warns_naming_the_directory(checkpoint_dir):
    with pytest.warns(UserWarning, match=rf"{checkpoint_dir}.* holds no tokenizer files .*tokenizer=None"):
        pretrained = jaxrlhf.load_pretrained(str(checkpoint_dir))
    assert pretrained.tokenizer is None


def test_corrupt_tokenizer_json_names_the_file(checkpoint_dir, tmp_path):
    pytest.importorskip("transformers")
    from jaxrlhf.tokenizers import char_tokenizer

    directory = _copy(checkpoint_dir, tmp_path / "c")
    char_tokenizer("abc").save_pretrained(str(directory))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tokenizer is present: no warning
        assert jaxrlhf.load_pretrained(str(directory)).tokenizer is not None
    (directory / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    with pytest.raises(CheckpointError, match=r"tokenizer file .*c/tokenizer\.json is not valid JSON"):
        jaxrlhf.load_pretrained(str(directory))
    (directory / "tokenizer.json").unlink()
    (directory / "tokenizer_config.json").write_text("not json")
    with pytest.raises(CheckpointError, match=r"tokenizer file .*c/tokenizer_config\.json is not valid JSON"):
        jaxrlhf.load_pretrained(str(directory))


def test_unloadable_tokenizer_names_the_directory(checkpoint_dir, tmp_path):
    pytest.importorskip("transformers")
    directory = _copy(checkpoint_dir, tmp_path / "c")
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchTokenizerClass"}))
    with pytest.raises(CheckpointError, match=r"cannot load the tokenizer in .*c"):
        jaxrlhf.load_pretrained(str(directory))


@pytest.mark.parametrize("hub_id", ["gpt2", "Qwen/Qwen2.5-0.5B", "HuggingFaceTB/SmolLM2-135M"])
def test_hub_id_offline_and_not_cached_says_how_to_fix(hub_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so that no local directory of that name exists
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # hub ids resolve through huggingface_hub: no network here
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(
        CheckpointError,
        match=rf"{hub_id!r} is not a local directory and looks like a Hugging "
        r"Face Hub id.*snapshot_download",
    ):
        jaxrlhf.load_pretrained(hub_id)


def test_missing_local_path_and_file_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint directory .*nowhere does not exist"):
        jaxrlhf.load_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match=r"checkpoint directory \./nowhere does not exist"):
        jaxrlhf.load_pretrained("./nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"file is not a directory"):
        jaxrlhf.load_pretrained(str(tmp_path / "file"))
