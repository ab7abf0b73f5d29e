"""Hub ids through `huggingface_hub.snapshot_download`, on a hand-built cache directory, offline.

The cache has the layout huggingface_hub writes (`models--org--name/refs/<branch>` holding a commit
hash, `snapshots/<hash>/` with the files, optionally `blobs/<sha>` behind symlinks), filled with
checkpoints written by `save_pretrained`. No test touches the network: HF_HUB_OFFLINE=1 throughout.
"""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
import pytest
from conftest import tiny_config

import jaxrlhf
from jaxrlhf.models import CheckpointError, LanguageModel

pytest.importorskip("huggingface_hub")
transformers = pytest.importorskip("transformers")

VOCAB = 32
CFG = tiny_config(
    "llama",
    vocab_size=VOCAB,
    hidden_size=16,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=24,
    max_position_embeddings=32,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
REPO = "tiny-org/tiny-llama"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


def _checkpoint(directory, seed):
    model = LanguageModel(CFG)
    params = model.init_params(jax.random.key(seed))
    jaxrlhf.save_pretrained(str(directory), model, params, tokenizer=_tokenizer())
    return params


def _add_snapshot(cache, repo, commit, source, refs=(), blobs=False):
    """Puts the files of `source` into `cache` as huggingface_hub would have downloaded them."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in sorted(os.listdir(source)):
        data = (source / name).read_bytes()
        if blobs:  # the real layout: content-addressed blobs, relative symlinks from the snapshot
            blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            blob.write_bytes(data)
            os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
        else:
            (snapshot / name).write_bytes(data)
    (repo_dir / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)  # no trailing newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two checkpoint directories (different weights) and their params."""
    root = tmp_path_factory.mktemp("sources")
    return {name: (root / name, _checkpoint(root / name, seed)) for name, seed in (("a", 0), ("b", 1))}


@pytest.fixture
def cache(tmp_path, sources):
    """A cache with `main` -> commit A (blob symlinks) and tag `v2` -> commit B (plain files)."""
    cache = tmp_path / "hub_cache"
    _add_snapshot(cache, REPO, COMMIT_A, sources["a"][0], refs=("main",), blobs=True)
    _add_snapshot(cache, REPO, COMMIT_B, sources["b"][0], refs=("v2",))
    return cache


def _same(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_hub_id_loads_from_cache_dir(cache, sources):
    path, params = sources["a"]
    pre = jaxrlhf.load_pretrained(REPO, cache_dir=str(cache))
    direct = jaxrlhf.load_pretrained(str(path))
    assert pre.config == direct.config
    _same(pre.params, direct.params)
    _same(pre.params, params)
    assert pre.tokenizer is not None and pre.tokenizer("w1 w2")["input_ids"] == [5, 6]


def test_hub_id_honours_hf_hub_cache(cache, sources, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    _same(jaxrlhf.load_pretrained(REPO).params, sources["a"][1])


def test_revisions(cache, sources):
    _same(jaxrlhf.load_pretrained(REPO, revision="v2", cache_dir=cache).params, sources["b"][1])  # a tag
    _same(jaxrlhf.load_pretrained(REPO, revision=COMMIT_B, cache_dir=cache).params, sources["b"][1])  # a commit
    _same(jaxrlhf.load_pretrained(REPO, revision="main", cache_dir=cache).params, sources["a"][1])


def test_hub_id_with_scanned_layers_and_dtype(cache, sources):
    import jax.numpy as jnp

    pre = jaxrlhf.load_pretrained(REPO, cache_dir=cache, scan_layers=True, dtype=jnp.bfloat16)
    assert pre.config.scan_layers and pre.config.param_dtype == "bfloat16"
    assert pre.params["layers"]["attn"]["q"]["kernel"].shape == (2, 16, 16)


def test_revision_not_cached_is_a_clear_error(cache):
    with pytest.raises(CheckpointError) as info:
        jaxrlhf.load_pretrained(REPO, revision="v3", cache_dir=cache)
    message = str(info.value)
    for part in (
        repr(REPO),
        "revision 'v3'",
        str(cache),
        "HF_HUB_OFFLINE=1",
        "hf download tiny-org/tiny-llama --revision v3",
        "snapshot_download",
    ):
        assert part in message, (part, message)
    with pytest.raises(CheckpointError, match=f"revision '{'c' * 40}' is not in the Hugging Face cache"):
        jaxrlhf.load_pretrained(REPO, revision="c" * 40, cache_dir=cache)


def test_nothing_cached_is_a_clear_error(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    monkeypatch.chdir(tmp_path)  # no local directory of that name
    with pytest.raises(CheckpointError) as info:
        jaxrlhf.load_pretrained("other-org/absent", cache_dir=empty)
    message = str(info.value)
    assert "'other-org/absent' is not a local directory and looks like a Hugging Face Hub id" in message
    assert str(empty) in message and "revision 'main'" in message and "unset HF_HUB_OFFLINE" in message
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    with pytest.raises(
        CheckpointError,
        match=r"'gpt2' is not a local directory.*not in the Hugging Face cache " + str(empty).replace("/", "."),
    ):
        jaxrlhf.load_pretrained("gpt2")


def test_local_directory_wins_and_revision_needs_a_hub_id(cache, sources, tmp_path, monkeypatch):
    path, params = sources["a"]
    # A local directory spelled like a hub id is a local directory.
    local = tmp_path / "tiny-org" / "tiny-llama"
    local.parent.mkdir()
    os.symlink(path, local)
    monkeypatch.chdir(tmp_path)
    _same(jaxrlhf.load_pretrained(REPO, cache_dir=cache / "nowhere").params, params)
    with pytest.raises(ValueError, match="revision='v2' is only for Hub ids"):
        jaxrlhf.load_pretrained(str(path), revision="v2")


def test_hub_id_with_gguf_file(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("torch")
    from test_gguf import Q, _hf_model, _hf_state, _write_gguf

    source = tmp_path / "src"
    source.mkdir()
    _write_gguf(source / "tiny-f32.gguf", "llama", _hf_state(_hf_model("llama", False)), False, Q.F32)
    cache = tmp_path / "hub_cache"
    _add_snapshot(cache, "tiny-org/tiny-gguf", COMMIT_A, source, refs=("main",), blobs=True)
    pre = jaxrlhf.load_pretrained("tiny-org/tiny-gguf", gguf_file="tiny-f32.gguf", cache_dir=cache)
    _same(pre.params, jaxrlhf.load_pretrained(str(source / "tiny-f32.gguf")).params)
    with pytest.raises(CheckpointError, match="missing file .*snapshots.*other.gguf"):
        jaxrlhf.load_pretrained("tiny-org/tiny-gguf", gguf_file="other.gguf", cache_dir=cache)
