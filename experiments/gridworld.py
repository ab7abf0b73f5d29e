"""Grid world: learning by raising the probability of good actions, or by scoring actions.

The first tutorial demonstration (issue #7). A robot walks a small grid; a fire cell ends the
episode with reward -1, the diamond ends it with +1, every other move gives 0 (minus an optional
per-step cost), and an episode also ends after ``max_steps`` moves. Two agents learn it:

- policy-based: REINFORCE with a tabular softmax policy. After a batch of episodes it raises
  ``log pi(a_t | s_t)`` in proportion to the discounted return from t on (minus the batch mean),
  so actions followed by the diamond become more likely and actions followed by fire less likely.
  The returns come from ``jaxrlhf.core.rewards.discounted_returns``, the function the RLHF trainer
  uses on tokens.
- value-based: tabular Q-learning. It scores each (cell, action) with
  ``Q(s, a) <- Q(s, a) + alpha * (r + gamma * max_a' Q(s', a') - Q(s, a))`` and acts greedily
  (epsilon-greedy while training).

Then the effect of the discount gamma: with gamma < 1 a diamond reached in n moves is worth
gamma^(n-1), so shorter paths score higher; with gamma = 1 every path that reaches the diamond is
worth 1, whatever its length. A small per-step cost makes gamma = 1 prefer short paths again.
Each variant is trained with several seeds, all in one ``jax.vmap``-ed, ``jax.jit``-ed call.

The environment is a pure function of arrays (``env_step``), the training loops run under
``lax.scan``, episodes in a batch run under ``vmap``, and every random draw takes an explicit key.

    python experiments/gridworld.py                      # defaults, ~15 s on 2 idle CPU cores
    python experiments/gridworld.py --help               # every knob, with its description
    python experiments/gridworld.py --slip_prob 0.1 --out_dir runs/gridworld_slippery
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrlhf.config import parse_config, refuse_unknown_fields, save_config
from jaxrlhf.core.rewards import discounted_returns
from jaxrlhf.core.stats import masked_mean
from jaxrlhf.metrics_log import MetricsLogger
from jaxrlhf.plotting import plot_curves


@refuse_unknown_fields
@dataclasses.dataclass(frozen=True)
class Config:
    """Grid world: REINFORCE vs Q-learning, and the effect of the discount factor gamma."""

    out_dir: str = "runs/gridworld"
    """Directory for config.json, metrics.jsonl, TensorBoard events, gridworld.png, summary.json."""
    seed: int = 0
    """Seed of every random key in the run."""
    grid: tuple[str, ...] = (
        "...FD",
        ".#...",
        ".F...",
        ".....",
        "S....",
    )
    """The map, one string per row: S start, D diamond (+1, ends), F fire (-1, ends), # wall, . floor."""
    max_steps: int = 30
    """Step limit: an episode that has reached neither fire nor diamond ends after this many moves."""
    slip_prob: float = 0.0
    """Probability that a move goes in a uniformly random direction instead of the chosen one."""
    gamma: float = 0.9
    """Discount factor of the two main agents (the ones whose arrow grids are printed first)."""
    gamma_study: tuple[float, ...] = (0.9, 1.0)
    """Discount factors compared in the gamma study (each with no step cost)."""
    step_cost: float = 0.01
    """Per-move cost of the extra variant gamma=1.0 with a step cost; 0 leaves that variant out."""
    num_seeds: int = 5
    """Independent training runs per variant (run together under vmap); results are averaged."""
    num_batches: int = 150
    """Training iterations; each collects a batch of episodes and then learns from it."""
    episodes_per_batch: int = 16
    """Episodes per training iteration, run in parallel with vmap."""
    reinforce_lr: float = 1.0
    """Step size of gradient ascent on the softmax logits (one logit per cell and action)."""
    reinforce_baseline: bool = False
    """Subtract the batch's mean return from the returns (same expected gradient, other variance).

    Off by default, for the plainest form of REINFORCE; on the default map it makes no difference
    to whether the diamond is found (20 of 20 seeds either way)."""
    q_alpha: float = 0.5
    """Q-learning step size alpha."""
    epsilon_start: float = 1.0
    """Q-learning exploration: probability of a random action at the first iteration."""
    epsilon_end: float = 0.05
    """Q-learning exploration: the probability after the decay."""
    epsilon_decay_fraction: float = 0.5
    """Fraction of the iterations over which epsilon decays linearly from start to end."""
    eval_episodes: int = 256
    """Episodes used to measure the final success rates of each trained agent."""
    smooth: int = 5
    """Moving-average window (in iterations) of the curves in the plot."""

    def __post_init__(self):
        rows = {len(row) for row in self.grid}
        if len(rows) != 1:
            raise ValueError(f"grid rows must have equal lengths, got {sorted(rows)}")
        text = "".join(self.grid)
        if text.count("S") != 1 or text.count("D") < 1:
            raise ValueError("grid needs exactly one S (start) and at least one D (diamond)")
        if set(text) - set("SDF#."):
            raise ValueError(f"unknown grid characters: {sorted(set(text) - set('SDF#.'))}")


