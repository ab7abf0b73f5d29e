"""Random-walks task: graph and data generation, the optimality score (JAX on token ids and the
Python reference, on hand-made walks), and the character-level tokenizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.tokenizers import char_tokenizer
from tasks import randomwalks as rw


@pytest.fixture(scope="module")
def task():
    return rw.make_task()


@pytest.fixture(scope="module")
def tokenizer(task):
    return char_tokenizer(task.letters)


def neighbours(task, letter):
    return "".join(task.letters[j] for j in np.nonzero(task.adjacency[ord(letter) - ord("a")])[0])


# ----------------------------------------------------------------------------------------------
# Graph and walks


def test_graph_of_seed_1002(task):
    """Pins the generation procedure: these are the out-edges of trlx's graph for seed 1002."""
    assert task.n_nodes == 21 and task.letters == "abcdefghijklmnopqrstu"
    assert neighbours(task, "a") == "a"  # absorbing goal
    assert neighbours(task, "c") == "ou"
    assert neighbours(task, "d") == "noqu"
    assert neighbours(task, "j") == "gmqr"
    assert neighbours(task, "k") == "air"
    assert int(task.adjacency.sum()) == 43
    assert not np.any(np.diag(task.adjacency)[1:])  # no self loops except the goal's
    assert np.all(task.adjacency.sum(axis=1) >= 1)
    expected = {"a": 1, "b": 2, "c": 3, "e": 5, "k": 2, "p": 4, "u": 2}
    for letter, length in expected.items():
        assert task.shortest[ord(letter) - ord("a")] == length
    assert task.prompts == tuple("bcdefghijklmnopqrstu")


def test_walks_are_valid_random_walks(task):
    assert len(task.walks) == 1000
    assert task.walks[:3] == ("oseotba", "qka", "jrmhnba")
    for walk in task.walks:
        nodes = [ord(c) - ord("a") for c in walk]
        assert 2 <= len(nodes) <= task.max_length and nodes[0] != rw.GOAL
        assert all(task.adjacency[u, v] for u, v in zip(nodes, nodes[1:]))
        assert rw.GOAL not in nodes[:-1]  # a walk stops at the goal
        assert nodes[-1] == rw.GOAL or len(nodes) == task.max_length


def test_unreachable_start_is_not_a_prompt_and_scores_zero():
    # A 3-node graph where c reaches nothing but b: c -> b -> c ...
    adjacency = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]], bool)
    task = rw.RandomWalks(adjacency, rw.shortest_path_lengths(adjacency, 5), ("bc",), 5)
    assert list(task.shortest) == [1, 5, 5] and task.prompts == ()
    ref = rw.optimality_reference(task, ["bcb", "c"])
    assert ref["optimality"].tolist() == [0.0, 0.0] and ref["invalid"].tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------------------------
# The score on hand-made walks

# (walk, expected L, expected optimality, invalid); shortest: c 3, p 4.
CASES = [
    ("cua", 3, 1.0, 0),  # optimal
    ("cotba", 5, 5 / 7, 0),  # suboptimal: 5 nodes where 3 suffice
    ("pipipipnba", 10, 0.0, 0),  # reaches the goal at the very last allowed node
    ("cba", 10, 0.0, 1),  # c -> b is not an edge
    ("cxa", 10, 0.0, 1),  # x: not a letter of the vocabulary at all
    ("cva", 10, 0.0, 1),  # v: a letter, but not a node of this 21-node graph
    ("pipipi", 10, 0.0, 1),  # valid edges, never reaches the goal
    ("pipipipipi", 10, 0.0, 1),  # max_length nodes, no goal
    ("pipipipinba", 10, 0.0, 1),  # reaches the goal only at node 11 > max_length
    ("co", 10, 0.0, 1),  # stops (EOS) before the goal
    ("cuaxx", 3, 1.0, 0),  # anything after the first arrival is ignored
]


def test_reference_on_hand_made_walks(task):
    out = rw.optimality_reference(task, [w for w, *_ in CASES])
    np.testing.assert_allclose(out["length"], [c[1] for c in CASES])
    np.testing.assert_allclose(out["optimality"], [c[2] for c in CASES], rtol=1e-12)
    np.testing.assert_allclose(out["invalid"], [c[3] for c in CASES])


