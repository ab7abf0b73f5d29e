"""Sampler tests: exactness against transformers and a full forward pass, filters, EOS, recompiles, mesh.

Tiny random models are built with transformers + torch from configs, saved as HF checkpoints and
loaded with `jaxrlhf.load_pretrained`, so the weights are the same on both sides.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from jax.sharding import Mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxrlhf  # noqa: E402
from jaxrlhf.core.logprobs import token_logprobs  # noqa: E402
from jaxrlhf.sampling import (  # noqa: E402
    SampleOutput,
    bucket_length,
    generate,
    inverse_cdf_sample,
    make_sampler,
    sample_token,
    segment_ends,
    top_k_filter,
    top_p_filter,
)

VOCAB = 96
PAD = 0


def _hf_tiny(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            initializer_range=0.2,
            pad_token_id=PAD,
            eos_token_id=None,
            bos_token_id=None,
        )
        model = transformers.GPT2LMHeadModel(config)
    else:  # Llama with grouped-query attention (4 query heads, 2 key/value heads), untied head
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            initializer_range=0.2,
            tie_word_embeddings=False,
            pad_token_id=PAD,
            eos_token_id=None,
            bos_token_id=None,
        )
        model = transformers.LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model.eval()


def _load_tiny(model_type, tmp_path_factory):
    hf_model = _hf_tiny(model_type)
    directory = tmp_path_factory.mktemp(model_type)
    hf_model.save_pretrained(directory)
    pretrained = jaxrlhf.load_pretrained(str(directory))
    return hf_model, pretrained.model, pretrained.params


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tmp_path_factory):
    """Both families: for the checks against transformers and the full forward."""
    return _load_tiny(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """One family is enough for the statistical, bucketing and multi-device checks (compile time)."""
    return _load_tiny("gpt2", tmp_path_factory)


def _left_padded_prompts(batch=8, width=7, seed=0):
    """`batch` random prompts of lengths between 1 and `width`, left-padded with PAD."""
    rng = np.random.default_rng(seed)
    lengths = np.array([width, width - 3, 2, width - 1, 1, width, 3, width - 2])[:batch].clip(1, width)
    ids = rng.integers(1, VOCAB, size=(batch, width)).astype(np.int32)
    mask = (np.arange(width)[None, :] >= width - lengths[:, None]).astype(np.int32)
    return ids * mask, mask


def _hf_greedy(hf_model, ids, mask, max_new_tokens, eos_token_id=None):
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=eos_token_id,
        )
    new = out[:, ids.shape[1] :].numpy()
    # transformers stops once every row is finished: pad to the full length as we do.
    return np.pad(new, ((0, 0), (0, max_new_tokens - new.shape[1])), constant_values=PAD)


# Compiling is most of the cost of these tests: every test shares the few jitted functions below.
N = 12


@functools.cache
def _jit_generate(model, **options):
    return jax.jit(functools.partial(generate, model, max_new_tokens=N, **options))


def _run(model, params, ids, mask, key, **options):
    return jax.block_until_ready(_jit_generate(model, **options)(params, jnp.asarray(ids), jnp.asarray(mask), key))


@functools.cache
def _jit_apply(model):
    return jax.jit(model.apply)


def _full_forward_logprobs(model, params, ids, mask, out: SampleOutput, temperature):
    """`token_logprobs` of the response under one forward pass over prompt + response."""
    full_ids = jnp.concatenate([jnp.asarray(ids), out.tokens], axis=1)
    full_mask = jnp.concatenate([jnp.asarray(mask), out.mask], axis=1)
    logits = _jit_apply(model)(params, full_ids, full_mask)[:, ids.shape[1] - 1 : -1]
    expected = token_logprobs(logits, out.tokens, temperature)
    return np.where(np.asarray(out.mask) == 1, np.asarray(expected), 0.0)


# ----------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.slow
def test_greedy_matches_transformers_left_padded(tiny):
    hf_model, model, params = tiny
    ids, mask = _left_padded_prompts()
    expected = _hf_greedy(hf_model, ids, mask, N)
    out = _run(model, params, ids, mask, jax.random.key(0), temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    assert np.all(np.asarray(out.mask) == 1)
    # Greedy log-probs are those of softmax(logits) (T = 1), exact through the KV cache.
    np.testing.assert_allclose(
        np.asarray(out.logprobs), _full_forward_logprobs(model, params, ids, mask, out, 1.0), atol=1e-4, rtol=0
    )

    # With an EOS that greedy decoding emits mid-way in row 0: tokens after it are padding.
    eos = int(expected[0, 4])
    expected_eos = _hf_greedy(hf_model, ids, mask, N, eos_token_id=eos)
    out = _run(model, params, ids, mask, jax.random.key(0), temperature=0.0, eos_token_id=eos, pad_token_id=PAD)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected_eos)
    first_eos = np.argmax(expected[0] == eos)
    np.testing.assert_array_equal(np.asarray(out.mask)[0], np.arange(N) <= first_eos)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, 1.0), (0.7, 20, 0.9)])
def test_logprobs_equal_full_forward(tiny, temperature, top_k, top_p):
    _, model, params = tiny
    ids, mask = _left_padded_prompts()
    out = _run(
        model,
        params,
        ids,
        mask,
        jax.random.key(1),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=(5, 7),
    )  # (argument order matters to the shared jit cache)
    expected = _full_forward_logprobs(model, params, ids, mask, out, temperature)
    np.testing.assert_allclose(np.asarray(out.logprobs), expected, atol=1e-4, rtol=0)


SAMPLED = dict(temperature=0.7, top_k=20, top_p=0.9, eos_token_id=(5, 7))  # as in the log-prob test


def test_segment_ends():
    assert segment_ends(64) == (16, 32, 48, 64)
    assert segment_ends(10) == (10,)
    assert segment_ends(40) == (20, 40)
    assert segment_ends(10, 3) == (4, 7, 10)
    assert segment_ends(3, 8) == (1, 2, 3)
    with pytest.raises(ValueError, match="cache_segments"):
        segment_ends(8, 0)


@pytest.mark.slow
def test_cache_segments_change_nothing_but_speed(tiny):
    """Decoding in 3 or N loops with growing caches: same tokens, log-probs still exact."""
    _, model, params = tiny
    ids, mask = _left_padded_prompts()
    one = _run(model, params, ids, mask, jax.random.key(1), **SAMPLED)
    for segments in (3, N):
        out = _run(model, params, ids, mask, jax.random.key(1), **SAMPLED, cache_segments=segments)
        _assert_same_samples(out, one)
        np.testing.assert_allclose(
            np.asarray(out.logprobs),
            _full_forward_logprobs(model, params, ids, mask, out, SAMPLED["temperature"]),
            atol=1e-4,
            rtol=0,
        )
    greedy = _run(model, params, ids, mask, jax.random.key(0), temperature=0.0)
    np.testing.assert_array_equal(
        np.asarray(_run(model, params, ids, mask, jax.random.key(0), temperature=0.0, cache_segments=3).tokens),
        np.asarray(greedy.tokens),
    )


# ----------------------------------------------------------------------------------------------
# Filters and frequencies


def test_top_k_one_equals_greedy(tiny):
    _, model, params = tiny
    ids, mask = _left_padded_prompts()
    greedy = _run(model, params, ids, mask, jax.random.key(0), temperature=0.0)
    top1 = _run(model, params, ids, mask, jax.random.key(3), temperature=1.3, top_k=1)
    np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(greedy.tokens))


def test_top_p_keeps_smallest_set_reaching_p():
    probs = np.array([0.05, 0.4, 0.1, 0.25, 0.2])  # sorted: 0.4, 0.25, 0.2, 0.1, 0.05
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    kept = lambda p: set(np.flatnonzero(np.isfinite(np.asarray(top_p_filter(logits, p)[0]))))  # noqa: E731
    assert kept(0.3) == {1}  # 0.4 >= 0.3 already
    assert kept(0.39) == {1}
    assert kept(0.41) == {1, 3}  # 0.4 < 0.41 needs the next token: 0.65
    assert kept(0.64) == {1, 3}
    assert kept(0.66) == {1, 3, 4}  # 0.85
    assert kept(0.9) == {1, 3, 4, 2}  # 0.95
    assert kept(0.99) == {0, 1, 2, 3, 4}
    assert kept(1.0) == {0, 1, 2, 3, 4}
    assert kept(0.0) == {1}  # the top token always survives
    np.testing.assert_array_equal(
        np.asarray(top_p_filter(logits, jnp.float32(0.5))), np.asarray(top_p_filter(logits, 0.5))
    )
    # Kept logits are unchanged.
    np.testing.assert_array_equal(np.asarray(top_p_filter(logits, 0.5)[0, [1, 3]]), np.asarray(logits[0, [1, 3]]))


def test_top_k_filter():
    logits = jnp.asarray([[0.1, 3.0, -1.0, 2.0, 0.5]])
    assert set(np.flatnonzero(np.isfinite(np.asarray(top_k_filter(logits, 2)[0])))) == {1, 3}
    np.testing.assert_array_equal(np.asarray(top_k_filter(logits, None)), np.asarray(logits))


def _chi_square_pvalue(tokens, probs):
    counts = np.bincount(np.asarray(tokens), minlength=len(probs))
    probs = np.asarray(probs, np.float64) / np.sum(probs, dtype=np.float64)
    expected = probs * counts.sum()
    return scipy.stats.chisquare(counts, expected).pvalue, counts


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.8])
def test_temperature_sampling_matches_softmax_frequencies(temperature):
    logits = np.array([1.0, 0.2, -0.5, 2.0, 0.0, -1.5], np.float32)
    draws = 40_000
    tokens, logprobs = jax.jit(sample_token, static_argnums=(3,))(
        jnp.tile(jnp.asarray(logits), (draws, 1)), jax.random.key(42), temperature, None
    )
    probs = np.exp(logits.astype(np.float64) / temperature)
    probs /= probs.sum()
    pvalue, counts = _chi_square_pvalue(tokens, probs)
    assert pvalue > 1e-3, (counts, probs * draws)
    np.testing.assert_allclose(np.asarray(logprobs), np.log(probs)[np.asarray(tokens)], atol=1e-5)


def test_top_k_top_p_frequencies_are_renormalised():
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.25, 0.2], np.float32))
    draws = 40_000
    tokens, logprobs = sample_token(jnp.tile(jnp.asarray(logits), (draws, 1)), jax.random.key(7), 1.0, 4, 0.8)
    # top-4 renormalised: .4/.95, .25/.95, .2/.95, .1/.95 -> mass before token 4 (0.2): 0.684 < 0.8 keep;
    # before token 2 (0.1): 0.895 >= 0.8 drop. Kept {1, 3, 4} renormalised over 0.85.
    expected = np.array([0, 0.4, 0, 0.25, 0.2]) / 0.85
    counts = np.bincount(np.asarray(tokens), minlength=5)
    assert counts[0] == 0 and counts[2] == 0
    kept = [1, 3, 4]
    assert scipy.stats.chisquare(counts[kept], expected[kept] * draws).pvalue > 1e-3
    # Reported log-probs are those of the unfiltered distribution.
    np.testing.assert_allclose(np.asarray(logprobs), logits[np.asarray(tokens)], atol=1e-5)


@pytest.mark.parametrize("size", [7, 1000])  # one-level and two-level (blocked) search
def test_inverse_cdf_sample_frequencies_and_zero_weights(size):
    rng = np.random.default_rng(0)
    weights = rng.exponential(size=size) * (rng.random(size) < 0.5)  # about half the entries are 0
    weights[-1] = 0.0  # a trailing zero must not catch u close to 1
    weights[rng.integers(size)] = 5.0
    draws = 30_000
    uniform = jax.random.uniform(jax.random.key(3), (draws,))
    tokens = np.asarray(jax.jit(inverse_cdf_sample)(jnp.tile(jnp.asarray(weights, jnp.float32), (draws, 1)), uniform))
    assert np.all(weights[tokens] > 0)
    # Edge uniforms: the first and the last positive entries.
    edge = np.asarray(
        inverse_cdf_sample(
            jnp.asarray(weights, jnp.float32)[None].repeat(2, 0),
            jnp.asarray([0.0, np.nextafter(np.float32(1), np.float32(0))]),
        )
    )
    positive = np.flatnonzero(weights > 0)
    np.testing.assert_array_equal(edge, [positive[0], positive[-1]])
    probs = weights / weights.sum()
    common = probs * draws >= 5
    rare = ~common & (probs > 0)
    counts = np.bincount(tokens, minlength=size)
    observed, expected = counts[common], probs[common] * draws
    if rare.any():
        observed, expected = np.append(observed, counts[rare].sum()), np.append(expected, probs[rare].sum() * draws)
    assert scipy.stats.chisquare(observed, expected).pvalue > 1e-3


@pytest.mark.slow
def test_first_token_frequencies_of_generate(tiny_gpt2):
    """End to end: the first sampled token follows softmax(logits / T) of the model."""
    hf_model, model, params = tiny_gpt2
    draws, temperature = 4096, 1.5
    ids, mask = _left_padded_prompts(batch=1)
    ids, mask = np.repeat(ids, draws, 0), np.repeat(mask, draws, 0)
    out = jax.jit(lambda p, i, m, k: generate(model, p, i, m, k, max_new_tokens=1, temperature=temperature))(
        params, ids, mask, jax.random.key(5)
    )
    logits = np.asarray(model.apply(params, ids[:1], mask[:1])[0, -1], np.float64) / temperature
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=VOCAB)
    # Merge rare tokens into one bin so every expected count is >= 5.
    common = probs * draws >= 5
    observed, expected = counts[common], probs[common] * draws
    if not common.all():
        observed = np.append(observed, counts[~common].sum())
        expected = np.append(expected, probs[~common].sum() * draws)
    assert scipy.stats.chisquare(observed, expected).pvalue > 1e-3


# ----------------------------------------------------------------------------------------------
# EOS, masks, early stop


class _ScriptedModel:
    """A fake LM whose next token is scripted per (row, response step): tests EOS bookkeeping.

    `generate` feeds the token before response token i into cache slot `P - 1 + i`; the logits
    returned there put all mass on `script[b, i]`.
    """

    def __init__(self, script, prompt_len, vocab=16):
        self.script = jnp.asarray(script, jnp.int32)
        self.prompt_len = prompt_len
        self.vocab = vocab

    def __hash__(self):
        return id(self)

    def init_cache(self, batch, max_len, dtype=None):
        return {"calls": jnp.zeros((), jnp.int32)}

    def grow_cache(self, cache, max_len):
        return cache

    def forward(self, params, input_ids, attention_mask, positions=None, cache=None, cache_index=None, cache_size=None):
        if cache is None:  # the prefill
            cache, cache_index = self.init_cache(input_ids.shape[0], cache_size), 0
        step = jnp.clip(cache_index - (self.prompt_len - 1), 0, self.script.shape[1] - 1)
        token = jax.lax.dynamic_index_in_dim(self.script, step, axis=1, keepdims=False)
        logits = jnp.where(jnp.arange(self.vocab)[None, :] == token[:, None], 0.0, -1e9)
        logits = jnp.broadcast_to(logits[:, None, :], (*input_ids.shape, self.vocab))
        return jaxrlhf.models.ModelOutput(logits, None, {"calls": cache["calls"] + 1})


def test_eos_masks_and_padding():
    eos, pad = 9, 15
    script = np.array(
        [
            [1, 2, 9, 3, 9, 4],  # EOS at 2; the second EOS is after it and not counted
            [9, 1, 1, 1, 1, 1],  # EOS first
            [1, 2, 3, 4, 5, 6],  # never: mask 1 for all max_new_tokens
            [1, 2, 3, 4, 5, 8],  # the other EOS id, at the last step
        ]
    )
    model = _ScriptedModel(script, prompt_len=3)
    ids = jnp.ones((4, 3), jnp.int32)
    out = generate(
        model,
        None,
        ids,
        ids,
        jax.random.key(0),
        max_new_tokens=6,
        temperature=0.0,
        eos_token_id=(eos, 8),
        pad_token_id=pad,
    )
    np.testing.assert_array_equal(
        np.asarray(out.tokens),
        [
            [1, 2, 9, pad, pad, pad],
            [9, pad, pad, pad, pad, pad],
            [1, 2, 3, 4, 5, 6],
            [1, 2, 3, 4, 5, 8],
        ],
    )
    np.testing.assert_array_equal(
        np.asarray(out.mask), [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    )
    assert np.all(np.asarray(out.logprobs)[np.asarray(out.mask) == 0] == 0)
    assert out.tokens.dtype == jnp.int32 and out.mask.dtype == jnp.int32 and out.logprobs.dtype == jnp.float32


def test_early_stop_when_every_row_is_done():
    """The decode loop ends once every row has emitted EOS: count its forward calls on the host."""
    script = np.array([[1, 9, 1, 1, 1, 1, 1, 1], [1, 1, 1, 9, 1, 1, 1, 1]])
    decode_calls = []

    class Counting(_ScriptedModel):
        def forward(self, params, input_ids, *args, **kwargs):
            if input_ids.shape[1] == 1:  # a decode step (the prefill sees P - 1 = 2 tokens)
                jax.debug.callback(lambda: decode_calls.append(1))
            return super().forward(params, input_ids, *args, **kwargs)

    ids = jnp.ones((2, 3), jnp.int32)
    out = jax.jit(
        lambda i: generate(
            Counting(script, 3), None, i, i, jax.random.key(0), max_new_tokens=8, temperature=0.0, eos_token_id=9
        )
    )(ids)
    jax.block_until_ready(out)
    jax.effects_barrier()
    np.testing.assert_array_equal(np.asarray(out.mask), [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
    assert len(decode_calls) == 4  # one step per response token 0..3, then every row is done


# ----------------------------------------------------------------------------------------------
# Jitted sampler: buckets, recompiles, inside jit, data parallel


def test_bucket_length():
    assert bucket_length(5, (8, 16)) == 8
    assert bucket_length(8, (8, 16)) == 8
    assert bucket_length(9, (16, 8)) == 16
    assert bucket_length(33, (8, 16)) == 48


def _assert_same_samples(actual: SampleOutput, expected: SampleOutput):
    np.testing.assert_array_equal(np.asarray(actual.tokens), np.asarray(expected.tokens))
    np.testing.assert_array_equal(np.asarray(actual.mask), np.asarray(expected.mask))
    np.testing.assert_allclose(np.asarray(actual.logprobs), np.asarray(expected.logprobs), atol=1e-5)


@pytest.mark.slow
def test_sampler_compiles_once_per_bucket(tiny_gpt2):
    hf_model, model, params = tiny_gpt2
    sampler = make_sampler(model, max_new_tokens=N, prompt_buckets=(8, 16), **SAMPLED)
    outputs = {}
    for width in (3, 7, 8, 5):
        ids, mask = _left_padded_prompts(width=width)
        outputs[width] = sampler(params, ids, mask, jax.random.key(1))
    assert sampler.trace_count == 1
    sampler(params, *_left_padded_prompts(width=12), jax.random.key(1))
    assert sampler.trace_count == 2
    # Padding up to the bucket changes nothing: same samples as generate on the unpadded prompts.
    ids, mask = _left_padded_prompts(width=7)
    _assert_same_samples(outputs[7], _run(model, params, ids, mask, jax.random.key(1), **SAMPLED))


def test_generate_inside_outer_jit_with_traced_temperature(tiny):
    """The PPO train step calls generate under its own jit, possibly with a traced temperature."""
    _, model, params = tiny
    ids, mask = _left_padded_prompts()

    @jax.jit
    def rollout(params, ids, mask, key, temperature):
        out = generate(model, params, ids, mask, key, max_new_tokens=N, temperature=temperature, eos_token_id=(5, 7))
        return out, jnp.sum(out.logprobs * out.mask)

    out, total = rollout(params, ids, mask, jax.random.key(1), 1.0)
    _assert_same_samples(
        out,
        _run(model, params, ids, mask, jax.random.key(1), temperature=1.0, top_k=None, top_p=1.0, eos_token_id=(5, 7)),
    )
    # A traced temperature of 0 is greedy: the greedy tokens, cut after the first 5 or 7.
    out, _ = rollout(params, ids, mask, jax.random.key(1), 0.0)
    greedy = np.asarray(_run(model, params, ids, mask, jax.random.key(0), temperature=0.0).tokens)
    is_eos = np.isin(greedy, (5, 7))
    expected_mask = (np.cumsum(is_eos, axis=1) - is_eos) == 0
    np.testing.assert_array_equal(np.asarray(out.mask), expected_mask)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.where(expected_mask, greedy, PAD))
    assert rollout._cache_size() == 1
    assert np.isfinite(float(total))


def test_same_samples_on_one_and_eight_devices(tiny_gpt2):
    hf_model, model, params = tiny_gpt2
    assert len(jax.devices()) >= 8
    ids, mask = _left_padded_prompts()  # batch 8: one row per device
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharded = make_sampler(model, max_new_tokens=N, mesh=mesh, prompt_buckets=(7,), **SAMPLED)
    out = jax.block_until_ready(sharded(params, ids, mask, jax.random.key(1)))
    assert len(out.tokens.sharding.device_set) == 8
    _assert_same_samples(out, _run(model, params, ids, mask, jax.random.key(1), **SAMPLED))