# ----------------------------------------------------------------------------------------------
# The environment: a pure step function on integer cell indices.
# ----------------------------------------------------------------------------------------------

ARROWS = "←↑→↓"  # action 0, 1, 2, 3
MOVES = np.array([[0, -1], [-1, 0], [0, 1], [1, 0]], dtype=np.int32)  # (d_row, d_col) per action
NUM_ACTIONS = 4


class GridWorld(NamedTuple):
    """The map as boolean ``[rows, cols]`` arrays plus the start cell (index ``row * cols + col``)."""

    is_fire: jax.Array
    is_diamond: jax.Array
    is_wall: jax.Array
    start: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        return self.is_fire.shape

    @property
    def num_cells(self) -> int:
        return self.is_fire.size


def make_gridworld(grid: tuple[str, ...]) -> GridWorld:
    chars = np.array([list(row) for row in grid])
    start_row, start_col = np.argwhere(chars == "S")[0]
    return GridWorld(
        is_fire=jnp.asarray(chars == "F"),
        is_diamond=jnp.asarray(chars == "D"),
        is_wall=jnp.asarray(chars == "#"),
        start=jnp.int32(start_row * chars.shape[1] + start_col),
    )


def env_step(env: GridWorld, key: jax.Array, cell: jax.Array, action: jax.Array, step_cost, slip_prob):
    """One move. Returns ``(next_cell, reward, terminal)``.

    With probability ``slip_prob`` the move goes in a random direction. Moving into the border or a
    wall leaves the robot where it is. Entering fire gives -1 and entering the diamond +1, both
    ending the episode; every move also costs ``step_cost``.
    """
    slip_key, direction_key = jax.random.split(key)
    slipped = jax.random.uniform(slip_key) < slip_prob
    action = jnp.where(slipped, jax.random.randint(direction_key, (), 0, NUM_ACTIONS), action)
    rows, cols = env.shape
    row, col = jnp.divmod(cell, cols)
    move = jnp.asarray(MOVES)[action]
    new_row = jnp.clip(row + move[0], 0, rows - 1)
    new_col = jnp.clip(col + move[1], 0, cols - 1)
    blocked = env.is_wall[new_row, new_col]
    new_row, new_col = jnp.where(blocked, row, new_row), jnp.where(blocked, col, new_col)
    fire, diamond = env.is_fire[new_row, new_col], env.is_diamond[new_row, new_col]
    reward = diamond.astype(jnp.float32) - fire.astype(jnp.float32) - step_cost
    return new_row * cols + new_col, reward, fire | diamond


class Episode(NamedTuple):
    """One episode padded to ``max_steps``; every field is ``[T]`` (``[B, T]`` for a batch)."""

    cell: jax.Array  # where the robot was when it acted
    action: jax.Array
    reward: jax.Array  # 0 after the episode ended
    next_cell: jax.Array
    terminal: jax.Array  # the move entered fire or the diamond
    alive: jax.Array  # 1.0 for the moves that happened, 0.0 after the end (the mask)


def run_episode(env: GridWorld, key, choose_action, max_steps: int, step_cost, slip_prob) -> Episode:
    """Play one episode with ``choose_action(key, cell) -> action``, under ``lax.scan``."""

    def one_move(carry, move_key):
        cell, alive = carry
        action_key, env_key = jax.random.split(move_key)
        action = choose_action(action_key, cell)
        next_cell, reward, terminal = env_step(env, env_key, cell, action, step_cost, slip_prob)
        record = Episode(cell, action, reward * alive, next_cell, terminal, alive)
        still_alive = alive * (1.0 - terminal.astype(jnp.float32))
        return (jnp.where(alive > 0, next_cell, cell), still_alive), record

    _, episode = lax.scan(one_move, (env.start, jnp.float32(1.0)), jax.random.split(key, max_steps))
    return episode