def encode_cases(tokenizer, walks, width=12, left_pad_prompt=False):
    """Prompt <bos> s (optionally left-padded to 3), response = rest + <eos>, right-padded."""
    P = 3 if left_pad_prompt else 2
    prompt_ids = np.full((len(walks), P), tokenizer.pad_token_id, np.int32)
    prompt_mask = np.zeros_like(prompt_ids)
    response_ids = np.full((len(walks), width), tokenizer.pad_token_id, np.int32)
    response_mask = np.zeros_like(response_ids)
    for i, walk in enumerate(walks):
        prompt_ids[i, -2:] = [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids(walk[0])]
        prompt_mask[i, -2:] = 1
        rest = tokenizer(walk[1:])["input_ids"] + [tokenizer.eos_token_id]
        response_ids[i, : len(rest)] = rest
        response_mask[i, : len(rest)] = 1
    return prompt_ids, prompt_mask, response_ids, response_mask


@pytest.mark.parametrize("left_pad_prompt", [False, True])
def test_jax_score_on_hand_made_walks(task, tokenizer, left_pad_prompt):
    batch = encode_cases(tokenizer, [w for w, *_ in CASES], left_pad_prompt=left_pad_prompt)
    kwargs = dict(
        adjacency=task.adjacency,
        shortest=task.shortest,
        token_to_node=rw.token_to_node_table(tokenizer, task),
        max_length=task.max_length,
    )
    out = jax.jit(lambda *b: rw.optimality_from_tokens(*b, **kwargs))(*batch)
    np.testing.assert_allclose(out["length"], [c[1] for c in CASES])
    np.testing.assert_allclose(out["optimality"], [c[2] for c in CASES], rtol=1e-6)
    np.testing.assert_allclose(out["invalid"], [c[3] for c in CASES])


@pytest.mark.slow
def test_reward_fn_matches_reference_on_data_and_under_vmap(task, tokenizer):
    reward_fn = rw.make_reward_fn(task, tokenizer)
    data = rw.encode_walks(task, tokenizer)
    ids, mask = data["input_ids"], data["attention_mask"]
    batch = (ids[:, :2], mask[:, :2], ids[:, 2:], mask[:, 2:])
    expected = rw.optimality_reference(task, task.walks)["optimality"]
    np.testing.assert_allclose(jax.jit(reward_fn)(*batch), expected, atol=1e-6)
    # vmap over groups of rows gives the same numbers.
    grouped = [x.reshape(10, 100, -1) for x in batch]
    np.testing.assert_allclose(jax.vmap(reward_fn)(*grouped).reshape(-1), expected, atol=1e-6)
    # A batch with empty masks stays finite.
    empty = reward_fn(*[jnp.zeros_like(x) for x in batch])
    assert np.all(np.isfinite(empty)) and np.all(np.asarray(empty) == 0)


def test_decode_walks_round_trip(task, tokenizer):
    walks = [w for w, *_ in CASES if "x" not in w and "v" not in w]
    prompt_ids, _, response_ids, response_mask = encode_cases(tokenizer, walks)
    decoded = rw.decode_walks(tokenizer, prompt_ids, response_ids, response_mask)
    assert decoded == walks


# ----------------------------------------------------------------------------------------------
# Tokenizer


def test_char_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = char_tokenizer("abcdef", add_bos=True)
    assert tok.convert_ids_to_tokens(list(range(10))) == ["<pad>", "<bos>", "<eos>", "<unk>", *"abcdef"]
    assert tok("cab")["input_ids"] == [1, 6, 4, 5]
    assert tok("ab<eos>z")["input_ids"] == [1, 4, 5, 2, 3]  # special token kept whole; z unknown
    assert tok.decode(tok("cafe")["input_ids"], skip_special_tokens=True) == "cafe"
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    assert loaded.padding_side == "left"
    for text in ["cab", "ab<eos>z", "", "fedcba"]:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    batch = loaded(["a", "abc"], padding=True)
    assert batch["input_ids"] == [[0, 0, 1, 4], [1, 4, 5, 6]]
    assert batch["attention_mask"] == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_char_tokenizer_rejects_bad_chars():
    with pytest.raises(ValueError):
        char_tokenizer(["ab"])
    with pytest.raises(ValueError):
        char_tokenizer("aa")
