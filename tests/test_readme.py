"""The README's "Prototype from scratch" block and docs/models.md's "A model from scratch" run as shown.

The README block loads a real tokenizer by Hub id ("HuggingFaceTB/SmolLM2-135M"). Tests never reach
the Hub, so the id is served from a Hugging Face cache laid out by hand (`models--org--name/refs/main`
-> `snapshots/<commit>/`, HF_HUB_OFFLINE=1): the block's own call, `AutoTokenizer.from_pretrained`
of a Hub id, runs as written, on a stand-in tokenizer saved under that id. (SmolLM2's real tokenizer,
from its GGUF file, is tested in test_gguf_generation.py; converting it takes 30-60 s.)
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import re

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
HUB_ID = "HuggingFaceTB/SmolLM2-135M"


def python_block_after(text: str, heading: str) -> str:
    """The first ```python block of the section that starts at ``heading``."""
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def offline_hub_with_a_tokenizer(tmp_path, monkeypatch):
    """huggingface_hub's cache holding a stand-in tokenizer under HUB_ID; returns its size."""
    snapshot = tmp_path / "hub" / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    from jaxrlhf.tokenizers import char_tokenizer

    tokenizer = char_tokenizer("abcdefghijklmnopqrstuvwxyz ")
    tokenizer.save_pretrained(snapshot)
    # AutoTokenizer reads the model's config.json too (for its type); SmolLM2 is a Llama.
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": len(tokenizer)}))
    import huggingface_hub.constants

    # huggingface_hub reads these at import; transformers looks them up there at call time.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return len(tokenizer)


@pytest.mark.slow
def test_readme_prototype_from_scratch(offline_hub_with_a_tokenizer):
    namespace: dict = {"__name__": "readme_prototype"}
    code = python_block_after((ROOT / "README.md").read_text(), "## Prototype from scratch")
    assert len(code.strip().splitlines()) <= 14  # "all in 10 lines": 10 statements, one wrapped
    exec(compile(code, "README.md[Prototype from scratch]", "exec"), namespace)
    real, policy, models = namespace["real"], namespace["policy"], namespace["models"]
    assert len(real) == offline_hub_with_a_tokenizer and real.decode(real("hello")["input_ids"]) == "hello"
    assert set(models) == {"llama", "qwen2", "qwen3", "mistral"}
    ids = np.asarray(policy.tokenizer(["abc", "hgf"])["input_ids"])
    mask = np.ones_like(ids)
    assert policy.apply(policy.params, ids, mask).shape == (2, 3, len(policy.tokenizer))
    for family, model in models.items():  # each family builds and initialises (traced: no compile)
        assert model.config.model_type == family
        params = jax.eval_shape(model.init_params, jax.random.key(1))
        assert jax.eval_shape(model.apply, params, ids, mask).shape == (2, 3, len(real)), family
    assert models["qwen3"].config.qk_norm and models["qwen2"].config.qkv_bias


@pytest.mark.slow
def test_models_doc_from_scratch_prints_what_it_shows(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "models.md").read_text()
    section = text[text.index("## A model from scratch") :]
    code, expected = re.search(r"```python\n(.*?)```\n\n```text\n(.*?)```", section, re.S).groups()
    monkeypatch.chdir(tmp_path)  # the block writes runs/proto/model
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, "docs/models.md[A model from scratch]", "exec"), {"__name__": "models_doc"})
    assert stdout.getvalue() == expected
    assert (tmp_path / "runs" / "proto" / "model" / "model.safetensors").is_file()


def test_readme_and_docs_commands_name_real_scripts_and_extras():
    """Every `python experiments/x.py` / `benchmarks/x.py` the README and docs/ show exists, and
    every `pip install -e ".[extra]"` names an extra of pyproject.toml (`tensorboard` among them,
    for `tensorboard --logdir runs`)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert "tensorboard" in extras
    pages = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text()
        for script in re.findall(r"python3? ((?:experiments|benchmarks)/[\w/]+\.py)", text):
            assert (ROOT / script).is_file(), f"{page.name}: {script}"
        for names in re.findall(r"pip install (?:-e )?\"?(?:\.|jaxrlhf)\[([\w,]+)\]", text):
            for extra in names.split(","):
                assert extra in extras, f"{page.name}: extra {extra!r}"