def episode_stats(env: GridWorld, episodes: Episode) -> dict[str, jax.Array]:
    """Success (reached the diamond), fire, and length of each episode in a ``[B, T]`` batch."""
    reached = episodes.terminal & (episodes.alive > 0)
    diamond_cells = env.is_diamond.reshape(-1)[episodes.next_cell]
    success = jnp.any(reached & diamond_cells, axis=-1)
    fire = jnp.any(reached & ~diamond_cells, axis=-1)
    return {"success": success, "fire": fire, "length": episodes.alive.sum(-1)}


def pick_uniform_among_best(key, scores_A: jax.Array) -> jax.Array:
    """Argmax with ties broken uniformly at random (an untrained table has no preference)."""
    is_best = scores_A >= scores_A.max()
    return jax.random.categorical(key, jnp.where(is_best, 0.0, -jnp.inf))


# ----------------------------------------------------------------------------------------------
# Policy-based: REINFORCE with a tabular softmax policy.
# ----------------------------------------------------------------------------------------------


def reinforce_loss(logits_SxA, episodes: Episode, gamma, use_baseline: bool = False):
    """``-mean_b sum_t mask * (G_t - baseline) * log pi(a_t | s_t)``; its gradient is REINFORCE's.

    ``G_t`` is the discounted return from step t: actions followed by the diamond get pushed up,
    actions followed by fire pushed down, actions of episodes that time out left alone. The optional
    baseline (the batch's mean return over the valid steps) keeps the expected gradient but changes
    its variance.
    """
    returns_BxT = discounted_returns(episodes.reward, episodes.alive, gamma)
    baseline = masked_mean(returns_BxT, episodes.alive) if use_baseline else 0.0
    advantages_BxT = lax.stop_gradient(returns_BxT - baseline)
    log_policy_BxTxA = jax.nn.log_softmax(logits_SxA[episodes.cell], axis=-1)
    log_pi_BxT = jnp.take_along_axis(log_policy_BxTxA, episodes.action[..., None], axis=-1)[..., 0]
    return -jnp.sum(episodes.alive * advantages_BxT * log_pi_BxT) / episodes.alive.shape[0]


def train_reinforce(key, gamma, step_cost, env: GridWorld, config: Config):
    """Train a softmax table for ``config.num_batches`` iterations; returns (logits, per-batch stats)."""

    def iteration(logits_SxA, batch_key):
        def sample_action(action_key, cell):
            return jax.random.categorical(action_key, logits_SxA[cell])

        episodes = jax.vmap(
            lambda k: run_episode(env, k, sample_action, config.max_steps, step_cost, config.slip_prob)
        )(jax.random.split(batch_key, config.episodes_per_batch))
        grads_SxA = jax.grad(reinforce_loss)(logits_SxA, episodes, gamma, config.reinforce_baseline)
        stats = episode_stats(env, episodes)
        return logits_SxA - config.reinforce_lr * grads_SxA, jax.tree.map(jnp.mean, stats)

    initial_logits = jnp.zeros((env.num_cells, NUM_ACTIONS))  # uniform random policy
    return lax.scan(iteration, initial_logits, jax.random.split(key, config.num_batches))


# ----------------------------------------------------------------------------------------------
# Value-based: tabular Q-learning with epsilon-greedy exploration.
# ----------------------------------------------------------------------------------------------


def q_learning_update(q_SxA, move: Episode, alpha, gamma):
    """``Q(s, a) += alpha * (r + gamma * max_a' Q(s', a') - Q(s, a))`` for one move (no-op if dead).

    Fire and diamond are terminal (no bootstrap); hitting the step limit is not, since the cell
    itself is not an end.
    """
    bootstrap = jnp.where(move.terminal, 0.0, gamma * q_SxA[move.next_cell].max())
    td_error = move.reward + bootstrap - q_SxA[move.cell, move.action]
    return q_SxA.at[move.cell, move.action].add(move.alive * alpha * td_error)


def epsilon_at(iteration, config: Config):
    decay_iterations = max(config.epsilon_decay_fraction * config.num_batches, 1.0)
    progress = jnp.minimum(iteration / decay_iterations, 1.0)
    return config.epsilon_start + progress * (config.epsilon_end - config.epsilon_start)


