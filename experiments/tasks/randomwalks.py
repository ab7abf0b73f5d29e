"""Random walks on a graph: trlx's ``randomwalks`` PPO benchmark, re-implemented.

The task (from the Decision Transformer paper's toy problem, as used by CarperAI/trlx): learn
shortest paths to a goal node from a data set of random walks.

Graph. ``n_nodes`` nodes named by letters (``a``, ``b``, ...); node 0 (``a``) is the goal. With
``rng = np.random.RandomState(seed)`` the adjacency matrix (row = source, column = destination) is
drawn as::

    repeat:
        adj = rng.rand(n_nodes, n_nodes) > 1 - p_edge     # each directed edge with prob. p_edge
        set the diagonal to False                          # no self loops
    until every row has at least one True                 # every node has an out-edge
    adj[goal, :] = False; adj[goal, goal] = True          # the goal is absorbing

Walks. The same ``rng`` then draws ``n_walks`` walks: a start node uniform over the non-goal nodes
(``rng.randint(n_nodes)``, redrawn while it is the goal), then up to ``max_length - 1`` steps, each
to ``rng.choice`` of the current node's out-neighbours, stopping at the goal. A walk therefore has
at most ``max_length`` nodes and need not reach the goal. With the defaults (21 nodes, p 0.1,
seed 1002, max_length 10, 1000 walks) this draws exactly trlx's graph and walks.

Score. For a walk ``w`` (start node first), let ``L`` be the number of nodes up to and including the
first arrival at the goal; ``L = max_length`` when the walk is invalid: a token that is not a node
of the graph (an unknown letter, EOS or padding before the goal), a step along a non-edge, or no
arrival at the goal within ``max_length`` nodes. With ``L_opt`` the number of nodes on a shortest
path from the start node to the goal::

    optimality = (max_length - L) / (max_length - L_opt)          in [0, 1]

Anything after the first arrival at the goal is ignored (as in trlx).

Unreachable starts. A start node whose shortest path to the goal has ``max_length`` nodes or more
(or no path at all) has ``max_length - L_opt <= 0``: every walk from it scores 0/0 in trlx's
formula. We drop such nodes from the prompts (``RandomWalks.start_nodes``) and give them score 0
wherever they still occur (the denominator is clamped, never NaN). With the default seed every one
of the 20 non-goal nodes reaches the goal in at most 5 nodes, so all 20 are prompts.

Tokens. With a character-level tokenizer (``jaxrlhf.tokenizers.char_tokenizer``) over the node
letters: a prompt is ``<bos> s`` (``s`` the start letter), a response is the rest of the walk then
``<eos>``. ``optimality_from_tokens`` / ``make_reward_fn`` compute the score on token ids as a pure
JAX function (jit/vmap-safe, fixed shapes); ``optimality_reference`` is the plain-Python version on
strings that the tests compare it with.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.training.evaluation import sequence_kl
from jaxrlhf.training.rewards import decode_responses

__all__ = [
    "GOAL",
    "RandomWalks",
    "generate_graph",
    "sample_walks",
    "shortest_path_lengths",
    "make_task",
    "optimality_reference",
    "token_to_node_table",
    "optimality_from_tokens",
    "make_reward_fn",
    "encode_walks",
    "encode_prompts",
    "sequence_kl",
    "make_evaluator",
    "decode_walks",
]

GOAL = 0


def node_letter(node: int) -> str:
    return chr(ord("a") + int(node))


def generate_graph(rng: np.random.RandomState, n_nodes: int = 21, p_edge: float = 0.1) -> np.ndarray:
    """Adjacency matrix ``[n_nodes, n_nodes]`` (bool, row = source), drawn as in the module docstring."""
    if not 2 <= n_nodes <= 26:
        raise ValueError(f"n_nodes must be in [2, 26] (one letter per node), got {n_nodes}")
    while True:
        adjacency = rng.rand(n_nodes, n_nodes) > (1 - p_edge)
        np.fill_diagonal(adjacency, False)
        if np.all(adjacency.sum(axis=1)):
            break
    adjacency[GOAL, :] = False
    adjacency[GOAL, GOAL] = True
    return adjacency


def sample_walks(rng: np.random.RandomState, adjacency: np.ndarray, n_walks: int, max_length: int) -> list[list[int]]:
    """``n_walks`` random walks (lists of nodes, at most ``max_length`` each) from non-goal starts."""
    n_nodes = adjacency.shape[0]
    walks = []
    for _ in range(n_walks):
        node = rng.randint(n_nodes)
        while node == GOAL:
            node = rng.randint(n_nodes)
        walk = [int(node)]
        for _ in range(max_length - 1):
            node = rng.choice(np.nonzero(adjacency[node])[0])
            walk.append(int(node))
            if node == GOAL:
                break
        walks.append(walk)
    return walks


def shortest_path_lengths(adjacency: np.ndarray, max_length: int) -> np.ndarray:
    """Nodes on a shortest path from each node to the goal (both ends counted; the goal's is 1).

    Breadth-first search backwards from the goal. Nodes with no path, or whose shortest path has
    more than ``max_length`` nodes, get ``max_length``.
    """
    n_nodes = adjacency.shape[0]
    lengths = np.full(n_nodes, max_length, dtype=np.int32)
    lengths[GOAL] = 1
    queue = deque([GOAL])
    seen = {GOAL}
    while queue:
        node = queue.popleft()
        for source in np.nonzero(adjacency[:, node])[0]:
            if source not in seen:
                seen.add(int(source))
                lengths[source] = min(lengths[node] + 1, max_length)
                queue.append(int(source))
    return lengths


@dataclasses.dataclass(frozen=True)
class RandomWalks:
    """One instance of the task: the graph, the walk data set and what scoring needs."""

    adjacency: np.ndarray  # [N, N] bool, row = source
    shortest: np.ndarray  # [N] int32, nodes on a shortest path to the goal (max_length if none)
    walks: tuple[str, ...]  # the data set, as strings of letters (start first)
    max_length: int

    @property
    def n_nodes(self) -> int:
        return self.adjacency.shape[0]

    @property
    def letters(self) -> str:
        return "".join(node_letter(i) for i in range(self.n_nodes))

    @property
    def start_nodes(self) -> tuple[int, ...]:
        """The prompts: every non-goal node from which the goal is reachable in < max_length nodes."""
        return tuple(i for i in range(self.n_nodes) if i != GOAL and self.shortest[i] < self.max_length)

    @property
    def prompts(self) -> tuple[str, ...]:
        return tuple(node_letter(i) for i in self.start_nodes)


def make_task(
    seed: int = 1002, n_nodes: int = 21, p_edge: float = 0.1, max_length: int = 10, n_walks: int = 1000
) -> RandomWalks:
    """The graph and the walks, both drawn from one ``np.random.RandomState(seed)`` (graph first)."""
    rng = np.random.RandomState(seed)
    adjacency = generate_graph(rng, n_nodes, p_edge)
    walks = sample_walks(rng, adjacency, n_walks, max_length)
    return RandomWalks(
        adjacency=adjacency,
        shortest=shortest_path_lengths(adjacency, max_length),
        walks=tuple("".join(node_letter(n) for n in w) for w in walks),
        max_length=max_length,
    )


# ----------------------------------------------------------------------------------------------
# The score, reference version (plain Python on strings)


def optimality_reference(task: RandomWalks, walks: Sequence[str]) -> dict[str, np.ndarray]:
    """Score of each walk string (start letter first), as defined in the module docstring.

    Returns ``{"length": L, "optimality": score, "invalid": 1.0 if the walk is invalid}`` as float64
    arrays. Characters other than node letters (including special tokens' characters) are invalid.
    """
    lengths, scores, invalid = [], [], []
    for walk in walks:
        nodes = [ord(c) - ord("a") if "a" <= c <= "z" else -1 for c in walk]
        nodes = [n if n < task.n_nodes else -1 for n in nodes]
        length = None
        for i, node in enumerate(nodes[: task.max_length]):
            if node < 0 or (i > 0 and not task.adjacency[nodes[i - 1], node]):
                break  # unknown letter or non-edge: invalid
            if node == GOAL:
                length = i + 1
                break
        is_invalid = length is None
        length = task.max_length if is_invalid else length
        start = nodes[0] if nodes else -1
        denominator = task.max_length - task.shortest[start] if start >= 0 else 0
        score = (task.max_length - length) / denominator if denominator > 0 else 0.0
        lengths.append(length)
        scores.append(score)
        invalid.append(float(is_invalid))
    return {
        "length": np.asarray(lengths, np.float64),
        "optimality": np.asarray(scores, np.float64),
        "invalid": np.asarray(invalid, np.float64),
    }


# ----------------------------------------------------------------------------------------------
# The score on token ids, as a JAX function


def token_to_node_table(tokenizer, task: RandomWalks) -> np.ndarray:
    """``[vocab]`` int32: the node of each token id, -1 for tokens that are not node letters."""
    vocab = tokenizer.get_vocab()
    table = np.full(max(len(tokenizer), max(vocab.values()) + 1), -1, dtype=np.int32)
    for node, letter in enumerate(task.letters):
        if letter not in vocab:
            raise ValueError(f"the tokenizer has no token for node letter {letter!r}")
        table[vocab[letter]] = node
    return table


def optimality_from_tokens(
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    response_ids: jax.Array,
    response_mask: jax.Array,
    *,
    adjacency: jax.Array,
    shortest: jax.Array,
    token_to_node: jax.Array,
    max_length: int,
) -> dict[str, jax.Array]:
    """Optimality of each walk ``start + response`` from token ids (pure JAX, fixed shapes).

    Args:
      prompt_ids, prompt_mask: ``[B, P]``; the start node is the last token with mask 1 (works with
        left or right padding).
      response_ids, response_mask: ``[B, T]``; tokens with mask 0 end the walk (as EOS does).
      adjacency: ``[N, N]`` bool; shortest: ``[N]`` int; token_to_node: ``[V]`` int (-1: not a node).
      max_length: the walk length limit (a Python int).

    Returns:
      ``{"optimality": [B], "length": [B], "invalid": [B]}`` float32.
    """
    B, P = prompt_ids.shape
    adjacency = jnp.asarray(adjacency, bool)
    shortest = jnp.asarray(shortest, jnp.int32)
    token_to_node = jnp.asarray(token_to_node, jnp.int32)
    vocab = token_to_node.shape[0]

    def to_node(ids):
        ids = ids.astype(jnp.int32)
        in_vocab = (ids >= 0) & (ids < vocab)
        return jnp.where(in_vocab, token_to_node[jnp.clip(ids, 0, vocab - 1)], -1)

    last_prompt_index = P - 1 - jnp.argmax(jnp.flip(prompt_mask.astype(bool), axis=1), axis=1)
    start_token = jnp.take_along_axis(prompt_ids, last_prompt_index[:, None], axis=1)[:, 0]
    start_BxN = to_node(start_token)
    start_BxN = jnp.where(prompt_mask.astype(bool).any(axis=1), start_BxN, -1)

    nodes_BxT = jnp.where(response_mask.astype(bool), to_node(response_ids), -1)
    prev_BxT = jnp.concatenate([start_BxN[:, None], nodes_BxT[:, :-1]], axis=1)
    step_ok_BxT = (nodes_BxT >= 0) & (prev_BxT >= 0) & adjacency[jnp.maximum(prev_BxT, 0), jnp.maximum(nodes_BxT, 0)]
    all_ok_so_far_BxT = jnp.cumprod(step_ok_BxT.astype(jnp.int32), axis=1).astype(bool)
    arrived_BxT = all_ok_so_far_BxT & (nodes_BxT == GOAL)
    reached = arrived_BxT.any(axis=1)
    length = jnp.where(reached, jnp.argmax(arrived_BxT, axis=1) + 2, max_length)  # + start, 1-based
    length = jnp.where(start_BxN == GOAL, 1, length)
    reached = reached | (start_BxN == GOAL)
    invalid = ~reached | (length > max_length)
    length = jnp.where(invalid, max_length, length)

    denominator = max_length - shortest[jnp.maximum(start_BxN, 0)]
    usable = (start_BxN >= 0) & (denominator > 0)
    score = jnp.where(usable, (max_length - length) / jnp.maximum(denominator, 1), 0.0)
    return {
        "optimality": score.astype(jnp.float32),
        "length": length.astype(jnp.float32),
        "invalid": invalid.astype(jnp.float32),
    }


def make_reward_fn(task: RandomWalks, tokenizer) -> Callable[..., jax.Array]:
    """``reward_fn(prompt_ids, prompt_mask, response_ids, response_mask) -> optimality [B]``.

    The graph is baked in as constants, so the function can be traced inside a jitted PPO step.
    """
    adjacency = jnp.asarray(task.adjacency)
    shortest = jnp.asarray(task.shortest)
    table = jnp.asarray(token_to_node_table(tokenizer, task))

    def reward_fn(prompt_ids, prompt_mask, response_ids, response_mask):
        return optimality_from_tokens(
            prompt_ids,
            prompt_mask,
            response_ids,
            response_mask,
            adjacency=adjacency,
            shortest=shortest,
            token_to_node=table,
            max_length=task.max_length,
        )["optimality"]

    return reward_fn


# ----------------------------------------------------------------------------------------------
# Encoding for training and prompting


def encode_walks(task: RandomWalks, tokenizer) -> dict[str, np.ndarray]:
    """The walk data set as right-padded ``<bos> walk <eos>`` rows of length ``max_length + 2``.

    Returns ``input_ids``, ``attention_mask`` and ``loss_mask`` (``[n_walks, max_length + 2]``
    int32); ``loss_mask`` is 1 on the response tokens (the walk after its start letter, and EOS),
    the tokens the policy generates.
    """
    width = task.max_length + 2
    ids = np.full((len(task.walks), width), tokenizer.pad_token_id, np.int32)
    attention = np.zeros_like(ids)
    loss = np.zeros_like(ids)
    for row, walk in enumerate(task.walks):
        tokens = [tokenizer.bos_token_id] + tokenizer.convert_tokens_to_ids(list(walk)) + [tokenizer.eos_token_id]
        ids[row, : len(tokens)] = tokens
        attention[row, : len(tokens)] = 1
        loss[row, 2 : len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


def encode_prompts(letters: Sequence[str], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """``<bos> s`` prompt ids ``[len(letters), 2]`` int32 and their mask (all ones)."""
    ids = np.asarray(
        [[tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids(letter)] for letter in letters], np.int32
    )
    return ids, np.ones_like(ids)


# ----------------------------------------------------------------------------------------------
# Evaluation of a policy


def make_evaluator(model, task: RandomWalks, tokenizer, *, samples_per_prompt: int = 8, temperature: float = 1.0):
    """``evaluate(params, ref_params, key) -> metrics``, jitted, over all prompts of the task.

    Metrics (means over prompts, or over prompts x samples):
      ``greedy/optimality``, ``greedy/invalid``: greedy decoding, one walk per start node;
      ``sampled/optimality``, ``sampled/invalid``, ``sampled/length``: ``samples_per_prompt`` walks
      per start node at ``temperature`` (no top-k/top-p);
      ``sampled/kl_to_ref``: mean per-sequence KL to ``ref_params`` (see ``sequence_kl``) on the
      sampled walks.
    """
    from jaxrlhf.sampling import generate

    prompt_ids, prompt_mask = encode_prompts(task.prompts, tokenizer)
    reward_kwargs = dict(
        adjacency=jnp.asarray(task.adjacency),
        shortest=jnp.asarray(task.shortest),
        token_to_node=jnp.asarray(token_to_node_table(tokenizer, task)),
        max_length=task.max_length,
    )
    gen_kwargs = dict(
        max_new_tokens=task.max_length, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    repeated_ids = np.repeat(prompt_ids, samples_per_prompt, axis=0)
    repeated_mask = np.repeat(prompt_mask, samples_per_prompt, axis=0)

    @jax.jit
    def evaluate(params, ref_params, key):
        greedy = generate(model, params, prompt_ids, prompt_mask, key, temperature=0, **gen_kwargs)
        greedy_scores = optimality_from_tokens(prompt_ids, prompt_mask, greedy.tokens, greedy.mask, **reward_kwargs)
        sampled = generate(model, params, repeated_ids, repeated_mask, key, temperature=temperature, **gen_kwargs)
        sampled_scores = optimality_from_tokens(
            repeated_ids, repeated_mask, sampled.tokens, sampled.mask, **reward_kwargs
        )
        kl = sequence_kl(model, params, ref_params, repeated_ids, repeated_mask, sampled.tokens, sampled.mask)
        return {
            "greedy/optimality": greedy_scores["optimality"].mean(),
            "greedy/invalid": greedy_scores["invalid"].mean(),
            "sampled/optimality": sampled_scores["optimality"].mean(),
            "sampled/invalid": sampled_scores["invalid"].mean(),
            "sampled/length": sampled_scores["length"].mean(),
            "sampled/kl_to_ref": kl.mean(),
        }

    return evaluate


def decode_walks(tokenizer, prompt_ids, response_ids, response_mask) -> list[str]:
    """Walk strings ``start + response`` (special tokens dropped), for printing and the reference."""
    start_ids = np.asarray(prompt_ids)[:, -1:]
    return decode_responses(
        tokenizer,
        np.concatenate([start_ids, np.asarray(response_ids)], axis=1),
        np.concatenate([np.ones_like(start_ids), np.asarray(response_mask)], axis=1),
    )