def train_q_learning(key, gamma, step_cost, env: GridWorld, config: Config):
    """Train a Q table; each iteration plays a batch with the current table, then learns from it.

    The batch's moves are applied one at a time, in the order they were played, as in online
    Q-learning (only the acting table is refreshed once per batch).
    """

    def iteration(q_SxA, inputs):
        batch_key, iteration_index = inputs
        epsilon = epsilon_at(iteration_index, config)

        def epsilon_greedy(action_key, cell):
            explore_key, random_key, greedy_key = jax.random.split(action_key, 3)
            random_action = jax.random.randint(random_key, (), 0, NUM_ACTIONS)
            greedy_action = pick_uniform_among_best(greedy_key, q_SxA[cell])
            return jnp.where(jax.random.uniform(explore_key) < epsilon, random_action, greedy_action)

        episodes = jax.vmap(
            lambda k: run_episode(env, k, epsilon_greedy, config.max_steps, step_cost, config.slip_prob)
        )(jax.random.split(batch_key, config.episodes_per_batch))
        moves = jax.tree.map(lambda x: x.reshape(-1), episodes)  # episode after episode
        q_SxA, _ = lax.scan(lambda q, move: (q_learning_update(q, move, config.q_alpha, gamma), None), q_SxA, moves)
        stats = jax.tree.map(jnp.mean, episode_stats(env, episodes))
        return q_SxA, {**stats, "epsilon": epsilon}

    initial_q = jnp.zeros((env.num_cells, NUM_ACTIONS))
    iterations = jnp.arange(config.num_batches, dtype=jnp.float32)
    return lax.scan(iteration, initial_q, (jax.random.split(key, config.num_batches), iterations))


# ----------------------------------------------------------------------------------------------
# Evaluation and display.
# ----------------------------------------------------------------------------------------------


def evaluate(key, table_SxA, greedy, step_cost, env: GridWorld, config: Config):
    """Success rate, fire rate and mean length (of successful episodes) over ``eval_episodes``.

    ``greedy`` (a bool, may be traced) takes the best-scoring action (ties at random); otherwise
    actions are sampled from ``softmax(table)`` (the REINFORCE policy itself).
    """

    def choose_action(action_key, cell):
        best = pick_uniform_among_best(action_key, table_SxA[cell])
        sampled = jax.random.categorical(action_key, table_SxA[cell])
        return jnp.where(greedy, best, sampled)

    episodes = jax.vmap(lambda k: run_episode(env, k, choose_action, config.max_steps, step_cost, config.slip_prob))(
        jax.random.split(key, config.eval_episodes)
    )
    stats = episode_stats(env, episodes)
    successes = stats["success"].astype(jnp.float32)
    return {
        "success_rate": successes.mean(),
        "fire_rate": stats["fire"].astype(jnp.float32).mean(),
        "success_length": jnp.sum(stats["length"] * successes) / jnp.maximum(successes.sum(), 1.0),
    }


def arrow_grid(table_SxA: np.ndarray, grid: tuple[str, ...]) -> list[str]:
    """The greedy action of each cell as an arrow; F fire, D diamond, # wall, · no preference yet."""
    cols = len(grid[0])
    lines = []
    for row_index, row in enumerate(grid):
        cells = []
        for col_index, char in enumerate(row):
            scores = table_SxA[row_index * cols + col_index]
            if char in "FD#":
                cells.append(char)
            elif np.all(scores == scores[0]):
                cells.append("·")
            else:
                cells.append(ARROWS[int(np.argmax(scores))])
        lines.append(" ".join(cells))
    return lines


def shortest_path_length(grid: tuple[str, ...]) -> int | None:
    """Fewest moves from S to a diamond that avoid fire and walls (breadth-first search)."""
    rows, cols = len(grid), len(grid[0])
    start = next((r, c) for r in range(rows) for c in range(cols) if grid[r][c] == "S")
    distance = {start: 0}
    queue = collections.deque([start])
    while queue:
        r, c = queue.popleft()
        if grid[r][c] == "D":
            return distance[(r, c)]
        for d_row, d_col in MOVES:
            nr, nc = r + d_row, c + d_col
            if 0 <= nr < rows and 0 <= nc < cols and grid[nr][nc] not in "#F" and (nr, nc) not in distance:
                distance[(nr, nc)] = distance[(r, c)] + 1
                queue.append((nr, nc))
    return None


def variant_label(gamma: float, step_cost: float) -> str:
    return f"gamma={gamma:g}" + (f", cost={step_cost:g}" if step_cost else "")


def variant_tag(gamma: float, step_cost: float) -> str:
    """A TensorBoard-friendly name: ``g0.9`` or ``g1_cost0.01``."""
    return f"g{gamma:g}" + (f"_cost{step_cost:g}" if step_cost else "")


# ----------------------------------------------------------------------------------------------
# The experiment.
# ----------------------------------------------------------------------------------------------


def main(config: Config) -> dict:
    started = time.time()
    os.makedirs(config.out_dir, exist_ok=True)
    save_config(config, os.path.join(config.out_dir, "config.json"))
    env = make_gridworld(config.grid)

    # Variants: the main gamma first, then the gamma study, then gamma = 1 with a step cost.
    variants = [(config.gamma, 0.0)] + [(g, 0.0) for g in config.gamma_study]
    if config.step_cost > 0:
        variants.append((1.0, config.step_cost))
    variants = list(dict.fromkeys(variants))  # drop repeats, keep the order
    gammas_V = jnp.array([g for g, _ in variants], jnp.float32)
    costs_V = jnp.array([c for _, c in variants], jnp.float32)

    # One compiled call per agent trains every (variant, seed) pair: vmap over seeds inside,
    # over variants outside.
    def for_all_runs(train_fn):
        def train_one(key, gamma, step_cost):
            return train_fn(key, gamma, step_cost, env, config)

        over_seeds = jax.vmap(train_one, in_axes=(0, None, None))
        return jax.jit(jax.vmap(over_seeds, in_axes=(None, 0, 0)))

    reinforce_key, q_key, eval_key = jax.random.split(jax.random.key(config.seed), 3)
    seed_keys = lambda key: jax.random.split(key, config.num_seeds)  # noqa: E731
    logits_VxNxSxA, reinforce_stats = for_all_runs(train_reinforce)(seed_keys(reinforce_key), gammas_V, costs_V)
    q_VxNxSxA, q_stats = for_all_runs(train_q_learning)(seed_keys(q_key), gammas_V, costs_V)
    jax.block_until_ready(q_VxNxSxA)
    train_seconds = time.time() - started

    # Final evaluation of every trained table, with the same episodes budget.
    # Three ways to act, evaluated in one compiled call (vmap over them, variants and seeds).
    modes = {
        "reinforce_sampled": (logits_VxNxSxA, False),
        "reinforce_greedy": (logits_VxNxSxA, True),
        "q_learning_greedy": (q_VxNxSxA, True),
    }
    tables_MxVxNxSxA = jnp.stack([table for table, _ in modes.values()])
    greedy_M = jnp.array([greedy for _, greedy in modes.values()])

    def evaluate_one(key, table_SxA, greedy, step_cost):
        return evaluate(key, table_SxA, greedy, step_cost, env, config)

    over_seeds = jax.vmap(evaluate_one, in_axes=(0, 0, None, None))
    over_variants = jax.vmap(over_seeds, in_axes=(None, 0, None, 0))
    over_modes = jax.jit(jax.vmap(over_variants, in_axes=(None, 0, 0, None)))
    eval_keys_N = jax.random.split(eval_key, config.num_seeds)
    evaluated = over_modes(eval_keys_N, tables_MxVxNxSxA, greedy_M, costs_V)  # each [M, V, N]
    evaluations = {name: jax.tree.map(lambda x: x[m], evaluated) for m, name in enumerate(modes)}
    evaluations = jax.tree.map(np.asarray, evaluations)
    reinforce_stats, q_stats = jax.tree.map(np.asarray, (reinforce_stats, q_stats))  # [V, N, batches]

    # Per-iteration metrics (means over seeds) -> metrics.jsonl + TensorBoard.
    with MetricsLogger(
        config.out_dir,
        total_steps=config.num_batches,
        progress_keys=(
            f"reinforce/{variant_tag(*variants[0])}/success",
            f"q_learning/{variant_tag(*variants[0])}/success",
        ),
    ) as logger:
        for batch in range(config.num_batches):
            metrics = {
                "episodes": (batch + 1) * config.episodes_per_batch,
                "q_learning/epsilon": q_stats["epsilon"][0, 0, batch],
            }
            for v, variant in enumerate(variants):
                for agent, stats in (("reinforce", reinforce_stats), ("q_learning", q_stats)):
                    for name in ("success", "fire", "length"):
                        metrics[f"{agent}/{variant_tag(*variant)}/{name}"] = stats[name][v, :, batch].mean()
            logger.log(batch, metrics)

    # Plot: success rate and episode length by episode, one series per variant.
    episodes_axis = (np.arange(config.num_batches) + 1) * config.episodes_per_batch
    panels = {}
    for _agent, title, stats in (
        ("reinforce", "REINFORCE (policy-based)", reinforce_stats),
        ("q_learning", "Q-learning (value-based)", q_stats),
    ):
        panels[f"{title}: success rate"] = {
            variant_label(*variant): (episodes_axis, stats["success"][v].mean(0)) for v, variant in enumerate(variants)
        }
        panels[f"{title}: episode length"] = {
            variant_label(*variant): (episodes_axis, stats["length"][v].mean(0)) for v, variant in enumerate(variants)
        }
    plot_path = plot_curves(
        panels,
        os.path.join(config.out_dir, "gridworld.png"),
        title=f"Grid world, training batches of {config.episodes_per_batch} episodes, mean of {config.num_seeds} seeds",
        xlabel="episodes",
        ylims={k: (-0.05, 1.05) for k in panels if k.endswith("success rate")},
        smooth=config.smooth,
        ncols=2,
    )

    # Summary: the final numbers and the arrow grids of seed 0.
    optimal_length = shortest_path_length(config.grid)
    last_tenth = max(config.num_batches // 10, 1)
    results = []
    for v, (gamma, step_cost) in enumerate(variants):
        entry = {"gamma": gamma, "step_cost": step_cost}
        for agent, stats in (("reinforce", reinforce_stats), ("q_learning", q_stats)):
            entry[f"{agent}_train_success_last10pct"] = float(stats["success"][v, :, -last_tenth:].mean())
        for name, evaluation in evaluations.items():
            success_N = evaluation["success_rate"][v]
            lengths_N = evaluation["success_length"][v]
            entry[name] = {
                "success_rate": float(success_N.mean()),
                "success_rate_per_seed": [round(float(x), 4) for x in success_N],
                "fire_rate": float(evaluation["fire_rate"][v].mean()),
                # Mean moves of the successful episodes, weighting each seed by its successes.
                "success_length": (
                    float(np.sum(lengths_N * success_N) / np.sum(success_N)) if success_N.sum() > 0 else None
                ),
            }
        entry["reinforce_arrows_seed0"] = arrow_grid(np.asarray(logits_VxNxSxA[v, 0]), config.grid)
        entry["q_learning_arrows_seed0"] = arrow_grid(np.asarray(q_VxNxSxA[v, 0]), config.grid)
        results.append(entry)
    summary = {
        "map": list(config.grid),
        "shortest_path_length": optimal_length,
        "episodes_per_run": config.num_batches * config.episodes_per_batch,
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.time() - started, 2),
        "main": results[0],
        "variants": results,
        "plot": plot_path,
    }
    with open(os.path.join(config.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    print_report(summary, config)
    return summary


def print_report(summary: dict, config: Config) -> None:
    print("\nMap (S start, F fire, D diamond, # wall):")
    print("\n".join("  " + " ".join(row) for row in config.grid))
    print(f"Shortest safe path: {summary['shortest_path_length']} moves; step limit {config.max_steps}.")
    print(
        f"Each run: {summary['episodes_per_run']} training episodes; {config.num_seeds} seeds per variant; "
        f"final numbers over {config.eval_episodes} evaluation episodes per seed, averaged over seeds.\n"
    )
    for entry in summary["variants"]:
        label = variant_label(entry["gamma"], entry["step_cost"])
        grids = zip(entry["reinforce_arrows_seed0"], entry["q_learning_arrows_seed0"])
        print(f"[{label}]   REINFORCE (seed 0)   Q-learning (seed 0)")
        for left, right in grids:
            print(f"{' ' * (len(label) + 5)}{left}            {right}")
        for name in ("reinforce_sampled", "reinforce_greedy", "q_learning_greedy"):
            e = entry[name]
            moves = "-" if e["success_length"] is None else f"{e['success_length']:.2f}"
            print(
                f"  {name:18s} success {e['success_rate']:.3f}  fire {e['fire_rate']:.3f}  "
                f"moves to diamond {moves}  (per seed {e['success_rate_per_seed']})"
            )
        print()
    print(
        f"Outputs in {config.out_dir}: config.json, metrics.jsonl, TensorBoard events, gridworld.png, summary.json "
        f"({summary['total_seconds']:.1f} s)"
    )


if __name__ == "__main__":
    main(parse_config(Config))
